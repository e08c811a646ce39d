//! Admission under real concurrency on real PostgreSQL: limits admit exactly what they allow,
//! whatever races, and every path to a terminal state gives back exactly what admission took.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    leave_room_in_minute,
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::{
    admission::worst_case_cost,
    config::{ModelConfig, ProviderKind},
    money::MicroUsd,
    request::CreateResponse,
    store::keys::NewKey,
};

fn body(model: &str) -> Value {
    json!({"model": model, "input": "count me", "background": true})
}

/// Fires `n` submissions at once and returns their status codes and bodies.
async fn burst(env: &Arc<TestEnv>, key: &str, body: Value, n: usize) -> Vec<(StatusCode, Value)> {
    join_all((0..n).map(|_| {
        let (env, key, body) = (env.clone(), key.to_string(), body.clone());
        async move { env.submit(&key, body).await }
    }))
    .await
}

fn tally(results: &[(StatusCode, Value)]) -> (usize, usize) {
    let ok = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let limited = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + limited, results.len(), "only 200 and 429 expected");
    (ok, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_submissions_against_rpm_100_admit_exactly_100() {
    let env = Arc::new(TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await);
    let key = env
        .create_key(NewKey {
            name: "rpm100".into(),
            rpm_limit: Some(100),
            ..Default::default()
        })
        .await;
    leave_room_in_minute(40).await;
    let started = std::time::Instant::now();
    let results = burst(&env, &key, body("mock-1"), 1000).await;
    let elapsed = started.elapsed();
    let (ok, limited) = tally(&results);
    eprintln!("rpm=100, 1000 concurrent: admitted {ok}, rejected {limited} in {elapsed:?}");
    assert_eq!((ok, limited), (100, 900));
    for (status, error) in &results {
        if *status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(error["error"]["code"], "rate_limit_exceeded");
        }
    }
    let snap = env.snapshot().await;
    assert_eq!(
        (snap.jobs, snap.outbox, snap.queue_depth),
        (100, 100, Some(100))
    );
    assert_eq!(snap.rate_windows.iter().map(|w| w.2).sum::<i32>(), 100);
    let rejected: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(count), 0)::bigint FROM tollgate.rejections WHERE reason = 'key_rpm'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(rejected, 900, "every rejection counted, none as a job row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_fits_37_reservations_admits_exactly_37_of_200() {
    let env_arc = Arc::new(TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await);
    let request = body("mock-1");
    let (parsed, _) = CreateResponse::parse(request.to_string().as_bytes()).unwrap();
    let reservation = worst_case_cost(env_arc.config.model("mock-1").unwrap(), &parsed);
    assert!(reservation.0 > 0);
    let budget = MicroUsd(37 * reservation.0 + reservation.0 / 2);
    let key = env_arc
        .create_key(NewKey {
            name: "budget37".into(),
            budget: Some(budget),
            ..Default::default()
        })
        .await;
    let results = burst(&env_arc, &key, request, 200).await;
    let (ok, limited) = tally(&results);
    eprintln!("budget for 37 reservations, 200 concurrent: admitted {ok}, rejected {limited}");
    assert_eq!((ok, limited), (37, 163));
    for (status, error) in &results {
        if *status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(error["error"]["code"], "insufficient_quota");
        }
    }
    let (in_flight, reserved, spent) = env_arc.counters_of(&key).await;
    assert_eq!((in_flight, reserved, spent), (37, 37 * reservation.0, 0));

    // Run them: real usage replaces the reservations.
    let mut env = Arc::try_unwrap(env_arc).ok().expect("sole owner");
    env.start_worker();
    for (_, created) in results.iter().filter(|(s, _)| *s == StatusCode::OK) {
        let done = env
            .poll_until_done(&key, created["id"].as_str().unwrap())
            .await;
        assert_eq!(done["status"], "completed");
    }
    let (in_flight, reserved, spent) = env.counters_of(&key).await;
    eprintln!(
        "after completion: spent {spent} of budget {} micro-USD",
        budget.0
    );
    assert_eq!((in_flight, reserved), (0, 0));
    assert!(
        spent > 0 && spent <= budget.0,
        "spent {spent} > budget {}",
        budget.0
    );
    let charged: i64 =
        sqlx::query_scalar("SELECT sum(charged_micro_usd)::bigint FROM tollgate.jobs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(charged, spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_slots_are_exact_and_every_terminal_path_gives_them_back() {
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let mut slow = ModelConfig::mock("slow");
    slow.mock_deltas = 200;
    slow.mock_delay_ms = 20;
    let failing = ModelConfig {
        provider: ProviderKind::Openai,
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock("failing")
    };
    let env = Arc::new(TestEnv::front_only(vec![ModelConfig::mock("mock-1"), slow, failing]).await);
    let key = env
        .create_key(NewKey {
            name: "five".into(),
            max_in_flight: Some(5),
            ..Default::default()
        })
        .await;
    let results = burst(&env, &key, body("mock-1"), 50).await;
    let (ok, limited) = tally(&results);
    eprintln!("max_in_flight=5, 50 concurrent: admitted {ok}, rejected {limited}");
    assert_eq!((ok, limited), (5, 45));
    assert_eq!(env.counters_of(&key).await.0, 5);
    let ids: Vec<String> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, b)| b["id"].as_str().unwrap().to_string())
        .collect();

    // Cancel path (queued): two cancelled before any worker runs. Cancelling again changes nothing.
    for id in &ids[..2] {
        let (status, cancelled) = env
            .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
            .await;
        assert_eq!(status, StatusCode::OK, "{cancelled}");
        assert_eq!(cancelled["status"], "cancelled");
        let (status, _) = env
            .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        env.counters_of(&key).await,
        (3, env.counters_of(&key).await.1, 0)
    );

    // Completion path: a worker runs the other three (and skips the two cancelled messages).
    let mut env = Arc::try_unwrap(env).ok().expect("sole owner");
    env.start_worker();
    for id in &ids[2..] {
        assert_eq!(env.poll_until_done(&key, id).await["status"], "completed");
    }
    let (in_flight, reserved, spent_after_completion) = env.counters_of(&key).await;
    assert_eq!((in_flight, reserved), (0, 0));
    assert!(spent_after_completion > 0);

    // Failure path: the upstream refuses.
    let failed = env.submit_ok(&key, "failing", "x").await;
    assert_eq!(env.poll_until_done(&key, &failed).await["status"], "failed");
    assert_eq!(env.counters_of(&key).await, (0, 0, spent_after_completion));

    // Cancel path (running): the worker stops and the slot comes back once.
    let running = env.submit_ok(&key, "slow", "x").await;
    env.wait_for(Duration::from_secs(10), || async {
        env.get(&key, &running).await.1["status"] == "in_progress"
    })
    .await;
    let (status, cancelled) = env
        .post_empty(&key, &format!("/v1/responses/{running}/cancel"))
        .await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = env.get(&key, &running).await.1;
    assert_eq!(
        after["status"], "cancelled",
        "the worker must not overwrite a cancel"
    );
    // What it streamed before the cancel (if anything yet) is charged, once.
    let charged: i64 = sqlx::query_scalar(
        "SELECT coalesce(charged_micro_usd, 0) FROM tollgate.jobs WHERE model = 'slow'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let spent_after_cancel = spent_after_completion + charged;
    assert_eq!(env.counters_of(&key).await, (0, 0, spent_after_cancel));

    // A redelivered message for a finished job changes nothing.
    let finished = ids[2].clone();
    let message = tollgate::queue::JobMessage::new(
        tollgate::ids::JobId::parse_public(&finished).unwrap(),
        "mock-1",
    );
    let publisher = tollgate::queue::Publisher::new(env.config.clone());
    publisher.publish(&message).await.unwrap();
    env.wait_for(Duration::from_secs(10), || async {
        env.queue_depth().await == Some(0)
    })
    .await;
    env.stop_worker().await;
    publisher.close().await;
    assert_eq!(env.counters_of(&key).await, (0, 0, spent_after_cancel));
    // A completed job cannot be cancelled.
    let (status, _) = env
        .post_empty(&key, &format!("/v1/responses/{finished}/cancel"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_left_queued_past_its_ttl_expires_and_gives_back_its_slot() {
    let mut config = common::isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.queued_job_ttl_seconds = 1;
    config.server.sweep_interval_ms = 100;
    let env = TestEnv::front_with(config).await;
    let key = env
        .create_key(NewKey {
            name: "expiring".into(),
            max_in_flight: Some(1),
            budget: MicroUsd::from_usd(1.0),
            ..Default::default()
        })
        .await;
    let id = env.submit_ok(&key, "mock-1", "nobody runs me").await;
    assert_eq!(env.counters_of(&key).await.0, 1);
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "expired");
    assert_eq!(env.counters_of(&key).await, (0, 0, 0));
    // The slot is free again.
    env.submit_ok(&key, "mock-1", "again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tpm_window_is_corrected_to_real_usage_when_the_job_finishes() {
    let upstream = FakeUpstream::start(Script::Stream {
        deltas: vec!["ok".into()],
        prompt_tokens: 1_000,
        completion_tokens: 2_000,
    })
    .await;
    let model = ModelConfig {
        provider: ProviderKind::Openai,
        upstream_model: Some("gpt-4o-mini".into()),
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock("gpt-4o-mini")
    };
    let mut env = TestEnv::front_only(vec![model]).await;
    let key = env
        .create_key(NewKey {
            name: "tpm".into(),
            tpm_limit: Some(100_000),
            ..Default::default()
        })
        .await;
    leave_room_in_minute(15).await;
    let (status, created, headers) = env
        .submit_with_headers(
            &key,
            &json!({"model": "gpt-4o-mini", "input": "hello world", "background": true}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    // "hello world" is 2 tokens in o200k_base, plus 4 for the message and 3 to prime the reply.
    let pool = env.pool.clone();
    let window = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT tokens FROM tollgate.rate_windows")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(window().await, 9);
    assert_eq!(headers["x-ratelimit-limit-tokens"], "100000");
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "99991");
    env.start_worker();
    env.poll_until_done(&key, created["id"].as_str().unwrap())
        .await;
    assert_eq!(
        window().await,
        3_000,
        "estimate replaced by real input + output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_rejects_what_does_not_fit_and_reports_it() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(NewKey {
            name: "tpm20".into(),
            tpm_limit: Some(20),
            ..Default::default()
        })
        .await;
    leave_room_in_minute(10).await;
    // "count me" is 2 fallback tokens + 7 of framing = 9: two fit in 20, the third does not.
    env.submit_ok(&key, "mock-1", "count me").await;
    env.submit_ok(&key, "mock-1", "count me").await;
    let before = env.snapshot().await;
    let (status, error, headers) = env.submit_with_headers(&key, &body("mock-1"), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{error}");
    assert_eq!(error["error"]["type"], "tokens");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "0");
    assert_eq!(env.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_limit_is_shared_across_keys() {
    let mut limited = ModelConfig::mock("shared");
    limited.rpm_limit = Some(3);
    let env = Arc::new(TestEnv::front_only(vec![limited]).await);
    let (a, b) = (env.key().await, env.key().await);
    leave_room_in_minute(15).await;
    let results_a = burst(&env, &a, body("shared"), 5).await;
    let results_b = burst(&env, &b, body("shared"), 5).await;
    let (ok_a, _) = tally(&results_a);
    let (ok_b, _) = tally(&results_b);
    assert_eq!(ok_a + ok_b, 3);
    let rejection = results_b
        .iter()
        .chain(&results_a)
        .find(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .unwrap();
    assert!(
        rejection.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model rate limit"),
        "{}",
        rejection.1
    );
    assert_eq!(env.snapshot().await.jobs, 3);
}

/// Batches of different keys that mix models with limits lock the models' shared windows in one
/// order, so they never wait for each other in a cycle: a burst where every key sends both models
/// in turn is admitted whole (a deadlock would answer 500), and each model's window counts
/// exactly its requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_mixing_limited_models_across_keys_never_deadlock() {
    let models: Vec<ModelConfig> = ["limited-a", "limited-b"]
        .into_iter()
        .map(|name| {
            let mut model = ModelConfig::mock(name);
            model.rpm_limit = Some(100_000);
            model
        })
        .collect();
    let env = Arc::new(TestEnv::front_only(models).await);
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(env.key().await);
    }
    leave_room_in_minute(30).await;
    let results = join_all((0..400).map(|i| {
        let (env, key) = (env.clone(), keys[i % 4].clone());
        // Key 0 sends a, b, a, b…; key 1 b, a, b, a…: in arrival order, opposite orders.
        let model = if (i / 4 + i % 2) % 2 == 0 {
            "limited-a"
        } else {
            "limited-b"
        };
        async move { env.submit(&key, body(model)).await }
    }))
    .await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let windows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT model, sum(requests)::integer FROM tollgate.model_rate_windows
          GROUP BY model ORDER BY model",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        windows,
        vec![
            ("limited-a".to_string(), 200),
            ("limited-b".to_string(), 200)
        ]
    );
    assert_eq!(env.snapshot().await.jobs, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_idempotent_requests_make_one_job() {
    let env = Arc::new(TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await);
    let key = env.key().await;
    let results = join_all((0..50).map(|_| {
        let (env, key) = (env.clone(), key.clone());
        async move {
            env.submit_with_headers(&key, &body("mock-1"), &[("Idempotency-Key", "order-42")])
                .await
        }
    }))
    .await;
    let first = results[0].1["id"].clone();
    for (status, created, _) in &results {
        assert_eq!(*status, StatusCode::OK, "{created}");
        assert_eq!(created["id"], first);
    }
    let snap = env.snapshot().await;
    assert_eq!((snap.jobs, snap.outbox, snap.queue_depth), (1, 1, Some(1)));
    assert_eq!(env.counters_of(&key).await.0, 1, "admitted once");

    // The same idempotency key with another body is refused, and changes nothing.
    let (status, error, _) = env
        .submit_with_headers(
            &key,
            &json!({"model": "mock-1", "input": "something else", "background": true}),
            &[("Idempotency-Key", "order-42")],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["code"], "idempotency_key_reused");
    assert_eq!(env.snapshot().await, snap);
    // Another key may use the same idempotency key for its own job.
    let other = env.key().await;
    let (status, created, _) = env
        .submit_with_headers(&other, &body("mock-1"), &[("Idempotency-Key", "order-42")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(created["id"], first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_openai_rate_limit_headers() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(NewKey {
            name: "headers".into(),
            rpm_limit: Some(10),
            tpm_limit: Some(1_000),
            ..Default::default()
        })
        .await;
    leave_room_in_minute(10).await;
    let (status, _, headers) = env.submit_with_headers(&key, &body("mock-1"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "9");
    assert_eq!(headers["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "991");
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        let reset = headers[name].to_str().unwrap();
        let secs: u64 = reset.strip_suffix('s').unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs), "{name}: {reset}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_period_that_rolled_over_starts_spend_again() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(NewKey {
            name: "daily".into(),
            budget: MicroUsd::from_usd(0.02),
            budget_period: Some(tollgate::store::keys::BudgetPeriod::Daily),
            ..Default::default()
        })
        .await;
    // Yesterday's spend used up the budget...
    sqlx::query(
        "UPDATE tollgate.key_counters SET spent_micro_usd = 20000,
                period_start = date_trunc('day', now(), 'UTC') - interval '1 day'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // ...today it starts from zero.
    env.submit_ok(&key, "mock-1", "new day").await;
    let (_, _, spent) = env.counters_of(&key).await;
    assert_eq!(spent, 0);
    // Within the same period, spend is kept.
    sqlx::query("UPDATE tollgate.key_counters SET spent_micro_usd = 20000")
        .execute(&env.pool)
        .await
        .unwrap();
    let (status, error) = env.submit(&key, body("mock-1")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{error}");
    assert_eq!(error["error"]["code"], "insufficient_quota");
}
