//! Running one job: claim it, stream the provider's output into event rows in batches (renewing
//! the lease as it goes), finish it in one guarded statement — or put it back for a retry.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Disposition, Worker};
use crate::{
    config::ModelConfig,
    ids::{JobId, JobStatus},
    money::MicroUsd,
    provider::{self, CallRequest, Chunk, ProviderError},
    queue::JobMessage,
    request::CreateResponse,
    store::jobs::{self, Claim, Outcome},
    tokens,
};

/// How often a worker that found its job held by another checks whether that lease lapsed.
const HELD_JOB_POLL: Duration = Duration::from_secs(1);

/// Runs the job and says what to do with its message. A database failure hands the message back.
pub(super) async fn run(worker: &Worker, id: JobId, abort: &CancellationToken) -> Disposition {
    match run_inner(worker, id, abort).await {
        Ok(disposition) => disposition,
        Err(e) => {
            tracing::warn!(job_id = %id, error = %e, "database error while running job; handing it back");
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            Disposition::Requeue
        }
    }
}

/// How streaming an attempt ended.
enum StreamEnd {
    Done {
        input_tokens: u32,
        output_tokens: u32,
    },
    /// This attempt no longer owns the job (cancelled, or taken over).
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

fn failed(error: Value) -> Outcome {
    Outcome {
        status: JobStatus::Failed,
        input_tokens: None,
        output_tokens: None,
        cost: MicroUsd::ZERO,
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
    let (attempt, model_name, request) = loop {
        match jobs::claim(&worker.pool, id, settings.lease_seconds).await? {
            Claim::Claimed {
                attempt,
                model,
                request,
            } => break (attempt, model, request),
            Claim::Finished(status) => {
                tracing::info!(?status, "job already finished; message skipped");
                return Ok(Disposition::Ack);
            }
            Claim::Missing => return Ok(Disposition::DeadLetter(format!("no job {id}"))),
            Claim::Running => tokio::select! {
                _ = abort.cancelled() => return Ok(Disposition::Requeue),
                _ = tokio::time::sleep(HELD_JOB_POLL) => {}
            },
        }
    };
    let tracked = worker.track(id);
    tracing::info!(attempt, model = %model_name, "job claimed");

    // Attempts also count takeovers of crashed workers: a job that keeps killing its workers
    // must end too.
    if attempt as u32 > settings.max_attempts {
        let error = error_json(
            "max_attempts",
            format!("gave up after {} attempts", settings.max_attempts),
            attempt,
        );
        jobs::finish(&worker.pool, id, attempt, &failed(error)).await?;
        return Ok(Disposition::Ack);
    }
    let request: CreateResponse = match serde_json::from_value(request) {
        Ok(r) => r,
        Err(e) => {
            let error = error_json(
                "invalid_request",
                format!("stored request unreadable: {e}"),
                attempt,
            );
            jobs::finish(&worker.pool, id, attempt, &failed(error)).await?;
            return Ok(Disposition::Ack);
        }
    };
    let Some(model) = worker.config.model(&model_name) else {
        let error = error_json(
            "model_not_found",
            format!("model {model_name} is no longer configured"),
            attempt,
        );
        jobs::finish(&worker.pool, id, attempt, &failed(error)).await?;
        return Ok(Disposition::Ack);
    };

    let call = request.call_request(model);
    let end = stream_into_rows(worker, id, attempt, model, &call, &tracked.token, abort).await?;
    let outcome = match end {
        StreamEnd::Done {
            input_tokens,
            output_tokens,
        } => Outcome {
            status: JobStatus::Completed,
            input_tokens: Some(input_tokens as i32),
            output_tokens: Some(output_tokens as i32),
            cost: model.cost(input_tokens as u64, output_tokens as u64),
            error: None,
        },
        StreamEnd::Failed(e) if e.is_retryable() && (attempt as u32) < settings.max_attempts => {
            tracing::warn!(error = %e, attempt, "upstream failed; will retry");
            let error = error_json(e.code(), e.to_string(), attempt);
            if jobs::requeue_for_retry(&worker.pool, id, attempt, &error).await? {
                return Ok(Disposition::RetryLater {
                    message: JobMessage::new(id, &model_name),
                    level: attempt as u32,
                });
            }
            return Ok(Disposition::Ack);
        }
        StreamEnd::Failed(e) => {
            tracing::warn!(error = %e, attempt, "upstream failed");
            failed(error_json(e.code(), e.to_string(), attempt))
        }
        StreamEnd::TimedOut => failed(error_json(
            "job_timeout",
            format!(
                "the upstream did not finish within {} s; the output so far is kept",
                model.timeout_seconds
            ),
            attempt,
        )),
        StreamEnd::Fenced => {
            tracing::info!("job no longer ours (cancelled or taken over); stopped");
            return Ok(Disposition::Ack);
        }
        StreamEnd::Aborted => {
            jobs::release_claim(&worker.pool, id, attempt).await?;
            return Ok(Disposition::Requeue);
        }
    };
    if jobs::finish(&worker.pool, id, attempt, &outcome).await? {
        tracing::info!(status = ?outcome.status, cost_micro_usd = outcome.cost.0, "job finished");
        let status = serde_json::to_value(outcome.status).expect("status serialises");
        crate::metrics::increment(
            "tollgate_jobs_finished_total",
            "status",
            status.as_str().unwrap_or("unknown"),
        );
    }
    Ok(Disposition::Ack)
}

/// Streams the provider's answer into event rows, a batch per flush (by count or by age), while
/// renewing the lease, watching for cancellation and enforcing the model's timeouts.
async fn stream_into_rows(
    worker: &Worker,
    id: JobId,
    attempt: i32,
    model: &ModelConfig,
    call: &CallRequest,
    cancelled: &CancellationToken,
    abort: &CancellationToken,
) -> Result<StreamEnd, sqlx::Error> {
    let settings = &worker.config.worker;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(model.timeout_seconds);
    let first_token_deadline = started + Duration::from_secs(model.first_token_timeout_seconds);
    let mut heartbeat = tokio::time::interval_at(
        started + lease_renewal(settings.lease_seconds),
        lease_renewal(settings.lease_seconds),
    );
    let mut batch = Batch {
        pending: Vec::new(),
        next_seq: 0,
        deadline: None,
        output_bytes: 0,
    };
    let mut usage = None;
    let http = worker.http.get(&model.name).cloned().unwrap_or_default();
    let mut chunks = tokio::select! {
        _ = abort.cancelled() => return Ok(StreamEnd::Aborted),
        _ = cancelled.cancelled() => return Ok(StreamEnd::Fenced),
        _ = tokio::time::sleep_until(first_token_deadline) => {
            return Ok(StreamEnd::Failed(ProviderError::Timeout));
        }
        started = provider::stream(&http, model, call) => match started {
            Ok(chunks) => chunks,
            Err(e) => return Ok(StreamEnd::Failed(e)),
        },
    };
    loop {
        let flush_due = async {
            match batch.deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let first_token_due = async {
            if batch.next_seq == 0 && batch.pending.is_empty() {
                tokio::time::sleep_until(first_token_deadline).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = abort.cancelled() => return Ok(StreamEnd::Aborted),
            _ = cancelled.cancelled() => return Ok(StreamEnd::Fenced),
            _ = tokio::time::sleep_until(deadline) => {
                batch.flush(worker, id, attempt).await?;
                return Ok(StreamEnd::TimedOut);
            }
            _ = first_token_due => return Ok(StreamEnd::Failed(ProviderError::Timeout)),
            _ = heartbeat.tick() => {
                if !jobs::renew_lease(&worker.pool, id, attempt, settings.lease_seconds).await? {
                    return Ok(StreamEnd::Fenced);
                }
            }
            _ = flush_due => {
                if !batch.flush(worker, id, attempt).await? {
                    return Ok(StreamEnd::Fenced);
                }
                // A flush renews the lease: the heartbeat is only for silent stretches.
                heartbeat.reset();
            }
            chunk = chunks.next() => match chunk {
                Some(Ok(Chunk::Delta(text))) => {
                    batch.push(text, settings.flush_interval());
                    if batch.pending.len() >= settings.flush_max_deltas {
                        if !batch.flush(worker, id, attempt).await? {
                            return Ok(StreamEnd::Fenced);
                        }
                        heartbeat.reset();
                    }
                }
                Some(Ok(Chunk::End(_))) => break,
                Some(Ok(Chunk::Usage { input_tokens, output_tokens })) => {
                    usage = Some((input_tokens, output_tokens));
                }
                Some(Err(e)) => {
                    // Keep the partial output that did arrive.
                    batch.flush(worker, id, attempt).await?;
                    return Ok(StreamEnd::Failed(e));
                }
                None => break,
            }
        }
    }
    if !batch.flush(worker, id, attempt).await? {
        return Ok(StreamEnd::Fenced);
    }
    let (input_tokens, output_tokens) = usage.unwrap_or_else(|| {
        // The upstream reported no usage: charge our estimate rather than nothing.
        (
            tokens::estimate(tokens::tokenizer_for(model), &call.messages).tokens,
            tokens::bytes_to_tokens(batch.output_bytes),
        )
    });
    Ok(StreamEnd::Done {
        input_tokens,
        output_tokens,
    })
}

/// How often a running job renews its lease: a third of it, at least every second.
fn lease_renewal(lease_seconds: u32) -> Duration {
    Duration::from_millis((lease_seconds as u64 * 1000 / 3).max(1000))
}

/// Deltas waiting to be written.
struct Batch {
    pending: Vec<String>,
    next_seq: i32,
    deadline: Option<Instant>,
    output_bytes: usize,
}

impl Batch {
    fn push(&mut self, text: String, max_age: Duration) {
        self.output_bytes += text.len();
        self.pending.push(text);
        self.deadline
            .get_or_insert_with(|| Instant::now() + max_age);
    }

    /// Writes the pending deltas (renewing the lease); false when this attempt no longer owns
    /// the job.
    async fn flush(
        &mut self,
        worker: &Worker,
        id: JobId,
        attempt: i32,
    ) -> Result<bool, sqlx::Error> {
        self.deadline = None;
        if self.pending.is_empty() {
            return Ok(true);
        }
        let owned = jobs::append_deltas(
            &worker.pool,
            id,
            attempt,
            self.next_seq,
            &self.pending,
            worker.config.worker.lease_seconds,
        )
        .await?;
        self.next_seq += self.pending.len() as i32;
        self.pending.clear();
        Ok(owned)
    }
}
