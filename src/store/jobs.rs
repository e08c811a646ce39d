//! Jobs, their streamed output and their terminal transitions.
//!
//! Every change of state is a guarded transition (`… WHERE id = $1 AND status = … AND attempt = …`),
//! so a redelivered message or a stale worker cannot write twice. Reaching a terminal state
//! releases what admission took (the in-flight slot and the budget reservation) in the same
//! statement, so it happens exactly once, whichever path gets there (see [`super::ledger`]).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{types::Json, PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    ids::{JobId, JobStatus, KeyId},
    money::MicroUsd,
    output::{Output, Piece},
};

/// A job as clients and operators see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: JobId,
    pub key_id: KeyId,
    pub model: String,
    pub status: JobStatus,
    pub request: Json<Value>,
    /// The text of the job's messages (function calls are in its events).
    pub output_text: String,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    /// The part of `output_tokens` spent on reasoning, as the upstream reported it.
    pub reasoning_tokens: Option<i32>,
    /// The conversation before the input (see `previous_response_id`).
    pub history: Option<Json<Value>>,
    pub previous_response_id: Option<JobId>,
    pub cost_micro_usd: Option<i64>,
    /// Whether the token counts are tollgate's estimate (see `billing`).
    pub usage_estimated: Option<bool>,
    /// Why an `incomplete` job was cut off (`max_output_tokens`, `content_filter`).
    pub incomplete_reason: Option<String>,
    pub error: Option<Json<Value>>,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const JOB_COLUMNS: &str = "id, key_id, model, status, request, output_text, input_tokens, \
    output_tokens, reasoning_tokens, history, previous_response_id, cost_micro_usd, usage_estimated, incomplete_reason, error, attempt, \
    created_at, started_at, finished_at";

/// The job `id` if it belongs to `key_id` (another key's job does not exist for it).
#[tracing::instrument(skip_all, fields(job_id = %id, key_id = %key_id))]
pub async fn get_for_key(
    pool: &PgPool,
    id: JobId,
    key_id: KeyId,
) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM tollgate.jobs WHERE id = $1 AND key_id = $2"
    ))
    .bind(id)
    .bind(key_id)
    .fetch_optional(pool)
    .await
}

/// What the worker may do with a delivered job.
#[derive(Debug)]
pub enum Claim {
    /// The worker now owns this attempt of the job.
    Claimed(Claimed),
    /// Another worker holds a live lease on it (or it went back to `queued` meanwhile, with a
    /// message of its own).
    Running,
    /// It already reached a terminal state: nothing to do.
    Finished(JobStatus),
    /// No such job.
    Missing,
}

/// A job a worker has just claimed.
#[derive(Debug, sqlx::FromRow)]
pub struct Claimed {
    id: JobId,
    pub attempt: i32,
    /// Attempts the job has really used: `attempt` less the graceful hand-backs.
    pub tries: i32,
    pub model: String,
    pub request: Json<Value>,
    pub history: Option<Json<Value>>,
    /// Input tokens as admission counted them (what an estimated charge uses).
    pub estimated_input_tokens: i32,
    /// What the previous attempt generated, when its worker died before charging it (empty
    /// otherwise): the new owner charges it with [`add_cost`].
    #[sqlx(skip)]
    pub abandoned_output: String,
    /// That attempt, when there is one to charge.
    abandoned_attempt: Option<i32>,
    /// For a first attempt, how long the job waited from its admission to this claim.
    pub queued_seconds: Option<f64>,
    /// Whether this claim took the job over from an attempt whose lease lapsed.
    pub taken_over: bool,
}

/// Claims a job for a new attempt: `queued → in_progress`, or takes over an `in_progress` job
/// whose lease expired (its worker is gone). The output of an earlier attempt is cleared; if that
/// attempt was never charged (its worker died), its output is handed to the caller to charge, and
/// the attempt counts as settled.
pub async fn claim(pool: &PgPool, id: JobId, lease_seconds: u32) -> Result<Claim, sqlx::Error> {
    let mut claims = claim_many(pool, &[id], lease_seconds).await?;
    claims.pop().expect("one claim a job")
}

/// [`claim`] for many jobs in one statement (the worker's group commit), one answer per id in
/// order. The rows are locked in the order of their ids, so two such statements cannot deadlock.
/// An id given twice is claimed once: its later copies find the job [`Claim::Running`]. A claimed
/// row that cannot be read is that id's own error.
pub async fn claim_many(
    pool: &PgPool,
    ids: &[JobId],
    lease_seconds: u32,
) -> Result<Vec<Result<Claim, sqlx::Error>>, sqlx::Error> {
    let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let rows = sqlx::query(
        "WITH old AS (
             SELECT id, attempt, settled_attempt, status
               FROM tollgate.jobs
              WHERE id = ANY($1) ORDER BY id FOR UPDATE
         )
         UPDATE tollgate.jobs j
            SET status = 'in_progress', attempt = j.attempt + 1, output_text = '',
                output_arguments = '',
                settled_attempt = j.attempt,
                started_at = coalesce(j.started_at, now()), updated_at = now(),
                lease_until = now() + make_interval(secs => $2)
           FROM old
          WHERE j.id = old.id
            AND (j.status = 'queued' OR (j.status = 'in_progress' AND j.lease_until < now()))
          RETURNING j.id, j.attempt, j.attempt - j.handbacks AS tries, j.model, j.request,
                    j.history, j.estimated_input_tokens,
                    CASE WHEN old.attempt > old.settled_attempt THEN old.attempt END
                        AS abandoned_attempt,
                    CASE WHEN j.attempt = 1
                         THEN extract(epoch FROM clock_timestamp() - j.created_at)::float8
                    END AS queued_seconds,
                    old.status = 'in_progress' AS taken_over",
    )
    .bind(&uuids)
    .bind(lease_seconds as f64)
    .fetch_all(pool)
    .await?;
    // Each row is read alone: a row this build cannot read fails its own job's claim (the
    // worker then fails that job), not the batch's.
    let mut claimed = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id = JobId(sqlx::Row::try_get(row, "id")?);
        claimed.insert(id, <Claimed as sqlx::FromRow<_>>::from_row(row));
    }
    for claim in claimed.values_mut().filter_map(|c| c.as_mut().ok()) {
        if let Some(abandoned) = claim.abandoned_attempt {
            // After the claim: every batch the dead attempt wrote is committed and visible, and
            // it can write no more (its attempt no longer owns the row).
            claim.abandoned_output = sqlx::query_scalar("SELECT tollgate.generated($1, $2, 'ta')")
                .bind(claim.id)
                .bind(abandoned)
                .fetch_one(pool)
                .await?;
        }
    }
    let claimed_ids: HashSet<JobId> = claimed.keys().copied().collect();
    let unclaimed: Vec<Uuid> = uuids
        .iter()
        .filter(|id| !claimed_ids.contains(&JobId(**id)))
        .copied()
        .collect();
    let statuses: HashMap<JobId, JobStatus> = if unclaimed.is_empty() {
        Default::default()
    } else {
        sqlx::query_as("SELECT id, status FROM tollgate.jobs WHERE id = ANY($1)")
            .bind(&unclaimed)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect()
    };
    Ok(ids
        .iter()
        .map(|id| match claimed.remove(id) {
            Some(claim) => claim.map(Claim::Claimed),
            // An earlier copy of the id in this batch claimed it.
            None if claimed_ids.contains(id) => Ok(Claim::Running),
            None => Ok(match statuses.get(id) {
                None => Claim::Missing,
                Some(JobStatus::Queued | JobStatus::InProgress) => Claim::Running,
                Some(terminal) => Claim::Finished(*terminal),
            }),
        })
        .collect())
}

/// One attempt's batch of pieces to append, numbered from `seq_first`.
#[derive(Debug)]
pub struct Append {
    pub id: JobId,
    pub attempt: i32,
    pub seq_first: i32,
    pub pieces: Vec<Piece>,
}

/// Appends the batches of many jobs in one statement (the worker's group commit): one event row
/// each. A batch is written only while its attempt still owns the job (`in_progress`, same
/// attempt): the job row is updated (`updated_at`) in the same statement, so its lock orders the
/// write against a cancel, delete or takeover of the job. The job's `output_text` and
/// `output_arguments` are assembled when the attempt ends, not here.
/// Returns the jobs whose batch was written; the others' attempts must stop. At most one batch
/// per job.
pub async fn append_many(pool: &PgPool, batches: &[Append]) -> Result<HashSet<JobId>, sqlx::Error> {
    let n = batches.len();
    let (mut ids, mut attempts, mut seqs) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut kinds, mut payloads) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for batch in batches {
        ids.push(batch.id.0);
        attempts.push(batch.attempt);
        seqs.push(batch.seq_first);
        kinds.push(batch.pieces.iter().map(Piece::kind).collect::<String>());
        payloads.push(Json(
            batch
                .pieces
                .iter()
                .map(Piece::payload)
                .collect::<Vec<String>>(),
        ));
    }
    let written: Vec<Uuid> = sqlx::query_scalar(
        "WITH batch AS (
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[], $4::text[], $5::jsonb[])
                 AS b(job_id, attempt, seq_first, kinds, payloads)
         ), job AS (
             UPDATE tollgate.jobs j
                SET updated_at = now()
               FROM batch b
              WHERE j.id = b.job_id AND j.attempt = b.attempt AND j.status = 'in_progress'
              RETURNING j.id, b.attempt, b.seq_first, b.kinds, b.payloads
         )
         INSERT INTO tollgate.job_events (job_id, attempt, seq_first, seq_last, deltas, kinds)
         SELECT id, attempt, seq_first, seq_first + length(kinds) - 1,
                ARRAY(SELECT p.delta FROM jsonb_array_elements_text(payloads)
                                     WITH ORDINALITY AS p(delta, n) ORDER BY p.n),
                kinds
           FROM job
         RETURNING job_id",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&seqs)
    .bind(&kinds)
    .bind(&payloads)
    .fetch_all(pool)
    .await?;
    Ok(written.into_iter().map(JobId).collect())
}

/// What an attempt used, as written on the job row (see `billing`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Spent {
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    /// The reasoning part of `output_tokens`, when the upstream reported it.
    pub reasoning_tokens: Option<i32>,
    pub usage_estimated: Option<bool>,
    /// The attempt's cost, added to the job's `cost_micro_usd` (the sum over its attempts).
    pub cost: MicroUsd,
}

/// How an attempt ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: JobStatus,
    pub spent: Spent,
    /// For `incomplete`: `max_output_tokens` or `content_filter`.
    pub incomplete_reason: Option<&'static str>,
    pub error: Option<Value>,
}

/// Moves this attempt of the job to its terminal state, adding the attempt's cost to the job's.
/// The `jobs_release_admission` trigger gives back, in the same statement, what admission took
/// (the in-flight slot, the budget reservation replaced by the charged cost, the TPM estimate
/// replaced by the real usage). Returns false (and changes nothing) when this attempt no longer
/// owns the job.
pub async fn finish(
    pool: &PgPool,
    id: JobId,
    attempt: i32,
    outcome: &Outcome,
) -> Result<bool, sqlx::Error> {
    let finished = finish_many(
        pool,
        &[Finish {
            id,
            attempt,
            outcome,
        }],
    )
    .await?;
    Ok(finished[0])
}

/// One attempt to end, as [`finish`] takes it.
#[derive(Debug)]
pub struct Finish<'a> {
    pub id: JobId,
    pub attempt: i32,
    pub outcome: &'a Outcome,
}

/// [`finish`] for many attempts in one statement (the worker's group commit),
/// `tollgate.finish_batch` (migrations `20261201000002_finish_in_batches.sql` and
/// `20261201000003_admit_many_and_finish_by_key.sql`), which takes its locks in the order every
/// other transaction takes them. One answer per attempt, in order.
pub async fn finish_many(pool: &PgPool, finishes: &[Finish<'_>]) -> Result<Vec<bool>, sqlx::Error> {
    debug_assert!(finishes.iter().all(|f| f.outcome.status.is_terminal()));
    use super::column;
    let finished: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT * FROM tollgate.finish_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(column(finishes, |f| f.id.0))
    .bind(column(finishes, |f| f.attempt))
    .bind(column(finishes, |f| f.outcome.status))
    .bind(column(finishes, |f| f.outcome.spent.input_tokens))
    .bind(column(finishes, |f| f.outcome.spent.output_tokens))
    .bind(column(finishes, |f| f.outcome.spent.cost.0))
    .bind(column(finishes, |f| f.outcome.error.as_ref().map(Json)))
    .bind(column(finishes, |f| f.outcome.spent.usage_estimated))
    .bind(column(finishes, |f| f.outcome.incomplete_reason))
    .bind(column(finishes, |f| f.outcome.spent.reasoning_tokens))
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    Ok(finishes
        .iter()
        .map(|f| finished.contains(&f.id.0))
        .collect())
}

/// What cancelling found.
#[derive(Debug)]
pub enum Cancelled {
    /// The job was queued or running and is now `cancelled`.
    Now(JobRow),
    /// The job had already finished; it is returned unchanged.
    AlreadyFinished(JobRow),
    NotFound,
}

/// A job being stopped by its client (cancel, or delete while unfinished): what its latest,
/// uncharged attempt had streamed, to charge for it.
#[derive(Debug)]
pub struct Stopping {
    pub model: String,
    /// Everything the attempt generated: message text, function names and arguments.
    pub output_text: String,
    pub estimated_input_tokens: i32,
}

/// Cancels a job of `key_id` that is queued or running, charging its running attempt what
/// `charge` says (from the text streamed so far; the row is locked meanwhile, so the worker's
/// next write waits, then finds the job cancelled and stops). The partial output is kept.
#[tracing::instrument(skip_all, fields(job_id = %id))]
pub async fn cancel(
    pool: &PgPool,
    id: JobId,
    key_id: KeyId,
    charge: impl FnOnce(&Stopping) -> Spent,
) -> Result<Cancelled, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let stopped = stop_unfinished(&mut tx, id, key_id, charge).await?;
    tx.commit().await?;
    if let Some(job) = stopped {
        return Ok(Cancelled::Now(job));
    }
    Ok(match get_for_key(pool, id, key_id).await? {
        Some(job) => Cancelled::AlreadyFinished(job),
        None => Cancelled::NotFound,
    })
}

/// Inside a transaction: locks the job `id` of `key_id` and, if it is queued or running, moves it
/// to `cancelled` with the running attempt's charge. None when there is no such unfinished job.
async fn stop_unfinished(
    tx: &mut PgConnection,
    id: JobId,
    key_id: KeyId,
    charge: impl FnOnce(&Stopping) -> Spent,
) -> Result<Option<JobRow>, sqlx::Error> {
    let locked: Option<(String, bool, i32, i32)> = sqlx::query_as(
        "SELECT model, attempt > settled_attempt, attempt, estimated_input_tokens
           FROM tollgate.jobs
          WHERE id = $1 AND key_id = $2 AND status IN ('queued', 'in_progress')
          FOR UPDATE",
    )
    .bind(id)
    .bind(key_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((model, unsettled, attempt, estimated_input_tokens)) = locked else {
        return Ok(None);
    };
    // The running attempt, or one whose worker died before charging it. Read in a statement of
    // its own, after the lock: it sees every batch the worker wrote before we took the row.
    let spent = if unsettled {
        let output_text: String = sqlx::query_scalar("SELECT tollgate.generated($1, $2, 'ta')")
            .bind(id)
            .bind(attempt)
            .fetch_one(&mut *tx)
            .await?;
        charge(&Stopping {
            model,
            output_text,
            estimated_input_tokens,
        })
    } else {
        Spent::default()
    };
    let job = sqlx::query_as(&format!(
        "UPDATE tollgate.jobs
            SET status = 'cancelled', finished_at = now(), updated_at = now(), lease_until = NULL,
                settled_attempt = attempt,
                output_text = tollgate.generated(id, attempt, 't'),
                output_arguments = tollgate.generated(id, attempt, 'a'),
                input_tokens = coalesce($3, input_tokens),
                output_tokens = coalesce($4, output_tokens),
                usage_estimated = coalesce($5, usage_estimated),
                cost_micro_usd = CASE WHEN $6 > 0 THEN coalesce(cost_micro_usd, 0) + $6
                                      ELSE cost_micro_usd END
          WHERE id = $1 AND key_id = $2
          RETURNING {JOB_COLUMNS}"
    ))
    .bind(id)
    .bind(key_id)
    .bind(spent.input_tokens)
    .bind(spent.output_tokens)
    .bind(spent.usage_estimated)
    .bind(spent.cost.0)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Some(job))
}

/// Ends jobs still `queued` after `ttl_seconds` (`failed`, code `expired`); the trigger gives back
/// their slots and reservations. Returns how many expired.
///
/// One job per statement, taken with `SKIP LOCKED`: each statement then holds one job row and,
/// through the trigger, its key's counter row — the order every cancel, delete and finish takes
/// them in — and waits for no job another transaction holds. (One multi-row UPDATE took many
/// jobs' rows and counters in no set order, and deadlocked against a cancel of the same key.)
pub async fn expire_queued(pool: &PgPool, ttl_seconds: u64) -> Result<u64, sqlx::Error> {
    let mut expired = 0;
    while expired < EXPIRE_BATCH {
        let one = sqlx::query(
            "UPDATE tollgate.jobs
                SET status = 'failed', finished_at = now(), updated_at = now(),
                    error = jsonb_build_object('code', 'expired',
                        'message', 'the job waited in the queue longer than its time to live')
              WHERE id = (SELECT id FROM tollgate.jobs
                           WHERE status = 'queued'
                             AND created_at < now() - make_interval(secs => $1)
                           LIMIT 1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(ttl_seconds as f64)
        .execute(pool)
        .await?
        .rows_affected();
        if one == 0 {
            break;
        }
        expired += one;
    }
    Ok(expired)
}

/// Most jobs one sweep expires (the next sweep goes on).
const EXPIRE_BATCH: u64 = 1000;

/// Fails a job that is still `queued` (its message cannot be delivered any more), with `code` and
/// `message` as its error; the trigger gives back its slot and reservation. False when it was not
/// queued.
pub async fn fail_queued(
    pool: &PgPool,
    id: JobId,
    code: &str,
    message: &str,
) -> Result<bool, sqlx::Error> {
    fail(pool, id, &["queued"], code, message).await
}

/// Fails a job that is not finished whatever its attempt, when its row cannot be read (a worker
/// that cannot read a job cannot run it, nor fence it by attempt): error code `server_error`.
/// The trigger gives back its slot and reservation. False when it had already finished.
pub async fn fail_unreadable(pool: &PgPool, id: JobId, message: &str) -> Result<bool, sqlx::Error> {
    fail(
        pool,
        id,
        &["queued", "in_progress"],
        "server_error",
        message,
    )
    .await
}

/// Fails the job if its status is one of `from`, with `code` and `message` as its error.
#[tracing::instrument(skip(pool, message), fields(job_id = %id))]
async fn fail(
    pool: &PgPool,
    id: JobId,
    from: &[&str],
    code: &str,
    message: &str,
) -> Result<bool, sqlx::Error> {
    let failed = sqlx::query(
        "UPDATE tollgate.jobs
            SET status = 'failed', finished_at = now(), updated_at = now(), lease_until = NULL,
                error = jsonb_build_object('code', $3::text, 'message', $4::text)
          WHERE id = $1 AND status::text = ANY($2)",
    )
    .bind(id)
    .bind(from)
    .bind(code)
    .bind(message)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(failed == 1)
}

/// Gives a claimed job back (`in_progress → queued`) when its worker stops before finishing it,
/// so the next delivery claims it at once instead of waiting for the lease to lapse. What the
/// attempt cost so far is added to the job's cost; the hand-back is counted in `handbacks`, so it
/// does not use up one of the job's attempts.
#[tracing::instrument(skip_all, fields(job_id = %id))]
pub async fn release_claim(
    pool: &PgPool,
    id: JobId,
    attempt: i32,
    cost: MicroUsd,
) -> Result<bool, sqlx::Error> {
    let released = sqlx::query(
        "UPDATE tollgate.jobs SET status = 'queued', lease_until = NULL, updated_at = now(),
                settled_attempt = attempt, handbacks = handbacks + 1,
                cost_micro_usd = CASE WHEN $3 > 0 THEN coalesce(cost_micro_usd, 0) + $3
                                      ELSE cost_micro_usd END
          WHERE id = $1 AND attempt = $2 AND status = 'in_progress'",
    )
    .bind(id)
    .bind(attempt)
    .bind(cost.0)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(released == 1)
}

/// Adds `cost` to the job's cost while `attempt` owns it (the charge of an abandoned attempt).
pub async fn add_cost(
    pool: &PgPool,
    id: JobId,
    attempt: i32,
    spent: &Spent,
) -> Result<bool, sqlx::Error> {
    let added = sqlx::query(
        "UPDATE tollgate.jobs SET cost_micro_usd = coalesce(cost_micro_usd, 0) + $3
          WHERE id = $1 AND attempt = $2 AND status = 'in_progress'",
    )
    .bind(id)
    .bind(attempt)
    .bind(spent.cost.0)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(added == 1)
}

/// Renews the lease of a running attempt. False when the attempt no longer owns the job.
pub async fn renew_lease(
    pool: &PgPool,
    id: JobId,
    attempt: i32,
    lease_seconds: u32,
) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE tollgate.jobs SET lease_until = now() + make_interval(secs => $3)
          WHERE id = $1 AND attempt = $2 AND status = 'in_progress'",
    )
    .bind(id)
    .bind(attempt)
    .bind(lease_seconds as f64)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// Puts a job whose attempt failed retryably back to `queued`, with the error kept for the record
/// and what the attempt cost added to the job's cost, to wait in a delay queue. False when the
/// attempt no longer owns the job (e.g. cancelled).
#[tracing::instrument(skip_all, fields(job_id = %id))]
pub async fn requeue_for_retry(
    pool: &PgPool,
    id: JobId,
    attempt: i32,
    error: &Value,
    cost: MicroUsd,
) -> Result<bool, sqlx::Error> {
    let requeued = sqlx::query(
        "UPDATE tollgate.jobs SET status = 'queued', lease_until = NULL, error = $3, updated_at = now(),
                settled_attempt = attempt, cost_micro_usd = CASE WHEN $4 > 0 THEN coalesce(cost_micro_usd, 0) + $4
                                      ELSE cost_micro_usd END
          WHERE id = $1 AND attempt = $2 AND status = 'in_progress'",
    )
    .bind(id)
    .bind(attempt)
    .bind(Json(error))
    .bind(cost.0)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(requeued == 1)
}

/// Inside a transaction: puts back to `queued` the jobs whose worker is gone (lease lapsed more
/// than `grace_seconds` ago), so the next claim starts a new attempt. Returns them with their
/// models; the caller gives each a new message (see `queue::outbox`).
pub async fn rescue_lapsed_leases(
    tx: &mut PgConnection,
    grace_seconds: f64,
) -> Result<Vec<(JobId, String)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE tollgate.jobs SET status = 'queued', lease_until = NULL, updated_at = now()
          WHERE id IN (SELECT id FROM tollgate.jobs
                        WHERE status = 'in_progress'
                          AND lease_until < now() - make_interval(secs => $1)
                        FOR UPDATE SKIP LOCKED)
          RETURNING id, model",
    )
    .bind(grace_seconds)
    .fetch_all(tx)
    .await
}

/// Inside a transaction: takes up to `limit` jobs `queued` for more than `overdue_seconds` since
/// they were admitted or last put back, with no message waiting in the outbox, and marks them
/// as just put back (`updated_at`), so each is taken once per period. Returns them with their
/// models; the caller gives each a new message.
pub async fn take_overdue_queued(
    tx: &mut PgConnection,
    overdue_seconds: f64,
    limit: i64,
) -> Result<Vec<(JobId, String)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE tollgate.jobs SET updated_at = now()
          WHERE id IN (SELECT j.id FROM tollgate.jobs j
                        WHERE j.status = 'queued'
                          AND j.updated_at < now() - make_interval(secs => $1)
                          AND NOT EXISTS (SELECT 1 FROM tollgate.outbox o
                                           WHERE o.job_id = j.id AND o.sent_at IS NULL)
                        ORDER BY j.updated_at LIMIT $2
                        FOR UPDATE SKIP LOCKED)
          RETURNING id, model",
    )
    .bind(overdue_seconds)
    .bind(limit)
    .fetch_all(tx)
    .await
}

/// Deletes the job `id` of `key_id` (its events and outbox row go with it). An unfinished job is
/// first cancelled in the same transaction, charging its running attempt what `charge` says, so
/// the release trigger gives back its slot and reservation and charges what was streamed; its
/// worker hears of the cancellation and stops. Returns false when there was no such job.
#[tracing::instrument(skip_all, fields(job_id = %id, key_id = %key_id))]
pub async fn delete_for_key(
    pool: &PgPool,
    id: JobId,
    key_id: KeyId,
    charge: impl FnOnce(&Stopping) -> Spent,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    stop_unfinished(&mut tx, id, key_id, charge).await?;
    let deleted = sqlx::query("DELETE FROM tollgate.jobs WHERE id = $1 AND key_id = $2")
        .bind(id)
        .bind(key_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(deleted == 1)
}

/// The pieces of one attempt of a job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttemptPieces {
    /// The pieces with index `from` onwards, in order.
    pub pieces: Vec<Piece>,
    /// How many pieces the attempt has written in all.
    pub total: usize,
}

/// The pieces of `attempt` with index `from` and later, and how many the attempt wrote. Rows of
/// one attempt are written one after another by its single worker, so their ranges are contiguous.
#[tracing::instrument(skip_all, fields(job_id = %id, attempt, from))]
pub async fn attempt_pieces(
    pool: &PgPool,
    id: JobId,
    attempt: i32,
    from: usize,
) -> Result<AttemptPieces, sqlx::Error> {
    let rows: Vec<(i32, i32, Vec<String>, String)> = sqlx::query_as(
        "SELECT seq_first, seq_last, deltas, kinds FROM tollgate.job_events
          WHERE job_id = $1 AND attempt = $2 AND seq_last >= $3
          ORDER BY seq_first",
    )
    .bind(id)
    .bind(attempt)
    .bind(from as i32)
    .fetch_all(pool)
    .await?;
    let total = match rows.last() {
        Some((_, last, _, _)) => *last as usize + 1,
        None => {
            // No piece from `from` on when the rows were read; any counted now came later, and
            // are left for the next read.
            let total: i32 = sqlx::query_scalar(
                "SELECT coalesce(max(seq_last) + 1, 0) FROM tollgate.job_events
                  WHERE job_id = $1 AND attempt = $2",
            )
            .bind(id)
            .bind(attempt)
            .fetch_one(pool)
            .await?;
            (total as usize).min(from)
        }
    };
    let mut pieces = Vec::new();
    for (first, _, payloads, kinds) in rows {
        let skip = from.saturating_sub(first as usize);
        for (kind, payload) in kinds.chars().zip(payloads).skip(skip) {
            pieces.push(Piece::decode(kind, payload).map_err(|e| sqlx::Error::Decode(e.into()))?);
        }
    }
    Ok(AttemptPieces { pieces, total })
}

/// The output of the job's latest attempt, as it stands.
pub async fn output(pool: &PgPool, job: &JobRow) -> Result<Output, sqlx::Error> {
    if job.attempt < 1 {
        return Ok(Output::default());
    }
    let read = attempt_pieces(pool, job.id, job.attempt, 0).await?;
    Ok(Output::from_pieces(&read.pieces))
}

/// Which input items [`input_slice`] reads: at most `count` with an index strictly between `lo`
/// and `hi` (None: from the start, to the end), from the lowest up or, when `descending`, from
/// the highest down; and the kinds of the items at the indices `kinds_at` (the caller's cursors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputWindow {
    pub lo: Option<usize>,
    pub hi: Option<usize>,
    pub descending: bool,
    pub count: usize,
    pub kinds_at: [Option<usize>; 2],
}

/// A window of a job's input items, as [`input_slice`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSlice {
    /// How many items the input holds (an input given as a string is one).
    pub total: usize,
    /// The items of the window, in the order asked, each with its index in the input.
    pub items: Vec<(usize, Value)>,
    /// The `type` of the items at the indices of `kinds_at` (`message` for a message that leaves
    /// it out); None for an index past the end.
    pub kinds: [Option<String>; 2],
}

#[derive(sqlx::FromRow)]
struct InputSliceRow {
    total: i64,
    first_kind: Option<String>,
    second_kind: Option<String>,
    items: Json<Vec<(i64, Value)>>,
}

/// The `window` of the input items of the job `id` of `key_id`; None when the key has no such
/// job.
///
/// The input is sliced in PostgreSQL: a job may hold thousands of items, and only the window is
/// sent and parsed. The input is extracted once (`MATERIALIZED`), so PostgreSQL reads the stored
/// request once, not once per item.
#[tracing::instrument(skip_all, fields(job_id = %id, key_id = %key_id))]
pub async fn input_slice(
    pool: &PgPool,
    id: JobId,
    key_id: KeyId,
    window: InputWindow,
) -> Result<Option<InputSlice>, sqlx::Error> {
    let index = |i: Option<usize>| i.map(|i| i64::try_from(i).unwrap_or(i64::MAX));
    let row: Option<InputSliceRow> = sqlx::query_as(
        "WITH job AS MATERIALIZED (
             SELECT CASE jsonb_typeof(request -> 'input') WHEN 'array' THEN request -> 'input'
                         ELSE jsonb_build_array(request -> 'input') END AS input
               FROM tollgate.jobs
              WHERE id = $1 AND key_id = $2
         ), window_ AS (
             SELECT input, jsonb_array_length(input)::bigint AS total,
                    greatest(coalesce($3, -1), -1) AS lo,
                    least(coalesce($4, jsonb_array_length(input)), jsonb_array_length(input))
                        AS hi
               FROM job
         )
         SELECT total,
                CASE WHEN $7 < total THEN coalesce(input -> $7::int ->> 'type', 'message') END
                    AS first_kind,
                CASE WHEN $8 < total THEN coalesce(input -> $8::int ->> 'type', 'message') END
                    AS second_kind,
                (SELECT coalesce(jsonb_agg(jsonb_build_array(i, input -> i::int) ORDER BY n), '[]')
                   FROM generate_series(
                            CASE WHEN $5 THEN hi - 1 ELSE lo + 1 END,
                            CASE WHEN $5 THEN greatest(lo + 1, hi - $6)
                                 ELSE least(hi - 1, lo + $6) END,
                            CASE WHEN $5 THEN -1 ELSE 1 END) WITH ORDINALITY AS s(i, n))
                    AS items
           FROM window_",
    )
    .bind(id)
    .bind(key_id)
    .bind(index(window.lo))
    .bind(index(window.hi))
    .bind(window.descending)
    .bind(index(Some(window.count)))
    .bind(index(window.kinds_at[0]))
    .bind(index(window.kinds_at[1]))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| InputSlice {
        total: row.total as usize,
        items: row
            .items
            .0
            .into_iter()
            .map(|(i, item)| (i as usize, item))
            .collect(),
        kinds: [row.first_kind, row.second_kind],
    }))
}
