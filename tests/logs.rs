//! Logs and the worker's own listener, from real `tollgate serve` and `tollgate worker` processes:
//! with `TOLLGATE_LOG_FORMAT=json` every line is one JSON object; the front's lines about a
//! request carry its request id (the client's `X-Request-Id`, answered back) and, once admitted,
//! the job id; the worker's lines about a job carry the job id; no line carries the API key, the
//! master key, the prompt or the output. The worker serves `/healthz`, `/readyz` and `/metrics`
//! on `TOLLGATE_WORKER_LISTEN`.

mod common;

use std::{process::Stdio, time::Duration};

use common::isolated_config;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tollgate::{config::ModelConfig, run, store::keys};

const MASTER: &str = "log-test-master-key-0123456789abcdef";
const PROMPT: &str = "the-prompt-nobody-may-log-7f3a";

/// A tollgate process with JSON logs, its stderr lines collected.
struct Child {
    process: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Child {
    fn start(command: &str, config_path: &std::path::Path) -> Self {
        let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg(command)
            .arg("--config")
            .arg(config_path)
            .env("TOLLGATE_LOG_FORMAT", "json")
            .env("TOLLGATE_LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_WORKER_LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_ADMIN_KEY", MASTER)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("tollgate starts");
        let stderr = process.stderr.take().unwrap();
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = send.send(line);
            }
        });
        Self {
            process,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line whose message is `message`, returning it parsed.
    async fn wait_for(&mut self, message: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            for line in &self.seen {
                let parsed: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
                if parsed["message"] == message {
                    return parsed;
                }
            }
            let next = tokio::time::timeout_at(deadline, self.lines.recv()).await;
            match next {
                Ok(Some(line)) => self.seen.push(line),
                _ => panic!("no line {message:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line so far, after a moment for the last ones to arrive.
    async fn drain(&mut self) -> Vec<String> {
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(500), self.lines.recv()).await
        {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

/// A field of a line, from the event or any of its spans.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line[name].as_str().or_else(|| {
        line["spans"]
            .as_array()?
            .iter()
            .find_map(|span| span[name].as_str())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_and_job_ids_and_no_secrets() {
    let config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    let pool = run::prepare_database(&config).await.unwrap();
    let (_, secret) = keys::create(
        &pool,
        &keys::NewKey {
            name: "logs".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-logs-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("tollgate.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    let mut front = Child::start("serve", &config_path);
    let listening = front.wait_for("front listening").await;
    let addr = listening["listen"].as_str().unwrap().to_string();
    let mut worker = Child::start("worker", &config_path);
    let probes = worker.wait_for("worker probes and metrics listening").await;
    let probes_addr = probes["listen"].as_str().unwrap().to_string();

    let http = reqwest::Client::new();
    let submitted = http
        .post(format!("http://{addr}/v1/responses"))
        .bearer_auth(&secret)
        .header("x-request-id", "req-from-client-42")
        .json(&json!({"model": "mock-1", "input": PROMPT, "background": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.headers()["x-request-id"], "req-from-client-42");
    let job: Value = submitted.json().await.unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    // A request without an id of its own gets one, answered back.
    let refused = http
        .post(format!("http://{addr}/v1/responses"))
        .bearer_auth("sk-tg-wrong")
        .json(&json!({"model": "mock-1", "input": "x", "background": true}))
        .send()
        .await
        .unwrap();
    let generated = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(generated.starts_with("req_"), "{generated}");
    // The admin API, with the master key.
    let listed = http
        .get(format!("http://{addr}/admin/keys"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    let admitted = front.wait_for("job admitted").await;
    assert_eq!(
        field(&admitted, "request_id"),
        Some("req-from-client-42"),
        "{admitted}"
    );
    assert_eq!(
        field(&admitted, "job_id"),
        Some(job_id.as_str()),
        "{admitted}"
    );
    let rejected = front.wait_for("request rejected").await;
    assert_eq!(
        field(&rejected, "request_id"),
        Some(generated.as_str()),
        "{rejected}"
    );
    let finished = worker.wait_for("job finished").await;
    assert_eq!(
        field(&finished, "job_id"),
        Some(job_id.as_str()),
        "{finished}"
    );
    let claimed = worker.wait_for("job claimed").await;
    assert_eq!(
        field(&claimed, "job_id"),
        Some(job_id.as_str()),
        "{claimed}"
    );

    // The worker's listener.
    let ready = http
        .get(format!("http://{probes_addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("http://{probes_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_jobs_finished_total{status=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_job_run_seconds_bucket"),
        "{metrics}"
    );

    // The output, as the client reads it, appears in no line either.
    let done: Value = http
        .get(format!("http://{addr}/v1/responses/{job_id}"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let output = done["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(output.len() > 20, "{done}");
    let mut lines = front.drain().await;
    lines.extend(worker.drain().await);
    for line in &lines {
        let _: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for forbidden in [secret.as_str(), MASTER, PROMPT, output.as_str()] {
            assert!(
                !line.contains(forbidden),
                "a log line leaks {forbidden:?}: {line}"
            );
        }
    }
    let _ = front.process.kill().await;
    let _ = worker.process.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    pool.close().await;
    common::remove_resources(&config);
}
