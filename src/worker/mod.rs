//! The worker: a RabbitMQ consumer that runs admitted jobs. It never runs admission.
//!
//! Error policy, in one place:
//! - a message it cannot understand (not JSON, unknown schema version, not a job id, no such job)
//!   is rejected without requeue, so the queue dead-letters it — never an endless loop;
//! - a message for a finished job (a redelivery, a second publish) is acked and skipped;
//! - a message for a job another worker is running waits until that worker's lease lapses, then
//!   takes the job over (the other worker is gone) or finds it finished;
//! - an upstream failure ends the job `failed` with the error stored;
//! - a PostgreSQL failure hands the message back (nack + requeue) so the job runs again later;
//! - on shutdown it stops taking messages and hands back those it has not finished.

mod job;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::FieldTable,
    Connection, ConnectionProperties,
};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, queue};

/// What to do with a delivery once it has been handled.
#[derive(Debug, PartialEq)]
pub enum Disposition {
    Ack,
    /// Hand it back to the queue to be delivered again.
    Requeue,
    /// Reject it to the dead-letter queue.
    DeadLetter(String),
}

#[derive(Clone)]
pub struct Worker {
    pool: PgPool,
    config: Arc<Config>,
    http: reqwest::Client,
}

impl Worker {
    pub fn new(pool: PgPool, config: Arc<Config>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the HTTP client builds");
        Self { pool, config, http }
    }

    /// Consumes jobs until `shutdown` is cancelled, reconnecting to RabbitMQ with backoff whenever
    /// the connection is lost.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "worker lost RabbitMQ; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One connection's worth of consuming. Returns when the consumer ends (connection lost) or on
    /// shutdown, after the jobs it started are finished or handed back.
    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let amqp = &self.config.amqp;
        let conn = Connection::connect(
            &amqp.url,
            ConnectionProperties::default().with_connection_name("tollgate-worker".into()),
        )
        .await?;
        let channel = conn.create_channel().await?;
        queue::declare_topology(&channel, amqp).await?;
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
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "job task panicked");
                    }
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let worker = self.clone();
                        let stop = shutdown.clone();
                        running.spawn(async move { worker.handle(delivery, stop).await });
                    }
                    None => break Err(anyhow::anyhow!("the RabbitMQ consumer ended")),
                    Some(Err(e)) => break Err(e.into()),
                }
            }
        };
        // Jobs in hand finish (or, on shutdown, hand their message back) before we go.
        while let Some(done) = running.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "job task panicked");
            }
        }
        let _ = conn.close(200, "worker stopping".into()).await;
        outcome
    }

    async fn handle(&self, delivery: Delivery, shutdown: CancellationToken) {
        let disposition = self.process(&delivery.data, &shutdown).await;
        let result = match &disposition {
            Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
            Disposition::Requeue => {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            }
            Disposition::DeadLetter(reason) => {
                tracing::error!(%reason, "message dead-lettered");
                delivery
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await
            }
        };
        if let Err(e) = result {
            // The channel is gone; RabbitMQ redelivers the message to the next consumer.
            tracing::warn!(error = %e, ?disposition, "could not settle delivery");
        }
    }

    /// Decides a delivery's fate: parses the message and runs its job.
    pub async fn process(&self, body: &[u8], shutdown: &CancellationToken) -> Disposition {
        let message: queue::JobMessage = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) => return Disposition::DeadLetter(format!("malformed job message: {e}")),
        };
        if message.v != queue::MESSAGE_VERSION {
            return Disposition::DeadLetter(format!("unknown message version {}", message.v));
        }
        let Some(job_id) = crate::ids::JobId::parse_public(&message.job_id) else {
            return Disposition::DeadLetter(format!("not a job id: {:?}", message.job_id));
        };
        job::run(self, job_id, shutdown).await
    }
}
