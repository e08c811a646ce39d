//! Long outages and operator changes: PostgreSQL unreachable from the worker for longer than the
//! delivery limit lasts, a lost message, settings that map to queue arguments changed between
//! restarts, the worker's own delivery limit, and expiry racing cancels and deletes. Nothing is
//! stranded, nothing is counted twice, every process starts.
//!
//! The outage is a TCP proxy the test controls, between the worker and the shared PostgreSQL
//! (which is never stopped). `OUTAGE_SECONDS` sets the outage's length (default 12).

mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    fault_config,
    proxy::Proxy,
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use lapin::{
    options::{QueueDeclareOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties,
};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;
use tollgate::{
    config::{Config, ModelConfig, ProviderKind},
    queue::Publisher,
    run, store,
};

/// A worker of its own (not the env's), with its own configuration and database pool.
struct OwnWorker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl OwnWorker {
    async fn start(config: Config) -> Self {
        let pool = store::connect(&config.database).await.unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run::work(Arc::new(config), pool, stop.clone()));
        Self { stop, handle }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap();
    }
}

/// A delivery limit that a retry loop of a second per delivery would use up within seconds.
fn outage_config(models: Vec<ModelConfig>) -> Config {
    let mut config = fault_config(models);
    config.amqp.delivery_limit = 3;
    config
}

fn slow_mock(name: &str, deltas: u32) -> ModelConfig {
    let mut model = ModelConfig::mock(name);
    model.mock_deltas = deltas;
    model.mock_delay_ms = 50;
    model
}

async fn statuses(env: &TestEnv) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT status::text, attempt FROM tollgate.jobs ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

/// Counters summed over all keys: (in_flight, reserved).
async fn held(env: &TestEnv) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(in_flight), 0)::bigint, coalesce(sum(reserved_micro_usd), 0)::bigint
           FROM tollgate.key_counters",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn amqp() -> Connection {
    Connection::connect(&common::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queued_job_completes_after_a_postgres_outage_longer_than_the_delivery_limit() {
    let outage = Duration::from_secs(
        std::env::var("OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    );
    let config = outage_config(vec![slow_mock("slow", 60), ModelConfig::mock("mock-1")]);
    let env = TestEnv::front_with(config.clone()).await;
    let key = env.key().await;

    // The worker reaches PostgreSQL only through the proxy; the front directly.
    let pg: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(pg).await;
    let mut worker_config = config.clone();
    let (_, database) = config.database.url.rsplit_once('/').unwrap();
    worker_config.database.url = format!("postgres://postgres@{}/{database}", proxy.addr);
    let worker = OwnWorker::start(worker_config).await;

    let first = env.submit_ok(&key, "mock-1", "before").await;
    assert_eq!(
        env.poll_until_done(&key, &first).await["status"],
        "completed"
    );

    // A job is streaming when PostgreSQL goes away; ten more are admitted during the outage.
    let running = env.submit_ok(&key, "slow", "cut short").await;
    env.wait_until_streaming(1).await;
    proxy.cut();
    let cut_at = Instant::now();
    let mut during = Vec::new();
    for i in 0..10 {
        during.push(env.submit_ok(&key, "mock-1", &format!("during {i}")).await);
    }
    tokio::time::sleep(outage.saturating_sub(cut_at.elapsed())).await;
    assert!(
        statuses(&env)
            .await
            .iter()
            .filter(|(s, _)| s == "queued")
            .count()
            >= 10,
        "the jobs admitted during the outage wait"
    );
    assert_eq!(env.dead_letter_depth().await, Some(0), "nothing given up");

    proxy.restore();
    let restored_at = Instant::now();
    for id in during.iter().chain([&running]) {
        let done = env.poll_until_done(&key, id).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    let waited = restored_at.elapsed();
    eprintln!(
        "outage {:?}: every queued job completed {:.1} s after PostgreSQL was back",
        outage,
        waited.as_secs_f64()
    );
    let rows = statuses(&env).await;
    assert!(rows.iter().all(|(s, _)| s == "completed"), "{rows:?}");
    assert_eq!(
        env.dead_letter_depth().await,
        Some(0),
        "nothing dead-lettered"
    );
    assert_eq!(
        held(&env).await,
        (0, 0),
        "every slot and reservation given back"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_message_was_lost_is_republished_by_the_sweeper() {
    let mut config = outage_config(vec![ModelConfig::mock("mock-1")]);
    config.server.requeue_overdue_seconds = 2;
    let mut env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let lost = env.submit_ok(&key, "mock-1", "lost").await;
    env.wait_for(Duration::from_secs(10), || async {
        env.queue_depth().await == Some(1)
    })
    .await;
    // The message is gone (purged; a dead-lettered one is the same to the job).
    let conn = amqp().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_purge(
            env.config.amqp.queue.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();
    let purged_at = Instant::now();
    env.start_worker();
    let done = env.poll_until_done(&key, &lost).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(
        purged_at.elapsed() >= Duration::from_millis(1500),
        "republished only once overdue"
    );
    let (attempt,): (i32,) = sqlx::query_as("SELECT attempt FROM tollgate.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(attempt, 1);
    env.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_not_republished() {
    let mut config = outage_config(vec![ModelConfig::mock("mock-1")]);
    config.server.requeue_overdue_seconds = 2;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    for i in 0..3 {
        env.submit_ok(&key, "mock-1", &format!("waiting {i}")).await;
    }
    // No worker: the three wait in the queue, overdue, for several sweeps.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM tollgate.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 3, "no job got a second message");
    assert_eq!(env.queue_depth().await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_at_the_delivery_limit_is_dead_lettered_and_its_job_fails() {
    // Every stop hands the running job back (nack + requeue): one delivery each.
    let mut config = outage_config(vec![slow_mock("slow", 200)]);
    config.amqp.delivery_limit = 2;
    config.worker.shutdown_grace_seconds = 0;
    let mut env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "slow", "handed back").await;
    for _ in 0..2 {
        env.start_worker();
        env.wait_until_streaming(1).await;
        env.stop_worker().await;
    }
    env.start_worker();
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "delivery_limit", "{done}");
    env.wait_for(Duration::from_secs(10), || async {
        env.dead_letter_depth().await == Some(1)
    })
    .await;
    assert_eq!(held(&env).await.0, 0, "its slot given back");
}

fn flaky(upstream: &FakeUpstream) -> ModelConfig {
    ModelConfig {
        provider: ProviderKind::Openai,
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock("flaky")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_every_setting_behind_a_queue_argument_and_restarting_works() {
    let upstream = FakeUpstream::start(Script::Sequence(vec![
        Script::Status(503),
        Script::Stream {
            deltas: vec!["fine".into()],
            prompt_tokens: 3,
            completion_tokens: 1,
        },
    ]))
    .await;
    let before = outage_config(vec![flaky(&upstream), ModelConfig::mock("mock-1")]);
    // The jobs queue as an earlier version declared it (another x-delivery-limit).
    let conn = amqp().await;
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(before.amqp.dead_letter_exchange.as_str().into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
    channel
        .queue_declare(
            before.amqp.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();

    let env = TestEnv::front_with(before.clone()).await;
    let key = env.key().await;
    let worker = OwnWorker::start(before.clone()).await;
    let id = env.submit_ok(&key, "mock-1", "before").await;
    assert_eq!(env.poll_until_done(&key, &id).await["status"], "completed");
    worker.stop().await;

    // Every setting that once was a queue argument, changed; the processes restart.
    let mut after = before.clone();
    after.amqp.delivery_limit = 7;
    after.worker.retry_base_ms = 1500;
    after.worker.retry_max_ms = 4000;
    after.worker.max_attempts = 6;
    after.worker.db_retry_max_ms = 3000;
    let publisher = Publisher::new(Arc::new(after.clone()));
    publisher
        .channel()
        .await
        .expect("a front with the new settings connects");
    publisher.close().await;
    let worker = OwnWorker::start(after.clone()).await;

    // The new backoff applies: the retry waits 1.5 s less at most 20% jitter.
    let id = env.submit_ok(&key, "flaky", "after").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let calls = upstream.requests();
    assert_eq!(calls.len(), 2);
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_millis(1200),
        "the retry waited {waited:?}, not the new backoff"
    );
    worker.stop().await;

    // And back: fewer attempts (fewer delay queues) works too.
    let mut fewer = before.clone();
    fewer.worker.max_attempts = 2;
    let worker = OwnWorker::start(fewer).await;
    let id = env.submit_ok(&key, "mock-1", "fewer").await;
    assert_eq!(env.poll_until_done(&key, &id).await["status"], "completed");
    worker.stop().await;
    // The delay queues of the larger setting are cleaned up with the env's.
    let conn = amqp().await;
    let channel = conn.create_channel().await.unwrap();
    for name in after.amqp.delay_queues(after.worker.max_attempts) {
        let _ = channel
            .queue_delete(name.as_str().into(), Default::default())
            .await;
    }
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_racing_cancels_and_deletes_of_one_key_never_deadlocks() {
    let config = outage_config(vec![ModelConfig::mock("mock-1")]);
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    for round in 0..3 {
        let mut ids = Vec::new();
        for i in 0..40 {
            ids.push(
                env.submit_ok(&key, "mock-1", &format!("r{round} j{i}"))
                    .await,
            );
        }
        let expire = {
            let pool = env.pool.clone();
            tokio::spawn(async move {
                let mut expired = 0;
                for _ in 0..5 {
                    expired += store::jobs::expire_queued(&pool, 0).await.unwrap();
                }
                expired
            })
        };
        // Cancels and deletes from the newest, while expiry walks from wherever it likes.
        let mut answers = Vec::new();
        let stops = ids.iter().rev().enumerate().map(|(i, id)| {
            let (env, key) = (&env, &key);
            async move {
                if i % 2 == 0 {
                    env.post_empty(key, &format!("/v1/responses/{id}/cancel"))
                        .await
                        .0
                } else {
                    env.delete(key, id).await.0
                }
            }
        });
        answers.extend(futures::future::join_all(stops).await);
        let expired = expire.await.unwrap();
        // 200 (cancelled, deleted), 400 (cancel of an expired job), 404 (gone): never a 500.
        for status in &answers {
            assert!(
                [
                    StatusCode::OK,
                    StatusCode::BAD_REQUEST,
                    StatusCode::NOT_FOUND
                ]
                .contains(status),
                "round {round}: {status} (expired {expired})"
            );
        }
        assert_eq!(held(&env).await, (0, 0), "round {round}");
    }
}
