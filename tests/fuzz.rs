//! Property tests (proptest) on the two places where arbitrary client or model text meets a
//! format: the request parser (`request.rs`) and the event stream's encoder (`api/stream.rs`).
//!
//! - Any JSON value or body fed to [`CreateResponse::from_value`] / [`CreateResponse::parse`] —
//!   deep nesting, NUL, huge numbers, odd unicode, fields of every kind with values of every
//!   type — never panics, and is either a request or an `InvalidRequest` whose `param` is null or
//!   names a place in the input (a field that is there, or one missing from an object that is).
//! - Any output pieces and texts, encoded as the stream sends them, give well-framed SSE: each
//!   event an `event:` line and one `data:` line, the data one JSON object repeating the event's
//!   type, sequence numbers contiguous from where the reader asked, the same events whether read
//!   at once or as the rows grow.
//!
//! Case counts are kept small so this runs in seconds. To search longer, raise them:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz` (a failure prints the shrunk input and
//! is saved in `tests/fuzz.proptest-regressions`; commit that file so the case is replayed).

use std::collections::HashSet;

use axum::response::{sse::Sse, IntoResponse};
use chrono::Utc;
use futures::stream;
use proptest::{prelude::*, test_runner::Config as ProptestConfig};
use serde_json::{json, Map, Number, Value};
use sqlx::types::Json;
use tollgate::{
    api::StreamEvent,
    ids::{JobId, JobStatus, KeyId},
    output::{Output, Piece, Shaper},
    request::{CreateResponse, InvalidRequest},
    store::jobs::{AttemptPieces, JobRow},
};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Shrinking a large JSON value can take long; a found case is enough to start from.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strings, numbers and JSON values.

/// Strings that are awkward for a parser or an encoder.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        // The words the parser looks for, so values often reach its deeper checks.
        prop::sample::select(vec![
            "",
            "m",
            "mock-1",
            "auto",
            "none",
            "required",
            "function",
            "message",
            "user",
            "assistant",
            "system",
            "developer",
            "robot",
            "input_text",
            "output_text",
            "refusal",
            "input_image",
            "function_call",
            "function_call_output",
            "item_reference",
            "text",
            "json_object",
            "json_schema",
            "low",
            "high",
            "max",
            "disabled",
            "default",
            "flex",
            "get_weather",
            "call_1",
            "{}",
            "[1]",
            "null",
        ])
        .prop_map(str::to_string),
        // Control characters, NUL, line breaks of every kind, bidi and zero-width marks,
        // combining marks, astral planes, the last code point, and SSE's own syntax.
        prop::collection::vec(
            prop::sample::select(vec![
                "\0",
                "\n",
                "\r",
                "\r\n",
                "\n\n",
                "\t",
                "\u{7f}",
                "\u{85}",
                "\u{2028}",
                "\u{2029}",
                "\u{202e}",
                "\u{200b}",
                "\u{feff}",
                "e\u{301}",
                "👩\u{200d}👩\u{200d}👧",
                "\u{10ffff}",
                "\u{fffd}",
                "\\",
                "\"",
                "data: x",
                "event: y",
                ":",
                "é",
                "日本",
                "a",
                " ",
                "%",
                "\u{1}",
                "\u{1b}[0m",
            ]),
            0..12,
        )
        .prop_map(|parts| parts.concat()),
        any::<String>(),
        "[a-z_.\\[\\]0-9]{0,12}",
    ]
}

/// Numbers at the edges: integers of every size, floats huge and tiny, negative zero.
fn odd_number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        prop::sample::select(vec![
            0u64,
            1,
            2,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX
        ])
        .prop_map(Number::from),
        prop::num::f64::ANY.prop_filter_map("finite", Number::from_f64),
        prop::sample::select(vec![
            0.0, -0.0, 0.5, 1.0, 2.0, 2.000001, 1e308, -1e308, 5e-324
        ])
        .prop_filter_map("finite", Number::from_f64),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        odd_number().prop_map(Value::Number),
        odd_string().prop_map(Value::String),
    ]
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((odd_string(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// `value` nested `depth` times in arrays and objects.
fn nested(value: Value, depth: usize, in_objects: bool) -> Value {
    (0..depth).fold(value, |inner, _| {
        if in_objects {
            json!({ "a": inner })
        } else {
            json!([inner])
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Request-shaped values, so that many cases get past the first check.

fn maybe(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop_oneof![6 => value, 1 => any_json()]
}

/// An object with each of `fields` present with its probability, and now and then a field of
/// any name.
fn object(fields: Vec<(&'static str, f64, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let fields: Vec<_> = fields
        .into_iter()
        .map(|(name, p, value)| prop::option::weighted(p, value).prop_map(move |v| (name, v)))
        .collect();
    (
        fields,
        prop::option::weighted(0.03, (odd_string(), any_json())),
    )
        .prop_map(|(fields, extra)| {
            let mut map: Map<String, Value> = fields
                .into_iter()
                .filter_map(|(name, value)| value.map(|v| (name.to_string(), v)))
                .collect();
            if let Some((name, value)) = extra {
                map.insert(name, value);
            }
            Value::Object(map)
        })
        .boxed()
}

/// A string, or now and then any value.
fn text() -> BoxedStrategy<Value> {
    maybe(odd_string().prop_map(Value::String)).boxed()
}

/// One of `words` mostly, or any string, or any value.
fn word(words: &'static [&'static str]) -> BoxedStrategy<Value> {
    maybe(prop_oneof![
        5 => prop::sample::select(words).prop_map(Value::from),
        1 => odd_string().prop_map(Value::String),
    ])
    .boxed()
}

fn flag() -> BoxedStrategy<Value> {
    maybe(any::<bool>().prop_map(Value::Bool)).boxed()
}

fn number() -> BoxedStrategy<Value> {
    maybe(prop_oneof![
        2 => (0.0..=2.0f64).prop_map(Value::from),
        2 => (1u64..5000).prop_map(Value::from),
        1 => odd_number().prop_map(Value::Number),
    ])
    .boxed()
}

fn content_part() -> BoxedStrategy<Value> {
    object(vec![
        (
            "type",
            0.95,
            word(&["input_text", "output_text", "refusal", "input_image"]),
        ),
        ("text", 0.8, text()),
        ("refusal", 0.1, text()),
        ("annotations", 0.1, any_json().boxed()),
    ])
}

fn content() -> BoxedStrategy<Value> {
    maybe(prop_oneof![
        odd_string().prop_map(Value::String),
        prop::collection::vec(content_part(), 0..4).prop_map(Value::Array),
    ])
    .boxed()
}

fn input_item() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => object(vec![
            ("type", 0.5, word(&["message"])),
            ("role", 0.95, word(&["user", "assistant", "system", "developer", "robot"])),
            ("content", 0.95, content()),
            ("id", 0.1, text()),
            ("status", 0.1, text()),
        ]),
        1 => object(vec![
            ("type", 0.95, word(&["function_call"])),
            ("call_id", 0.95, text()),
            ("name", 0.95, text()),
            ("arguments", 0.95, text()),
            ("id", 0.1, text()),
        ]),
        1 => object(vec![
            ("type", 0.95, word(&["function_call_output", "item_reference"])),
            ("call_id", 0.95, text()),
            ("output", 0.95, content()),
        ]),
        1 => any_json(),
    ]
    .boxed()
}

fn tool() -> BoxedStrategy<Value> {
    object(vec![
        ("type", 0.95, word(&["function", "web_search"])),
        ("name", 0.95, word(&["get_weather", "f", "g", "bad name"])),
        ("description", 0.3, text()),
        ("parameters", 0.5, any_json().boxed()),
        ("strict", 0.3, flag()),
    ])
}

/// A body with the API's fields, each present or not, each shaped like its kind or not.
fn request_like() -> impl Strategy<Value = Value> {
    object(vec![
        ("model", 0.95, word(&["mock-1", "m"])),
        (
            "input",
            0.95,
            maybe(prop_oneof![
                odd_string().prop_map(Value::String),
                prop::collection::vec(input_item(), 0..4).prop_map(Value::Array),
            ])
            .boxed(),
        ),
        ("instructions", 0.2, text()),
        ("max_output_tokens", 0.2, number()),
        ("temperature", 0.2, number()),
        ("top_p", 0.2, number()),
        (
            "metadata",
            0.2,
            maybe(
                prop::collection::vec((odd_string(), text()), 0..18)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            )
            .boxed(),
        ),
        ("store", 0.1, flag()),
        ("background", 0.2, flag()),
        ("stream", 0.2, flag()),
        ("user", 0.1, text()),
        ("safety_identifier", 0.05, text()),
        ("prompt_cache_key", 0.05, text()),
        (
            "service_tier",
            0.1,
            word(&["auto", "default", "flex", "scale"]),
        ),
        (
            "tools",
            0.2,
            maybe(prop::collection::vec(tool(), 0..3).prop_map(Value::Array)).boxed(),
        ),
        (
            "tool_choice",
            0.2,
            maybe(prop_oneof![
                prop::sample::select(&["auto", "none", "required", "any"][..])
                    .prop_map(Value::from),
                object(vec![
                    ("type", 0.95, word(&["function", "file_search"])),
                    ("name", 0.9, word(&["get_weather", "f", "g"])),
                ]),
            ])
            .boxed(),
        ),
        ("parallel_tool_calls", 0.1, flag()),
        (
            "text",
            0.2,
            object(vec![
                (
                    "format",
                    0.9,
                    object(vec![
                        (
                            "type",
                            0.95,
                            word(&["text", "json_object", "json_schema", "xml"]),
                        ),
                        ("name", 0.5, word(&["answer", "bad name", ""])),
                        ("schema", 0.5, any_json().boxed()),
                        ("description", 0.1, text()),
                        ("strict", 0.2, flag()),
                    ]),
                ),
                ("verbosity", 0.05, text()),
            ]),
        ),
        (
            "reasoning",
            0.1,
            object(vec![
                ("effort", 0.9, word(&["low", "medium", "high", "max"])),
                ("summary", 0.1, text()),
            ]),
        ),
        ("truncation", 0.1, word(&["disabled", "auto"])),
        ("include", 0.05, any_json().boxed()),
        (
            "stream_options",
            0.05,
            object(vec![("include_obfuscation", 0.9, flag())]),
        ),
        ("previous_response_id", 0.05, text()),
        ("conversation", 0.02, any_json().boxed()),
        ("top_logprobs", 0.02, any_json().boxed()),
    ])
}

// ---------------------------------------------------------------------------------------------
// Where an error's `param` points.

/// The values `path` (`a.b[2].c`) can name in `value`: object keys may themselves hold `.` or
/// `[`, so every way of reading the path is tried. A key's NUL characters may be written
/// `\u0000` (as the parser names them).
fn resolve<'a>(value: &'a Value, path: &str, found: &mut Vec<&'a Value>) {
    if path.is_empty() {
        found.push(value);
        return;
    }
    match value {
        Value::Array(items) => {
            if let Some(rest) = path.strip_prefix('[') {
                if let Some((index, rest)) = rest.split_once(']') {
                    let item = index.parse::<usize>().ok().and_then(|i| items.get(i));
                    if let Some(item) = item {
                        if rest.is_empty() || rest.starts_with('[') {
                            resolve(item, rest, found);
                        } else if let Some(rest) = rest.strip_prefix('.') {
                            resolve(item, rest, found);
                        }
                    }
                }
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields {
                for written in [key.clone(), key.replace('\0', "\\u0000")] {
                    if let Some(rest) = path.strip_prefix(written.as_str()) {
                        if rest.is_empty() || rest.starts_with('[') {
                            resolve(field, rest, found);
                        } else if let Some(rest) = rest.strip_prefix('.') {
                            resolve(field, rest, found);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Whether `param` names a place in `input`: a value there, or a member missing (or null) in an
/// object there (`Missing required parameter`).
fn names_a_place(input: &Value, param: &str) -> bool {
    let mut found = Vec::new();
    resolve(input, param, &mut found);
    if !found.is_empty() {
        return true;
    }
    // A missing member: the last `.name` (or the whole path, at the top) is absent. The parser
    // only ever misses fields it requires, whose names are plain words.
    let splits = param
        .match_indices('.')
        .map(|(i, _)| (&param[..i], &param[i + 1..]))
        .chain([("", param)])
        .filter(|(_, name)| name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    for (parent, name) in splits {
        let mut parents = Vec::new();
        resolve(input, parent, &mut parents);
        if parents
            .iter()
            .any(|p| p.is_object() && p.get(name).is_none_or(Value::is_null))
        {
            return true;
        }
    }
    false
}

#[test]
fn a_place_is_a_value_there_or_a_member_missing_there() {
    let body = json!({"model": "m", "input": [{"role": "user", "content": [{"type": "x"}]}],
                      "metadata": {"a.b": "v", "k\u{0}": "w"}, "stream": null});
    for there in [
        "model",
        "input[0].content[0].type",
        "input[0].content[0].text",
        "input[0].type",
        "metadata.a.b",
        "metadata.k\\u0000",
        "stream",
        "tools",
    ] {
        assert!(names_a_place(&body, there), "{there}");
    }
    for nowhere in [
        "input[1]",
        "input[0]x",
        "input[0].content[0].type.x",
        "metadata.a.b.c",
        "models.x",
        "tools[0]",
        "input.0",
    ] {
        assert!(!names_a_place(&body, nowhere), "{nowhere}");
    }
}

fn check_outcome(input: &Value, outcome: &Result<CreateResponse, InvalidRequest>) {
    if let Err(e) = outcome {
        assert!(!e.message.is_empty());
        if let Some(param) = &e.param {
            assert!(
                names_a_place(input, param),
                "param {param:?} names nothing in {input}\n({})",
                e.message
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn any_json_value_parses_or_names_its_fault(value in any_json()) {
        let outcome = CreateResponse::from_value(&value);
        check_outcome(&value, &outcome);
    }

    #[test]
    fn request_like_values_parse_or_name_their_fault(value in request_like()) {
        let outcome = CreateResponse::from_value(&value);
        check_outcome(&value, &outcome);
        // A body is the same request read from its bytes, save that NUL is refused there.
        // (Compared with the value read back from the text: serde_json, without its
        // `float_roundtrip` feature, may read a float's shortest text one ulp away.)
        let text = value.to_string();
        let read_back: Value = serde_json::from_str(&text).unwrap();
        let outcome = CreateResponse::from_value(&read_back);
        match (&outcome, &CreateResponse::parse(text.as_bytes())) {
            (Ok(request), Ok((again, stored))) => {
                prop_assert_eq!(request, again);
                prop_assert_eq!(stored, &read_back);
            }
            (_, Err(e)) => check_outcome(&read_back, &Err(e.clone())),
            (Err(e), Ok(_)) => prop_assert!(false, "refused as a value, accepted as bytes: {e:?}"),
        }
    }

    #[test]
    fn deep_nesting_is_refused_or_read_without_overflow(
        depth in 0usize..400,
        in_objects in any::<bool>(),
        at in prop::sample::select(vec!["input", "metadata", "tools", "tool_choice", "text",
                                        "parameters", "schema", "include", "colour"]),
    ) {
        let deep = nested(json!("x"), depth, in_objects);
        let body = match at {
            "parameters" => json!({"model": "m", "input": "x",
                "tools": [{"type": "function", "name": "f", "parameters": {"p": deep}}]}),
            "schema" => json!({"model": "m", "input": "x",
                "text": {"format": {"type": "json_schema", "name": "s", "schema": {"s": deep}}}}),
            field => json!({"model": "m", "input": "x", field: deep}),
        };
        let outcome = CreateResponse::from_value(&body);
        check_outcome(&body, &outcome);
        // serde_json stops at 128 levels: deeper bodies are malformed JSON (param null).
        match CreateResponse::parse(body.to_string().as_bytes()) {
            Ok(_) => prop_assert!(outcome.is_ok()),
            Err(e) => check_outcome(&body, &Err(e)),
        }
    }

    #[test]
    fn odd_bodies_are_refused_without_a_panic(
        number in prop::sample::select(vec![
            "1e400", "-1e400", "1e-400", "123456789012345678901234567890", "-0", "0.0",
            "4294967296", "18446744073709551616", "-9223372036854775809", "1E2", "0e0",
            "2.0000000000000000001",
        ]),
        field in prop::sample::select(vec!["max_output_tokens", "temperature", "top_p",
                                           "metadata", "model"]),
        junk in prop::collection::vec(any::<u8>(), 0..64),
        escape in prop::sample::select(vec!["\\u0000", "\\ud800", "\\udc00x", "\\ud83d\\ude00",
                                            "\\uFFFF", "\\/", "\\x", "\u{7f}"]),
    ) {
        let body = format!(r#"{{"model":"m","input":"x","{field}":{number}}}"#);
        if let Err(e) = CreateResponse::parse(body.as_bytes()) {
            if let Ok(value) = serde_json::from_str::<Value>(&body) {
                check_outcome(&value, &Err(e));
            }
        }
        let body = format!(r#"{{"model":"m","input":"a{escape}b","metadata":{{"k{escape}":"v"}}}}"#);
        if let Err(e) = CreateResponse::parse(body.as_bytes()) {
            if let Ok(value) = serde_json::from_str::<Value>(&body) {
                check_outcome(&value, &Err(e));
            }
        }
        let _ = CreateResponse::parse(&junk);
    }
}

// ---------------------------------------------------------------------------------------------
// The stream's encoder.

/// What a worker may have written: text deltas, function calls and their arguments (through the
/// worker's shaper), or any sequence of pieces at all (a broken row).
#[derive(Debug, Clone)]
enum Chunk {
    Text(String),
    Call(String, String),
    Arguments(String),
}

fn chunks() -> impl Strategy<Value = Vec<Chunk>> {
    prop::collection::vec(
        prop_oneof![
            4 => odd_string().prop_map(Chunk::Text),
            1 => (odd_string(), odd_string()).prop_map(|(id, name)| Chunk::Call(id, name)),
            2 => odd_string().prop_map(Chunk::Arguments),
        ],
        0..24,
    )
}

fn shaped(chunks: &[Chunk]) -> Vec<Piece> {
    let mut shaper = Shaper::default();
    let mut pieces = Vec::new();
    for chunk in chunks.iter().cloned() {
        match chunk {
            Chunk::Text(text) => shaper.text(text, &mut pieces),
            Chunk::Call(id, name) => shaper.call(id, name, &mut pieces),
            Chunk::Arguments(arguments) => {
                shaper.arguments(arguments, &mut pieces);
            }
        }
    }
    pieces
}

fn any_piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        Just(Piece::MessageAdded),
        Just(Piece::PartAdded),
        odd_string().prop_map(Piece::Text),
        Just(Piece::TextDone),
        Just(Piece::PartDone),
        (odd_string(), odd_string()).prop_map(|(call_id, name)| Piece::CallAdded { call_id, name }),
        odd_string().prop_map(Piece::Arguments),
        Just(Piece::ArgumentsDone),
        Just(Piece::ItemDone),
    ]
}

fn status() -> impl Strategy<Value = JobStatus> {
    prop::sample::select(vec![
        JobStatus::Queued,
        JobStatus::InProgress,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Incomplete,
        JobStatus::Cancelled,
    ])
}

fn job(status: JobStatus, attempt: i32, instructions: &str, error: &str) -> JobRow {
    let finished = status.is_terminal();
    JobRow {
        id: JobId::new(),
        key_id: KeyId(uuid::Uuid::nil()),
        model: "mock-1".into(),
        status,
        request: Json(
            json!({"model": "mock-1", "input": "x", "instructions": instructions,
                             "metadata": {"k": instructions}}),
        ),
        output_text: String::new(),
        input_tokens: finished.then_some(3),
        output_tokens: finished.then_some(5),
        reasoning_tokens: None,
        history: None,
        previous_response_id: None,
        cost_micro_usd: None,
        usage_estimated: None,
        incomplete_reason: (status == JobStatus::Incomplete).then(|| "max_output_tokens".into()),
        error: (status == JobStatus::Failed)
            .then(|| Json(json!({"code": "server_error", "message": error}))),
        attempt,
        created_at: Utc::now(),
        started_at: None,
        finished_at: None,
    }
}

/// The events as the stream sends them: the bytes of the SSE body.
fn encode(events: &[StreamEvent]) -> String {
    let frames: Vec<_> = events
        .iter()
        .map(|e| Ok::<_, std::convert::Infallible>(e.to_sse()))
        .collect();
    let response = Sse::new(stream::iter(frames)).into_response();
    let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
        .unwrap();
    String::from_utf8(body.to_vec()).expect("SSE is UTF-8")
}

/// Reads an SSE body back as a client does, asserting it is well framed: `event: <type>` then
/// one `data: <json>` line per event, a blank line after each. Returns (type, data) per event.
fn decode(body: &str) -> Vec<(String, Value)> {
    assert!(body.is_empty() || body.ends_with("\n\n"), "{body:?}");
    let mut events = Vec::new();
    for frame in body.split_terminator("\n\n") {
        let lines: Vec<&str> = frame.split('\n').collect();
        assert_eq!(
            lines.len(),
            2,
            "one event line and one data line: {frame:?}"
        );
        let kind = lines[0].strip_prefix("event: ").expect("an event line");
        let data = lines[1].strip_prefix("data: ").expect("a data line");
        for line in [kind, data] {
            assert!(!line.contains('\r'), "no carriage return: {line:?}");
        }
        let data: Value = serde_json::from_str(data).expect("data is JSON");
        assert!(data.is_object());
        assert_eq!(data["type"], kind);
        events.push((kind.to_string(), data));
    }
    events
}

/// Checks the events of one read from `next` on: framed, numbered `next`, `next + 1`, …, with
/// the numbers in the data, and the terminal event last of a complete stream.
fn check_read(events: &[StreamEvent], next: u64, complete: bool) {
    let decoded = decode(&encode(events));
    assert_eq!(decoded.len(), events.len());
    for (i, ((kind, data), event)) in decoded.iter().zip(events).enumerate() {
        assert_eq!(event.sequence_number, next + i as u64);
        assert_eq!(data["sequence_number"], event.sequence_number);
        assert_eq!(kind, event.kind);
        assert_eq!(data, &event.data, "the data round-trips");
    }
    let terminal: HashSet<&str> = [
        "response.completed",
        "response.failed",
        "response.incomplete",
        "response.cancelled",
    ]
    .into();
    for (i, (kind, _)) in decoded.iter().enumerate() {
        if terminal.contains(kind.as_str()) {
            assert_eq!(i, decoded.len() - 1, "the terminal event is the last");
            assert!(complete);
        }
    }
}

fn read_all(job: &JobRow, pieces: &[Piece], next: u64) -> (Vec<StreamEvent>, bool) {
    let read = AttemptPieces {
        pieces: pieces.to_vec(),
        total: pieces.len(),
    };
    StreamEvent::from_rows(job, &mut Output::default(), &read, next)
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn shaped_output_streams_as_well_framed_sse(
        chunks in chunks(),
        status in status(),
        attempt in 0i32..3,
        next in 0u64..40,
        instructions in odd_string(),
        error in odd_string(),
    ) {
        let job = job(status, attempt, &instructions, &error);
        let pieces = if attempt == 0 { Vec::new() } else { shaped(&chunks) };
        let (all, complete) = read_all(&job, &pieces, 0);
        check_read(&all, 0, complete);
        prop_assert_eq!(complete, status.is_terminal());
        // The text deltas carry the texts exactly, in order.
        let deltas: String = all
            .iter()
            .filter(|e| e.kind == "response.output_text.delta")
            .map(|e| e.data["delta"].as_str().unwrap().to_string())
            .collect();
        let texts: String = pieces
            .iter()
            .filter_map(|p| match p { Piece::Text(t) => Some(t.as_str()), _ => None })
            .collect();
        prop_assert_eq!(deltas, texts);
        // Resuming anywhere gives the rest of the same events.
        let (rest, _) = read_all(&job, &pieces, next);
        check_read(&rest, next, complete);
        prop_assert_eq!(&rest[..], &all[(next as usize).min(all.len())..]);
    }

    #[test]
    fn any_pieces_stream_as_well_framed_sse(
        pieces in prop::collection::vec(any_piece(), 0..24),
        status in status(),
        split in 0usize..24,
    ) {
        // A job whose rows grew in two reads, then finished with `status`.
        let running = JobRow { status: JobStatus::InProgress, ..job(status, 1, "", "") };
        let finished = JobRow { status, ..running.clone() };
        let split = split.min(pieces.len());
        let mut output = Output::default();
        let first = AttemptPieces { pieces: pieces[..split].to_vec(), total: split };
        let (mut seen, _) = StreamEvent::from_rows(&running, &mut output, &first, 0);
        check_read(&seen, 0, false);
        let next = seen.last().map_or(0, |e| e.sequence_number + 1);
        let second = AttemptPieces { pieces: pieces[split..].to_vec(), total: pieces.len() };
        let (rest, complete) = StreamEvent::from_rows(&finished, &mut output, &second, next);
        check_read(&rest, next, complete);
        seen.extend(rest);
        let (all, _) = read_all(&finished, &pieces, 0);
        let kinds = |events: &[StreamEvent]| events.iter().map(|e| e.kind).collect::<Vec<_>>();
        prop_assert_eq!(kinds(&seen), kinds(&all));
        prop_assert_eq!(seen.last(), all.last());
    }
}

/// The request-like values reach the parser's every check: a fair share of them are accepted,
/// and the rest are refused at many different fields.
#[test]
fn request_like_values_reach_deep_into_the_parser() {
    use proptest::{strategy::ValueTree, test_runner::TestRunner};
    let mut runner = TestRunner::deterministic();
    let (mut accepted, mut params) = (0, HashSet::new());
    for _ in 0..1000 {
        let value = request_like().new_tree(&mut runner).unwrap().current();
        match CreateResponse::from_value(&value) {
            Ok(_) => accepted += 1,
            Err(e) => {
                params.insert(
                    e.param
                        .unwrap_or_default()
                        .replace(|c: char| c.is_ascii_digit(), ""),
                );
            }
        }
    }
    assert!(accepted >= 30, "only {accepted} of 1000 accepted");
    assert!(
        params.len() >= 30,
        "refusals at only {} places: {params:?}",
        params.len()
    );
}
