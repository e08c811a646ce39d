//! Configuration: a TOML file (`tollgate.toml` by default, or `TOLLGATE_CONFIG`) with environment
//! overrides for the connection strings (`DATABASE_URL`, `AMQP_URL`) and the listen address
//! (`TOLLGATE_LISTEN`). Models are declared LiteLLM-style: a public name mapped to a provider, the
//! upstream model, its base URL, the env var holding its API key and its prices.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::money::MicroUsd;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub amqp: AmqpConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub guardrails: GuardrailsConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default = "default_models")]
    pub models: Vec<ModelConfig>,
}

/// The admin API (`/admin/…`), open only when a master key is set: `TOLLGATE_ADMIN_KEY`, else the
/// file named by `TOLLGATE_ADMIN_KEY_FILE` or `admin.key_file` (its first line). The key itself is
/// never in the configuration file, in a log line or in `Debug` output.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub key_file: Option<String>,
    /// The key, as read at start.
    #[serde(skip)]
    pub key: Option<Secret>,
}

/// The shortest master key accepted, in bytes: a guessable key would open every key's limits.
pub const ADMIN_KEY_MIN_BYTES: usize = 24;

/// A secret that shows itself only on purpose ([`Secret::expose`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Logging (stderr). `RUST_LOG` filters it (default `info`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` (the default) or `json` (one object per line); `TOLLGATE_LOG_FORMAT` overrides it.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Checks run on a request's input before admission takes anything. A request a guardrail refuses
/// gets a 400 naming the guardrail.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardrailsConfig {
    /// Largest input accepted (instructions + input text), in bytes.
    pub max_input_bytes: Option<usize>,
    /// Inputs matching any of these regular expressions are refused.
    pub deny: Vec<DenyPattern>,
    /// External checks: the input is POSTed to each; its answer allows or denies.
    pub webhooks: Vec<WebhookGuardrail>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyPattern {
    pub name: String,
    /// A regular expression (Rust `regex` syntax), matched against each message's text.
    pub pattern: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookGuardrail {
    pub name: String,
    pub url: String,
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// On timeout or error: allow the request (true) or refuse it (false, the default).
    #[serde(default)]
    pub fail_open: bool,
}

fn default_webhook_timeout_ms() -> u64 {
    2000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    /// A direct connection to PostgreSQL, when `url` goes through a pooler in transaction mode
    /// (PgBouncer's `pool_mode = transaction`), which cannot carry what lasts beyond one
    /// transaction: LISTEN (streams' wake-ups, key and endpoint changes, cancels), the
    /// migrations' session lock and creating the database use this URL instead. Unset: `url`
    /// serves all. `DATABASE_DIRECT_URL` overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_url: Option<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/tollgate".into(),
            max_connections: 20,
            direct_url: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// The broker's AMQP URL, or several separated by commas (the nodes of a cluster): a process
    /// connects to the first that answers and, when that connection is lost, tries them again
    /// starting after the one it lost ([`crate::queue::connect`]).
    pub url: String,
    /// Durable direct exchange jobs are published to.
    pub exchange: String,
    /// Quorum queue the workers consume (bound to `exchange` with routing key `jobs`).
    pub queue: String,
    /// Exchange and queue that receive messages no worker can process.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Deliveries a job message may have (RabbitMQ's `x-delivery-count` header) before the worker
    /// dead-letters it and fails its job: a backstop against a message redelivered forever. The
    /// worker enforces it, not a queue argument, so it can change between restarts; it may be at
    /// most [`BROKER_DELIVERY_LIMIT`], the queue's own `x-delivery-limit`.
    pub delivery_limit: u32,
    /// Name tollgate's connections carry in RabbitMQ (`-publisher` / `-worker` appended).
    pub connection_name: String,
    /// How long a publish may wait for RabbitMQ's confirm, in milliseconds.
    pub publish_timeout_ms: u64,
}

/// The jobs queue's `x-delivery-limit`: fixed, so that changing `amqp.delivery_limit` never
/// changes a queue argument (RabbitMQ refuses to re-declare a queue with other arguments).
pub const BROKER_DELIVERY_LIMIT: u32 = 1000;

impl AmqpConfig {
    /// How long a publish may wait for RabbitMQ's confirm.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// The URLs of `url`, in order.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The delay queue a job waits in before attempt `level + 1` (`level` ≥ 1).
    pub fn retry_queue(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.queue)
    }

    /// The delay queue of a job whose upstream asked for a longer wait than the backoff
    /// (`Retry-After`); messages wait there at most `worker.retry_max_ms`.
    pub fn retry_after_queue(&self) -> String {
        format!("{}.delay.after", self.queue)
    }

    /// The delay queue of a job whose worker could not reach PostgreSQL; messages wait there at
    /// most `worker.db_retry_max_ms`.
    pub fn db_retry_queue(&self) -> String {
        format!("{}.delay.db", self.queue)
    }

    /// Every delay queue, for `max_attempts` attempts.
    pub fn delay_queues(&self, max_attempts: u32) -> Vec<String> {
        (1..max_attempts)
            .map(|level| self.retry_queue(level))
            .chain([self.retry_after_queue(), self.db_retry_queue()])
            .collect()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "tollgate".into(),
            queue: "tollgate.jobs".into(),
            dead_letter_exchange: "tollgate.dlx".into(),
            dead_letter_queue: "tollgate.jobs.dead".into(),
            delivery_limit: 20,
            connection_name: "tollgate".into(),
            publish_timeout_ms: 5000,
        }
    }
}

/// Lifecycle events (README "Lifecycle events"): every transition of a job, published to a topic
/// exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Durable topic exchange the events are published to, routing key `job.<status>.<model>`.
    pub exchange: String,
    /// Adds the stored request and the output text to terminal events. Off by default: events
    /// carry neither the prompt nor the output.
    pub include_content: bool,
    /// How often the event relay looks for events to publish, in milliseconds (it goes on at
    /// once while there are more).
    pub relay_interval_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            exchange: "tollgate.events".into(),
            include_content: false,
            relay_interval_ms: 100,
        }
    }
}

/// Webhooks (README "Webhooks"): OpenAI's `response.*` events, POSTed to endpoints configured
/// per key and signed by the Standard Webhooks specification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Whether workers deliver webhooks. Off: the webhooks queue is not declared, nor consumed
    /// (a queue declared earlier stays bound: delete it).
    pub enabled: bool,
    /// Quorum queue of the deliveries, bound to the events exchange for terminal events. Its
    /// retries wait in `<queue>.delay.<n>` and its abandoned deliveries go to `<queue>.dead`.
    pub queue: String,
    /// The wait before each retry, in seconds: retry n waits `retry_schedule_secs[n - 1]`. A
    /// delivery whose last retry fails is dead-lettered. The default retries 10 times over
    /// about 23.7 hours.
    pub retry_schedule_secs: Vec<u64>,
    /// One attempt's time limit (connect, send, answer), in milliseconds.
    pub timeout_ms: u64,
    /// Deliveries one worker process makes at once (also the queue's prefetch).
    pub concurrency: u16,
    /// How often the worker re-reads the endpoints, in milliseconds: a new or removed endpoint
    /// takes effect within this time.
    pub refresh_ms: u64,
    /// Networks an endpoint may reach although they are not public (loopback, private,
    /// link-local, metadata…), as CIDRs or single addresses. Empty by default: only public
    /// addresses.
    pub allow_networks: Vec<String>,
    /// Endpoints declared here are added (or updated, by key and URL) when the worker starts.
    pub endpoints: Vec<WebhookEndpointConfig>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue: "tollgate.webhooks".into(),
            retry_schedule_secs: vec![5, 30, 120, 600, 1800, 3600, 7200, 14_400, 28_800, 28_800],
            timeout_ms: 10_000,
            concurrency: 64,
            refresh_ms: 2000,
            allow_networks: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}

impl WebhooksConfig {
    /// The delay queue a delivery waits in before retry `level` (≥ 1).
    pub fn retry_queue(&self, level: usize) -> String {
        format!("{}.delay.{level}", self.queue)
    }

    /// Every delay queue of the retry schedule.
    pub fn delay_queues(&self) -> Vec<String> {
        (1..=self.retry_schedule_secs.len())
            .map(|level| self.retry_queue(level))
            .collect()
    }

    /// Where deliveries go whose last retry failed.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
}

/// A webhook endpoint declared in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpointConfig {
    /// The id of the key whose jobs it hears about.
    pub key_id: uuid::Uuid,
    pub url: String,
    /// Event types (`response.completed`, `response.failed`, `response.cancelled`,
    /// `response.incomplete`); empty or absent: all of them.
    #[serde(default)]
    pub events: Vec<String>,
    /// The signing secret, `whsec_` and base64.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most items (messages) a request's `input` may hold.
    pub max_input_items: usize,
    /// How often the outbox relay looks for messages that were not confirmed, in milliseconds.
    pub relay_interval_ms: u64,
    /// The relay leaves an outbox row this young to the front's own publish, in milliseconds (a
    /// row whose publish failed is handed to the relay's next pass at once).
    pub relay_grace_ms: u64,
    /// A job still `queued` this long after admission expires (`failed`, code `expired`) and gives
    /// back its slot and reservation.
    pub queued_job_ttl_seconds: u64,
    /// How often the front rescues lapsed leases, republishes overdue jobs and expires queued
    /// jobs, in milliseconds.
    pub sweep_interval_ms: u64,
    /// A job `queued` this long since it was admitted or last put back, whose message no worker
    /// has claimed, is published again (its message was lost: dead-lettered, or purged), once per
    /// this period and only while the jobs queue holds no ready message (so a backlog is never
    /// doubled). Longer than `worker.retry_max_ms`, the longest a retry waits on purpose.
    pub requeue_overdue_seconds: u64,
    /// Finished jobs (with their events) are removed this many days after they finished.
    pub retention_days: u32,
    /// On SIGTERM, how long requests in progress may take to finish.
    pub shutdown_grace_seconds: u64,
    /// A request with `"background": false, "stream": false` waits at most this long for its job
    /// to finish; then it gets the job as it stands (`queued` or `in_progress`) to poll.
    pub sync_wait_seconds: u64,
    /// Stream readers and waiting requests are woken by LISTEN/NOTIFY; as a safety net they also
    /// re-read the job this often, in milliseconds.
    pub stream_fallback_poll_ms: u64,
    /// A request's head (request line and headers) must arrive within this many milliseconds of
    /// its first byte, or of the connection's opening for the first request; else 408 and close.
    pub header_read_timeout_ms: u64,
    /// A request's body must arrive whole within this many milliseconds of its head; else 408
    /// (or, when no answer can be written any more, the connection is closed).
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection waiting for its next request is closed after this many
    /// milliseconds; so is one whose client reads nothing of its answer for as long. Answers in
    /// progress (event streams included) are never cut by a timeout.
    pub idle_timeout_ms: u64,
    /// Connections served at once. Past it, new connections wait in the listen backlog until
    /// one closes.
    pub max_connections: usize,
    /// Live event streams (SSE) one key may hold open on one front process; a stream past it gets
    /// 429 `too_many_streams`.
    pub max_followers_per_key: usize,
    /// How long the front keeps a key it looked up (0: not at all). A revoked key is dropped at
    /// once, and is never admitted whatever the cache holds.
    pub key_cache_ms: u64,
    /// Batches of one busy key (a key whose row another transaction held) in PostgreSQL at once
    /// from one front, each holding a pooled connection while it waits for the key's row; the
    /// key's other requests wait in the front and join its next batch. Keeps one busy key from
    /// starving the others.
    pub admissions_per_key: usize,
    /// Requests decided in one statement (one commit) at most.
    pub admission_batch: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            max_input_items: 2048,
            relay_interval_ms: 1000,
            relay_grace_ms: 5000,
            queued_job_ttl_seconds: 86_400,
            sweep_interval_ms: 5000,
            requeue_overdue_seconds: 300,
            retention_days: 30,
            shutdown_grace_seconds: 10,
            sync_wait_seconds: 300,
            stream_fallback_poll_ms: 2000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_followers_per_key: 64,
            key_cache_ms: 10_000,
            admissions_per_key: 2,
            admission_batch: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Jobs one worker runs at once (also the RabbitMQ prefetch).
    pub concurrency: u16,
    /// A batch of streamed deltas is written when it holds this many deltas...
    pub flush_max_deltas: usize,
    /// ...or when its oldest delta is this old, whichever comes first.
    pub flush_interval_ms: u64,
    /// How long a claimed job stays owned by its worker without a renewal. A task beside the
    /// upstream call renews it every third of it, from the claim to the attempt's last write
    /// (its only renewal); a job whose lease lapsed (its worker died) is rescued.
    pub lease_seconds: u32,
    /// Attempts a job gets before a retryable upstream failure fails it for good.
    pub max_attempts: u32,
    /// Backoff before attempt n+1: `retry_base_ms` × 2^(n-1), at most `retry_max_ms`, minus up to
    /// 20% jitter.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// While its worker cannot reach PostgreSQL, a job's message waits in a delay queue, 1 s the
    /// first time and doubling up to this, then comes back to be tried again: an outage of any
    /// length strands no job, and a job runs at most this long after the outage ends.
    pub db_retry_max_ms: u64,
    /// On SIGTERM, how long running jobs may take to finish before they are handed back.
    pub shutdown_grace_seconds: u64,
    /// Where a worker process (`tollgate worker`) serves `/healthz`, `/readyz` and `/metrics`;
    /// empty for nowhere. `TOLLGATE_WORKER_LISTEN` overrides it. (`tollgate all` serves them on
    /// the front's address.)
    pub listen: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 1024,
            flush_max_deltas: 64,
            flush_interval_ms: 50,
            lease_seconds: 30,
            max_attempts: 4,
            retry_base_ms: 1000,
            retry_max_ms: 60_000,
            db_retry_max_ms: 10_000,
            shutdown_grace_seconds: 30,
            listen: "127.0.0.1:9091".into(),
        }
    }
}

impl WorkerConfig {
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    /// How long a job's message waits after its worker failed to reach PostgreSQL `failures`
    /// times in a row (≥ 1): 1 s doubling, at most `db_retry_max_ms`.
    pub fn db_retry_delay(&self, failures: u32) -> Duration {
        let factor = 1u64 << failures.saturating_sub(1).min(30);
        Duration::from_millis(1000u64.saturating_mul(factor).min(self.db_retry_max_ms))
    }

    /// The delay before the attempt after `level` failed attempts (without jitter).
    pub fn retry_delay(&self, level: u32) -> Duration {
        let factor = 1u64 << level.saturating_sub(1).min(30);
        Duration::from_millis(
            self.retry_base_ms
                .saturating_mul(factor)
                .min(self.retry_max_ms),
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Deterministic streamed text; needs no network and no key.
    Mock,
    /// Any OpenAI-compatible `POST {base_url}/chat/completions` with `stream: true` (OpenAI,
    /// Azure OpenAI, OpenRouter, vLLM, Ollama, …).
    Openai,
    /// An upstream speaking OpenAI's Responses API: `POST {base_url}/responses`, `stream: true`.
    OpenaiResponses,
    /// Anthropic's Messages API: `POST {base_url}/messages`, `stream: true`.
    Anthropic,
}

impl ProviderKind {
    /// The name used in configuration, logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderKind::Mock => "mock",
            ProviderKind::Openai => "openai",
            ProviderKind::OpenaiResponses => "openai_responses",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// The field of a chat completions request that carries the output cap. OpenAI's current models
/// take `max_completion_tokens` (its o-series refuse `max_tokens`); many compatible servers still
/// read only `max_tokens`; `both` sends the two.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CapField {
    #[default]
    MaxCompletionTokens,
    MaxTokens,
    Both,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send in `model`.
    pub name: String,
    pub provider: ProviderKind,
    /// The model name sent upstream (defaults to `name`).
    pub upstream_model: Option<String>,
    /// Base URL of an OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub base_url: Option<String>,
    /// Environment variable that holds the upstream API key.
    pub api_key_env: Option<String>,
    /// Header that carries the key as it is (e.g. `api-key` for Azure OpenAI). Default:
    /// `Authorization: Bearer <key>`, or `x-api-key` for Anthropic.
    pub api_key_header: Option<String>,
    /// Headers sent with every upstream request (e.g. OpenRouter's `HTTP-Referer`).
    #[serde(default)]
    pub extra_headers: BTreeMap<String, String>,
    /// Query parameters added to every upstream request (e.g. Azure's `api-version`).
    #[serde(default)]
    pub extra_query: BTreeMap<String, String>,
    /// Chat completions only: which field carries the output cap.
    #[serde(default)]
    pub cap_field: CapField,
    /// Anthropic only: the `anthropic-version` header.
    #[serde(default = "default_anthropic_version")]
    pub anthropic_version: String,
    /// Price in USD per one million input tokens.
    #[serde(default)]
    pub input_price_per_1m: f64,
    /// Price in USD per one million output tokens.
    #[serde(default)]
    pub output_price_per_1m: f64,
    /// Output cap used for the worst-case budget reservation when a request sets no
    /// `max_output_tokens` (and the most a request may ask for). The cap a job was reserved for
    /// is always sent upstream, so the reservation is the upstream's worst-case bill.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
    /// Mock provider: number of deltas streamed.
    #[serde(default = "default_mock_deltas")]
    pub mock_deltas: u32,
    /// Mock provider: pause before each delta, in milliseconds.
    #[serde(default)]
    pub mock_delay_ms: u64,
    /// Upstream timeout for the whole call, in seconds: a job past it ends `failed` (code
    /// `job_timeout`), keeping the output it had.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Upstream connect timeout, in seconds (a retryable failure).
    #[serde(default = "default_connect_timeout_seconds")]
    pub connect_timeout_seconds: u64,
    /// Longest wait for the first delta, in seconds (a retryable failure). Reasoning models may
    /// think for minutes before their first token: raise it for them. The job's lease is held
    /// meanwhile, so a long wait never lets another worker call the upstream again.
    #[serde(default = "default_first_token_timeout_seconds")]
    pub first_token_timeout_seconds: u64,
    /// Requests per minute across all keys (protects the upstream's own limit).
    pub rpm_limit: Option<u32>,
    /// Tokens per minute across all keys.
    pub tpm_limit: Option<u64>,
    /// How input tokens are counted at admission: `o200k_base`, `cl100k_base` or `bytes`.
    /// Default: the upstream model's OpenAI encoding when it has one, else `bytes`.
    pub tokenizer: Option<TokenizerKind>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    O200kBase,
    Cl100kBase,
    /// The documented fallback: about 4 bytes a token.
    Bytes,
}

fn default_max_output_tokens() -> u32 {
    4096
}
fn default_anthropic_version() -> String {
    "2023-06-01".into()
}
fn default_mock_deltas() -> u32 {
    20
}
fn default_timeout_seconds() -> u64 {
    600
}
fn default_connect_timeout_seconds() -> u64 {
    10
}
fn default_first_token_timeout_seconds() -> u64 {
    120
}

fn default_models() -> Vec<ModelConfig> {
    vec![ModelConfig::mock("mock-1")]
}

impl ModelConfig {
    /// A mock model with the defaults of `tollgate.toml`.
    pub fn mock(name: &str) -> Self {
        Self {
            name: name.into(),
            provider: ProviderKind::Mock,
            upstream_model: None,
            base_url: None,
            api_key_env: None,
            api_key_header: None,
            extra_headers: BTreeMap::new(),
            extra_query: BTreeMap::new(),
            cap_field: CapField::default(),
            anthropic_version: default_anthropic_version(),
            input_price_per_1m: 1.0,
            output_price_per_1m: 2.0,
            max_output_tokens: default_max_output_tokens(),
            mock_deltas: default_mock_deltas(),
            mock_delay_ms: 0,
            timeout_seconds: default_timeout_seconds(),
            connect_timeout_seconds: default_connect_timeout_seconds(),
            first_token_timeout_seconds: default_first_token_timeout_seconds(),
            rpm_limit: None,
            tpm_limit: None,
            tokenizer: None,
        }
    }

    pub fn upstream_model(&self) -> &str {
        self.upstream_model.as_deref().unwrap_or(&self.name)
    }

    /// Cost of a number of input and output tokens at this model's prices.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> MicroUsd {
        MicroUsd::for_tokens(input_tokens, self.input_price_per_1m)
            + MicroUsd::for_tokens(output_tokens, self.output_price_per_1m)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database: DatabaseConfig::default(),
            amqp: AmqpConfig::default(),
            server: ServerConfig::default(),
            worker: WorkerConfig::default(),
            guardrails: GuardrailsConfig::default(),
            events: EventsConfig::default(),
            webhooks: WebhooksConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            models: default_models(),
        }
    }
}

impl Config {
    /// Loads the configuration: the file named by `path`, else `TOLLGATE_CONFIG`, else
    /// `tollgate.toml` when present, else the built-in defaults; then the environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env_path = std::env::var("TOLLGATE_CONFIG").ok();
        let chosen = path
            .map(|p| p.to_string_lossy().into_owned())
            .or(env_path)
            .or_else(|| {
                Path::new("tollgate.toml")
                    .exists()
                    .then(|| "tollgate.toml".into())
            });
        let mut config = match chosen {
            Some(path) => Self::from_file(&path)?,
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok());
        match std::env::var("TOLLGATE_LOG_FORMAT").as_deref() {
            Ok("json") => config.log.format = LogFormat::Json,
            Ok("human") => config.log.format = LogFormat::Human,
            Ok(other) => {
                return Err(ConfigError::Invalid(format!(
                    "TOLLGATE_LOG_FORMAT must be json or human, not {other:?}"
                )))
            }
            Err(_) => {}
        }
        config.read_admin_key(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(url) = var("DATABASE_URL") {
            self.database.url = url;
        }
        if let Some(url) = var("DATABASE_DIRECT_URL") {
            self.database.direct_url = Some(url);
        }
        if let Some(url) = var("AMQP_URL") {
            self.amqp.url = url;
        }
        if let Some(listen) = var("TOLLGATE_LISTEN") {
            self.server.listen = listen;
        }
        if let Some(listen) = var("TOLLGATE_WORKER_LISTEN") {
            self.worker.listen = listen;
        }
    }

    /// Reads the admin API's master key from the environment or its file.
    fn read_admin_key(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(key) = var("TOLLGATE_ADMIN_KEY").filter(|k| !k.is_empty()) {
            self.admin.key = Some(Secret::new(key));
            return Ok(());
        }
        let Some(path) = var("TOLLGATE_ADMIN_KEY_FILE").or_else(|| self.admin.key_file.clone())
        else {
            return Ok(());
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let key = text.lines().next().unwrap_or_default().trim();
        self.admin.key = Some(Secret::new(key));
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashMap::new();
        for model in &self.models {
            if seen.insert(model.name.as_str(), ()).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "model {:?} is declared twice",
                    model.name
                )));
            }
            if model.input_price_per_1m < 0.0 || model.output_price_per_1m < 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "model {:?} has a negative price",
                    model.name
                )));
            }
            if model.provider != ProviderKind::Mock && model.base_url.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "model {:?} uses provider {:?} and needs base_url",
                    model.name,
                    model.provider.as_str()
                )));
            }
            if model.max_output_tokens == 0 {
                return Err(ConfigError::Invalid(format!(
                    "model {:?}: max_output_tokens must be at least 1",
                    model.name
                )));
            }
        }
        for deny in &self.guardrails.deny {
            regex::Regex::new(&deny.pattern).map_err(|e| {
                ConfigError::Invalid(format!("guardrail {:?}: bad pattern: {e}", deny.name))
            })?;
        }
        if !(1..=10).contains(&self.worker.max_attempts) {
            return Err(ConfigError::Invalid(
                "worker.max_attempts must be 1 to 10".into(),
            ));
        }
        if let Some(key) = &self.admin.key {
            if key.expose().len() < ADMIN_KEY_MIN_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "the admin key must be at least {ADMIN_KEY_MIN_BYTES} bytes long"
                )));
            }
        }
        if self.amqp.urls().is_empty() {
            return Err(ConfigError::Invalid("amqp.url must name a broker".into()));
        }
        if !(1..=BROKER_DELIVERY_LIMIT).contains(&self.amqp.delivery_limit) {
            return Err(ConfigError::Invalid(format!(
                "amqp.delivery_limit must be 1 to {BROKER_DELIVERY_LIMIT}"
            )));
        }
        if self.server.requeue_overdue_seconds * 1000 <= self.worker.retry_max_ms {
            return Err(ConfigError::Invalid(
                "server.requeue_overdue_seconds must be longer than worker.retry_max_ms".into(),
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "worker.concurrency must be > 0".into(),
            ));
        }
        if self.server.admissions_per_key == 0 {
            return Err(ConfigError::Invalid(
                "server.admissions_per_key must be > 0".into(),
            ));
        }
        if self.webhooks.retry_schedule_secs.len() > 20 {
            return Err(ConfigError::Invalid(
                "webhooks.retry_schedule_secs holds at most 20 waits".into(),
            ));
        }
        crate::webhooks::ssrf::AddressPolicy::new(&self.webhooks.allow_networks)
            .map_err(|e| ConfigError::Invalid(format!("webhooks.allow_networks: {e}")))?;
        for endpoint in &self.webhooks.endpoints {
            let invalid = |e: String| {
                ConfigError::Invalid(format!("webhook endpoint {:?}: {e}", endpoint.url))
            };
            crate::webhooks::check_types(Some(&endpoint.events))
                .map_err(|e| invalid(e.to_string()))?;
            crate::webhooks::sign::Secret::parse(&endpoint.secret)
                .map_err(|e| invalid(e.to_string()))?;
        }
        if self.webhooks.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "webhooks.concurrency must be > 0".into(),
            ));
        }
        if self.server.admission_batch == 0 {
            return Err(ConfigError::Invalid(
                "server.admission_batch must be > 0".into(),
            ));
        }
        Ok(())
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_file_parses_and_validates() {
        let config = Config::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/tollgate.toml"))
            .expect("tollgate.toml parses");
        config.validate().expect("tollgate.toml is valid");
        assert!(config.model("mock-1").is_some());
    }

    #[test]
    fn the_readme_provider_examples_parse_and_validate() {
        let readme = include_str!("../README.md");
        let block = readme
            .split("## Providers")
            .nth(1)
            .and_then(|s| s.split("```toml\n").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("the README's Providers section has a TOML block");
        let config: Config = toml::from_str(block).expect("the examples parse");
        config.validate().expect("the examples are valid");
        let kinds: Vec<_> = config.models.iter().map(|m| m.provider.as_str()).collect();
        assert_eq!(kinds, ["openai", "openai", "anthropic", "openai_responses"]);
        assert_eq!(config.models[1].cap_field, CapField::MaxTokens);
        assert_eq!(config.models[0].api_key_header.as_deref(), Some("api-key"));
    }

    #[test]
    fn env_overrides_file() {
        let mut config = Config::default();
        config.apply_env(|name| match name {
            "DATABASE_URL" => Some("postgres://x/y".into()),
            "AMQP_URL" => Some("amqp://z".into()),
            _ => None,
        });
        assert_eq!(config.database.url, "postgres://x/y");
        assert_eq!(config.amqp.url, "amqp://z");
        assert_eq!(config.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn operations_settings_come_from_the_environment() {
        let mut config = Config::default();
        config.apply_env(|name| match name {
            "DATABASE_DIRECT_URL" => Some("postgres://direct/y".into()),
            "AMQP_URL" => Some(" amqp://a:5672/%2f, amqp://b:5672/%2f,".into()),
            "TOLLGATE_WORKER_LISTEN" => Some("0.0.0.0:9091".into()),
            _ => None,
        });
        assert_eq!(
            config.database.direct_url.as_deref(),
            Some("postgres://direct/y")
        );
        assert_eq!(
            config.amqp.urls(),
            ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
        );
        assert_eq!(config.worker.listen, "0.0.0.0:9091");
        config.validate().unwrap();

        let file = std::env::temp_dir().join(format!("tollgate-key-{}", uuid::Uuid::new_v4()));
        std::fs::write(&file, "a-master-key-of-thirty-two-bytes!\nignored\n").unwrap();
        let path = file.to_string_lossy().into_owned();
        config
            .read_admin_key(|name| (name == "TOLLGATE_ADMIN_KEY_FILE").then(|| path.clone()))
            .unwrap();
        let key = config.admin.key.clone().unwrap();
        assert_eq!(key.expose(), "a-master-key-of-thirty-two-bytes!");
        assert!(
            !format!("{config:?}").contains(key.expose()),
            "the key shows in Debug"
        );
        assert!(!toml::to_string(&config).unwrap().contains(key.expose()));
        config.validate().unwrap();
        config.admin.key = Some(Secret::new("short"));
        assert!(config.validate().is_err(), "a short master key is refused");
        config.admin.key = None;
        config.amqp.url = " , ".into();
        assert!(config.validate().is_err(), "no broker");
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn duplicate_models_are_refused() {
        let mut config = Config::default();
        config.models.push(ModelConfig::mock("mock-1"));
        assert!(config.validate().is_err());
    }
}
