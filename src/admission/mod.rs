//! Admission: the one place that decides whether a request becomes a job.
//!
//! It runs inside ONE PostgreSQL transaction that also writes the job row and its outbox message:
//! lock the key's counter row, check the model, requests per minute, in-flight jobs and budget,
//! take what the job needs (a request in the minute's window, an in-flight slot, a worst-case
//! budget reservation), insert the job and the outbox row, commit. Any rejection rolls the whole
//! transaction back, so a rejected request leaves nothing behind. Nothing after this point (the
//! worker, a redelivery) runs admission again.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::{
    config::Config,
    ids::{JobId, KeyId},
    money::MicroUsd,
    queue::JobMessage,
    request::{CreateResponse, InvalidRequest},
    store::{jobs, keys},
    tokens,
};

/// Why admission refused a request.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("invalid API key")]
    InvalidKey,
    #[error("{}", .0.message)]
    InvalidRequest(InvalidRequest),
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("this key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("`max_output_tokens` {asked} is above the model's limit of {cap}")]
    OutputCapExceeded { asked: u32, cap: u32 },
    #[error("rate limit reached: {limit} requests per minute")]
    RequestsPerMinute { limit: i32, retry_after_secs: u64 },
    #[error("too many jobs in flight: the limit is {limit}")]
    InFlight { limit: i32 },
    #[error("budget exhausted: this request may cost up to {needed} USD and {left} USD are left")]
    Budget { needed: String, left: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// An admitted, committed job.
#[derive(Debug)]
pub struct Admitted {
    pub job: jobs::JobRow,
    pub outbox_id: i64,
    pub message: JobMessage,
}

/// The key's row and its live counters, locked for the admission transaction.
#[derive(Debug, sqlx::FromRow)]
struct LockedKey {
    #[sqlx(flatten)]
    key: keys::ApiKey,
    in_flight: i32,
    reserved_micro_usd: i64,
    spent_micro_usd: i64,
}

/// Runs admission for one request and, if it passes, commits the job and its outbox row.
#[tracing::instrument(skip_all, fields(key_id = tracing::field::Empty))]
pub async fn admit(
    pool: &PgPool,
    config: &Config,
    secret: &str,
    body: Result<(CreateResponse, Value), InvalidRequest>,
) -> Result<Admitted, Rejection> {
    let mut tx = pool.begin().await?;
    // The counter row lock serialises this key's admissions: every check below sees the effect
    // of every admission committed before it.
    let locked: Option<LockedKey> = sqlx::query_as(
        "SELECT k.id, k.name, k.rpm_limit, k.max_in_flight, k.budget_micro_usd, k.allowed_models,
                c.in_flight, c.reserved_micro_usd, c.spent_micro_usd
           FROM tollgate.api_keys k
           JOIN tollgate.key_counters c ON c.key_id = k.id AND c.slot = 0
          WHERE k.key_hash = $1 AND k.revoked_at IS NULL
            AND (k.expires_at IS NULL OR k.expires_at > now())
            FOR UPDATE OF c",
    )
    .bind(keys::hash_secret(secret))
    .fetch_optional(&mut *tx)
    .await?;
    let locked = locked.ok_or(Rejection::InvalidKey)?;
    let key = &locked.key;
    tracing::Span::current().record("key_id", tracing::field::display(key.id));

    let (request, raw) = body.map_err(Rejection::InvalidRequest)?;
    let model = config
        .model(&request.model)
        .ok_or_else(|| Rejection::UnknownModel(request.model.clone()))?;
    if !key.allows_model(&model.name) {
        return Err(Rejection::ModelNotAllowed(model.name.clone()));
    }
    let max_output = match request.max_output_tokens {
        Some(asked) if asked > model.max_output_tokens => {
            return Err(Rejection::OutputCapExceeded {
                asked,
                cap: model.max_output_tokens,
            })
        }
        Some(asked) => asked,
        None => model.max_output_tokens,
    };
    let input_estimate = tokens::estimate_messages(&request.messages());

    if let Some(limit) = key.rpm_limit {
        take_request_in_window(&mut tx, key.id, limit).await?;
    }
    if let Some(limit) = key.max_in_flight {
        if locked.in_flight >= limit {
            return Err(Rejection::InFlight { limit });
        }
    }
    let reserve = model.cost(input_estimate as u64, max_output as u64);
    if let Some(budget) = key.budget_micro_usd {
        let left = budget - locked.spent_micro_usd - locked.reserved_micro_usd;
        if reserve.0 > left {
            return Err(Rejection::Budget {
                needed: reserve.as_usd_string(),
                left: MicroUsd(left.max(0)).as_usd_string(),
            });
        }
    }
    sqlx::query(
        "UPDATE tollgate.key_counters
            SET in_flight = in_flight + 1, reserved_micro_usd = reserved_micro_usd + $2
          WHERE key_id = $1 AND slot = 0",
    )
    .bind(key.id)
    .bind(reserve.0)
    .execute(&mut *tx)
    .await?;

    let id = JobId::new();
    let message = JobMessage::new(id, &model.name);
    let outbox_payload = serde_json::to_value(&message).expect("a job message serialises");
    let (outbox_id, created_at) = jobs::insert_admitted(
        &mut tx,
        &jobs::NewJob {
            id,
            key_id: key.id,
            model: &model.name,
            request: &raw,
            estimated_input_tokens: input_estimate as i32,
            reserved: reserve,
            counter_slot: 0,
            outbox_payload: &outbox_payload,
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(job_id = %id, key_id = %key.id, model = %model.name, "admitted");
    Ok(Admitted {
        job: queued_row(id, key.id, &model.name, raw, created_at),
        outbox_id,
        message,
    })
}

/// Counts this request in the key's current one-minute window, or rejects it when the window is
/// full. Atomic on its own (`ON CONFLICT … WHERE`), and serialised by the counter lock.
async fn take_request_in_window(
    tx: &mut sqlx::PgConnection,
    key_id: KeyId,
    limit: i32,
) -> Result<(), Rejection> {
    let taken: Option<(i32, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO tollgate.rate_windows AS w (key_id, slot, window_start, requests)
         VALUES ($1, 0, date_trunc('minute', now()), 1)
         ON CONFLICT (key_id, slot, window_start)
         DO UPDATE SET requests = w.requests + 1 WHERE w.requests < $2
         RETURNING requests, window_start",
    )
    .bind(key_id)
    .bind(limit)
    .fetch_optional(&mut *tx)
    .await?;
    match taken {
        Some(_) => Ok(()),
        None => {
            let into_minute = Utc::now().timestamp().rem_euclid(60) as u64;
            Err(Rejection::RequestsPerMinute {
                limit,
                retry_after_secs: (60 - into_minute).max(1),
            })
        }
    }
}

fn queued_row(
    id: JobId,
    key_id: KeyId,
    model: &str,
    request: Value,
    created_at: DateTime<Utc>,
) -> jobs::JobRow {
    jobs::JobRow {
        id,
        key_id,
        model: model.into(),
        status: crate::ids::JobStatus::Queued,
        request: sqlx::types::Json(request),
        output_text: String::new(),
        input_tokens: None,
        output_tokens: None,
        cost_micro_usd: None,
        error: None,
        attempt: 0,
        created_at,
        started_at: None,
        finished_at: None,
    }
}
