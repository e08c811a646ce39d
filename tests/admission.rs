//! Admission through HTTP: a rejected request gets the right OpenAI-shaped error and leaves
//! everything — job rows, outbox rows, queue depth, counters — exactly as it was. These run the
//! front without a worker, so every published message stays visible in the queue.

mod common;

use std::sync::Arc;

use common::{Snapshot, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::{config::ModelConfig, money::MicroUsd, store::keys::NewKey};

async fn env() -> TestEnv {
    TestEnv::front_only(vec![
        ModelConfig::mock("mock-1"),
        ModelConfig::mock("mock-2"),
    ])
    .await
}

fn job(model: &str) -> String {
    json!({"model": model, "input": "hello", "background": true}).to_string()
}

/// Sends `body`, asserts the status, the error shape and that nothing changed.
async fn assert_rejected(
    env: &TestEnv,
    secret: Option<&str>,
    body: &str,
    status: StatusCode,
    code: Option<&str>,
) -> (Value, reqwest::header::HeaderMap) {
    let before: Snapshot = env.snapshot().await;
    let (got, error, headers) = env.submit_raw(secret, body).await;
    assert_eq!(got, status, "{error}");
    let e = &error["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    assert!(e["type"].is_string(), "{error}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{error}"
    );
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{error}");
    }
    assert_eq!(
        env.snapshot().await,
        before,
        "a rejected request changed state"
    );
    (error, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_401_and_leave_nothing() {
    let env = env().await;
    env.key().await;
    assert_rejected(
        &env,
        None,
        &job("mock-1"),
        StatusCode::UNAUTHORIZED,
        Some("invalid_api_key"),
    )
    .await;
    assert_rejected(
        &env,
        Some("sk-tg-nope"),
        &job("mock-1"),
        StatusCode::UNAUTHORIZED,
        Some("invalid_api_key"),
    )
    .await;

    // A revoked key and an expired key are refused the same way.
    let revoked = env.key().await;
    let expired = env.key().await;
    for (secret, column) in [(&revoked, "revoked_at"), (&expired, "expires_at")] {
        sqlx::query(&format!(
            "UPDATE tollgate.api_keys SET {column} = now() - interval '1 second' WHERE key_hash = $1"
        ))
        .bind(tollgate::store::keys::hash_secret(secret))
        .execute(&env.pool)
        .await
        .unwrap();
        assert_rejected(
            &env,
            Some(secret),
            &job("mock-1"),
            StatusCode::UNAUTHORIZED,
            Some("invalid_api_key"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_400_naming_the_field_and_leave_nothing() {
    let env = env().await;
    let key = env.key().await;
    let cases = [
        ("{not json", None),
        ("[1, 2]", None),
        (r#"{"model": "mock-1", "background": true}"#, None),
        (
            r#"{"model": 7, "input": "x", "background": true}"#,
            Some("model"),
        ),
        (
            r#"{"model": "mock-1", "input": "x", "background": true, "max_output_tokens": "many"}"#,
            Some("max_output_tokens"),
        ),
        (
            r#"{"model": "mock-1", "input": "x", "background": true, "temperature": 3}"#,
            Some("temperature"),
        ),
        (
            r#"{"model": "mock-1", "input": "x", "background": true, "max_output_tokens": 999999}"#,
            Some("max_output_tokens"),
        ),
        (
            r#"{"model": "mock-1", "input": "x", "stream": "yes"}"#,
            Some("stream"),
        ),
        (
            r#"{"model": "mock-1", "input": "x", "background": 1}"#,
            Some("background"),
        ),
        (
            r#"{"model": "mock-1", "input": "x", "metadata": {"a": 1}}"#,
            Some("metadata.a"),
        ),
    ];
    for (body, param) in cases {
        let (error, _) =
            assert_rejected(&env, Some(&key), body, StatusCode::BAD_REQUEST, None).await;
        assert_eq!(
            error["error"]["type"], "invalid_request_error",
            "{body}: {error}"
        );
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{body}: {error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_forbidden_models_leave_nothing() {
    let env = env().await;
    let key = env
        .create_key(NewKey {
            name: "only-mock-1".into(),
            allowed_models: Some(vec!["mock-1".into()]),
            ..Default::default()
        })
        .await;
    assert_rejected(
        &env,
        Some(&key),
        &job("gpt-nope"),
        StatusCode::NOT_FOUND,
        Some("model_not_found"),
    )
    .await;
    assert_rejected(
        &env,
        Some(&key),
        &job("mock-2"),
        StatusCode::FORBIDDEN,
        Some("model_not_allowed"),
    )
    .await;
    let (status, _, _) = env.submit_raw(Some(&key), &job("mock-1")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rpm_is_429_with_retry_after_and_leaves_nothing() {
    let env = env().await;
    let key = env
        .create_key(NewKey {
            name: "rpm2".into(),
            rpm_limit: Some(2),
            ..Default::default()
        })
        .await;
    // Stay inside one minute window: if it is about to roll over, wait for the next one.
    let into_minute = chrono::Utc::now().timestamp() % 60;
    if into_minute > 55 {
        tokio::time::sleep(std::time::Duration::from_secs((61 - into_minute) as u64)).await;
    }
    for _ in 0..2 {
        env.submit_ok(&key, "mock-1", "x").await;
    }
    let after_two = env.snapshot().await;
    assert_eq!(after_two.jobs, 2);
    assert_eq!(after_two.queue_depth, Some(2));
    let (_, headers) = assert_rejected(
        &env,
        Some(&key),
        &job("mock-1"),
        StatusCode::TOO_MANY_REQUESTS,
        Some("rate_limit_exceeded"),
    )
    .await;
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_and_over_in_flight_are_429_and_leave_nothing() {
    let env = env().await;
    // mock-1 reserves (estimated input + 4096 output tokens) at 1 and 2 USD/1M: about 8,200
    // micro-USD. A budget of 0.01 USD fits one such reservation, not two.
    let budget_key = env
        .create_key(NewKey {
            name: "budget".into(),
            budget: MicroUsd::from_usd(0.01),
            ..Default::default()
        })
        .await;
    env.submit_ok(&budget_key, "mock-1", "x").await;
    assert_rejected(
        &env,
        Some(&budget_key),
        &job("mock-1"),
        StatusCode::TOO_MANY_REQUESTS,
        Some("insufficient_quota"),
    )
    .await;

    let slot_key = env
        .create_key(NewKey {
            name: "one-in-flight".into(),
            max_in_flight: Some(1),
            ..Default::default()
        })
        .await;
    env.submit_ok(&slot_key, "mock-1", "x").await;
    assert_rejected(
        &env,
        Some(&slot_key),
        &job("mock-1"),
        StatusCode::TOO_MANY_REQUESTS,
        Some("rate_limit_exceeded"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_admit_exactly_the_rpm_limit() {
    let env = Arc::new(env().await);
    let key = env
        .create_key(NewKey {
            name: "rpm10".into(),
            rpm_limit: Some(10),
            ..Default::default()
        })
        .await;
    let into_minute = chrono::Utc::now().timestamp() % 60;
    if into_minute > 50 {
        tokio::time::sleep(std::time::Duration::from_secs((61 - into_minute) as u64)).await;
    }
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let (env, key) = (env.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            env.submit_raw(Some(&key), &job("mock-1")).await.0
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (10, 50));
    let snap = env.snapshot().await;
    assert_eq!(
        (snap.jobs, snap.outbox, snap.queue_depth),
        (10, 10, Some(10))
    );
    assert_eq!(snap.rate_windows.iter().map(|w| w.2).sum::<i32>(), 10);
    assert_eq!(snap.counters[0].2, 10, "in-flight slots taken");
}

/// Every row the front publishes is marked sent (in batches, after the answer): none is left for
/// the relay, so no job is published twice, also in a burst of concurrent admissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_marked_sent_and_the_relay_publishes_none_again() {
    let env = Arc::new(env().await);
    let key = env.key().await;
    let submits = (0..64).map(|i| {
        let (env, key) = (env.clone(), key.clone());
        tokio::spawn(async move { env.submit_ok(&key, "mock-1", &format!("burst {i}")).await })
    });
    for submit in submits {
        submit.await.unwrap();
    }
    env.wait_for(std::time::Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tollgate.outbox WHERE sent_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap()
            == 0
    })
    .await;
    // Past the relay's grace and a few of its rounds: had a row been left unsent, it would
    // have been published a second time by now.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(env.queue_depth().await, Some(64));
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tollgate.outbox WHERE publish_attempts > 0")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        published, 0,
        "the relay published rows the front had published"
    );
}

/// One busy key cannot starve the others: while the busy key's counter row is locked (here by
/// the test, as a long burst would keep it), its admissions wait in the front, at most
/// `server.admissions_per_key` of them holding a pooled connection, and another key is admitted
/// through the remaining connections at once. Then every waiting admission goes through, the
/// ones that waited in the front together in one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_does_not_take_every_pooled_connection() {
    let mut config = common::isolated_config(vec![ModelConfig::mock("mock-1")]);
    // One connection is the front's LISTEN; the outbox relay, the event relay (every 100 ms) and
    // the sweeper use one now and then.
    config.database.max_connections = 7;
    let env = Arc::new(TestEnv::front_with(config).await);
    let busy = env.key().await;
    let other = env.key().await;
    // Look both keys up once, so their look-ups are cached and need no connection.
    env.submit_ok(&busy, "mock-1", "first").await;
    env.submit_ok(&other, "mock-1", "first").await;

    let (mut watching, mut lock) = own_connections(&env).await;
    let mut lock = sqlx::Connection::begin(&mut lock).await.unwrap();
    sqlx::query(
        "SELECT 1 FROM tollgate.key_counters c JOIN tollgate.api_keys k ON k.id = c.key_id
          WHERE k.key_hash = $1 FOR UPDATE OF c",
    )
    .bind(tollgate::store::keys::hash_secret(&busy))
    .execute(&mut *lock)
    .await
    .unwrap();
    let waiting: Vec<_> = (0..12)
        .map(|i| {
            let (env, busy) = (env.clone(), busy.clone());
            tokio::spawn(async move { env.submit_ok(&busy, "mock-1", &format!("busy {i}")).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while blocked_in_postgres(&mut watching).await.unwrap() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no admission waits for the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The busy key's row is still locked: the other key goes through the free connections.
    let admitted = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        env.submit_ok(&other, "mock-1", "not starved"),
    )
    .await;
    assert!(admitted.is_ok(), "the other key waited behind the busy one");
    let blocked = blocked_in_postgres(&mut watching).await.unwrap();
    assert_eq!(
        blocked, 2,
        "admissions of the busy key waiting in PostgreSQL"
    );
    // Give the busy key's other requests time to reach the front's queue.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    lock.commit().await.unwrap();
    for submit in waiting {
        submit.await.unwrap();
    }
    // They waited in the front and were decided together: the two statements that waited for
    // the lock, then one batch for the ten behind them (at most two, should a runner take its
    // turn between) — jobs committed by one statement share its transaction id.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM tollgate.jobs
          WHERE request->>'input' LIKE 'busy %'",
    )
    .fetch_one(&mut watching)
    .await
    .unwrap();
    assert!(
        (2..=4).contains(&transactions),
        "12 admissions of the busy key committed in {transactions} transactions"
    );
}

/// Requests of many keys are decided together: while the first batches wait (here for a limited
/// model's window, which the test holds), the requests behind them queue in the front, and once
/// the window is free they are decided in one statement per queue — jobs committed by one
/// statement share its transaction id — each exactly as alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_many_keys_share_one_statement() {
    let mut limited = ModelConfig::mock("limited");
    limited.rpm_limit = Some(10_000);
    let env = Arc::new(TestEnv::front_with(common::isolated_config(vec![limited])).await);
    let mut keys = Vec::new();
    for _ in 0..8 {
        keys.push(env.key().await);
    }
    common::leave_room_in_minute(20).await;
    // Open the minute's window, then hold it.
    for key in &keys {
        env.submit_ok(key, "limited", "first").await;
    }
    let (mut watching, mut lock) = own_connections(&env).await;
    let mut lock = sqlx::Connection::begin(&mut lock).await.unwrap();
    sqlx::query("SELECT 1 FROM tollgate.model_rate_windows WHERE model = 'limited' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let waiting: Vec<_> = (0..40)
        .map(|i| {
            let (env, key) = (env.clone(), keys[i % 8].clone());
            tokio::spawn(async move { env.submit_ok(&key, "limited", &format!("many {i}")).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    // One or two batches wait (the keys are spread over the front's two queues by their ids).
    while blocked_in_postgres(&mut watching).await.unwrap() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no batch waits");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    lock.commit().await.unwrap();
    for submit in waiting {
        submit.await.unwrap();
    }
    let (jobs, transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT xmin::text) FROM tollgate.jobs
          WHERE request->>'input' LIKE 'many %'",
    )
    .fetch_one(&mut watching)
    .await
    .unwrap();
    assert_eq!(jobs, 40);
    assert!(
        (1..=4).contains(&transactions),
        "40 admissions of 8 keys committed in {transactions} transactions"
    );
    let requests: i64 = sqlx::query_scalar(
        "SELECT sum(requests) FROM tollgate.model_rate_windows WHERE model = 'limited'",
    )
    .fetch_one(&mut watching)
    .await
    .unwrap();
    assert_eq!(requests, 48, "the model's window counts every request once");
}

/// Two connections of the test's own (not the front's): one to watch, one to hold a lock.
async fn own_connections(env: &TestEnv) -> (sqlx::PgConnection, sqlx::PgConnection) {
    use sqlx::Connection;
    let url = &env.config.database.url;
    (
        sqlx::PgConnection::connect(url).await.unwrap(),
        sqlx::PgConnection::connect(url).await.unwrap(),
    )
}

/// Sessions of this database waiting for a lock.
async fn blocked_in_postgres(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(conn)
    .await
}
