//! Guardrails through HTTP: size, deny patterns and a webhook (allow, deny, timeout with fail-open
//! and fail-closed). A refused request is a 400 naming the guardrail and leaves nothing behind.

mod common;

use std::time::Duration;

use axum::{routing::post, Json, Router};
use common::{isolated_config, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::config::{DenyPattern, ModelConfig, WebhookGuardrail};

/// A webhook guardrail: denies inputs containing "forbidden", answers "slow" inputs after 2 s.
async fn webhook() -> String {
    async fn decide(Json(body): Json<Value>) -> Json<Value> {
        let text = body["messages"].to_string();
        if text.contains("slow") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if text.contains("forbidden") {
            Json(json!({"allow": false, "reason": "forbidden topic"}))
        } else {
            Json(json!({"allow": true}))
        }
    }
    let app = Router::new().route("/check", post(decide));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/check")
}

async fn env_with(fail_open: bool) -> TestEnv {
    let url = webhook().await;
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.guardrails.max_input_bytes = Some(200);
    config.guardrails.deny = vec![DenyPattern {
        name: "no-card-numbers".into(),
        pattern: r"\b\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}\b".into(),
    }];
    config.guardrails.webhooks = vec![WebhookGuardrail {
        name: "moderation".into(),
        url,
        timeout_ms: 300,
        fail_open,
    }];
    TestEnv::front_with(config).await
}

async fn assert_blocked(env: &TestEnv, key: &str, input: &str, guardrail: &str) {
    let before = env.snapshot().await;
    let (status, error) = env
        .submit(
            key,
            json!({"model": "mock-1", "input": input, "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["code"], "guardrail_violation");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains(guardrail), "{message}");
    assert_eq!(env.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guardrails_refuse_naming_themselves_and_leave_nothing() {
    let env = env_with(false).await;
    let key = env.key().await;
    env.submit_ok(&key, "mock-1", "a perfectly fine question")
        .await;
    assert_blocked(&env, &key, &"x".repeat(201), "max_input_bytes").await;
    assert_blocked(
        &env,
        &key,
        "my card is 4111 1111 1111 1111",
        "no-card-numbers",
    )
    .await;
    assert_blocked(&env, &key, "tell me the forbidden thing", "moderation").await;
    // Fail-closed: a webhook that does not answer in time refuses.
    assert_blocked(&env, &key, "slow question", "moderation").await;
    let reasons: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason, sum(count)::bigint FROM tollgate.rejections GROUP BY reason ORDER BY reason",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        reasons,
        vec![
            ("guardrail:max_input_bytes".into(), 1),
            ("guardrail:moderation".into(), 2),
            ("guardrail:no-card-numbers".into(), 1),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_webhook_that_times_out_lets_the_request_through() {
    let env = env_with(true).await;
    let key = env.key().await;
    env.submit_ok(&key, "mock-1", "slow question").await;
    // A webhook that answers still decides.
    assert_blocked(&env, &key, "forbidden", "moderation").await;
}
