//! The worker process's group commit. A running job's writes — its claim, every flushed batch of
//! its streamed output, its finish — go through one [`Group`] per kind instead of a statement of
//! its own: the job hands its request to the group and waits for the answer; the group takes every
//! request that arrived while its previous statement ran and serves them all with one statement,
//! one commit ([`claim_many`](jobs::claim_many), [`append_many`](jobs::append_many) with one NOTIFY per statement,
//! [`jobs::finish_many`]). Under light load a request is served at once, as alone; under heavy load
//! hundreds of jobs share each statement, so the statements per job fall as the load grows. Each
//! group has one statement in flight at a time.
//!
//! Each job has at most one request in flight (it waits for the answer before its next write), so
//! a statement never holds two batches of one job, and a job's batches are written in order. The
//! statements that lock many rows take them in one order (see their functions), so they cannot
//! deadlock. A failed statement fails every request in it: each of those jobs stops as on a
//! database error (its message waits in the database delay queue), exactly as when each wrote
//! alone.

use std::{future::Future, io};

use tokio::sync::{mpsc, oneshot};

/// Requests served per statement at most.
const MAX_REQUESTS: usize = 512;

type Reply<Out> = oneshot::Sender<Result<Out, String>>;

/// A handle on one group. Cheap to clone; the group ends when every handle is dropped.
pub(super) struct Group<Req, Out> {
    requests: mpsc::Sender<(Req, Reply<Out>)>,
}

impl<Req, Out> Clone for Group<Req, Out> {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
        }
    }
}

impl<Req: Send + 'static, Out: Send + 'static> Group<Req, Out> {
    /// Starts the group: `serve` answers a batch of requests with one answer each, in order.
    pub(super) fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Out>, sqlx::Error>> + Send,
    {
        let (requests, mut received) = mpsc::channel::<(Req, Reply<Out>)>(4 * MAX_REQUESTS);
        tokio::spawn(async move {
            let mut waiting = Vec::with_capacity(MAX_REQUESTS);
            while received.recv_many(&mut waiting, MAX_REQUESTS).await > 0 {
                let (batch, replies): (Vec<Req>, Vec<_>) = waiting.drain(..).unzip();
                let n = batch.len();
                match serve(batch).await {
                    Ok(answers) if answers.len() == n => {
                        for (answer, reply) in answers.into_iter().zip(replies) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    answered => {
                        let error = match answered {
                            Err(e) => e.to_string(),
                            Ok(answers) => format!("{} answers to {n} requests", answers.len()),
                        };
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        Self { requests }
    }

    /// Serves `request` with the others waiting.
    pub(super) async fn call(&self, request: Req) -> Result<Out, sqlx::Error> {
        let stopped = || sqlx::Error::Io(io::Error::other("the worker's writer has stopped"));
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((request, reply))
            .await
            .map_err(|_| stopped())?;
        match answer.await {
            Ok(Ok(out)) => Ok(out),
            // A database error: the job stops as if its own statement had failed.
            Ok(Err(e)) => Err(sqlx::Error::Io(io::Error::other(e))),
            Err(_) => Err(stopped()),
        }
    }
}
