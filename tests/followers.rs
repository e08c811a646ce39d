//! The cap on live event streams per key (`server.max_followers_per_key`): streams past it are
//! refused with 429 `too_many_streams` and write nothing, and a stream gives its place back when
//! its client goes away or the stream ends.

mod common;

use std::time::{Duration, Instant};

use common::{isolated_config, TestEnv};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use tollgate::config::ModelConfig;

const MAX: usize = 3;

/// A front (no worker: jobs stay queued, so their streams stay open) allowing `MAX` streams a key.
async fn env() -> TestEnv {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.max_followers_per_key = MAX;
    TestEnv::front_with(config).await
}

async fn follow(env: &TestEnv, key: &str, id: &str) -> Response {
    env.http
        .get(env.url(&format!("/v1/responses/{id}?stream=true")))
        .bearer_auth(key)
        .send()
        .await
        .expect("front answers")
}

async fn create_streaming(env: &TestEnv, key: &str) -> Response {
    env.http
        .post(env.url("/v1/responses"))
        .bearer_auth(key)
        .json(&json!({"model": "mock-1", "input": "hi", "stream": true}))
        .send()
        .await
        .expect("front answers")
}

/// Asserts a response is the 429 of a stream past the cap, in OpenAI's error shape.
async fn assert_refused(response: Response) {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = response.json().await.expect("JSON body");
    let error = &body["error"];
    assert_eq!(error["code"], "too_many_streams", "{body}");
    assert_eq!(error["type"], "requests");
    assert_eq!(error["param"], Value::Null);
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains(&MAX.to_string()));
}

/// Reads a stream until it has sent `n` events.
async fn read_events(response: &mut Response, n: usize) {
    let mut text = String::new();
    while text.matches("\n\n").count() < n {
        let chunk = response.chunk().await.unwrap().expect("the stream goes on");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_cap_are_refused_until_one_closes() {
    let env = env().await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "follow me").await;

    let mut open = Vec::new();
    for _ in 0..MAX {
        let mut stream = follow(&env, &key, &id).await;
        assert_eq!(stream.status(), StatusCode::OK);
        read_events(&mut stream, 2).await;
        open.push(stream);
    }

    // Past the cap: a follower, and a create with `stream: true`, which writes nothing.
    assert_refused(follow(&env, &key, &id).await).await;
    let before = env.snapshot().await;
    let rejections = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tollgate.rejections")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let rejected_before = rejections().await;
    assert_refused(create_streaming(&env, &key).await).await;
    assert_eq!(
        env.snapshot().await,
        before,
        "a refused stream writes nothing"
    );
    assert_eq!(rejections().await, rejected_before);

    // The cap is per key.
    let other = env.key().await;
    let other_id = env.submit_ok(&other, "mock-1", "mine").await;
    assert_eq!(
        follow(&env, &other, &other_id).await.status(),
        StatusCode::OK
    );

    // Polling is not a stream.
    assert_eq!(env.get(&key, &id).await.0, StatusCode::OK);

    // A client that goes away gives its place back.
    drop(open.pop());
    let started = Instant::now();
    let mut replacement = loop {
        let response = create_streaming(&env, &key).await;
        if response.status() == StatusCode::OK {
            break response;
        }
        assert_refused(response).await;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the closed stream's place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("place given back after {:?}", started.elapsed());
    read_events(&mut replacement, 2).await;
    // The create took the freed place: the cap is reached again.
    assert_refused(follow(&env, &key, &id).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_gives_its_place_back() {
    let env = env().await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "follow me").await;
    let mut open = Vec::new();
    for _ in 0..MAX {
        let stream = follow(&env, &key, &id).await;
        assert_eq!(stream.status(), StatusCode::OK);
        open.push(stream);
    }
    assert_refused(follow(&env, &key, &id).await).await;

    // Cancelling the job ends every stream with its terminal event.
    let (status, _) = env
        .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK);
    for stream in open.drain(..) {
        let text = stream.text().await.unwrap();
        assert!(text.contains("event: response.cancelled"), "{text}");
    }

    // Every place is free again: a finished job's stream replays and ends at once, and a
    // whole cap of live ones fits.
    let done = follow(&env, &key, &id).await;
    assert_eq!(done.status(), StatusCode::OK);
    assert!(done.text().await.unwrap().contains("response.cancelled"));
    let live_id = env.submit_ok(&key, "mock-1", "again").await;
    let mut live = Vec::new();
    for _ in 0..MAX {
        let stream = follow(&env, &key, &live_id).await;
        assert_eq!(stream.status(), StatusCode::OK);
        live.push(stream);
    }
    assert_refused(follow(&env, &key, &live_id).await).await;
}
