//! Running one job: claim it, hold its lease for the whole attempt, stream the provider's output
//! into event rows in batches, and end the attempt in one guarded statement — finished, or put
//! back for a retry — charging what it used (see `billing`).
//!
//! The lease is held by a task beside the upstream call ([`LeaseKeeper`]), from the claim to the
//! attempt's last write: through connect, the wait for the first byte (minutes, for reasoning
//! models), silent stretches and the stream. So while its worker lives, no other worker takes the
//! job over and the upstream is never called twice for one attempt; when the worker dies, the
//! renewals stop and the job is rescued within one lease.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::{types::Json, PgPool};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Disposition, Worker};
use crate::{
    billing::{self, Attempt},
    config::ModelConfig,
    ids::{JobId, JobStatus},
    metrics,
    money::MicroUsd,
    output::{Piece, Shaper},
    provider::{self, CallRequest, Chunk, ProviderError, StopReason},
    queue::JobMessage,
    request::{self, CreateResponse, InputItem},
    store::jobs::{self, Claim, Claimed, Outcome, Spent, Stopping},
    tokens,
};

/// Runs the job and says what to do with its message. A database failure sends the message to
/// wait in the database delay queue.
pub(super) async fn run(worker: &Worker, id: JobId, abort: &CancellationToken) -> Disposition {
    match run_inner(worker, id, abort).await {
        Ok(disposition) => disposition,
        // The row holds something this build cannot read: retrying cannot help, and the job
        // would come back at every lease. It fails (its slot and reservation given back; the
        // provider was not called) and its message is kept in the dead-letter queue.
        Err(e @ (sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_))) => {
            tracing::error!(job_id = %id, error = %e, "the job's row cannot be read; failing it");
            let reason = format!("the job's row cannot be read: {e}");
            match jobs::fail_unreadable(&worker.pool, id, &reason).await {
                Ok(_) => Disposition::DeadLetter("unreadable_job", reason),
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "could not fail the unreadable job; its message waits and comes back");
                    Disposition::DatabaseDown
                }
            }
        }
        Err(e) => {
            tracing::warn!(job_id = %id, error = %e, "database error while running job; its message waits and comes back");
            Disposition::DatabaseDown
        }
    }
}

/// How streaming an attempt ended.
enum StreamEnd {
    /// The upstream's end marker arrived.
    Ended(StopReason),
    /// This attempt no longer owns the job (cancelled, deleted, or taken over).
    Fenced,
    Failed(ProviderError),
    /// The model's total timeout passed.
    TimedOut,
    /// The worker is stopping and its grace period is over.
    Aborted,
}

fn error_json(code: &str, message: impl Into<String>, attempt: i32) -> Value {
    json!({"code": code, "message": message.into(), "attempt": attempt})
}

fn failed(spent: Spent, error: Value) -> Outcome {
    Outcome {
        status: JobStatus::Failed,
        spent,
        incomplete_reason: None,
        error: Some(error),
    }
}

#[tracing::instrument(skip(worker, id, abort), fields(job_id = %id))]
async fn run_inner(
    worker: &Worker,
    id: JobId,
    abort: &CancellationToken,
) -> Result<Disposition, sqlx::Error> {
    let settings = &worker.config.worker;
    let claimed = match worker.claims.call(id).await?? {
        Claim::Claimed(claimed) => claimed,
        Claim::Finished(status) => {
            tracing::info!(?status, "job already finished; message skipped");
            return Ok(Disposition::Ack);
        }
        Claim::Missing => return Ok(Disposition::DeadLetter("no_job", format!("no job {id}"))),
        // A duplicate: the running attempt's own message finishes the job. If that worker
        // dies, its lease lapses and the sweeper puts the job back with a new message.
        Claim::Running => {
            tracing::info!("job held by a live attempt; duplicate message dropped");
            return Ok(Disposition::Ack);
        }
    };
    let Claimed {
        attempt,
        tries,
        model: model_name,
        request: Json(request),
        history,
        estimated_input_tokens,
        abandoned_output,
        queued_seconds,
        taken_over,
        ..
    } = claimed;
    if taken_over {
        metrics::counter!(metrics::LEASE_RESCUES).increment(1);
    }
    let claimed_at = Instant::now();
    if let Some(waited) = queued_seconds {
        metrics::histogram!(metrics::QUEUE_WAIT_SECONDS, "model" => model_name.clone())
            .record(waited.max(0.0));
    }
    let tracked = worker.track(id);
    // From here until this function returns, the lease is renewed beside whatever we wait for.
    let _lease = LeaseKeeper::start(
        worker.pool.clone(),
        id,
        attempt,
        settings.lease_seconds,
        tracked.token.clone(),
    );
    tracing::info!(attempt, model = %model_name, "job claimed");
    if !abandoned_output.is_empty() {
        // The previous attempt's worker died mid-stream: the upstream was paid for what it
        // streamed, and nobody else is left to charge it. It is charged as a stopped attempt.
        let spent = billing::for_stopped(
            &worker.config,
            &Stopping {
                model: model_name.clone(),
                output_text: abandoned_output,
                estimated_input_tokens,
            },
        );
        if spent.cost > MicroUsd::ZERO {
            jobs::add_cost(&worker.pool, id, attempt, &spent).await?;
            tracing::info!(
                cost_micro_usd = spent.cost.0,
                "charged the abandoned attempt's output"
            );
        }
    }

    // Attempts also count takeovers of crashed workers: a job that keeps killing its workers
    // must end too. Graceful hand-backs (shutdown) do not count.
    if tries as u32 > settings.max_attempts {
        let error = error_json(
            "max_attempts",
            format!("gave up after {} attempts", settings.max_attempts),
            attempt,
        );
        worker
            .finishes
            .call((id, attempt, failed(Spent::default(), error)))
            .await?;
        return Ok(Disposition::Ack);
    }
    let read = CreateResponse::from_value(&request).and_then(|request| {
        let history = request::stored_history(history.as_ref().map(|h| &h.0))?;
        Ok((request, history))
    });
    let (request, history): (CreateResponse, Vec<InputItem>) = match read {
        Ok(read) => read,
        Err(e) => {
            let error = error_json(
                "invalid_request",
                format!("stored request unreadable: {}", e.message),
                attempt,
            );
            worker
                .finishes
                .call((id, attempt, failed(Spent::default(), error)))
                .await?;
            return Ok(Disposition::Ack);
        }
    };
    let Some(model) = worker.config.model(&model_name) else {
        let error = error_json(
            "model_not_found",
            format!("model {model_name} is no longer configured"),
            attempt,
        );
        worker
            .finishes
            .call((id, attempt, failed(Spent::default(), error)))
            .await?;
        return Ok(Disposition::Ack);
    };

    let call = request.call_request(model, &history);
    let mut used = Used::default();
    let end = stream_into_rows(
        worker,
        id,
        attempt,
        model,
        &call,
        &mut used,
        &tracked.token,
        abort,
    )
    .await?;
    let spent = used.spent(
        model,
        estimated_input_tokens,
        matches!(end, StreamEnd::Ended(_)),
    );
    for (kind, tokens) in [
        ("input", spent.input_tokens),
        ("output", spent.output_tokens),
    ] {
        if let Some(tokens) = tokens.filter(|t| *t > 0) {
            metrics::counter!(metrics::TOKENS, "model" => model_name.clone(), "kind" => kind)
                .increment(tokens as u64);
        }
    }
    if let StreamEnd::Failed(e) = &end {
        metrics::counter!(
            metrics::UPSTREAM_ERRORS,
            "provider" => model.provider.as_str(),
            "status_class" => e.status_class(),
        )
        .increment(1);
    }
    let outcome = match end {
        StreamEnd::Ended(stop) => {
            let incomplete_reason = match stop {
                StopReason::Completed => None,
                StopReason::MaxOutputTokens => Some("max_output_tokens"),
                StopReason::ContentFilter => Some("content_filter"),
            };
            Outcome {
                status: if incomplete_reason.is_some() {
                    JobStatus::Incomplete
                } else {
                    JobStatus::Completed
                },
                spent,
                incomplete_reason,
                error: None,
            }
        }
        StreamEnd::Failed(e) if e.is_retryable() && (tries as u32) < settings.max_attempts => {
            tracing::warn!(error = %e, attempt, "upstream failed; will retry");
            let error = error_json(e.code(), e.to_string(), attempt);
            if jobs::requeue_for_retry(&worker.pool, id, attempt, &error, spent.cost).await? {
                return Ok(Disposition::RetryLater {
                    message: JobMessage::new(id, &model_name),
                    level: tries as u32,
                    not_before: e.retry_after(),
                });
            }
            return Ok(Disposition::Ack);
        }
        StreamEnd::Failed(e) => {
            tracing::warn!(error = %e, attempt, "upstream failed");
            failed(spent, error_json(e.code(), e.to_string(), attempt))
        }
        StreamEnd::TimedOut => failed(
            spent,
            error_json(
                "job_timeout",
                format!(
                    "the upstream did not finish within {} s; the output so far is kept",
                    model.timeout_seconds
                ),
                attempt,
            ),
        ),
        StreamEnd::Fenced => {
            // Whoever took the job from this attempt charged it: a cancel or delete charges
            // what was written, a takeover starts a new attempt.
            tracing::info!("job no longer ours (cancelled, deleted or taken over); stopped");
            return Ok(Disposition::Ack);
        }
        StreamEnd::Aborted => {
            jobs::release_claim(&worker.pool, id, attempt, spent.cost).await?;
            return Ok(Disposition::Requeue);
        }
    };
    let (status, cost, usage_estimated) = (
        outcome.status,
        outcome.spent.cost,
        outcome.spent.usage_estimated,
    );
    if worker.finishes.call((id, attempt, outcome)).await? {
        tracing::info!(
            ?status,
            cost_micro_usd = cost.0,
            ?usage_estimated,
            "job finished"
        );
        let status = serde_json::to_value(status).expect("status serialises");
        let status = status.as_str().unwrap_or("unknown").to_string();
        metrics::counter!(metrics::JOBS_FINISHED, "status" => status).increment(1);
        metrics::histogram!(metrics::JOB_RUN_SECONDS, "model" => model_name)
            .record(claimed_at.elapsed());
    }
    Ok(Disposition::Ack)
}

/// Renews a running attempt's lease every third of it, from the claim until dropped. When a
/// renewal finds the attempt no longer owns the job, it cancels `fenced` so the attempt stops.
/// A renewal that fails (PostgreSQL unreachable) is tried again at the next tick; if the lease
/// lapses meanwhile, the attempt's next write is refused and it stops then.
struct LeaseKeeper {
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(
        pool: PgPool,
        id: JobId,
        attempt: i32,
        lease_seconds: u32,
        fenced: CancellationToken,
    ) -> Self {
        let every = lease_renewal(lease_seconds);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match jobs::renew_lease(&pool, id, attempt, lease_seconds).await {
                    Ok(true) => {}
                    Ok(false) => {
                        fenced.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, "could not renew the lease; trying again");
                    }
                }
            }
        });
        Self { task }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often a running job renews its lease: a third of it, at least every second.
fn lease_renewal(lease_seconds: u32) -> Duration {
    Duration::from_millis((lease_seconds as u64 * 1000 / 3).max(1000))
}

/// What an attempt has used so far: what the model generated (message text and function-call
/// arguments) and the last usage reported.
#[derive(Debug, Default)]
struct Used {
    output_text: String,
    /// Whether any output arrived (a function call with no arguments is output too).
    started: bool,
    reported: Option<provider::Usage>,
}

impl Used {
    /// The attempt's charge, by the rule in `billing`; the input estimate is admission's.
    fn spent(&self, model: &ModelConfig, input_estimate: i32, ended: bool) -> Spent {
        let usage = billing::attempt_usage(
            tokens::tokenizer_for(model),
            Attempt {
                input_estimate: input_estimate.max(0) as u32,
                reported: self.reported,
                output_text: &self.output_text,
                ended,
            },
        );
        billing::spent(model, usage)
    }
}

/// Streams the provider's answer into event rows, a batch per flush (by count or by age), while
/// watching for cancellation and enforcing the model's timeouts. What was streamed and reported
/// is kept in `used`, whatever the ending.
#[allow(clippy::too_many_arguments)]
async fn stream_into_rows(
    worker: &Worker,
    id: JobId,
    attempt: i32,
    model: &ModelConfig,
    call: &CallRequest,
    used: &mut Used,
    cancelled: &CancellationToken,
    abort: &CancellationToken,
) -> Result<StreamEnd, sqlx::Error> {
    let settings = &worker.config.worker;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(model.timeout_seconds);
    let first_token_deadline = started + Duration::from_secs(model.first_token_timeout_seconds);
    let mut batch = Batch::default();
    let http = worker.http.get(&model.name).cloned().unwrap_or_default();
    // Looked up once for the attempt, not at every flush.
    let deltas_written = metrics::counter!(metrics::DELTAS_WRITTEN, "model" => model.name.clone());
    let mut chunks = tokio::select! {
        _ = abort.cancelled() => return Ok(StreamEnd::Aborted),
        _ = cancelled.cancelled() => return Ok(StreamEnd::Fenced),
        _ = tokio::time::sleep_until(deadline) => return Ok(StreamEnd::TimedOut),
        _ = tokio::time::sleep_until(first_token_deadline) => {
            return Ok(StreamEnd::Failed(ProviderError::Timeout));
        }
        started = provider::stream(&http, model, call) => match started {
            Ok(chunks) => chunks,
            Err(e) => return Ok(StreamEnd::Failed(e)),
        },
    };
    let end = loop {
        let flush_due = async {
            match batch.deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let first_token_due = async {
            if !used.started {
                tokio::time::sleep_until(first_token_deadline).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = abort.cancelled() => break StreamEnd::Aborted,
            _ = cancelled.cancelled() => return Ok(StreamEnd::Fenced),
            _ = tokio::time::sleep_until(deadline) => break StreamEnd::TimedOut,
            _ = first_token_due => break StreamEnd::Failed(ProviderError::Timeout),
            _ = flush_due => {
                if !batch.flush(worker, id, attempt, &deltas_written).await? {
                    return Ok(StreamEnd::Fenced);
                }
            }
            chunk = chunks.next() => match chunk {
                Some(Ok(chunk @ (Chunk::Delta(_) | Chunk::ToolCall { .. } | Chunk::Arguments(_)))) => {
                    if !used.started {
                        metrics::histogram!(metrics::FIRST_TOKEN_SECONDS, "model" => model.name.clone())
                            .record(started.elapsed());
                    }
                    used.started = true;
                    if !batch.push(chunk, used, settings.flush_interval()) {
                        break StreamEnd::Failed(ProviderError::Protocol(
                            "function call arguments arrived outside a function call".into(),
                        ));
                    }
                    if batch.pending.len() >= settings.flush_max_deltas
                        && !batch.flush(worker, id, attempt, &deltas_written).await?
                    {
                        return Ok(StreamEnd::Fenced);
                    }
                }
                Some(Ok(Chunk::Usage(usage))) => used.reported = Some(usage),
                Some(Ok(Chunk::End(stop))) => break StreamEnd::Ended(stop),
                Some(Err(e)) => break StreamEnd::Failed(e),
                // Closed without the end marker: the answer was cut off somewhere upstream.
                None => break StreamEnd::Failed(ProviderError::Truncated),
            }
        }
    };
    // Whatever the ending, the output that did arrive is kept.
    if !batch.flush(worker, id, attempt, &deltas_written).await? {
        return Ok(StreamEnd::Fenced);
    }
    Ok(end)
}

/// PostgreSQL's text cannot hold NUL; an upstream that sends one must not break the job. It is
/// replaced by U+FFFD, as a decoder replaces any byte it cannot represent.
fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// Pieces waiting to be written.
#[derive(Default)]
struct Batch {
    shaper: Shaper,
    pending: Vec<Piece>,
    next_seq: i32,
    deadline: Option<Instant>,
}

impl Batch {
    /// Shapes a chunk of output into pieces and notes what it generated in `used`; false when
    /// the chunk breaks the output's shape (arguments with no call open).
    fn push(&mut self, chunk: Chunk, used: &mut Used, max_age: Duration) -> bool {
        match chunk {
            Chunk::Delta(text) => {
                let text = without_nul(text);
                used.output_text.push_str(&text);
                self.shaper.text(text, &mut self.pending);
            }
            Chunk::ToolCall { call_id, name } => {
                self.shaper
                    .call(without_nul(call_id), without_nul(name), &mut self.pending);
            }
            Chunk::Arguments(arguments) => {
                let arguments = without_nul(arguments);
                used.output_text.push_str(&arguments);
                if !self.shaper.arguments(arguments, &mut self.pending) {
                    return false;
                }
            }
            Chunk::Usage(_) | Chunk::End(_) => {}
        }
        if !self.pending.is_empty() {
            self.deadline
                .get_or_insert_with(|| Instant::now() + max_age);
        }
        true
    }

    /// Writes the pending pieces; false when this attempt no longer owns the job.
    async fn flush(
        &mut self,
        worker: &Worker,
        id: JobId,
        attempt: i32,
        deltas_written: &metrics::Counter,
    ) -> Result<bool, sqlx::Error> {
        self.deadline = None;
        if self.pending.is_empty() {
            return Ok(true);
        }
        let pieces = std::mem::take(&mut self.pending);
        let deltas = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Text(_) | Piece::Arguments(_)))
            .count() as u64;
        let seq_first = self.next_seq;
        self.next_seq += pieces.len() as i32;
        let owned = worker
            .writer
            .call(jobs::Append {
                id,
                attempt,
                seq_first,
                pieces,
            })
            .await?;
        if owned {
            deltas_written.increment(deltas);
        }
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_replaced() {
        assert_eq!(without_nul("a\0b".into()), "a\u{FFFD}b");
        assert_eq!(without_nul("plain".into()), "plain");
    }
}
