//! End to end: `tollgate serve` and `tollgate worker` as separate processes, a mock model of 20
//! deltas 5 ms apart. Submissions run at full speed for the measured window, then the jobs are
//! waited for; queue wait and run time come from the jobs table.

use std::{sync::Arc, time::Instant};

use anyhow::bail;
use sqlx::PgConnection;

use crate::{
    env::{self, Env, Registry, Role, MODEL},
    load,
    report::{E2e, Figures},
    Settings,
};

pub async fn run(
    settings: &Arc<Settings>,
    registry: &Registry,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    env::phase(
        settings,
        registry,
        "e2e",
        |c| {
            c.worker.concurrency = settings.worker_concurrency;
        },
        figures,
        async |env, figures| measure(settings, env, figures).await,
    )
    .await
}

async fn measure(settings: &Settings, env: &mut Env, figures: &mut Figures) -> anyhow::Result<()> {
    env.migrate().await?;
    env.create_keys(settings.keys).await?;
    env.start(Role::Serve).await?;
    env.start(Role::Worker).await?;
    let model = env.config.model(MODEL).expect("the bench model").clone();
    let body = load::request_body(MODEL, 1024);
    println!(
        "{} connections over {} keys for {:.0} s; worker concurrency {}; {} deltas {} ms apart",
        settings.concurrency,
        settings.keys,
        settings.seconds.as_secs_f64(),
        settings.worker_concurrency,
        model.mock_deltas,
        model.mock_delay_ms
    );
    let xacts_before = xacts(env).await?;
    let outcome = load::submit_for(
        &env.base_url,
        &env.secrets(0..settings.keys),
        &body,
        settings.concurrency,
        std::time::Duration::ZERO,
        settings.seconds,
    )
    .await?;
    println!(
        "  submitted {} ({:.0}/s), {} non-2xx; waiting for the jobs to finish",
        outcome.ok,
        outcome.rate,
        outcome.failed()
    );
    outcome.print_failures();
    let mut pg = env.pg().await?;
    wait_finished(&mut pg, settings.drain).await?;

    let (total, completed, elapsed, wait_p50, wait_p99, run_p50, run_p99): (
        i64,
        i64,
        f64,
        f64,
        f64,
        f64,
        f64,
    ) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE status = 'completed'),
                extract(epoch FROM max(finished_at) - min(created_at))::float8,
                1000 * percentile_cont(0.50) WITHIN GROUP
                    (ORDER BY extract(epoch FROM started_at - created_at)::float8),
                1000 * percentile_cont(0.99) WITHIN GROUP
                    (ORDER BY extract(epoch FROM started_at - created_at)::float8),
                1000 * percentile_cont(0.50) WITHIN GROUP
                    (ORDER BY extract(epoch FROM finished_at - started_at)::float8),
                1000 * percentile_cont(0.99) WITHIN GROUP
                    (ORDER BY extract(epoch FROM finished_at - started_at)::float8)
           FROM tollgate.jobs",
    )
    .fetch_one(&mut pg)
    .await?;
    if completed < total {
        let statuses: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status::text, count(*) FROM tollgate.jobs GROUP BY 1 ORDER BY 2 DESC",
        )
        .fetch_all(&mut pg)
        .await?;
        println!("  not every job completed: {statuses:?}");
    }
    // Backends flush their statistics at least every second or so while they run.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let xacts_per_job = (xacts(env).await? - xacts_before) as f64 / total.max(1) as f64;
    let completion_rate = completed as f64 / elapsed;
    let e2e = E2e {
        submit_rate: outcome.rate,
        submitted: outcome.ok,
        completed: completed as u64,
        completion_rate,
        delta_rate: completion_rate * model.mock_deltas as f64,
        wait_p50,
        wait_p99,
        run_p50,
        run_p99,
        ideal_run_ms: (model.mock_deltas as u64 * model.mock_delay_ms) as f64,
        xacts_per_job,
    };
    println!("  {completed} completed in {elapsed:.1} s (first created → last finished)");
    figures.e2e = Some(e2e);
    Ok(())
}

/// Transactions committed so far in the phase's database.
async fn xacts(env: &Env) -> anyhow::Result<i64> {
    let mut pg = env.pg().await?;
    let (xacts,): (i64,) = sqlx::query_as(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut pg)
    .await?;
    Ok(xacts)
}

/// Waits until no job of the phase's database is unfinished; returns the polls it took.
pub async fn wait_finished(
    pg: &mut PgConnection,
    longest: std::time::Duration,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut polls = 0;
    loop {
        let (unfinished,): (i64,) =
            // On the partial index of unfinished jobs: a scan of the whole table every poll
            // took tens of milliseconds of PostgreSQL's time from the run being measured.
            sqlx::query_as(
                "SELECT count(*) FROM tollgate.jobs WHERE status IN ('queued', 'in_progress')",
            )
                .fetch_one(&mut *pg)
                .await?;
        polls += 1;
        if unfinished == 0 {
            return Ok(polls);
        }
        if started.elapsed() > longest {
            bail!("{unfinished} jobs still unfinished after {longest:?} (BENCH_DRAIN_SECONDS)");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
