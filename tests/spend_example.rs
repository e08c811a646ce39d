//! The example consumer `examples/spend_per_key.rs`, run against a live tollgate: from the events
//! alone it keeps the same spend per key per day as the view `tollgate.spend_by_key_day`, and an
//! event delivered twice counts once.

mod common;

#[allow(dead_code)]
#[path = "../examples/spend_per_key.rs"]
mod spend_per_key;

use std::{collections::BTreeMap, time::Duration};

use chrono::NaiveDate;
use common::{
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use lapin::{
    options::{BasicGetOptions, BasicPublishOptions},
    Connection, ConnectionProperties,
};
use reqwest::StatusCode;
use serde_json::json;
use spend_per_key::Totals;
use tokio_util::sync::CancellationToken;
use tollgate::{
    config::{ModelConfig, ProviderKind},
    store::keys::{self, NewKey},
};
use uuid::Uuid;

fn priced(name: &str, input: f64, output: f64) -> ModelConfig {
    ModelConfig {
        input_price_per_1m: input,
        output_price_per_1m: output,
        ..ModelConfig::mock(name)
    }
}

/// `tollgate.spend_by_key_day` as the example keeps it.
async fn view(env: &TestEnv) -> ByKeyDay {
    let rows: Vec<(Uuid, NaiveDate, i64, i64, i64)> = sqlx::query_as(
        "SELECT key_id, (day AT TIME ZONE 'UTC')::date, jobs,
                (cost_usd * 1000000)::bigint, (charged_usd * 1000000)::bigint
           FROM tollgate.spend_by_key_day",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(key, day, jobs, cost, charged)| {
            let totals = Totals {
                jobs: jobs as u64,
                cost_micro_usd: cost,
                charged_micro_usd: charged,
            };
            ((key, day), totals)
        })
        .collect()
}

/// Deletes the example's durable queue when the test ends, passed or not.
struct DeleteQueue(String);

impl Drop for DeleteQueue {
    fn drop(&mut self) {
        let queue = self.0.clone();
        // Drop cannot await, and the test's runtime may be shutting down: a thread of its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let conn =
                    Connection::connect(&common::amqp_url(), ConnectionProperties::default())
                        .await
                        .unwrap();
                let channel = conn.create_channel().await.unwrap();
                channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await
                    .unwrap();
                conn.close(200, "done".into()).await.unwrap();
            });
        })
        .join()
        .unwrap();
    }
}

type ByKeyDay = BTreeMap<(Uuid, NaiveDate), Totals>;

/// Waits until the example's totals are `expected`.
async fn wait_counted(counted: &mut tokio::sync::watch::Receiver<ByKeyDay>, expected: &ByKeyDay) {
    let reached = tokio::time::timeout(
        Duration::from_secs(10),
        counted.wait_for(|spend| spend == expected),
    )
    .await
    .is_ok_and(|got| got.is_ok());
    assert!(
        reached,
        "the example counted {:?}, the view says {expected:?}",
        *counted.borrow()
    );
}

async fn wait_all_published(env: &TestEnv) {
    env.wait_for(Duration::from_secs(15), || async {
        sqlx::query_scalar::<_, i64>("SELECT unsent FROM tollgate.event_backlog")
            .fetch_one(&env.pool)
            .await
            .unwrap()
            == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_keeps_the_spend_of_the_view_and_counts_a_redelivery_once() {
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let mut slow = priced("slow.model", 5.0, 25.0);
    slow.mock_deltas = 300;
    slow.mock_delay_ms = 20;
    let strict = ModelConfig {
        provider: ProviderKind::Openai,
        base_url: Some(upstream.base_url()),
        ..priced("strict", 1.0, 1.0)
    };
    let mut env = TestEnv::front_only(vec![
        priced("small", 0.4, 1.6),
        priced("large", 3.0, 15.0),
        slow,
        strict,
    ])
    .await;
    let exchange = env.config.events.exchange.clone();
    let queue = format!("{exchange}.spend-per-key");
    let _delete = DeleteQueue(queue.clone());

    // The example, on its own queue of the test's exchange.
    let subscription = spend_per_key::subscribe(&common::amqp_url(), &exchange, &queue)
        .await
        .unwrap();
    let (changes, mut counted) = tokio::sync::watch::channel(BTreeMap::new());
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(
        subscription.run(stop.clone().cancelled_owned(), move |spend| {
            changes.send_replace(spend.by_key_day.clone());
        }),
    );
    // A tap of the test's own, to copy one event from.
    let tap_queue = format!("{exchange}.tap");
    let (tap_conn, tap) = common::own_queue(&tap_queue, &exchange, "job.completed.large").await;

    let new_key = |name: &str| NewKey {
        name: name.into(),
        ..Default::default()
    };
    let (_, alice) = keys::create(&env.pool, &new_key("alice")).await.unwrap();
    let (_, bob) = keys::create(&env.pool, &new_key("bob")).await.unwrap();
    // Cancelled before any worker runs: finished, nothing spent.
    let never_run = env.submit_ok(&bob, "small", "never run").await;
    let (status, _) = env
        .post_empty(&bob, &format!("/v1/responses/{never_run}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK);
    env.start_worker();
    let mut jobs = vec![
        (alice.clone(), env.submit_ok(&alice, "small", "one").await),
        (alice.clone(), env.submit_ok(&alice, "small", "two").await),
        (alice.clone(), env.submit_ok(&alice, "large", "three").await),
        (bob.clone(), env.submit_ok(&bob, "large", "four").await),
        (bob.clone(), env.submit_ok(&bob, "strict", "fails").await),
    ];
    let (status, body) = env
        .submit(
            &alice,
            json!({"model": "large", "input": "cut", "background": true, "max_output_tokens": 4}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    jobs.push((alice.clone(), body["id"].as_str().unwrap().to_string()));
    let running = env.submit_ok(&bob, "slow.model", "stopped midway").await;
    env.wait_for(Duration::from_secs(10), || async {
        let body = env.get(&bob, &running).await.1;
        let text = body["output"][0]["content"][0]["text"].as_str();
        body["status"] == "in_progress" && text.is_some_and(|t| !t.is_empty())
    })
    .await;
    let (status, _) = env
        .post_empty(&bob, &format!("/v1/responses/{running}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut statuses = Vec::new();
    for (secret, id) in &jobs {
        statuses.push(env.poll_until_done(secret, id).await["status"].clone());
    }
    assert_eq!(
        statuses,
        [
            "completed",
            "completed",
            "completed",
            "completed",
            "failed",
            "incomplete"
        ]
    );
    wait_all_published(&env).await;

    // Eight jobs finished (six above, two cancelled); the example counted each once.
    let expected = view(&env).await;
    assert_eq!(expected.values().map(|t| t.jobs).sum::<u64>(), 8);
    assert_eq!(expected.len(), 2, "two keys, one day: {expected:?}");
    assert!(expected.values().all(|t| t.cost_micro_usd > 0));
    wait_counted(&mut counted, &expected).await;

    // One event delivered again, body and properties as they were: a relay that publishes an
    // event twice sends the same.
    let copy = tap
        .basic_get(tap_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a completed event in the tap");
    tap.basic_publish(
        exchange.as_str().into(),
        copy.delivery.routing_key.clone(),
        BasicPublishOptions::default(),
        &copy.delivery.data,
        copy.delivery.properties.clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Then one more job: the example reads its queue in order, so once this job is counted,
    // the copy before it has been read.
    let last = env.submit_ok(&alice, "small", "after the copy").await;
    env.poll_until_done(&alice, &last).await;
    wait_all_published(&env).await;
    let expected = view(&env).await;
    assert_eq!(expected.values().map(|t| t.jobs).sum::<u64>(), 9);
    wait_counted(&mut counted, &expected).await;

    stop.cancel();
    let spend = consumer.await.unwrap().unwrap();
    assert_eq!(spend.duplicates, 1, "the copy was read and skipped");
    assert_eq!(spend.by_key_day, expected);
    let table = spend.table();
    assert_eq!(table.lines().count(), 3, "{table}");

    tap_conn.close(200, "done".into()).await.unwrap();
}
