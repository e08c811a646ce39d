//! Admission throughput on the local PostgreSQL: one hot key against many keys.
//!
//! `cargo bench --bench admission` (env `BENCH_ADMISSIONS`, default 4000; `BENCH_CONCURRENCY`,
//! default 32). Each run creates its own database and drops it afterwards. Measures the admission
//! transaction alone (authenticate, lock, window, insert job + outbox, commit), not the publish.

use std::{sync::Arc, time::Instant};

use futures::{stream, StreamExt};
use sqlx::{Connection, PgConnection};
use tollgate::{
    admission::{Admission, Admitted, Submission},
    config::{Config, ModelConfig},
    request::CreateResponse,
    run,
    store::keys::{self, NewKey},
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = env_usize("BENCH_ADMISSIONS", 4000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 32);
    let base = std::env::var("TOLLGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("tollgate_bench_{}", uuid::Uuid::new_v4().simple());
    let mut config = Config::default();
    config.database.url = format!("{base}/{name}");
    config.database.max_connections = concurrency as u32;
    config.models = vec![ModelConfig::mock("mock-1")];
    let config = Arc::new(config);
    let pool = run::prepare_database(&config).await?;
    let admission = Arc::new(Admission::new(pool.clone(), config.clone())?);

    let limits = NewKey {
        name: "bench".into(),
        rpm_limit: Some(i32::MAX),
        max_in_flight: Some(i32::MAX),
        budget: tollgate::money::MicroUsd::from_usd(1_000_000.0),
        ..Default::default()
    };
    let hot = vec![keys::create(&pool, &limits).await?.1];
    let mut many = Vec::new();
    for _ in 0..16 {
        many.push(keys::create(&pool, &limits).await?.1);
    }
    println!("admissions: {total}, concurrency: {concurrency}, PostgreSQL at {base}");
    for (label, secrets) in [("1 hot key", &hot), ("16 keys", &many)] {
        let started = Instant::now();
        let mut latencies: Vec<f64> = stream::iter(0..total)
            .map(|i| {
                let admission = admission.clone();
                let secret = secrets[i % secrets.len()].clone();
                async move {
                    let body = br#"{"model":"mock-1","input":"benchmark","background":true}"#;
                    let t = Instant::now();
                    let decision = admission
                        .admit(Submission {
                            secret: &secret,
                            body: CreateResponse::parse(body),
                            idempotency_key: None,
                        })
                        .await;
                    assert!(matches!(decision.result, Ok(Admitted::New { .. })));
                    t.elapsed().as_secs_f64() * 1000.0
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "{label:>10}: {:>7.0} admissions/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
            total as f64 / elapsed,
            pct(0.50),
            pct(0.99)
        );
    }
    pool.close().await;
    let mut admin = PgConnection::connect(&format!("{base}/postgres")).await?;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}
