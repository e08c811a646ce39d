//! The transactional outbox. Admission writes an outbox row beside the job, in its one statement;
//! the front publishes right after and marks the row sent, in batches ([`SentMarks`]). The relay publishes any row
//! left unsent (RabbitMQ was down, the front crashed between commit and publish), so every
//! committed job is published at least once. A second publish is harmless: the worker skips a job
//! that is not `queued`.
//!
//! A job that needs a message again gets a new outbox row in the transaction that decides so:
//! one whose worker died ([`rescue_lapsed`]), and one left `queued` whose message was lost —
//! dead-lettered, purged — ([`requeue_overdue`]).

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use sqlx::{types::Json, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{JobMessage, Publisher};
use crate::{ids::JobId, store::jobs};

/// Rows published per relay transaction.
const RELAY_BATCH: i64 = 100;

/// Published rows marked sent per statement at most.
const MARK_BATCH: usize = 1000;

/// Marks the rows the front has published as sent, many per statement: a background task takes
/// every id handed to [`SentMarks::mark`] since its last statement and marks them with one
/// `UPDATE`, so a job costs no commit of its own after its admission. A mark that is lost (the
/// front stopped first, PostgreSQL was out of reach, the queue of marks was full) leaves its row
/// unsent: the relay publishes it again and the worker drops the duplicate.
#[derive(Clone)]
pub struct SentMarks {
    ids: mpsc::Sender<i64>,
}

impl SentMarks {
    /// Starts the marking task; it ends once every `SentMarks` is dropped and the last marks
    /// are written.
    pub fn start(pool: PgPool) -> (Self, tokio::task::JoinHandle<()>) {
        let (ids, mut received) = mpsc::channel(64 * MARK_BATCH);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MARK_BATCH);
            while received.recv_many(&mut batch, MARK_BATCH).await > 0 {
                if let Err(e) = mark_sent(&pool, &batch).await {
                    tracing::warn!(rows = batch.len(), error = %e, "published, but could not mark the outbox rows sent; the relay may publish them again");
                }
                batch.clear();
            }
        });
        (Self { ids }, task)
    }

    /// Marks this row sent soon (never waits).
    pub fn mark(&self, outbox_id: i64) {
        if self.ids.try_send(outbox_id).is_err() {
            tracing::debug!(
                outbox_id,
                "too many marks waiting; the relay may publish this row again"
            );
        }
    }
}

/// Marks outbox rows as published.
pub async fn mark_sent(pool: &PgPool, outbox_ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE tollgate.outbox SET sent_at = now() WHERE id = ANY($1) AND sent_at IS NULL",
    )
    .bind(outbox_ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Jobs one sweep gives a new message at most (the next sweep goes on).
const REQUEUE_BATCH: i64 = 1000;

/// Puts back the jobs whose worker is gone (lease lapsed more than `grace` ago) with a new
/// message each, in one transaction. Returns them.
pub async fn rescue_lapsed(pool: &PgPool, grace: Duration) -> Result<Vec<JobId>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rescued = jobs::rescue_lapsed_leases(&mut tx, grace.as_secs_f64()).await?;
    insert(&mut tx, &rescued).await?;
    tx.commit().await?;
    Ok(rescued.into_iter().map(|(id, _)| id).collect())
}

/// Gives a new message to each job `queued` for longer than `overdue` with none in the outbox,
/// in one transaction. The caller makes sure no message waits in the jobs queue (then a job
/// queued that long has lost its message); a job whose message was only late gets a duplicate,
/// which the worker drops. Returns them.
pub async fn requeue_overdue(pool: &PgPool, overdue: Duration) -> Result<Vec<JobId>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let overdue = jobs::take_overdue_queued(&mut tx, overdue.as_secs_f64(), REQUEUE_BATCH).await?;
    insert(&mut tx, &overdue).await?;
    tx.commit().await?;
    Ok(overdue.into_iter().map(|(id, _)| id).collect())
}

/// Inserts an unsent outbox row for each (job, model), for the relay to publish.
async fn insert(tx: &mut sqlx::PgConnection, jobs: &[(JobId, String)]) -> Result<(), sqlx::Error> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|(id, _)| id.0).collect();
    let payloads: Vec<Value> = jobs
        .iter()
        .map(|(id, model)| {
            serde_json::to_value(JobMessage::new(*id, model)).expect("a job message serialises")
        })
        .collect();
    sqlx::query(
        "INSERT INTO tollgate.outbox (job_id, payload)
         SELECT * FROM unnest($1::uuid[], $2::jsonb[])",
    )
    .bind(&ids)
    .bind(&payloads)
    .execute(tx)
    .await?;
    Ok(())
}

/// Publishes one batch of unsent rows older than `grace` (younger ones are left to the front's
/// own publish). Rows are locked with `SKIP LOCKED`, so several fronts can relay side by side.
/// Returns how many were published.
pub async fn relay_once(
    pool: &PgPool,
    publisher: &Publisher,
    grace: Duration,
) -> Result<usize, anyhow::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, Json<Value>)> = sqlx::query_as(
        "SELECT id, payload FROM tollgate.outbox
          WHERE sent_at IS NULL AND created_at < now() - make_interval(secs => $1)
          ORDER BY id LIMIT $2
          FOR UPDATE SKIP LOCKED",
    )
    .bind(grace.as_secs_f64())
    .bind(RELAY_BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let mut sent = Vec::with_capacity(rows.len());
    let mut failure = None;
    for (id, Json(payload)) in rows {
        let message: JobMessage = match serde_json::from_value(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(outbox_id = id, error = %e, "outbox row holds no job message; skipped");
                continue;
            }
        };
        match publisher.publish(&message).await {
            Ok(()) => sent.push(id),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    sqlx::query(
        "UPDATE tollgate.outbox SET sent_at = now(), publish_attempts = publish_attempts + 1
          WHERE id = ANY($1)",
    )
    .bind(&sent)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(sent.len()),
    }
}

/// Runs the relay until `shutdown` is cancelled.
pub async fn run_relay(
    pool: PgPool,
    publisher: Arc<Publisher>,
    interval: Duration,
    grace: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match relay_once(&pool, &publisher, grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(published = n, "outbox relay published unsent jobs"),
            Err(e) => tracing::warn!(error = %e, "outbox relay could not publish; will retry"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
