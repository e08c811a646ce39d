//! Anthropic's Messages API, streamed: `POST {base_url}/messages` with `stream: true`, the key in
//! `x-api-key` and the `anthropic-version` header. The output cap always goes in `max_tokens`
//! (which the API requires anyway). System messages, wherever they stand, become the top-level
//! `system` string; the API wants the rest to alternate between `user` and `assistant`, so
//! neighbours of the same role are merged.
//!
//! Events (named by their data's `type`): `message_start` carries the input usage;
//! `content_block_delta` with a `text_delta` carries text; `message_delta` carries the
//! `stop_reason` and the cumulative output usage; `message_stop` is the only end marker. `ping`,
//! block starts and stops, and types this module does not know are skipped. An `error` event
//! ends the stream: `overloaded_error`, `api_error` and `rate_limit_error` are retried.
//!
//! Stop reasons: `max_tokens` → cut off at the cap; `refusal` → filtered; `end_turn`,
//! `stop_sequence`, `tool_use`, `pause_turn` → a natural end.

use serde_json::{json, Value};

use super::{
    http::{self, Decoder, KeyHeader},
    sse::SseEvent,
    CallRequest, Chunk, ChunkStream, ProviderError, StopReason,
};
use crate::config::ModelConfig;

pub async fn stream(
    client: &reqwest::Client,
    model: &ModelConfig,
    request: &CallRequest,
) -> Result<ChunkStream, ProviderError> {
    let body = request_body(model, request);
    let response = http::post_stream(
        client,
        model,
        "/messages",
        &body,
        KeyHeader::Named("x-api-key"),
        &[("anthropic-version", &model.anthropic_version)],
    )
    .await?;
    Ok(http::decode_stream(response, AnthropicDecoder::default()))
}

/// The upstream request.
fn request_body(model: &ModelConfig, request: &CallRequest) -> Value {
    let mut system: Vec<&str> = Vec::new();
    let mut messages: Vec<(&str, String)> = Vec::new();
    for message in &request.messages {
        match message.role.as_str() {
            "system" => system.push(&message.content),
            role => {
                let role = if role == "assistant" {
                    "assistant"
                } else {
                    "user"
                };
                match messages.last_mut() {
                    Some((last, text)) if *last == role => {
                        text.push_str("\n\n");
                        text.push_str(&message.content);
                    }
                    _ => messages.push((role, message.content.clone())),
                }
            }
        }
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let mut body = json!({
        "model": model.upstream_model(),
        "max_tokens": request.max_output_tokens,
        "messages": messages,
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    // Anthropic's range is 0–1; admission refuses more for this provider.
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = request.top_p {
        body["top_p"] = json!(p);
    }
    body
}

/// The Messages API wire format.
#[derive(Debug, Default)]
struct AnthropicDecoder {
    /// Input tokens, as `message_start` reported them (with cache reads and writes).
    input_tokens: u32,
    /// The `stop_reason` of `message_delta`.
    stop: Option<StopReason>,
}

impl Decoder for AnthropicDecoder {
    fn decode(&mut self, event: SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        let value = http::json(&event)?;
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or("");
        match kind {
            "message_start" => {
                let usage = value.pointer("/message/usage").unwrap_or(&Value::Null);
                self.input_tokens = http::count(usage, "input_tokens")
                    .saturating_add(http::count(usage, "cache_creation_input_tokens"))
                    .saturating_add(http::count(usage, "cache_read_input_tokens"));
                Ok(vec![Chunk::Usage {
                    input_tokens: self.input_tokens,
                    output_tokens: http::count(usage, "output_tokens"),
                }])
            }
            "content_block_delta" => {
                let delta = value.get("delta").unwrap_or(&Value::Null);
                if delta.get("type").and_then(Value::as_str) != Some("text_delta") {
                    return Ok(Vec::new());
                }
                Ok(delta
                    .get("text")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                    .map(|t| vec![Chunk::Delta(t.to_string())])
                    .unwrap_or_default())
            }
            "message_delta" => {
                if let Some(reason) = value.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop = Some(match reason {
                        "max_tokens" => StopReason::MaxOutputTokens,
                        "refusal" => StopReason::ContentFilter,
                        _ => StopReason::Completed,
                    });
                }
                Ok(match value.get("usage").filter(|u| u.is_object()) {
                    Some(usage) => vec![Chunk::Usage {
                        input_tokens: self.input_tokens,
                        output_tokens: http::count(usage, "output_tokens"),
                    }],
                    None => Vec::new(),
                })
            }
            "message_stop" => Ok(vec![Chunk::End(self.stop.unwrap_or(StopReason::Completed))]),
            "error" => {
                let error = value.get("error").unwrap_or(&Value::Null);
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("the upstream reported an error")
                    .to_string();
                // The status these errors have when they come as an HTTP answer, so that the
                // worker retries them the same way.
                let status = match error.get("type").and_then(Value::as_str) {
                    Some("overloaded_error") => 529,
                    Some("api_error") => 500,
                    Some("rate_limit_error") => 429,
                    _ => return Err(ProviderError::Upstream(message)),
                };
                Err(ProviderError::Status {
                    status,
                    body: message,
                    retry_after: None,
                })
            }
            _ => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{
        http::testing::{self, text},
        ChatMessage,
    };

    fn decode_all(text: &str) -> Vec<Result<Chunk, ProviderError>> {
        testing::decode_all(AnthropicDecoder::default(), text)
    }

    fn last_usage(chunks: &[Result<Chunk, ProviderError>]) -> Option<(u32, u32)> {
        chunks.iter().rev().find_map(|c| match c {
            Ok(Chunk::Usage {
                input_tokens,
                output_tokens,
            }) => Some((*input_tokens, *output_tokens)),
            _ => None,
        })
    }

    #[test]
    fn a_whole_answer_gives_its_text_usage_and_end() {
        let chunks = decode_all(include_str!("../../tests/fixtures/anthropic/basic.sse"));
        assert_eq!(text(&chunks), "Hello! How can I help you today?");
        assert_eq!(last_usage(&chunks), Some((25, 12)));
        assert!(matches!(
            chunks.last(),
            Some(Ok(Chunk::End(StopReason::Completed)))
        ));
    }

    #[test]
    fn a_max_tokens_stop_is_cut_off() {
        let chunks = decode_all(include_str!(
            "../../tests/fixtures/anthropic/max_tokens.sse"
        ));
        assert!(!text(&chunks).is_empty());
        assert!(matches!(
            chunks.last(),
            Some(Ok(Chunk::End(StopReason::MaxOutputTokens)))
        ));
        let refusal = "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"refusal\"},\"usage\":{\"output_tokens\":3}}\n\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(matches!(
            decode_all(refusal).last(),
            Some(Ok(Chunk::End(StopReason::ContentFilter)))
        ));
    }

    #[test]
    fn an_overload_mid_stream_is_a_retryable_error() {
        let chunks = decode_all(include_str!(
            "../../tests/fixtures/anthropic/overloaded.sse"
        ));
        assert!(!text(&chunks).is_empty());
        match chunks.last() {
            Some(Err(e)) => assert!(e.is_retryable(), "{e}"),
            other => panic!("{other:?}"),
        }
        let bad = "data: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"no\"}}\n\n";
        assert!(matches!(
            decode_all(bad).last(),
            Some(Err(ProviderError::Upstream(m))) if m == "no"
        ));
    }

    #[test]
    fn a_truncated_stream_has_no_end() {
        let chunks = decode_all(include_str!("../../tests/fixtures/anthropic/truncated.sse"));
        assert_eq!(text(&chunks), "The answer is");
        // The input usage arrived at the start; no end marker did.
        assert_eq!(last_usage(&chunks), Some((31, 1)));
        assert!(!chunks.iter().any(|c| matches!(c, Ok(Chunk::End(_)))));
    }

    #[test]
    fn system_messages_go_to_system_and_roles_alternate() {
        let request = CallRequest {
            messages: vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "a"),
                ChatMessage::new("user", "b"),
                ChatMessage::new("assistant", "c"),
                ChatMessage::new("system", "Be kind."),
                ChatMessage::new("user", "d"),
            ],
            max_output_tokens: 55,
            temperature: Some(0.5),
            top_p: None,
        };
        let mut model = ModelConfig::mock("claude");
        model.upstream_model = Some("claude-sonnet-4-5".into());
        let body = request_body(&model, &request);
        assert_eq!(body["model"], "claude-sonnet-4-5");
        assert_eq!(body["max_tokens"], 55);
        assert_eq!(body["stream"], true);
        assert_eq!(body["system"], "Be brief.\n\nBe kind.");
        assert_eq!(body["temperature"], 0.5);
        assert!(body.get("top_p").is_none());
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "a\n\nb"},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ])
        );
    }
}
