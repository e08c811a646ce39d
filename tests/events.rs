//! Lifecycle events: a consumer binds its own queue to the events exchange and sees every
//! transition of every job, in order per job, and nothing for a request that was refused.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::TestEnv;
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    Connection, ConnectionProperties, Consumer,
};
use serde_json::Value;
use tollgate::config::ModelConfig;
use uuid::Uuid;

/// A queue of the test's own, bound to the events exchange with `binding`, and consumed.
struct Listener {
    conn: Connection,
    consumer: Consumer,
    queue: String,
}

impl Listener {
    async fn bind(env: &TestEnv, binding: &str) -> Self {
        let conn = Connection::connect(&common::amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let queue = format!("{}.listener-{}", env.config.events.exchange, Uuid::new_v4());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                env.config.events.exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "events-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            conn,
            consumer,
            queue,
        }
    }

    /// Every event received until none came for `quiet`: (routing key, message id, type, body).
    async fn drain(&mut self, quiet: Duration) -> Vec<(String, String, String, Value)> {
        let mut got = Vec::new();
        while let Ok(Some(delivery)) = tokio::time::timeout(quiet, self.consumer.next()).await {
            let delivery = delivery.unwrap();
            let body: Value = serde_json::from_slice(&delivery.data).unwrap();
            got.push((
                delivery.routing_key.to_string(),
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .unwrap()
                    .to_string(),
                delivery.properties.kind().as_ref().unwrap().to_string(),
                body,
            ));
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_job_publishes_queued_in_progress_completed_in_order() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let mut listener = Listener::bind(&env, "job.#").await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;

    let got = listener.drain(Duration::from_secs(2)).await;
    let mut per_job: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for (_, _, _, body) in &got {
        per_job
            .entry(body["job_id"].as_str().unwrap().to_string())
            .or_default()
            .push(body);
    }
    let statuses: Vec<(&str, i64)> = per_job[&id]
        .iter()
        .map(|e| (e["status"].as_str().unwrap(), e["seq"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [("queued", 1), ("in_progress", 2), ("completed", 3)],
        "{got:?}"
    );
    let (routing, message_id, kind, done) = &got[2];
    assert_eq!(routing, "job.completed.mock-1");
    assert_eq!(kind, "job.completed");
    assert_eq!(message_id, done["id"].as_str().unwrap());
    assert_eq!(done["v"], 1);
    assert_eq!(done["output_tokens"], 20);
    assert!(done.get("output_text").is_none(), "no output by default");
    drop(listener.conn);
    let _ = listener.queue;
}
