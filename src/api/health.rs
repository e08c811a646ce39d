//! Liveness (`/healthz`: the process answers), readiness (`/readyz`) and Prometheus metrics
//! (`/metrics`). The front serves them beside the API; a worker process serves them on
//! `worker.listen` ([`serve_probes`]).
//!
//! Readiness answers whether the process can do its work: a front can while PostgreSQL answers
//! (with RabbitMQ away it still admits, and its outbox relay, or any front's, publishes later), so
//! a broker outage does not take every front out of its load balancer; a worker needs both. The
//! body says which of the two answered.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{FromRef, State},
    http::{header, StatusCode},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::{config::Config, metrics, queue::Publisher};

/// How long a probe or a scrape waits for PostgreSQL or RabbitMQ.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probes and the metrics read.
#[derive(Clone)]
pub struct Probes {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub config: Arc<Config>,
    /// Whether readiness needs RabbitMQ too (a worker) or PostgreSQL only (a front).
    pub needs_rabbitmq: bool,
}

impl FromRef<AppState> for Probes {
    fn from_ref(state: &AppState) -> Self {
        Self {
            pool: state.pool.clone(),
            publisher: state.publisher.clone(),
            config: state.config.clone(),
            needs_rabbitmq: false,
        }
    }
}

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Probes: FromRef<S>,
{
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
}

/// Serves the probes and the metrics alone (a worker's) on `listener` until `shutdown`.
pub async fn serve_probes(
    listener: TcpListener,
    probes: Probes,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router::<Probes>().with_state(probes);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(State(probes): State<Probes>) -> (StatusCode, Json<Value>) {
    let probe = sqlx::query("SELECT 1").execute(&probes.pool);
    let postgres = matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(_)));
    let rabbitmq = probes.publisher.channel().await.is_ok();
    let status = if postgres && (rabbitmq || !probes.needs_rabbitmq) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"postgres": postgres, "rabbitmq": rabbitmq})),
    )
}

async fn scrape(State(probes): State<Probes>) -> ([(header::HeaderName, &'static str); 1], String) {
    read_gauges(&probes).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
}

/// Sets the gauges read at scrape time: the pool's use, the backlogs and live jobs from
/// PostgreSQL (one statement, on the partial indexes of unsent and unfinished rows), and the
/// depth of tollgate's queues from RabbitMQ. A source that does not answer in time leaves its
/// gauges as they were, with a warning.
async fn read_gauges(probes: &Probes) {
    let pool = &probes.pool;
    let idle = pool.num_idle() as f64;
    metrics::gauge!(metrics::DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
    metrics::gauge!(metrics::DB_POOL_CONNECTIONS, "state" => "in_use")
        .set(f64::from(pool.size()) - idle);
    metrics::gauge!(metrics::DB_POOL_MAX).set(f64::from(pool.options().get_max_connections()));

    let counts = sqlx::query_as::<_, (i64, i64, i64, i64)>(
        "SELECT (SELECT count(*) FROM tollgate.outbox WHERE sent_at IS NULL),
                (SELECT count(*) FROM tollgate.event_outbox),
                (SELECT count(*) FROM tollgate.jobs WHERE status = 'queued'),
                (SELECT count(*) FROM tollgate.jobs WHERE status = 'in_progress')",
    )
    .fetch_one(pool);
    match tokio::time::timeout(PROBE_TIMEOUT, counts).await {
        Ok(Ok((outbox, events, queued, in_progress))) => {
            metrics::gauge!(metrics::OUTBOX_BACKLOG).set(outbox as f64);
            metrics::gauge!(metrics::EVENT_BACKLOG).set(events as f64);
            metrics::gauge!(metrics::JOBS, "status" => "queued").set(queued as f64);
            metrics::gauge!(metrics::JOBS, "status" => "in_progress").set(in_progress as f64);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: could not read the backlogs"),
        Err(_) => tracing::warn!("metrics: PostgreSQL did not answer in time"),
    }

    let config = &probes.config;
    let mut queues = vec![
        config.amqp.queue.clone(),
        config.amqp.dead_letter_queue.clone(),
    ];
    if config.webhooks.enabled {
        queues.push(config.webhooks.queue.clone());
        queues.push(config.webhooks.dead_letter_queue());
    }
    let depths = probes.publisher.queue_depths(&queues).await;
    for (queue, depth) in queues.into_iter().zip(depths) {
        match depth {
            Some(n) => metrics::gauge!(metrics::QUEUE_MESSAGES, "queue" => queue).set(f64::from(n)),
            None => tracing::warn!(%queue, "metrics: could not read the queue's depth"),
        }
    }
}
