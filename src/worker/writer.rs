//! The worker process's one writer of streamed output (group commit). Every running job hands
//! its flushed batch to this writer and waits for the answer; the writer takes every batch that
//! arrived while its previous statement ran and writes them all with one statement
//! ([`jobs::append_many`]), one commit, one NOTIFY per statement (migration
//! `20261130000002_notify_per_statement.sql`). Under light load a batch is written at once, as
//! before; under heavy load hundreds of jobs share each statement, so the statements per delta
//! fall as the load grows.
//!
//! Each job has at most one batch in flight (it waits for the answer before its next flush), so a
//! statement never holds two batches of one job, and a job's batches are written in order. A
//! failed statement fails every batch in it: each of those jobs stops as on a database error
//! (its message waits in the database delay queue), exactly as when each wrote alone.

use std::io;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::store::jobs::{self, Append};

/// Batches written per statement at most.
const MAX_BATCHES: usize = 512;

/// A handle on the writer. Cheap to clone; the writer ends when every handle is dropped.
#[derive(Clone)]
pub(super) struct EventWriter {
    requests: mpsc::Sender<Request>,
}

struct Request {
    append: Append,
    written: oneshot::Sender<Result<bool, String>>,
}

impl EventWriter {
    pub(super) fn start(pool: PgPool) -> Self {
        let (requests, mut received) = mpsc::channel::<Request>(4 * MAX_BATCHES);
        tokio::spawn(async move {
            let mut waiting = Vec::with_capacity(MAX_BATCHES);
            while received.recv_many(&mut waiting, MAX_BATCHES).await > 0 {
                let (appends, replies): (Vec<Append>, Vec<_>) = waiting
                    .drain(..)
                    .map(|r: Request| (r.append, r.written))
                    .unzip();
                match jobs::append_many(&pool, &appends).await {
                    Ok(written) => {
                        for (append, reply) in appends.iter().zip(replies) {
                            let _ = reply.send(Ok(written.contains(&append.id)));
                        }
                    }
                    Err(e) => {
                        let error = e.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        Self { requests }
    }

    /// Writes the batch with others; false when its attempt no longer owns the job.
    pub(super) async fn append(&self, append: Append) -> Result<bool, sqlx::Error> {
        let stopped = || sqlx::Error::Io(io::Error::other("the output writer has stopped"));
        let (written, answer) = oneshot::channel();
        self.requests
            .send(Request { append, written })
            .await
            .map_err(|_| stopped())?;
        match answer.await {
            Ok(Ok(owned)) => Ok(owned),
            // A database error: the job stops as if its own statement had failed.
            Ok(Err(e)) => Err(sqlx::Error::Io(io::Error::other(e))),
            Err(_) => Err(stopped()),
        }
    }
}
