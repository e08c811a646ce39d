//! One key's admissions, grouped into batches.
//!
//! Every admission of a key locks the key's counter row in PostgreSQL, so a key's admissions go
//! one after another however many arrive, and each one alone would pay the whole commit (the WAL
//! flush) with the row locked. Here they are grouped: a request joins its key's queue in this
//! front; a runner takes everything queued for the key (at most `server.admission_batch`) and
//! decides it in ONE statement, `tollgate.admit_batch` (migration `20261201000001_admit_batch.sql`),
//! which runs `tollgate.admit` for each request in order, in one transaction: one lock, one commit.
//! Each request is decided exactly as it would be alone (it sees every request before it, in its
//! batch or committed), and a rejection undoes only its own counts.
//!
//! At most `server.admissions_per_key` runners of a key are in PostgreSQL at once from one front
//! (each holds a pooled connection, and the second waits for the row lock while the first
//! commits); the key's other requests wait here, in memory, holding no connection, and join the
//! next batch. So one busy key cannot take every pooled connection from the others, and the busier
//! a key, the larger its batches. A batch holds one key only, and its requests are ordered by
//! model, so the rows a batch locks — its key's, then the windows of the models with limits, by
//! name — are taken in one order by every batch: batches cannot deadlock. The
//! runner is its own task: a client that leaves does not cancel the batch others wait on, and a
//! request whose client left before its batch began is dropped without being admitted.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use sqlx::{types::Json, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Admit;
use crate::ids::KeyId;

/// The statement a batch runs: the key id, then one array per parameter of `tollgate.admit`
/// after it, one element per request (see [`super::ADMIT_SQL`]).
const ADMIT_BATCH_SQL: &str = "SELECT * FROM tollgate.admit_batch($1, $2, $3, $4, $5, $6, $7, \
                               $8, $9, $10, $11, $12, $13) ORDER BY ord";

/// One request as `tollgate.admit` takes it, after the key.
pub(super) struct Request {
    pub tokens: i64,
    pub reserve: i64,
    pub model: String,
    pub model_rpm: Option<i64>,
    pub model_tpm: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_hash: Vec<u8>,
    pub job_id: Uuid,
    pub request: Value,
    pub history: Option<Value>,
    pub previous_response_id: Option<Uuid>,
    pub outbox_payload: Value,
}

type Reply = oneshot::Sender<Result<Admit, sqlx::Error>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<(Request, Reply)>,
    runners: usize,
}

struct Shared {
    pool: PgPool,
    per_key: usize,
    max_batch: usize,
    keys: Mutex<HashMap<KeyId, Queue>>,
}

pub(super) struct KeyBatches {
    shared: Arc<Shared>,
}

impl KeyBatches {
    pub fn new(pool: PgPool, per_key: usize, max_batch: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                per_key: per_key.max(1),
                max_batch: max_batch.max(1),
                keys: Mutex::default(),
            }),
        }
    }

    /// Decides `request` of `key` in the key's next batch.
    pub async fn admit(&self, key: KeyId, request: Request) -> Result<Admit, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut keys = self.shared.keys.lock().expect("not poisoned");
            let queue = keys.entry(key).or_default();
            queue.waiting.push((request, reply));
            let start = queue.runners < self.shared.per_key;
            if start {
                queue.runners += 1;
            }
            start
        };
        if start {
            tokio::spawn(run(self.shared.clone(), key));
        }
        answer.await.unwrap_or_else(|_| {
            Err(sqlx::Error::Protocol(
                "the admission batch ended without an answer".into(),
            ))
        })
    }

    /// Keys with an admission in progress or waiting.
    #[cfg(test)]
    fn keys_tracked(&self) -> usize {
        self.shared.keys.lock().expect("not poisoned").len()
    }
}

/// A runner of `key`: decides the key's waiting requests, a batch at a time, until none waits.
async fn run(shared: Arc<Shared>, key: KeyId) {
    loop {
        let batch: Vec<(Request, Reply)> = {
            let mut keys = shared.keys.lock().expect("not poisoned");
            let Some(queue) = keys.get_mut(&key) else {
                return;
            };
            if queue.waiting.is_empty() {
                queue.runners -= 1;
                if queue.runners == 0 {
                    keys.remove(&key);
                }
                return;
            }
            let n = queue.waiting.len().min(shared.max_batch);
            queue.waiting.drain(..n).collect()
        };
        // A client that left before its batch began is not admitted.
        let mut batch: Vec<(Request, Reply)> = batch
            .into_iter()
            .filter(|(_, reply)| !reply.is_closed())
            .collect();
        // Models' windows are shared by every key: each batch locks them in the same order
        // (the model's name), so two batches of different keys cannot wait for each other.
        batch.sort_by(|(a, _), (b, _)| a.model.cmp(&b.model));
        let (requests, replies): (Vec<Request>, Vec<Reply>) = batch.into_iter().unzip();
        if requests.is_empty() {
            continue;
        }
        match decide(&shared.pool, key, &requests).await {
            Ok(rows) if rows.len() == replies.len() => {
                for (reply, row) in replies.into_iter().zip(rows) {
                    let _ = reply.send(Ok(row.admit));
                }
            }
            Ok(rows) => {
                let message = format!(
                    "tollgate.admit_batch answered {} rows for {} requests",
                    rows.len(),
                    replies.len()
                );
                for reply in replies {
                    let _ = reply.send(Err(sqlx::Error::Protocol(message.clone())));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, %key, requests = replies.len(), "admission batch failed");
                for reply in replies {
                    let _ = reply.send(Err(copy_of(&e)));
                }
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    #[allow(dead_code)]
    ord: i32,
    #[sqlx(flatten)]
    admit: Admit,
}

async fn decide(pool: &PgPool, key: KeyId, requests: &[Request]) -> Result<Vec<Row>, sqlx::Error> {
    let column = |f: &dyn Fn(&Request) -> Option<i64>| requests.iter().map(f).collect::<Vec<_>>();
    sqlx::query_as(ADMIT_BATCH_SQL)
        .bind(key)
        .bind(requests.iter().map(|r| r.tokens).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.reserve).collect::<Vec<_>>())
        .bind(
            requests
                .iter()
                .map(|r| r.model.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(&|r| r.model_rpm))
        .bind(column(&|r| r.model_tpm))
        .bind(
            requests
                .iter()
                .map(|r| r.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| r.request_hash.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(requests.iter().map(|r| r.job_id).collect::<Vec<_>>())
        .bind(
            requests
                .iter()
                .map(|r| Json(&r.request))
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| r.history.as_ref().map(Json))
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| r.previous_response_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| Json(&r.outbox_payload))
                .collect::<Vec<_>>(),
        )
        .fetch_all(pool)
        .await
}

/// The batch's error for each of its requests (`sqlx::Error` is not `Clone`), keeping what
/// decides the answer: PostgreSQL out of reach stays a 503, anything else a 500.
fn copy_of(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(format!("admission batch failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            tokens: 1,
            reserve: 1,
            model: "m".into(),
            model_rpm: None,
            model_tpm: None,
            idempotency_key: None,
            request_hash: vec![0],
            job_id: Uuid::now_v7(),
            request: Value::Null,
            history: None,
            previous_response_id: None,
            outbox_payload: Value::Null,
        }
    }

    /// With PostgreSQL out of reach, every request of a batch gets its 503 error, the key's
    /// runners end, and the key is forgotten.
    #[tokio::test]
    async fn a_failed_batch_answers_each_request_and_forgets_the_key() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let batches = Arc::new(KeyBatches::new(pool, 1, 64));
        let key = KeyId(Uuid::now_v7());
        let answers = futures::future::join_all((0..5).map(|_| {
            let batches = batches.clone();
            async move { batches.admit(key, request()).await }
        }))
        .await;
        for answer in answers {
            let e = answer.expect_err("no database, no admission");
            assert!(
                matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)),
                "{e:?}"
            );
        }
        assert_eq!(batches.keys_tracked(), 0);
    }
}
