//! `/metrics` after a small load of every kind (admitted and rejected requests, jobs that
//! complete, one that fails upstream, one followed over SSE, a malformed message dead-lettered, a
//! job rescued from a worker that died): each series the operations guide names is exported,
//! with a value that follows from the load. And every metric the Grafana dashboard and the
//! Prometheus alerts use is one tollgate exports.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{
    fault_config,
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use lapin::{options::BasicPublishOptions, BasicProperties};
use reqwest::StatusCode;
use serde_json::json;
use tollgate::config::{ModelConfig, ProviderKind};

use common::metric_value as value;

fn at_least(text: &str, name: &str, labels: &[(&str, &str)], min: f64) {
    let found = value(text, name, labels);
    assert!(
        found.is_some_and(|v| v >= min),
        "{name}{labels:?}: {found:?}, expected at least {min}\n{text}"
    );
}

/// The metric names a file uses (`tollgate_…` and `process_…`), histogram suffixes removed.
fn names_used(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let pattern = regex::Regex::new(r"\b(tollgate|process)_[a-z_]+").unwrap();
    pattern
        .find_iter(&text)
        .map(|m| {
            let name = m.as_str();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

async fn scrape(env: &TestEnv) -> String {
    env.scrape().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_series_is_exported_after_a_small_load() {
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let broken = ModelConfig {
        provider: ProviderKind::Openai,
        upstream_model: Some("gpt-4o-mini".into()),
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock("broken")
    };
    let slow = ModelConfig {
        mock_delay_ms: 150,
        ..ModelConfig::mock("slow")
    };
    let config = fault_config(vec![ModelConfig::mock("mock-1"), slow, broken]);
    let mut env = TestEnv::front_with(config).await;
    let key = env.key().await;

    // A job whose worker "died" right after claiming it: the row as a claim leaves it, with a
    // lease already lapsed. The sweeper (or the worker, taking it over) rescues it.
    let orphan = env.submit_ok(&key, "mock-1", "orphan").await;
    sqlx::query(
        "UPDATE tollgate.jobs SET status = 'in_progress', attempt = 1, started_at = now(),
                lease_until = now() - interval '1 minute'
          WHERE id = $1",
    )
    .bind(uuid::Uuid::parse_str(orphan.trim_start_matches("resp_")).unwrap())
    .execute(&env.pool)
    .await
    .unwrap();
    env.start_worker();

    let mut ids = vec![orphan];
    for i in 0..5 {
        ids.push(env.submit_ok(&key, "mock-1", &format!("job {i}")).await);
    }
    ids.push(env.submit_ok(&key, "broken", "fails upstream").await);
    let followed = env.submit_ok(&key, "slow", "followed").await;
    ids.push(followed.clone());
    // Rejections: a wrong key, and an unknown model.
    let (status, _) = env
        .submit(
            "sk-tg-wrong",
            json!({"model": "mock-1", "input": "x", "background": true}),
        )
        .await;
    assert_eq!(status.as_u16(), 401);
    let (status, _) = env
        .submit(
            &key,
            json!({"model": "nope", "input": "x", "background": true}),
        )
        .await;
    assert_eq!(status.as_u16(), 404);
    // A message no worker can read: dead-lettered.
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_publish(
            env.config.amqp.exchange.as_str().into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"not a job message",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    // Follow the slow job; scrape while the stream is open.
    let stream = env
        .http
        .get(env.url(&format!("/v1/responses/{followed}?stream=true")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let during = scrape(&env).await;
    at_least(&during, "tollgate_sse_followers", &[], 1.0);
    drop(stream);

    for id in &ids {
        env.poll_until_done(&key, id).await;
    }
    // Give the dead-lettering and the event relay a moment, then scrape.
    env.wait_for(Duration::from_secs(10), || async {
        let text = scrape(&env).await;
        value(&text, "tollgate_dead_lettered_total", &[]).is_some()
            && value(
                &text,
                "tollgate_events_published_total",
                &[("type", "job.completed")],
            )
            .is_some_and(|n| n >= 7.0)
    })
    .await;
    let text = scrape(&env).await;

    // Admission.
    at_least(
        &text,
        "tollgate_admitted_total",
        &[("model", "mock-1")],
        6.0,
    );
    at_least(
        &text,
        "tollgate_rejected_total",
        &[("reason", "invalid_key")],
        1.0,
    );
    at_least(
        &text,
        "tollgate_rejected_total",
        &[("reason", "unknown_model")],
        1.0,
    );
    at_least(
        &text,
        "tollgate_admission_duration_seconds_count",
        &[("outcome", "admitted")],
        8.0,
    );
    at_least(
        &text,
        "tollgate_admission_duration_seconds_count",
        &[("outcome", "rejected")],
        2.0,
    );
    at_least(
        &text,
        "tollgate_admission_duration_seconds_bucket",
        &[("outcome", "admitted"), ("le", "+Inf")],
        8.0,
    );
    // Publishing and the backlogs (all published by now).
    at_least(&text, "tollgate_publish_confirm_seconds_count", &[], 8.0);
    assert_eq!(
        value(&text, "tollgate_outbox_backlog", &[]),
        Some(0.0),
        "{text}"
    );
    assert!(
        value(&text, "tollgate_event_backlog", &[]).is_some(),
        "{text}"
    );
    assert_eq!(
        value(&text, "tollgate_jobs", &[("status", "queued")]),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "tollgate_jobs", &[("status", "in_progress")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "tollgate_queue_messages",
            &[("queue", &env.config.amqp.queue)]
        ),
        Some(0.0),
        "{text}"
    );
    at_least(
        &text,
        "tollgate_queue_messages",
        &[("queue", &env.config.amqp.dead_letter_queue)],
        1.0,
    );
    // The worker: per model.
    for (model, jobs) in [("mock-1", 6.0), ("slow", 1.0)] {
        let labels = [("model", model)];
        // The orphan's wait was its first attempt's, which never reported.
        let first_attempts = if model == "mock-1" { jobs - 1.0 } else { jobs };
        at_least(
            &text,
            "tollgate_queue_wait_seconds_count",
            &labels,
            first_attempts,
        );
        at_least(
            &text,
            "tollgate_time_to_first_token_seconds_count",
            &labels,
            jobs,
        );
        at_least(&text, "tollgate_job_run_seconds_count", &labels, jobs);
        // The mock streams 20 deltas a job.
        at_least(&text, "tollgate_deltas_written_total", &labels, 20.0 * jobs);
        at_least(
            &text,
            "tollgate_tokens_total",
            &[("model", model), ("kind", "output")],
            jobs,
        );
        at_least(
            &text,
            "tollgate_tokens_total",
            &[("model", model), ("kind", "input")],
            jobs,
        );
    }
    at_least(
        &text,
        "tollgate_jobs_finished_total",
        &[("status", "completed")],
        7.0,
    );
    at_least(
        &text,
        "tollgate_jobs_finished_total",
        &[("status", "failed")],
        1.0,
    );
    at_least(
        &text,
        "tollgate_upstream_errors_total",
        &[("provider", "openai"), ("status_class", "4xx")],
        1.0,
    );
    at_least(&text, "tollgate_lease_rescues_total", &[], 1.0);
    at_least(
        &text,
        "tollgate_dead_lettered_total",
        &[("reason", "malformed")],
        1.0,
    );
    assert_eq!(
        value(&text, "tollgate_worker_in_flight", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "tollgate_sse_followers", &[]),
        Some(0.0),
        "{text}"
    );
    at_least(
        &text,
        "tollgate_events_published_total",
        &[("type", "job.completed")],
        7.0,
    );
    // The pool and the process.
    assert!(value(
        &text,
        "tollgate_db_pool_connections",
        &[("state", "in_use")]
    )
    .is_some());
    assert!(value(&text, "tollgate_db_pool_connections", &[("state", "idle")]).is_some());
    assert_eq!(
        value(&text, "tollgate_db_pool_max_connections", &[]),
        Some(f64::from(env.config.database.max_connections))
    );
    at_least(&text, "process_resident_memory_bytes", &[], 1.0);
    at_least(&text, "process_cpu_seconds_total", &[], 0.0);
    at_least(&text, "process_open_fds", &[], 1.0);
    at_least(&text, "process_start_time_seconds", &[], 1.0);
    // Conventions: histograms in seconds, counters end in _total, every metric described.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        match kind {
            "counter" => assert!(name.ends_with("_total"), "{line}"),
            "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
            _ => {}
        }
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }

    // Every metric the dashboard and the alerts use is exported.
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/grafana/tollgate-dashboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = names_used(&format!("{root}/{file}"));
        assert!(used.len() > 10, "{file} names only {used:?}");
        let missing: Vec<&String> = used
            .iter()
            .filter(|n| !exported.contains(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics tollgate does not export: {missing:?}"
        );
    }
}

/// A front is ready while PostgreSQL answers (it admits with RabbitMQ away); a worker needs both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_of_a_worker_needs_rabbitmq_and_of_a_front_does_not() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let mut config = (*env.config).clone();
    config.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let config = std::sync::Arc::new(config);
    for (needs_rabbitmq, expected) in [(true, 503), (false, 200)] {
        let probes = tollgate::api::Probes {
            pool: env.pool.clone(),
            publisher: std::sync::Arc::new(tollgate::queue::Publisher::new(config.clone())),
            config: config.clone(),
            needs_rabbitmq,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(tollgate::api::serve_probes(listener, probes, stop.clone()));
        let ready = env
            .http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            ready.status().as_u16(),
            expected,
            "needs_rabbitmq {needs_rabbitmq}"
        );
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(body, json!({"postgres": true, "rabbitmq": false}));
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
