//! Providers turn a job's request into one internal stream of [`Chunk`]s: text deltas, usage,
//! and the end marker with the reason the model stopped. Each provider translates its own wire
//! format at this edge; nothing past `provider/` knows one.
//!
//! Built in:
//! - `mock`: deterministic text, no network (`mock.rs`);
//! - `openai`: any OpenAI-compatible chat completions API (`openai.rs`);
//! - `openai_responses`: an upstream speaking OpenAI's Responses API (`responses.rs`);
//! - `anthropic`: Anthropic's Messages API (`anthropic.rs`).
//!
//! What every provider promises:
//! - the output cap admission reserved for ([`CallRequest::max_output_tokens`]) is sent upstream in
//!   the provider's own field, so the reservation is the upstream's worst-case bill;
//! - [`Chunk::End`] is yielded only when the upstream's own end marker arrived; a stream that
//!   stops without it is cut off, and the worker treats it as a retryable failure;
//! - [`Chunk::Usage`] carries what the upstream reported (a later one replaces an earlier one);
//! - what is read from the upstream is bounded (`http.rs`, `sse.rs`): an error body or an event
//!   past its bound is a failed attempt, never unbounded memory.

mod anthropic;
mod http;
mod mock;
pub use mock::delta as mock_delta;
mod openai;
mod responses;
pub mod sse;

use std::{pin::Pin, time::Duration};

use futures::Stream;
use serde::Serialize;

use crate::config::{ModelConfig, ProviderKind};

/// One chat message sent upstream. `role` is `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What a provider is asked to generate.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub messages: Vec<ChatMessage>,
    /// The output cap admission reserved for: the request's `max_output_tokens`, else the
    /// model's. Always sent upstream.
    pub max_output_tokens: u32,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

/// Why the model stopped, as the upstream's end marker said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A natural end (chat `stop`, Anthropic `end_turn`/`stop_sequence`, Responses `completed`).
    Completed,
    /// The output cap was reached: the answer is cut off.
    MaxOutputTokens,
    /// The upstream's content filter ended the answer.
    ContentFilter,
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Delta(String),
    /// Token counts as the upstream reported them; a later one replaces an earlier one.
    Usage {
        input_tokens: u32,
        output_tokens: u32,
    },
    /// The upstream's end marker: the answer is whole (or cut off for the reason given).
    End(StopReason),
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("upstream answered HTTP {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// The upstream's `Retry-After` (or `retry-after-ms`), if it sent one.
        retry_after: Option<Duration>,
    },
    #[error("cannot reach upstream: {0}")]
    Transport(String),
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream sent a malformed stream: {0}")]
    Protocol(String),
    #[error("the upstream stream ended without its end marker (the answer was cut off)")]
    Truncated,
    #[error("upstream sent too much: {0}")]
    Oversized(String),
    #[error("upstream reported an error: {0}")]
    Upstream(String),
    #[error("provider misconfigured: {0}")]
    Config(String),
}

impl ProviderError {
    /// Whether another attempt may succeed (connection trouble, timeouts, a cut-off stream, 408,
    /// 429 and 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                matches!(*status, 408 | 409 | 429) || *status >= 500
            }
            ProviderError::Transport(_) | ProviderError::Timeout | ProviderError::Truncated => true,
            ProviderError::Protocol(_)
            | ProviderError::Oversized(_)
            | ProviderError::Upstream(_)
            | ProviderError::Config(_) => false,
        }
    }

    /// How long the upstream asked us to wait before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short machine-readable code for the stored error.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Status { .. } => "upstream_http_error",
            ProviderError::Transport(_) => "upstream_unreachable",
            ProviderError::Timeout => "upstream_timeout",
            ProviderError::Protocol(_) => "upstream_protocol_error",
            ProviderError::Truncated => "upstream_truncated",
            ProviderError::Oversized(_) => "upstream_oversized",
            ProviderError::Upstream(_) => "upstream_error",
            ProviderError::Config(_) => "provider_misconfigured",
        }
    }
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, ProviderError>> + Send>>;

/// Starts the call to the model's provider and returns its stream of chunks.
pub async fn stream(
    http: &reqwest::Client,
    model: &ModelConfig,
    request: &CallRequest,
) -> Result<ChunkStream, ProviderError> {
    match model.provider {
        ProviderKind::Mock => Ok(mock::stream(model, request)),
        ProviderKind::Openai => openai::stream(http, model, request).await,
        ProviderKind::OpenaiResponses => responses::stream(http, model, request).await,
        ProviderKind::Anthropic => anthropic::stream(http, model, request).await,
    }
}
