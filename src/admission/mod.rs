//! Admission: the one place that decides whether a request becomes a job.
//!
//! Before PostgreSQL is asked: authenticate the key, validate the body, resolve the model, check
//! the allow-list, estimate the input tokens and run the guardrails (a webhook may take a while; no
//! lock is held meanwhile). Then the request joins the next batch (`batches.rs`): ONE statement
//! on an autocommit connection decides every request of the batch in one transaction,
//! `tollgate.admit_many` (migration `20261201000003_admit_many_and_finish_by_key.sql`), which
//! locks the batch's keys and calls, for each request in order, `tollgate.admit(…)`, a PL/pgSQL function (migration
//! `20261130000001_admit_in_one_statement.sql`) that
//!
//! 1. locks the key's counter row (`FOR UPDATE`), re-checking that the key is live — this
//!    serialises every admission of the key, and each later statement of the function takes a
//!    fresh snapshot, so it sees every admission committed before it;
//! 2. with an `Idempotency-Key`, looks it up: a hit returns the first job (or a mismatch) and
//!    changes nothing;
//! 3. counts the request and its estimated tokens in the key's one-minute window (keys with
//!    rpm/tpm limits) and in the model's shared window (models with limits; the upsert locks that
//!    row), rolls the budget period over when it has ended, and checks the windows, the in-flight
//!    slots and the budget;
//! 4. takes the in-flight slot and the worst-case budget reservation, and inserts the job
//!    (`queued`) and its outbox row.
//!
//! Step 3 runs in a block whose exception handler catches the function's own rejection
//! (`SQLSTATE TGREJ`): a rejection undoes every count of the block, and the function returns the
//! outcome with the figures it saw, so a rejected request leaves nothing behind. It is then
//! counted in `tollgate.rejections` and in the metrics. Nothing after this point (the worker, a
//! redelivery) runs admission again. What admission takes is given back by triggers when the job
//! reaches a terminal state or is deleted: the ledger's whole story, rows, triggers and lock
//! order, is in [`crate::store::ledger`].

mod batches;
pub mod guardrails;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    config::{Config, ModelConfig},
    ids::{JobId, JobStatus, KeyId},
    metrics,
    money::MicroUsd,
    queue::JobMessage,
    request::{self, CreateResponse, InputItem, InvalidRequest},
    store::{jobs, key_cache::KeyCache},
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
    keys: KeyCache,
    batches: batches::Batches,
}

/// Admission of one request, with its parameters in order: key id, estimated input tokens,
/// reservation (micro-USD), model, the model's rpm and tpm limits (or NULL), Idempotency-Key,
/// request hash, job id, request (jsonb), history (jsonb), previous response id, outbox payload
/// (jsonb). `tollgate.admit_many` calls this function for each request of a batch; the
/// benchmark's pgbench ceiling runs this text, one request a transaction.
pub const ADMIT_SQL: &str =
    "SELECT * FROM tollgate.admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// What `tollgate.admit` answers (see its migration): the outcome, the key's window for the
/// headers, and what a rejection tripped.
#[derive(Debug, sqlx::FromRow)]
struct Admit {
    outcome: String,
    job_id: Option<Uuid>,
    outbox_id: Option<i64>,
    created_at: Option<DateTime<Utc>>,
    rpm_limit: Option<i32>,
    tpm_limit: Option<i32>,
    window_requests: Option<i32>,
    window_tokens: Option<i64>,
    window_start: Option<DateTime<Utc>>,
    limit_value: Option<i64>,
    reject_window_start: Option<DateTime<Utc>>,
    budget_left: Option<i64>,
}

/// Seconds until the one-minute window that started at `window_start` ends (at least 1).
fn reset_secs(window_start: DateTime<Utc>) -> u64 {
    let end = window_start + chrono::Duration::seconds(60);
    ((end - Utc::now()).num_milliseconds().max(0) as u64)
        .div_ceil(1000)
        .max(1)
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
        let keys = KeyCache::new(Duration::from_millis(config.server.key_cache_ms));
        let batches = batches::Batches::new(
            pool.clone(),
            config.server.admissions_per_key,
            config.server.admission_batch,
        );
        Ok(Self {
            pool,
            config,
            guardrails,
            keys,
            batches,
        })
    }

    /// The front's cache of key look-ups, which admission and the other routes share.
    pub fn keys(&self) -> &KeyCache {
        &self.keys
    }

    /// Decides on a request and, if it is admitted, commits its job and outbox row.
    #[tracing::instrument(skip_all, fields(key_id = tracing::field::Empty))]
    pub async fn admit(&self, submission: Submission<'_>) -> Decision {
        let mut rates = RateReport::default();
        let mut key_id = None;
        let started = std::time::Instant::now();
        let result = self.decide(submission, &mut rates, &mut key_id).await;
        let outcome = match &result {
            Ok(Admitted::New { job, .. }) => {
                metrics::counter!(metrics::ADMITTED, "model" => job.model.clone()).increment(1);
                Some("admitted")
            }
            Ok(Admitted::Replayed(_)) | Err(Rejection::Database(_)) => None,
            Err(_) => Some("rejected"),
        };
        if let Some(outcome) = outcome {
            metrics::histogram!(metrics::ADMISSION_SECONDS, "outcome" => outcome)
                .record(started.elapsed());
        }
        if let Err(rejection) = &result {
            if !matches!(rejection, Rejection::Database(_)) {
                self.count_rejection(key_id, rejection).await;
            }
        }
        Decision { result, rates }
    }

    async fn decide(
        &self,
        submission: Submission<'_>,
        rates: &mut RateReport,
        key_id: &mut Option<KeyId>,
    ) -> Result<Admitted, Rejection> {
        let key = self
            .keys
            .find_live(&self.pool, submission.secret)
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
        let raw = Arc::new(raw);
        let reserve = reservation(model, estimate, &request);

        let history_json = (!history.is_empty())
            .then(|| Value::Array(history.iter().map(InputItem::to_value).collect()));
        let id = JobId::new();
        let message = JobMessage::new(id, &model.name);
        let outbox_payload = serde_json::to_value(&message).expect("a job message serialises");
        let tokens = estimate.tokens as i64;
        let decided = self
            .batches
            .admit(batches::Request {
                key: key.id,
                tokens,
                reserve: reserve.0,
                model: model.name.clone(),
                model_rpm: model.rpm_limit.map(i64::from),
                model_tpm: model.tpm_limit.map(|t| t as i64),
                idempotency_key: submission.idempotency_key.map(str::to_owned),
                request_hash: request_hash.to_vec(),
                job_id: id.0,
                request: raw.clone(),
                history: history_json,
                previous_response_id: previous.map(|p| p.0),
                outbox_payload,
            })
            .await?;
        if let Some(window_start) = decided.window_start {
            let reset_secs = reset_secs(window_start);
            let requests = decided.window_requests.unwrap_or(0) as i64;
            let tokens = decided.window_tokens.unwrap_or(0);
            rates.requests = decided.rpm_limit.map(|limit| Quota {
                limit: limit as i64,
                remaining: (limit as i64 - requests).max(0),
                reset_secs,
            });
            rates.tokens = decided.tpm_limit.map(|limit| Quota {
                limit: limit as i64,
                remaining: (limit as i64 - tokens).max(0),
                reset_secs,
            });
        }
        let limit = decided.limit_value.unwrap_or(0);
        let retry_after_secs = || decided.reject_window_start.map_or(1, reset_secs);
        match decided.outcome.as_str() {
            "admitted" => {}
            "replayed" => {
                let existing = decided.job_id.ok_or(Rejection::IdempotencyMismatch)?;
                let job = jobs::get_for_key(&self.pool, JobId(existing), key.id)
                    .await?
                    .ok_or(Rejection::IdempotencyMismatch)?; // deleted between the two reads
                return Ok(Admitted::Replayed(job));
            }
            "idempotency_mismatch" => return Err(Rejection::IdempotencyMismatch),
            "invalid_key" => return Err(Rejection::InvalidKey),
            outcome @ ("key_rpm" | "model_rpm") => {
                return Err(Rejection::RequestsPerMinute {
                    scope: scope_of(outcome),
                    limit,
                    retry_after_secs: retry_after_secs(),
                })
            }
            outcome @ ("key_tpm" | "model_tpm") => {
                return Err(Rejection::TokensPerMinute {
                    scope: scope_of(outcome),
                    limit,
                    needed: tokens,
                    retry_after_secs: retry_after_secs(),
                })
            }
            "in_flight" => {
                return Err(Rejection::InFlight {
                    limit: limit as i32,
                })
            }
            "budget" => {
                return Err(Rejection::Budget {
                    needed: reserve.as_usd_string(),
                    left: MicroUsd(decided.budget_left.unwrap_or(0).max(0)).as_usd_string(),
                })
            }
            other => {
                return Err(Rejection::Database(sqlx::Error::Protocol(format!(
                    "tollgate.admit answered an unknown outcome {other:?}"
                ))))
            }
        }
        let (Some(outbox_id), Some(created_at)) = (decided.outbox_id, decided.created_at) else {
            return Err(Rejection::Database(sqlx::Error::Protocol(
                "tollgate.admit admitted a job without its outbox row".into(),
            )));
        };
        tracing::info!(job_id = %id, key_id = %key.id, model = %model.name, "admitted");
        Ok(Admitted::New {
            // The batch has dropped its share by now; a copy only if it has not.
            job: queued_row(
                id,
                key.id,
                &model.name,
                Arc::try_unwrap(raw).unwrap_or_else(|shared| (*shared).clone()),
                created_at,
                previous,
            ),
            outbox_id,
            message,
        })
    }

    /// Counts a rejection by minute, key and reason, outside the (rolled back) transaction.
    async fn count_rejection(&self, key_id: Option<KeyId>, rejection: &Rejection) {
        let reason = rejection.reason();
        metrics::counter!(metrics::REJECTED, "reason" => reason.clone()).increment(1);
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

/// The scope of a window outcome of `tollgate.admit` (`key_rpm`, `model_tpm`, …).
fn scope_of(outcome: &str) -> Scope {
    if outcome.starts_with("model") {
        Scope::Model
    } else {
        Scope::Key
    }
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
