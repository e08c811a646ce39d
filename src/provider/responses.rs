//! OpenAI's Responses API, streamed: `POST {base_url}/responses` with `stream: true` and
//! `store: false` (tollgate keeps the job itself; nothing needs to live upstream). The output cap
//! always goes in `max_output_tokens`. System messages become `instructions` (joined with a blank
//! line); the other messages become `input`, a list of `message` items with string content.
//!
//! Every event names itself in its data's `type` (and in the SSE `event:` line). Only
//! `response.output_text.delta` carries answer text; lifecycle, content-part, reasoning and tool
//! events are skipped, and so are types this module does not know, since the API adds them freely.
//!
//! The end markers are `response.completed` (a natural end) and `response.incomplete`, whose
//! `incomplete_details.reason` is `max_output_tokens` (cut off at the cap) or `content_filter`
//! (filtered); both carry the final `usage`. `response.failed` and the `error` event end the stream
//! with an error, retryable when its code is `server_error` or a rate limit.

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
    let response =
        http::post_stream(client, model, "/responses", &body, KeyHeader::Bearer, &[]).await?;
    Ok(http::decode_stream(response, ResponsesDecoder))
}

/// The upstream request.
fn request_body(model: &ModelConfig, request: &CallRequest) -> Value {
    let messages = request.as_messages();
    let (system, rest): (Vec<_>, Vec<_>) = messages.iter().partition(|m| m.role == "system");
    let input: Vec<Value> = rest
        .iter()
        .map(|m| json!({"type": "message", "role": m.role, "content": m.content}))
        .collect();
    let mut body = json!({
        "model": model.upstream_model(),
        "input": input,
        "stream": true,
        "store": false,
        "max_output_tokens": request.max_output_tokens,
    });
    if !system.is_empty() {
        let instructions: Vec<&str> = system.iter().map(|m| m.content.as_str()).collect();
        body["instructions"] = json!(instructions.join("\n\n"));
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = request.top_p {
        body["top_p"] = json!(p);
    }
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
            "response.output_text.delta" => Ok(value
                .get("delta")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .map(|d| vec![Chunk::Delta(d.to_string())])
                .unwrap_or_default()),
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
        out.push(Chunk::Usage(crate::provider::Usage {
            input_tokens: http::count(usage, "input_tokens"),
            output_tokens: http::count(usage, "output_tokens"),
            reasoning_tokens: 0,
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
        http::testing::{self, text},
        ChatMessage,
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
                Chunk::Usage(crate::provider::Usage {
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
                Chunk::Usage(crate::provider::Usage {
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
            messages: vec![
                ChatMessage::new("system", "Be terse."),
                ChatMessage::new("user", "hi"),
                ChatMessage::new("system", "Answer in French."),
                ChatMessage::new("assistant", "salut"),
                ChatMessage::new("user", "again"),
            ],
            max_output_tokens: 321,
            temperature: Some(0.5),
            top_p: None,
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
            messages: vec![ChatMessage::new("user", "hi")],
            max_output_tokens: 16,
            temperature: None,
            top_p: Some(0.9),
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
}
