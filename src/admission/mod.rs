//! Admission: the one place that decides whether a request becomes a job.
//!
//! Before any transaction: authenticate the key, validate the body, resolve the model, check the
//! allow-list, estimate the input tokens and run the guardrails (a webhook may take a while; no
//! lock is held meanwhile). Then ONE PostgreSQL transaction, five round trips when no limit trips:
//!
//! 1. `BEGIN`
//! 2. lock the key's counter row (`FOR UPDATE`) — this serialises every admission of the key, so
//!    each check below sees every admission committed before it (with an `Idempotency-Key`, one
//!    more statement looks it up; a hit returns the first job and changes nothing);
//! 3. count the request and its estimated tokens in the key's one-minute window (only for keys
//!    with rpm/tpm limits) and check them;
//! 4. take the in-flight slot and the worst-case budget reservation, insert the job (`queued`) and
//!    its outbox row, in one statement;
//! 5. `COMMIT`.
//!
//! A model with its own rpm/tpm limits adds one statement (its shared window row, locked until
//! commit); a budget whose period rolled over adds one. Any rejection rolls the transaction back,
//! so a rejected request leaves nothing behind; it is then counted in `tollgate.rejections` and in
//! the metrics. Nothing after this point (the worker, a redelivery) runs admission again.

pub mod guardrails;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    config::{Config, ModelConfig},
    ids::{JobId, JobStatus, KeyId},
    metrics,
    money::MicroUsd,
    queue::JobMessage,
    request::{self, CreateResponse, InputItem, InvalidRequest},
    store::{jobs, keys},
    tokens,
};

pub use guardrails::{Blocked, Guardrails};

/// Why admission refused a request.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("invalid API key")]
    InvalidKey,
    #[error("{}", .0.message)]
    InvalidRequest(InvalidRequest),
    #[error("no previous response `{0}` for this key")]
    PreviousResponseNotFound(String),
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("this key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("`max_output_tokens` {asked} is above the model's limit of {cap}")]
    OutputCapExceeded { asked: u32, cap: u32 },
    #[error("request blocked by guardrail `{}`: {}", .0.guardrail, .0.reason)]
    Guardrail(Blocked),
    #[error("the Idempotency-Key was already used with a different request body")]
    IdempotencyMismatch,
    #[error("{scope} rate limit reached: {limit} requests per minute")]
    RequestsPerMinute {
        scope: Scope,
        limit: i64,
        retry_after_secs: u64,
    },
    #[error(
        "{scope} rate limit reached: {limit} tokens per minute (this request counts {needed})"
    )]
    TokensPerMinute {
        scope: Scope,
        limit: i64,
        needed: i64,
        retry_after_secs: u64,
    },
    #[error("too many jobs in flight: the limit is {limit}")]
    InFlight { limit: i32 },
    #[error("budget exhausted: this request may cost up to {needed} USD and {left} USD are left")]
    Budget { needed: String, left: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Whose limit tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Model,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Key => "key",
            Scope::Model => "model",
        })
    }
}

impl Rejection {
    /// The reason as counted in `tollgate.rejections` and the metrics.
    pub fn reason(&self) -> String {
        match self {
            Rejection::InvalidKey => "invalid_key".into(),
            Rejection::InvalidRequest(_) => "invalid_request".into(),
            Rejection::PreviousResponseNotFound(_) => "previous_response_not_found".into(),
            Rejection::UnknownModel(_) => "unknown_model".into(),
            Rejection::ModelNotAllowed(_) => "model_not_allowed".into(),
            Rejection::OutputCapExceeded { .. } => "output_cap".into(),
            Rejection::Guardrail(b) => format!("guardrail:{}", b.guardrail),
            Rejection::IdempotencyMismatch => "idempotency_mismatch".into(),
            Rejection::RequestsPerMinute { scope, .. } => format!("{scope}_rpm"),
            Rejection::TokensPerMinute { scope, .. } => format!("{scope}_tpm"),
            Rejection::InFlight { .. } => "in_flight".into(),
            Rejection::Budget { .. } => "budget".into(),
            Rejection::Database(_) => "internal".into(),
        }
    }
}

/// The outcome of an accepted request.
#[derive(Debug)]
pub enum Admitted {
    /// A new job, committed; its message must now be published.
    New {
        job: jobs::JobRow,
        outbox_id: i64,
        message: JobMessage,
    },
    /// The Idempotency-Key named an existing job with the same body: that job, nothing changed.
    Replayed(jobs::JobRow),
}

/// One limit's state for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: i64,
    pub remaining: i64,
    /// Seconds until the window starts again.
    pub reset_secs: u64,
}

/// The key's requests and tokens windows, as the `x-ratelimit-*` headers report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateReport {
    pub requests: Option<Quota>,
    pub tokens: Option<Quota>,
}

/// A decision, with what the headers should say about the key's windows.
#[derive(Debug)]
pub struct Decision {
    pub result: Result<Admitted, Rejection>,
    pub rates: RateReport,
}

/// A request as the front hands it to admission.
pub struct Submission<'a> {
    pub secret: &'a str,
    pub body: Result<(CreateResponse, Value), InvalidRequest>,
    pub idempotency_key: Option<&'a str>,
}

/// Admission's dependencies.
pub struct Admission {
    pool: PgPool,
    config: Arc<Config>,
    guardrails: Guardrails,
}

/// The key's row and live counters, locked for the admission transaction.
#[derive(Debug, sqlx::FromRow)]
struct LockedKey {
    #[sqlx(flatten)]
    key: keys::ApiKey,
    in_flight: i32,
    reserved_micro_usd: i64,
    spent_micro_usd: i64,
    period_start: Option<DateTime<Utc>>,
    current_period: Option<DateTime<Utc>>,
}

/// A request and its tokens counted in a one-minute window.
#[derive(Debug, sqlx::FromRow)]
struct Window {
    requests: i32,
    tokens: i64,
    window_start: DateTime<Utc>,
}

impl Window {
    fn reset_secs(&self) -> u64 {
        let end = self.window_start + chrono::Duration::seconds(60);
        ((end - Utc::now()).num_milliseconds().max(0) as u64)
            .div_ceil(1000)
            .max(1)
    }
}

/// The worst-case cost admission reserves for a request without history: the input's upper
/// bound and the output cap, at the model's prices.
pub fn worst_case_cost(model: &ModelConfig, request: &CreateResponse) -> MicroUsd {
    let messages = request.call_request(model, &[]).as_messages();
    let input = tokens::estimate(tokens::tokenizer_for(model), &messages);
    reservation(model, input, request)
}

/// A rejection of `previous_response_id` that is the client's mistake (400).
fn previous_refused(message: String, code: &'static str) -> Rejection {
    Rejection::InvalidRequest(InvalidRequest {
        message,
        param: Some("previous_response_id".into()),
        code: Some(code),
    })
}

/// The conversation `previous` stands for, as the key `key_id` may continue it: that response's
/// own history, its input and its output. Only the key's own finished, stored responses can be
/// continued; any other id is not found. (Its `instructions` are not carried over, as with
/// OpenAI.)
async fn history_of(
    pool: &PgPool,
    key_id: KeyId,
    previous: &str,
) -> Result<(JobId, Vec<InputItem>), Rejection> {
    let not_found = || Rejection::PreviousResponseNotFound(previous.to_string());
    let id = JobId::parse_public(previous).ok_or_else(not_found)?;
    let job = jobs::get_for_key(pool, id, key_id)
        .await?
        .ok_or_else(not_found)?;
    let shown = request::echo(previous);
    if job.request.0.get("store") == Some(&Value::Bool(false)) {
        return Err(previous_refused(
            format!(
                "Previous response '{shown}' was created with `store: false` and cannot be \
                 continued; send the conversation in `input` instead."
            ),
            "previous_response_not_stored",
        ));
    }
    if !job.status.is_terminal() {
        return Err(previous_refused(
            format!(
                "Previous response '{shown}' is still in progress; wait until it has finished."
            ),
            "previous_response_in_progress",
        ));
    }
    let unreadable = |e: InvalidRequest| {
        Rejection::Database(sqlx::Error::Decode(
            format!("stored conversation of {id} unreadable: {}", e.message).into(),
        ))
    };
    let mut items =
        request::stored_history(job.history.as_ref().map(|h| &h.0)).map_err(unreadable)?;
    items.extend(request::stored_input(&job.request.0).map_err(unreadable)?);
    let output = jobs::output(pool, &job).await?;
    items.extend(output.items.into_iter().map(|i| InputItem::from(i.item)));
    Ok((id, items))
}

/// The worst-case cost of an input already estimated: its upper bound, and the output cap that
/// the worker will send upstream ([`CreateResponse::output_cap`]).
fn reservation(model: &ModelConfig, input: tokens::Estimate, request: &CreateResponse) -> MicroUsd {
    model.cost(input.upper_bound as u64, request.output_cap(model) as u64)
}

impl Admission {
    pub fn new(pool: PgPool, config: Arc<Config>) -> Result<Self, regex::Error> {
        let guardrails = Guardrails::new(&config.guardrails)?;
        Ok(Self {
            pool,
            config,
            guardrails,
        })
    }

    /// Decides on a request and, if it is admitted, commits its job and outbox row.
    #[tracing::instrument(skip_all, fields(key_id = tracing::field::Empty))]
    pub async fn admit(&self, submission: Submission<'_>) -> Decision {
        let mut rates = RateReport::default();
        let mut key_id = None;
        let result = self.decide(submission, &mut rates, &mut key_id).await;
        match &result {
            Ok(Admitted::New { job, .. }) => {
                metrics::increment("tollgate_admitted_total", "model", &job.model);
            }
            Ok(Admitted::Replayed(_)) | Err(Rejection::Database(_)) => {}
            Err(rejection) => self.count_rejection(key_id, rejection).await,
        }
        Decision { result, rates }
    }

    async fn decide(
        &self,
        submission: Submission<'_>,
        rates: &mut RateReport,
        key_id: &mut Option<KeyId>,
    ) -> Result<Admitted, Rejection> {
        let key = keys::find_live(&self.pool, submission.secret)
            .await?
            .ok_or(Rejection::InvalidKey)?;
        *key_id = Some(key.id);
        tracing::Span::current().record("key_id", tracing::field::display(key.id));

        let (request, raw) = submission.body.map_err(Rejection::InvalidRequest)?;
        let model = self
            .config
            .model(&request.model)
            .ok_or_else(|| Rejection::UnknownModel(request.model.clone()))?;
        if !key.allows_model(&model.name) {
            return Err(Rejection::ModelNotAllowed(model.name.clone()));
        }
        let (previous, history) = match &request.previous_response_id {
            Some(previous) => {
                let (id, history) = history_of(&self.pool, key.id, previous).await?;
                (Some(id), history)
            }
            None => (None, Vec::new()),
        };
        request
            .check_for(model, &history, self.config.server.max_input_items)
            .map_err(Rejection::InvalidRequest)?;
        if let Some(asked) = request.max_output_tokens {
            if asked > model.max_output_tokens {
                return Err(Rejection::OutputCapExceeded {
                    asked,
                    cap: model.max_output_tokens,
                });
            }
        }
        // The whole conversation is sent upstream, so the whole of it is counted and reserved.
        let messages = request.call_request(model, &history).as_messages();
        let estimate = tokens::estimate(tokens::tokenizer_for(model), &messages);
        self.guardrails
            .check(&model.name, &messages)
            .await
            .map_err(Rejection::Guardrail)?;
        let request_hash = Sha256::digest(serde_json::to_vec(&raw).expect("JSON serialises"));
        let reserve = reservation(model, estimate, &request);

        let mut tx = self.pool.begin().await?;
        let locked = lock_key(&mut tx, key.id).await?;
        let locked = locked.ok_or(Rejection::InvalidKey)?; // revoked or expired meanwhile
        if let Some(idempotency_key) = submission.idempotency_key {
            // A statement of its own, after the lock: in READ COMMITTED it sees every job
            // committed by the admissions that held the lock before us (a join in the locking
            // statement would read the other table from before the wait).
            let first: Option<(Uuid, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT id, request_hash FROM tollgate.jobs WHERE key_id = $1 AND idempotency_key = $2",
            )
            .bind(key.id)
            .bind(idempotency_key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((existing, hash)) = first {
                if hash.as_deref() != Some(&request_hash[..]) {
                    return Err(Rejection::IdempotencyMismatch);
                }
                drop(tx);
                let job = jobs::get_for_key(&self.pool, JobId(existing), key.id)
                    .await?
                    .ok_or(Rejection::IdempotencyMismatch)?; // deleted between the two reads
                return Ok(Admitted::Replayed(job));
            }
        }

        let tokens = estimate.tokens as i64;
        let key = &locked.key;
        if key.rpm_limit.is_some() || key.tpm_limit.is_some() {
            let window = count_in_key_window(&mut tx, key.id, tokens).await?;
            let reset_secs = window.reset_secs();
            rates.requests = key.rpm_limit.map(|limit| Quota {
                limit: limit as i64,
                remaining: (limit as i64 - window.requests as i64).max(0),
                reset_secs,
            });
            rates.tokens = key.tpm_limit.map(|limit| Quota {
                limit: limit as i64,
                remaining: (limit as i64 - window.tokens).max(0),
                reset_secs,
            });
            check_window(
                &window,
                Scope::Key,
                key.rpm_limit.map(i64::from),
                key.tpm_limit.map(i64::from),
                tokens,
            )?;
        }
        if model.rpm_limit.is_some() || model.tpm_limit.is_some() {
            let window = count_in_model_window(&mut tx, &model.name, tokens).await?;
            check_window(
                &window,
                Scope::Model,
                model.rpm_limit.map(i64::from),
                model.tpm_limit.map(|t| t as i64),
                tokens,
            )?;
        }
        if let Some(limit) = key.max_in_flight {
            if locked.in_flight >= limit {
                return Err(Rejection::InFlight { limit });
            }
        }
        if let Some(budget) = key.budget_micro_usd {
            let mut spent = locked.spent_micro_usd;
            if locked.current_period.is_some() && locked.current_period != locked.period_start {
                start_budget_period(&mut tx, key.id, locked.current_period).await?;
                spent = 0;
            }
            let left = budget - spent - locked.reserved_micro_usd;
            if reserve.0 > left {
                return Err(Rejection::Budget {
                    needed: reserve.as_usd_string(),
                    left: MicroUsd(left.max(0)).as_usd_string(),
                });
            }
        }

        let history_json = (!history.is_empty())
            .then(|| Value::Array(history.iter().map(InputItem::to_value).collect()));
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
                request_hash: &request_hash,
                idempotency_key: submission.idempotency_key,
                estimated_input_tokens: estimate.tokens as i32,
                reserved: reserve,
                counter_slot: 0,
                outbox_payload: &outbox_payload,
                history: history_json.as_ref(),
                previous_response_id: previous,
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(job_id = %id, key_id = %key.id, model = %model.name, "admitted");
        Ok(Admitted::New {
            job: queued_row(id, key.id, &model.name, raw, created_at, previous),
            outbox_id,
            message,
        })
    }

    /// Counts a rejection by minute, key and reason, outside the (rolled back) transaction.
    async fn count_rejection(&self, key_id: Option<KeyId>, rejection: &Rejection) {
        let reason = rejection.reason();
        metrics::increment("tollgate_rejected_total", "reason", &reason);
        let counted = sqlx::query(
            "INSERT INTO tollgate.rejections AS r (minute, key_id, reason, count)
             VALUES (date_trunc('minute', now()), $1, $2, 1)
             ON CONFLICT (minute, key_id, reason) DO UPDATE SET count = r.count + 1",
        )
        .bind(key_id.map_or(Uuid::nil(), |k| k.0))
        .bind(&reason)
        .execute(&self.pool)
        .await;
        if let Err(e) = counted {
            tracing::warn!(error = %e, %reason, "could not count a rejection");
        }
    }
}

/// Locks the key's counter row, if the key is still live.
async fn lock_key(tx: &mut PgConnection, key_id: KeyId) -> Result<Option<LockedKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT k.id, k.name, k.rpm_limit, k.tpm_limit, k.max_in_flight, k.budget_micro_usd,
                k.budget_period, k.allowed_models,
                c.in_flight, c.reserved_micro_usd, c.spent_micro_usd, c.period_start,
                CASE k.budget_period
                    WHEN 'daily' THEN date_trunc('day', now(), 'UTC')
                    WHEN 'monthly' THEN date_trunc('month', now(), 'UTC')
                END AS current_period
           FROM tollgate.key_counters c
           JOIN tollgate.api_keys k ON k.id = c.key_id
          WHERE c.key_id = $1 AND c.slot = 0 AND k.revoked_at IS NULL
            AND (k.expires_at IS NULL OR k.expires_at > now())
            FOR UPDATE OF c",
    )
    .bind(key_id)
    .fetch_optional(tx)
    .await
}

/// Counts the request and its tokens in the key's current window and returns the window's new
/// totals. Checked afterwards: a rejection rolls the count back with the transaction.
async fn count_in_key_window(
    tx: &mut PgConnection,
    key_id: KeyId,
    tokens: i64,
) -> Result<Window, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO tollgate.rate_windows AS w (key_id, slot, window_start, requests, tokens)
         VALUES ($1, 0, date_trunc('minute', now()), 1, $2)
         ON CONFLICT (key_id, slot, window_start)
         DO UPDATE SET requests = w.requests + 1, tokens = w.tokens + EXCLUDED.tokens
         RETURNING requests, tokens, window_start",
    )
    .bind(key_id)
    .bind(tokens)
    .fetch_one(tx)
    .await
}

/// The same for a model's window, shared by every key. The upsert locks the window row until
/// commit, so concurrent admissions of the model are exact too.
async fn count_in_model_window(
    tx: &mut PgConnection,
    model: &str,
    tokens: i64,
) -> Result<Window, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO tollgate.model_rate_windows AS w (model, window_start, requests, tokens)
         VALUES ($1, date_trunc('minute', now()), 1, $2)
         ON CONFLICT (model, window_start)
         DO UPDATE SET requests = w.requests + 1, tokens = w.tokens + EXCLUDED.tokens
         RETURNING requests, tokens, window_start",
    )
    .bind(model)
    .bind(tokens)
    .fetch_one(tx)
    .await
}

fn check_window(
    window: &Window,
    scope: Scope,
    rpm: Option<i64>,
    tpm: Option<i64>,
    tokens: i64,
) -> Result<(), Rejection> {
    let retry_after_secs = window.reset_secs();
    if let Some(limit) = rpm.filter(|limit| window.requests as i64 > *limit) {
        return Err(Rejection::RequestsPerMinute {
            scope,
            limit,
            retry_after_secs,
        });
    }
    if let Some(limit) = tpm.filter(|limit| window.tokens > *limit) {
        return Err(Rejection::TokensPerMinute {
            scope,
            limit,
            needed: tokens,
            retry_after_secs,
        });
    }
    Ok(())
}

/// Starts a new budget period on the key's (locked) counter row: spend counts from zero again.
async fn start_budget_period(
    tx: &mut PgConnection,
    key_id: KeyId,
    period: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE tollgate.key_counters SET spent_micro_usd = 0, period_start = $2
          WHERE key_id = $1 AND slot = 0",
    )
    .bind(key_id)
    .bind(period)
    .execute(tx)
    .await?;
    Ok(())
}

fn queued_row(
    id: JobId,
    key_id: KeyId,
    model: &str,
    request: Value,
    created_at: DateTime<Utc>,
    previous_response_id: Option<JobId>,
) -> jobs::JobRow {
    jobs::JobRow {
        id,
        key_id,
        model: model.into(),
        status: JobStatus::Queued,
        request: sqlx::types::Json(request),
        output_text: String::new(),
        input_tokens: None,
        output_tokens: None,
        reasoning_tokens: None,
        history: None,
        previous_response_id,
        cost_micro_usd: None,
        usage_estimated: None,
        incomplete_reason: None,
        error: None,
        attempt: 0,
        created_at,
        started_at: None,
        finished_at: None,
    }
}
