//! Test harness: each `TestEnv` runs the real front (and, when asked, the real worker) against
//! its own PostgreSQL database and its own RabbitMQ exchanges and queues, all named after a fresh
//! UUID, and removes them when dropped. Set `TEST_LOG=1` to see tollgate's logs.
//!
//! Services: `TOLLGATE_TEST_PG` (default `postgres://postgres@127.0.0.1:5432`) and
//! `TOLLGATE_TEST_AMQP` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

#![allow(dead_code)]

pub mod process;
pub mod proxy;
pub mod sdk;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use lapin::{options::QueueDeclareOptions, types::FieldTable, Connection, ConnectionProperties};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tollgate::{
    config::{AmqpConfig, Config, DatabaseConfig, ModelConfig},
    run,
    store::keys::{self, NewKey},
};
use uuid::Uuid;

pub fn pg_base() -> String {
    std::env::var("TOLLGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn amqp_url() -> String {
    std::env::var("TOLLGATE_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        tollgate::telemetry::init(Default::default());
    }
}

/// A configuration of isolated names, with the given models.
pub fn isolated_config(models: Vec<ModelConfig>) -> Config {
    let tag = Uuid::new_v4().simple().to_string();
    let mut config = Config {
        database: DatabaseConfig {
            url: format!("{}/tollgate_test_{tag}", pg_base()),
            max_connections: 10,
            direct_url: None,
        },
        amqp: AmqpConfig {
            url: amqp_url(),
            exchange: format!("tg-test-{tag}"),
            queue: format!("tg-test-{tag}.jobs"),
            dead_letter_exchange: format!("tg-test-{tag}.dlx"),
            dead_letter_queue: format!("tg-test-{tag}.dead"),
            delivery_limit: 20,
            connection_name: format!("tg-test-{tag}"),
            publish_timeout_ms: 5000,
        },
        models,
        ..Config::default()
    };
    config.events.exchange = format!("tg-test-{tag}.events");
    config.webhooks.queue = format!("tg-test-{tag}.webhooks");
    config.server.listen = "127.0.0.1:0".into();
    config.worker.listen = "127.0.0.1:0".into();
    config.worker.flush_interval_ms = 10;
    config.worker.flush_max_deltas = 8;
    config
}

/// Fast retries, leases, sweeps and relays, so faults heal within seconds.
pub fn fault_config(models: Vec<ModelConfig>) -> Config {
    let mut config = isolated_config(models);
    config.worker.retry_base_ms = 100;
    config.worker.retry_max_ms = 1000;
    config.worker.lease_seconds = 2;
    config.server.sweep_interval_ms = 200;
    config.server.relay_interval_ms = 100;
    config.server.relay_grace_ms = 500;
    config
}

pub struct TestEnv {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    front: Option<JoinHandle<()>>,
    worker: Option<(CancellationToken, JoinHandle<()>)>,
}

impl TestEnv {
    /// Starts the front only (no worker): published messages stay in the queue.
    pub async fn front_only(models: Vec<ModelConfig>) -> Self {
        Self::front_with(isolated_config(models)).await
    }

    /// Starts the front only, with a configuration made by [`isolated_config`] and adjusted.
    pub async fn front_with(config: Config) -> Self {
        init_logs();
        let config = Arc::new(config);
        let pool = run::prepare_database(&config).await.expect("test database");
        let listener = run::bind(&config).await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let front = tokio::spawn({
            let (config, pool, shutdown) = (config.clone(), pool.clone(), shutdown.clone());
            async move {
                run::serve(config, pool, listener, shutdown)
                    .await
                    .expect("front runs")
            }
        });
        let env = Self {
            config,
            pool,
            addr,
            http: reqwest::Client::new(),
            shutdown,
            front: Some(front),
            worker: None,
        };
        // The front declares the topology on its first connection; wait for it so queue depths
        // can be read from the start (unless the test points the front at no broker at all).
        if env.config.amqp.url == amqp_url() {
            env.wait_for(Duration::from_secs(10), || async {
                env.queue_depth().await.is_some()
            })
            .await;
        }
        env
    }

    /// Starts the front and a worker.
    pub async fn start(models: Vec<ModelConfig>) -> Self {
        let mut env = Self::front_only(models).await;
        env.start_worker();
        env
    }

    pub fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "worker already running");
        let stop = self.shutdown.child_token();
        let handle = tokio::spawn(run::work(
            self.config.clone(),
            self.pool.clone(),
            stop.clone(),
        ));
        self.worker = Some((stop, handle));
    }

    /// Stops the worker and waits until it has handed back or finished what it held.
    pub async fn stop_worker(&mut self) {
        if let Some((stop, handle)) = self.worker.take() {
            stop.cancel();
            handle.await.unwrap();
        }
    }

    /// Cancels the shutdown token, as SIGTERM does: the front stops accepting and drains (the
    /// worker, if any, stops too).
    pub fn stop_front(&self) {
        self.shutdown.cancel();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn create_key(&self, new: NewKey) -> String {
        keys::create(&self.pool, &new).await.expect("create key").1
    }

    pub async fn key(&self) -> String {
        self.create_key(NewKey {
            name: "test".into(),
            ..Default::default()
        })
        .await
    }

    /// POST /v1/responses with a raw body.
    pub async fn submit_raw(
        &self,
        secret: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .post(self.url("/v1/responses"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(secret) = secret {
            req = req.bearer_auth(secret);
        }
        let resp = req.send().await.expect("front answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.expect("JSON body");
        (status, body, headers)
    }

    /// POST /v1/responses with extra headers; returns status, body and headers.
    pub async fn submit_with_headers(
        &self,
        secret: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .post(self.url("/v1/responses"))
            .bearer_auth(secret)
            .json(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("front answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, resp.json().await.expect("JSON body"), headers)
    }

    /// DELETE /v1/responses/{id}.
    pub async fn delete(&self, secret: &str, id: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .delete(self.url(&format!("/v1/responses/{id}")))
            .bearer_auth(secret)
            .send()
            .await
            .expect("front answers");
        (resp.status(), resp.json().await.expect("JSON body"))
    }

    pub async fn post_empty(&self, secret: &str, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(secret)
            .send()
            .await
            .expect("front answers");
        (resp.status(), resp.json().await.expect("JSON body"))
    }

    /// The summed counters of the key with this secret: (in_flight, reserved, spent).
    pub async fn counters_of(&self, secret: &str) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT sum(c.in_flight)::bigint, sum(c.reserved_micro_usd)::bigint,
                    sum(c.spent_micro_usd)::bigint
               FROM tollgate.key_counters c JOIN tollgate.api_keys k ON k.id = c.key_id
              WHERE k.key_hash = $1",
        )
        .bind(keys::hash_secret(secret))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// `/metrics`, checked to be Prometheus' text format.
    pub async fn scrape(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        response.text().await.unwrap()
    }

    pub async fn submit(&self, secret: &str, body: Value) -> (StatusCode, Value) {
        let (status, body, _) = self.submit_raw(Some(secret), &body.to_string()).await;
        (status, body)
    }

    /// Submits a background job for `model` and returns its id (asserting 200).
    pub async fn submit_ok(&self, secret: &str, model: &str, input: &str) -> String {
        let (status, body) = self
            .submit(
                secret,
                json!({"model": model, "input": input, "background": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn get(&self, secret: &str, id: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(self.url(&format!("/v1/responses/{id}")))
            .bearer_auth(secret)
            .send()
            .await
            .expect("front answers");
        (resp.status(), resp.json().await.expect("JSON body"))
    }

    /// `GET /v1/responses/{id}/input_items{query}` (`query` empty or starting with `?`).
    pub async fn input_items(&self, secret: &str, id: &str, query: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(self.url(&format!("/v1/responses/{id}/input_items{query}")))
            .bearer_auth(secret)
            .send()
            .await
            .expect("front answers");
        (resp.status(), resp.json().await.expect("JSON body"))
    }

    /// Polls a job until it reaches a terminal status.
    pub async fn poll_until_done(&self, secret: &str, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get(secret, id).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let state = body["status"].as_str().unwrap();
            if !matches!(state, "queued" | "in_progress") {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} still {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` jobs are in progress with some output written.
    pub async fn wait_until_streaming(&self, n: i64) {
        self.wait_for(Duration::from_secs(20), || async {
            let streaming: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tollgate.jobs j
                  WHERE status = 'in_progress'
                    AND tollgate.generated(j.id, j.attempt, 't') <> ''",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            streaming >= n
        })
        .await;
    }

    /// Messages ready in the jobs queue, or None if the queue does not exist yet.
    pub async fn queue_depth(&self) -> Option<u32> {
        self.depth_of(&self.config.amqp.queue).await
    }

    pub async fn dead_letter_depth(&self) -> Option<u32> {
        self.depth_of(&self.config.amqp.dead_letter_queue).await
    }

    async fn depth_of(&self, queue: &str) -> Option<u32> {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .ok()?;
        let channel = conn.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = conn.close(200, "done".into()).await;
        declared.map(|q| q.message_count())
    }

    /// Everything admission and the worker can write: row counts and every counter.
    pub async fn snapshot(&self) -> Snapshot {
        let count = |table: &'static str| {
            let pool = self.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM tollgate.{table}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let counters: Vec<(Uuid, i16, i32, i64, i64)> = sqlx::query_as(
            "SELECT key_id, slot, in_flight, reserved_micro_usd, spent_micro_usd
               FROM tollgate.key_counters ORDER BY key_id, slot",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let rate_windows: Vec<(Uuid, i16, i32)> = sqlx::query_as(
            "SELECT key_id, slot, requests FROM tollgate.rate_windows ORDER BY key_id, slot, window_start",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        Snapshot {
            jobs: count("jobs").await,
            outbox: count("outbox").await,
            events: count("job_events").await,
            queue_depth: self.queue_depth().await,
            counters,
            rate_windows,
        }
    }

    pub async fn wait_for<F, Fut>(&self, timeout: Duration, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while !condition().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A connection and channel to the test broker, with an exclusive queue `queue` of their own
/// (gone when the connection closes) bound to `exchange` with `binding`.
pub async fn own_queue(queue: &str, exchange: &str, binding: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            binding.into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, channel)
}

/// Waits, if needed, so that at least `secs` seconds are left in the current UTC minute: tests
/// of per-minute windows must not straddle two windows.
pub async fn leave_room_in_minute(secs: u64) {
    let into_minute = (chrono::Utc::now().timestamp() % 60) as u64;
    if 60 - into_minute < secs {
        tokio::time::sleep(Duration::from_secs(60 - into_minute + 1)).await;
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub jobs: i64,
    pub outbox: i64,
    pub events: i64,
    pub queue_depth: Option<u32>,
    /// (key, slot, in_flight, reserved, spent)
    pub counters: Vec<(Uuid, i16, i32, i64, i64)>,
    /// (key, slot, requests)
    pub rate_windows: Vec<(Uuid, i16, i32)>,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(front) = self.front.take() {
            front.abort();
        }
        if let Some((_, worker)) = self.worker.take() {
            worker.abort();
        }
        remove_resources(&self.config);
    }
}

/// Drops a test configuration's database and deletes its queues and exchanges.
pub fn remove_resources(config: &Config) {
    let db_url = config.database.url.clone();
    let amqp = config.amqp.clone();
    let mut retry_queues = amqp.delay_queues(config.worker.max_attempts);
    let hooks = &config.webhooks;
    retry_queues.extend(hooks.delay_queues());
    retry_queues.extend([hooks.queue.clone(), hooks.dead_letter_queue()]);
    let events_exchange = config.events.exchange.clone();
    // Clean up on a thread of its own: Drop cannot await, and the test's runtime may be
    // shutting down. The broker is always the test broker, even when the test pointed the
    // front elsewhere (a test may have declared the topology there later).
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (base, name) = db_url.rsplit_once('/').unwrap();
            if let Ok(mut conn) = PgConnection::connect(&format!("{base}/postgres")).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
            if let Ok(conn) =
                Connection::connect(&amqp_url(), ConnectionProperties::default()).await
            {
                if let Ok(ch) = conn.create_channel().await {
                    for q in [&amqp.queue, &amqp.dead_letter_queue]
                        .into_iter()
                        .chain(&retry_queues)
                    {
                        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                    }
                    for x in [&amqp.exchange, &amqp.dead_letter_exchange, &events_exchange] {
                        let _ = ch
                            .exchange_delete(x.as_str().into(), Default::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            }
        });
    })
    .join()
    .unwrap();
}

/// An answer read off a raw connection (see [`raw_request`]).
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or `Null` when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A request as bytes: `method path HTTP/1.1`, `host`, `connection: close`, the given headers,
/// and `content-length` when there is a body.
pub fn http_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: tollgate\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends `request` as is on a new connection, while reading one answer: the server may answer
/// before it has read everything (an oversized body); what it does not read is not an error.
pub async fn raw_request(addr: SocketAddr, request: Vec<u8>) -> RawResponse {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = writer.write_all(&request).await;
        writer
    });
    let response = tokio::time::timeout(Duration::from_secs(20), read_response(&mut reader))
        .await
        .expect("an answer within 20 s")
        .expect("an answer");
    sending.abort();
    response
}

/// Reads one answer: its head, then a body of its `content-length` (or, without one, up to the
/// end of the connection). None when the connection ends before a whole head.
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> Option<RawResponse> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = reader.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(length) => {
            while body.len() < length {
                let n = reader.read(&mut chunk).await.ok()?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        None => {
            let _ = reader.read_to_end(&mut body).await;
        }
    }
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// The value, in a `/metrics` text, of the first series of `name` whose labels include every one
/// of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, number) = line.rsplit_once(' ')?;
            let (series_name, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let has_all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            has_all.then(|| number.parse().ok()).flatten()
        })
}
