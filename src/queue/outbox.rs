//! The transactional outbox, whole: every way a job's message is written, published and marked.
//!
//! - Admission's one statement (`tollgate.admit`, `admission/`) writes the job's outbox row
//!   beside the job, so a committed job always has its message on record.
//! - The front publishes it right after and has the row marked sent, many rows per statement
//!   ([`Dispatch`]).
//! - The relay ([`run_relay`]) publishes any row left unsent — RabbitMQ was down, the front
//!   stopped between admission and publish, a mark was lost — so every committed job is
//!   published at least once. A second publish is harmless: the worker drops a message for a job
//!   that is not `queued`, or that a live attempt holds.
//! - A job that needs a message again gets a new row in the transaction that decides so: one
//!   whose worker died ([`rescue_lapsed`]), and one left `queued` whose message was lost —
//!   dead-lettered, purged — ([`requeue_overdue`]).
//! - Published rows are removed after a day by the front's sweeper (`store/retention.rs`).

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

/// The front's publishing of the jobs it has just admitted: publish at once, then mark the row
/// sent, many rows per statement — a background task takes every id published since its last
/// statement and marks them with one `UPDATE`, so a job costs no commit of its own after its
/// admission. A publish that fails leaves the row to the relay; a mark that is lost (the front
/// stopped first, PostgreSQL was out of reach, too many marks waiting) leaves its row unsent, and
/// the relay publishes it again, which the worker drops as a duplicate.
#[derive(Clone)]
pub struct Dispatch {
    publisher: Arc<Publisher>,
    sent: mpsc::Sender<i64>,
}

impl Dispatch {
    /// Starts the marking task; it ends once every `Dispatch` is dropped and the last marks are
    /// written.
    pub fn start(pool: PgPool, publisher: Arc<Publisher>) -> (Self, tokio::task::JoinHandle<()>) {
        let (sent, mut received) = mpsc::channel(64 * MARK_BATCH);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MARK_BATCH);
            while received.recv_many(&mut batch, MARK_BATCH).await > 0 {
                if let Err(e) = mark_sent(&pool, &batch).await {
                    tracing::warn!(rows = batch.len(), error = %e, "published, but could not mark the outbox rows sent; the relay may publish them again");
                }
                batch.clear();
            }
        });
        (Self { publisher, sent }, task)
    }

    /// Publishes the message of a job just admitted (its outbox row `outbox_id`) and has the row
    /// marked sent; never fails: what is not done here, the relay does.
    pub async fn publish(&self, outbox_id: i64, message: &JobMessage) {
        match self.publisher.publish(message).await {
            Ok(()) => {
                if self.sent.try_send(outbox_id).is_err() {
                    tracing::debug!(
                        outbox_id,
                        "too many marks waiting; the relay may publish this row again"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(job_id = %message.job_id, error = %e, "publish failed; the outbox relay will retry");
            }
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
