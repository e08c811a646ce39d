//! Webhooks: OpenAI's `response.*` events POSTed to a key's endpoints, signed by the Standard
//! Webhooks specification, retried through delay queues, every attempt recorded.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::HeaderMap, routing::post, Router};
use common::TestEnv;
use tollgate::{config::ModelConfig, store::keys::NewKey, webhooks};
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

/// A test configuration whose webhooks may reach loopback and retry after 1 s, then 1 s.
fn config() -> tollgate::config::Config {
    let mut config = common::isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.webhooks.allow_networks = vec!["127.0.0.0/8".into()];
    config.webhooks.retry_schedule_secs = vec![1, 1];
    config.webhooks.timeout_ms = 2000;
    config
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
