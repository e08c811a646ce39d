//! Publishing job messages: persistent, `mandatory`, with a publisher confirm awaited. A message is
//! published only when RabbitMQ confirmed it and did not return it as unroutable.
//!
//! The connection is opened lazily and opened again after it is lost, so a front started while
//! RabbitMQ is down still admits jobs (their outbox rows wait for the relay).

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use tokio::sync::Mutex;

use super::{declare_topology, JobMessage, ROUTING_KEY};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ returned the message as unroutable: {0}")]
    Unroutable(String),
    #[error("RabbitMQ did not confirm the message in time")]
    Timeout,
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
    /// The live connection and its confirm-mode channel, if any. The lock is held only to clone
    /// the channel, or while connecting.
    live: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            live: Mutex::new(None),
        }
    }

    /// Returns a connected confirm-mode channel, connecting (and declaring the topology) if there
    /// is none.
    pub async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut live = self.live.lock().await;
        if let Some((conn, channel)) = live.as_ref() {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        *live = None;
        let amqp = &self.config.amqp;
        let conn = Connection::connect(
            &amqp.url,
            ConnectionProperties::default()
                .with_connection_name(format!("{}-publisher", amqp.connection_name).into()),
        )
        .await?;
        let channel = conn.create_channel().await?;
        declare_topology(&channel, &self.config).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *live = Some((conn, channel.clone()));
        Ok(channel)
    }

    /// True when a connection to RabbitMQ is open.
    pub async fn is_connected(&self) -> bool {
        matches!(self.live.lock().await.as_ref(), Some((conn, _)) if conn.status().connected())
    }

    /// Publishes a job message to the jobs exchange and waits for RabbitMQ's confirm.
    pub async fn publish(&self, message: &JobMessage) -> Result<(), PublishError> {
        let envelope = Envelope {
            exchange: &self.config.amqp.exchange,
            routing_key: ROUTING_KEY,
            ..Default::default()
        };
        let channel = self.channel().await?;
        publish_on(&channel, message, envelope, self.timeout()).await
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.amqp.publish_timeout_ms)
    }

    /// Closes the connection, if one is open.
    pub async fn close(&self) {
        if let Some((conn, _)) = self.live.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}

/// Publishes a job message on a confirm-mode channel: persistent, `mandatory`, `message_id` = the
/// job id. Succeeds only when RabbitMQ confirmed it and did not return it as unroutable.
#[tracing::instrument(skip_all, fields(job_id = %message.job_id, exchange = envelope.exchange))]
pub async fn publish_on(
    channel: &Channel,
    message: &JobMessage,
    envelope: Envelope<'_>,
    timeout: Duration,
) -> Result<(), PublishError> {
    let body = serde_json::to_vec(message).expect("a job message serialises");
    publish_raw(channel, &body, message.job_id.as_str(), envelope, timeout).await
}

/// Publishes any body the same way (used to dead-letter a message that is not a job message).
pub async fn publish_raw(
    channel: &Channel,
    body: &[u8],
    message_id: &str,
    envelope: Envelope<'_>,
    timeout: Duration,
) -> Result<(), PublishError> {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_type("tollgate.job".into());
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
    let confirmation = tokio::time::timeout(timeout, confirmed)
        .await
        .map_err(|_| PublishError::Timeout)??;
    if confirmation.is_nack() {
        return Err(PublishError::Nacked);
    }
    if let Some(returned) = confirmation.take_message() {
        return Err(PublishError::Unroutable(returned.reply_text.to_string()));
    }
    Ok(())
}
