//! Memory: the resident size (`VmRSS`) of the front idle and while it holds open SSE followers
//! (`GET /v1/responses/{id}?stream=true`) of jobs that keep running, and of the worker idle and
//! with as many jobs running as its concurrency allows.

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tollgate::config::ModelConfig;

use crate::{
    env::{self, rss_kib, Env, Registry, Role},
    load,
    report::{mib, Figures, Memory},
    Settings,
};

/// A job that runs for as long as the phase: a delta every two seconds.
const HOLD: &str = "mock-hold";
const HOLD_DELTAS: u32 = 100_000;

pub async fn run(
    settings: &Arc<Settings>,
    registry: &Registry,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    env::phase(
        settings,
        registry,
        "memory",
        |c| {
            c.worker.concurrency = settings.worker_concurrency;
            c.server.max_followers_per_key = settings.followers;
            let mut model = ModelConfig::mock(HOLD);
            model.mock_deltas = HOLD_DELTAS;
            model.mock_delay_ms = 2000;
            model.max_output_tokens = HOLD_DELTAS;
            c.models.push(model);
        },
        figures,
        async |env, figures| measure(settings, env, figures).await,
    )
    .await
}

/// The largest of a few samples of a process's RSS over `span`.
async fn rss_over(pid: u32, span: Duration) -> anyhow::Result<u64> {
    let mut most = 0;
    for _ in 0..5 {
        most = most.max(rss_kib(pid)?);
        tokio::time::sleep(span / 5).await;
    }
    Ok(most)
}

async fn measure(settings: &Settings, env: &mut Env, figures: &mut Figures) -> anyhow::Result<()> {
    env.migrate().await?;
    env.create_keys(settings.keys).await?;
    let front = env.start(Role::Serve).await?;
    let worker = env.start(Role::Worker).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let front_idle = rss_over(front, Duration::from_secs(1)).await?;
    let worker_idle = rss_over(worker, Duration::from_secs(1)).await?;
    println!(
        "  idle: front {:.1} MiB, worker {:.1} MiB",
        mib(front_idle),
        mib(worker_idle)
    );

    // More jobs than the worker runs at once, so that it is full; the rest wait queued.
    let concurrency = settings.worker_concurrency as usize;
    let jobs = load::submit_n(
        &env.base_url,
        &env.secrets(0..settings.keys),
        &load::request_body(HOLD, 1024),
        concurrency + concurrency / 8 + 1,
        settings.concurrency,
    )
    .await?;
    let mut pg = env.pg().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let running = loop {
        let (running,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM tollgate.jobs WHERE status = 'in_progress'")
                .fetch_one(&mut pg)
                .await?;
        if running as usize >= concurrency || tokio::time::Instant::now() > deadline {
            break running as u64;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(pg);
    // Let every running job write a few deltas first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let worker_busy = rss_over(worker, Duration::from_secs(2)).await?;
    println!(
        "  worker with {running} jobs running (concurrency {concurrency}): {:.1} MiB",
        mib(worker_busy)
    );

    // Followers, spread over the jobs; each one's key is its job's.
    let stop = CancellationToken::new();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let opened: Vec<anyhow::Result<tokio::task::JoinHandle<()>>> =
        futures::stream::iter(0..settings.followers)
            .map(|i| {
                let (id, key) = &jobs[i % jobs.len()];
                let url = format!("{}/v1/responses/{id}?stream=true", env.base_url);
                let secret = env.keys[*key].secret.clone();
                let client = client.clone();
                let stop = stop.clone();
                async move {
                    let mut response = client.get(url).bearer_auth(secret).send().await?;
                    if !response.status().is_success() {
                        let status = response.status();
                        bail!("{status} {}", response.text().await.unwrap_or_default());
                    }
                    // Read whatever comes until the phase ends; the stream stays open.
                    Ok(tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                chunk = response.chunk() => match chunk {
                                    Ok(Some(_)) => {}
                                    _ => break,
                                },
                            }
                        }
                    }))
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
    let mut followers = Vec::new();
    for follower in opened {
        followers.push(follower.context("opening an SSE follower")?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alive = followers.iter().filter(|f| !f.is_finished()).count();
    let front_followers = rss_over(front, Duration::from_secs(5)).await?;
    let still = followers.iter().filter(|f| !f.is_finished()).count();
    println!(
        "  front with {alive} followers open ({still} still open after sampling): {:.1} MiB",
        mib(front_followers)
    );
    stop.cancel();
    for follower in followers {
        let _ = follower.await;
    }
    if still < settings.followers {
        bail!(
            "{} of {} followers closed before the sampling ended",
            settings.followers - still,
            settings.followers
        );
    }
    figures.memory = Some(Memory {
        front_idle_kib: front_idle,
        front_followers_kib: front_followers,
        followers: settings.followers,
        worker_idle_kib: worker_idle,
        worker_busy_kib: worker_busy,
        worker_concurrency: settings.worker_concurrency,
        running,
    });
    Ok(())
}
