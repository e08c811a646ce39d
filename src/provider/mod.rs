//! Providers turn a job's request into one internal stream of [`Chunk`]s: text deltas, function
//! calls and their argument deltas, usage, and the end marker with the reason the model stopped. Each provider translates its own wire
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

/// A conversation flattened to role and text: what the token estimate counts and what the
/// guardrails read. Function calls are the assistant's words (name and arguments), function
/// outputs and tool definitions are counted as the text they are sent as.
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

/// Who speaks a message. The Responses API's `developer` is `System` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One item of the conversation sent upstream, in order: the history of earlier responses
/// (`previous_response_id`), then `instructions` (as a system message) and the request's input.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    Message {
        role: Role,
        text: String,
    },
    /// A function call the model made in an earlier turn.
    FunctionCall {
        call_id: String,
        name: String,
        /// The arguments as the model wrote them: JSON text.
        arguments: String,
    },
    /// The client's result of a function call.
    FunctionOutput {
        call_id: String,
        output: String,
    },
}

/// A function the model may call (a Responses API tool of type `function`).
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments, as given.
    pub parameters: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

impl FunctionTool {
    /// The tool as OpenAI's APIs define a function: `name`, and `description`, `parameters` and
    /// `strict` when given. (Chat nests it under `function`; Responses has it flat.)
    pub fn openai_definition(&self) -> serde_json::Value {
        let mut function = serde_json::json!({"name": self.name});
        if let Some(d) = &self.description {
            function["description"] = d.as_str().into();
        }
        if let Some(p) = &self.parameters {
            function["parameters"] = p.clone();
        }
        if let Some(strict) = self.strict {
            function["strict"] = strict.into();
        }
        function
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    /// This function must be called.
    Function(String),
}

/// `text.format` other than plain text.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    JsonObject,
    JsonSchema {
        name: String,
        description: Option<String>,
        schema: serde_json::Value,
        strict: Option<bool>,
    },
}

impl OutputFormat {
    /// The format as OpenAI's APIs define it: `{"type": "json_object"}`, or a JSON schema with
    /// `name`, `schema`, and `description` and `strict` when given. (Chat nests the schema's fields
    /// under `json_schema`; Responses has them flat.)
    pub fn openai_definition(&self) -> serde_json::Value {
        match self {
            OutputFormat::JsonObject => serde_json::json!({"type": "json_object"}),
            OutputFormat::JsonSchema {
                name,
                description,
                schema,
                strict,
            } => {
                let mut format =
                    serde_json::json!({"type": "json_schema", "name": name, "schema": schema});
                if let Some(d) = description {
                    format["description"] = d.as_str().into();
                }
                if let Some(strict) = strict {
                    format["strict"] = (*strict).into();
                }
                format
            }
        }
    }
}

/// What a provider is asked to generate: everything of the client's request that reaches the
/// model. Admission has already refused what the model's provider cannot take
/// (`CreateResponse::check_for`), so a provider translates every field it is given.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub turns: Vec<Turn>,
    /// The output cap admission reserved for: the request's `max_output_tokens`, else the
    /// model's. Always sent upstream. It bounds reasoning tokens too.
    pub max_output_tokens: u32,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub tools: Vec<FunctionTool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    /// None: plain text.
    pub format: Option<OutputFormat>,
    /// `reasoning.effort` (`minimal`, `low`, `medium`, `high`, …).
    pub reasoning_effort: Option<String>,
    /// `safety_identifier`, else `user`: who the end user is, for the upstream's abuse checks.
    pub end_user: Option<String>,
    /// `prompt_cache_key` (OpenAI-compatible upstreams only).
    pub prompt_cache_key: Option<String>,
    /// `service_tier` (`auto` or `default`; OpenAI-compatible upstreams only).
    pub service_tier: Option<String>,
}

impl CallRequest {
    /// A plain request: the turns, the cap, and nothing else.
    pub fn plain(turns: Vec<Turn>, max_output_tokens: u32) -> Self {
        Self {
            turns,
            max_output_tokens,
            temperature: None,
            top_p: None,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            format: None,
            reasoning_effort: None,
            end_user: None,
            prompt_cache_key: None,
            service_tier: None,
        }
    }

    /// The request as role and text (see [`ChatMessage`]); tool definitions and the output
    /// schema come last, as a system message, since they are sent as input too.
    pub fn as_messages(&self) -> Vec<ChatMessage> {
        let mut messages: Vec<ChatMessage> = self
            .turns
            .iter()
            .map(|turn| match turn {
                Turn::Message { role, text } => ChatMessage::new(role.as_str(), text.as_str()),
                Turn::FunctionCall {
                    name, arguments, ..
                } => ChatMessage::new("assistant", format!("{name}({arguments})")),
                Turn::FunctionOutput { output, .. } => ChatMessage::new("tool", output.as_str()),
            })
            .collect();
        let mut definitions = String::new();
        for tool in &self.tools {
            definitions.push_str(&tool.name);
            if let Some(d) = &tool.description {
                definitions.push_str(d);
            }
            if let Some(p) = &tool.parameters {
                definitions.push_str(&p.to_string());
            }
        }
        if let Some(OutputFormat::JsonSchema {
            name,
            description,
            schema,
            ..
        }) = &self.format
        {
            definitions.push_str(name);
            definitions.push_str(description.as_deref().unwrap_or(""));
            definitions.push_str(&schema.to_string());
        }
        if !definitions.is_empty() {
            messages.push(ChatMessage::new("system", definitions));
        }
        messages
    }
}

/// Token counts as the upstream reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u32,
    /// All output tokens, reasoning included (as every provider bills them).
    pub output_tokens: u32,
    /// The part of `output_tokens` spent on reasoning the client does not see.
    pub reasoning_tokens: u32,
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

/// A piece of a streamed answer. The output is a sequence of items: text deltas belong to a
/// message, and a [`Chunk::ToolCall`] starts a function call whose arguments follow as
/// [`Chunk::Arguments`] until the next item begins.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// Answer text.
    Delta(String),
    /// The model calls a function; its arguments follow.
    ToolCall { call_id: String, name: String },
    /// A piece of the arguments (JSON text) of the function call started last.
    Arguments(String),
    /// Token counts as the upstream reported them; a later one replaces an earlier one.
    Usage(Usage),
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
    /// The class of the failure for the metrics: `4xx` and `5xx` by the upstream's status,
    /// `network` for a connection that failed, timed out or was cut off, `stream` for what the
    /// upstream sent wrong or reported in its stream, `config` for a provider set up wrongly.
    pub fn status_class(&self) -> &'static str {
        match self {
            ProviderError::Status { status, .. } => crate::metrics::status_class(Some(*status)),
            ProviderError::Transport(_) | ProviderError::Timeout | ProviderError::Truncated => {
                "network"
            }
            ProviderError::Protocol(_)
            | ProviderError::Oversized(_)
            | ProviderError::Upstream(_) => "stream",
            ProviderError::Config(_) => "config",
        }
    }

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
