//! The HTTP side that every network provider shares: the request (URL, key, extra headers and
//! query parameters from the model's configuration), the reading of an error answer (bounded, with
//! its `Retry-After`), and the decoding of the event stream into [`Chunk`]s, which stops at the
//! provider's end marker or its first error.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use super::{
    sse::{SseEvent, SseParser},
    Chunk, ChunkStream, ProviderError,
};
use crate::config::ModelConfig;

/// The most of an upstream's error answer that is read; the rest is never received.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// How the model's API key is sent when the model names no `api_key_header`.
#[derive(Debug, Clone, Copy)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI and compatible APIs).
    Bearer,
    /// The key as it is, in this header (`x-api-key` for Anthropic).
    Named(&'static str),
}

/// POSTs `body` to `{base_url}{path}` asking for an event stream, and returns the answer once it
/// is a success. No request timeout is set here: the worker enforces the model's deadlines itself,
/// so that each ends the job the way it should.
pub async fn post_stream(
    http: &reqwest::Client,
    model: &ModelConfig,
    path: &str,
    body: &Value,
    key_header: KeyHeader,
    headers: &[(&str, &str)],
) -> Result<reqwest::Response, ProviderError> {
    let base = model
        .base_url
        .as_deref()
        .ok_or_else(|| ProviderError::Config(format!("model {} has no base_url", model.name)))?;
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut call = http
        .post(&url)
        .header("accept", "text/event-stream")
        .json(body);
    if !model.extra_query.is_empty() {
        call = call.query(&model.extra_query);
    }
    for (name, value) in headers {
        call = call.header(*name, *value);
    }
    for (name, value) in &model.extra_headers {
        call = call.header(name, value);
    }
    if let Some(var) = &model.api_key_env {
        let key = std::env::var(var).map_err(|_| {
            ProviderError::Config(format!("environment variable {var} (API key) is not set"))
        })?;
        call = match (&model.api_key_header, key_header) {
            (Some(name), _) => call.header(name, key),
            (None, KeyHeader::Named(name)) => call.header(name, key),
            (None, KeyHeader::Bearer) => call.bearer_auth(key),
        };
    }
    let response = call.send().await.map_err(transport_error)?;
    let status = response.status();
    if !status.is_success() {
        let retry_after = retry_after(response.headers());
        let body = read_bounded(response, MAX_ERROR_BODY_BYTES).await;
        return Err(ProviderError::Status {
            status: status.as_u16(),
            body: body.chars().take(2000).collect(),
            retry_after,
        });
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("application/json") {
        // A server that ignored `stream: true`, or answered an error with 200.
        let body = read_bounded(response, MAX_ERROR_BODY_BYTES).await;
        return Err(ProviderError::Protocol(format!(
            "expected an event stream, got JSON: {}",
            body.chars().take(500).collect::<String>()
        )));
    }
    Ok(response)
}

pub fn transport_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout
    } else {
        ProviderError::Transport(e.to_string())
    }
}

/// Reads at most `limit` bytes of a body (lossy UTF-8); the rest is left unread.
async fn read_bounded(response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    let mut bytes = response.bytes_stream();
    while let Some(Ok(chunk)) = bytes.next().await {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// The wait an upstream asks for: `retry-after-ms` (OpenAI), else `Retry-After` in seconds or
/// as an HTTP date. At most a day: a larger value is a broken header, not a plan.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let wait = if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::try_from_secs_f64(ms / 1000.0).ok()?
    } else {
        let value = text("retry-after")?;
        match value.parse::<f64>() {
            Ok(secs) => Duration::try_from_secs_f64(secs).ok()?,
            Err(_) => {
                let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
                (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
            }
        }
    };
    Some(wait.min(Duration::from_secs(86_400)))
}

/// A provider's wire format: the chunks that one event of its stream carries.
pub trait Decoder: Send + 'static {
    /// Decodes one event. An `Err` ends the stream with that error; a [`Chunk::End`] ends it
    /// cleanly (nothing after the end marker is read).
    fn decode(&mut self, event: SseEvent) -> Result<Vec<Chunk>, ProviderError>;
}

/// The answer's event stream, decoded by `decoder`, ending after the end marker or the first
/// error. A stream that stops before either simply ends: the worker sees no [`Chunk::End`].
pub fn decode_stream(response: reqwest::Response, mut decoder: impl Decoder) -> ChunkStream {
    let mut parser = SseParser::default();
    let mut finished = false;
    let chunks = response
        .bytes_stream()
        .map(move |bytes| -> Vec<Result<Chunk, ProviderError>> {
            if finished {
                return Vec::new();
            }
            let events = match bytes.map_err(transport_error).and_then(|bytes| {
                parser
                    .push(&bytes)
                    .map_err(|e| ProviderError::Oversized(e.to_string()))
            }) {
                Ok(events) => events,
                Err(e) => {
                    finished = true;
                    return vec![Err(e)];
                }
            };
            let mut out = Vec::new();
            for event in events {
                match decoder.decode(event) {
                    Ok(chunks) => {
                        for chunk in chunks {
                            finished |= matches!(chunk, Chunk::End(_));
                            out.push(Ok(chunk));
                            if finished {
                                return out;
                            }
                        }
                    }
                    Err(e) => {
                        finished = true;
                        out.push(Err(e));
                        return out;
                    }
                }
            }
            out
        })
        .flat_map(futures::stream::iter);
    Box::pin(chunks)
}

/// Parses an event's data as JSON, or names the event that is not.
pub fn json(event: &SseEvent) -> Result<Value, ProviderError> {
    serde_json::from_str(&event.data).map_err(|e| {
        ProviderError::Protocol(format!(
            "event is not JSON ({e}): {:.200}",
            event.data.as_str()
        ))
    })
}

/// Sets `field` of a request body when the request has a value for it.
pub fn put(body: &mut Value, field: &str, value: Option<impl serde::Serialize>) {
    if let Some(value) = value {
        body[field] = serde_json::json!(value);
    }
}

/// The fields both OpenAI APIs (chat completions and Responses) name alike: the end user,
/// the prompt cache key and the service tier.
pub fn put_openai_shared(body: &mut Value, request: &super::CallRequest) {
    put(body, "user", request.end_user.as_ref());
    put(body, "prompt_cache_key", request.prompt_cache_key.as_ref());
    put(body, "service_tier", request.service_tier.as_ref());
}

/// A string field of an event (empty when absent).
pub fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// A count in a usage object (0 when absent).
pub fn count(usage: &Value, field: &str) -> u32 {
    usage
        .get(field)
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(u32::MAX as u64) as u32
}

/// What the providers' unit tests share: a recorded stream decoded the way the worker reads it.
#[cfg(test)]
pub mod testing {
    use super::*;
    use crate::provider::{FunctionTool, Role, Turn};

    /// Decodes every event of `text` with `decoder`, errors included, as the stream would yield
    /// them (without stopping at the first end marker or error, so a test sees everything).
    pub fn decode_all(mut decoder: impl Decoder, text: &str) -> Vec<Result<Chunk, ProviderError>> {
        let mut out = Vec::new();
        for event in SseParser::default().push(text.as_bytes()).unwrap() {
            match decoder.decode(event) {
                Ok(chunks) => out.extend(chunks.into_iter().map(Ok)),
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    /// The arguments text of decoded chunks.
    pub fn arguments(chunks: &[Chunk]) -> String {
        chunks
            .iter()
            .filter_map(|c| match c {
                Chunk::Arguments(a) => Some(a.as_str()),
                _ => None,
            })
            .collect()
    }

    pub fn say(role: Role, text: &str) -> Turn {
        Turn::Message {
            role,
            text: text.into(),
        }
    }

    /// The function the providers' tests offer.
    pub fn weather_tool() -> FunctionTool {
        FunctionTool {
            name: "get_weather".into(),
            description: Some("Weather now".into()),
            parameters: Some(serde_json::json!({"type": "object"})),
            strict: Some(true),
        }
    }

    /// A conversation with a function call and its output, as the providers' tests send it.
    pub fn weather_conversation() -> Vec<Turn> {
        vec![
            say(Role::User, "weather?"),
            say(Role::Assistant, "Checking."),
            Turn::FunctionCall {
                call_id: "call_1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into(),
            },
            Turn::FunctionOutput {
                call_id: "call_1".into(),
                output: "18 C".into(),
            },
            say(Role::User, "thanks"),
        ]
    }

    /// The answer text of decoded chunks.
    pub fn text(chunks: &[Result<Chunk, ProviderError>]) -> String {
        chunks
            .iter()
            .filter_map(|c| match c {
                Ok(Chunk::Delta(d)) => Some(d.as_str()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_its_three_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = reqwest::header::HeaderMap::new();
        let at = chrono::Utc::now() + chrono::Duration::seconds(30);
        h.insert("retry-after", at.to_rfc2822().parse().unwrap());
        let wait = retry_after(&h).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "99999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(86_400)));
    }
}
