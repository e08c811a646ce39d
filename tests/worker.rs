//! The worker: it never runs admission, a message for a finished job changes nothing, a message
//! it cannot understand is dead-lettered, and a job it gives back on shutdown runs once.

mod common;

use std::time::Duration;

use common::TestEnv;
use lapin::{options::BasicPublishOptions, BasicProperties, Connection, ConnectionProperties};
use tollgate::{
    config::ModelConfig,
    ids::JobId,
    queue::{JobMessage, ROUTING_KEY},
};

async fn publish_raw(env: &TestEnv, body: &[u8]) {
    let conn = Connection::connect(&env.config.amqp.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            env.config.amqp.exchange.as_str().into(),
            ROUTING_KEY.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    assert!(confirm.take_message().is_none(), "message was unroutable");
    conn.close(200, "done".into()).await.unwrap();
}

/// The `x-tollgate-reason` header of every message in the dead-letter queue (consumed).
async fn dead_letter_reasons(env: &TestEnv) -> Vec<String> {
    let conn = Connection::connect(&env.config.amqp.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut reasons = Vec::new();
    while let Some(message) = channel
        .basic_get(
            env.config.amqp.dead_letter_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = headers
            .inner()
            .get(tollgate::queue::REASON_HEADER)
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .unwrap_or_default();
        reasons.push(reason);
    }
    conn.close(200, "done".into()).await.unwrap();
    reasons
}

/// (status, attempt, cost, number of event rows) of a job.
async fn job_state(env: &TestEnv, id: &str) -> (String, i32, Option<i64>, i64) {
    let uuid = JobId::parse_public(id).unwrap().0;
    sqlx::query_as(
        "SELECT status::text, attempt, cost_micro_usd,
                (SELECT count(*) FROM tollgate.job_events e WHERE e.job_id = j.id)
           FROM tollgate.jobs j WHERE id = $1",
    )
    .bind(uuid)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_moves_no_admission_counter() {
    let mut env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(tollgate::store::keys::NewKey {
            name: "counted".into(),
            rpm_limit: Some(1000),
            max_in_flight: Some(100),
            budget: tollgate::money::MicroUsd::from_usd(10.0),
            ..Default::default()
        })
        .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(env.submit_ok(&key, "mock-1", &format!("job {i}")).await);
    }
    let admitted = env.snapshot().await;
    assert_eq!(admitted.queue_depth, Some(5));
    assert_eq!(admitted.counters[0].2, 5, "five in-flight slots taken");
    assert!(admitted.counters[0].3 > 0, "budget reserved");

    env.start_worker();
    let mut total_cost = 0;
    for id in &ids {
        let done = env.poll_until_done(&key, id).await;
        assert_eq!(done["status"], "completed");
        total_cost += job_state(&env, id).await.2.unwrap();
    }
    let finished = env.snapshot().await;
    // The requests-per-minute window is admission's alone: the worker left it as it was.
    assert_eq!(finished.rate_windows, admitted.rate_windows);
    assert_eq!(finished.jobs, admitted.jobs);
    assert_eq!(finished.outbox, admitted.outbox);
    // Finishing gave back the slots and the reservations and charged the real cost, once.
    let (_, _, in_flight, reserved, spent) = finished.counters[0];
    assert_eq!((in_flight, reserved, spent), (0, 0, total_cost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_for_a_finished_job_is_acked_and_changes_nothing() {
    let mut env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "once").await;
    env.poll_until_done(&key, &id).await;
    let before_state = job_state(&env, &id).await;
    let before = env.snapshot().await;

    // The same message again, as a redelivery or a second publish by the relay would bring it.
    let message = JobMessage::new(JobId::parse_public(&id).unwrap(), "mock-1");
    publish_raw(&env, &serde_json::to_vec(&message).unwrap()).await;
    env.wait_for(Duration::from_secs(10), || async {
        env.queue_depth().await == Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Stopping the worker hands back anything it had not settled; nothing must come back.
    env.stop_worker().await;
    assert_eq!(env.queue_depth().await, Some(0), "duplicate was not acked");
    assert_eq!(env.dead_letter_depth().await, Some(0));
    assert_eq!(job_state(&env, &id).await, before_state);
    assert_eq!(env.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_worker_cannot_understand_are_dead_lettered() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    publish_raw(&env, b"this is not json").await;
    publish_raw(&env, br#"{"v": 99, "job_id": "resp_x", "model": "m"}"#).await;
    let unknown = JobMessage::new(JobId::new(), "mock-1");
    publish_raw(&env, &serde_json::to_vec(&unknown).unwrap()).await;
    env.wait_for(Duration::from_secs(10), || async {
        env.dead_letter_depth().await == Some(3)
    })
    .await;
    assert_eq!(env.queue_depth().await, Some(0));
    // Each dead letter says why.
    let mut reasons = dead_letter_reasons(&env).await;
    reasons.sort();
    assert_eq!(reasons.len(), 3);
    assert!(
        reasons[0].starts_with("malformed job message"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("no job resp_"), "{reasons:?}");
    assert_eq!(reasons[2], "unknown message version 99");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_at_shutdown_runs_once_on_the_next_worker() {
    let mut slow = ModelConfig::mock("slow");
    slow.mock_deltas = 40;
    slow.mock_delay_ms = 50;
    let mut config = common::isolated_config(vec![slow]);
    config.worker.shutdown_grace_seconds = 0;
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "slow", "take your time").await;
    // Wait until it is streaming, then stop the worker mid-job.
    env.wait_for(Duration::from_secs(10), || async {
        let (status, _, _, events) = job_state(&env, &id).await;
        status == "in_progress" && events > 0
    })
    .await;
    env.stop_worker().await;
    let (status, attempt, _, _) = job_state(&env, &id).await;
    assert_eq!((status.as_str(), attempt), ("queued", 1), "job handed back");
    assert_eq!(env.queue_depth().await, Some(1), "message handed back");

    env.start_worker();
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "completed");
    let expected: String = (0..40).map(tollgate::provider::mock_delta).collect();
    assert_eq!(
        done["output"][0]["content"][0]["text"], expected,
        "no output of attempt 1 mixed in"
    );
    let (_, attempt, cost, _) = job_state(&env, &id).await;
    assert_eq!(attempt, 2);
    let (_, _, in_flight, reserved, spent) = env.snapshot().await.counters[0];
    assert_eq!((in_flight, reserved, spent), (0, 0, cost.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_finished_jobs_and_keeps_the_rest() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(tollgate::store::keys::NewKey {
            name: "kept".into(),
            rpm_limit: Some(100),
            ..Default::default()
        })
        .await;
    let old = env.submit_ok(&key, "mock-1", "old").await;
    let recent = env.submit_ok(&key, "mock-1", "recent").await;
    env.poll_until_done(&key, &old).await;
    env.poll_until_done(&key, &recent).await;
    // Age one job, the outbox rows and the rate window past what is kept.
    sqlx::query("UPDATE tollgate.jobs SET finished_at = now() - interval '31 days' WHERE id = $1")
        .bind(JobId::parse_public(&old).unwrap())
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE tollgate.outbox SET sent_at = now() - interval '2 days'")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE tollgate.rate_windows SET window_start = window_start - interval '2 days'")
        .execute(&env.pool)
        .await
        .unwrap();

    let removed = tollgate::store::retention::purge(&env.pool, 30)
        .await
        .unwrap();
    assert_eq!(
        removed,
        vec![("jobs", 1), ("outbox", 1), ("rate_windows", 1)],
        "the old job's outbox row went with it"
    );
    let (status, _) = env.get(&key, &old).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    let (status, _) = env.get(&key, &recent).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let events: i64 = sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM tollgate.job_events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "only the kept job's events remain");
    assert!(tollgate::store::retention::purge(&env.pool, 30)
        .await
        .unwrap()
        .is_empty());
}

/// Numbers at the edges of f64 in a request (the largest, the smallest subnormal, long integers)
/// come back from the stored request as they went in: PostgreSQL writes them as long decimals,
/// which are read back exactly. (They once read back as out of range: the job could not be run,
/// nor read by the client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_the_edges_of_f64_round_trip_through_the_stored_request() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let parameters = serde_json::json!({
        "type": "object",
        "x-edges": [f64::MAX, -f64::MAX, f64::MIN_POSITIVE, 5e-324, 1.7976931348623155e308,
                    3.034363449700295e193, -7.59998499699e11, 123456789012345678901234567890.0,
                    18446744073709551615u64, -9223372036854775808i64],
    });
    let (status, body) = env
        .submit(
            &key,
            serde_json::json!({
                "model": "mock-1", "input": "hi", "background": true,
                "tools": [{"type": "function", "name": "f", "parameters": parameters}],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap();
    let done = env.poll_until_done(&key, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["tools"][0]["parameters"], parameters, "{done}");
}

/// A job row the worker cannot read (here a number no f64 holds, written by hand as a tool of
/// an older build or an operator might) fails with `server_error` and gives back what admission
/// took; its message goes to the dead-letter queue saying why, instead of coming back forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_row_cannot_be_read_fails_instead_of_coming_back() {
    let mut env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "unreadable").await;
    let uuid = JobId::parse_public(&id).unwrap().0;
    sqlx::query(
        "UPDATE tollgate.jobs SET request = jsonb_set(request, '{temperature}', '1e400'::jsonb)
          WHERE id = $1",
    )
    .bind(uuid)
    .execute(&env.pool)
    .await
    .unwrap();
    env.start_worker();
    env.wait_for(Duration::from_secs(20), || async {
        env.dead_letter_depth().await == Some(1)
    })
    .await;
    let (status, attempt, _, events) = job_state(&env, &id).await;
    assert_eq!(
        (status.as_str(), events),
        ("failed", 0),
        "attempt {attempt}"
    );
    let error: serde_json::Value =
        sqlx::query_scalar("SELECT error FROM tollgate.jobs WHERE id = $1")
            .bind(uuid)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(error["code"], "server_error", "{error}");
    let (in_flight, reserved, _) = env.counters_of(&key).await;
    assert_eq!(
        (in_flight, reserved),
        (0, 0),
        "the slot and reservation were given back"
    );
    let reasons = dead_letter_reasons(&env).await;
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].starts_with("the job's row cannot be read"),
        "{reasons:?}"
    );
    assert_eq!(env.queue_depth().await, Some(0));
}

/// Running jobs' output is written together: while the event table is locked, every job's next
/// batch waits in the worker's writer, and once it is free one statement writes the batches of
/// many jobs (their rows share the statement's transaction time). Every job still gets all its
/// output, numbered without a gap, and exactly what it gets when it runs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_jobs_output_is_written_many_jobs_per_statement() {
    let mut mock = ModelConfig::mock("mock-1");
    mock.mock_deltas = 120;
    mock.mock_delay_ms = 5;
    let mut config = common::isolated_config(vec![mock]);
    config.worker.concurrency = 32;
    config.worker.flush_max_deltas = 8;
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    let key = env.key().await;
    let alone = env.submit_ok(&key, "mock-1", "alone").await;
    let alone = env.poll_until_done(&key, &alone).await;
    assert_eq!(alone["status"], "completed", "{alone}");

    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(
            env.submit_ok(&key, "mock-1", &format!("together {i}"))
                .await,
        );
    }
    env.wait_until_streaming(24).await;
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tollgate.job_events IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    lock.commit().await.unwrap();

    for id in &ids {
        let done = env.poll_until_done(&key, id).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["output"].as_array().map(Vec::len), Some(1), "{done}");
        assert_eq!(done["output"][0]["content"], alone["output"][0]["content"]);
    }
    // Each job's event rows cover its pieces from 0 without a gap or an overlap.
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT seq_first, lag(seq_last) OVER (PARTITION BY job_id, attempt ORDER BY seq_first)
                        AS previous
               FROM tollgate.job_events) e
          WHERE seq_first <> coalesce(previous + 1, 0)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0);
    // The statement after the lock carried the waiting batches of many jobs.
    let most: i64 = sqlx::query_scalar(
        "SELECT max(jobs) FROM (SELECT count(DISTINCT job_id) AS jobs
                                  FROM tollgate.job_events GROUP BY created_at) s",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(most >= 8, "at most {most} jobs' batches in one statement");
}
