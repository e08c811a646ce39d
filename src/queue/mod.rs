//! RabbitMQ: the topology tollgate declares, the job message (a documented contract other consumers
//! may rely on), the publisher the front uses after its commit, and the outbox relay.
//!
//! Topology (all durable, declared at start by every process, idempotently):
//! - direct exchange `amqp.exchange` → quorum queue `amqp.queue`, routing key [`ROUTING_KEY`];
//! - the queue dead-letters to fanout exchange `amqp.dead_letter_exchange` → quorum queue
//!   `amqp.dead_letter_queue`. A worker dead-letters a message it cannot process itself, adding
//!   the header [`REASON_HEADER`], and so it does with a message delivered `amqp.delivery_limit`
//!   times (a backstop against endless redelivery, read from `x-delivery-count`); the queue's
//!   own `x-delivery-limit` is a fixed, higher [`BROKER_DELIVERY_LIMIT`];
//! - delay queues (quorum, durable), where a message waits for its per-message expiration, then
//!   dead-letters back to the jobs exchange with routing key [`ROUTING_KEY`]:
//!   `<queue>.delay.<n>`, one per retry level n = 1 … `worker.max_attempts - 1`, for a job whose
//!   attempt n failed retryably; `<queue>.delay.after` for a job whose upstream asked, with
//!   `Retry-After`, for a longer wait than its backoff; `<queue>.delay.db` for a job whose worker
//!   could not reach PostgreSQL.
//!
//! - topic exchange `events.exchange` (`tollgate.events`): lifecycle events ([`events`]);
//! - webhooks (unless `webhooks.enabled` is false): quorum queue `webhooks.queue`, bound to the
//!   events exchange for terminal events ([`WEBHOOK_BINDINGS`]), dead-lettering to nothing; its
//!   delay queues `<queue>.delay.<n>` (quorum) dead-letter back to it through the default
//!   exchange; a delivery abandoned after its last retry is published to the quorum queue
//!   `<queue>.dead`.
//!
//! The topology is data ([`topology::steps`]): what is declared, in order, and the definitions
//! file `deploy/rabbitmq-definitions.json` (a test checks that it is the default topology).
//!
//! No argument depends on a setting, so settings can change between restarts (see
//! [`declare_topology`]).

pub mod events;
pub mod outbox;
mod publisher;
pub mod topology;

pub use publisher::{ConfirmChannel, Envelope, PublishError, Publisher};

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ConnectionProperties,
};
use serde::{Deserialize, Serialize};
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{AmqpConfig, Config},
    ids::JobId,
};
use topology::{Arg, Step};

/// Routing key of job messages on the jobs exchange.
pub const ROUTING_KEY: &str = "jobs";

/// The bindings of the webhooks queue to the events exchange: the terminal events, of any model.
pub const WEBHOOK_BINDINGS: [&str; 4] = [
    "job.completed.*",
    "job.failed.*",
    "job.cancelled.*",
    "job.incomplete.*",
];

/// Header naming why a worker dead-lettered a message.
pub const REASON_HEADER: &str = "x-tollgate-reason";

/// Version of [`JobMessage`]'s body; a consumer dead-letters versions it does not know.
pub const MESSAGE_VERSION: u32 = 1;

/// The body of a job message. The job itself is read from Postgres; the message only says which job
/// to run. The AMQP `message_id` property is the job id too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    /// Schema version of this body ([`MESSAGE_VERSION`]).
    pub v: u32,
    /// The job's public id (`resp_…`).
    pub job_id: String,
    pub model: String,
}

impl JobMessage {
    pub fn new(job_id: JobId, model: &str) -> Self {
        Self {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
            model: model.into(),
        }
    }
}

/// Declares tollgate's exchanges and queues (idempotent: same names, same arguments).
///
/// No queue argument depends on a setting that may change between restarts (delays travel as
/// per-message expirations, the delivery limit is enforced by the worker), because RabbitMQ
/// refuses to re-declare a queue with other arguments. A queue that exists with other arguments
/// all the same (declared by an earlier version, or by an operator) is kept as it is, with a
/// warning saying what differs: the process starts.
pub async fn declare_topology(conn: &Connection, full: &Config) -> Result<(), lapin::Error> {
    let mut channel = conn.create_channel().await?;
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for step in topology::steps(full) {
        match step {
            Step::Exchange { name, kind } => {
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        kind,
                        durable_exchange,
                        FieldTable::default(),
                    )
                    .await?;
            }
            Step::Queue { name, args } => {
                let mut table = FieldTable::default();
                for (key, value) in args {
                    let value = match value {
                        Arg::Text(text) => AMQPValue::LongString(text.as_str().into()),
                        Arg::Int(n) => AMQPValue::LongInt(n as i32),
                    };
                    table.insert(key.into(), value);
                }
                declare_queue(conn, &mut channel, &name, table).await?;
            }
            Step::Bind {
                queue,
                exchange,
                routing_key,
            } => bind(&channel, &queue, &exchange, &routing_key).await?,
        }
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Runs `consume` (one connection's worth of consuming) until `shutdown`, and again after each
/// failure, waiting 200 ms, doubling up to 10 s (back to 200 ms after a clean return).
pub async fn reconnecting<F, Fut>(what: &str, shutdown: &CancellationToken, mut consume: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match consume().await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "{what} lost RabbitMQ; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// How long one broker may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a connection named `<amqp.connection_name>-<role>` to one of `amqp.url`'s brokers: the
/// one this process last connected to if it answers, else the next that does, in the listed
/// order. So a process whose node stopped moves on to a surviving node of the cluster on its next
/// attempt, and comes back to no node it does not need to. The error is the last broker's.
pub async fn connect(amqp: &AmqpConfig, role: &str) -> Result<Connection, lapin::Error> {
    static LAST_GOOD: AtomicUsize = AtomicUsize::new(0);
    let urls = amqp.urls();
    let start = LAST_GOOD.load(Ordering::Relaxed);
    let mut last_error = None;
    for offset in 0..urls.len() {
        let index = (start + offset) % urls.len();
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{}-{role}", amqp.connection_name).into());
        let attempt = Connection::connect(urls[index], properties);
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(conn)) => {
                if LAST_GOOD.swap(index, Ordering::Relaxed) != index || offset > 0 {
                    tracing::info!(
                        broker = index + 1,
                        of = urls.len(),
                        role,
                        "connected to RabbitMQ"
                    );
                }
                return Ok(conn);
            }
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no AMQP handshake within {CONNECT_TIMEOUT:?}"),
            )
            .into(),
        };
        if urls.len() > 1 {
            tracing::warn!(broker = index + 1, of = urls.len(), role, error = %error, "RabbitMQ broker not reachable; trying the next");
        }
        last_error = Some(error);
    }
    Err(last_error.expect("the configuration names at least one broker"))
}

/// Declares a durable queue. If it exists with other arguments, RabbitMQ closes the channel
/// (`PRECONDITION_FAILED`): the queue is then checked passively on a new channel and kept, with a
/// warning naming the difference and what to do about it.
async fn declare_queue(
    conn: &Connection,
    channel: &mut Channel,
    name: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let refused = match channel.queue_declare(name.into(), durable, args).await {
        Ok(_) => return Ok(()),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == PRECONDITION_FAILED => {
                amqp.get_message().as_str().to_string()
            }
            // A classic queue whose node is down (one declared by an earlier version, which
            // declared its delay queues classic): the rest of the topology is declared, and the
            // process runs on the nodes that are up; what goes to that queue fails meanwhile.
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND => {
                tracing::warn!(
                    queue = name,
                    broker = %amqp.get_message(),
                    "the queue's node is down; declaring the rest of the topology without it"
                );
                *channel = conn.create_channel().await?;
                return Ok(());
            }
            _ => return Err(e),
        },
    };
    *channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await?;
    tracing::warn!(
        queue = name,
        broker = %refused,
        "the queue exists with other arguments than tollgate declares; it is kept as it is. \
         To use tollgate's, let it drain, delete it, and restart (or apply a policy)"
    );
    Ok(())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The reply code RabbitMQ closes a channel with when a declaration does not match what exists.
const PRECONDITION_FAILED: u16 = 406;
const NOT_FOUND: u16 = 404;
