//! A consumer of tollgate's lifecycle events (README, "Lifecycle events"): spend per key per UTC
//! day, kept from the events alone — the figures of the view `tollgate.spend_by_key_day`, for the
//! jobs that finished while its queue existed.
//!
//! ```text
//! cargo run --example spend_per_key                          # queue spend-per-key, tollgate.events
//! cargo run --example spend_per_key -- my-queue my.events    # another queue, another exchange
//! ```
//!
//! `AMQP_URL` [`amqp://guest:guest@127.0.0.1:5672/%2f`]; the queue and the exchange may also come
//! from `SPEND_QUEUE` and `EVENTS_EXCHANGE`. It prints the table each time it changes; Ctrl-C
//! stops it. The queue stays (durable): events published meanwhile wait for the next run. Delete
//! it when you are done with it (`rabbitmqctl delete_queue spend-per-key`).
//!
//! What it shows of the contract:
//! - Bind a queue of your own to the topic exchange: tollgate publishes whether or not anybody
//!   listens, and each consumer gets its own copy of every event it bound for.
//! - Routing keys are `job.<status>.<model>`. A job ends once, with one of four terminal events,
//!   so binding those four (`job.completed.*`, …) gives one event per finished job, with its
//!   final cost. (A dot in a model name travels as `_`, so `*` matches any model.)
//! - Delivery is at least once: the same event may come twice, with the same `id` (also the
//!   AMQP `message_id`). Count each id once.
//! - Money is integer micro-dollars: add integers, never floats.
//! - A body whose `v` you do not know is not yours to guess at: reject it.
//!
//! The totals and the ids seen live in memory here, so a restart starts from zero (and the queue
//! holds only the events not yet acked). A real consumer writes the event id and the totals in one
//! database transaction (a unique event id makes the duplicate a no-op), then acks.

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
};

use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties, Consumer, ExchangeKind,
};
use serde_json::Value;
use uuid::Uuid;

/// The terminal events of any model: each finished job publishes exactly one of them.
pub const TERMINAL_BINDINGS: [&str; 4] = [
    "job.completed.*",
    "job.failed.*",
    "job.cancelled.*",
    "job.incomplete.*",
];

/// One key's finished jobs on one UTC day.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub jobs: u64,
    /// What the jobs really cost upstream.
    pub cost_micro_usd: i64,
    /// What the key's budget was charged (the cost, capped at what admission reserved).
    pub charged_micro_usd: i64,
}

/// Spend per (key id, UTC day the job finished), from terminal events.
#[derive(Debug, Default)]
pub struct Spend {
    pub by_key_day: BTreeMap<(Uuid, NaiveDate), Totals>,
    /// Events that came again and were not counted again.
    pub duplicates: u64,
    /// The id of every event counted: the dedup key.
    seen: HashSet<String>,
}

impl Spend {
    /// Counts one event body. `Ok(true)`: counted; `Ok(false)`: nothing to count (an event
    /// counted before, or one that does not end a job); `Err`: a body this consumer cannot read.
    pub fn apply(&mut self, event: &Value) -> Result<bool, String> {
        if event["v"] != 1 {
            return Err(format!("unknown event version {}", event["v"]));
        }
        let id = event["id"].as_str().ok_or("no id")?;
        let terminal = matches!(
            event["status"].as_str(),
            Some("completed" | "failed" | "cancelled" | "incomplete")
        );
        if !terminal {
            return Ok(false);
        }
        let key_id: Uuid = event["key_id"]
            .as_str()
            .and_then(|k| k.parse().ok())
            .ok_or("no key_id")?;
        let finished_at: DateTime<Utc> = event["finished_at"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .ok_or("no finished_at")?;
        if !self.seen.insert(id.to_string()) {
            self.duplicates += 1;
            return Ok(false);
        }
        let totals = self
            .by_key_day
            .entry((key_id, finished_at.date_naive()))
            .or_default();
        totals.jobs += 1;
        // Null when nothing was spent (a job cancelled before it ran).
        totals.cost_micro_usd += event["cost_micro_usd"].as_i64().unwrap_or(0);
        totals.charged_micro_usd += event["charged_micro_usd"].as_i64().unwrap_or(0);
        Ok(true)
    }

    /// The totals as a table, dollars with six decimals.
    pub fn table(&self) -> String {
        let usd = |micro: i64| format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000);
        let mut out = format!(
            "{:<36}  {:<10}  {:>6}  {:>14}  {:>14}\n",
            "key_id", "day", "jobs", "cost_usd", "charged_usd"
        );
        for ((key, day), t) in &self.by_key_day {
            out += &format!(
                "{key:<36}  {day:<10}  {:>6}  {:>14}  {:>14}\n",
                t.jobs,
                usd(t.cost_micro_usd),
                usd(t.charged_micro_usd)
            );
        }
        out
    }
}

/// A connection consuming the terminal events from a queue of our own.
pub struct Subscription {
    conn: Connection,
    consumer: Consumer,
}

/// Connects, declares the exchange (as tollgate does: durable topic; whichever starts first
/// creates it) and a durable quorum queue `queue` bound to it for the terminal events, and
/// starts consuming with manual acks.
pub async fn subscribe(
    amqp_url: &str,
    exchange: &str,
    queue: &str,
) -> Result<Subscription, lapin::Error> {
    let conn = Connection::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name("spend-per-key".into()),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // Durable and replicated: events wait here while this consumer is down.
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    for key in TERMINAL_BINDINGS {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    // At most this many unacked deliveries in hand.
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "spend-per-key".into(),
            BasicConsumeOptions::default(), // no_ack: false, so we ack each one
            FieldTable::default(),
        )
        .await?;
    Ok(Subscription { conn, consumer })
}

impl Subscription {
    /// Counts every event that comes, calling `on_change` after each one that changed the
    /// totals, until `shutdown` completes or the connection ends; returns the totals.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut on_change: impl FnMut(&Spend),
    ) -> Result<Spend, lapin::Error> {
        let mut spend = Spend::default();
        tokio::pin!(shutdown);
        loop {
            let delivery = tokio::select! {
                _ = &mut shutdown => break,
                next = self.consumer.next() => match next {
                    Some(delivery) => delivery?,
                    None => break,
                },
            };
            let applied = serde_json::from_slice::<Value>(&delivery.data)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(|event| spend.apply(&event));
            match applied {
                Ok(changed) => {
                    if changed {
                        on_change(&spend);
                    }
                    // Acked once counted (a real consumer: once committed). A crash before the
                    // ack brings the event again, which the dedup then skips.
                    delivery.ack(BasicAckOptions::default()).await?;
                }
                Err(why) => {
                    // Dropped, not requeued (it would come back forever); give the queue a
                    // dead-letter exchange to keep such messages for a look.
                    eprintln!("rejected a message: {why}");
                    delivery
                        .nack(BasicNackOptions {
                            requeue: false,
                            ..Default::default()
                        })
                        .await?;
                }
            }
        }
        self.conn.close(200, "done".into()).await?;
        Ok(spend)
    }
}

#[tokio::main]
async fn main() -> Result<(), lapin::Error> {
    let mut args = std::env::args().skip(1);
    let mut setting = |env: &str, default: &str| {
        args.next()
            .or_else(|| std::env::var(env).ok())
            .unwrap_or_else(|| default.into())
    };
    let queue = setting("SPEND_QUEUE", "spend-per-key");
    let exchange = setting("EVENTS_EXCHANGE", "tollgate.events");
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());

    let subscription = subscribe(&amqp_url, &exchange, &queue).await?;
    eprintln!("counting terminal events of {exchange} from queue {queue}; Ctrl-C stops");
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let spend = subscription
        .run(ctrl_c, |spend| println!("{}", spend.table()))
        .await?;
    eprintln!(
        "stopped: {} key-days, {} duplicate deliveries skipped",
        spend.by_key_day.len(),
        spend.duplicates
    );
    Ok(())
}
