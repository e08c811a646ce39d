//! The connection layer under slow and greedy clients, on raw connections: a head sent a byte at
//! a time, a body shorter than its `Content-Length`, idle keep-alive connections and silent ones
//! are cut within the configured timeouts while other clients are served, and so is a client that
//! reads none of its answers; the connection cap holds; keep-alive and pipelining work; an event
//! stream outlives every timeout; shutdown lets the request in progress finish.

mod common;

use std::time::Duration;

use common::{http_request, isolated_config, read_response, TestEnv};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tollgate::config::{Config, ModelConfig};

fn config(header_ms: u64, body_ms: u64, idle_ms: u64) -> Config {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.header_read_timeout_ms = header_ms;
    config.server.body_read_timeout_ms = body_ms;
    config.server.idle_timeout_ms = idle_ms;
    config
}

/// Reads until the server closes the connection (or `within` passes: a failure); returns what
/// was read and when it closed.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Instant) {
    let mut read = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection in time");
    (read, closed)
}

/// Keeps asking `/healthz` on fresh connections until `stop`; each must answer 200 within a
/// second. Returns how many did.
async fn served_meanwhile(env: &TestEnv, stop: Instant) -> usize {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut served = 0;
    while Instant::now() < stop {
        let resp = tokio::time::timeout(
            Duration::from_secs(1),
            client.get(env.url("/healthz")).send(),
        )
        .await
        .expect("served at once while slow clients hang on")
        .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    served
}

fn is_408_in_openai_shape(answer: &[u8]) {
    let text = String::from_utf8_lossy(answer);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole answer");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    for field in ["message", "param", "code"] {
        assert!(body["error"].get(field).is_some(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_in_time_while_others_are_served() {
    let (header, body, idle) = (2_000, 1_500, 1_500);
    let env = TestEnv::front_with(config(header, body, idle)).await;
    let key = env.key().await;
    let ms = Duration::from_millis;
    let slack = ms(1_000);
    let start = Instant::now();

    // A slowloris: one byte of its head a second.
    let slowloris = tokio::spawn({
        let addr = env.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let opened = Instant::now();
            let head =
                b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\nx-slow: aaaaaaaaaaaaaaaa\r\n\r\n";
            let mut answer = Vec::new();
            for byte in head {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 4096];
                match tokio::time::timeout(ms(1_000), stream.read(&mut buf)).await {
                    Err(_) => continue,
                    Ok(Ok(n)) if n > 0 => {
                        answer.extend_from_slice(&buf[..n]);
                        break;
                    }
                    Ok(_) => break,
                }
            }
            let (rest, closed) = until_closed(&mut stream, ms(5_000)).await;
            answer.extend_from_slice(&rest);
            (answer, closed - opened)
        }
    });
    // A connection that says nothing.
    let silent = tokio::spawn({
        let addr = env.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let opened = Instant::now();
            let (read, closed) = until_closed(&mut stream, ms(5_000)).await;
            (read, closed - opened)
        }
    });
    // A kept-alive connection that asks once, then idles.
    let idler = tokio::spawn({
        let addr = env.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\n\r\n")
                .await
                .unwrap();
            let answer = read_response(&mut stream).await.expect("an answer");
            let answered = Instant::now();
            let (rest, closed) = until_closed(&mut stream, ms(5_000)).await;
            (answer.status, rest, closed - answered)
        }
    });
    // A body shorter than its Content-Length.
    let short_body = tokio::spawn({
        let addr = env.addr;
        let auth = format!("Bearer {key}");
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = http_request(
                "POST",
                "/v1/responses",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                    ("content-length", "100"),
                ],
                b"",
            );
            stream.write_all(&head).await.unwrap();
            stream.write_all(b"{\"model\": ").await.unwrap();
            let sent = Instant::now();
            let (answer, closed) = until_closed(&mut stream, ms(5_000)).await;
            (answer, closed - sent)
        }
    });
    let before = env.snapshot().await;

    let served = served_meanwhile(&env, start + ms(header + 1_000)).await;
    assert!(served >= 5, "{served} requests served meanwhile");

    let (answer, lasted) = slowloris.await.unwrap();
    is_408_in_openai_shape(&answer);
    assert!(
        lasted >= ms(header) - ms(100) && lasted <= ms(header) + slack,
        "slowloris cut after {lasted:?}"
    );
    let (read, lasted) = silent.await.unwrap();
    assert!(read.is_empty(), "{}", String::from_utf8_lossy(&read));
    assert!(
        lasted >= ms(header) - ms(100) && lasted <= ms(header) + slack,
        "silent connection cut after {lasted:?}"
    );
    let (status, rest, lasted) = idler.await.unwrap();
    assert_eq!(status, 200);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        lasted >= ms(idle) - ms(100) && lasted <= ms(idle) + slack,
        "idle connection cut after {lasted:?}"
    );
    let (answer, lasted) = short_body.await.unwrap();
    is_408_in_openai_shape(&answer);
    assert!(
        lasted >= ms(body) - ms(100) && lasted <= ms(body) + slack,
        "short body cut after {lasted:?}"
    );
    assert_eq!(
        env.snapshot().await,
        before,
        "a cut request wrote something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds() {
    let mut config = config(1_500, 10_000, 10_000);
    config.server.max_connections = 2;
    let env = TestEnv::front_with(config).await;
    // Two silent connections take both places...
    let mut first = TcpStream::connect(env.addr).await.unwrap();
    let mut second = TcpStream::connect(env.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a third waits in the backlog, its request unanswered...
    let mut third = TcpStream::connect(env.addr).await.unwrap();
    third
        .write_all(&http_request("GET", "/healthz", &[], b""))
        .await
        .unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(800), read_response(&mut third)).await;
    assert!(waiting.is_err(), "answered past the cap: {waiting:?}");
    // ...until the silent ones are cut, then it is served.
    let answer = tokio::time::timeout(Duration::from_secs(3), read_response(&mut third))
        .await
        .expect("served once a place is free")
        .expect("an answer");
    assert_eq!(answer.status, 200);
    for stream in [&mut first, &mut second] {
        let (read, _) = until_closed(stream, Duration::from_secs(1)).await;
        assert!(read.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_pipelining_serve_every_request_in_order() {
    let env = TestEnv::front_with(config(1_000, 1_000, 1_000)).await;
    // Three requests in one write, the last closing the connection.
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    let mut requests = Vec::new();
    for path in ["/healthz", "/v1/nothing", "/healthz"] {
        requests
            .extend_from_slice(format!("GET {path} HTTP/1.1\r\nhost: tollgate\r\n\r\n").as_bytes());
    }
    requests.extend_from_slice(&http_request("GET", "/openapi.json", &[], b""));
    stream.write_all(&requests).await.unwrap();
    let (read, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&read);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200", "200"], "{text}");

    // One kept-alive connection, many requests one after the other, each under the timeouts.
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    for _ in 0..5 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut stream).await.expect("an answer");
        assert_eq!(answer.status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_outlives_every_timeout() {
    let mut env = TestEnv::front_with(config(300, 300, 300)).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "wait for me").await;
    // Following a queued job: its first events, then silence until a worker takes it.
    let followed = env
        .http
        .get(env.url(&format!("/v1/responses/{id}?stream=true")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(followed.status(), StatusCode::OK);
    let created = env
        .http
        .post(env.url("/v1/responses"))
        .bearer_auth(&key)
        .json(&json!({"model": "mock-1", "input": "and me", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.start_worker();
    for resp in [followed, created] {
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(
                    &chunk.expect("the stream goes on"),
                ));
                if text.contains("event: response.completed") {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the stream ends");
        assert!(ended, "the stream was cut: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_requests_in_progress_finish_and_idle_connections_close() {
    let env = TestEnv::front_with(config(5_000, 5_000, 30_000)).await;
    let key = env.key().await;
    let mut idle = TcpStream::connect(env.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut idle).await.expect("an answer").status,
        200
    );
    // A synchronous request waits for its job, which no worker runs.
    let waiting = tokio::spawn({
        let (client, url) = (env.http.clone(), env.url("/v1/responses"));
        async move {
            let resp = client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "mock-1", "input": "hi"}))
                .send()
                .await
                .unwrap();
            (
                resp.status(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    });
    env.wait_for(Duration::from_secs(5), || async {
        env.snapshot().await.jobs == 1
    })
    .await;
    env.stop_front();
    // The idle connection closes at once...
    let (read, _) = until_closed(&mut idle, Duration::from_secs(2)).await;
    assert!(read.is_empty());
    // ...the request in progress is answered (the job as it stands)...
    let (status, job) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered at shutdown")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "queued");
    // ...and no new connection is taken.
    tokio::time::sleep(Duration::from_millis(200)).await;
    match TcpStream::connect(env.addr).await {
        Err(_) => {}
        Ok(mut late) => {
            let _ = late
                .write_all(&http_request("GET", "/healthz", &[], b""))
                .await;
            let (read, _) = until_closed(&mut late, Duration::from_secs(2)).await;
            assert!(read.is_empty(), "{}", String::from_utf8_lossy(&read));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_none_of_its_answers_is_cut() {
    let idle = 1_000;
    let env = TestEnv::front_with(config(5_000, 5_000, idle)).await;
    let one = b"GET /openapi.json HTTP/1.1\r\nhost: tollgate\r\n\r\n";
    let size = reqwest::get(env.url("/openapi.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    // Far more answers than the sockets' buffers hold, asked for at once and never read.
    let count = 64 * 1024 * 1024 / size + 1;
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let requests = one.repeat(count);
    let _ = tokio::time::timeout(Duration::from_secs(3), writer.write_all(&requests)).await;
    tokio::time::sleep(Duration::from_millis(idle + 1_500)).await;
    // Cut: what was written before reads back, then the end, well short of every answer.
    let mut read = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 {
                break;
            }
            read += n;
        }
    })
    .await
    .expect("the connection was cut");
    assert!(read < count * size / 2, "{read} of {} bytes", count * size);
}
