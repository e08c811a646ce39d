//! Webhooks: OpenAI's `response.*` events POSTed to a key's endpoints, signed by the Standard
//! Webhooks specification, retried through delay queues, every attempt recorded. The receiver of
//! `examples/webhook_receiver.py` checks them with the official OpenAI SDK; the CLI replays them.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::HeaderMap, routing::post, Router};
use common::{
    sdk::{project, python_with_sdk},
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use lapin::{
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
    Connection, ConnectionProperties,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tollgate::{
    config::{Config, ModelConfig, ProviderKind, WebhookEndpointConfig},
    ids::JobId,
    run,
    store::keys::NewKey,
    webhooks::{self, sign, ssrf::EndpointError, WebhookError},
};
use uuid::Uuid;

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: String,
}

/// What a receiver's handler shares: what it got, and its script of statuses.
type ReceiverState = (Arc<Mutex<Vec<Received>>>, Arc<Vec<u16>>);

/// A webhook receiver on 127.0.0.1: answers each request with the next status of its script
/// (the last one once the script is used up), and keeps what it got.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(script: Vec<u16>) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let state = (got.clone(), Arc::new(script));
        let app = Router::new()
            .route(
                "/hook",
                post(
                    |State((got, script)): State<ReceiverState>,
                     headers: HeaderMap,
                     body: String| async move {
                        let mut got = got.lock().unwrap();
                        let n = got.len();
                        got.push(Received {
                            at: Instant::now(),
                            headers,
                            body,
                        });
                        let status = script.get(n).or(script.last()).copied().unwrap_or(200);
                        axum::http::StatusCode::from_u16(status).unwrap()
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers[name].to_str().unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    /// Asserts the request carries a Standard Webhooks signature of its body under `secret`,
    /// timestamped within a minute of now.
    fn assert_signed(&self, secret: &str) {
        let key = sign::Secret::parse(secret).unwrap();
        let timestamp: i64 = self.header("webhook-timestamp").parse().unwrap();
        let skew = (chrono::Utc::now().timestamp() - timestamp).abs();
        assert!(skew < 60, "timestamp {timestamp} is {skew} s away");
        assert_eq!(
            self.header("webhook-signature"),
            sign::signature(
                &key,
                self.header("webhook-id"),
                timestamp,
                self.body.as_bytes()
            )
        );
    }
}

/// `examples/webhook_receiver.py` run by the SDK's python on 127.0.0.1:`port`, its standard
/// output kept line by line; killed when dropped.
struct PyReceiver {
    _child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl PyReceiver {
    /// Starts the receiver and waits until it listens.
    async fn start(python: &Path, port: u16, secret: &str) -> Self {
        let mut child = tokio::process::Command::new(python)
            .arg(project().join("examples/webhook_receiver.py"))
            .arg(port.to_string())
            .env("OPENAI_WEBHOOK_SECRET", secret)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                let ready = line.starts_with("listening on");
                said.push(line);
                if ready {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(listening, Ok(true)),
            "the receiver did not start:\n{}",
            said.join("\n")
        );
        // Anything it says later (a traceback) goes to the test's output.
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("webhook_receiver.py: {line}");
            }
        });
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn({
            let lines = lines.clone();
            async move {
                while let Ok(Some(line)) = stdout.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        Self {
            _child: child,
            lines,
        }
    }

    /// What it printed, one JSON value a line.
    fn printed(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect()
    }

    /// The events it verified.
    fn events(&self) -> Vec<Value> {
        let mut printed = self.printed();
        printed.retain(|line| line.get("type").is_some());
        printed
    }
}

/// A worker (`run::work`) with a configuration of its own over the environment's database and
/// queues, for what the environment's configuration must not have; stopped when dropped.
struct OwnWorker {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl OwnWorker {
    fn start(env: &TestEnv, config: Config) -> Self {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run::work(Arc::new(config), env.pool.clone(), stop.clone()));
        Self { stop, handle }
    }
}

impl Drop for OwnWorker {
    fn drop(&mut self) {
        self.stop.cancel();
        self.handle.abort();
    }
}

/// A test configuration with these models, whose webhooks may reach loopback and retry after
/// 1 s, then 1 s.
fn config_with(models: Vec<ModelConfig>) -> Config {
    let mut config = common::isolated_config(models);
    config.webhooks.allow_networks = vec!["127.0.0.0/8".into()];
    config.webhooks.retry_schedule_secs = vec![1, 1];
    config.webhooks.timeout_ms = 2000;
    config
}

/// [`config_with`] the model `mock-1`.
fn config() -> Config {
    config_with(vec![ModelConfig::mock("mock-1")])
}

async fn key(env: &TestEnv) -> (Uuid, String) {
    let (id, secret) = tollgate::store::keys::create(
        &env.pool,
        &NewKey {
            name: "hooks".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (id.0, secret)
}

/// A delivery as recorded: (attempt, outcome, status code, replay, error).
type Row = (i32, String, Option<i32>, bool, Option<String>);

/// The deliveries to an endpoint, in the order they were recorded.
async fn deliveries(env: &TestEnv, endpoint: Uuid) -> Vec<Row> {
    sqlx::query_as(
        "SELECT attempt, outcome, status_code, replay, error FROM tollgate.webhook_deliveries
          WHERE endpoint_id = $1 ORDER BY id",
    )
    .bind(endpoint)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// Waits (up to 20 s) until the endpoint has a delivery whose outcome is one of `outcomes`;
/// panics with what was recorded if none comes.
async fn wait_for_outcome(env: &TestEnv, endpoint: Uuid, outcomes: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = deliveries(env, endpoint).await;
        if rows.iter().any(|row| outcomes.contains(&row.1.as_str())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery {outcomes:?} to {endpoint} in 20 s; recorded: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `condition` holds within `timeout` (checked every 20 ms), for a test to say what it
/// saw instead.
async fn within<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The consumers of a queue of the test broker (0 if it does not exist).
async fn consumers(queue: &str) -> u32 {
    let conn = Connection::connect(&common::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
    declared.map_or(0, |q| q.consumer_count())
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the `tollgate` binary with `args`, configured by a file holding `config` alone (no
/// connection string from the environment); returns its exit code, stdout and stderr.
async fn tollgate_cli(config: &Config, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = std::env::temp_dir().join(format!("tollgate-webhooks-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("TOLLGATE_CONFIG")
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("tollgate runs");
    let _ = std::fs::remove_dir_all(&dir);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value of one series of `/metrics` (its name, and labels it has), if exposed.
async fn metric(env: &TestEnv, (name, labels): (&str, &[(&str, &str)])) -> Option<f64> {
    common::metric_value(&env.scrape().await, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_twice_gets_three_attempts_with_a_delay_between() {
    let mut env = TestEnv::front_with(config()).await;
    let (key_id, secret) = key(&env).await;
    let receiver = Receiver::start(vec![500, 503, 200]).await;
    let (endpoint, _) = webhooks::add_endpoint(
        &env.pool,
        &env.config,
        key_id,
        &receiver.url(),
        Some(&["response.completed".to_string()]),
        None,
    )
    .await
    .unwrap();
    env.start_worker();
    let id = env.submit_ok(&secret, "mock-1", "hello").await;
    env.poll_until_done(&secret, &id).await;

    env.wait_for(Duration::from_secs(15), || async {
        receiver.received().len() >= 3
    })
    .await;
    // The attempt is recorded once its answer is in, after the receiver kept the request.
    wait_for_outcome(&env, endpoint, &["delivered"]).await;
    let got = receiver.received();
    assert_eq!(got.len(), 3);
    for pair in got.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
    }
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(got.iter().all(|r| r.body == got[0].body));
    let body: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "response.completed");
    assert_eq!(body["data"]["id"], id.as_str());

    let rows: Vec<(i32, String, Option<i32>)> = sqlx::query_as(
        "SELECT attempt, outcome, status_code FROM tollgate.webhook_deliveries
          WHERE endpoint_id = $1 ORDER BY attempt",
    )
    .bind(endpoint)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (1, "retrying".into(), Some(500)),
            (2, "retrying".into(), Some(503)),
            (3, "delivered".into(), Some(200)),
        ]
    );
}

/// The receiver users are shown: the official OpenAI SDK verifies the webhook of each ending of a
/// job (completed, failed, cancelled), signed with the secret tollgate made, and refuses the same
/// delivery with one byte of its body changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_receiver_verifies_each_ending_with_the_official_sdk_and_refuses_a_changed_body(
) {
    let python = tokio::task::spawn_blocking(python_with_sdk).await.unwrap();
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let broken = ModelConfig {
        provider: ProviderKind::Openai,
        upstream_model: Some("upstream-model-x".into()),
        base_url: Some(upstream.base_url()),
        ..ModelConfig::mock("broken")
    };
    let mut env = TestEnv::front_with(config_with(vec![ModelConfig::mock("mock-1"), broken])).await;
    let (key_id, key) = key(&env).await;
    let port = free_port();
    let (endpoint, secret) = webhooks::add_endpoint(
        &env.pool,
        &env.config,
        key_id,
        &format!("http://127.0.0.1:{port}/webhook"),
        None,
        None,
    )
    .await
    .unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let receiver = PyReceiver::start(&python, port, &secret).await;

    let completed = env.submit_ok(&key, "mock-1", "hello").await;
    let failed = env.submit_ok(&key, "broken", "hello").await;
    // Cancelled while queued: no worker runs yet.
    let cancelled = env.submit_ok(&key, "mock-1", "never mind").await;
    let (status, body) = env
        .post_empty(&key, &format!("/v1/responses/{cancelled}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    env.start_worker();
    let endings = [
        (&completed, "completed"),
        (&failed, "failed"),
        (&cancelled, "cancelled"),
    ];
    for (id, status) in endings {
        assert_eq!(env.poll_until_done(&key, id).await["status"], status);
    }

    let recorded = || async {
        sqlx::query_as::<_, (String, String, Uuid, String, Option<i32>)>(
            "SELECT event_type, event_id, job_id, outcome, status_code
               FROM tollgate.webhook_deliveries WHERE endpoint_id = $1",
        )
        .bind(endpoint)
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    // The deliverer records an attempt once it has the answer, after the receiver printed.
    let all_in = within(Duration::from_secs(20), || async {
        receiver.events().len() >= 3 && recorded().await.len() >= 3
    })
    .await;
    assert!(
        all_in,
        "the receiver printed {:#?}\nrecorded: {:#?}",
        receiver.printed(),
        recorded().await
    );
    let events = receiver.events();
    assert_eq!(events.len(), 3, "{events:#?}");
    let recorded = recorded().await;
    assert_eq!(recorded.len(), 3, "{recorded:#?}");
    for (id, status) in endings {
        let kind = format!("response.{status}");
        let event = events
            .iter()
            .find(|e| e["response_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no verified event for {id}: {events:#?}"));
        assert_eq!(event["type"], kind.as_str(), "{event}");
        let job = JobId::parse_public(id).unwrap().0;
        let row = recorded.iter().find(|r| r.2 == job).unwrap();
        assert_eq!(
            (row.0.as_str(), row.1.as_str(), row.3.as_str(), row.4),
            (
                kind.as_str(),
                event["webhook_id"].as_str().unwrap(),
                "delivered",
                Some(200)
            )
        );
    }

    // By hand: the completed webhook's body under a signature made now, as is (accepted), then
    // with one byte of the response id changed (refused).
    let (event_id, payload): (String, String) = sqlx::query_as(
        "SELECT event_id, payload FROM tollgate.webhook_deliveries
          WHERE endpoint_id = $1 AND event_type = 'response.completed'",
    )
    .bind(endpoint)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let headers = sign::headers(
        &sign::Secret::parse(&secret).unwrap(),
        &event_id,
        chrono::Utc::now().timestamp(),
        payload.as_bytes(),
    );
    let mut changed = payload.clone().into_bytes();
    let at = payload.find(completed.as_str()).unwrap() + completed.len() - 1;
    changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
    let post = |body: Vec<u8>| {
        let mut request = env
            .http
            .post(format!("http://127.0.0.1:{port}/webhook"))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(post(payload.clone().into_bytes()).await, StatusCode::OK);
    assert_eq!(post(changed).await, StatusCode::BAD_REQUEST);
    env.wait_for(Duration::from_secs(5), || async {
        receiver.printed().len() >= 5
    })
    .await;
    let printed = receiver.printed();
    assert_eq!(
        printed[3]["response_id"],
        completed.as_str(),
        "{printed:#?}"
    );
    assert!(
        printed[4]["refused"]
            .as_str()
            .is_some_and(|why| why.contains("signature")),
        "{printed:#?}"
    );
}

/// Without an allow-list, an endpoint on loopback (by address or by name), the cloud metadata
/// address or a private network is refused with the reason, and nothing is stored; the
/// allow-list opens its networks only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_on_internal_addresses_are_refused_unless_allow_listed() {
    let mut closed = config();
    closed.webhooks.allow_networks.clear();
    let env = TestEnv::front_with(closed).await;
    let (key_id, _) = key(&env).await;
    let port = free_port();
    let loopback = format!("http://127.0.0.1:{port}/hook");
    let refused = [
        (loopback.clone(), "loopback"),
        (format!("http://localhost:{port}/hook"), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data".into(),
            "cloud metadata",
        ),
        ("http://10.0.0.1/".into(), "private"),
        // IPv4-mapped IPv6 reaches the IPv4 host.
        (format!("http://[::ffff:127.0.0.1]:{port}/hook"), "loopback"),
    ];
    let add = |config: Config, url: String| {
        let pool = env.pool.clone();
        async move { webhooks::add_endpoint(&pool, &config, key_id, &url, None, None).await }
    };
    for (url, why) in &refused {
        let error = add((*env.config).clone(), url.clone())
            .await
            .expect_err(url);
        let text = error.to_string();
        assert!(
            matches!(error, WebhookError::Endpoint(EndpointError::Refused { .. })),
            "{url}: {text}"
        );
        assert!(
            text.contains("refused") && text.contains(&format!("is not a public address ({why})")),
            "{url}: {text}"
        );
    }
    let stored = || async {
        sqlx::query_scalar::<_, String>("SELECT url FROM tollgate.webhook_endpoints")
            .fetch_all(&env.pool)
            .await
            .unwrap()
    };
    assert_eq!(stored().await, Vec::<String>::new());

    let mut open = (*env.config).clone();
    open.webhooks.allow_networks = vec!["127.0.0.0/8".into()];
    add(open.clone(), loopback.clone()).await.unwrap();
    // The metadata address and the private network stay refused.
    for (url, why) in &refused[2..4] {
        let error = add(open.clone(), url.clone()).await.expect_err(url);
        assert!(error.to_string().contains(why), "{url}: {error}");
    }
    assert_eq!(stored().await, [loopback]);
}

/// An endpoint stored while loopback was allowed is never reached by a worker whose allow-list
/// no longer has it, by address (checked before sending) nor by name (the guarded resolver):
/// each attempt is recorded with the refusal, and the delivery ends dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_allow_list_never_reaches_an_internal_endpoint() {
    let env = TestEnv::front_with(config()).await;
    let (key_id, key) = key(&env).await;
    let receiver = Receiver::start(vec![200]).await;
    let mut endpoints = Vec::new();
    for url in [
        receiver.url(),
        format!("http://localhost:{}/hook", receiver.addr.port()),
    ] {
        let (id, _) = webhooks::add_endpoint(&env.pool, &env.config, key_id, &url, None, None)
            .await
            .unwrap();
        endpoints.push((id, url));
    }
    let mut closed = (*env.config).clone();
    closed.webhooks.allow_networks.clear();
    let _worker = OwnWorker::start(&env, closed);
    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;

    for (endpoint, url) in endpoints {
        wait_for_outcome(&env, endpoint, &["dead", "delivered"]).await;
        let rows = deliveries(&env, endpoint).await;
        let outcomes: Vec<_> = rows.iter().map(|r| (r.0, r.1.as_str(), r.2)).collect();
        assert_eq!(
            outcomes,
            [
                (1, "retrying", None),
                (2, "retrying", None),
                (3, "dead", None)
            ],
            "{url}"
        );
        for row in &rows {
            let error = row.4.as_deref().unwrap_or_default();
            assert!(
                error.contains("refused") && error.contains("not a public address (loopback)"),
                "{url}: {rows:#?}"
            );
        }
    }
    assert_eq!(receiver.received().len(), 0);
}

/// After the last retry of the schedule fails, the delivery goes to `<queue>.dead` with the
/// reason, and no further attempt is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_failing_its_last_retry_is_dead_lettered() {
    let mut config = config();
    config.webhooks.retry_schedule_secs = vec![1];
    let mut env = TestEnv::front_with(config).await;
    let (key_id, key) = key(&env).await;
    let receiver = Receiver::start(vec![500]).await;
    let (endpoint, _) =
        webhooks::add_endpoint(&env.pool, &env.config, key_id, &receiver.url(), None, None)
            .await
            .unwrap();
    env.start_worker();
    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;
    wait_for_outcome(&env, endpoint, &["dead"]).await;
    // A third attempt would come a second after the second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let rows = deliveries(&env, endpoint).await;
    let outcomes: Vec<_> = rows.iter().map(|r| (r.0, r.1.as_str(), r.2)).collect();
    assert_eq!(
        outcomes,
        [(1, "retrying", Some(500)), (2, "dead", Some(500))]
    );
    let got = receiver.received();
    assert_eq!(got.len(), 2);

    let conn = Connection::connect(&env.config.amqp.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let dead = env.config.webhooks.dead_letter_queue();
    let depth = channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(depth, 1);
    let message = channel
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead-lettered delivery");
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let reason = headers
        .inner()
        .get(tollgate::queue::REASON_HEADER)
        .and_then(|v| v.as_long_string().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        reason.contains("after 2 attempts") && reason.contains("answered 500"),
        "{reason}"
    );
    let kept: Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(kept["event_id"], got[0].header("webhook-id"), "{kept}");
    assert_eq!(kept["payload"], got[0].body.as_str(), "{kept}");
    conn.close(200, "done".into()).await.unwrap();
}

/// `tollgate webhooks add` and `tollgate webhooks replay`: a replay sends the recorded body with
/// the same webhook-id, signed anew, and is recorded as the next attempt; a replay the endpoint
/// refuses exits 1; an unknown delivery is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_replays_a_recorded_delivery_with_the_same_id_and_body() {
    let mut env = TestEnv::front_with(config()).await;
    let (key_id, key) = key(&env).await;
    let receiver = Receiver::start(vec![200, 200, 500]).await;
    let key_text = key_id.to_string();
    let url = receiver.url();
    let (code, out, err) = tollgate_cli(
        &env.config,
        &[
            "webhooks",
            "add",
            "--key",
            &key_text,
            "--url",
            &url,
            "--events",
            "response.completed",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let added: Value = serde_json::from_str(out.trim()).expect(&out);
    let secret = added["secret"].as_str().unwrap();
    let endpoint: Uuid = added["id"].as_str().unwrap().parse().unwrap();
    env.start_worker();
    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;
    wait_for_outcome(&env, endpoint, &["delivered"]).await;
    let delivery: i64 =
        sqlx::query_scalar("SELECT id FROM tollgate.webhook_deliveries WHERE endpoint_id = $1")
            .bind(endpoint)
            .fetch_one(&env.pool)
            .await
            .unwrap();

    let replay = ["webhooks", "replay", &delivery.to_string()].map(String::from);
    let replay: Vec<&str> = replay.iter().map(String::as_str).collect();
    let (code, out, err) = tollgate_cli(&env.config, &replay).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("(attempt 2)") && out.contains("answered 200"),
        "{out}"
    );
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].body, got[0].body);
    assert_eq!(got[1].header("webhook-id"), got[0].header("webhook-id"));
    for request in &got {
        request.assert_signed(secret);
    }
    assert_eq!(got[0].json()["data"]["id"], id.as_str());

    // The endpoint answers the next one 500: recorded as a failed replay, exit code 1.
    let (code, out, err) = tollgate_cli(&env.config, &replay).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        out.contains("(attempt 3)") && out.contains("answered 500"),
        "{out}"
    );
    let rows = deliveries(&env, endpoint).await;
    let rows: Vec<_> = rows.iter().map(|r| (r.0, r.1.as_str(), r.2, r.3)).collect();
    assert_eq!(
        rows,
        [
            (1, "delivered", Some(200), false),
            (2, "delivered", Some(200), true),
            (3, "failed", Some(500), true),
        ]
    );

    let (code, out, err) = tollgate_cli(&env.config, &["webhooks", "replay", "987654321"]).await;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("no webhook delivery with id 987654321"),
        "{err}"
    );
    // Replays are held to the address policy of the configuration they run with.
    let mut closed = (*env.config).clone();
    closed.webhooks.allow_networks.clear();
    let (code, out, err) = tollgate_cli(&closed, &replay).await;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("not a public address (loopback)"), "{err}");
    // A removed endpoint is not sent to again, and is listed without its secret.
    let endpoint_text = endpoint.to_string();
    let (code, out, err) = tollgate_cli(&env.config, &["webhooks", "remove", &endpoint_text]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = tollgate_cli(&env.config, &replay).await;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("was removed"), "{err}");
    let (code, out, err) = tollgate_cli(&env.config, &["webhooks", "list"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let listed: Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(listed["id"], endpoint_text.as_str(), "{out}");
    assert!(listed["disabled_at"].is_string(), "{out}");
    assert!(!out.contains("whsec_"), "{out}");

    assert_eq!(receiver.received().len(), 3);
    assert_eq!(deliveries(&env, endpoint).await.len(), 3);
}

/// An endpoint gets only the types it asked for; one declared in the configuration is
/// registered when the worker starts, and signs with the secret declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_get_the_types_they_ask_for_and_configured_ones_are_registered() {
    let env = TestEnv::front_with(config()).await;
    let (key_id, key) = key(&env).await;
    let every = Receiver::start(vec![200]).await;
    let failures = Receiver::start(vec![200]).await;
    let declared = Receiver::start(vec![200]).await;
    webhooks::add_endpoint(&env.pool, &env.config, key_id, &every.url(), None, None)
        .await
        .unwrap();
    let (failures_endpoint, _) = webhooks::add_endpoint(
        &env.pool,
        &env.config,
        key_id,
        &failures.url(),
        Some(&["response.failed".to_string()]),
        None,
    )
    .await
    .unwrap();
    let (_, secret) = sign::Secret::generate();
    let mut with_declared = (*env.config).clone();
    with_declared.webhooks.endpoints = vec![WebhookEndpointConfig {
        key_id,
        url: declared.url(),
        events: vec!["response.completed".into()],
        secret: secret.clone(),
    }];
    let _worker = OwnWorker::start(&env, with_declared);
    let registered = || async {
        sqlx::query_as::<_, (Option<Vec<String>>, String)>(
            "SELECT event_types, secret FROM tollgate.webhook_endpoints
              WHERE url = $1 AND key_id = $2 AND disabled_at IS NULL",
        )
        .bind(declared.url())
        .bind(key_id)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
    };
    let stored = within(Duration::from_secs(10), || async {
        registered().await.is_some()
    })
    .await;
    let urls: Vec<String> = sqlx::query_scalar("SELECT url FROM tollgate.webhook_endpoints")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert!(
        stored,
        "the worker did not register {}: {urls:?}",
        declared.url()
    );
    assert_eq!(
        registered().await,
        Some((Some(vec!["response.completed".into()]), secret.clone()))
    );

    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;
    let both = within(Duration::from_secs(20), || async {
        !every.received().is_empty() && !declared.received().is_empty()
    })
    .await;
    assert!(
        both,
        "received: {} by the endpoint for every type, {} by the declared one",
        every.received().len(),
        declared.received().len()
    );
    // The endpoint for failures would have been sent the event in the same round.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(failures.received().len(), 0);
    assert_eq!(deliveries(&env, failures_endpoint).await, []);
    let (every, declared) = (every.received(), declared.received());
    assert_eq!((every.len(), declared.len()), (1, 1));
    assert_eq!(every[0].json()["type"], "response.completed");
    assert_eq!(every[0].json()["data"]["id"], id.as_str());
    assert_eq!(declared[0].body, every[0].body);
    declared[0].assert_signed(&secret);
}

/// Endpoints added or removed while a worker runs take effect at once, announced by PostgreSQL
/// (the periodic re-read is an hour away here): a new one gets the next job's webhook, and a
/// removed one no retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_or_removed_while_a_worker_runs_take_effect_at_once() {
    let mut config = config();
    config.webhooks.refresh_ms = 3_600_000;
    let mut env = TestEnv::front_with(config).await;
    let (key_id, key) = key(&env).await;
    let receiver = Receiver::start(vec![500]).await;
    env.start_worker();
    let consuming = within(Duration::from_secs(10), || async {
        consumers(&env.config.webhooks.queue).await >= 1
    })
    .await;
    assert!(consuming, "the webhook deliverer did not start");

    let (endpoint, _) =
        webhooks::add_endpoint(&env.pool, &env.config, key_id, &receiver.url(), None, None)
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;
    wait_for_outcome(&env, endpoint, &["retrying"]).await;

    // The retry comes back a second later, and finds the endpoint gone.
    assert!(tollgate::store::webhooks::disable(&env.pool, endpoint)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(receiver.received().len(), 1);
    let rows = deliveries(&env, endpoint).await;
    let rows: Vec<_> = rows.iter().map(|r| (r.0, r.1.as_str())).collect();
    assert_eq!(rows, [(1, "retrying")]);
}

/// Attempts are counted by outcome and timed, at `/metrics`. The registry is shared by the tests
/// running in this process: only growth is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_counted_and_timed_in_the_metrics() {
    let mut env = TestEnv::front_with(config()).await;
    let (key_id, key) = key(&env).await;
    let receiver = Receiver::start(vec![500, 200]).await;
    let (endpoint, _) =
        webhooks::add_endpoint(&env.pool, &env.config, key_id, &receiver.url(), None, None)
            .await
            .unwrap();
    let delivered: (&str, &[(&str, &str)]) = (
        "tollgate_webhook_deliveries_total",
        &[("outcome", "delivered")],
    );
    let retrying: (&str, &[(&str, &str)]) = (
        "tollgate_webhook_deliveries_total",
        &[("outcome", "retrying")],
    );
    let timed: (&str, &[(&str, &str)]) = ("tollgate_webhook_delivery_seconds_count", &[]);
    let before = [
        metric(&env, delivered).await.unwrap_or(0.0),
        metric(&env, retrying).await.unwrap_or(0.0),
        metric(&env, timed).await.expect("timed"),
    ];
    env.start_worker();
    let id = env.submit_ok(&key, "mock-1", "hello").await;
    env.poll_until_done(&key, &id).await;
    wait_for_outcome(&env, endpoint, &["delivered"]).await;
    let after = [
        metric(&env, delivered).await.expect("delivered"),
        metric(&env, retrying).await.expect("retrying"),
        metric(&env, timed).await.expect("timed"),
    ];
    assert!(after[0] >= before[0] + 1.0, "{before:?} → {after:?}");
    assert!(after[1] >= before[1] + 1.0, "{before:?} → {after:?}");
    assert!(after[2] >= before[2] + 2.0, "{before:?} → {after:?}");
}
