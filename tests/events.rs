//! Lifecycle events: a consumer binds its own queue to the events exchange and sees every
//! transition of every job, in order per job, and nothing for a request that was refused; a
//! worker killed mid-job, or RabbitMQ out of reach, loses none of them.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use common::{
    isolated_config,
    process::WorkerProcess,
    proxy::Proxy,
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
    Connection, Consumer,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tollgate::{
    config::{ModelConfig, ProviderKind},
    ids::JobId,
    queue::events::JobEvent,
    run,
    store::keys::{hash_secret, NewKey},
};
use uuid::Uuid;

/// One delivery: (routing key, AMQP message id, AMQP type, body).
type Received = (String, String, String, Value);

/// A queue of the test's own, bound to the events exchange with `binding`, and consumed.
struct Listener {
    conn: Connection,
    consumer: Consumer,
    queue: String,
}

impl Listener {
    async fn bind(env: &TestEnv, binding: &str) -> Self {
        let queue = format!("{}.listener-{}", env.config.events.exchange, Uuid::new_v4());
        let (conn, channel) = common::own_queue(&queue, &env.config.events.exchange, binding).await;
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
    async fn drain(&mut self, quiet: Duration) -> Vec<Received> {
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

    /// Events until at least `n` came (failing after `within`), then any more that follow.
    async fn take(&mut self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{} of {n} events in {within:?}: {got:#?}",
                got.len()
            );
            got.extend(self.drain(left.min(Duration::from_millis(200))).await);
        }
        got.extend(self.drain(Duration::from_millis(300)).await);
        got
    }
}

/// The fields every event body has (the contract of `JobEvent`, version 1).
const FIELDS: [&str; 21] = [
    "v",
    "id",
    "type",
    "job_id",
    "key_id",
    "model",
    "status",
    "seq",
    "attempt",
    "input_tokens",
    "output_tokens",
    "usage_estimated",
    "reserved_micro_usd",
    "cost_micro_usd",
    "charged_micro_usd",
    "error",
    "incomplete_reason",
    "created_at",
    "started_at",
    "finished_at",
    "occurred_at",
];

const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "incomplete"];

/// Asserts what every delivery must say of itself: its routing key `job.<status>.<model>`
/// (dots of the model as `_`), its `type` and `message_id` properties, and a version 1 body
/// with the documented fields (and `request`/`output_text` exactly when `content`).
fn assert_envelope(received: &Received, content: bool) {
    let (routing, message_id, kind, body) = received;
    let status = body["status"].as_str().unwrap();
    let model = body["model"].as_str().unwrap();
    assert_eq!(
        routing,
        &format!("job.{status}.{}", model.replace('.', "_")),
        "{body}"
    );
    assert_eq!(kind, &format!("job.{status}"), "{body}");
    assert_eq!(body["type"], kind.as_str(), "{body}");
    assert_eq!(body["v"], 1, "{body}");
    let id = body["id"].as_str().unwrap();
    assert_eq!(message_id, id, "the message id is the event id");
    let hex = id.strip_prefix("evt_").expect("evt_ id");
    assert!(
        hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let mut expected: BTreeSet<&str> = FIELDS.into_iter().collect();
    if content && TERMINAL.contains(&status) {
        expected.extend(["request", "output_text"]);
    }
    let keys: BTreeSet<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys, expected, "{status} event fields");
}

/// Each job's events in the order they arrived.
fn per_job(got: &[Received]) -> BTreeMap<String, Vec<&Value>> {
    let mut jobs: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for (_, _, _, body) in got {
        jobs.entry(body["job_id"].as_str().unwrap().to_string())
            .or_default()
            .push(body);
    }
    jobs
}

/// (status, seq) of each event.
fn transitions<'a>(events: &[&'a Value]) -> Vec<(&'a str, i64)> {
    events
        .iter()
        .map(|e| (e["status"].as_str().unwrap(), e["seq"].as_i64().unwrap()))
        .collect()
}

/// Events written and not yet published.
async fn unsent(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT unsent FROM tollgate.event_backlog")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn wait_all_published(env: &TestEnv) {
    env.wait_for(Duration::from_secs(15), || async { unsent(env).await == 0 })
        .await;
}

/// Keeps a copy of every event row the triggers write in `public.event_record` (the relay deletes
/// `tollgate.event_outbox` rows once published): the test's record of every transition. Call it
/// before the first job.
async fn record_transitions(env: &TestEnv) {
    for statement in [
        "CREATE TABLE public.event_record AS SELECT * FROM tollgate.event_outbox WITH NO DATA",
        "CREATE FUNCTION public.record_event() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO public.event_record SELECT NEW.*; RETURN NULL; END $$",
        "CREATE TRIGGER record_event AFTER INSERT ON tollgate.event_outbox
         FOR EACH ROW EXECUTE FUNCTION public.record_event()",
    ] {
        sqlx::query(statement).execute(&env.pool).await.unwrap();
    }
}

/// The record of every transition ([`record_transitions`]) in the order written, as
/// (event id, job id, status, seq, attempt).
async fn outbox(env: &TestEnv) -> Vec<(String, String, String, i64, i64)> {
    let rows: Vec<(Uuid, Uuid, String, i32, i32)> = sqlx::query_as(
        "SELECT event_id, job_id, status, seq, attempt FROM public.event_record ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(event, job, status, seq, attempt)| {
            (
                JobEvent::public_id(event),
                JobId(job).to_string(),
                status,
                seq.into(),
                attempt.into(),
            )
        })
        .collect()
}

/// A job's row, as its terminal event must describe it.
#[derive(Debug, sqlx::FromRow)]
struct JobRow {
    key_id: Uuid,
    model: String,
    status: String,
    attempt: i32,
    input_tokens: Option<i32>,
    output_tokens: Option<i32>,
    usage_estimated: Option<bool>,
    reserved_micro_usd: i64,
    cost_micro_usd: Option<i64>,
    charged_micro_usd: Option<i64>,
    error: Option<Value>,
    incomplete_reason: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    request: Value,
    output_text: String,
}

async fn job_row(env: &TestEnv, id: &str) -> JobRow {
    sqlx::query_as(
        "SELECT key_id, model, status::text AS status, attempt, input_tokens, output_tokens,
                usage_estimated, reserved_micro_usd, cost_micro_usd, charged_micro_usd, error,
                incomplete_reason, created_at, started_at, finished_at, request, output_text
           FROM tollgate.jobs WHERE id = $1",
    )
    .bind(JobId::parse_public(id).unwrap())
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

fn time(value: &Value) -> Option<DateTime<Utc>> {
    value.as_str().map(|s| s.parse().unwrap())
}

/// Asserts that an event describes the job as its row stands (the row of a finished job does
/// not change after its terminal event).
fn assert_describes(event: &Value, row: &JobRow) {
    let described = (
        event["key_id"].as_str().unwrap().parse::<Uuid>().unwrap(),
        event["model"].as_str().unwrap(),
        event["attempt"].as_i64().unwrap() as i32,
        event["input_tokens"].as_i64().map(|t| t as i32),
        event["output_tokens"].as_i64().map(|t| t as i32),
        event["usage_estimated"].as_bool(),
        event["reserved_micro_usd"].as_i64().unwrap(),
        event["cost_micro_usd"].as_i64(),
        event["charged_micro_usd"].as_i64(),
        Some(&event["error"]).filter(|e| !e.is_null()),
        event["incomplete_reason"].as_str(),
    );
    let row_state = (
        row.key_id,
        row.model.as_str(),
        row.attempt,
        row.input_tokens,
        row.output_tokens,
        row.usage_estimated,
        row.reserved_micro_usd,
        row.cost_micro_usd,
        row.charged_micro_usd,
        row.error.as_ref(),
        row.incomplete_reason.as_deref(),
    );
    assert_eq!(described, row_state, "{event}");
    assert_eq!(time(&event["created_at"]), Some(row.created_at), "{event}");
    assert_eq!(time(&event["started_at"]), row.started_at, "{event}");
    assert_eq!(time(&event["finished_at"]), row.finished_at, "{event}");
}

fn openai(name: &str, upstream: &FakeUpstream) -> ModelConfig {
    ModelConfig {
        provider: ProviderKind::Openai,
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock(name)
    }
}

/// A mock model streaming `deltas` deltas, `delay_ms` apart.
fn slow_mock(name: &str, deltas: u32, delay_ms: u64) -> ModelConfig {
    let mut model = ModelConfig::mock(name);
    model.mock_deltas = deltas;
    model.mock_delay_ms = delay_ms;
    model
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

/// Every terminal path — completed, failed, cancelled while queued, cancelled while running,
/// incomplete, deleted when finished and when queued — and four refused requests: each admitted
/// job's transitions arrive once each, in order, numbered 1..n, and the refused ones publish
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_terminal_path_publishes_each_transition_in_order_and_a_refusal_nothing() {
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let mut env = TestEnv::front_with(isolated_config(vec![
        ModelConfig::mock("mock-1"),
        slow_mock("mock.slow", 300, 20),
        openai("strict", &upstream),
    ]))
    .await;
    record_transitions(&env).await;
    let mut listener = Listener::bind(&env, "job.#").await;
    let key = env.key().await;
    let limited = env
        .create_key(NewKey {
            name: "rpm1".into(),
            rpm_limit: Some(1),
            ..Default::default()
        })
        .await;
    let revoked = env.key().await;
    sqlx::query("UPDATE tollgate.api_keys SET revoked_at = now() WHERE key_hash = $1")
        .bind(hash_secret(&revoked))
        .execute(&env.pool)
        .await
        .unwrap();
    common::leave_room_in_minute(5).await;

    // No worker yet: these two stay queued until cancelled, and deleted.
    let cancelled_queued = env.submit_ok(&key, "mock-1", "never run").await;
    let (status, body) = env
        .post_empty(&key, &format!("/v1/responses/{cancelled_queued}/cancel"))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let deleted_queued = env.submit_ok(&key, "mock-1", "deleted unrun").await;
    let (status, body) = env.delete(&key, &deleted_queued).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Refused: over the key's rpm, a revoked key, an unknown model, a bad body.
    let admitted_limited = env.submit_ok(&limited, "mock-1", "the one allowed").await;
    let (status, body) = env
        .submit(
            &limited,
            json!({"model": "mock-1", "input": "x", "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, body) = env
        .submit(
            &revoked,
            json!({"model": "mock-1", "input": "x", "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "gpt-nope", "input": "x", "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": 7, "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    env.start_worker();
    let completed = env.submit_ok(&key, "mock-1", "finish").await;
    let failed = env.submit_ok(&key, "strict", "refused upstream").await;
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "cut", "background": true, "max_output_tokens": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let incomplete = body["id"].as_str().unwrap().to_string();
    let cancelled_running = env.submit_ok(&key, "mock.slow", "long").await;
    env.wait_for(Duration::from_secs(10), || async {
        let body = env.get(&key, &cancelled_running).await.1;
        let text = body["output"][0]["content"][0]["text"].as_str();
        body["status"] == "in_progress" && text.is_some_and(|t| !t.is_empty())
    })
    .await;
    let (status, body) = env
        .post_empty(&key, &format!("/v1/responses/{cancelled_running}/cancel"))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );

    let mut rows = HashMap::new();
    for (id, secret, status) in [
        (&completed, &key, "completed"),
        (&failed, &key, "failed"),
        (&incomplete, &key, "incomplete"),
        (&cancelled_running, &key, "cancelled"),
        (&cancelled_queued, &key, "cancelled"),
        (&admitted_limited, &limited, "completed"),
    ] {
        let done = env.poll_until_done(secret, id).await;
        assert_eq!(done["status"], status, "{done}");
        rows.insert(id.clone(), job_row(&env, id).await);
    }
    // A finished job deleted: its `deleted` event comes after its terminal one.
    let (status, body) = env.delete(&key, &completed).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    wait_all_published(&env).await;
    let record = outbox(&env).await;
    let got = listener.take(record.len(), Duration::from_secs(10)).await;
    for received in &got {
        assert_envelope(received, false);
    }
    // Each event once (no fault here to make a duplicate), each with its own id.
    let ids: HashSet<&str> = got.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "an event id came twice");
    assert_eq!(
        got.len(),
        record.len(),
        "every recorded transition published once"
    );

    let jobs = per_job(&got);
    let expected: BTreeMap<&String, Vec<(&str, i64)>> = BTreeMap::from([
        (
            &completed,
            vec![
                ("queued", 1),
                ("in_progress", 2),
                ("completed", 3),
                ("deleted", 4),
            ],
        ),
        (
            &failed,
            vec![("queued", 1), ("in_progress", 2), ("failed", 3)],
        ),
        (
            &incomplete,
            vec![("queued", 1), ("in_progress", 2), ("incomplete", 3)],
        ),
        (
            &cancelled_running,
            vec![("queued", 1), ("in_progress", 2), ("cancelled", 3)],
        ),
        (&cancelled_queued, vec![("queued", 1), ("cancelled", 2)]),
        // Deleting a queued job cancels it first, in the same transaction.
        (
            &deleted_queued,
            vec![("queued", 1), ("cancelled", 2), ("deleted", 3)],
        ),
        (
            &admitted_limited,
            vec![("queued", 1), ("in_progress", 2), ("completed", 3)],
        ),
    ]);
    let arrived: BTreeMap<&String, Vec<(&str, i64)>> = jobs
        .iter()
        .map(|(id, events)| (id, transitions(events)))
        .collect();
    // In arrival order: one publisher, in the order of the record.
    assert_eq!(arrived, expected, "{got:#?}");

    // The refused requests made no job and no event: only the seven admitted jobs appear, and
    // one `queued` event each.
    let queued = got.iter().filter(|r| r.3["status"] == "queued").count();
    assert_eq!(queued, 7);
    let admitted: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM public.event_record")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(admitted, 7);

    // Attempts: 0 while queued, 1 from the first start on.
    for events in jobs.values() {
        for event in events {
            let started = event["started_at"].is_string();
            assert_eq!(event["attempt"].as_i64(), Some(started as i64), "{event}");
        }
    }
    // Terminal and deleted events describe the finished row.
    for (id, row) in &rows {
        let finished = jobs[id]
            .iter()
            .filter(|e| e["finished_at"].is_string())
            .collect::<Vec<_>>();
        assert!(!finished.is_empty());
        for event in finished {
            assert!(
                TERMINAL.contains(&event["status"].as_str().unwrap())
                    || event["status"] == "deleted",
                "{event}"
            );
            assert_describes(event, row);
        }
    }
    let last = |id: &String| -> &Value {
        jobs[id]
            .iter()
            .find(|e| TERMINAL.contains(&e["status"].as_str().unwrap()))
            .unwrap()
    };
    let done = last(&completed);
    let row = &rows[&completed];
    assert_eq!(row.status, "completed");
    assert_eq!(
        (
            done["input_tokens"].as_i64(),
            done["output_tokens"].as_i64()
        ),
        (row.input_tokens.map(i64::from), Some(20))
    );
    assert!(done["cost_micro_usd"].as_i64().unwrap() > 0, "{done}");
    assert_eq!(done["charged_micro_usd"], done["cost_micro_usd"]);
    assert_eq!(done["usage_estimated"], false);
    let error = &last(&failed)["error"];
    assert_eq!(error["code"], "upstream_http_error", "{error}");
    assert_eq!(Some(error), rows[&failed].error.as_ref());
    assert_eq!(last(&incomplete)["incomplete_reason"], "max_output_tokens");
    assert_eq!(last(&incomplete)["output_tokens"], 5);
    let stopped = last(&cancelled_running);
    assert!(
        stopped["charged_micro_usd"].as_i64().unwrap() > 0,
        "what was streamed is charged: {stopped}"
    );
    assert_eq!(last(&cancelled_queued)["charged_micro_usd"], 0);
    assert_eq!(last(&cancelled_queued)["started_at"], Value::Null);
    // The slow model's dot travels as `_` in the routing key.
    assert!(
        got.iter().any(|r| r.0 == "job.cancelled.mock_slow"),
        "{got:#?}"
    );
    drop(listener);
}

/// A worker process killed (SIGKILL) while jobs stream: after dedup by event id, each job's
/// events are exactly its transitions as recorded, numbered 1..n without a gap, and they say
/// what happened — the killed attempt started, the job put back by the sweeper, a second
/// attempt, completed. A copy published again (here: its mark lost, as when the relay dies
/// between RabbitMQ's confirm and its commit) comes with the same id and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_yields_exactly_the_real_transitions() {
    let (put_back, _) = kill_a_worker_mid_job(Rescue::Sweeper).await;
    assert!(put_back >= 1);
}

/// The same, when a new attempt takes the killed job over before any sweeper puts it back (its
/// message redelivered after its lease lapsed): `in_progress` follows `in_progress`, with the
/// next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_over_from_a_killed_worker_yields_in_progress_twice() {
    let (put_back, taken_over) = kill_a_worker_mid_job(Rescue::Takeover).await;
    assert_eq!(put_back, 0);
    assert!(taken_over >= 2);
}

/// Who gives a killed worker's job its next attempt.
#[derive(PartialEq)]
enum Rescue {
    /// The front's sweeper puts it back (`queued`) once its lease lapsed.
    Sweeper,
    /// No sweeper runs; the new worker starts after the lease lapsed and claims it directly.
    Takeover,
}

/// Kills a worker process while three of six jobs stream, finishes them on another worker, and
/// checks the events against the record and the rows. Returns how many killed jobs were put
/// back and how many taken over directly.
async fn kill_a_worker_mid_job(rescue: Rescue) -> (usize, usize) {
    let mut config = common::fault_config(vec![slow_mock("slow", 20, 50)]);
    // Three run while three wait: the killed worker leaves both kinds.
    config.worker.concurrency = 3;
    if rescue == Rescue::Takeover {
        // The sweeper runs once, at the start.
        config.server.sweep_interval_ms = 600_000;
    }
    let mut env = TestEnv::front_with(config.clone()).await;
    record_transitions(&env).await;
    let mut listener = Listener::bind(&env, "job.#").await;
    let key = env.key().await;
    let mut child = WorkerProcess::start(&config);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(env.submit_ok(&key, "slow", &format!("job {i}")).await);
    }
    env.wait_until_streaming(3).await;
    child.process.kill().await.unwrap();
    // Let PostgreSQL see the killed connections go (anything uncommitted rolls back).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_kill: HashMap<String, (String, i32)> = {
        let rows: Vec<(Uuid, String, i32)> =
            sqlx::query_as("SELECT id, status::text, attempt FROM tollgate.jobs")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(id, status, attempt)| (JobId(id).to_string(), (status, attempt)))
            .collect()
    };
    let killed: Vec<&String> = ids
        .iter()
        .filter(|id| at_kill[*id].0 == "in_progress")
        .collect();
    assert!(killed.len() >= 2 && killed.len() < ids.len(), "{at_kill:?}");
    if rescue == Rescue::Takeover {
        env.wait_for(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT bool_and(lease_until < now()) FROM tollgate.jobs
                  WHERE status = 'in_progress'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap()
        })
        .await;
    }

    env.start_worker();
    for id in &ids {
        assert_eq!(env.poll_until_done(&key, id).await["status"], "completed");
    }
    wait_all_published(&env).await;
    // One job's `in_progress` events come back to the outbox, as when the relay stopped between
    // RabbitMQ's confirm and its delete: they are published again, after the job's later events.
    // (The recorder is off meanwhile: they are copies, not new transitions.)
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE tollgate.event_outbox DISABLE TRIGGER record_event")
        .execute(&mut *tx)
        .await
        .unwrap();
    let again: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO tollgate.event_outbox
             (event_id, job_id, key_id, model, status, seq, attempt, input_tokens, output_tokens,
              usage_estimated, reserved_micro_usd, cost_micro_usd, charged_micro_usd, error,
              incomplete_reason, job_created_at, started_at, finished_at, occurred_at)
         SELECT event_id, job_id, key_id, model, status, seq, attempt, input_tokens,
                output_tokens, usage_estimated, reserved_micro_usd, cost_micro_usd,
                charged_micro_usd, error, incomplete_reason, job_created_at, started_at,
                finished_at, occurred_at
           FROM public.event_record
          WHERE job_id = $1 AND status = 'in_progress' ORDER BY id
         RETURNING event_id",
    )
    .bind(JobId::parse_public(killed[0]).unwrap())
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE tollgate.event_outbox ENABLE TRIGGER record_event")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        again.len(),
        2,
        "the killed attempt and the next one started"
    );
    wait_all_published(&env).await;

    let record = outbox(&env).await;
    let got = listener
        .take(record.len() + again.len(), Duration::from_secs(10))
        .await;
    // Dedup by event id: copies of one event are the same event.
    let mut unique: BTreeMap<&str, &Received> = BTreeMap::new();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for received in &got {
        assert_envelope(received, false);
        *copies.entry(received.1.as_str()).or_default() += 1;
        if let Some(first) = unique.insert(received.1.as_str(), received) {
            assert_eq!(first, received, "a copy differs from its original");
        }
    }
    // The republished ones came twice. (The killed worker's relay may have left another copy,
    // had it died between RabbitMQ's confirm and its commit.)
    for id in &again {
        assert!(copies[JobEvent::public_id(*id).as_str()] >= 2, "{id}");
    }
    let duplicates = got.len() - unique.len();
    // After dedup, the events are exactly the record of transitions, none missing, none extra.
    let mut published: Vec<(String, String, String, i64, i64)> = unique
        .values()
        .map(|(_, id, _, e)| {
            (
                id.clone(),
                e["job_id"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
                e["seq"].as_i64().unwrap(),
                e["attempt"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut recorded = record.clone();
    published.sort_by(|a, b| (&a.1, a.3).cmp(&(&b.1, b.3)));
    recorded.sort_by(|a, b| (&a.1, a.3).cmp(&(&b.1, b.3)));
    assert_eq!(published, recorded);

    // And the record is the jobs' real lives, derived from what each row went through.
    let (mut put_back, mut taken_over) = (0, 0);
    for id in &ids {
        let lived: Vec<(&str, i64, i64)> = recorded
            .iter()
            .filter(|r| &r.1 == id)
            .map(|r| (r.2.as_str(), r.3, r.4))
            .collect();
        let seqs: Vec<i64> = lived.iter().map(|l| l.1).collect();
        assert_eq!(
            seqs,
            (1..=lived.len() as i64).collect::<Vec<_>>(),
            "{id}: {lived:?}"
        );
        let steps: Vec<(&str, i64)> = lived.iter().map(|l| (l.0, l.2)).collect();
        let row = job_row(&env, id).await;
        if killed.contains(&id) {
            // Put back by the sweeper once its lease lapsed, or taken over by a new attempt at
            // once (`in_progress` again, with the next attempt).
            let rescued = [
                ("queued", 0),
                ("in_progress", 1),
                ("queued", 1),
                ("in_progress", 2),
                ("completed", 2),
            ];
            let taken = [
                ("queued", 0),
                ("in_progress", 1),
                ("in_progress", 2),
                ("completed", 2),
            ];
            if steps == rescued {
                put_back += 1;
            } else {
                assert_eq!(steps, taken, "{id}");
                taken_over += 1;
            }
            assert_eq!(row.attempt, 2);
        } else {
            assert_eq!(
                steps,
                [("queued", 0), ("in_progress", 1), ("completed", 1)],
                "{id}, {:?} at the kill",
                at_kill[id]
            );
        }
        let terminal = unique
            .values()
            .find(|r| r.3["job_id"] == id.as_str() && r.3["status"] == "completed")
            .unwrap();
        assert_describes(&terminal.3, &row);
    }
    eprintln!(
        "{} jobs killed mid-stream: {put_back} put back, {taken_over} taken over at once; \
         {duplicates} duplicate deliveries",
        killed.len()
    );
    drop(listener);
    (put_back, taken_over)
}

/// RabbitMQ out of reach of the only process (its connections cut by a proxy): transitions go on
/// and their events wait in the outbox; the process stops; RabbitMQ comes back with no process
/// to publish, and nothing is published; a worker starts and its relay publishes every waiting
/// event, each job's in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_while_rabbitmq_is_out_of_reach_are_published_once_a_process_can() {
    let mut rabbit = url::Url::parse(&common::amqp_url()).unwrap();
    let target: SocketAddr = format!(
        "{}:{}",
        rabbit.host_str().unwrap(),
        rabbit.port().unwrap_or(5672)
    )
    .parse()
    .unwrap();
    let proxy = Proxy::start(target).await;
    rabbit.set_port(Some(proxy.addr.port())).unwrap();
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    let reachable = config.clone();
    config.amqp.url = rabbit.to_string();
    let env = TestEnv::front_with(config).await;
    // Through the proxy, the front declares the topology (the harness waits only for a front
    // that talks to the broker directly).
    env.wait_for(Duration::from_secs(10), || async {
        env.queue_depth().await.is_some()
    })
    .await;
    let mut listener = Listener::bind(&env, "job.#").await;
    let key = env.key().await;
    let first = env.submit_ok(&key, "mock-1", "before").await;
    let before = listener.take(1, Duration::from_secs(5)).await;
    assert_eq!(transitions(&per_job(&before)[&first]), [("queued", 1)]);

    proxy.cut();
    let second = env.submit_ok(&key, "mock-1", "during").await;
    let third = env.submit_ok(&key, "mock-1", "during, cancelled").await;
    let (status, _) = env
        .post_empty(&key, &format!("/v1/responses/{third}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env.delete(&key, &first).await;
    assert_eq!(status, StatusCode::OK);
    // The relay tries (every 100 ms) and fails: all five wait.
    assert!(listener.drain(Duration::from_secs(1)).await.is_empty());
    assert_eq!(unsent(&env).await, 5);

    // The only process stops; RabbitMQ comes back; nobody publishes.
    env.stop_front();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    assert!(
        listener.drain(Duration::from_millis(700)).await.is_empty(),
        "no process runs, yet events came"
    );
    assert_eq!(unsent(&env).await, 5);

    // A worker starts: its event relay publishes what waited.
    let stop = CancellationToken::new();
    let worker = tokio::spawn(run::work(
        Arc::new(reachable),
        env.pool.clone(),
        stop.clone(),
    ));
    let after = listener.take(5, Duration::from_secs(10)).await;
    for received in &after {
        assert_envelope(received, false);
    }
    let jobs = per_job(&after);
    assert_eq!(
        transitions(&jobs[&first]),
        [("cancelled", 2), ("deleted", 3)]
    );
    assert_eq!(transitions(&jobs[&second]), [("queued", 1)]);
    assert_eq!(
        transitions(&jobs[&third]),
        [("queued", 1), ("cancelled", 2)]
    );
    assert_eq!(after.len(), 5);
    assert_eq!(unsent(&env).await, 0);
    stop.cancel();
    worker.await.unwrap();
    drop(listener);
}

/// With `events.include_content`, terminal events carry the stored request and the output
/// text; the others carry neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_content_adds_request_and_output_to_terminal_events_only() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.events.include_content = true;
    let mut env = TestEnv::front_with(config).await;
    let mut listener = Listener::bind(&env, "job.#").await;
    let key = env.key().await;
    let cancelled = env.submit_ok(&key, "mock-1", "never run").await;
    let (status, _) = env
        .post_empty(&key, &format!("/v1/responses/{cancelled}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK);
    env.start_worker();
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": [{"role": "user", "content": "tell me"}],
                   "background": true, "instructions": "be brief", "metadata": {"k": "v"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let completed = body["id"].as_str().unwrap().to_string();
    env.poll_until_done(&key, &completed).await;
    let rows = [
        (&cancelled, job_row(&env, &cancelled).await),
        (&completed, job_row(&env, &completed).await),
    ];
    wait_all_published(&env).await;
    // Deleted once its terminal event is out: the `deleted` event carries no content.
    let (status, _) = env.delete(&key, &completed).await;
    assert_eq!(status, StatusCode::OK);
    wait_all_published(&env).await;

    let got = listener.take(6, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 6, "{got:#?}");
    for received in &got {
        assert_envelope(received, true);
    }
    let jobs = per_job(&got);
    assert_eq!(
        transitions(&jobs[&completed]),
        [
            ("queued", 1),
            ("in_progress", 2),
            ("completed", 3),
            ("deleted", 4)
        ]
    );
    for (id, row) in &rows {
        let terminal = jobs[*id]
            .iter()
            .find(|e| TERMINAL.contains(&e["status"].as_str().unwrap()))
            .unwrap();
        assert_eq!(terminal["request"], row.request, "{terminal}");
        assert_eq!(
            terminal["output_text"],
            row.output_text.as_str(),
            "{terminal}"
        );
    }
    let done = jobs[&completed][2];
    assert_eq!(done["request"]["instructions"], "be brief");
    assert!(
        done["output_text"]
            .as_str()
            .unwrap()
            .starts_with("This is a mock"),
        "{done}"
    );
    drop(listener);
}
