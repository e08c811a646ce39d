//! Anthropic's Messages API, streamed: `POST {base_url}/messages` with `stream: true`, the key in
//! `x-api-key` and the `anthropic-version` header. The output cap always goes in `max_tokens`
//! (which the API requires anyway). System messages, wherever they stand, become the top-level
//! `system` string; the API wants the rest to alternate between `user` and `assistant`, so
//! neighbours of the same role are merged.
//!
//! Events (named by their data's `type`): `message_start` carries the input usage (the input
//! proper plus cache writes and reads, which are billed input too); `content_block_delta` with a
//! `text_delta` carries text (thinking, tool input, signatures and citations are dropped);
//! `message_delta` carries the `stop_reason` and cumulative usage (always the output, and in newer
//! API versions the input again, which then replaces the start's); `message_stop` is the only end
//! marker. `ping`, block starts and stops, and types this module does not know are skipped. An
//! `error` event ends the stream: `overloaded_error`, `api_error`, `rate_limit_error` and
//! `timeout_error` are retried, as their HTTP answers (529, 500, 429, 504) would be.
//!
//! Stop reasons: `max_tokens` and `model_context_window_exceeded` → cut off; `refusal` →
//! filtered; `end_turn`, `stop_sequence`, `tool_use`, `pause_turn` (and any newer one) → a
//! natural end.

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

/// The upstream request. A conversation that opens with `assistant`, or has nothing but system
/// messages, is sent as it is: the upstream's 400 names the problem better than a guess would.
fn request_body(model: &ModelConfig, request: &CallRequest) -> Value {
    let mut system: Vec<&str> = Vec::new();
    let mut messages: Vec<(&str, String)> = Vec::new();
    let all = request.as_messages();
    for message in &all {
        match message.role.as_str() {
            "system" => system.push(&message.content),
            role => {
                // Only `user` and `assistant` exist upstream; anything else is the caller's words.
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

/// The input usage fields; their sum is what the request was billed as input.
const INPUT_FIELDS: [&str; 3] = [
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
];

/// The Messages API wire format.
#[derive(Debug, Default)]
struct AnthropicDecoder {
    /// The latest reported value of each of [`INPUT_FIELDS`], kept apart because a
    /// `message_delta` may repeat only some of them.
    input: [u32; 3],
    /// The `stop_reason` of `message_delta`.
    stop: Option<StopReason>,
}

impl AnthropicDecoder {
    /// Takes the input counts `usage` reports; an absent or null field keeps the earlier value
    /// (a `message_delta` from an older API version reports only the output).
    fn update_input(&mut self, usage: &Value) {
        for (slot, field) in self.input.iter_mut().zip(INPUT_FIELDS) {
            if usage.get(field).is_some_and(|v| !v.is_null()) {
                *slot = http::count(usage, field);
            }
        }
    }

    fn usage(&self, usage: &Value) -> Chunk {
        Chunk::Usage(crate::provider::Usage {
            input_tokens: self
                .input
                .iter()
                .fold(0u32, |sum, n| sum.saturating_add(*n)),
            output_tokens: http::count(usage, "output_tokens"),
            reasoning_tokens: 0,
        })
    }
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
                self.update_input(usage);
                Ok(vec![self.usage(usage)])
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
                        // Both cut the answer short: the cap, or the context window before it.
                        "max_tokens" | "model_context_window_exceeded" => {
                            StopReason::MaxOutputTokens
                        }
                        "refusal" => StopReason::ContentFilter,
                        _ => StopReason::Completed,
                    });
                }
                Ok(match value.get("usage").filter(|u| u.is_object()) {
                    Some(usage) => {
                        self.update_input(usage);
                        vec![self.usage(usage)]
                    }
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
                    Some("timeout_error") => 504,
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
            Ok(Chunk::Usage(crate::provider::Usage {
                input_tokens,
                output_tokens,
                ..
            })) => Some((*input_tokens, *output_tokens)),
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
            Some(Err(
                e @ ProviderError::Status {
                    status: 529, body, ..
                },
            )) => {
                assert_eq!(body, "Overloaded");
                assert!(e.is_retryable());
            }
            other => panic!("{other:?}"),
        }
        assert!(!chunks.iter().any(|c| matches!(c, Ok(Chunk::End(_)))));
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
    fn input_usage_sums_cache_fields_and_a_later_report_replaces_it() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,",
            "\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},",
            "\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},",
            "\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":null,\"output_tokens\":9}}\n\n",
        );
        let usages: Vec<(u32, u32)> = decode_all(stream)
            .iter()
            .filter_map(|c| match c {
                Ok(Chunk::Usage(crate::provider::Usage {
                    input_tokens,
                    output_tokens,
                    ..
                })) => Some((*input_tokens, *output_tokens)),
                _ => None,
            })
            .collect();
        // The second delta's input replaces the start's; its null cache read keeps the old one.
        assert_eq!(usages, vec![(115, 1), (115, 7), (117, 9)]);
    }

    #[test]
    fn other_events_and_deltas_are_skipped() {
        let stream = concat!(
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,",
            "\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,",
            "\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,",
            "\"delta\":{\"type\":\"signature_delta\",\"signature\":\"abc\"}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,",
            "\"delta\":{\"type\":\"text_delta\",\"text\":\"\"}}\n\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: some_future_event\ndata: {\"type\":\"some_future_event\"}\n\n",
        );
        assert!(decode_all(stream).is_empty());
        // Without a `type` in the data, the event's name still says what it is.
        let chunks = decode_all("event: message_stop\ndata: {}\n\n");
        assert!(matches!(
            chunks.as_slice(),
            [Ok(Chunk::End(StopReason::Completed))]
        ));
    }

    #[test]
    fn a_full_context_window_is_cut_off() {
        let stream = "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"model_context_window_exceeded\"},\"usage\":{\"output_tokens\":3}}\n\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(matches!(
            decode_all(stream).last(),
            Some(Ok(Chunk::End(StopReason::MaxOutputTokens)))
        ));
    }

    #[test]
    fn error_events_keep_their_http_status() {
        for (kind, status) in [
            ("overloaded_error", 529),
            ("api_error", 500),
            ("rate_limit_error", 429),
            ("timeout_error", 504),
        ] {
            let stream = format!(
                "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":\"m\"}}}}\n\n"
            );
            match decode_all(&stream).as_slice() {
                [Err(
                    e @ ProviderError::Status {
                        status: s, body, ..
                    },
                )] => {
                    assert_eq!((*s, body.as_str()), (status, "m"));
                    assert!(e.is_retryable());
                }
                other => panic!("{kind}: {other:?}"),
            }
        }
        assert!(decode_all("event: error\ndata: {not json\n\n")[0].is_err());
    }

    #[test]
    fn odd_conversations_do_not_panic() {
        let mut request = CallRequest {
            messages: vec![
                ChatMessage::new("assistant", "x"),
                ChatMessage::new("system", "s"),
                ChatMessage::new("assistant", "y"),
            ],
            max_output_tokens: 1,
            temperature: None,
            top_p: Some(0.9),
        };
        let model = ModelConfig::mock("claude");
        let body = request_body(&model, &request);
        assert_eq!(
            body["messages"],
            json!([{"role": "assistant", "content": "x\n\ny"}])
        );
        assert_eq!(body["top_p"], 0.9);
        assert!(body.get("temperature").is_none());
        request.messages = vec![ChatMessage::new("system", "only")];
        let body = request_body(&model, &request);
        assert_eq!(body["messages"], json!([]));
        assert_eq!(body["system"], "only");
        assert_eq!(body["max_tokens"], 1);
        request.messages.clear();
        assert!(request_body(&model, &request).get("system").is_none());
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
                ChatMessage::new("system", "Be exact."),
                ChatMessage::new("user", "e"),
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
        assert_eq!(body["system"], "Be brief.\n\nBe kind.\n\nBe exact.");
        assert_eq!(body["temperature"], 0.5);
        assert!(body.get("top_p").is_none());
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "a\n\nb"},
                {"role": "assistant", "content": "c"},
                // A system message between two user turns does not keep them apart.
                {"role": "user", "content": "d\n\ne"},
            ])
        );
    }
}
