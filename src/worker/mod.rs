//! The worker: a RabbitMQ consumer that runs admitted jobs. It never runs admission.
//!
//! Delivery is at least once; effects in PostgreSQL are effectively once, because every write is
//! a transition guarded by the job's status and attempt (see `store::jobs`).
//!
//! Error policy, in one place:
//! - a message it cannot understand (not JSON, unknown schema version, not a job id, no such job)
//!   is dead-lettered with the reason in the `x-tollgate-reason` header — never an endless loop;
//! - a message delivered `amqp.delivery_limit` times (`x-delivery-count`) is dead-lettered the
//!   same way and its job, if still `queued`, fails with code `delivery_limit`;
//! - a message for a finished job (a redelivery, a second publish) is acked and skipped;
//! - a message for a job another attempt holds (a duplicate) is acked and dropped at once: the
//!   running attempt's own message finishes the job, and if its worker dies, the lease lapses
//!   and the sweeper puts the job back with a new message — so a duplicate never holds a slot;
//! - a retryable upstream failure (connection, timeout before the first token, a stream cut off
//!   before its end marker, 408, 409, 429, 5xx) puts the job back to `queued` and its message into
//!   the delay queue of that attempt (or, when the upstream's `Retry-After` asks for longer, into
//!   `delay.after` for that long), until `worker.max_attempts`; then, or for any other upstream
//!   failure, the job ends `failed` with the error stored; either way what the attempt streamed is
//!   charged (see `billing`);
//! - a length or content-filter stop ends the job `incomplete`, with its reason;
//! - a job cancelled while running is stopped at once (NOTIFY `tollgate_job_cancelled`; failing
//!   that, at its next write or lease renewal);
//! - a PostgreSQL failure sends the message to wait in `delay.db` (1 s, doubling up to
//!   `worker.db_retry_max_ms`) and acks it: a new message each time, so an outage of any length
//!   never uses up the delivery limit nor strands a job, and no worker spins on it;
//! - on shutdown it stops taking messages, lets running jobs finish for
//!   `worker.shutdown_grace_seconds`, then hands back the unfinished ones (nack + requeue).

mod job;
mod writer;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable},
};
use rand::Rng;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    ids::JobId,
    metrics,
    queue::{self, ConfirmChannel, Envelope, JobMessage},
    store::jobs,
};

/// What to do with a delivery once it has been handled.
#[derive(Debug, PartialEq)]
pub enum Disposition {
    Ack,
    /// Hand it back to the queue to be delivered again.
    Requeue,
    /// Send it to the dead-letter queue: the reason's kind (a metric label), and the reason.
    DeadLetter(&'static str, String),
    /// PostgreSQL could not be reached: send the message to wait in the database delay queue.
    DatabaseDown,
    /// The job is `queued` again: send its message through the delay queue of `level`, or, when
    /// the upstream asked for a longer wait (`Retry-After`), through the delay queue for that.
    RetryLater {
        message: JobMessage,
        level: u32,
        not_before: Option<Duration>,
    },
}

#[derive(Clone)]
pub struct Worker {
    pool: PgPool,
    config: Arc<Config>,
    /// One HTTP client per model, each with the model's connect timeout.
    http: Arc<HashMap<String, reqwest::Client>>,
    /// Running jobs, to stop when their cancellation is announced.
    running: Arc<Mutex<HashMap<JobId, CancellationToken>>>,
    /// Claims, streamed output and finishes of every running job, many jobs per statement.
    claims: writer::Group<JobId, Result<jobs::Claim, sqlx::Error>>,
    writer: writer::Group<jobs::Append, bool>,
    finishes: writer::Group<(JobId, i32, jobs::Outcome), bool>,
}

/// Channel on which PostgreSQL announces cancelled running jobs.
const CANCEL_CHANNEL: &str = "tollgate_job_cancelled";

impl Worker {
    pub fn new(pool: PgPool, config: Arc<Config>) -> Self {
        let http = config
            .models
            .iter()
            .map(|m| {
                let client = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(m.connect_timeout_seconds))
                    .build()
                    .expect("the HTTP client builds");
                (m.name.clone(), client)
            })
            .collect();
        Self {
            claims: {
                let (pool, lease) = (pool.clone(), config.worker.lease_seconds);
                writer::Group::start(move |ids: Vec<JobId>| {
                    let pool = pool.clone();
                    async move { jobs::claim_many(&pool, &ids, lease).await }
                })
            },
            writer: {
                let pool = pool.clone();
                writer::Group::start(move |appends: Vec<jobs::Append>| {
                    let pool = pool.clone();
                    async move {
                        let written = jobs::append_many(&pool, &appends).await?;
                        Ok(appends.iter().map(|a| written.contains(&a.id)).collect())
                    }
                })
            },
            finishes: {
                let pool = pool.clone();
                writer::Group::start(move |ends: Vec<(JobId, i32, jobs::Outcome)>| {
                    let pool = pool.clone();
                    async move {
                        let finishes: Vec<jobs::Finish> = ends
                            .iter()
                            .map(|(id, attempt, outcome)| jobs::Finish {
                                id: *id,
                                attempt: *attempt,
                                outcome,
                            })
                            .collect();
                        jobs::finish_many(&pool, &finishes).await
                    }
                })
            },
            pool,
            config,
            http: Arc::new(http),
            running: Arc::default(),
        }
    }

    /// Consumes jobs until `shutdown` is cancelled, reconnecting to RabbitMQ with backoff whenever
    /// the connection is lost.
    pub async fn run(self, shutdown: CancellationToken) {
        let abort = CancellationToken::new();
        let listener = tokio::spawn(self.clone().listen_for_cancels(shutdown.clone()));
        queue::reconnecting("worker", &shutdown, || self.consume(&shutdown, &abort)).await;
        listener.abort();
    }

    /// One connection's worth of consuming. Returns on shutdown, after running jobs finished or
    /// were handed back, or with an error when the connection is lost (running jobs then go on
    /// and finish on their own; their messages are redelivered and skipped).
    async fn consume(
        &self,
        shutdown: &CancellationToken,
        abort: &CancellationToken,
    ) -> anyhow::Result<()> {
        let amqp = &self.config.amqp;
        let conn = Arc::new(crate::queue::connect(amqp, "worker").await?);
        queue::declare_topology(&conn, &self.config).await?;
        let channel = conn.create_channel().await?;
        let publish = Arc::new(ConfirmChannel::open(conn.clone(), amqp.publish_timeout()).await?);
        channel
            .basic_qos(self.config.worker.concurrency, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                amqp.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %amqp.queue, concurrency = self.config.worker.concurrency, "worker consuming");

        let mut running = JoinSet::new();
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(done) = running.join_next(), if !running.is_empty() => log_panic(done),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (worker, publish, abort) = (self.clone(), publish.clone(), abort.clone());
                        running.spawn(async move {
                            let _running = metrics::InFlight::start(metrics::WORKER_IN_FLIGHT);
                            worker.handle(delivery, &publish, &abort).await
                        });
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(anyhow::anyhow!("the RabbitMQ consumer ended")),
                }
            }
        };
        if outcome.is_err() {
            running.detach_all();
            return outcome;
        }
        // Shutdown: take no more messages, give running jobs their grace period.
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let grace = Duration::from_secs(self.config.worker.shutdown_grace_seconds);
        if !running.is_empty() {
            tracing::info!(
                jobs = running.len(),
                ?grace,
                "waiting for running jobs to finish"
            );
        }
        let drain = async {
            while let Some(done) = running.join_next().await {
                log_panic(done);
            }
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!("grace period over; handing back unfinished jobs");
            abort.cancel();
            while let Some(done) = running.join_next().await {
                log_panic(done);
            }
        }
        let _ = conn.close(200, "worker stopping".into()).await;
        Ok(())
    }

    async fn handle(
        &self,
        delivery: Delivery,
        publish: &ConfirmChannel,
        abort: &CancellationToken,
    ) {
        let headers = delivery.properties.headers().as_ref();
        let deliveries = header_u32(headers, DELIVERY_COUNT_HEADER);
        let db_failures = header_u32(headers, DB_FAILURES_HEADER);
        let disposition = self.process(&delivery.data, deliveries, abort).await;
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        let result = match disposition {
            Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
            Disposition::Requeue => delivery.nack(requeue).await,
            Disposition::DatabaseDown => {
                let failures = db_failures + 1;
                let delay = self.config.worker.db_retry_delay(failures);
                let queue_name = self.config.amqp.db_retry_queue();
                let mut headers = FieldTable::default();
                headers.insert(DB_FAILURES_HEADER.into(), AMQPValue::LongUInt(failures));
                let envelope = Envelope {
                    exchange: "",
                    routing_key: &queue_name,
                    expiration_ms: Some(delay.as_millis() as u64),
                    headers: Some(headers),
                };
                let id = message_id(&delivery);
                match publish.publish(&delivery.data, &id, envelope).await {
                    Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                    Err(e) => {
                        // Neither PostgreSQL nor the delay queue: give it back, not at once.
                        tracing::warn!(error = %e, "could not delay the message; requeueing");
                        tokio::select! {
                            _ = abort.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        delivery.nack(requeue).await
                    }
                }
            }
            Disposition::RetryLater {
                message,
                level,
                not_before,
            } => {
                let (queue_name, delay_ms) = self.retry_route(level, not_before);
                let envelope = Envelope {
                    exchange: "",
                    routing_key: &queue_name,
                    expiration_ms: Some(delay_ms),
                    headers: None,
                };
                match publish.publish_job(&message, envelope).await {
                    Ok(()) => {
                        tracing::info!(job_id = %message.job_id, level, delay_ms, queue = %queue_name, "retry scheduled");
                        delivery.ack(BasicAckOptions::default()).await
                    }
                    Err(e) => {
                        // The job is queued; an immediate redelivery runs it without the delay.
                        tracing::warn!(error = %e, "could not schedule the retry; requeueing now");
                        delivery.nack(requeue).await
                    }
                }
            }
            Disposition::DeadLetter(kind, reason) => {
                tracing::error!(%reason, "message dead-lettered");
                metrics::counter!(metrics::DEAD_LETTERED, "reason" => kind).increment(1);
                let mut headers = FieldTable::default();
                headers.insert(
                    queue::REASON_HEADER.into(),
                    AMQPValue::LongString(reason.as_str().into()),
                );
                let envelope = Envelope {
                    exchange: &self.config.amqp.dead_letter_exchange,
                    routing_key: "",
                    expiration_ms: None,
                    headers: Some(headers),
                };
                let id = message_id(&delivery);
                match publish.publish(&delivery.data, &id, envelope).await {
                    Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                    // RabbitMQ's own dead-lettering, without our reason header.
                    Err(_) => delivery.nack(BasicNackOptions::default()).await,
                }
            }
        };
        if let Err(e) = result {
            // The channel is gone; RabbitMQ redelivers the message to the next consumer.
            tracing::warn!(error = %e, "could not settle delivery");
        }
    }

    /// The delay queue and delay before the attempt after `level` failed ones: the backoff (minus up
    /// to 20% jitter) in that level's queue or, when the upstream asked for longer
    /// (`Retry-After`), that wait, at most `worker.retry_max_ms`, in the `retry.after` queue.
    fn retry_route(&self, level: u32, not_before: Option<Duration>) -> (String, u64) {
        let settings = &self.config.worker;
        let backoff = settings.retry_delay(level).as_millis() as u64;
        let jittered = backoff - rand::rng().random_range(0..=backoff / 5);
        match not_before.map(|d| d.as_millis() as u64) {
            Some(wait) if wait > jittered => (
                self.config.amqp.retry_after_queue(),
                wait.min(settings.retry_max_ms).max(jittered),
            ),
            _ => (self.config.amqp.retry_queue(level), jittered),
        }
    }

    /// Decides a delivery's fate: parses the message and runs its job. `deliveries` is how many
    /// times RabbitMQ delivered it before (`x-delivery-count`).
    pub async fn process(
        &self,
        body: &[u8],
        deliveries: u32,
        abort: &CancellationToken,
    ) -> Disposition {
        let message: JobMessage = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) => {
                return Disposition::DeadLetter("malformed", format!("malformed job message: {e}"))
            }
        };
        if message.v != queue::MESSAGE_VERSION {
            return Disposition::DeadLetter(
                "unknown_version",
                format!("unknown message version {}", message.v),
            );
        }
        let Some(job_id) = JobId::parse_public(&message.job_id) else {
            return Disposition::DeadLetter(
                "bad_job_id",
                format!("not a job id: {:?}", message.job_id),
            );
        };
        let limit = self.config.amqp.delivery_limit;
        if deliveries >= limit {
            let reason = format!("delivered {deliveries} times, the limit is {limit}");
            return match jobs::fail_queued(&self.pool, job_id, "delivery_limit", &reason).await {
                Ok(_) => Disposition::DeadLetter("delivery_limit", reason),
                Err(e) => {
                    tracing::warn!(%job_id, error = %e, "could not fail the job at its delivery limit");
                    Disposition::DatabaseDown
                }
            };
        }
        job::run(self, job_id, abort).await
    }

    /// Registers a running job; the token is cancelled if the job is cancelled meanwhile.
    fn track(&self, id: JobId) -> Tracked {
        let token = CancellationToken::new();
        self.running
            .lock()
            .expect("running-jobs lock")
            .insert(id, token.clone());
        Tracked {
            worker: self.clone(),
            id,
            token,
        }
    }

    /// Stops running jobs whose cancellation PostgreSQL announces. If the listener is down, jobs
    /// still notice at their next write or lease renewal.
    async fn listen_for_cancels(self, shutdown: CancellationToken) {
        loop {
            let listened = self.listen_once();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = listened => if let Err(e) = result {
                    tracing::warn!(error = %e, "cancel listener lost PostgreSQL; reconnecting");
                },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

impl Worker {
    async fn listen_once(&self) -> Result<(), sqlx::Error> {
        let mut listener = crate::store::listener(&self.pool, &self.config.database).await?;
        listener.listen(CANCEL_CHANNEL).await?;
        loop {
            let notification = listener.recv().await?;
            let Ok(uuid) = uuid::Uuid::parse_str(notification.payload()) else {
                continue;
            };
            let running = self.running.lock().expect("running-jobs lock");
            if let Some(token) = running.get(&JobId(uuid)) {
                token.cancel();
            }
        }
    }
}

/// A job registered as running; unregistered when dropped.
struct Tracked {
    worker: Worker,
    id: JobId,
    token: CancellationToken,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.worker
            .running
            .lock()
            .expect("running-jobs lock")
            .remove(&self.id);
    }
}

/// Header RabbitMQ's quorum queues set on a redelivered message: its earlier deliveries.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Header counting how many times in a row a worker could not reach PostgreSQL for this job.
const DB_FAILURES_HEADER: &str = "x-tollgate-db-failures";

/// A numeric header's value, 0 when absent.
fn header_u32(headers: Option<&FieldTable>, name: &str) -> u32 {
    let found = headers.and_then(|h| h.inner().iter().find(|(k, _)| k.as_str() == name));
    let Some((_, value)) = found else {
        return 0;
    };
    match value {
        AMQPValue::LongUInt(n) => *n,
        AMQPValue::LongInt(n) => (*n).max(0) as u32,
        AMQPValue::LongLongInt(n) => (*n).clamp(0, u32::MAX as i64) as u32,
        AMQPValue::ShortInt(n) => (*n).max(0) as u32,
        AMQPValue::ShortUInt(n) => *n as u32,
        AMQPValue::ShortShortUInt(n) => *n as u32,
        AMQPValue::ShortShortInt(n) => (*n).max(0) as u32,
        _ => 0,
    }
}

fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "job task panicked");
    }
}
