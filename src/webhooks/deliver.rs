//! The webhook deliverer: a RabbitMQ consumer of `webhooks.queue`, run by every worker process.
//!
//! The queue holds two kinds of message: terminal lifecycle events (from the events exchange),
//! and retries ([`Retry`], back from a delay queue) of one event for one endpoint. An event is
//! tried once at each endpoint of its key that wants its type; each failure becomes a retry
//! message, published (confirmed) to the delay queue of its level before the event is acked, so
//! no failed delivery is forgotten. If that publish fails, the message is given back and tried
//! again: the endpoints that had answered may then get the event twice, with the same
//! `webhook-id`.
//!
//! Endpoints are kept in memory: re-read when PostgreSQL announces a change
//! (`tollgate_webhook_endpoints`), and every `webhooks.refresh_ms` in case an announcement was
//! missed.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{payload, send, sign::Secret, ssrf, webhook_type, Sent};
use crate::{
    config::Config,
    metrics,
    queue::{
        self,
        events::{JobEvent, EVENT_VERSION},
        ConfirmChannel, Envelope,
    },
    store::webhooks as store,
};

/// Version of [`Retry`]'s body.
const RETRY_VERSION: u32 = 1;

/// A delivery of one event to one endpoint, waiting for its next attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Retry {
    v: u32,
    endpoint_id: Uuid,
    /// The attempt to make (2 for the first retry).
    attempt: i32,
    event_id: String,
    event_type: String,
    job_id: Uuid,
    /// The body, byte for byte the one sent before.
    payload: String,
}

/// What the webhooks queue delivers, told apart by routing key: a retry comes back from its
/// delay queue with the webhooks queue's name, an event keeps its own (`job.<status>.<model>`).
enum Incoming {
    Retry(Retry),
    Event(Box<JobEvent>),
}

impl Incoming {
    /// Reads a message; the error says why it cannot be handled (it is then dead-lettered).
    fn read(routing_key: &str, webhooks_queue: &str, body: &[u8]) -> Result<Self, String> {
        if routing_key != webhooks_queue {
            let event: JobEvent =
                serde_json::from_slice(body).map_err(|e| format!("not a lifecycle event: {e}"))?;
            if event.v != EVENT_VERSION {
                return Err(format!("lifecycle event of unknown version {}", event.v));
            }
            return Ok(Self::Event(Box::new(event)));
        }
        let retry: Retry =
            serde_json::from_slice(body).map_err(|e| format!("not a webhook retry: {e}"))?;
        if retry.v != RETRY_VERSION || retry.attempt < 2 {
            return Err(format!(
                "webhook retry of unknown version {} or attempt {}",
                retry.v, retry.attempt
            ));
        }
        Ok(Self::Retry(retry))
    }
}

/// A live endpoint, ready to sign for.
struct Endpoint {
    id: Uuid,
    url: url::Url,
    types: Option<Vec<String>>,
    secret: Secret,
}

impl Endpoint {
    fn wants(&self, kind: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == kind))
    }
}

#[derive(Default)]
struct Endpoints {
    by_key: HashMap<Uuid, Vec<Arc<Endpoint>>>,
    by_id: HashMap<Uuid, Arc<Endpoint>>,
}

/// Channel on which PostgreSQL announces a change of the endpoints.
const ENDPOINTS_CHANNEL: &str = "tollgate_webhook_endpoints";

#[derive(Clone)]
pub struct Deliverer {
    pool: PgPool,
    config: Arc<Config>,
    policy: ssrf::AddressPolicy,
    http: reqwest::Client,
    endpoints: Arc<RwLock<Arc<Endpoints>>>,
}

impl Deliverer {
    /// Fails when `webhooks.allow_networks` is not a list of networks.
    pub fn new(pool: PgPool, config: Arc<Config>) -> Result<Self, String> {
        let policy = ssrf::AddressPolicy::new(&config.webhooks.allow_networks)?;
        let http = ssrf::client(&policy, Duration::from_millis(config.webhooks.timeout_ms));
        Ok(Self {
            pool,
            config,
            policy,
            http,
            endpoints: Arc::default(),
        })
    }

    /// Registers the configured endpoints, then delivers until `shutdown`, reconnecting to
    /// RabbitMQ with backoff whenever the connection is lost.
    pub async fn run(self, shutdown: CancellationToken) {
        self.register_configured().await;
        let mut backoff = Duration::from_millis(200);
        // Deliver nothing before the endpoints are known: an event would find none and be
        // acked.
        while let Err(e) = self.reload().await {
            tracing::warn!(error = %e, retry_in = ?backoff, "cannot read the webhook endpoints; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        let refresher = tokio::spawn(self.clone().refresh(shutdown.clone()));
        queue::reconnecting("webhook deliverer", &shutdown, || self.consume(&shutdown)).await;
        refresher.abort();
    }

    /// Adds (or updates) the endpoints declared in the configuration. One that is refused is
    /// logged and skipped; the others are registered.
    async fn register_configured(&self) {
        for declared in &self.config.webhooks.endpoints {
            match super::add_endpoint(
                &self.pool,
                &self.config,
                declared.key_id,
                &declared.url,
                Some(&declared.events),
                Some(&declared.secret),
            )
            .await
            {
                Ok((id, _)) => {
                    tracing::info!(endpoint_id = %id, url = %declared.url, "webhook endpoint from the configuration registered")
                }
                Err(e) => {
                    tracing::error!(url = %declared.url, error = %e, "webhook endpoint from the configuration refused")
                }
            }
        }
    }

    /// Reads the live endpoints again.
    async fn reload(&self) -> Result<(), sqlx::Error> {
        let mut endpoints = Endpoints::default();
        for row in store::live(&self.pool).await? {
            let (url, secret) = match (url::Url::parse(&row.url), Secret::parse(&row.secret)) {
                (Ok(url), Ok(secret)) => (url, secret),
                _ => {
                    tracing::error!(endpoint_id = %row.id, "webhook endpoint has an unreadable URL or secret; skipped");
                    continue;
                }
            };
            let endpoint = Arc::new(Endpoint {
                id: row.id,
                url,
                types: row.event_types,
                secret,
            });
            endpoints
                .by_key
                .entry(row.key_id)
                .or_default()
                .push(endpoint.clone());
            endpoints.by_id.insert(row.id, endpoint);
        }
        *self.endpoints.write().expect("endpoints lock") = Arc::new(endpoints);
        Ok(())
    }

    /// Re-reads the endpoints on each announcement, and every `refresh_ms`.
    async fn refresh(self, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.config.webhooks.refresh_ms);
        let mut listener = None;
        loop {
            if listener.is_none() {
                listener = match crate::store::listener(&self.pool, &self.config.database).await {
                    Ok(mut l) => l.listen(ENDPOINTS_CHANNEL).await.ok().map(|_| l),
                    Err(_) => None,
                };
                // Whatever changed while nobody listened.
                let _ = self.reload().await;
            }
            let announced = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ok = announced => if !ok { listener = None; },
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "cannot re-read the webhook endpoints; keeping the ones known");
            }
        }
    }

    fn snapshot(&self) -> Arc<Endpoints> {
        self.endpoints.read().expect("endpoints lock").clone()
    }

    /// One connection's worth of consuming; returns on shutdown (after the deliveries in
    /// progress) or when the connection is lost.
    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let amqp = &self.config.amqp;
        let conn = Arc::new(crate::queue::connect(amqp, "webhooks").await?);
        queue::declare_topology(&conn, &self.config).await?;
        let channel = conn.create_channel().await?;
        let publish = Arc::new(ConfirmChannel::open(conn.clone(), amqp.publish_timeout()).await?);
        channel
            .basic_qos(self.config.webhooks.concurrency, BasicQosOptions::default())
            .await?;
        let queue_name = &self.config.webhooks.queue;
        let mut consumer = channel
            .basic_consume(
                queue_name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %queue_name, "webhook deliverer consuming");
        let mut running = JoinSet::new();
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(_) = running.join_next(), if !running.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (me, publish) = (self.clone(), publish.clone());
                        running.spawn(async move { me.handle(delivery, &publish).await });
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
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        // Deliveries in progress finish (each is bounded by the timeout); what is not acked by
        // then is delivered again.
        let grace = Duration::from_millis(self.config.webhooks.timeout_ms);
        let _ = tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        let _ = conn.close(200, "webhook deliverer stopping".into()).await;
        Ok(())
    }

    /// Handles one message and acks it, or gives it back when a follow-up could not be
    /// scheduled.
    async fn handle(&self, delivery: Delivery, publish: &ConfirmChannel) {
        let incoming = Incoming::read(
            delivery.routing_key.as_str(),
            &self.config.webhooks.queue,
            &delivery.data,
        );
        let scheduled = match incoming {
            Ok(Incoming::Event(event)) => self.deliver_event(&event, publish).await,
            Ok(Incoming::Retry(retry)) => match self.snapshot().by_id.get(&retry.endpoint_id) {
                Some(endpoint) => self.attempt(endpoint, retry, publish).await,
                None => {
                    tracing::info!(endpoint_id = %retry.endpoint_id, event_id = %retry.event_id, "webhook endpoint removed; retry dropped");
                    true
                }
            },
            Err(reason) => {
                tracing::error!(%reason, "webhook message dead-lettered");
                self.dead_letter(publish, &delivery.data, &reason).await
            }
        };
        let done = if scheduled {
            delivery.ack(BasicAckOptions::default()).await
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not settle a webhook message; RabbitMQ delivers it again");
        }
    }

    /// Tries an event at each endpoint of its key that wants it. Returns whether every
    /// follow-up was scheduled.
    async fn deliver_event(&self, event: &JobEvent, publish: &ConfirmChannel) -> bool {
        let Some(kind) = webhook_type(&event.status) else {
            return true;
        };
        let endpoints = self.snapshot();
        let Some(of_key) = endpoints.by_key.get(&event.key_id) else {
            return true;
        };
        let Some(job) = event.job() else {
            tracing::error!(job_id = %event.job_id, "lifecycle event with an unreadable job id; no webhook");
            return true;
        };
        let body = payload(event, kind);
        let attempts = of_key.iter().filter(|e| e.wants(kind)).map(|endpoint| {
            let first = Retry {
                v: RETRY_VERSION,
                endpoint_id: endpoint.id,
                attempt: 1,
                event_id: event.id.clone(),
                event_type: kind.to_string(),
                job_id: job.0,
                payload: body.clone(),
            };
            self.attempt(endpoint, first, publish)
        });
        futures::future::join_all(attempts)
            .await
            .into_iter()
            .all(|scheduled| scheduled)
    }

    /// Makes one attempt, schedules what follows a failure (a retry, or the dead-letter queue
    /// after the last), and records it. Returns whether the follow-up was scheduled.
    #[tracing::instrument(skip_all, fields(endpoint_id = %endpoint.id, event_id = %delivery.event_id, attempt = delivery.attempt))]
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        delivery: Retry,
        publish: &ConfirmChannel,
    ) -> bool {
        let started = Instant::now();
        let sent: Sent = send(
            &self.http,
            &self.policy,
            &endpoint.url,
            &endpoint.secret,
            &delivery.event_id,
            &delivery.payload,
        )
        .await;
        let latency = started.elapsed();
        metrics::histogram!(metrics::WEBHOOK_DELIVERY_SECONDS).record(latency);
        let delivered = matches!(sent, Ok(code) if (200..300).contains(&code));
        let schedule = &self.config.webhooks.retry_schedule_secs;
        let (outcome, scheduled) = if delivered {
            ("delivered", true)
        } else if let Some(wait) = schedule.get(delivery.attempt.max(1) as usize - 1) {
            let next = Retry {
                attempt: delivery.attempt + 1,
                ..delivery.clone()
            };
            let level = delivery.attempt.max(1) as usize;
            let queue_name = self.config.webhooks.retry_queue(level);
            let body = serde_json::to_vec(&next).expect("a retry serialises");
            let envelope = Envelope {
                exchange: "",
                routing_key: &queue_name,
                expiration_ms: Some(wait * 1000),
                headers: None,
            };
            (
                "retrying",
                self.publish(publish, &body, &next.event_id, envelope).await,
            )
        } else {
            let body = serde_json::to_vec(&delivery).expect("a retry serialises");
            let reason = format!(
                "no 2xx answer after {} attempts: {}",
                delivery.attempt,
                super::error_of(&sent).unwrap_or_default()
            );
            ("dead", self.dead_letter(publish, &body, &reason).await)
        };
        metrics::counter!(metrics::WEBHOOK_DELIVERIES, "outcome" => outcome).increment(1);
        if !delivered {
            tracing::info!(outcome, error = ?super::error_of(&sent), "webhook delivery failed");
        }
        let record = store::Attempt {
            endpoint_id: endpoint.id,
            event_id: delivery.event_id,
            event_type: delivery.event_type,
            job_id: delivery.job_id,
            attempt: delivery.attempt,
            outcome,
            status_code: sent.as_ref().ok().map(|c| i32::from(*c)),
            latency_ms: Some(latency.as_millis().min(i32::MAX as u128) as i32),
            error: super::error_of(&sent),
            replay: false,
            payload: delivery.payload,
        };
        if let Err(e) = store::record(&self.pool, &record).await {
            tracing::warn!(error = %e, "could not record a webhook delivery attempt");
        }
        scheduled
    }

    /// Publishes to `<queue>.dead` with the reason in the `x-tollgate-reason` header.
    async fn dead_letter(&self, publish: &ConfirmChannel, body: &[u8], reason: &str) -> bool {
        let mut headers = FieldTable::default();
        headers.insert(
            queue::REASON_HEADER.into(),
            AMQPValue::LongString(reason.into()),
        );
        let dead = self.config.webhooks.dead_letter_queue();
        let envelope = Envelope {
            exchange: "",
            routing_key: &dead,
            expiration_ms: None,
            headers: Some(headers),
        };
        self.publish(publish, body, "webhook", envelope).await
    }

    async fn publish(
        &self,
        channel: &ConfirmChannel,
        body: &[u8],
        message_id: &str,
        envelope: Envelope<'_>,
    ) -> bool {
        match channel.publish(body, message_id, envelope).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not schedule a webhook follow-up; the message is given back");
                false
            }
        }
    }
}
