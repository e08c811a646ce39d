//! Starting and stopping tollgate's parts: the front (HTTP + outbox relay), the worker, or both in
//! one process. Each runs until its shutdown token is cancelled, then drains.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    admission::Admission,
    api::{self, AppState},
    config::Config,
    queue::{
        outbox::{self, Dispatch},
        Publisher,
    },
    store::{self, jobs, notify::JobWatch},
    webhooks::deliver::Deliverer,
    worker::Worker,
};

/// Connects to PostgreSQL (creating the database if needed) and brings the schema up to date.
pub async fn prepare_database(config: &Config) -> anyhow::Result<PgPool> {
    let pool = store::connect(&config.database).await?;
    store::migrate(&pool, &config.database).await?;
    Ok(pool)
}

/// Serves the HTTP front on `listener` and runs the outbox relay, until `shutdown`.
pub async fn serve(
    config: Arc<Config>,
    pool: PgPool,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metrics::install();
    let publisher = Arc::new(Publisher::new(config.clone()));
    if let Err(e) = publisher.channel().await {
        tracing::warn!(error = %e, "RabbitMQ is not reachable yet; jobs are admitted and published when it is");
    }
    let handed_back = outbox::HandedBack::default();
    let relay = tokio::spawn(outbox::run_relay(
        pool.clone(),
        publisher.clone(),
        Duration::from_millis(config.server.relay_interval_ms),
        Duration::from_millis(config.server.relay_grace_ms),
        handed_back.clone(),
        shutdown.clone(),
    ));
    let events = tokio::spawn(event_relay(&config, &pool, &publisher, &shutdown));
    let sweeper = tokio::spawn(sweep(
        pool.clone(),
        config.clone(),
        publisher.clone(),
        shutdown.clone(),
    ));
    let admission = Arc::new(
        Admission::new(pool.clone(), config.clone()).context("invalid guardrail configuration")?,
    );
    let config_grace = config.server.shutdown_grace_seconds;
    let watch = JobWatch::start(
        pool.clone(),
        config.database.clone(),
        Duration::from_millis(config.server.stream_fallback_poll_ms),
        admission.keys().clone(),
        shutdown.clone(),
    );
    let (dispatch, marking) = Dispatch::start(pool.clone(), publisher.clone(), handed_back);
    let state = AppState {
        pool,
        watch,
        config,
        publisher: publisher.clone(),
        dispatch,
        admission,
    };
    tracing::info!(listen = %listener.local_addr()?, "front listening");
    let server_config = state.config.server.clone();
    let server = api::serve(listener, api::app(state), &server_config, shutdown.clone());
    // Requests in progress at shutdown get a bounded time to finish.
    let grace = Duration::from_secs(config_grace);
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = server => served.context("HTTP server failed")?,
        _ = deadline => tracing::warn!(?grace, "requests still running after the grace period; stopping"),
    }
    shutdown.cancel();
    let _ = relay.await;
    let _ = events.await;
    let _ = sweeper.await;
    // The last marks are written once the connections holding the state have closed; a mark
    // not written in time only means the relay publishes that row again.
    let _ = tokio::time::timeout(Duration::from_secs(2), marking).await;
    publisher.close().await;
    Ok(())
}

/// How often the sweeper purges what retention no longer keeps.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// Until `shutdown`: rescues jobs whose worker is gone (lease lapsed), republishes jobs whose
/// message was lost, expires jobs left `queued` past their time to live, and now and then purges
/// what retention no longer keeps.
async fn sweep(
    pool: PgPool,
    config: Arc<Config>,
    publisher: Arc<Publisher>,
    shutdown: CancellationToken,
) {
    let ttl_seconds = config.server.queued_job_ttl_seconds;
    let interval = Duration::from_millis(config.server.sweep_interval_ms);
    let overdue = Duration::from_secs(config.server.requeue_overdue_seconds);
    let mut next_purge = tokio::time::Instant::now();
    loop {
        match outbox::rescue_lapsed(&pool, Duration::from_secs(1)).await {
            Ok(rescued) if rescued.is_empty() => {}
            Ok(rescued) => {
                crate::metrics::counter!(crate::metrics::LEASE_RESCUES)
                    .increment(rescued.len() as u64);
                tracing::warn!(jobs = rescued.len(), "rescued jobs whose worker is gone")
            }
            Err(e) => tracing::warn!(error = %e, "could not rescue lapsed jobs; will retry"),
        }
        // Only while no message waits in the jobs queue: then a job queued that long lost its
        // message. (In a backlog, jobs wait for their turn, and would only be doubled.)
        if let Ok(0) = publisher.ready_messages().await {
            match outbox::requeue_overdue(&pool, overdue).await {
                Ok(requeued) if requeued.is_empty() => {}
                Ok(requeued) => {
                    tracing::warn!(
                        jobs = requeued.len(),
                        ?requeued,
                        "republished queued jobs whose message was lost"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not republish overdue jobs; will retry")
                }
            }
        }
        match jobs::expire_queued(&pool, ttl_seconds).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(expired = n, "jobs expired in the queue"),
            Err(e) => tracing::warn!(error = %e, "could not expire queued jobs; will retry"),
        }
        if tokio::time::Instant::now() >= next_purge {
            next_purge += PURGE_INTERVAL;
            match store::retention::purge(&pool, config.server.retention_days).await {
                Ok(removed) if removed.is_empty() => {}
                Ok(removed) => tracing::info!(?removed, "retention purged old rows"),
                Err(e) => tracing::warn!(error = %e, "retention purge failed; will retry"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The event relay of this process (`queue/outbox.rs`): every process runs one, so events are
/// published whichever processes run; one at a time publishes.
fn event_relay(
    config: &Config,
    pool: &PgPool,
    publisher: &Arc<Publisher>,
    shutdown: &CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    outbox::run_event_relay(
        pool.clone(),
        publisher.clone(),
        Duration::from_millis(config.events.relay_interval_ms),
        config.events.include_content,
        shutdown.clone(),
    )
}

/// Runs the worker, its event relay and (unless disabled) the webhook deliveries until
/// `shutdown`.
pub async fn work(config: Arc<Config>, pool: PgPool, shutdown: CancellationToken) {
    let publisher = Arc::new(Publisher::new(config.clone()));
    work_on(config, pool, publisher, shutdown).await
}

/// [`work`] with `publisher` as the worker's own connection for events (which its probes share).
pub async fn work_on(
    config: Arc<Config>,
    pool: PgPool,
    publisher: Arc<Publisher>,
    shutdown: CancellationToken,
) {
    crate::metrics::install();
    let events = tokio::spawn(event_relay(&config, &pool, &publisher, &shutdown));
    let webhooks = config.webhooks.enabled.then(|| {
        let deliverer = Deliverer::new(pool.clone(), config.clone())
            .expect("webhooks.allow_networks was checked with the configuration");
        tokio::spawn(deliverer.run(shutdown.clone()))
    });
    Worker::new(pool, config).run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = events.await;
    if let Some(webhooks) = webhooks {
        let _ = webhooks.await;
    }
    publisher.close().await;
}

/// Starts a worker process's `/healthz`, `/readyz` and `/metrics` on `worker.listen` (unless it
/// is empty), until `shutdown`. The worker's publisher (see [`work_on`]) answers readiness.
pub async fn worker_probes(
    config: &Arc<Config>,
    pool: &PgPool,
    publisher: &Arc<Publisher>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if config.worker.listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(&config.worker.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.worker.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "worker probes and metrics listening");
    let probes = api::Probes {
        pool: pool.clone(),
        publisher: publisher.clone(),
        config: config.clone(),
        needs_rabbitmq: true,
    };
    let shutdown = shutdown.clone();
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = api::serve_probes(listener, probes, shutdown).await {
            tracing::error!(error = %e, "worker probes server failed");
        }
    })))
}

/// Binds the configured listen address.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler installs");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}
