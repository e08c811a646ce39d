//! The admin API (`/admin/…`) through a real HTTP client against a real front: the master key
//! guards every route, a refused request writes nothing, a key's limits change for its very next
//! admission, revoking takes effect at once, usage shows what the key holds and did this minute,
//! webhook endpoints are managed, and the CLI's `keys set-limits` changes limits too.

mod common;

use common::{isolated_config, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::config::{ModelConfig, Secret};

const MASTER: &str = "admin-master-key-for-tests-0123456789";

async fn admin_env() -> TestEnv {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.admin.key = Some(Secret::new(MASTER));
    config.webhooks.allow_networks = vec!["127.0.0.0/8".into()];
    TestEnv::front_with(config).await
}

/// An admin request with `auth` as the bearer (none if `None`); the status and the JSON answer.
async fn call(
    env: &TestEnv,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = env.http.request(method, env.url(path));
    if let Some(auth) = auth {
        request = request.bearer_auth(auth);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, value)
}

async fn admin(
    env: &TestEnv,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call(env, method, path, Some(MASTER), body).await
}

async fn count(env: &TestEnv, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM tollgate.{table}"))
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

fn assert_error(body: &Value, kind: &str, code: Option<&str>) {
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    if let Some(code) = code {
        assert_eq!(body["error"]["code"], code, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_master_key_the_admin_api_is_closed() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    for (method, path) in [
        (reqwest::Method::GET, "/admin/keys"),
        (reqwest::Method::POST, "/admin/keys"),
        (reqwest::Method::GET, "/admin/webhooks"),
    ] {
        let (status, body) =
            call(&env, method, path, Some(MASTER), Some(json!({"name": "x"}))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_error(&body, "invalid_request_error", Some("admin_disabled"));
    }
    let (status, body) = call(&env, reqwest::Method::GET, "/admin/keys", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_error(&body, "invalid_request_error", Some("invalid_api_key"));
    assert_eq!(count(&env, "api_keys").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_master_key_opens_it_and_a_refusal_writes_nothing() {
    let env = admin_env().await;
    let api_key = env.key().await;
    let near_miss = format!("{}x", &MASTER[..MASTER.len() - 1]);
    for auth in [
        None,
        Some(api_key.as_str()),
        Some(near_miss.as_str()),
        Some(""),
    ] {
        let (status, body) = call(
            &env,
            reqwest::Method::POST,
            "/admin/keys",
            auth,
            Some(json!({"name": "intruder"})),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        assert_error(&body, "invalid_request_error", Some("invalid_api_key"));
    }
    // Bad bodies, with the master key: 400 naming the field, nothing written.
    for (body, param) in [
        (json!({"rpm_limit": 5}), "name"),
        (json!({"name": "k", "rpm_limit": 0}), "rpm_limit"),
        (json!({"name": "k", "rpm_limit": "ten"}), "rpm_limit"),
        (
            json!({"name": "k", "budget_micro_usd": -1}),
            "budget_micro_usd",
        ),
        (
            json!({"name": "k", "budget_period": "weekly"}),
            "budget_period",
        ),
        (
            json!({"name": "k", "allowed_models": "mock-1"}),
            "allowed_models",
        ),
        (json!({"name": "k", "colour": "blue"}), "colour"),
        (json!({"name": ""}), "name"),
    ] {
        let (status, answer) = admin(
            &env,
            reqwest::Method::POST,
            "/admin/keys",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_error(&answer, "invalid_request_error", None);
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
    let malformed = env
        .http
        .post(env.url("/admin/keys"))
        .bearer_auth(MASTER)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_error(
        &malformed.json().await.unwrap(),
        "invalid_request_error",
        None,
    );
    assert_eq!(count(&env, "api_keys").await, 1, "only the test's own key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_listed_changed_used_and_revoked() {
    let env = admin_env().await;
    common::leave_room_in_minute(20).await;
    let (status, created) = admin(
        &env,
        reqwest::Method::POST,
        "/admin/keys",
        Some(
            json!({"name": "team-a", "rpm_limit": 1, "budget_micro_usd": 5_000_000,
                    "budget_period": "monthly", "allowed_models": ["mock-1"]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["key"]
        .as_str()
        .expect("the secret, once")
        .to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with(created["key_prefix"].as_str().unwrap()));
    assert_eq!(created["rpm_limit"], 1);
    assert_eq!(created["budget_period"], "monthly");

    // Listed and read without the secret.
    let (status, list) = admin(&env, reqwest::Method::GET, "/admin/keys", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(
        !list.to_string().contains(&secret),
        "a listing shows a secret"
    );
    let (status, got) = admin(
        &env,
        reqwest::Method::GET,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["name"], "team-a");
    assert!(got.get("key").is_none());
    for missing in [
        "/admin/keys/not-a-uuid",
        "/admin/keys/00000000-0000-0000-0000-000000000000",
    ] {
        let (status, body) = admin(&env, reqwest::Method::GET, missing, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_error(&body, "invalid_request_error", Some("key_not_found"));
    }

    // The key works, and its limit of 1 request a minute holds.
    let body = json!({"model": "mock-1", "input": "hi", "background": true});
    assert_eq!(env.submit(&secret, body.clone()).await.0, StatusCode::OK);
    assert_eq!(
        env.submit(&secret, body.clone()).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Lifting the limit takes effect on the very next request (every front drops its cached
    // copy of the key on the row's notification).
    let (status, changed) = admin(
        &env,
        reqwest::Method::PATCH,
        &format!("/admin/keys/{id}"),
        Some(json!({"rpm_limit": null, "max_in_flight": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["rpm_limit"], Value::Null);
    assert_eq!(changed["max_in_flight"], 3);
    assert_eq!(
        changed["budget_micro_usd"], 5_000_000,
        "an absent field is kept"
    );
    let admitted_after_change = env.submit(&secret, body.clone()).await.0;
    assert_eq!(admitted_after_change, StatusCode::OK);
    assert_eq!(env.submit(&secret, body.clone()).await.0, StatusCode::OK);
    // Three in flight now (no worker runs): the new max_in_flight refuses a fourth.
    let (status, refused) = env.submit(&secret, body.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{refused}");

    // Usage: what the key holds now and what it did this minute.
    let (status, usage) = admin(
        &env,
        reqwest::Method::GET,
        &format!("/admin/keys/{id}/usage"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["object"], "admin.key.usage");
    assert_eq!(usage["in_flight"], 3, "{usage}");
    assert_eq!(usage["jobs"]["queued"], 3, "{usage}");
    assert!(usage["reserved_micro_usd"].as_i64().unwrap() > 0, "{usage}");
    assert_eq!(usage["spent_micro_usd"], 0, "{usage}");
    // Requests are counted by the minute while the key has a rate limit: the first one (the
    // second was refused, and a refusal counts nothing); those after the change are not.
    assert_eq!(usage["requests_this_minute"], 1, "{usage}");

    // A bad change is refused and changes nothing.
    let (status, _) = admin(
        &env,
        reqwest::Method::PATCH,
        &format!("/admin/keys/{id}"),
        Some(json!({"max_in_flight": 10, "tpm_limit": -5})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, unchanged) = admin(
        &env,
        reqwest::Method::GET,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(unchanged["max_in_flight"], 3);

    // Revoked: refused at once, and no longer changeable.
    let (status, revoked) = admin(
        &env,
        reqwest::Method::POST,
        &format!("/admin/keys/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].as_i64().is_some(), "{revoked}");
    let (status, kept) = admin(
        &env,
        reqwest::Method::GET,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the record stays");
    assert_eq!(kept["revoked_at"], revoked["revoked_at"]);
    let (status, refused) = env.submit(&secret, body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{refused}");
    let (status, _) = admin(
        &env,
        reqwest::Method::POST,
        &format!("/admin/keys/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = admin(
        &env,
        reqwest::Method::PATCH,
        &format!("/admin/keys/{id}"),
        Some(json!({"rpm_limit": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoints_are_added_listed_and_removed() {
    let env = admin_env().await;
    let (_, key) = admin(
        &env,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"name": "hooks"})),
    )
    .await;
    let key_id = key["id"].as_str().unwrap();
    let (status, added) = admin(
        &env,
        reqwest::Method::POST,
        "/admin/webhooks",
        Some(json!({"key_id": key_id, "url": "http://127.0.0.1:9/hook",
                    "event_types": ["response.completed"]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    assert!(added["secret"].as_str().unwrap().starts_with("whsec_"));
    let endpoint = added["id"].as_str().unwrap().to_string();

    // Refused: a private address (not allow-listed), an unknown type, an unknown key.
    for (body, status) in [
        (
            json!({"key_id": key_id, "url": "http://10.1.2.3/hook"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"key_id": key_id, "url": "http://127.0.0.1:9/x", "event_types": ["job.done"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"key_id": "00000000-0000-0000-0000-000000000000", "url": "http://127.0.0.1:9/y"}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (got, answer) = admin(
            &env,
            reqwest::Method::POST,
            "/admin/webhooks",
            Some(body.clone()),
        )
        .await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_error(&answer, "invalid_request_error", None);
    }
    assert_eq!(count(&env, "webhook_endpoints").await, 1);

    let (_, list) = admin(&env, reqwest::Method::GET, "/admin/webhooks", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(list["data"][0].get("secret").is_none(), "{list}");
    let (status, removed) = admin(
        &env,
        reqwest::Method::DELETE,
        &format!("/admin/webhooks/{endpoint}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(removed["deleted"], true);
    let (status, _) = admin(
        &env,
        reqwest::Method::DELETE,
        &format!("/admin/webhooks/{endpoint}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = admin(&env, reqwest::Method::GET, "/admin/webhooks", None).await;
    assert!(list["data"][0]["disabled_at"].as_i64().is_some(), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_routes_are_in_the_openapi_document() {
    let env = admin_env().await;
    let document: Value = env
        .http
        .get(env.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/admin/keys",
        "/admin/keys/{id}",
        "/admin/keys/{id}/usage",
        "/admin/keys/{id}/revoke",
        "/admin/webhooks",
        "/admin/webhooks/{id}",
    ] {
        assert!(document["paths"][path].is_object(), "{path} missing");
    }
    assert!(document["paths"]["/admin/keys/{id}"]["patch"].is_object());
    assert!(document["components"]["securitySchemes"]["admin_key"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_limits() {
    let env = admin_env().await;
    let (_, key) = admin(
        &env,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"name": "cli", "rpm_limit": 10, "tpm_limit": 1000})),
    )
    .await;
    let id = key["id"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-admin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("tollgate.toml");
    std::fs::write(&config_path, toml::to_string(env.config.as_ref()).unwrap()).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env_remove("TOLLGATE_ADMIN_KEY")
            .output()
            .unwrap()
    };
    let out = run(&[
        "keys",
        "set-limits",
        id,
        "--rpm",
        "none",
        "--max-in-flight",
        "7",
        "--budget-usd",
        "2.5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["rpm_limit"], Value::Null);
    assert_eq!(printed["max_in_flight"], 7);
    assert_eq!(printed["tpm_limit"], 1000, "kept");
    assert_eq!(printed["budget_micro_usd"], 2_500_000);
    let (_, got) = admin(
        &env,
        reqwest::Method::GET,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(got["max_in_flight"], 7);
    assert_eq!(got["rpm_limit"], Value::Null);

    let refused = run(&["keys", "set-limits", id, "--rpm", "0"]);
    assert!(!refused.status.success());
    let unknown = run(&[
        "keys",
        "set-limits",
        "00000000-0000-0000-0000-000000000000",
        "--rpm",
        "5",
    ]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no live key"));
    let _ = std::fs::remove_dir_all(&dir);
}
