//! OpenAI-compatible chat completions, streamed: `POST {base_url}/chat/completions` with
//! `stream: true` and `stream_options.include_usage`, so the last chunk before `[DONE]` carries the
//! usage. The output cap goes in `max_completion_tokens`, `max_tokens` or both (the model's
//! `cap_field`); Azure OpenAI, OpenRouter, vLLM and Ollama need only configuration (key header,
//! extra headers, query parameters).
//!
//! The end marker is `data: [DONE]`; the stop reason is the `finish_reason` seen before it
//! (`length` → cut off at the cap, `content_filter` → filtered, anything else → a natural end).

use serde_json::{json, Value};

use super::{
    http::{self, Decoder, KeyHeader},
    sse::SseEvent,
    CallRequest, Chunk, ChunkStream, ProviderError, StopReason,
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

/// The upstream request.
fn request_body(model: &ModelConfig, request: &CallRequest) -> Value {
    let mut body = json!({
        "model": model.upstream_model(),
        "messages": request.as_messages(),
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
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = request.top_p {
        body["top_p"] = json!(p);
    }
    body
}

/// The chat completions wire format.
#[derive(Debug, Default)]
struct ChatDecoder {
    /// The `finish_reason` seen so far.
    stop: Option<StopReason>,
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
            out.push(Chunk::Usage(crate::provider::Usage {
                input_tokens: http::count(usage, "prompt_tokens"),
                output_tokens: http::count(usage, "completion_tokens"),
                reasoning_tokens: 0,
            }));
        }
        Ok(out)
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
        assert!(chunks
            .iter()
            .any(|c| matches!(c, Ok(Chunk::Usage(crate::provider::Usage { output_tokens, .. })) if *output_tokens > 0)));
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
        let request = CallRequest {
            messages: vec![ChatMessage::new("user", "hi")],
            max_output_tokens: 321,
            temperature: None,
            top_p: None,
        };
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
}
