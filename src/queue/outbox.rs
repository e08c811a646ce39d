//! The transactional outbox. The admission transaction writes an outbox row beside the job; the
//! front publishes right after its commit and marks the row sent. The relay publishes any row
//! left unsent (RabbitMQ was down, the front crashed between commit and publish), so every
//! committed job is published at least once. A second publish is harmless: the worker skips a job
//! that is not `queued`.

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use sqlx::{types::Json, PgPool};
use tokio_util::sync::CancellationToken;

use super::{JobMessage, Publisher};

/// Rows published per relay transaction.
const RELAY_BATCH: i64 = 100;

/// Marks an outbox row as published.
pub async fn mark_sent(pool: &PgPool, outbox_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE tollgate.outbox SET sent_at = now() WHERE id = $1 AND sent_at IS NULL")
        .bind(outbox_id)
        .execute(pool)
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
