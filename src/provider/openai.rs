//! OpenAI-compatible chat completions, streamed: `POST {base_url}/chat/completions` with
//! `stream: true` and `stream_options.include_usage`, so the last chunk carries the usage.

use futures::StreamExt;
use serde_json::{json, Value};

use super::{sse::SseParser, CallRequest, Chunk, ChunkStream, ProviderError};
use crate::config::ModelConfig;

pub async fn stream(
    http: &reqwest::Client,
    model: &ModelConfig,
    request: &CallRequest,
) -> Result<ChunkStream, ProviderError> {
    let base = model
        .base_url
        .as_deref()
        .ok_or_else(|| ProviderError::Config(format!("model {} has no base_url", model.name)))?;
    let url = format!("{}/chat/completions", base.trim_end_matches('/'));
    let mut body = json!({
        "model": model.upstream_model(),
        "messages": request.messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(max) = request.max_output_tokens {
        body["max_tokens"] = json!(max);
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = request.top_p {
        body["top_p"] = json!(p);
    }
    // No request timeout here: the worker enforces the model's total and first-token deadlines
    // itself, so that each ends the job the way it should (a total timeout is final, a slow first
    // token is retried).
    let mut call = http.post(&url).json(&body);
    if let Some(var) = &model.api_key_env {
        let key = std::env::var(var).map_err(|_| {
            ProviderError::Config(format!("environment variable {var} (API key) is not set"))
        })?;
        call = call.bearer_auth(key);
    }
    let response = call.send().await.map_err(transport_error)?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(ProviderError::Status {
            status: status.as_u16(),
            body: body.chars().take(2000).collect(),
        });
    }

    let mut parser = SseParser::default();
    let mut finished = false;
    let chunks = response
        .bytes_stream()
        .map(move |bytes| -> Vec<Result<Chunk, ProviderError>> {
            if finished {
                return Vec::new();
            }
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => return vec![Err(transport_error(e))],
            };
            let mut out = Vec::new();
            for data in parser.push(&bytes) {
                if data.trim() == "[DONE]" {
                    finished = true;
                    break;
                }
                match parse_chunk(&data) {
                    Ok(mut parsed) => out.append(&mut parsed),
                    Err(e) => {
                        out.push(Err(e));
                        finished = true;
                        break;
                    }
                }
            }
            out
        })
        .flat_map(futures::stream::iter);
    Ok(Box::pin(chunks))
}

fn transport_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout
    } else {
        ProviderError::Transport(e.to_string())
    }
}

/// The chunks carried by one `chat.completion.chunk` event.
fn parse_chunk(data: &str) -> Result<Vec<Result<Chunk, ProviderError>>, ProviderError> {
    let value: Value = serde_json::from_str(data)
        .map_err(|e| ProviderError::Protocol(format!("event is not JSON ({e}): {data:.200}")))?;
    if let Some(error) = value.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(ProviderError::Upstream(message.to_string()));
    }
    let mut out = Vec::new();
    let text = value
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str);
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        out.push(Ok(Chunk::Delta(text.to_string())));
    }
    if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
        let count = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0) as u32;
        out.push(Ok(Chunk::Usage {
            input_tokens: count("prompt_tokens"),
            output_tokens: count("completion_tokens"),
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_deltas_usage_and_errors() {
        let delta = r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}"#;
        assert_eq!(
            parse_chunk(delta).unwrap().pop().unwrap().unwrap(),
            Chunk::Delta("Hi".into())
        );
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
        assert_eq!(
            parse_chunk(usage).unwrap().pop().unwrap().unwrap(),
            Chunk::Usage {
                input_tokens: 7,
                output_tokens: 3
            }
        );
        assert!(parse_chunk(r#"{"error":{"message":"boom"}}"#).is_err());
        assert!(parse_chunk("not json").is_err());
    }
}
