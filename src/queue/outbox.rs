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
//!
//! Lifecycle events (`queue/events.rs`) have an outbox of their own, `tollgate.event_outbox`,
//! beside this one, written by a trigger on `tollgate.jobs` in the transaction of each
//! transition (migration `20261201000004_lifecycle_events.sql`). An event outlives its job (the
//! `deleted` event), and must be published promptly and in order, so its relay
//! ([`run_event_relay`]) differs: every process runs one, one at a time publishes (an advisory
//! lock), oldest first, with no grace period (nobody else publishes events), and it deletes what
//! RabbitMQ confirmed (the table holds only what waits).

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use sqlx::{types::Json, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    events::{JobEvent, EVENT_VERSION},
    JobMessage, Publisher,
};
use crate::{ids::JobId, metrics, store::jobs};

/// Rows published per relay transaction.
const RELAY_BATCH: i64 = 100;

/// Published rows marked sent per statement at most.
const MARK_BATCH: usize = 1000;

/// Rows handed back to the relay at most; more wait out its grace period.
const HANDED_BACK_MAX: usize = 10_000;

/// The outbox rows whose publish right after admission failed (RabbitMQ nacked it, or was out of
/// reach): the relay takes them at its next pass instead of after its grace period, which is
/// there only to leave fresh rows to the front's own publish. So a job whose publish was refused
/// in a broker's failover waits about one relay interval, not the grace period.
#[derive(Clone, Default)]
pub struct HandedBack(Arc<std::sync::Mutex<Vec<i64>>>);

impl HandedBack {
    fn push(&self, outbox_id: i64) {
        let mut ids = self.0.lock().expect("handed-back lock");
        if ids.len() < HANDED_BACK_MAX {
            ids.push(outbox_id);
        }
    }

    fn take(&self) -> Vec<i64> {
        std::mem::take(&mut *self.0.lock().expect("handed-back lock"))
    }

    /// Gives back what a relay pass took and may not have published: it stays first in line
    /// (a row published meanwhile is skipped, as its `sent_at` is set).
    fn restore(&self, mut taken: Vec<i64>) {
        let mut ids = self.0.lock().expect("handed-back lock");
        taken.append(&mut ids);
        taken.truncate(HANDED_BACK_MAX);
        *ids = taken;
    }
}

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
    handed_back: HandedBack,
}

impl Dispatch {
    /// Starts the marking task; it ends once every `Dispatch` is dropped and the last marks are
    /// written. Rows whose publish fails go to `handed_back`, for the relay.
    pub fn start(
        pool: PgPool,
        publisher: Arc<Publisher>,
        handed_back: HandedBack,
    ) -> (Self, tokio::task::JoinHandle<()>) {
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
        let dispatch = Self {
            publisher,
            sent,
            handed_back,
        };
        (dispatch, task)
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
                self.handed_back.push(outbox_id);
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
/// own publish), and of the rows `handed_back` whatever their age. Rows are locked with
/// `SKIP LOCKED`, so several fronts can relay side by side. Returns how many were published.
pub async fn relay_once(
    pool: &PgPool,
    publisher: &Publisher,
    grace: Duration,
    handed_back: &[i64],
) -> Result<usize, anyhow::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, Json<Value>)> = sqlx::query_as(
        "SELECT id, payload FROM tollgate.outbox
          WHERE sent_at IS NULL
            AND (created_at < now() - make_interval(secs => $1) OR id = ANY($3))
          ORDER BY id LIMIT $2
          FOR UPDATE SKIP LOCKED",
    )
    .bind(grace.as_secs_f64())
    .bind(RELAY_BATCH)
    .bind(handed_back)
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

/// Runs the relay until `shutdown` is cancelled. Rows handed back that a pass may not have
/// published (RabbitMQ refused again, the batch was full) are kept for the next.
pub async fn run_relay(
    pool: PgPool,
    publisher: Arc<Publisher>,
    interval: Duration,
    grace: Duration,
    handed_back: HandedBack,
    shutdown: CancellationToken,
) {
    loop {
        let early = handed_back.take();
        match relay_once(&pool, &publisher, grace, &early).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(published = n, "outbox relay published unsent jobs");
                }
                if n as i64 == RELAY_BATCH {
                    handed_back.restore(early);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay could not publish; will retry");
                handed_back.restore(early);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Events published per relay transaction at most.
const EVENT_BATCH: i64 = 1000;

/// The advisory lock (transaction-scoped) held by the one relay publishing events at a time:
/// one publisher, in id order, keeps each job's events in order on the exchange.
const EVENT_RELAY_LOCK: i64 = 0x7467_6576_656e_7473;

/// An event row as the relay reads it.
#[derive(sqlx::FromRow)]
struct EventRow {
    id: i64,
    event_id: uuid::Uuid,
    job_id: uuid::Uuid,
    key_id: uuid::Uuid,
    model: String,
    status: String,
    seq: i32,
    attempt: i32,
    input_tokens: Option<i32>,
    output_tokens: Option<i32>,
    usage_estimated: Option<bool>,
    reserved_micro_usd: i64,
    cost_micro_usd: Option<i64>,
    charged_micro_usd: Option<i64>,
    error: Option<Json<Value>>,
    incomplete_reason: Option<String>,
    job_created_at: chrono::DateTime<chrono::Utc>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    occurred_at: chrono::DateTime<chrono::Utc>,
    request: Option<Json<Value>>,
    output_text: Option<String>,
}

impl From<EventRow> for JobEvent {
    fn from(row: EventRow) -> Self {
        JobEvent {
            v: EVENT_VERSION,
            id: JobEvent::public_id(row.event_id),
            kind: format!("job.{}", row.status),
            job_id: JobId(row.job_id).to_string(),
            key_id: row.key_id,
            model: row.model,
            status: row.status,
            seq: row.seq,
            attempt: row.attempt,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            usage_estimated: row.usage_estimated,
            reserved_micro_usd: row.reserved_micro_usd,
            cost_micro_usd: row.cost_micro_usd,
            charged_micro_usd: row.charged_micro_usd,
            error: row.error.map(|Json(e)| e),
            incomplete_reason: row.incomplete_reason,
            created_at: row.job_created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            occurred_at: row.occurred_at,
            request: row.request.map(|Json(r)| r),
            output_text: row.output_text,
        }
    }
}

/// Publishes one batch of waiting events, oldest first, if no other relay is publishing events
/// (else does nothing). Events RabbitMQ confirmed are deleted; one it did not stays (its
/// `publish_attempts` counted) and is published again on the next pass — after later events, if
/// any were confirmed: so a consumer may see a job's event again, or late, and puts them in order
/// by `seq`. A confirm whose delete is lost (the process stopped first) publishes the event
/// again as well. With
/// `include_content`, terminal events carry the job's stored request and output text, as they
/// are when the event is published. Returns how many were confirmed.
pub async fn relay_events_once(
    pool: &PgPool,
    publisher: &Publisher,
    include_content: bool,
) -> Result<usize, anyhow::Error> {
    let mut tx = pool.begin().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(EVENT_RELAY_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(0);
    }
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT e.id, e.event_id, e.job_id, e.key_id, e.model, e.status, e.seq, e.attempt,
                e.input_tokens, e.output_tokens, e.usage_estimated, e.reserved_micro_usd,
                e.cost_micro_usd, e.charged_micro_usd, e.error, e.incomplete_reason,
                e.job_created_at, e.started_at, e.finished_at, e.occurred_at,
                j.request, j.output_text
           FROM tollgate.event_outbox e
           LEFT JOIN tollgate.jobs j
                  ON $2 AND j.id = e.job_id
                 AND e.status IN ('completed', 'failed', 'cancelled', 'incomplete')
          ORDER BY e.id LIMIT $1",
    )
    .bind(EVENT_BATCH)
    .bind(include_content)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let events: Vec<JobEvent> = rows.into_iter().map(JobEvent::from).collect();
    let confirmed = publisher.publish_events(&events).await?;
    let mut sent = Vec::with_capacity(ids.len());
    let mut unsent = Vec::new();
    for (id, ok) in ids.iter().zip(&confirmed) {
        if *ok { &mut sent } else { &mut unsent }.push(*id);
    }
    sqlx::query(
        "WITH gone AS (DELETE FROM tollgate.event_outbox WHERE id = ANY($1))
         UPDATE tollgate.event_outbox SET publish_attempts = publish_attempts + 1
          WHERE id = ANY($2)",
    )
    .bind(&sent)
    .bind(&unsent)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for (event, ok) in events.iter().zip(&confirmed) {
        if *ok {
            metrics::counter!(metrics::EVENTS_PUBLISHED, "type" => event.kind.clone()).increment(1);
        }
    }
    if sent.len() < ids.len() {
        anyhow::bail!(
            "RabbitMQ did not confirm {} of {} events; they stay in the outbox",
            ids.len() - sent.len(),
            ids.len()
        );
    }
    Ok(sent.len())
}

/// Runs the event relay until `shutdown` is cancelled: every process runs one, and one at a time
/// publishes. It goes on at once while batches come full, else waits `interval`.
pub async fn run_event_relay(
    pool: PgPool,
    publisher: Arc<Publisher>,
    interval: Duration,
    include_content: bool,
    shutdown: CancellationToken,
) {
    loop {
        let wait = match relay_events_once(&pool, &publisher, include_content).await {
            Ok(n) if n as i64 == EVENT_BATCH => Duration::ZERO,
            Ok(_) => interval,
            Err(e) => {
                tracing::warn!(error = %e, "event relay could not publish; will retry");
                interval
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_a_pass_gave_back_stay_first_in_line_and_the_list_stays_bounded() {
        let handed = HandedBack::default();
        handed.push(1);
        handed.push(2);
        let taken = handed.take();
        assert_eq!(taken, [1, 2]);
        handed.push(3);
        handed.restore(taken);
        assert_eq!(handed.take(), [1, 2, 3]);
        assert!(handed.take().is_empty());

        for id in 0..HANDED_BACK_MAX as i64 + 5 {
            handed.push(id);
        }
        let taken = handed.take();
        assert_eq!(taken.len(), HANDED_BACK_MAX);
        handed.push(-1);
        handed.restore(taken);
        let all = handed.take();
        assert_eq!(all.len(), HANDED_BACK_MAX);
        assert_eq!(all[0], 0, "what was taken first comes first");
    }
}
