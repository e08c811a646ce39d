//! Responses API fidelity, end to end: the official OpenAI Python SDK
//! (`tests/sdk/test_fidelity.py`) drives the real front and worker, whose models sit behind fake
//! upstreams of each wire format — chat completions, Anthropic Messages, Responses — replaying
//! streams written here in that format. The script checks what a client sees; each test then
//! checks what the upstreams received (the request translated for the provider) and what the job
//! rows hold.
//!
//! Each test has its own `TestEnv`, models and upstreams, and runs the scenarios it checks.

mod common;

use common::{
    sdk::{project, python_with_sdk, run_python},
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use serde_json::{json, Value};
use tollgate::{
    config::{ModelConfig, ProviderKind},
    store::keys::NewKey,
};

/// The script's two keys: the one it works with, and another.
struct Keys {
    key: String,
    other: String,
}

impl Keys {
    async fn create(env: &TestEnv) -> Self {
        let other = NewKey {
            name: "other".into(),
            ..Default::default()
        };
        Self {
            key: env.key().await,
            other: env.create_key(other).await,
        }
    }
}

/// Runs `tests/sdk/test_fidelity.py` with these `(scenario, model)` pairs, and asserts that every
/// check passed.
async fn run_scenarios(env: &TestEnv, keys: &Keys, scenarios: &[(&str, &str)]) {
    let python = tokio::task::spawn_blocking(python_with_sdk).await.unwrap();
    let scenarios: String = scenarios
        .iter()
        .map(|(scenario, model)| format!("{scenario}={model}\n"))
        .collect();
    let stdout = run_python(
        &python,
        &project().join("tests/sdk/test_fidelity.py"),
        &[
            ("TOLLGATE_BASE_URL", env.url("/v1").as_str()),
            ("TOLLGATE_KEY", &keys.key),
            ("TOLLGATE_OTHER_KEY", &keys.other),
            ("TOLLGATE_SCENARIOS", &scenarios),
            ("TOLLGATE_EXPECT", &expected().to_string()),
        ],
    )
    .await;
    assert!(stdout.contains("all fidelity checks passed"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// What the upstreams are scripted to say, shared with the script through `TOLLGATE_EXPECT`.

const QUESTION: &str = "What is the weather in Paris?";
/// The arguments of the scripted `get_weather` call, as streamed.
const ARGUMENTS: &[&str] = &["{\"ci", "ty\":\"Pa", "ris\"}"];
const TOOL_RESULT: &str = "{\"temp_c\": 18}";
/// What the model says before its call, when it is not forced to call.
const PREAMBLE: &[&str] = &["Let me check", " the weather."];
/// The answer once the function's result is in.
const FINAL_TEXT: &[&str] = &["It is 18 °C", " in Paris", " right now."];
/// The structured answer, as streamed: it forms [`weather`].
const WEATHER_JSON: &[&str] = &["{\"city\":", "\"Paris\",\"te", "mp_c\":18}"];
const REASONING_TEXT: &[&str] = &["17 * 23", " = 391"];
/// The usage of the scripted reasoning answer.
const REASONING_USAGE: Tokens = Tokens {
    input: 20,
    output: 150,
    reasoning: 128,
};
const INSTRUCTIONS: &str = "Answer in one short sentence.";
const TURNS: [&str; 3] = [
    "Name a river that flows through Paris.",
    "Which sea does that river flow into?",
    "And how long is the river, roughly?",
];
const ANSWERS: [&str; 3] = [
    "The Seine flows through Paris.",
    "The Seine flows into the English Channel.",
    "The Seine is about 777 kilometres long.",
];

fn parameters() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
}

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "temp_c": {"type": "integer"}},
        "required": ["city", "temp_c"],
        "additionalProperties": false,
    })
}

fn weather() -> Value {
    json!({"city": "Paris", "temp_c": 18})
}

fn expected() -> Value {
    json!({
        "question": QUESTION,
        "parameters": parameters(),
        "tool_result": TOOL_RESULT,
        "preamble": PREAMBLE.concat(),
        "final_text": FINAL_TEXT.concat(),
        "weather_schema": weather_schema(),
        "weather": weather(),
        "reasoning_text": REASONING_TEXT.concat(),
        "input_tokens": REASONING_USAGE.input,
        "output_tokens": REASONING_USAGE.output,
        "reasoning_tokens": REASONING_USAGE.reasoning,
        "instructions": INSTRUCTIONS,
        "turns": TURNS,
        "answers": ANSWERS,
    })
}

// ---------------------------------------------------------------------------------------------
// Scripted answers in each provider's wire format (checked against `tests/fixtures/`).

/// One output item of a scripted answer.
#[derive(Debug, Clone)]
enum Said {
    /// A Responses upstream's reasoning item (the other formats show no reasoning).
    Reasoning,
    /// Text, in these deltas.
    Text(&'static [&'static str]),
    /// A function call, its arguments in these deltas.
    Call {
        call_id: &'static str,
        arguments: &'static [&'static str],
    },
}

/// The usage an answer reports.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    input: u32,
    output: u32,
    reasoning: u32,
}

const SMALL: Tokens = Tokens {
    input: 40,
    output: 12,
    reasoning: 0,
};

/// The id each provider gives the scripted call (in its own style).
fn call_id(provider: &ProviderKind) -> &'static str {
    match provider {
        ProviderKind::Openai => "call_Qm3lZ8rT2wYd",
        ProviderKind::Anthropic => "toolu_01T1x9yWbDq6cE7kR4vN2hJ3",
        ProviderKind::OpenaiResponses => "call_r5Kp0aL2eVx7",
        ProviderKind::Mock => unreachable!("no upstream"),
    }
}

fn get_weather(provider: &ProviderKind) -> Said {
    Said::Call {
        call_id: call_id(provider),
        arguments: ARGUMENTS,
    }
}

/// A whole streamed answer saying `said`, in `provider`'s wire format.
fn answer(provider: &ProviderKind, said: &[Said], tokens: Tokens) -> Script {
    Script::Raw(match provider {
        ProviderKind::Openai => chat_stream(said, tokens),
        ProviderKind::Anthropic => anthropic_stream(said, tokens),
        ProviderKind::OpenaiResponses => responses_stream(said, tokens),
        ProviderKind::Mock => unreachable!("no upstream"),
    })
}

/// Chat completions: `data:` chunks, the finish reason, a usage chunk, `[DONE]`.
fn chat_stream(said: &[Said], tokens: Tokens) -> String {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-Fid3l1ty", "object": "chat.completion.chunk", "created": 1764064000,
               "model": "gpt-4.1-2025-04-14", "system_fingerprint": "fp_fid",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
               "usage": null})
    };
    let mut chunks = Vec::new();
    let mut role = Some("assistant");
    let mut calls = 0;
    for item in said {
        match item {
            Said::Reasoning => {}
            Said::Text(deltas) => {
                chunks.push(chunk(
                    json!({"role": role.take(), "content": "", "refusal": null}),
                    Value::Null,
                ));
                for delta in *deltas {
                    chunks.push(chunk(json!({"content": delta}), Value::Null));
                }
            }
            Said::Call { call_id, arguments } => {
                chunks.push(chunk(
                    json!({"role": role.take(), "content": null, "refusal": null,
                           "tool_calls": [{"index": calls, "id": call_id, "type": "function",
                                           "function": {"name": "get_weather", "arguments": ""}}]}),
                    Value::Null,
                ));
                for delta in *arguments {
                    chunks.push(chunk(
                        json!({"tool_calls": [{"index": calls, "function": {"arguments": delta}}]}),
                        Value::Null,
                    ));
                }
                calls += 1;
            }
        }
    }
    let finish = if calls > 0 { "tool_calls" } else { "stop" };
    chunks.push(chunk(json!({}), json!(finish)));
    let mut usage = chunk(Value::Null, Value::Null);
    usage["choices"] = json!([]);
    usage["usage"] = json!({
        "prompt_tokens": tokens.input,
        "completion_tokens": tokens.output,
        "total_tokens": tokens.input + tokens.output,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": tokens.reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    });
    chunks.push(usage);
    let mut text: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    text.push_str("data: [DONE]\n\n");
    text
}

/// Server-sent events, each named by its data's `type`.
fn named_events(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

/// Anthropic Messages: `message_start`, a content block per item, `message_delta` with the stop
/// reason and the output usage, `message_stop`.
fn anthropic_stream(said: &[Said], tokens: Tokens) -> String {
    let mut events = vec![json!({"type": "message_start", "message": {
        "id": "msg_01Fid3l1tyScr1pt3dAnsw3r", "type": "message", "role": "assistant",
        "content": [], "model": "claude-sonnet-4-5-20250929", "stop_reason": null,
        "stop_sequence": null,
        "usage": {"input_tokens": tokens.input, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1,
                  "service_tier": "standard"}}})];
    let mut stop = "end_turn";
    let blocks = said.iter().filter(|s| !matches!(s, Said::Reasoning));
    for (index, item) in blocks.enumerate() {
        match item {
            Said::Reasoning => unreachable!(),
            Said::Text(deltas) => {
                events.push(json!({"type": "content_block_start", "index": index,
                                   "content_block": {"type": "text", "text": ""}}));
                for delta in *deltas {
                    events.push(json!({"type": "content_block_delta", "index": index,
                                       "delta": {"type": "text_delta", "text": delta}}));
                }
            }
            Said::Call { call_id, arguments } => {
                stop = "tool_use";
                events.push(json!({"type": "content_block_start", "index": index,
                                   "content_block": {"type": "tool_use", "id": call_id,
                                                     "name": "get_weather", "input": {}}}));
                for delta in std::iter::once(&"").chain(arguments.iter()) {
                    events.push(json!({"type": "content_block_delta", "index": index,
                                       "delta": {"type": "input_json_delta",
                                                 "partial_json": delta}}));
                }
            }
        }
        if index == 0 {
            events.push(json!({"type": "ping"}));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
    }
    events.push(json!({"type": "message_delta",
                       "delta": {"stop_reason": stop, "stop_sequence": null},
                       "usage": {"output_tokens": tokens.output}}));
    events.push(json!({"type": "message_stop"}));
    named_events(&events)
}

/// OpenAI Responses: `response.created`, `response.in_progress`, each output item's events, and
/// `response.completed` with the whole response and its usage.
fn responses_stream(said: &[Said], tokens: Tokens) -> String {
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_0fid3l1ty5cr1pt3d", "object": "response", "created_at": 1764064000,
               "status": status, "background": false, "error": null,
               "incomplete_details": null, "instructions": null, "max_output_tokens": null,
               "model": "gpt-5-2025-08-07", "output": output, "parallel_tool_calls": true,
               "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
               "store": false, "temperature": 1.0, "text": {"format": {"type": "text"}},
               "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
               "usage": usage, "metadata": {}})
    };
    let before = response("in_progress", json!([]), Value::Null);
    let mut events = vec![
        json!({"type": "response.created", "response": before}),
        json!({"type": "response.in_progress", "response": before}),
    ];
    let mut output = Vec::new();
    for (index, item) in said.iter().enumerate() {
        let added = |item: Value| {
            json!({"type": "response.output_item.added", "output_index": index,
                   "item": item})
        };
        let done = |item: &Value| {
            json!({"type": "response.output_item.done", "output_index": index,
                   "item": item})
        };
        match item {
            Said::Reasoning => {
                let item = json!({"id": format!("rs_0fid{index}"), "type": "reasoning",
                                  "summary": []});
                events.push(added(item.clone()));
                events.push(done(&item));
                output.push(item);
            }
            Said::Text(deltas) => {
                let id = format!("msg_0fid{index}");
                let text = deltas.concat();
                let part = |text: &str| {
                    json!({"type": "output_text", "annotations": [], "logprobs": [],
                           "text": text})
                };
                let opened = json!({"id": id, "type": "message", "status": "in_progress",
                                    "content": [], "role": "assistant"});
                events.push(added(opened));
                events.push(json!({"type": "response.content_part.added", "item_id": id,
                                   "output_index": index, "content_index": 0, "part": part("")}));
                for delta in *deltas {
                    events.push(json!({"type": "response.output_text.delta", "item_id": id,
                                       "output_index": index, "content_index": 0,
                                       "delta": delta, "logprobs": [], "obfuscation": "x7Qz"}));
                }
                events.push(json!({"type": "response.output_text.done", "item_id": id,
                                   "output_index": index, "content_index": 0, "text": text,
                                   "logprobs": []}));
                events.push(json!({"type": "response.content_part.done", "item_id": id,
                                   "output_index": index, "content_index": 0,
                                   "part": part(&text)}));
                let item = json!({"id": id, "type": "message", "status": "completed",
                                  "content": [part(&text)], "role": "assistant"});
                events.push(done(&item));
                output.push(item);
            }
            Said::Call { call_id, arguments } => {
                let id = format!("fc_0fid{index}");
                let whole = arguments.concat();
                events.push(added(json!({"id": id, "type": "function_call",
                                         "status": "in_progress", "arguments": "",
                                         "call_id": call_id, "name": "get_weather"})));
                for delta in *arguments {
                    events.push(json!({"type": "response.function_call_arguments.delta",
                                       "item_id": id, "output_index": index, "delta": delta,
                                       "obfuscation": "Hk2"}));
                }
                events.push(json!({"type": "response.function_call_arguments.done",
                                   "item_id": id, "output_index": index, "arguments": whole}));
                let item = json!({"id": id, "type": "function_call", "status": "completed",
                                  "arguments": whole, "call_id": call_id,
                                  "name": "get_weather"});
                events.push(done(&item));
                output.push(item);
            }
        }
    }
    let usage = json!({"input_tokens": tokens.input, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens": tokens.output,
                       "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
                       "total_tokens": tokens.input + tokens.output});
    events.push(json!({"type": "response.completed",
                       "response": response("completed", json!(output), usage)}));
    for (number, event) in events.iter_mut().enumerate() {
        event["sequence_number"] = json!(number);
    }
    named_events(&events)
}

// ---------------------------------------------------------------------------------------------
// What the upstreams received, read back from each wire format into one shape.

/// One item of the conversation an upstream was sent.
#[derive(Debug, Clone, PartialEq)]
enum Sent {
    /// A message (`system` for instructions, whatever the format calls them).
    Message {
        role: String,
        text: String,
    },
    Call {
        call_id: String,
        name: String,
        arguments: Value,
    },
    Output {
        call_id: String,
        output: String,
    },
}

fn message(role: &str, text: &str) -> Sent {
    Sent::Message {
        role: role.into(),
        text: text.into(),
    }
}

/// Text content: a string, or the text of its text parts.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// JSON text as a value (or the text itself when it is not JSON).
fn json_text(text: &Value) -> Value {
    match text {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| text.clone()),
        other => other.clone(),
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The conversation in an upstream request body, in order.
fn conversation_sent(provider: &ProviderKind, body: &Value) -> Vec<Sent> {
    let mut sent = Vec::new();
    let none = Vec::new();
    let list = |name: &str| body.get(name).and_then(Value::as_array).unwrap_or(&none);
    match provider {
        ProviderKind::Openai => {
            for m in list("messages") {
                let role = match str_at(m, "/role") {
                    "developer" => "system",
                    role => role,
                };
                if role == "tool" {
                    sent.push(Sent::Output {
                        call_id: str_at(m, "/tool_call_id").into(),
                        output: text_of(&m["content"]),
                    });
                    continue;
                }
                let text = text_of(&m["content"]);
                if !text.is_empty() || m.get("tool_calls").is_none() {
                    sent.push(message(role, &text));
                }
                for call in m["tool_calls"].as_array().unwrap_or(&none) {
                    sent.push(Sent::Call {
                        call_id: str_at(call, "/id").into(),
                        name: str_at(call, "/function/name").into(),
                        arguments: json_text(&call["function"]["arguments"]),
                    });
                }
            }
        }
        ProviderKind::Anthropic => {
            if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
                sent.push(message("system", &text_of(system)));
            }
            for m in list("messages") {
                let role = str_at(m, "/role");
                let Some(blocks) = m["content"].as_array() else {
                    sent.push(message(role, &text_of(&m["content"])));
                    continue;
                };
                for block in blocks {
                    sent.push(match str_at(block, "/type") {
                        "tool_use" => Sent::Call {
                            call_id: str_at(block, "/id").into(),
                            name: str_at(block, "/name").into(),
                            arguments: block["input"].clone(),
                        },
                        "tool_result" => Sent::Output {
                            call_id: str_at(block, "/tool_use_id").into(),
                            output: text_of(&block["content"]),
                        },
                        _ => message(role, str_at(block, "/text")),
                    });
                }
            }
        }
        ProviderKind::OpenaiResponses => {
            if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
                sent.push(message("system", instructions));
            }
            for item in list("input") {
                sent.push(match str_at(item, "/type") {
                    "function_call" => Sent::Call {
                        call_id: str_at(item, "/call_id").into(),
                        name: str_at(item, "/name").into(),
                        arguments: json_text(&item["arguments"]),
                    },
                    "function_call_output" => Sent::Output {
                        call_id: str_at(item, "/call_id").into(),
                        output: text_of(&item["output"]),
                    },
                    _ => {
                        let role = match str_at(item, "/role") {
                            "developer" => "system",
                            role => role,
                        };
                        message(role, &text_of(&item["content"]))
                    }
                });
            }
        }
        ProviderKind::Mock => unreachable!("no upstream"),
    }
    sent
}

/// The function tools of an upstream request body, as (name, parameters schema).
fn tools_sent(provider: &ProviderKind, body: &Value) -> Vec<(String, Value)> {
    let tools = body["tools"].as_array().cloned().unwrap_or_default();
    tools
        .iter()
        .map(|tool| match provider {
            ProviderKind::Openai => {
                assert_eq!(tool["type"], "function", "{tool}");
                (
                    str_at(tool, "/function/name").to_string(),
                    tool["function"]["parameters"].clone(),
                )
            }
            ProviderKind::Anthropic => (
                str_at(tool, "/name").to_string(),
                tool["input_schema"].clone(),
            ),
            ProviderKind::OpenaiResponses => {
                assert_eq!(tool["type"], "function", "{tool}");
                (
                    str_at(tool, "/name").to_string(),
                    tool["parameters"].clone(),
                )
            }
            ProviderKind::Mock => unreachable!("no upstream"),
        })
        .collect()
}

/// The three upstream wire formats, and a name prefix for their models.
fn providers() -> [(&'static str, ProviderKind); 3] {
    [
        ("chat", ProviderKind::Openai),
        ("claude", ProviderKind::Anthropic),
        ("resp", ProviderKind::OpenaiResponses),
    ]
}

fn path_of(provider: &ProviderKind) -> &'static str {
    match provider {
        ProviderKind::Openai => "chat/completions",
        ProviderKind::Anthropic => "messages",
        ProviderKind::OpenaiResponses => "responses",
        ProviderKind::Mock => unreachable!("no upstream"),
    }
}

/// A model of `provider` behind `up`, priced like a reasoning model.
fn model_behind(name: &str, provider: &ProviderKind, up: &FakeUpstream) -> ModelConfig {
    ModelConfig {
        provider: provider.clone(),
        base_url: Some(up.base_url()),
        input_price_per_1m: 1.25,
        output_price_per_1m: 10.0,
        ..ModelConfig::mock(name)
    }
}

/// A model, its provider and its upstream.
struct Upstreamed {
    name: String,
    provider: ProviderKind,
    up: FakeUpstream,
}

impl Upstreamed {
    async fn start(name: String, provider: ProviderKind, answers: Vec<Script>) -> Self {
        let up = FakeUpstream::start(Script::Sequence(answers)).await;
        Self { name, provider, up }
    }

    fn config(&self) -> ModelConfig {
        model_behind(&self.name, &self.provider, &self.up)
    }

    /// The request bodies the upstream received, asserting there were `calls` of them, each to
    /// the provider's path.
    fn bodies(&self, calls: usize) -> Vec<Value> {
        let requests = self.up.requests();
        assert_eq!(
            requests.len(),
            calls,
            "{}: {:#?}",
            self.name,
            requests.iter().map(|r| &r.body).collect::<Vec<_>>()
        );
        for r in &requests {
            assert_eq!(r.path, path_of(&self.provider), "{}", self.name);
        }
        requests.into_iter().map(|r| r.body).collect()
    }
}

/// The requests stored on the model's job rows, oldest first.
async fn stored_requests(env: &TestEnv, model: &str) -> Vec<Value> {
    let rows: Vec<(sqlx::types::Json<Value>,)> =
        sqlx::query_as("SELECT request FROM tollgate.jobs WHERE model = $1 ORDER BY created_at")
            .bind(model)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    rows.into_iter().map(|(r,)| r.0).collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_calls_round_trip_through_every_provider() {
    let mut models = Vec::new();
    for (prefix, provider) in providers() {
        let call = get_weather(&provider);
        let answers = vec![
            // Forced to call the function.
            answer(&provider, std::slice::from_ref(&call), SMALL),
            // Streamed: a word first, then the call.
            answer(&provider, &[Said::Text(PREAMBLE), call], SMALL),
            // With the function's result.
            answer(&provider, &[Said::Text(FINAL_TEXT)], SMALL),
        ];
        models.push(Upstreamed::start(format!("{prefix}-tools"), provider, answers).await);
    }
    let env = TestEnv::start(models.iter().map(Upstreamed::config).collect()).await;
    let keys = Keys::create(&env).await;
    let scenarios: Vec<_> = models
        .iter()
        .map(|m| ("function_calling", m.name.as_str()))
        .collect();
    run_scenarios(&env, &keys, &scenarios).await;

    for m in &models {
        let (name, provider) = (&m.name, &m.provider);
        let bodies = m.bodies(3);
        for body in &bodies {
            assert_eq!(
                tools_sent(provider, body),
                [("get_weather".to_string(), parameters())],
                "{name}: {body}"
            );
        }
        // The forced choice and no parallel calls, in the provider's terms.
        let first = &bodies[0];
        match provider {
            ProviderKind::Openai => {
                assert_eq!(
                    first["tool_choice"],
                    json!({"type": "function", "function": {"name": "get_weather"}}),
                    "{name}: {first}"
                );
                assert_eq!(first["parallel_tool_calls"], false, "{name}: {first}");
            }
            ProviderKind::Anthropic => assert_eq!(
                first["tool_choice"],
                json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}),
                "{name}: {first}"
            ),
            _ => {
                assert_eq!(
                    first["tool_choice"],
                    json!({"type": "function", "name": "get_weather"}),
                    "{name}: {first}"
                );
                assert_eq!(first["parallel_tool_calls"], false, "{name}: {first}");
            }
        }
        // The second turn: the question, the model's call, the client's result.
        let conversation: Vec<Sent> = conversation_sent(provider, &bodies[2])
            .into_iter()
            .filter(|s| !matches!(s, Sent::Message { role, .. } if role == "system"))
            .collect();
        let id = call_id(provider).to_string();
        assert_eq!(
            conversation,
            [
                message("user", QUESTION),
                Sent::Call {
                    call_id: id.clone(),
                    name: "get_weather".into(),
                    arguments: json!({"city": "Paris"}),
                },
                Sent::Output {
                    call_id: id,
                    output: TOOL_RESULT.into(),
                },
            ],
            "{name}: {}",
            bodies[2]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_reach_the_upstream_as_its_schema() {
    let mut models = Vec::new();
    for (prefix, provider) in [
        ("chat", ProviderKind::Openai),
        ("resp", ProviderKind::OpenaiResponses),
    ] {
        let json_answer = answer(&provider, &[Said::Text(WEATHER_JSON)], SMALL);
        let answers = vec![json_answer; 3];
        models.push(Upstreamed::start(format!("{prefix}-json"), provider, answers).await);
    }
    let claude = Upstreamed::start(
        "claude-json".into(),
        ProviderKind::Anthropic,
        vec![Script::Status(500)],
    )
    .await;
    let mut configs: Vec<ModelConfig> = models.iter().map(Upstreamed::config).collect();
    configs.push(claude.config());
    let env = TestEnv::start(configs).await;
    let keys = Keys::create(&env).await;
    let mut scenarios: Vec<_> = models
        .iter()
        .map(|m| ("structured_output", m.name.as_str()))
        .collect();
    scenarios.push(("structured_output_refused", "claude-json"));
    run_scenarios(&env, &keys, &scenarios).await;

    for m in &models {
        let name = &m.name;
        let bodies = m.bodies(3);
        let stored = stored_requests(&env, name).await;
        assert_eq!(stored.len(), 3, "{name}");
        // The first with the schema as the client wrote it, the second with the SDK's schema of
        // the pydantic model: each reaches the upstream as sent.
        assert_eq!(stored[0]["text"]["format"]["schema"], weather_schema());
        for (body, request) in bodies.iter().zip(&stored).take(2) {
            let asked = &request["text"]["format"];
            let format = match m.provider {
                ProviderKind::Openai => {
                    assert_eq!(
                        body["response_format"]["type"], "json_schema",
                        "{name}: {body}"
                    );
                    &body["response_format"]["json_schema"]
                }
                _ => {
                    assert_eq!(
                        body["text"]["format"]["type"], "json_schema",
                        "{name}: {body}"
                    );
                    &body["text"]["format"]
                }
            };
            assert_eq!(format["name"], asked["name"], "{name}: {body}");
            assert_eq!(format["schema"], asked["schema"], "{name}: {body}");
            assert_eq!(format["strict"], true, "{name}: {body}");
        }
        // The third in JSON mode.
        let body = &bodies[2];
        let format = match m.provider {
            ProviderKind::Openai => &body["response_format"],
            _ => &body["text"]["format"],
        };
        assert_eq!(format, &json!({"type": "json_object"}), "{name}: {body}");
    }
    assert_eq!(claude.up.calls(), 0);
    assert!(stored_requests(&env, "claude-json").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_effort_goes_upstream_and_reasoning_tokens_are_charged() {
    let mut models = Vec::new();
    for (prefix, provider) in [
        ("chat", ProviderKind::Openai),
        ("resp", ProviderKind::OpenaiResponses),
    ] {
        let said = [Said::Reasoning, Said::Text(REASONING_TEXT)];
        let answers = vec![answer(&provider, &said, REASONING_USAGE)];
        models.push(Upstreamed::start(format!("{prefix}-reason"), provider, answers).await);
    }
    let env = TestEnv::start(models.iter().map(Upstreamed::config).collect()).await;
    let keys = Keys::create(&env).await;
    let scenarios: Vec<_> = models
        .iter()
        .map(|m| ("reasoning", m.name.as_str()))
        .collect();
    run_scenarios(&env, &keys, &scenarios).await;

    let mut total = 0;
    for m in &models {
        let name = &m.name;
        let body = &m.bodies(1)[0];
        let effort = match m.provider {
            ProviderKind::Openai => &body["reasoning_effort"],
            _ => &body["reasoning"]["effort"],
        };
        assert_eq!(effort, "high", "{name}: {body}");
        type Row = (
            Option<i32>,
            Option<i32>,
            Option<i32>,
            Option<i64>,
            Option<bool>,
        );
        let row: Row = sqlx::query_as(
            "SELECT input_tokens, output_tokens, reasoning_tokens, cost_micro_usd, usage_estimated
               FROM tollgate.jobs WHERE model = $1",
        )
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        let Tokens {
            input,
            output,
            reasoning,
        } = REASONING_USAGE;
        // Every output token is charged, the reasoning ones included.
        let cost = m.config().cost(input.into(), output.into()).0;
        assert_eq!(
            row,
            (
                Some(input as i32),
                Some(output as i32),
                Some(reasoning as i32),
                Some(cost),
                Some(false)
            ),
            "{name}"
        );
        total += cost;
    }
    let (in_flight, reserved, spent) = env.counters_of(&keys.key).await;
    assert_eq!((in_flight, reserved, spent), (0, 0, total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_response_id_sends_the_whole_conversation() {
    let mut models = Vec::new();
    for (prefix, provider) in providers() {
        let mut answers: Vec<Script> = ANSWERS
            .iter()
            .map(|a| answer(&provider, &[Said::Text(std::slice::from_ref(a))], SMALL))
            .collect();
        // The answer to the request with `store: false`.
        answers.push(answer(&provider, &[Said::Text(&["Unstored."])], SMALL));
        models.push(Upstreamed::start(format!("{prefix}-conv"), provider, answers).await);
    }
    let env = TestEnv::start(models.iter().map(Upstreamed::config).collect()).await;
    let keys = Keys::create(&env).await;
    let scenarios: Vec<_> = models
        .iter()
        .map(|m| ("conversation", m.name.as_str()))
        .collect();
    run_scenarios(&env, &keys, &scenarios).await;

    for m in &models {
        let (name, provider) = (&m.name, &m.provider);
        let bodies = m.bodies(4);
        let sent: Vec<Vec<Sent>> = bodies
            .iter()
            .map(|b| conversation_sent(provider, b))
            .collect();
        assert_eq!(
            sent[0],
            [message("system", INSTRUCTIONS), message("user", TURNS[0])],
            "{name}: {}",
            bodies[0]
        );
        assert_eq!(
            sent[1],
            [
                message("user", TURNS[0]),
                message("assistant", ANSWERS[0]),
                message("user", TURNS[1]),
            ],
            "{name}: {}",
            bodies[1]
        );
        // The whole history in order, and not the first turn's instructions.
        assert_eq!(
            sent[2],
            [
                message("user", TURNS[0]),
                message("assistant", ANSWERS[0]),
                message("user", TURNS[1]),
                message("assistant", ANSWERS[1]),
                message("user", TURNS[2]),
            ],
            "{name}: {}",
            bodies[2]
        );
        assert!(
            !bodies[2].to_string().contains(INSTRUCTIONS),
            "{name}: {}",
            bodies[2]
        );
        // Admission counted the history: each turn's estimate is above the one before. The
        // refused continuations wrote no job.
        let estimates: Vec<i32> = sqlx::query_scalar(
            "SELECT estimated_input_tokens FROM tollgate.jobs WHERE model = $1
              ORDER BY created_at",
        )
        .bind(name)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(estimates.len(), 4, "{name}: {estimates:?}");
        assert!(
            estimates[0] < estimates[1] && estimates[1] < estimates[2],
            "{name}: {estimates:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_write_nothing() {
    let mut models = Vec::new();
    for (prefix, provider) in providers() {
        let never = vec![Script::Status(500)];
        models.push(Upstreamed::start(format!("{prefix}-refuse"), provider, never).await);
    }
    let env = TestEnv::start(models.iter().map(Upstreamed::config).collect()).await;
    let keys = Keys::create(&env).await;
    let before = env.snapshot().await;
    let mut scenarios: Vec<_> = models
        .iter()
        .map(|m| ("refusals", m.name.as_str()))
        .collect();
    scenarios.push(("structured_output_refused", "claude-refuse"));
    scenarios.push(("reasoning_refused", "claude-refuse"));
    run_scenarios(&env, &keys, &scenarios).await;

    let after = env.snapshot().await;
    assert_eq!(after.jobs, 0);
    assert_eq!(after, before);
    assert_eq!(env.counters_of(&keys.key).await, (0, 0, 0));
    for m in &models {
        assert_eq!(m.up.calls(), 0, "{}", m.name);
    }
}
