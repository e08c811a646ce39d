//! The confirm-mode channel every tollgate process publishes on: after RabbitMQ nacks a message,
//! or closes the channel, the next publish goes out on a new channel of the same connection.
//!
//! A nack is produced for real: a queue of the test's own with `x-max-length` 0 and
//! `x-overflow: reject-publish` refuses every message routed to it. (In a cluster, the nack that
//! made the renewal necessary comes from a channel whose quorum-queue state points at a stopped
//! node; `deploy/cluster-test.sh` shows that case.)

mod common;

use std::{sync::Arc, time::Duration};

use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties,
};
use tollgate::queue::{ConfirmChannel, Envelope, PublishError};
use uuid::Uuid;

/// How long the test channel waits for a confirm; the replaced channel is closed after it.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A connection, with two exclusive queues of its own (gone with it): one that refuses every
/// message, one that takes them.
async fn setup() -> (Arc<Connection>, String, String) {
    let conn = Connection::connect(&common::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let id = Uuid::new_v4().simple();
    let (full, open) = (format!("tg-test-full-{id}"), format!("tg-test-open-{id}"));
    let mut refuse = FieldTable::default();
    refuse.insert("x-max-length".into(), AMQPValue::LongInt(0));
    refuse.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(full.as_str().into(), exclusive, refuse)
        .await
        .unwrap();
    channel
        .queue_declare(open.as_str().into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    (Arc::new(conn), full, open)
}

fn to(queue: &str) -> Envelope<'_> {
    Envelope {
        exchange: "",
        routing_key: queue,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_nack_moves_publishing_to_a_new_channel_at_most_once_a_second() {
    let (conn, full, open) = setup().await;
    let confirm = ConfirmChannel::open(conn.clone(), TIMEOUT).await.unwrap();
    let first = confirm.current();

    // A nack within the first second of a channel keeps it: a queue that refuses messages
    // would otherwise make every publish open a channel.
    let refused = confirm.publish(b"{}", "m1", to(&full)).await;
    assert!(matches!(refused, Err(PublishError::Nacked)), "{refused:?}");
    assert_eq!(confirm.current().id(), first.id());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = confirm.publish(b"{}", "m2", to(&full)).await;
    assert!(matches!(refused, Err(PublishError::Nacked)), "{refused:?}");
    let second = confirm.current();
    assert_ne!(second.id(), first.id(), "the nacked channel is replaced");
    assert!(second.status().connected());

    // The new channel publishes; a nack right after its opening does not replace it.
    confirm.publish(b"{}", "m3", to(&open)).await.unwrap();
    let refused = confirm.publish(b"{}", "m4", to(&full)).await;
    assert!(matches!(refused, Err(PublishError::Nacked)), "{refused:?}");
    assert_eq!(confirm.current().id(), second.id());

    // The replaced channel is closed once confirms awaited on it have had their time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while first.status().connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replaced channel stays open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(conn.status().connected(), "the connection is kept");
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn a_channel_closed_by_the_broker_is_replaced_at_once() {
    let (conn, _full, open) = setup().await;
    let confirm = ConfirmChannel::open(conn.clone(), TIMEOUT).await.unwrap();
    let first = confirm.current();
    // Publishing to an exchange that does not exist: RabbitMQ closes the channel (404).
    let envelope = Envelope {
        exchange: "tg-test-no-such-exchange",
        routing_key: "x",
        ..Default::default()
    };
    let failed = confirm.publish(b"{}", "m1", envelope).await;
    assert!(matches!(failed, Err(PublishError::Amqp(_))), "{failed:?}");
    assert!(!first.status().connected());
    assert_ne!(confirm.current().id(), first.id());
    confirm.publish(b"{}", "m2", to(&open)).await.unwrap();
    conn.close(200, "done".into()).await.unwrap();
}
