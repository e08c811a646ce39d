//! OpenAI-compatible chat completions, streamed: `POST {base_url}/chat/completions` with
//! `stream: true` and `stream_options.include_usage`, so the last chunk before `[DONE]` carries the
//! usage. The output cap goes in `max_completion_tokens`, `max_tokens` or both (the model's
//! `cap_field`); Azure OpenAI, OpenRouter, vLLM and Ollama need only configuration (key header,
//! extra headers, query parameters).
//!
//! The conversation becomes `messages`: function calls of the assistant become its message's
//! `tool_calls` (chat has no separate call items), their outputs `role: tool` messages. Function
//! tools, `tool_choice`, `parallel_tool_calls` (only with tools: the API refuses it alone),
//! `response_format`, `reasoning_effort`, `user`, `prompt_cache_key` and `service_tier` are the
//! chat names of the Responses fields.
//!
//! The end marker is `data: [DONE]`; the stop reason is the `finish_reason` seen before it
//! (`length` → cut off at the cap, `content_filter` → filtered, anything else — `stop`,
//! `tool_calls` — a natural end). Tool calls stream by `index`: the first fragment of a call has
//! its `id` and name, the rest pieces of its arguments; calls come one after another.

use serde_json::{json, Value};

use super::{
    http::{self, Decoder, KeyHeader},
    sse::SseEvent,
    CallRequest, Chunk, ChunkStream, OutputFormat, ProviderError, StopReason, ToolChoice, Turn,
    Usage,
};
use crate::config::{CapField, ModelConfig};

pub async fn stream(
    client: &reqwest::Client,
    model: &ModelConfig,
    request: &CallRequest,
) -> Result<ChunkStream, ProviderError> {
    let body = request_body(model, request);
    let response = http::post_stream(
        client,
        model,
        "/chat/completions",
        &body,
        KeyHeader::Bearer,
        &[],
    )
    .await?;
    Ok(http::decode_stream(response, ChatDecoder::default()))
}

/// The conversation as chat `messages`.
fn messages(turns: &[Turn]) -> Vec<Value> {
    let mut messages: Vec<Value> = Vec::with_capacity(turns.len());
    for turn in turns {
        match turn {
            Turn::Message { role, text } => {
                messages.push(json!({"role": role.as_str(), "content": text}));
            }
            Turn::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                let call = json!({"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": arguments}});
                // Calls join the assistant message right before them, if there is one.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        match last["tool_calls"].as_array_mut() {
                            Some(calls) => calls.push(call),
                            None => last["tool_calls"] = json!([call]),
                        }
                    }
                    _ => messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            Turn::FunctionOutput { call_id, output } => {
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}))
            }
        }
    }
    messages
}

/// The upstream request.
fn request_body(model: &ModelConfig, request: &CallRequest) -> Value {
    let mut body = json!({
        "model": model.upstream_model(),
        "messages": messages(&request.turns),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let cap = json!(request.max_output_tokens);
    match model.cap_field {
        CapField::MaxCompletionTokens => body["max_completion_tokens"] = cap,
        CapField::MaxTokens => body["max_tokens"] = cap,
        CapField::Both => {
            body["max_completion_tokens"] = cap.clone();
            body["max_tokens"] = cap;
        }
    }
    http::put(&mut body, "temperature", request.temperature);
    http::put(&mut body, "top_p", request.top_p);
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| json!({"type": "function", "function": tool.openai_definition()}))
            .collect();
        body["tools"] = json!(tools);
        http::put(
            &mut body,
            "parallel_tool_calls",
            request.parallel_tool_calls,
        );
        // Like `parallel_tool_calls`, only with tools: without any, `auto` and `none` change
        // nothing, and admission refuses the choices that need a tool.
        if let Some(choice) = &request.tool_choice {
            body["tool_choice"] = match choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Function(name) => {
                    json!({"type": "function", "function": {"name": name}})
                }
            };
        }
    }
    if let Some(format) = &request.format {
        // Chat nests a schema's fields under `json_schema`.
        let mut definition = format.openai_definition();
        body["response_format"] = match format {
            OutputFormat::JsonObject => definition,
            OutputFormat::JsonSchema { .. } => {
                if let Some(fields) = definition.as_object_mut() {
                    fields.remove("type");
                }
                json!({"type": "json_schema", "json_schema": definition})
            }
        };
    }
    http::put(
        &mut body,
        "reasoning_effort",
        request.reasoning_effort.as_ref(),
    );
    http::put_openai_shared(&mut body, request);
    body
}

/// The chat completions wire format.
#[derive(Debug, Default)]
struct ChatDecoder {
    /// The `finish_reason` seen so far.
    stop: Option<StopReason>,
    /// The `index` of the tool call streaming now.
    call: Option<u64>,
}

impl ChatDecoder {
    fn tool_calls(&mut self, calls: &[Value], out: &mut Vec<Chunk>) -> Result<(), ProviderError> {
        for call in calls {
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let function = call.get("function").unwrap_or(&Value::Null);
            if self.call != Some(index) {
                let (Some(id), Some(name)) = (
                    call.get("id").and_then(Value::as_str),
                    function.get("name").and_then(Value::as_str),
                ) else {
                    return Err(ProviderError::Protocol(format!(
                        "tool call {index} streamed without its id and name first (interleaved \
                         tool calls are not supported)"
                    )));
                };
                self.call = Some(index);
                out.push(Chunk::ToolCall {
                    call_id: id.to_string(),
                    name: name.to_string(),
                });
            }
            if let Some(arguments) = function
                .get("arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                out.push(Chunk::Arguments(arguments.to_string()));
            }
        }
        Ok(())
    }
}

impl Decoder for ChatDecoder {
    fn decode(&mut self, event: SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        if event.data.trim() == "[DONE]" {
            return Ok(vec![Chunk::End(self.stop.unwrap_or(StopReason::Completed))]);
        }
        let value = http::json(&event)?;
        if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(ProviderError::Upstream(message.to_string()));
        }
        let mut out = Vec::new();
        let choice = value.pointer("/choices/0");
        let text = choice
            .and_then(|c| c.pointer("/delta/content"))
            .and_then(Value::as_str);
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            out.push(Chunk::Delta(text.to_string()));
        }
        if let Some(calls) = choice
            .and_then(|c| c.pointer("/delta/tool_calls"))
            .and_then(Value::as_array)
        {
            self.tool_calls(calls, &mut out)?;
        }
        if let Some(reason) = choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
        {
            self.stop = Some(match reason {
                "length" => StopReason::MaxOutputTokens,
                "content_filter" => StopReason::ContentFilter,
                _ => StopReason::Completed,
            });
        }
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            let details = usage
                .get("completion_tokens_details")
                .unwrap_or(&Value::Null);
            out.push(Chunk::Usage(Usage {
                input_tokens: http::count(usage, "prompt_tokens"),
                output_tokens: http::count(usage, "completion_tokens"),
                reasoning_tokens: http::count(details, "reasoning_tokens"),
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{
        http::testing::{self, arguments, say, text, weather_conversation, weather_tool},
        Role,
    };

    fn user(text: &str) -> Turn {
        say(Role::User, text)
    }

    fn decode_all(text: &str) -> Vec<Result<Chunk, ProviderError>> {
        testing::decode_all(ChatDecoder::default(), text)
    }

    #[test]
    fn parses_deltas_stop_reason_usage_and_the_end_marker() {
        let stream = include_str!("../../tests/fixtures/openai_chat/length.sse");
        let chunks = decode_all(stream);
        assert!(matches!(
            chunks.last(),
            Some(Ok(Chunk::End(StopReason::MaxOutputTokens)))
        ));
        assert!(chunks.iter().any(
            |c| matches!(c, Ok(Chunk::Usage(Usage { output_tokens, .. })) if *output_tokens > 0)
        ));
        let stream = include_str!("../../tests/fixtures/openai_chat/basic.sse");
        let chunks = decode_all(stream);
        assert!(matches!(
            chunks.last(),
            Some(Ok(Chunk::End(StopReason::Completed)))
        ));
        assert_eq!(text(&chunks), "Hello! How can I assist you today?");
    }

    #[test]
    fn errors_in_the_stream_end_it() {
        let chunks = decode_all("data: {\"error\":{\"message\":\"boom\"}}\n\ndata: not json\n\n");
        assert!(matches!(&chunks[0], Err(ProviderError::Upstream(e)) if e == "boom"));
        assert!(chunks[1].is_err());
    }

    #[test]
    fn the_cap_goes_in_the_configured_field() {
        let request = CallRequest::plain(vec![user("hi")], 321);
        let mut model = ModelConfig::mock("m");
        let body = request_body(&model, &request);
        assert_eq!(body["max_completion_tokens"], 321);
        assert!(body.get("max_tokens").is_none());
        model.cap_field = CapField::MaxTokens;
        let body = request_body(&model, &request);
        assert_eq!(body["max_tokens"], 321);
        assert!(body.get("max_completion_tokens").is_none());
        model.cap_field = CapField::Both;
        let body = request_body(&model, &request);
        assert_eq!(
            (&body["max_tokens"], &body["max_completion_tokens"]),
            (&json!(321), &json!(321))
        );
    }

    #[test]
    fn tools_calls_formats_and_reasoning_are_sent_in_chat_names() {
        let request = CallRequest {
            tools: vec![weather_tool()],
            tool_choice: Some(ToolChoice::Function("get_weather".into())),
            parallel_tool_calls: Some(false),
            format: Some(OutputFormat::JsonSchema {
                name: "w".into(),
                description: None,
                schema: json!({"type": "object"}),
                strict: Some(true),
            }),
            reasoning_effort: Some("high".into()),
            end_user: Some("u-1".into()),
            ..CallRequest::plain(weather_conversation(), 100)
        };
        let body = request_body(&ModelConfig::mock("m"), &request);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
                {"role": "user", "content": "thanks"},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"type": "function", "function": {"name": "get_weather",
                "description": "Weather now", "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(
            body["response_format"],
            json!({"type": "json_schema",
                   "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(body["reasoning_effort"], "high");
        assert_eq!(body["user"], "u-1");
        // Without tools, no parallel_tool_calls (the API refuses it alone).
        let plain = CallRequest {
            parallel_tool_calls: Some(true),
            ..CallRequest::plain(vec![user("hi")], 1)
        };
        assert!(request_body(&ModelConfig::mock("m"), &plain)
            .get("parallel_tool_calls")
            .is_none());
    }

    #[test]
    fn a_recorded_tool_call_stream_gives_the_call_and_reasoning_usage() {
        let chunks = decode_all(include_str!(
            "../../tests/fixtures/openai_chat/tool_call.sse"
        ));
        let chunks: Vec<Chunk> = chunks.into_iter().map(Result::unwrap).collect();
        assert!(matches!(&chunks[0], Chunk::ToolCall { call_id, name }
            if call_id.starts_with("call_") && name == "get_weather"));
        assert_eq!(arguments(&chunks), "{\"city\":\"Paris\"}");
        assert!(chunks
            .iter()
            .any(|c| matches!(c, Chunk::Usage(u) if u.reasoning_tokens == 64)));
        assert_eq!(chunks.last(), Some(&Chunk::End(StopReason::Completed)));
    }
}
