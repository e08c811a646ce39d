//! Faults injected into real PostgreSQL, RabbitMQ, upstreams and worker processes: a committed
//! job always reaches one terminal state, is written once and counted once.

mod common;

use std::{process::Stdio, time::Duration};

use sqlx::Connection as _;

use common::{
    fault_config,
    process::WorkerProcess,
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use reqwest::StatusCode;
use tollgate::{
    config::{ModelConfig, ProviderKind},
    queue::{outbox, PublishError, Publisher},
};

fn openai(name: &str, upstream: &FakeUpstream) -> ModelConfig {
    ModelConfig {
        provider: ProviderKind::Openai,
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock(name)
    }
}

/// A job's state: (status, attempt, output_text, cost, charged).
type JobState = (String, i32, String, Option<i64>, Option<i64>);

async fn jobs(env: &TestEnv) -> Vec<JobState> {
    sqlx::query_as(
        "SELECT status::text, attempt, output_text, cost_micro_usd, charged_micro_usd
           FROM tollgate.jobs ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// Counters summed over all keys: (in_flight, reserved, spent).
async fn totals(env: &TestEnv) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT sum(in_flight)::bigint, sum(reserved_micro_usd)::bigint, sum(spent_micro_usd)::bigint
           FROM tollgate.key_counters",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Asserts every job completed with the full expected text, and each was charged exactly once.
async fn assert_all_completed_once(env: &TestEnv, expected_text: &str, expected_jobs: usize) {
    let rows = jobs(env).await;
    assert_eq!(rows.len(), expected_jobs);
    let mut charged_total = 0;
    for (status, attempt, text, cost, charged) in &rows {
        assert_eq!(status, "completed", "attempt {attempt}");
        assert_eq!(
            text, expected_text,
            "one complete output, nothing of another attempt"
        );
        assert_eq!(cost, charged, "mock jobs cost less than their reservation");
        charged_total += charged.unwrap();
    }
    assert_eq!(
        totals(env).await,
        (0, 0, charged_total),
        "slots, reservations, spend: once each"
    );
}

fn attempts_histogram(rows: &[JobState]) -> Vec<(i32, usize)> {
    let mut h = std::collections::BTreeMap::new();
    for (_, attempt, ..) in rows {
        *h.entry(*attempt).or_insert(0) += 1;
    }
    h.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_twice_then_answering_completes_on_attempt_3() {
    let upstream = FakeUpstream::start(Script::Sequence(vec![
        Script::Status(500),
        Script::Status(503),
        Script::Stream {
            deltas: vec!["fine".into()],
            prompt_tokens: 3,
            completion_tokens: 1,
        },
    ]))
    .await;
    let mut env = TestEnv::front_with(fault_config(vec![openai("flaky", &upstream)])).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "flaky", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"][0]["content"][0]["text"], "fine");
    assert_eq!(upstream.calls(), 3);
    let rows = jobs(&env).await;
    assert_eq!(rows[0].1, 3, "completed on attempt 3");
    assert_eq!(totals(&env).await, (0, 0, rows[0].4.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_max_attempts_with_the_last_error_stored() {
    let upstream = FakeUpstream::start(Script::Status(502)).await;
    let mut config = fault_config(vec![openai("down", &upstream)]);
    config.worker.max_attempts = 3;
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "down", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "upstream_http_error");
    assert!(done["error"]["message"].as_str().unwrap().contains("502"));
    assert_eq!(upstream.calls(), 3);
    assert_eq!(totals(&env).await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_client_error_fails_at_once() {
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let mut env = TestEnv::front_with(fault_config(vec![openai("strict", &upstream)])).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "strict", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(upstream.calls(), 1, "no retry of a 4xx");
    assert_eq!(jobs(&env).await[0].1, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_stopped_within_a_second_of_its_cancel() {
    let upstream = FakeUpstream::start(Script::Slow {
        deltas: 500,
        delay_ms: 20,
    })
    .await;
    let mut env = TestEnv::front_with(fault_config(vec![openai("slow", &upstream)])).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "slow", "go on").await;
    env.wait_for(Duration::from_secs(10), || async {
        let body = env.get(&key, &id).await.1;
        let text = body["output"][0]["content"][0]["text"].as_str();
        body["status"] == "in_progress" && text.is_some_and(|t| !t.is_empty())
    })
    .await;
    let cancelled_at = std::time::Instant::now();
    let (status, body) = env
        .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    env.wait_for(Duration::from_secs(5), || async {
        !upstream.hangups().is_empty()
    })
    .await;
    let stopped_after = upstream.hangups()[0] - cancelled_at;
    eprintln!("upstream stream dropped {stopped_after:?} after the cancel");
    assert!(stopped_after < Duration::from_secs(1), "{stopped_after:?}");
    // The partial output is kept, and the slot came back once.
    let after = env.get(&key, &id).await.1;
    assert_eq!(after["status"], "cancelled");
    let kept = after["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(kept.starts_with("w0 "), "{after}");
    // The slot and reservation came back; what was streamed was charged.
    let (in_flight, reserved, spent) = totals(&env).await;
    assert_eq!((in_flight, reserved), (0, 0));
    assert!(spent > 0, "the streamed output was not charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_sigkill_of_their_worker_process() {
    let mut slow = ModelConfig::mock("slow");
    slow.mock_deltas = 20;
    slow.mock_delay_ms = 100;
    let config = fault_config(vec![slow]);
    let mut env = TestEnv::front_with(config.clone()).await;
    let key = env.key().await;

    // The worker as a real child process, with the test's configuration.
    let mut child = WorkerProcess::start(&config);

    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(env.submit_ok(&key, "slow", &format!("job {i}")).await);
    }
    // Kill it while jobs are streaming.
    env.wait_until_streaming(10).await;
    child.process.kill().await.unwrap(); // SIGKILL
    let killed_mid_stream: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tollgate.jobs WHERE status = 'in_progress'")
            .fetch_one(&env.pool)
            .await
            .unwrap();

    env.start_worker();
    for id in &ids {
        env.poll_until_done(&key, id).await;
    }
    let expected: String = (0..20).map(tollgate::provider::mock_delta).collect();
    assert_all_completed_once(&env, &expected, 20).await;
    let rows = jobs(&env).await;
    eprintln!(
        "SIGKILL with {killed_mid_stream} jobs in progress: 20 admitted, 20 completed, attempts {:?}",
        attempts_histogram(&rows)
    );
    assert!(rows.iter().any(|r| r.1 >= 2), "some job was taken over");
    // The output the killed worker had streamed was paid upstream: the next claim charged it.
    let model = config.model("slow").unwrap();
    let costs: Vec<(i32, i32, i32, i64)> = sqlx::query_as(
        "SELECT attempt, input_tokens, output_tokens, cost_micro_usd FROM tollgate.jobs",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut with_abandoned = 0;
    for (attempt, input, output, cost) in costs {
        let last = model.cost(input as u64, output as u64).0;
        assert!(cost >= last);
        if cost > last {
            assert!(
                attempt >= 2,
                "only a taken-over job pays for an earlier attempt"
            );
            with_abandoned += 1;
        }
    }
    eprintln!("{with_abandoned} jobs paid for the output of their killed attempt");
    assert!(with_abandoned >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_finish_when_the_workers_postgres_connections_are_terminated() {
    let mut slow = ModelConfig::mock("slow");
    slow.mock_deltas = 30;
    slow.mock_delay_ms = 50;
    let mut env = TestEnv::front_with(fault_config(vec![slow])).await;
    env.start_worker();
    let key = env.key().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(env.submit_ok(&key, "slow", &format!("job {i}")).await);
    }
    env.wait_until_streaming(5).await;
    let db = env
        .config
        .database
        .url
        .rsplit_once('/')
        .unwrap()
        .1
        .to_string();
    let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(&db)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    eprintln!(
        "terminated {} PostgreSQL connections mid-stream",
        terminated.len()
    );
    assert!(!terminated.is_empty());
    for id in &ids {
        env.poll_until_done(&key, id).await;
    }
    let expected: String = (0..30).map(tollgate::provider::mock_delta).collect();
    assert_all_completed_once(&env, &expected, 10).await;
    eprintln!("attempts {:?}", attempts_histogram(&jobs(&env).await));
}

/// Closes this test's RabbitMQ connections (found by their connection name), as a broker
/// restart would.
fn close_rabbitmq_connections(tag: &str) -> usize {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&listing.stdout);
    if !listing.status.success() {
        eprintln!("rabbitmqctl: {}", String::from_utf8_lossy(&listing.stderr));
    }
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(tag)) {
        let pid = line.split('\t').next().unwrap();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "fault test"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            closed += 1;
        } else {
            eprintln!("could not close {pid}");
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_jobs_complete_when_rabbitmq_drops_every_connection_mid_burst() {
    let mut fast = ModelConfig::mock("fast");
    fast.mock_deltas = 5;
    let config = fault_config(vec![fast]);
    let tag = config.amqp.connection_name.clone();
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    let env = std::sync::Arc::new(env);
    let key = env.key().await;
    let submissions = {
        let env = env.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..200 {
                let (status, body) = env
                    .submit(&key, serde_json::json!({"model": "fast", "input": format!("job {i}"), "background": true}))
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                ids.push(body["id"].as_str().unwrap().to_string());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    // Let some go through, then drop every connection of this tollgate (front and worker), twice.
    env.wait_for(Duration::from_secs(20), || async {
        env.snapshot().await.jobs >= 50
    })
    .await;
    let first = tokio::task::spawn_blocking({
        let tag = tag.clone();
        move || close_rabbitmq_connections(&tag)
    })
    .await
    .unwrap();
    env.wait_for(Duration::from_secs(20), || async {
        env.snapshot().await.jobs >= 120
    })
    .await;
    let second = tokio::task::spawn_blocking(move || close_rabbitmq_connections(&tag))
        .await
        .unwrap();
    let ids = submissions.await.unwrap();
    eprintln!("closed {first} then {second} RabbitMQ connections during 200 submissions");
    assert!(first + second >= 1);

    for id in &ids {
        env.poll_until_done(&key, id).await;
    }
    let expected: String = (0..5).map(tollgate::provider::mock_delta).collect();
    assert_all_completed_once(&env, &expected, 200).await;
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tollgate.outbox WHERE sent_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(unsent, 0);
    let rows = jobs(&env).await;
    eprintln!(
        "200 admitted, 200 completed, attempts {:?}",
        attempts_histogram(&rows)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_rabbitmq_is_unreachable_the_front_admits_and_the_relay_publishes_later() {
    let mut config = fault_config(vec![ModelConfig::mock("mock-1")]);
    let reachable = config.amqp.url.clone();
    config.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into(); // nothing listens there
    let env = TestEnv::front_with(config.clone()).await;
    let key = env.key().await;
    for i in 0..5 {
        env.submit_ok(&key, "mock-1", &format!("job {i}")).await;
    }
    let unsent = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tollgate.outbox WHERE sent_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    assert_eq!(unsent().await, 5, "committed, not yet published");

    // RabbitMQ is back: a relay (as in any front) publishes them.
    config.amqp.url = reachable;
    // Readiness says so meanwhile, and stays 200: this front still admits.
    let ready = env.http.get(env.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        (body["postgres"].as_bool(), body["rabbitmq"].as_bool()),
        (Some(true), Some(false))
    );

    let publisher = Publisher::new(std::sync::Arc::new(config));
    // Rows the front handed back (its publish failed) go at once; the others wait out the
    // grace period, which leaves fresh rows to the front's own publish.
    let waiting: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM tollgate.outbox WHERE sent_at IS NULL ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let hour = Duration::from_secs(3600);
    let published = outbox::relay_once(&env.pool, &publisher, hour, &waiting[..2])
        .await
        .unwrap();
    assert_eq!(published, 2);
    assert_eq!(unsent().await, 3);
    let published = outbox::relay_once(&env.pool, &publisher, hour, &[])
        .await
        .unwrap();
    assert_eq!(published, 0, "younger than the grace period");
    let published = outbox::relay_once(&env.pool, &publisher, Duration::ZERO, &[])
        .await
        .unwrap();
    assert_eq!(published, 3);
    assert_eq!(unsent().await, 0);
    assert_eq!(env.queue_depth().await, Some(5));
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_a_failed_publish() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let publisher = Publisher::new(env.config.clone());
    let channel = publisher.channel().await.unwrap().current();
    channel
        .queue_unbind(
            env.config.amqp.queue.as_str().into(),
            env.config.amqp.exchange.as_str().into(),
            tollgate::queue::ROUTING_KEY.into(),
            Default::default(),
        )
        .await
        .unwrap();
    let message = tollgate::queue::JobMessage::new(tollgate::ids::JobId::new(), "mock-1");
    let result = publisher.publish(&message).await;
    assert!(
        matches!(result, Err(PublishError::Unroutable(_))),
        "{result:?}"
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_total_timeout_fails_keeping_its_output() {
    let upstream = FakeUpstream::start(Script::Slow {
        deltas: 100,
        delay_ms: 50,
    })
    .await;
    let mut model = openai("slow", &upstream);
    model.timeout_seconds = 1;
    let mut env = TestEnv::front_with(fault_config(vec![model])).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "slow", "take long").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "job_timeout");
    let kept = done["output"][0]["content"][0]["text"].as_str().unwrap();
    assert!(kept.starts_with("w0 w1 "), "{kept}");
    assert_eq!(upstream.calls(), 1, "the total timeout is not retried");
    let (in_flight, reserved, spent) = totals(&env).await;
    assert_eq!((in_flight, reserved), (0, 0));
    assert!(spent > 0, "the streamed output was not charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_jobs_finish_and_takes_no_new_ones() {
    let mut slow = ModelConfig::mock("slow");
    slow.mock_deltas = 20;
    slow.mock_delay_ms = 100;
    let mut config = fault_config(vec![slow]);
    config.worker.concurrency = 2;
    let env = TestEnv::front_with(config.clone()).await;
    let key = env.key().await;
    let mut child = WorkerProcess::start(&config);
    let first = env.submit_ok(&key, "slow", "one").await;
    let second = env.submit_ok(&key, "slow", "two").await;
    env.wait_for(Duration::from_secs(10), || async {
        env.get(&key, &first).await.1["status"] == "in_progress"
            && env.get(&key, &second).await.1["status"] == "in_progress"
    })
    .await;
    let pid = child.process.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    // Submitted after SIGTERM: must not be taken by the stopping worker.
    let third = env.submit_ok(&key, "slow", "three").await;
    let exit = tokio::time::timeout(Duration::from_secs(20), child.process.wait())
        .await
        .expect("the worker exits within its grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    for id in [&first, &second] {
        let job = env.get(&key, id).await.1;
        assert_eq!(
            job["status"], "completed",
            "a running job finished before exit: {job}"
        );
    }
    assert_eq!(env.get(&key, &third).await.1["status"], "queued");
    assert_eq!(env.queue_depth().await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_message_for_a_running_job_is_dropped_at_once() {
    let upstream = FakeUpstream::start(Script::Slow {
        deltas: 100,
        delay_ms: 50,
    })
    .await;
    let mut config = fault_config(vec![openai("slow", &upstream), ModelConfig::mock("mock-1")]);
    // Two slots: the running job holds one; a duplicate that waited would hold the other.
    config.worker.concurrency = 2;
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    let key = env.key().await;
    let id = env.submit_ok(&key, "slow", "once").await;
    env.wait_until_streaming(1).await;
    // A second copy of its message arrives while it runs (lease live).
    let publisher = Publisher::new(env.config.clone());
    let message =
        tollgate::queue::JobMessage::new(tollgate::ids::JobId::parse_public(&id).unwrap(), "slow");
    publisher.publish(&message).await.unwrap();
    publisher.close().await;
    // The duplicate was acked and dropped: the second slot is free for another job, which
    // completes while the first still runs.
    let other = env.submit_ok(&key, "mock-1", "meanwhile").await;
    assert_eq!(
        env.poll_until_done(&key, &other).await["status"],
        "completed"
    );
    assert_eq!(
        env.get(&key, &id).await.1["status"],
        "in_progress",
        "the other job did not wait for the first"
    );
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "completed");
    env.stop_worker().await;
    assert_eq!(
        env.queue_depth().await,
        Some(0),
        "the duplicate was settled"
    );
    assert_eq!(upstream.calls(), 1, "the upstream was called once");
    let rows = jobs(&env).await;
    assert!(
        rows.iter().all(|r| r.0 == "completed" && r.1 == 1),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_hand_back_does_not_use_up_an_attempt() {
    // One attempt allowed, and no grace at shutdown: every stop hands the running job back.
    let mut slow = ModelConfig::mock("slow");
    slow.mock_deltas = 40;
    slow.mock_delay_ms = 50;
    let mut config = fault_config(vec![slow]);
    config.worker.max_attempts = 1;
    config.worker.shutdown_grace_seconds = 0;
    let mut env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "slow", "long job").await;
    // Three rolling deploys while it streams.
    for _ in 0..3 {
        env.start_worker();
        env.wait_until_streaming(1).await;
        env.stop_worker().await;
        let (status, _) = env.get(&key, &id).await;
        assert_eq!(status, StatusCode::OK);
        let state: String = sqlx::query_scalar("SELECT status::text FROM tollgate.jobs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(state, "queued", "handed back, not failed");
    }
    env.start_worker();
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (attempt, handbacks): (i32, i32) =
        sqlx::query_as("SELECT attempt, handbacks FROM tollgate.jobs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((attempt, handbacks), (4, 3));
}
