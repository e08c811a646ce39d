//! A fake LLM upstream: a real HTTP server on port 0 that answers the three wire formats tollgate
//! speaks — `POST /v1/chat/completions`, `/v1/messages` (Anthropic) and `/v1/responses` — with
//! scripted answers: recorded streams from `tests/fixtures/`, generated chat streams, errors,
//! delays and hostile bodies. It records every request (path, query, headers, body, time).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use futures::StreamExt;
use serde_json::{json, Value};

/// What the fake answers.
#[derive(Clone, Debug)]
pub enum Script {
    /// Chat completions: streams these deltas, then a usage chunk with these counts, then `[DONE]`.
    Stream {
        deltas: Vec<String>,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// Answers with this HTTP status and an OpenAI error body.
    Status(u16),
    /// Answers with this HTTP status, an error body and this `Retry-After` header.
    StatusRetryAfter(u16, &'static str),
    /// Chat completions: streams `deltas` deltas ("w0 ", "w1 ", …), one every `delay_ms`, then
    /// usage and `[DONE]`. Notes when the client goes away before the end.
    Slow { deltas: usize, delay_ms: u64 },
    /// A recorded stream: the file `tests/fixtures/<path>`, sent in small pieces.
    Fixture(&'static str),
    /// Exactly these bytes, as an event stream.
    Raw(String),
    /// An event stream whose one `data:` line is `bytes` long and never ends.
    HugeEvent { bytes: usize },
    /// This status with an error body `bytes` long.
    HugeError { status: u16, bytes: usize },
    /// Waits this long before sending the headers of `then`'s answer.
    DelayHeaders { delay_ms: u64, then: Box<Script> },
    /// The n-th call gets the n-th script; calls past the end get the last one.
    Sequence(Vec<Script>),
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `chat/completions`, `messages` or `responses`.
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Value,
    pub at: Instant,
}

#[derive(Clone)]
struct Shared {
    script: Script,
    calls: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    hangups: Arc<Mutex<Vec<Instant>>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    hangups: Arc<Mutex<Vec<Instant>>>,
}

/// Notes the time its stream was dropped, unless it ran to the end.
struct HangupGuard {
    finished: bool,
    hangups: Arc<Mutex<Vec<Instant>>>,
}

impl HangupGuard {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for HangupGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.hangups.lock().unwrap().push(Instant::now());
        }
    }
}

impl FakeUpstream {
    pub async fn start(script: Script) -> Self {
        let shared = Shared {
            script,
            calls: Arc::new(AtomicUsize::new(0)),
            requests: Arc::default(),
            hangups: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/{*path}", post(answer))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            addr,
            calls: shared.calls,
            requests: shared.requests,
            hangups: shared.hangups,
        }
    }

    /// When clients went away before the end of a slow stream.
    pub fn hangups(&self) -> Vec<Instant> {
        self.hangups.lock().unwrap().clone()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.requests().into_iter().map(|r| r.body).collect()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

async fn answer(
    State(shared): State<Shared>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let call = shared.calls.fetch_add(1, Ordering::SeqCst);
    shared.requests.lock().unwrap().push(Recorded {
        path,
        query: url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect(),
        headers,
        body,
        at: Instant::now(),
    });
    let mut script = shared.script.clone();
    loop {
        match script {
            Script::Sequence(scripts) => script = scripts[call.min(scripts.len() - 1)].clone(),
            Script::DelayHeaders { delay_ms, then } => {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                script = *then;
            }
            other => return respond(other, &shared),
        }
    }
}

fn event_stream(body: Body) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// Bytes sent in 7-byte pieces, so the client's SSE parser sees events split across reads.
fn in_pieces(text: String) -> Body {
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = text
        .into_bytes()
        .chunks(7)
        .map(|c| Ok(c.to_vec()))
        .collect();
    Body::from_stream(futures::stream::iter(pieces))
}

pub fn fixture(path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn respond(script: Script, shared: &Shared) -> Response {
    match script {
        Script::Sequence(_) | Script::DelayHeaders { .. } => unreachable!(),
        Script::Slow { deltas, delay_ms } => {
            let guard = HangupGuard {
                finished: false,
                hangups: shared.hangups.clone(),
            };
            event_stream(Body::from_stream(slow_stream(deltas, delay_ms, guard)))
        }
        Script::Status(code) => error_answer(code, None),
        Script::StatusRetryAfter(code, after) => error_answer(code, Some(after)),
        Script::Fixture(path) => event_stream(in_pieces(fixture(path))),
        Script::Raw(text) => event_stream(in_pieces(text)),
        Script::HugeEvent { bytes } => {
            let head = futures::stream::once(async { Ok(b"data: ".to_vec()) });
            event_stream(Body::from_stream(head.chain(filler(bytes))))
        }
        Script::HugeError { status, bytes } => Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from_stream(filler(bytes)))
            .unwrap(),
        Script::Stream {
            deltas,
            prompt_tokens,
            completion_tokens,
        } => {
            let mut text = String::new();
            for d in &deltas {
                let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": null}],
                    "usage": null});
                text.push_str(&format!("data: {chunk}\n\n"));
            }
            let stop = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null});
            let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}});
            text.push_str(&format!(
                "data: {stop}\n\ndata: {usage}\n\ndata: [DONE]\n\n"
            ));
            event_stream(in_pieces(text))
        }
    }
}

/// `bytes` bytes of `x`, 64 KiB at a time, generated as they are sent.
fn filler(bytes: usize) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    const PIECE: usize = 64 * 1024;
    futures::stream::iter((0..bytes.div_ceil(PIECE)).map(move |i| {
        let len = PIECE.min(bytes - i * PIECE);
        Ok(vec![b'x'; len])
    }))
}

fn error_answer(code: u16, retry_after: Option<&str>) -> Response {
    let mut response = (
        StatusCode::from_u16(code).unwrap(),
        Json(json!({"error": {"message": format!("scripted {code}"), "type": "server_error"}})),
    )
        .into_response();
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", after.parse().unwrap());
    }
    response
}

/// The events of a slow stream, one every `delay_ms`. The guard travels in the stream's state:
/// dropped early (the client went away), it notes the hangup.
fn slow_stream(
    deltas: usize,
    delay_ms: u64,
    guard: HangupGuard,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    futures::stream::unfold((0usize, guard), move |(i, guard)| async move {
        if i > deltas {
            guard.finish();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let text = if i == deltas {
            let usage =
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": deltas}});
            format!("data: {usage}\n\ndata: [DONE]\n\n")
        } else {
            let chunk = json!({"choices": [{"index": 0, "delta": {"content": format!("w{i} ")}}]});
            format!("data: {chunk}\n\n")
        };
        Some((Ok(text.into_bytes()), (i + 1, guard)))
    })
}
