//! The load generator: background submissions (`POST /v1/responses`) from a fixed number of
//! kept-alive connections, each looping request after request, and the latency figures.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};

/// A request body of about `bytes` bytes: model, background mode and an input text.
pub fn request_body(model: &str, bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "Summarise",
        "the",
        "quarterly",
        "report",
        "for",
        "the",
        "board,",
        "listing",
        "revenue,",
        "costs",
        "and",
        "the",
        "three",
        "largest",
        "risks",
        "in",
        "plain",
        "words.",
    ];
    let shell = serde_json::json!({"model": model, "background": true, "input": ""}).to_string();
    let mut text = String::new();
    for word in WORDS.iter().cycle() {
        if shell.len() + text.len() + word.len() + 1 > bytes {
            break;
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(word);
    }
    serde_json::json!({"model": model, "background": true, "input": text}).to_string()
}

/// An HTTP client for the load: kept-alive connections, enough of them idle for `connections`.
pub fn client(connections: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// Latencies in milliseconds, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<f64>);

impl Latencies {
    pub fn new(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self(ms)
    }

    /// The nearest-rank percentile `p` (0 < p ≤ 1); 0 when there is none.
    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = (p * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(0.0)
    }
}

/// What a timed load gave.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// 2xx answers to requests started in the measured window.
    pub ok: u64,
    /// `ok` over the time from the window's start to the last of those answers.
    pub rate: f64,
    pub latencies: Latencies,
    /// Every other outcome (status and the start of the body, or the transport error), counted.
    pub failures: Vec<(String, u64)>,
}

impl LoadOutcome {
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|(_, n)| n).sum()
    }

    /// Prints the failures, if any.
    pub fn print_failures(&self) {
        for (what, n) in &self.failures {
            println!("    non-2xx ×{n}: {what}");
        }
    }
}

/// Submits `body` at full speed from `connections` connections (connection i uses
/// `secrets[i % len]`) for `warmup` + `window`; only requests started in the window count.
pub async fn submit_for(
    base_url: &str,
    secrets: &[String],
    body: &str,
    connections: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<LoadOutcome> {
    let client = client(connections)?;
    let url = format!("{base_url}/v1/responses");
    let body = body.to_string();
    let start = Instant::now() + warmup;
    let end = start + window;
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            let body = body.clone();
            let secret = secrets[i % secrets.len()].clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures: HashMap<String, u64> = HashMap::new();
                let mut last = start;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let outcome = post(&client, &url, &secret, body.clone()).await;
                    let answered = Instant::now();
                    if sent < start {
                        continue;
                    }
                    last = last.max(answered);
                    match outcome {
                        Ok(_) => latencies.push((answered - sent).as_secs_f64() * 1000.0),
                        Err(what) => *failures.entry(what).or_default() += 1,
                    }
                }
                (latencies, failures, last)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failures: HashMap<String, u64> = HashMap::new();
    let mut last = start;
    for task in tasks {
        let (latencies, failed, task_last) = task.await?;
        all.extend(latencies);
        for (what, n) in failed {
            *failures.entry(what).or_default() += n;
        }
        last = last.max(task_last);
    }
    let ok = all.len() as u64;
    let elapsed = (last - start).as_secs_f64().max(1e-9);
    let mut failures: Vec<(String, u64)> = failures.into_iter().collect();
    failures.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    Ok(LoadOutcome {
        ok,
        rate: ok as f64 / elapsed,
        latencies: Latencies::new(all),
        failures,
    })
}

/// One submission; its job's public id, or what went wrong in a line.
async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: String,
) -> Result<String, String> {
    let response = client
        .post(url)
        .bearer_auth(secret)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("transport error: {e}"))?;
    let status = response.status();
    let text = response
        .bytes()
        .await
        .map_err(|e| format!("{status}, body cut: {e}"))?;
    if !status.is_success() {
        let shown: String = String::from_utf8_lossy(&text).chars().take(200).collect();
        return Err(format!("{status} {shown}"));
    }
    serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["id"].as_str().map(String::from))
        .ok_or_else(|| format!("{status} without an id"))
}

/// Submits exactly `n` jobs (job i with key `i % secrets.len()`), `connections` at a time;
/// every one must be accepted. Returns the job ids with the index of their key.
pub async fn submit_n(
    base_url: &str,
    secrets: &[String],
    body: &str,
    n: usize,
    connections: usize,
) -> anyhow::Result<Vec<(String, usize)>> {
    let client = client(connections)?;
    let url = Arc::new(format!("{base_url}/v1/responses"));
    let body = body.to_string();
    futures::stream::iter(0..n)
        .map(|i| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            let key = i % secrets.len();
            let secret = secrets[key].clone();
            async move {
                match post(&client, &url, &secret, body).await {
                    Ok(id) => Ok((id, key)),
                    Err(what) => bail!("a submission failed: {what}"),
                }
            }
        })
        .buffered(connections)
        .try_collect()
        .await
        .context("submitting jobs")
}
