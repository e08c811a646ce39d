//! Webhook endpoints and the record of their deliveries (migration
//! `20261201000005_webhooks.sql`). The delivering itself is `webhooks/`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// An endpoint as stored.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Endpoint {
    pub id: Uuid,
    pub key_id: Uuid,
    pub url: String,
    /// `None`: every type.
    pub event_types: Option<Vec<String>>,
    #[serde(skip)]
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

/// Adds an endpoint, or, when the key has a live one at this URL, gives it these types and this
/// secret. Returns its id.
pub async fn upsert(
    pool: &PgPool,
    key_id: Uuid,
    url: &str,
    event_types: Option<&[String]>,
    secret: &str,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO tollgate.webhook_endpoints (id, key_id, url, event_types, secret)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (key_id, url) WHERE disabled_at IS NULL
         DO UPDATE SET event_types = EXCLUDED.event_types, secret = EXCLUDED.secret
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(key_id)
    .bind(url)
    .bind(event_types)
    .bind(secret)
    .fetch_one(pool)
    .await
}

/// Every live endpoint (what workers keep in memory).
pub async fn live(pool: &PgPool) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM tollgate.webhook_endpoints WHERE disabled_at IS NULL")
        .fetch_all(pool)
        .await
}

/// Every endpoint, live or disabled, oldest first (for listings).
pub async fn list(pool: &PgPool) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM tollgate.webhook_endpoints ORDER BY created_at, id")
        .fetch_all(pool)
        .await
}

/// One endpoint, live or disabled.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM tollgate.webhook_endpoints WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Disables a live endpoint: it receives nothing more; its deliveries stay on record. Returns
/// whether one was disabled.
pub async fn disable(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE tollgate.webhook_endpoints SET disabled_at = now()
          WHERE id = $1 AND disabled_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One attempt to deliver one event to one endpoint, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub endpoint_id: Uuid,
    pub event_id: String,
    pub event_type: String,
    pub job_id: Uuid,
    pub attempt: i32,
    pub outcome: &'static str,
    pub status_code: Option<i32>,
    pub latency_ms: Option<i32>,
    pub error: Option<String>,
    pub replay: bool,
    pub payload: String,
}

/// Records an attempt; returns its id.
pub async fn record(pool: &PgPool, attempt: &Attempt) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO tollgate.webhook_deliveries
             (endpoint_id, event_id, event_type, job_id, attempt, outcome, status_code,
              latency_ms, error, replay, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING id",
    )
    .bind(attempt.endpoint_id)
    .bind(&attempt.event_id)
    .bind(&attempt.event_type)
    .bind(attempt.job_id)
    .bind(attempt.attempt)
    .bind(attempt.outcome)
    .bind(attempt.status_code)
    .bind(attempt.latency_ms)
    .bind(&attempt.error)
    .bind(attempt.replay)
    .bind(&attempt.payload)
    .fetch_one(pool)
    .await
}

/// A recorded delivery, to replay: its endpoint (live or not), what was sent, and the next
/// attempt's number for this event at this endpoint.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recorded {
    pub endpoint_id: Uuid,
    pub url: String,
    pub secret: String,
    pub disabled: bool,
    pub event_id: String,
    pub event_type: String,
    pub job_id: Uuid,
    pub payload: String,
    pub next_attempt: i32,
}

/// The delivery `id`, to replay, or `None` if there is no such delivery.
pub async fn recorded(pool: &PgPool, id: i64) -> Result<Option<Recorded>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.endpoint_id, e.url, e.secret, e.disabled_at IS NOT NULL AS disabled,
                d.event_id, d.event_type, d.job_id, d.payload,
                (SELECT max(attempt) + 1 FROM tollgate.webhook_deliveries o
                  WHERE o.event_id = d.event_id AND o.endpoint_id = d.endpoint_id) AS next_attempt
           FROM tollgate.webhook_deliveries d
           JOIN tollgate.webhook_endpoints e ON e.id = d.endpoint_id
          WHERE d.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}
