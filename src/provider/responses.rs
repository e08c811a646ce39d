//! OpenAI's Responses API, streamed: `POST {base_url}/responses` with `stream: true` and
//! `store: false` (tollgate keeps the job itself; nothing needs to live upstream). The output cap
//! always goes in `max_output_tokens`. System messages become `instructions` (joined with a blank
//! line); the rest of the conversation becomes `input`: `message` items with string content,
//! `function_call` and `function_call_output` items. Tools, `tool_choice`,
//! `parallel_tool_calls`, `text.format`, `reasoning.effort`, `user`, `prompt_cache_key` and
//! `service_tier` are this API's own fields and pass through as they are.
//!
//! Every event names itself in its data's `type` (and in the SSE `event:` line).
//! `response.output_text.delta` carries answer text; `response.output_item.added` of a
//! `function_call` item starts a function call, and `response.function_call_arguments.delta`
//! carries its arguments. Lifecycle, content-part, reasoning and `.done` events (which repeat what
//! the deltas said) are skipped, and so are types this module does not know, since the API adds
//! them freely.
//!
//! The end markers are `response.completed` (a natural end) and `response.incomplete`, whose
//! `incomplete_details.reason` is `max_output_tokens` (cut off at the cap) or `content_filter`
//! (filtered); both carry the final `usage`. `response.failed` and the `error` event end the stream
//! with an error, retryable when its code is `server_error` or a rate limit.

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
    let body = request_body(model, request);
    let response =
        http::post_stream(client, model, "/responses", &body, KeyHeader::Bearer, &[]).await?;
    Ok(http::decode_stream(response, ResponsesDecoder))
}

/// The upstream request.
fn request_body(model: &ModelConfig, request: &CallRequest) -> Value {
    let mut instructions: Vec<&str> = Vec::new();
    let mut input: Vec<Value> = Vec::with_capacity(request.turns.len());
    for turn in &request.turns {
        match turn {
            Turn::Message {
                role: Role::System,
                text,
            } => instructions.push(text),
            Turn::Message { role, text } => {
                input.push(json!({"type": "message", "role": role.as_str(), "content": text}));
            }
            Turn::FunctionCall {
                call_id,
                name,
                arguments,
            } => input.push(
                json!({"type": "function_call", "call_id": call_id, "name": name,
                                   "arguments": arguments}),
            ),
            Turn::FunctionOutput { call_id, output } => input.push(
                json!({"type": "function_call_output", "call_id": call_id, "output": output}),
            ),
        }
    }
    let mut body = json!({
        "model": model.upstream_model(),
        "input": input,
        "stream": true,
        "store": false,
        "max_output_tokens": request.max_output_tokens,
    });
    if !instructions.is_empty() {
        body["instructions"] = json!(instructions.join("\n\n"));
    }
    http::put(&mut body, "temperature", request.temperature);
    http::put(&mut body, "top_p", request.top_p);
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                let mut definition = tool.openai_definition();
                definition["type"] = json!("function");
                definition
            })
            .collect();
        body["tools"] = json!(tools);
    }
    if let Some(choice) = &request.tool_choice {
        body["tool_choice"] = match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Function(name) => json!({"type": "function", "name": name}),
        };
    }
    http::put(
        &mut body,
        "parallel_tool_calls",
        request.parallel_tool_calls,
    );
    if let Some(format) = &request.format {
        body["text"] = json!({"format": format.openai_definition()});
    }
    if let Some(effort) = &request.reasoning_effort {
        body["reasoning"] = json!({"effort": effort});
    }
    http::put_openai_shared(&mut body, request);
    body
}

/// The Responses API wire format. It keeps no state: the terminal events carry both the usage and
/// the stop reason.
#[derive(Debug, Default)]
struct ResponsesDecoder;

impl Decoder for ResponsesDecoder {
    fn decode(&mut self, event: SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        // Not part of this API, but some compatible servers close with it. It is not an end
        // marker: without `response.completed` the answer may be cut off.
        if event.data.trim() == "[DONE]" {
            return Ok(Vec::new());
        }
        let value = http::json(&event)?;
        // The data's `type` is authoritative; the `event:` line repeats it.
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or("");
        match kind {
            "response.output_text.delta" | "response.function_call_arguments.delta" => {
                let delta = http::str_field(&value, "delta").to_string();
                Ok(match kind {
                    _ if delta.is_empty() => Vec::new(),
                    "response.output_text.delta" => vec![Chunk::Delta(delta)],
                    _ => vec![Chunk::Arguments(delta)],
                })
            }
            "response.output_item.added" => {
                let item = value.get("item").unwrap_or(&Value::Null);
                if item.get("type").and_then(Value::as_str) != Some("function_call") {
                    return Ok(Vec::new());
                }
                let mut out = vec![Chunk::ToolCall {
                    call_id: http::str_field(item, "call_id").to_string(),
                    name: http::str_field(item, "name").to_string(),
                }];
                let arguments = http::str_field(item, "arguments");
                if !arguments.is_empty() {
                    out.push(Chunk::Arguments(arguments.to_string()));
                }
                Ok(out)
            }
            "response.completed" => Ok(finish(&value, StopReason::Completed)),
            "response.incomplete" => {
                let reason = value
                    .pointer("/response/incomplete_details/reason")
                    .and_then(Value::as_str);
                let stop = match reason {
                    Some("content_filter") => StopReason::ContentFilter,
                    // `max_output_tokens`, or a reason newer than this module: either way the
                    // answer is cut off, and saying so is the safe reading.
                    _ => StopReason::MaxOutputTokens,
                };
                Ok(finish(&value, stop))
            }
            "response.failed" => {
                let error = value.pointer("/response/error").unwrap_or(&Value::Null);
                Err(upstream_error(error, "the upstream response failed"))
            }
            "error" => {
                // The documented shape has `code` and `message` at the top level, but OpenAI has
                // been seen to nest them under `error`, as its HTTP error bodies do.
                let error = value
                    .get("error")
                    .filter(|e| e.is_object())
                    .unwrap_or(&value);
                Err(upstream_error(error, "the upstream reported an error"))
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// The chunks of a terminal event: its usage, when reported, then the end marker.
fn finish(value: &Value, stop: StopReason) -> Vec<Chunk> {
    let mut out = Vec::new();
    if let Some(usage) = value.pointer("/response/usage").filter(|u| u.is_object()) {
        let details = usage.get("output_tokens_details").unwrap_or(&Value::Null);
        out.push(Chunk::Usage(Usage {
            input_tokens: http::count(usage, "input_tokens"),
            output_tokens: http::count(usage, "output_tokens"),
            reasoning_tokens: http::count(details, "reasoning_tokens"),
        }));
    }
    out.push(Chunk::End(stop));
    out
}

/// An error the upstream reported inside a stream. Its HTTP status was already 200, so the codes
/// that mean "try again" are mapped to the status they would have had, which the worker retries;
/// any other code is final.
fn upstream_error(error: &Value, fallback: &str) -> ProviderError {
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .unwrap_or(fallback)
        .to_string();
    let status = match error.get("code").and_then(Value::as_str) {
        Some("server_error") => 500,
        // `too_many_requests` is the code seen in `error` events for a 429.
        Some("rate_limit_exceeded" | "too_many_requests") => 429,
        _ => return ProviderError::Upstream(message),
    };
    ProviderError::Status {
        status,
        body: message,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{
        http::testing::{self, arguments, say, text, weather_conversation, weather_tool},
        OutputFormat,
    };

    fn decode_all(text: &str) -> Vec<Result<Chunk, ProviderError>> {
        testing::decode_all(ResponsesDecoder, text)
    }

    fn ok(chunks: Vec<Result<Chunk, ProviderError>>) -> Vec<Chunk> {
        chunks.into_iter().map(|c| c.unwrap()).collect()
    }

    #[test]
    fn a_completed_stream_gives_its_text_usage_and_end() {
        let chunks = decode_all(include_str!(
            "../../tests/fixtures/openai_responses/basic.sse"
        ));
        assert_eq!(text(&chunks), "Hi! How can I help you today?");
        let chunks = ok(chunks);
        // Only the text deltas and the terminal event yield chunks; the lifecycle and
        // `output_text.done` events (which repeat the whole text) yield none.
        assert_eq!(chunks.len(), 9 + 2);
        assert_eq!(
            chunks[chunks.len() - 2..],
            [
                Chunk::Usage(Usage {
                    input_tokens: 37,
                    output_tokens: 11,
                    reasoning_tokens: 0
                }),
                Chunk::End(StopReason::Completed)
            ]
        );
    }

    #[test]
    fn an_incomplete_stream_ends_with_its_reason() {
        let chunks = ok(decode_all(include_str!(
            "../../tests/fixtures/openai_responses/incomplete.sse"
        )));
        assert_eq!(
            chunks[chunks.len() - 2..],
            [
                Chunk::Usage(Usage {
                    input_tokens: 29,
                    output_tokens: 8,
                    reasoning_tokens: 0
                }),
                Chunk::End(StopReason::MaxOutputTokens)
            ]
        );
        let incomplete = |details: &str| {
            format!(
                "event: response.incomplete\ndata: {{\"type\":\"response.incomplete\",\
                 \"sequence_number\":9,\"response\":{{\"status\":\"incomplete\",\
                 \"incomplete_details\":{details},\"usage\":null}}}}\n\n"
            )
        };
        let end = |details: &str| ok(decode_all(&incomplete(details)));
        assert_eq!(
            end("{\"reason\":\"content_filter\"}"),
            [Chunk::End(StopReason::ContentFilter)]
        );
        assert_eq!(
            end("{\"reason\":\"something_new\"}"),
            [Chunk::End(StopReason::MaxOutputTokens)]
        );
        assert_eq!(end("null"), [Chunk::End(StopReason::MaxOutputTokens)]);
    }

    #[test]
    fn a_failed_response_is_an_error_retryable_by_its_code() {
        let chunks = decode_all(include_str!(
            "../../tests/fixtures/openai_responses/failed.sse"
        ));
        assert_eq!(text(&chunks), "Once upon a");
        let last = chunks.last().unwrap().as_ref().unwrap_err();
        assert!(
            matches!(last, ProviderError::Status { status: 500, body, .. }
                if body == "The model failed to generate a response."),
            "{last:?}"
        );
        assert!(last.is_retryable());
        assert!(!chunks.iter().any(|c| matches!(c, Ok(Chunk::End(_)))));

        let failed = |code: &str| {
            let data = json!({
                "type": "response.failed",
                "sequence_number": 3,
                "response": {"status": "failed", "error": {"code": code, "message": "nope"}},
            });
            let mut chunks = decode_all(&format!("event: response.failed\ndata: {data}\n\n"));
            chunks.pop().unwrap().unwrap_err()
        };
        assert!(matches!(
            failed("rate_limit_exceeded"),
            ProviderError::Status { status: 429, .. }
        ));
        let final_error = failed("invalid_prompt");
        assert!(matches!(&final_error, ProviderError::Upstream(m) if m == "nope"));
        assert!(!final_error.is_retryable());
    }

    #[test]
    fn error_events_in_both_shapes() {
        let documented = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\
                          \"message\":\"boom\",\"param\":null,\"sequence_number\":4}\n\n";
        assert!(matches!(
            &decode_all(documented)[..],
            [Err(ProviderError::Status { status: 500, body, .. })] if body == "boom"
        ));
        let nested = "event: error\ndata: {\"type\":\"error\",\"sequence_number\":2,\"error\":\
                      {\"type\":\"too_many_requests\",\"code\":\"too_many_requests\",\
                      \"message\":\"Too Many Requests\",\"param\":null}}\n\n";
        assert!(matches!(
            &decode_all(nested)[..],
            [Err(ProviderError::Status { status: 429, .. })]
        ));
        let invalid = "event: error\ndata: {\"type\":\"error\",\"code\":\"invalid_request_error\",\
                       \"message\":\"bad input\",\"param\":\"input\",\"sequence_number\":1}\n\n";
        assert!(matches!(
            &decode_all(invalid)[..],
            [Err(ProviderError::Upstream(m))] if m == "bad input"
        ));
        assert!(matches!(
            &decode_all("data: not json\n\n")[..],
            [Err(ProviderError::Protocol(_))]
        ));
    }

    #[test]
    fn a_truncated_stream_has_no_end() {
        let chunks = decode_all(include_str!(
            "../../tests/fixtures/openai_responses/truncated.sse"
        ));
        assert_eq!(text(&chunks), "Counting: one, two");
        assert!(chunks.iter().all(|c| matches!(c, Ok(Chunk::Delta(_)))));
        // `[DONE]` is not this API's end marker.
        assert!(decode_all("data: [DONE]\n\n").is_empty());
    }

    #[test]
    fn unknown_and_non_text_events_are_skipped() {
        let stream = "event: response.reasoning_summary_text.delta\ndata: {\"type\":\
                      \"response.reasoning_summary_text.delta\",\"sequence_number\":5,\
                      \"delta\":\"thinking\"}\n\n\
                      event: response.output_text.delta\ndata: {\"type\":\
                      \"response.output_text.delta\",\"sequence_number\":6,\"delta\":\"\"}\n\n\
                      event: response.brand_new\ndata: {\"type\":\"response.brand_new\",\
                      \"sequence_number\":7}\n\n";
        assert!(decode_all(stream).is_empty());
    }

    #[test]
    fn the_request_body() {
        let request = CallRequest {
            temperature: Some(0.5),
            ..CallRequest::plain(
                vec![
                    say(Role::System, "Be terse."),
                    say(Role::User, "hi"),
                    say(Role::System, "Answer in French."),
                    say(Role::Assistant, "salut"),
                    say(Role::User, "again"),
                ],
                321,
            )
        };
        let mut model = ModelConfig::mock("alias");
        model.upstream_model = Some("gpt-4.1-mini".into());
        let body = request_body(&model, &request);
        assert_eq!(
            body,
            json!({
                "model": "gpt-4.1-mini",
                "instructions": "Be terse.\n\nAnswer in French.",
                "input": [
                    {"type": "message", "role": "user", "content": "hi"},
                    {"type": "message", "role": "assistant", "content": "salut"},
                    {"type": "message", "role": "user", "content": "again"},
                ],
                "stream": true,
                "store": false,
                "max_output_tokens": 321,
                "temperature": 0.5,
            })
        );
        let request = CallRequest {
            top_p: Some(0.9),
            ..CallRequest::plain(vec![say(Role::User, "hi")], 16)
        };
        let body = request_body(&ModelConfig::mock("m"), &request);
        assert!(body.get("instructions").is_none());
        assert!(body.get("temperature").is_none());
        assert_eq!(
            (&body["max_output_tokens"], &body["top_p"]),
            (&json!(16), &json!(0.9))
        );
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn tools_calls_formats_and_reasoning_pass_through() {
        let request = CallRequest {
            tools: vec![weather_tool()],
            tool_choice: Some(ToolChoice::Function("get_weather".into())),
            parallel_tool_calls: Some(false),
            format: Some(OutputFormat::JsonObject),
            reasoning_effort: Some("low".into()),
            prompt_cache_key: Some("k".into()),
            ..CallRequest::plain(weather_conversation(), 100)
        };
        let body = request_body(&ModelConfig::mock("m"), &request);
        assert_eq!(
            body["input"],
            json!([
                {"type": "message", "role": "user", "content": "weather?"},
                {"type": "message", "role": "assistant", "content": "Checking."},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
                {"type": "message", "role": "user", "content": "thanks"},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"type": "function", "name": "get_weather", "description": "Weather now",
                    "parameters": {"type": "object"}, "strict": true}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "function", "name": "get_weather"})
        );
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(body["text"], json!({"format": {"type": "json_object"}}));
        assert_eq!(body["reasoning"], json!({"effort": "low"}));
        assert_eq!(body["prompt_cache_key"], "k");
    }

    #[test]
    fn a_recorded_function_call_stream_gives_the_call_and_reasoning_usage() {
        let chunks = ok(decode_all(include_str!(
            "../../tests/fixtures/openai_responses/function_call.sse"
        )));
        assert!(matches!(&chunks[0], Chunk::ToolCall { call_id, name }
            if call_id.starts_with("call_") && name == "get_weather"));
        assert_eq!(arguments(&chunks), "{\"city\":\"Paris\"}");
        assert_eq!(
            chunks[chunks.len() - 2..],
            [
                Chunk::Usage(Usage {
                    input_tokens: 75,
                    output_tokens: 146,
                    reasoning_tokens: 128,
                }),
                Chunk::End(StopReason::Completed)
            ]
        );
    }
}
