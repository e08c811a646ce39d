//! Running one job: claim it, stream the provider's output into event rows in batches, finish it
//! in one guarded statement.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Disposition, Worker};
use crate::{
    config::ModelConfig,
    ids::{JobId, JobStatus},
    money::MicroUsd,
    provider::{self, CallRequest, Chunk, ProviderError},
    request::CreateResponse,
    store::jobs::{self, Claim, Outcome},
    tokens,
};

/// How often a worker that found its job held by another checks whether that lease lapsed.
const HELD_JOB_POLL: Duration = Duration::from_secs(1);

/// Runs the job and says what to do with its message. A database failure hands the message back.
pub(super) async fn run(worker: &Worker, id: JobId, shutdown: &CancellationToken) -> Disposition {
    match run_inner(worker, id, shutdown).await {
        Ok(disposition) => disposition,
        Err(e) => {
            tracing::warn!(job_id = %id, error = %e, "database error while running job; handing it back");
            tokio::select! {
                _ = shutdown.cancelled() => {}
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
    Shutdown,
}

#[tracing::instrument(skip(worker, id, shutdown), fields(job_id = %id))]
async fn run_inner(
    worker: &Worker,
    id: JobId,
    shutdown: &CancellationToken,
) -> Result<Disposition, sqlx::Error> {
    let lease = worker.config.worker.lease_seconds;
    let (attempt, model_name, request) = loop {
        match jobs::claim(&worker.pool, id, lease).await? {
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
                _ = shutdown.cancelled() => return Ok(Disposition::Requeue),
                _ = tokio::time::sleep(HELD_JOB_POLL) => {}
            },
        }
    };
    tracing::info!(attempt, model = %model_name, "job claimed");

    let fail = |code: &str, message: String| Outcome {
        status: JobStatus::Failed,
        input_tokens: None,
        output_tokens: None,
        cost: MicroUsd::ZERO,
        error: Some(json!({"code": code, "message": message})),
    };
    let request: CreateResponse = match serde_json::from_value(request) {
        Ok(r) => r,
        Err(e) => {
            let outcome = fail("invalid_request", format!("stored request unreadable: {e}"));
            jobs::finish(&worker.pool, id, attempt, &outcome).await?;
            return Ok(Disposition::Ack);
        }
    };
    let Some(model) = worker.config.model(&model_name) else {
        let outcome = fail(
            "model_not_found",
            format!("model {model_name} is no longer configured"),
        );
        jobs::finish(&worker.pool, id, attempt, &outcome).await?;
        return Ok(Disposition::Ack);
    };

    let call = request.call_request();
    let outcome = match stream_into_rows(worker, id, attempt, model, &call, shutdown).await? {
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
        StreamEnd::Failed(e) => {
            tracing::warn!(error = %e, "upstream failed");
            fail(e.code(), e.to_string())
        }
        StreamEnd::Fenced => {
            tracing::info!("job no longer ours (cancelled or taken over); stopped");
            return Ok(Disposition::Ack);
        }
        StreamEnd::Shutdown => {
            jobs::release_claim(&worker.pool, id, attempt).await?;
            return Ok(Disposition::Requeue);
        }
    };
    if jobs::finish(&worker.pool, id, attempt, &outcome).await? {
        tracing::info!(status = ?outcome.status, cost_micro_usd = outcome.cost.0, "job finished");
    }
    Ok(Disposition::Ack)
}

/// Streams the provider's answer into event rows, a batch per flush (by count or by age).
async fn stream_into_rows(
    worker: &Worker,
    id: JobId,
    attempt: i32,
    model: &ModelConfig,
    call: &CallRequest,
    shutdown: &CancellationToken,
) -> Result<StreamEnd, sqlx::Error> {
    let settings = &worker.config.worker;
    let mut batch = Batch {
        pending: Vec::new(),
        next_seq: 0,
        deadline: None,
        output_bytes: 0,
    };
    let mut usage = None;
    let mut chunks = tokio::select! {
        _ = shutdown.cancelled() => return Ok(StreamEnd::Shutdown),
        started = provider::stream(&worker.http, model, call) => match started {
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
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(StreamEnd::Shutdown),
            _ = flush_due => {
                if !batch.flush(worker, id, attempt).await? {
                    return Ok(StreamEnd::Fenced);
                }
            }
            chunk = chunks.next() => match chunk {
                Some(Ok(Chunk::Delta(text))) => {
                    batch.push(text, settings.flush_interval());
                    if batch.pending.len() >= settings.flush_max_deltas
                        && !batch.flush(worker, id, attempt).await?
                    {
                        return Ok(StreamEnd::Fenced);
                    }
                }
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

    /// Writes the pending deltas; false when this attempt no longer owns the job.
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
