//! RabbitMQ: the topology tollgate declares, the job message (a documented contract other consumers
//! may rely on), the publisher the front uses after its commit, and the outbox relay.
//!
//! Topology (all durable, declared at start by every process, idempotently):
//! - direct exchange `amqp.exchange` → quorum queue `amqp.queue`, routing key [`ROUTING_KEY`];
//! - the queue dead-letters to fanout exchange `amqp.dead_letter_exchange` → quorum queue
//!   `amqp.dead_letter_queue`, with `x-delivery-limit` as a backstop against endless redelivery;
//!   a worker dead-letters a message it cannot process itself, adding the header
//!   [`REASON_HEADER`];
//! - delay queues `<queue>.retry.<n>` (classic, durable), one per retry level n = 1 …
//!   `worker.max_attempts - 1`: a job whose attempt n failed retryably waits in level n (per-message
//!   expiration, at most the level's `x-message-ttl`), then dead-letters back to the jobs exchange
//!   with routing key [`ROUTING_KEY`];
//! - delay queue `<queue>.retry.after` (classic, durable, `x-message-ttl` = `worker.retry_max_ms`)
//!   for a job whose upstream asked, with `Retry-After`, for a longer wait than its backoff; it
//!   dead-letters back the same way.

pub mod outbox;
mod publisher;

pub use publisher::{publish_on, publish_raw, Envelope, PublishError, Publisher};

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, ExchangeKind,
};
use serde::{Deserialize, Serialize};

use crate::{config::Config, ids::JobId};

/// Routing key of job messages on the jobs exchange.
pub const ROUTING_KEY: &str = "jobs";

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
pub async fn declare_topology(channel: &Channel, full: &Config) -> Result<(), lapin::Error> {
    let config = &full.amqp;
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let quorum = |extra: &[(&str, AMQPValue)]| {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        for (k, v) in extra {
            args.insert((*k).into(), v.clone());
        }
        args
    };

    channel
        .exchange_declare(
            config.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            config.dead_letter_queue.as_str().into(),
            durable_queue,
            quorum(&[]),
        )
        .await?;
    channel
        .queue_bind(
            config.dead_letter_queue.as_str().into(),
            config.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            config.queue.as_str().into(),
            durable_queue,
            quorum(&[
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(config.dead_letter_exchange.as_str().into()),
                ),
                (
                    "x-delivery-limit",
                    AMQPValue::LongInt(config.delivery_limit as i32),
                ),
            ]),
        )
        .await?;
    channel
        .queue_bind(
            config.queue.as_str().into(),
            config.exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let delay_queues = (1..full.worker.max_attempts)
        .map(|level| (config.retry_queue(level), full.worker.retry_delay(level)))
        .chain([(
            config.retry_after_queue(),
            std::time::Duration::from_millis(full.worker.retry_max_ms),
        )]);
    for (name, ttl) in delay_queues {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(config.exchange.as_str().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(ROUTING_KEY.into()),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(ttl.as_millis() as i64),
        );
        channel
            .queue_declare(name.as_str().into(), durable_queue, args)
            .await?;
    }
    Ok(())
}
