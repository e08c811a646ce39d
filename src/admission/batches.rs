//! Admissions, grouped into batches: one statement, one commit for many requests.
//!
//! Every admission locks its key's counter row in PostgreSQL and commits (a WAL flush); alone,
//! each request would pay a whole commit. Here requests are grouped, two ways:
//!
//! - **Mixed batches.** A request first joins one of the front's [`MIXED_RUNNERS`] queues (by its
//!   key, so a key's requests always meet in the same one, and two mixed batches never hold the
//!   same key); the queue's runner takes everything queued (at most `server.admission_batch`),
//!   orders it by model, and decides it in ONE statement, `tollgate.admit_many` (migration
//!   `20261201000003_admit_many_and_finish_by_key.sql`), which locks the batch's keys with `SKIP LOCKED` and runs `tollgate.admit` for each request in order, in one
//!   transaction. A mixed batch never waits for a key's row: the requests of a key some other
//!   transaction holds (another batch, a finishing job, an operator) answer `busy`, nothing is
//!   counted for them, and they go on to their key's queue. So at most [`MIXED_RUNNERS`] mixed
//!   batches are in PostgreSQL at once, one a queue.
//! - **A key's batches.** A busy key's requests wait in its own queue; a runner takes them all and
//!   decides them in one `tollgate.admit_many` that waits for the key's row. At most
//!   `server.admissions_per_key` such runners of a key are in PostgreSQL at once from one front
//!   (each holds a pooled connection while it waits); the key's other requests wait here, in
//!   memory, holding no connection, and join its next batch. So one busy key cannot take every
//!   pooled connection from the others, nor hold up their batches, and the busier a key, the
//!   larger its batches.
//!
//! Each request is decided exactly as it would be alone (it sees every request before it, in its
//! batch or committed), and a rejection undoes only its own counts. The rows a batch locks — its
//! keys', sorted, then the windows of the models with limits, by name — are taken in the order
//! every transaction follows (`store/ledger.rs`), so batches cannot deadlock. Runners are tasks of
//! their own: a client that leaves does not cancel the batch others wait on, and a request whose
//! client left before its batch began is dropped without being admitted.

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

/// Queues of mixed batches, each with one runner: mixed batches in PostgreSQL at once from one
/// front.
pub const MIXED_RUNNERS: usize = 2;

/// The statement every batch runs: whether to wait for the keys' rows, then one array per
/// parameter of `tollgate.admit`, one element per request (see [`super::ADMIT_SQL`]).
const ADMIT_MANY_SQL: &str = "SELECT * FROM tollgate.admit_many($1, $2, $3, $4, $5, $6, $7, $8, \
                              $9, $10, $11, $12, $13, $14) ORDER BY ord";

/// One request as `tollgate.admit` takes it.
pub(super) struct Request {
    pub key: KeyId,
    pub tokens: i64,
    pub reserve: i64,
    pub model: String,
    pub model_rpm: Option<i64>,
    pub model_tpm: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_hash: Vec<u8>,
    pub job_id: Uuid,
    /// Shared with the caller, who answers with it once the job is admitted.
    pub request: Arc<Value>,
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
    mixed: [Mutex<Queue>; MIXED_RUNNERS],
    keys: Mutex<HashMap<KeyId, Queue>>,
}

pub(super) struct Batches {
    shared: Arc<Shared>,
}

impl Batches {
    pub fn new(pool: PgPool, per_key: usize, max_batch: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                per_key: per_key.max(1),
                max_batch: max_batch.max(1),
                mixed: Default::default(),
                keys: Mutex::default(),
            }),
        }
    }

    /// Decides `request` in the next batch.
    pub async fn admit(&self, request: Request) -> Result<Admit, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        let shard = (request.key.0.as_u128() % MIXED_RUNNERS as u128) as usize;
        let start = {
            let mut mixed = self.shared.mixed[shard].lock().expect("not poisoned");
            mixed.waiting.push((request, reply));
            let start = mixed.runners == 0;
            if start {
                mixed.runners = 1;
            }
            start
        };
        if start {
            tokio::spawn(run_mixed(self.shared.clone(), shard));
        }
        answer.await.unwrap_or_else(|_| {
            Err(sqlx::Error::Protocol(
                "the admission batch ended without an answer".into(),
            ))
        })
    }

    /// No runner left and nothing waiting, mixed or per key.
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.shared.keys.lock().expect("not poisoned").is_empty()
            && self.shared.mixed.iter().all(|q| {
                let q = q.lock().expect("not poisoned");
                q.runners == 0 && q.waiting.is_empty()
            })
    }
}

/// Takes the next batch from `queue`, without the requests whose client left; None (and the
/// runner counted off) when nothing waits.
fn next_batch(queue: &mut Queue, max_batch: usize) -> Option<Vec<(Request, Reply)>> {
    if queue.waiting.is_empty() {
        queue.runners -= 1;
        return None;
    }
    let n = queue.waiting.len().min(max_batch);
    Some(
        queue
            .waiting
            .drain(..n)
            .filter(|(_, reply)| !reply.is_closed())
            .collect(),
    )
}

/// The runner of a queue of mixed batches: decides its waiting requests, a batch at a time,
/// until none waits; sends those of busy keys to their keys' queues.
async fn run_mixed(shared: Arc<Shared>, shard: usize) {
    loop {
        let Some(batch) = next_batch(
            &mut shared.mixed[shard].lock().expect("not poisoned"),
            shared.max_batch,
        ) else {
            return;
        };
        for (request, reply) in decide(&shared.pool, false, batch).await {
            to_key_queue(&shared, request, reply);
        }
    }
}

/// Puts a request of a busy key in the key's queue, starting a runner of the key if it may.
fn to_key_queue(shared: &Arc<Shared>, request: Request, reply: Reply) {
    let key = request.key;
    let start = {
        let mut keys = shared.keys.lock().expect("not poisoned");
        let queue = keys.entry(key).or_default();
        queue.waiting.push((request, reply));
        let start = queue.runners < shared.per_key;
        if start {
            queue.runners += 1;
        }
        start
    };
    if start {
        tokio::spawn(run_key(shared.clone(), key));
    }
}

/// A runner of `key`: decides the key's waiting requests, a batch at a time, until none waits.
async fn run_key(shared: Arc<Shared>, key: KeyId) {
    loop {
        let batch = {
            let mut keys = shared.keys.lock().expect("not poisoned");
            let Some(queue) = keys.get_mut(&key) else {
                return;
            };
            let batch = next_batch(queue, shared.max_batch);
            if batch.is_none() && queue.runners == 0 {
                keys.remove(&key);
            }
            batch
        };
        let Some(batch) = batch else {
            return;
        };
        // Waiting for the key, no request answers busy.
        let busy = decide(&shared.pool, true, batch).await;
        debug_assert!(busy.is_empty());
    }
}

/// Decides a batch in one statement and answers each request, except those of keys that were
/// busy: those are handed back, with their replies.
async fn decide(
    pool: &PgPool,
    wait_for_keys: bool,
    mut batch: Vec<(Request, Reply)>,
) -> Vec<(Request, Reply)> {
    if batch.is_empty() {
        return Vec::new();
    }
    // Models' windows are shared by every key: each batch locks them in the same order.
    batch.sort_by(|(a, _), (b, _)| a.model.cmp(&b.model));
    let requests: Vec<&Request> = batch.iter().map(|(r, _)| r).collect();
    let decided = execute(pool, wait_for_keys, &requests).await;
    let mut busy = Vec::new();
    match decided {
        Ok(rows) if rows.len() == batch.len() => {
            for ((request, reply), admit) in batch.into_iter().zip(rows) {
                if admit.outcome == "busy" && !wait_for_keys {
                    busy.push((request, reply));
                } else {
                    // Dropped first: the caller takes its request body back from the `Arc`.
                    drop(request);
                    let _ = reply.send(Ok(admit));
                }
            }
        }
        Ok(rows) => {
            let message = format!(
                "tollgate.admit_many answered {} rows for {} requests",
                rows.len(),
                batch.len()
            );
            for (_, reply) in batch {
                let _ = reply.send(Err(sqlx::Error::Protocol(message.clone())));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, requests = batch.len(), "admission batch failed");
            for (_, reply) in batch {
                let _ = reply.send(Err(copy_of(&e)));
            }
        }
    }
    busy
}

async fn execute(
    pool: &PgPool,
    wait_for_keys: bool,
    requests: &[&Request],
) -> Result<Vec<Admit>, sqlx::Error> {
    use crate::store::column;
    sqlx::query_as(ADMIT_MANY_SQL)
        .bind(wait_for_keys)
        .bind(column(requests, |r| r.key))
        .bind(column(requests, |r| r.tokens))
        .bind(column(requests, |r| r.reserve))
        .bind(column(requests, |r| r.model.as_str()))
        .bind(column(requests, |r| r.model_rpm))
        .bind(column(requests, |r| r.model_tpm))
        .bind(column(requests, |r| r.idempotency_key.as_deref()))
        .bind(column(requests, |r| r.request_hash.as_slice()))
        .bind(column(requests, |r| r.job_id))
        .bind(column(requests, |r| Json(&*r.request)))
        .bind(column(requests, |r| r.history.as_ref().map(Json)))
        .bind(column(requests, |r| r.previous_response_id))
        .bind(column(requests, |r| Json(&r.outbox_payload)))
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

    fn request(key: KeyId) -> Request {
        Request {
            key,
            tokens: 1,
            reserve: 1,
            model: "m".into(),
            model_rpm: None,
            model_tpm: None,
            idempotency_key: None,
            request_hash: vec![0],
            job_id: Uuid::now_v7(),
            request: Arc::new(Value::Null),
            history: None,
            previous_response_id: None,
            outbox_payload: Value::Null,
        }
    }

    fn unreachable() -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap()
    }

    fn assert_unavailable(answer: Result<Admit, sqlx::Error>) {
        let e = answer.expect_err("no database, no admission");
        assert!(
            matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)),
            "{e:?}"
        );
    }

    /// Waits (a little) until no runner is left and nothing waits, mixed or per key.
    async fn assert_idle(batches: &Batches) {
        for _ in 0..100 {
            if batches.idle() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("runners or requests left behind");
    }

    /// With PostgreSQL out of reach, every request of a mixed batch gets its 503 error and the
    /// runners end.
    #[tokio::test]
    async fn a_failed_mixed_batch_answers_each_request_and_its_runners_end() {
        let batches = Arc::new(Batches::new(unreachable(), 1, 64));
        let answers = futures::future::join_all((0..5).map(|_| {
            let batches = batches.clone();
            async move { batches.admit(request(KeyId(Uuid::now_v7()))).await }
        }))
        .await;
        answers.into_iter().for_each(assert_unavailable);
        assert_idle(&batches).await;
    }

    /// The same for a busy key's own batches: each request answered, the key forgotten.
    #[tokio::test]
    async fn a_failed_key_batch_answers_each_request_and_forgets_the_key() {
        let batches = Batches::new(unreachable(), 1, 64);
        let key = KeyId(Uuid::now_v7());
        let answers: Vec<_> = (0..5)
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                to_key_queue(&batches.shared, request(key), reply);
                answer
            })
            .collect();
        assert_eq!(batches.shared.keys.lock().unwrap().len(), 1);
        for answer in answers {
            assert_unavailable(answer.await.expect("answered"));
        }
        assert_idle(&batches).await;
    }
}
