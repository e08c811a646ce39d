//! Publishing job messages: persistent, `mandatory`, with a publisher confirm awaited. A message is
//! published only when RabbitMQ confirmed it and did not return it as unroutable.
//!
//! The connection is opened lazily and opened again after it is lost, so a front started while
//! RabbitMQ is down still admits jobs (their outbox rows wait for the relay).
//!
//! Every confirm-mode channel tollgate publishes on (the front's, a worker's, the webhook
//! deliverer's) is a [`ConfirmChannel`]: after RabbitMQ nacks a message on it, the next publish
//! goes out on a new channel of the same connection (see there why).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Channel, Connection,
};
use tokio::sync::Mutex;

use super::{declare_topology, events::JobEvent, JobMessage, ROUTING_KEY};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ returned the message as unroutable: {0}")]
    Unroutable(String),
    #[error("RabbitMQ did not answer in time")]
    Timeout,
    #[error("RabbitMQ is unreachable (the last attempt to connect failed less than a second ago)")]
    Down,
}

/// Where and how to publish one message.
#[derive(Debug, Default)]
pub struct Envelope<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Per-message TTL in milliseconds (the delay queues use it).
    pub expiration_ms: Option<u64>,
    pub headers: Option<FieldTable>,
}

pub struct Publisher {
    config: Arc<Config>,
    /// The connection and its confirm-mode channel. The lock is held only to clone the handle,
    /// or while connecting.
    live: Mutex<Live>,
}

enum Live {
    Never,
    Up(Arc<ConfirmChannel>),
    /// The last attempt to connect failed at this time.
    Failed(Instant),
}

/// After a failed connect, publishing fails at once for this long.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

impl Publisher {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            live: Mutex::new(Live::Never),
        }
    }

    /// Returns the connected confirm-mode channel, connecting (and declaring the topology) if
    /// there is none. Connecting is bounded by the publish timeout, and after a failed attempt the
    /// next second fails at once, so requests do not queue up behind an unreachable broker (their
    /// jobs are committed; the relay publishes them later).
    pub async fn channel(&self) -> Result<Arc<ConfirmChannel>, PublishError> {
        let mut live = self.live.lock().await;
        match &*live {
            Live::Up(confirm) if confirm.is_connected() => return Ok(confirm.clone()),
            Live::Failed(at) if at.elapsed() < RECONNECT_PAUSE => return Err(PublishError::Down),
            _ => {}
        }
        match tokio::time::timeout(self.timeout(), self.connect()).await {
            Ok(Ok(confirm)) => {
                let confirm = Arc::new(confirm);
                *live = Live::Up(confirm.clone());
                Ok(confirm)
            }
            Ok(Err(e)) => {
                *live = Live::Failed(Instant::now());
                Err(e.into())
            }
            Err(_) => {
                *live = Live::Failed(Instant::now());
                Err(PublishError::Timeout)
            }
        }
    }

    async fn connect(&self) -> Result<ConfirmChannel, lapin::Error> {
        let conn = crate::queue::connect(&self.config.amqp, "publisher").await?;
        declare_topology(&conn, &self.config).await?;
        ConfirmChannel::open(Arc::new(conn), self.timeout()).await
    }

    /// Publishes a job message to the jobs exchange and waits for RabbitMQ's confirm.
    pub async fn publish(&self, message: &JobMessage) -> Result<(), PublishError> {
        let envelope = Envelope {
            exchange: &self.config.amqp.exchange,
            routing_key: ROUTING_KEY,
            ..Default::default()
        };
        self.channel().await?.publish_job(message, envelope).await
    }

    /// Publishes lifecycle events to the events exchange, pipelined: every message is sent, then
    /// every confirm awaited. Returns, in order, whether RabbitMQ confirmed each. Not
    /// `mandatory`: an event that no queue is bound for is dropped by RabbitMQ, which is no
    /// failure (nobody listens for it).
    pub async fn publish_events(&self, events: &[JobEvent]) -> Result<Vec<bool>, PublishError> {
        let confirm = self.channel().await?;
        let channel = confirm.current();
        let answers = self.publish_events_on(&channel, events).await;
        let nacked = answers.as_ref().is_ok_and(|a| a.contains(&Some(false)));
        confirm.renew_if_needed(&channel, nacked).await;
        Ok(answers?.into_iter().map(|a| a == Some(true)).collect())
    }

    /// RabbitMQ's answer to each event: acked, nacked, or none in time.
    async fn publish_events_on(
        &self,
        channel: &Channel,
        events: &[JobEvent],
    ) -> Result<Vec<Option<bool>>, PublishError> {
        // One deadline for sending and confirming: a broker that blocks publishers (a resource
        // alarm) must not hold the relay's transaction open.
        let deadline = tokio::time::Instant::now() + self.timeout();
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let body = serde_json::to_vec(event).expect("an event serialises");
            let properties = persistent_json(&event.id, &event.kind)
                .with_timestamp(event.occurred_at.timestamp().max(0) as u64);
            let sent = channel.basic_publish(
                self.config.events.exchange.as_str().into(),
                event.routing_key().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            );
            confirms.push(
                tokio::time::timeout_at(deadline, sent)
                    .await
                    .map_err(|_| PublishError::Timeout)??,
            );
        }
        let mut answers = Vec::with_capacity(confirms.len());
        for pending in confirms {
            answers.push(match tokio::time::timeout_at(deadline, pending).await {
                Ok(Ok(c)) => Some(c.is_ack()),
                _ => None,
            });
        }
        Ok(answers)
    }

    /// How many messages wait in the jobs queue, ready for a consumer (not counting those
    /// delivered and not yet acked).
    pub async fn ready_messages(&self) -> Result<u32, PublishError> {
        let channel = self.channel().await?.current();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = tokio::time::timeout(
            self.timeout(),
            channel.queue_declare(
                self.config.amqp.queue.as_str().into(),
                passive,
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|_| PublishError::Timeout)??;
        Ok(declared.message_count())
    }

    /// The messages ready in each of `queues`, `None` for one that could not be read (absent,
    /// or RabbitMQ unreachable). Read on a channel of their own, since RabbitMQ closes the channel
    /// of a passive declare that finds no queue.
    pub async fn queue_depths(&self, queues: &[String]) -> Vec<Option<u32>> {
        let mut depths = Vec::with_capacity(queues.len());
        let mut channel: Option<Channel> = None;
        for queue in queues {
            if channel.as_ref().is_none_or(|c| !c.status().connected()) {
                channel = self.side_channel().await;
            }
            let Some(open) = &channel else {
                depths.push(None);
                continue;
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let declared = tokio::time::timeout(
                self.timeout(),
                open.queue_declare(queue.as_str().into(), passive, FieldTable::default()),
            )
            .await;
            depths.push(match declared {
                Ok(Ok(queue)) => Some(queue.message_count()),
                _ => None,
            });
        }
        if let Some(open) = channel.filter(|c| c.status().connected()) {
            let _ = open.close(200, "depths read".into()).await;
        }
        depths
    }

    /// A new channel on the publisher's connection (connecting if need be), or `None`.
    async fn side_channel(&self) -> Option<Channel> {
        let confirm = self.channel().await.ok()?;
        tokio::time::timeout(self.timeout(), confirm.connection().create_channel())
            .await
            .ok()?
            .ok()
    }

    fn timeout(&self) -> Duration {
        self.config.amqp.publish_timeout()
    }

    /// Closes the connection, if one is open.
    pub async fn close(&self) {
        if let Live::Up(confirm) = std::mem::replace(&mut *self.live.lock().await, Live::Never) {
            let _ = confirm.connection().close(200, "shutdown".into()).await;
        }
    }
}

/// A confirm-mode channel that is replaced by a new one on the same connection after RabbitMQ
/// nacks a message on it (at most once a second).
///
/// Why: a channel keeps, for each quorum queue it has published to, the client state it built at
/// its first publish there, which starts from the leader the queue's record named at that moment.
/// RabbitMQ 3.10 asks that member's node before registering the channel as a publisher, and when
/// that node is down it nacks the message and keeps the state as it was, so it asks the same dead
/// node again for every later message. A channel that first published to a queue in the moment
/// between its leader's node going down and the new leader being recorded (a publisher that
/// reconnects at once does exactly that) had every publish nacked until the old node came back:
/// 20 s of nacks on the surviving majority in `deploy/cluster-test.sh`. A new channel builds its
/// state from the queue's current record. Other nacks (a queue that rejects publishes when full)
/// are not cured by a new channel, nor made worse; the limit keeps the churn small.
pub struct ConfirmChannel {
    conn: Arc<Connection>,
    /// The channel in use, and when it was opened. Held only to clone or swap it: every publish
    /// reads it.
    current: std::sync::Mutex<(Channel, Instant)>,
    /// Held while a new channel is opened, so one nack opens one.
    renewing: Mutex<()>,
    timeout: Duration,
}

/// A nacked channel younger than this is kept.
const RENEW_AFTER: Duration = Duration::from_secs(1);

impl ConfirmChannel {
    /// Opens a confirm-mode channel on `conn`; `timeout` bounds each publish's wait for its
    /// confirm.
    pub async fn open(conn: Arc<Connection>, timeout: Duration) -> Result<Self, lapin::Error> {
        let channel = confirm_mode(&conn).await?;
        Ok(Self {
            conn,
            current: std::sync::Mutex::new((channel, Instant::now())),
            renewing: Mutex::new(()),
            timeout,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Whether the connection is up (a closed channel alone is replaced after the publish that
    /// finds it closed).
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// The channel in use.
    pub fn current(&self) -> Channel {
        self.current.lock().expect("channel lock").0.clone()
    }

    /// [`publish_on`] on the channel in use, renewing it if RabbitMQ nacks.
    pub async fn publish_job(
        &self,
        message: &JobMessage,
        envelope: Envelope<'_>,
    ) -> Result<(), PublishError> {
        let channel = self.current();
        let result = publish_on(&channel, message, envelope, self.timeout).await;
        self.renew_if_needed(&channel, matches!(result, Err(PublishError::Nacked)))
            .await;
        result
    }

    /// [`publish_raw`] on the channel in use, renewing it if RabbitMQ nacks.
    pub async fn publish(
        &self,
        body: &[u8],
        message_id: &str,
        envelope: Envelope<'_>,
    ) -> Result<(), PublishError> {
        let channel = self.current();
        let result = publish_raw(&channel, body, message_id, envelope, self.timeout).await;
        self.renew_if_needed(&channel, matches!(result, Err(PublishError::Nacked)))
            .await;
        result
    }

    /// After a publish on `used`: replaces it by a new confirm-mode channel if RabbitMQ `nacked`
    /// on it or closed it, unless it was replaced already, or is younger than [`RENEW_AFTER`] and
    /// still open. The old channel is closed once the confirms still awaited on it have had their
    /// time.
    async fn renew_if_needed(&self, used: &Channel, nacked: bool) {
        let closed = !used.status().connected();
        if !(nacked || closed) || !self.is_connected() {
            return;
        }
        let _renewing = self.renewing.lock().await;
        {
            let current = self.current.lock().expect("channel lock");
            let (channel, opened) = &*current;
            if channel.id() != used.id() || (opened.elapsed() < RENEW_AFTER && !closed) {
                return;
            }
        }
        match tokio::time::timeout(self.timeout, confirm_mode(&self.conn)).await {
            Ok(Ok(fresh)) => {
                let new = fresh.id();
                let old = std::mem::replace(
                    &mut *self.current.lock().expect("channel lock"),
                    (fresh, Instant::now()),
                )
                .0;
                tracing::info!(
                    old = old.id(),
                    new,
                    "publishing on a new RabbitMQ channel after a nack"
                );
                let grace = self.timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    if old.status().connected() {
                        let _ = old.close(200, "replaced after a nack".into()).await;
                    }
                });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not open a new RabbitMQ channel"),
            Err(_) => tracing::warn!("could not open a new RabbitMQ channel in time"),
        }
    }
}

async fn confirm_mode(conn: &Connection) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes a job message on a confirm-mode channel: persistent, `mandatory`, `message_id` = the
/// job id. Succeeds only when RabbitMQ confirmed it and did not return it as unroutable.
#[tracing::instrument(skip_all, fields(job_id = %message.job_id, exchange = envelope.exchange))]
async fn publish_on(
    channel: &Channel,
    message: &JobMessage,
    envelope: Envelope<'_>,
    timeout: Duration,
) -> Result<(), PublishError> {
    let body = serde_json::to_vec(message).expect("a job message serialises");
    publish_raw(channel, &body, message.job_id.as_str(), envelope, timeout).await
}

/// Publishes any body the same way (used to dead-letter a message that is not a job message).
async fn publish_raw(
    channel: &Channel,
    body: &[u8],
    message_id: &str,
    envelope: Envelope<'_>,
    timeout: Duration,
) -> Result<(), PublishError> {
    let mut properties = persistent_json(message_id, "tollgate.job");
    if let Some(ms) = envelope.expiration_ms {
        properties = properties.with_expiration(ms.to_string().into());
    }
    if let Some(headers) = envelope.headers {
        properties = properties.with_headers(headers);
    }
    let confirmed = async {
        channel
            .basic_publish(
                envelope.exchange.into(),
                envelope.routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await
    };
    let started = std::time::Instant::now();
    let confirmation = tokio::time::timeout(timeout, confirmed)
        .await
        .map_err(|_| PublishError::Timeout)??;
    if confirmation.is_nack() {
        return Err(PublishError::Nacked);
    }
    crate::metrics::histogram!(crate::metrics::PUBLISH_CONFIRM_SECONDS).record(started.elapsed());
    if let Some(returned) = confirmation.take_message() {
        return Err(PublishError::Unroutable(returned.reply_text.to_string()));
    }
    Ok(())
}

/// The properties every tollgate message carries: persistent, JSON, its id and its type.
fn persistent_json(message_id: &str, kind: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_type(kind.into())
}
