//! Publishing job messages: persistent, `mandatory`, with a publisher confirm awaited. A message is
//! published only when RabbitMQ confirmed it and did not return it as unroutable.
//!
//! The connection is opened lazily and opened again after it is lost, so a front started while
//! RabbitMQ is down still admits jobs (their outbox rows wait for the relay).

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use tokio::sync::Mutex;

use super::{declare_topology, JobMessage, ROUTING_KEY};
use crate::config::AmqpConfig;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ returned the message as unroutable: {0}")]
    Unroutable(String),
}

pub struct Publisher {
    config: AmqpConfig,
    /// The live connection and its confirm-mode channel, if any. The lock is held only to clone
    /// the channel, or while connecting.
    live: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    pub fn new(config: AmqpConfig) -> Self {
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
        let conn = Connection::connect(
            &self.config.url,
            ConnectionProperties::default().with_connection_name("tollgate-publisher".into()),
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

    /// Publishes a job message and waits for RabbitMQ's confirm.
    #[tracing::instrument(skip(self, message), fields(job_id = %message.job_id))]
    pub async fn publish(&self, message: &JobMessage) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let body = serde_json::to_vec(message).expect("a job message serialises");
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.job_id.as_str().into())
            .with_type("tollgate.job".into());
        let confirmation = channel
            .basic_publish(
                self.config.exchange.as_str().into(),
                ROUTING_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?
            .await?;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(PublishError::Unroutable(returned.reply_text.to_string()));
        }
        Ok(())
    }

    /// Closes the connection, if one is open.
    pub async fn close(&self) {
        if let Some((conn, _)) = self.live.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}
