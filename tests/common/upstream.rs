//! A fake OpenAI-compatible upstream: a real HTTP server on port 0 serving
//! `POST /v1/chat/completions` with `stream: true`, answering with scripted SSE chunks.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde_json::{json, Value};

/// What the fake answers.
#[derive(Clone, Debug)]
pub enum Script {
    /// Streams these deltas, then a usage chunk with these counts, then `[DONE]`.
    Stream {
        deltas: Vec<String>,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// Answers with this HTTP status and an OpenAI error body.
    Status(u16),
    /// Streams `deltas` deltas ("w0 ", "w1 ", …), one every `delay_ms`, then usage and `[DONE]`.
    /// Notes when the client goes away before the end.
    Slow { deltas: usize, delay_ms: u64 },
    /// The n-th call gets the n-th script; calls past the end get the last one.
    Sequence(Vec<Script>),
}

#[derive(Clone)]
struct Shared {
    script: Script,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
    hangups: Arc<Mutex<Vec<std::time::Instant>>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
    hangups: Arc<Mutex<Vec<std::time::Instant>>>,
}

/// Notes the time its stream was dropped, unless it ran to the end.
struct HangupGuard {
    finished: bool,
    hangups: Arc<Mutex<Vec<std::time::Instant>>>,
}

impl HangupGuard {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for HangupGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.hangups.lock().unwrap().push(std::time::Instant::now());
        }
    }
}

impl FakeUpstream {
    pub async fn start(script: Script) -> Self {
        let shared = Shared {
            script,
            calls: Arc::new(AtomicUsize::new(0)),
            bodies: Arc::new(Mutex::new(Vec::new())),
            hangups: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            addr,
            calls: shared.calls,
            bodies: shared.bodies,
            hangups: shared.hangups,
        }
    }

    /// When clients went away before the end of a slow stream.
    pub fn hangups(&self) -> Vec<std::time::Instant> {
        self.hangups.lock().unwrap().clone()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

async fn chat(State(shared): State<Shared>, Json(body): Json<Value>) -> Response {
    let call = shared.calls.fetch_add(1, Ordering::SeqCst);
    shared.bodies.lock().unwrap().push(body);
    let mut script = shared.script.clone();
    while let Script::Sequence(scripts) = script {
        script = scripts[call.min(scripts.len() - 1)].clone();
    }
    match script {
        Script::Sequence(_) => unreachable!(),
        Script::Slow { deltas, delay_ms } => {
            let guard = HangupGuard {
                finished: false,
                hangups: shared.hangups.clone(),
            };
            let stream = slow_stream(deltas, delay_ms, guard);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Script::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({"error": {"message": format!("scripted {code}"), "type": "server_error"}})),
        )
            .into_response(),
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
            let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}});
            text.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
            // Sent in small pieces so the client's SSE parser sees events split across reads.
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> = text
                .into_bytes()
                .chunks(7)
                .map(|c| Ok(c.to_vec()))
                .collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(futures::stream::iter(pieces)))
                .unwrap()
        }
    }
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
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
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
