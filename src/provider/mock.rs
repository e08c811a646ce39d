//! The mock provider: deterministic text, a configured number of deltas with a configured pause
//! before each, and usage computed from the request. For demos and tests; needs no key. Like a
//! real model, it stops at the output cap (one token a delta) and then says so: a request whose
//! `max_output_tokens` is below `mock_deltas` ends `incomplete`. When `tool_choice` forces a
//! function (`required`, or a named one), the answer is a call of that function (the first tool
//! for `required`) with `{}` as its arguments, so function calling can be tried without a key.

use std::time::Duration;

use futures::StreamExt;

use super::{CallRequest, Chunk, ChunkStream, StopReason, ToolChoice, Usage};
use crate::{config::ModelConfig, tokens};

const WORDS: &[&str] = &[
    "This",
    "is",
    "a",
    "mock",
    "response",
    "from",
    "tollgate,",
    "streamed",
    "one",
    "word",
    "at",
    "a",
    "time.",
];

/// The i-th delta of every mock answer.
pub fn delta(i: usize) -> String {
    format!("{} ", WORDS[i % WORDS.len()])
}

/// The function the request forces the model to call, if any.
fn forced_call(request: &CallRequest) -> Option<&str> {
    match &request.tool_choice {
        Some(ToolChoice::Function(name)) => Some(name),
        Some(ToolChoice::Required) => request.tools.first().map(|t| t.name.as_str()),
        _ => None,
    }
}

pub fn stream(model: &ModelConfig, request: &CallRequest) -> ChunkStream {
    let input_tokens =
        tokens::estimate(tokens::tokenizer_for(model), &request.as_messages()).tokens;
    if let Some(name) = forced_call(request) {
        return Box::pin(futures::stream::iter([
            Ok(Chunk::ToolCall {
                call_id: "call_mock_0".into(),
                name: name.to_string(),
            }),
            Ok(Chunk::Arguments("{}".into())),
            Ok(Chunk::Usage(Usage {
                input_tokens,
                output_tokens: 1,
                reasoning_tokens: 0,
            })),
            Ok(Chunk::End(StopReason::Completed)),
        ]));
    }
    let cap = request.max_output_tokens.min(model.mock_deltas);
    let stop = if cap < model.mock_deltas {
        StopReason::MaxOutputTokens
    } else {
        StopReason::Completed
    };
    let delay = Duration::from_millis(model.mock_delay_ms);
    let deltas = futures::stream::iter(0..cap as usize).then(move |i| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(Chunk::Delta(delta(i)))
    });
    let end = futures::stream::iter([
        Ok(Chunk::Usage(Usage {
            input_tokens,
            output_tokens: cap,
            reasoning_tokens: 0,
        })),
        Ok(Chunk::End(stop)),
    ]);
    Box::pin(deltas.chain(end))
}
