//! Streaming writes: the worker alone writing the deltas of mock jobs with no pause between
//! deltas — one job of 10,000 deltas, then 200 jobs of 200 deltas running at once.
//!
//! The jobs are submitted while only `tollgate serve` runs; the front is then stopped, so that
//! what PostgreSQL counts while the worker runs is the worker's. Statements are counted from
//! PostgreSQL's cumulative statistics (pg_stat_statements needs a server setting, which the
//! benchmark does not change): committed transactions of the database (`pg_stat_database`
//! `xact_commit`, each autocommit statement is one) and the rows inserted into
//! `tollgate.job_events` and updated in `tollgate.jobs` (`pg_stat_user_tables`). Statistics are
//! read after every process that wrote them has exited (a backend flushes them at the latest
//! when it ends). From the transactions are taken away the worker's own start and stop,
//! measured once with no job, and the benchmark's own queries.

use std::{sync::Arc, time::Duration};

use anyhow::bail;
use sqlx::Connection;
use tollgate::config::ModelConfig;

use crate::{
    e2e::wait_finished,
    env::{self, Env, Registry, Role},
    load,
    report::{n, Figures, Stream},
    Settings,
};

const LONG: &str = "mock-long";
const SHORT: &str = "mock-short";

pub async fn run(
    settings: &Arc<Settings>,
    registry: &Registry,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    env::phase(
        settings,
        registry,
        "stream",
        |c| {
            c.worker.concurrency = settings.worker_concurrency;
            for (name, deltas) in [
                (LONG, settings.stream_deltas),
                (SHORT, settings.stream_job_deltas),
            ] {
                let mut model = ModelConfig::mock(name);
                model.mock_deltas = deltas;
                model.mock_delay_ms = 0;
                model.max_output_tokens = deltas.max(1);
                c.models.push(model);
            }
        },
        figures,
        async |env, figures| measure(settings, env, figures).await,
    )
    .await
}

/// Cumulative counts of the phase's database.
#[derive(Debug, Clone, Copy)]
struct Counts {
    xacts: i64,
    event_rows: i64,
    job_updates: i64,
}

/// Reads the counts on a connection of its own, once every writer's statistics are in.
async fn counts(env: &Env) -> anyhow::Result<Counts> {
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut pg = env.pg().await?;
    let (xacts, event_rows, job_updates): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
                coalesce((SELECT n_tup_ins FROM pg_stat_user_tables
                           WHERE schemaname = 'tollgate' AND relname = 'job_events'), 0),
                coalesce((SELECT n_tup_upd FROM pg_stat_user_tables
                           WHERE schemaname = 'tollgate' AND relname = 'jobs'), 0)",
    )
    .fetch_one(&mut pg)
    .await?;
    pg.close().await?;
    Ok(Counts {
        xacts,
        event_rows,
        job_updates,
    })
}

async fn measure(settings: &Settings, env: &mut Env, figures: &mut Figures) -> anyhow::Result<()> {
    if settings.stream_jobs > settings.worker_concurrency as usize {
        println!(
            "  note: {} jobs with worker concurrency {}: not all run at once",
            settings.stream_jobs, settings.worker_concurrency
        );
    }
    env.migrate().await?;
    env.create_keys(settings.keys).await?;
    // What reading the counts adds by itself, and what a worker's start and stop cost with no
    // job: both are taken away from each measure.
    let a = counts(env).await?;
    let b = counts(env).await?;
    let reading = b.xacts - a.xacts;
    env.start(Role::Worker).await?;
    env.stop(Role::Worker).await?;
    let c = counts(env).await?;
    let worker_alone = c.xacts - b.xacts - reading;
    println!(
        "  counting: reading the statistics adds {reading} transactions, a worker's start and \
         stop with no job {worker_alone}"
    );

    for (label, model, jobs) in [
        (
            format!("1 job × {} deltas", n(settings.stream_deltas as f64)),
            LONG,
            1,
        ),
        (
            format!(
                "{} jobs × {} deltas",
                settings.stream_jobs,
                n(settings.stream_job_deltas as f64)
            ),
            SHORT,
            settings.stream_jobs,
        ),
    ] {
        env.start(Role::Serve).await?;
        load::submit_n(
            &env.base_url,
            &env.secrets(0..settings.keys),
            &load::request_body(model, 1024),
            jobs,
            settings.concurrency,
        )
        .await?;
        env.stop(Role::Serve).await?;
        let before = counts(env).await?;
        env.start(Role::Worker).await?;
        let mut pg = env.pg().await?;
        let polls = wait_finished(&mut pg, settings.drain).await?;
        let (count, completed, deltas, seconds): (i64, i64, i64, f64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'completed'),
                    coalesce(sum(output_tokens), 0)::int8,
                    extract(epoch FROM max(finished_at) - min(started_at))::float8
               FROM tollgate.jobs WHERE model = $1",
        )
        .bind(model)
        .fetch_one(&mut pg)
        .await?;
        pg.close().await?;
        env.stop(Role::Worker).await?;
        let after = counts(env).await?;
        if completed != count {
            bail!("{label}: only {completed} of {count} jobs completed");
        }
        // The connection that polled: its start, its polls and the query above.
        let harness = reading + 1 + polls as i64 + 1;
        let xacts = after.xacts - before.xacts - harness - worker_alone;
        let per = |v: i64| v as f64 / deltas.max(1) as f64;
        let stream = Stream {
            label: label.clone(),
            deltas: deltas as u64,
            rate: deltas as f64 / seconds.max(1e-9),
            xacts_per_delta: per(xacts),
            event_rows_per_delta: per(after.event_rows - before.event_rows),
            job_updates_per_delta: per(after.job_updates - before.job_updates),
        };
        println!(
            "  {label}: {} deltas in {seconds:.3} s = {:.0}/s; {} transactions, {} event rows, \
             {} job-row updates",
            stream.deltas,
            stream.rate,
            xacts,
            after.event_rows - before.event_rows,
            after.job_updates - before.job_updates
        );
        figures.streams.push(stream);
    }
    Ok(())
}
