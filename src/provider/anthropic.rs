//! Anthropic's Messages API, streamed: `POST {base_url}/messages` with `stream: true`, the key in
//! `x-api-key` and the `anthropic-version` header. The output cap always goes in `max_tokens`
//! (which the API requires anyway). System messages, wherever they stand, become the top-level
//! `system` string; the API wants the rest to alternate between `user` and `assistant`, so
//! neighbours of the same role are merged (text with a blank line between). Function calls are
//! the assistant's `tool_use` blocks (their arguments parsed: Anthropic takes an object, which
//! admission made sure of), their outputs the user's `tool_result` blocks. Function tools become
//! `tools` with `input_schema`; `tool_choice` `required` is `any`, a named function `tool`;
//! `parallel_tool_calls: false` is `disable_parallel_tool_use`; the end user is
//! `metadata.user_id`. What Anthropic cannot take (output formats, reasoning effort, prompt cache
//! keys) admission refuses for this provider (`CreateResponse::check_for`).
//!
//! Events (named by their data's `type`): `message_start` carries the input usage (the input
//! proper plus cache writes and reads, which are billed input too); `content_block_delta` with a
//! `text_delta` carries text (thinking, signatures and citations are not output);
//! `content_block_start` of a `tool_use` block starts a function call, whose `input_json_delta`s
//! are its arguments (a call with no input streams none: its arguments are `{}`);
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
    CallRequest, Chunk, ChunkStream, ProviderError, Role, StopReason, ToolChoice, Turn, Usage,
};
use crate::config::ModelConfig;

pub async fn stream(
    client: &reqwest::Client,
    model: &ModelConfig,
    request: &CallRequest,
) -> Result<ChunkStream, ProviderError> {
    let body = request_body(model, request)?;
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
fn request_body(model: &ModelConfig, request: &CallRequest) -> Result<Value, ProviderError> {
    let mut system: Vec<&str> = Vec::new();
    // Each message: its role and its content blocks.
    let mut messages: Vec<(&str, Vec<Value>)> = Vec::new();
    for turn in &request.turns {
        let (role, block) = match turn {
            Turn::Message {
                role: Role::System,
                text,
            } => {
                system.push(text);
                continue;
            }
            Turn::Message {
                role: Role::Assistant,
                text,
            } => ("assistant", json!({"type": "text", "text": text})),
            Turn::Message { text, .. } => ("user", json!({"type": "text", "text": text})),
            Turn::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                let input: Value = serde_json::from_str(arguments)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| {
                        ProviderError::Config(format!(
                            "the arguments of function call {call_id} are not a JSON object"
                        ))
                    })?;
                (
                    "assistant",
                    json!({"type": "tool_use", "id": call_id, "name": name, "input": input}),
                )
            }
            Turn::FunctionOutput { call_id, output } => (
                "user",
                json!({"type": "tool_result", "tool_use_id": call_id, "content": output}),
            ),
        };
        match messages.last_mut() {
            Some((last, blocks)) if *last == role => {
                // Text after text reads as one text, as before blocks existed.
                match (blocks.last_mut(), block.get("text").and_then(Value::as_str)) {
                    (Some(previous), Some(text)) if previous["type"] == "text" => {
                        let joined =
                            format!("{}\n\n{text}", previous["text"].as_str().unwrap_or(""));
                        previous["text"] = json!(joined);
                    }
                    _ => blocks.push(block),
                }
            }
            _ => messages.push((role, vec![block])),
        }
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, blocks)| {
            // A lone text block is sent as plain content.
            let content = match blocks.as_slice() {
                [only] if only["type"] == "text" => only["text"].clone(),
                _ => json!(blocks),
            };
            json!({"role": role, "content": content})
        })
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
    http::put(&mut body, "temperature", request.temperature);
    http::put(&mut body, "top_p", request.top_p);
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                let mut value = json!({
                    "name": tool.name,
                    "input_schema": tool.parameters.clone()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                });
                if let Some(d) = &tool.description {
                    value["description"] = json!(d);
                }
                value
            })
            .collect();
        body["tools"] = json!(tools);
        let mut choice = match &request.tool_choice {
            None | Some(ToolChoice::Auto) => json!({"type": "auto"}),
            Some(ToolChoice::None) => json!({"type": "none"}),
            Some(ToolChoice::Required) => json!({"type": "any"}),
            Some(ToolChoice::Function(name)) => json!({"type": "tool", "name": name}),
        };
        if request.parallel_tool_calls == Some(false) && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        if request.tool_choice.is_some() || request.parallel_tool_calls == Some(false) {
            body["tool_choice"] = choice;
        }
    }
    if let Some(user) = &request.end_user {
        body["metadata"] = json!({"user_id": user});
    }
    debug_assert!(
        request.format.is_none()
            && request.reasoning_effort.is_none()
            && request.prompt_cache_key.is_none(),
        "admission refuses these for Anthropic models"
    );
    Ok(body)
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
    /// The `tool_use` block streaming now: its index, and whether it streamed any arguments.
    tool_block: Option<(u64, bool)>,
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
        Chunk::Usage(Usage {
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
            "content_block_start" => {
                let block = value.get("content_block").unwrap_or(&Value::Null);
                if block.get("type").and_then(Value::as_str) != Some("tool_use") {
                    return Ok(Vec::new());
                }
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                self.tool_block = Some((index, false));
                Ok(vec![Chunk::ToolCall {
                    call_id: http::str_field(block, "id").to_string(),
                    name: http::str_field(block, "name").to_string(),
                }])
            }
            "content_block_delta" => {
                let delta = value.get("delta").unwrap_or(&Value::Null);
                let (field, text) = match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => ("text", true),
                    Some("input_json_delta") => ("partial_json", false),
                    _ => return Ok(Vec::new()),
                };
                let Some(piece) = delta
                    .get(field)
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                else {
                    return Ok(Vec::new());
                };
                if text {
                    return Ok(vec![Chunk::Delta(piece.to_string())]);
                }
                if let Some((_, streamed)) = &mut self.tool_block {
                    *streamed = true;
                }
                Ok(vec![Chunk::Arguments(piece.to_string())])
            }
            "content_block_stop" => {
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                match self.tool_block {
                    Some((open, streamed)) if open == index => {
                        self.tool_block = None;
                        // A call without input streams no arguments; its arguments are `{}`.
                        Ok(if streamed {
                            Vec::new()
                        } else {
                            vec![Chunk::Arguments("{}".into())]
                        })
                    }
                    _ => Ok(Vec::new()),
                }
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
    use crate::provider::http::testing::{
        self, arguments, say, text, weather_conversation, weather_tool,
    };
    use crate::provider::FunctionTool;

    fn decode_all(text: &str) -> Vec<Result<Chunk, ProviderError>> {
        testing::decode_all(AnthropicDecoder::default(), text)
    }

    fn last_usage(chunks: &[Result<Chunk, ProviderError>]) -> Option<(u32, u32)> {
        chunks.iter().rev().find_map(|c| match c {
            Ok(Chunk::Usage(Usage {
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
                Ok(Chunk::Usage(Usage {
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
            top_p: Some(0.9),
            ..CallRequest::plain(
                vec![
                    say(Role::Assistant, "x"),
                    say(Role::System, "s"),
                    say(Role::Assistant, "y"),
                ],
                1,
            )
        };
        let model = ModelConfig::mock("claude");
        let body = request_body(&model, &request).unwrap();
        assert_eq!(
            body["messages"],
            json!([{"role": "assistant", "content": "x\n\ny"}])
        );
        assert_eq!(body["top_p"], 0.9);
        assert!(body.get("temperature").is_none());
        request.turns = vec![say(Role::System, "only")];
        let body = request_body(&model, &request).unwrap();
        assert_eq!(body["messages"], json!([]));
        assert_eq!(body["system"], "only");
        assert_eq!(body["max_tokens"], 1);
        request.turns.clear();
        assert!(request_body(&model, &request)
            .unwrap()
            .get("system")
            .is_none());
    }

    #[test]
    fn system_messages_go_to_system_and_roles_alternate() {
        let request = CallRequest {
            temperature: Some(0.5),
            ..CallRequest::plain(
                vec![
                    say(Role::System, "Be brief."),
                    say(Role::User, "a"),
                    say(Role::User, "b"),
                    say(Role::Assistant, "c"),
                    say(Role::System, "Be kind."),
                    say(Role::User, "d"),
                    say(Role::System, "Be exact."),
                    say(Role::User, "e"),
                ],
                55,
            )
        };
        let mut model = ModelConfig::mock("claude");
        model.upstream_model = Some("claude-sonnet-4-5".into());
        let body = request_body(&model, &request).unwrap();
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

    #[test]
    fn tools_calls_and_results_become_blocks() {
        let request = CallRequest {
            tools: vec![FunctionTool {
                parameters: None,
                strict: None,
                ..weather_tool()
            }],
            tool_choice: Some(ToolChoice::Required),
            parallel_tool_calls: Some(false),
            end_user: Some("u-1".into()),
            ..CallRequest::plain(weather_conversation(), 100)
        };
        let body = request_body(&ModelConfig::mock("claude"), &request).unwrap();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather",
                     "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
                    {"type": "text", "text": "thanks"}]},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"name": "get_weather", "description": "Weather now",
                    "input_schema": {"type": "object", "properties": {}}}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(body["metadata"], json!({"user_id": "u-1"}));
        let broken = CallRequest::plain(
            vec![Turn::FunctionCall {
                call_id: "toolu_2".into(),
                name: "f".into(),
                arguments: "[1]".into(),
            }],
            1,
        );
        assert!(matches!(
            request_body(&ModelConfig::mock("claude"), &broken),
            Err(ProviderError::Config(_))
        ));
    }

    #[test]
    fn a_recorded_tool_use_stream_gives_text_then_the_call() {
        let chunks: Vec<Chunk> =
            decode_all(include_str!("../../tests/fixtures/anthropic/tool_use.sse"))
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let call = chunks
            .iter()
            .position(|c| {
                matches!(c, Chunk::ToolCall { call_id, name }
                if call_id.starts_with("toolu_") && name == "get_weather")
            })
            .expect("a tool call");
        assert!(matches!(&chunks[call - 1], Chunk::Delta(_)));
        assert_eq!(arguments(&chunks[call..]), "{\"city\": \"Paris\"}");
        assert_eq!(chunks.last(), Some(&Chunk::End(StopReason::Completed)));
        // A call without input has `{}` as its arguments.
        let empty = concat!(
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":",
            "{\"type\":\"tool_use\",\"id\":\"toolu_9\",\"name\":\"now\",\"input\":{}}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        let chunks: Vec<Chunk> = decode_all(empty).into_iter().map(Result::unwrap).collect();
        assert_eq!(chunks[1], Chunk::Arguments("{}".into()));
    }
}
