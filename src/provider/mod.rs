//! Providers turn a job's request into a stream of text deltas and, at the end, the usage.
//! Built in: `mock` (deterministic text, no network) and any OpenAI-compatible chat completions
//! API with `stream: true`.

mod mock;
pub use mock::delta as mock_delta;
mod openai;
pub mod sse;

use std::pin::Pin;

use futures::Stream;
use serde::Serialize;

use crate::config::{ModelConfig, ProviderKind};

/// One chat message sent upstream.
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
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Delta(String),
    /// Token counts, as reported by the upstream at the end of the stream.
    Usage {
        input_tokens: u32,
        output_tokens: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("upstream answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("cannot reach upstream: {0}")]
    Transport(String),
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream sent a malformed stream: {0}")]
    Protocol(String),
    #[error("upstream reported an error: {0}")]
    Upstream(String),
    #[error("provider misconfigured: {0}")]
    Config(String),
}

impl ProviderError {
    /// Whether another attempt may succeed (connection trouble, timeouts, 429 and 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
            ProviderError::Transport(_) | ProviderError::Timeout => true,
            ProviderError::Protocol(_) | ProviderError::Upstream(_) | ProviderError::Config(_) => {
                false
            }
        }
    }

    /// A short machine-readable code for the stored error.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Status { .. } => "upstream_http_error",
            ProviderError::Transport(_) => "upstream_unreachable",
            ProviderError::Timeout => "upstream_timeout",
            ProviderError::Protocol(_) => "upstream_protocol_error",
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
    }
}
