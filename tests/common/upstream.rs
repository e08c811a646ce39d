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
}

#[derive(Clone)]
struct Shared {
    script: Script,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl FakeUpstream {
    pub async fn start(script: Script) -> Self {
        let shared = Shared {
            script,
            calls: Arc::new(AtomicUsize::new(0)),
            bodies: Arc::new(Mutex::new(Vec::new())),
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
        }
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
    shared.calls.fetch_add(1, Ordering::SeqCst);
    shared.bodies.lock().unwrap().push(body);
    match shared.script {
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
