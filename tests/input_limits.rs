//! Limits on what a client may send: OpenAI's metadata limits, a cap on input items, NUL
//! characters, the auth scheme's case, and error messages that echo only a prefix of the input.
//! Every refusal is OpenAI-shaped and leaves nothing behind.

mod common;

use common::{isolated_config, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::config::ModelConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limits_is_a_400_naming_the_field_and_writes_nothing() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.max_input_items = 3;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let seventeen: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let message = json!({"role": "user", "content": "hi"});
    let cases = [
        (
            json!({"model": "mock-1", "input": "hi", "metadata": seventeen}),
            "metadata",
        ),
        (
            json!({"model": "mock-1", "input": "hi", "metadata": {"k": "v".repeat(513)}}),
            "metadata.k",
        ),
        (
            json!({"model": "mock-1", "input": "hi", "metadata": {"k".repeat(65): "v"}}),
            "metadata",
        ),
        (
            json!({"model": "mock-1", "input": [message, message, message, message]}),
            "input",
        ),
        (json!({"model": "mock-1", "input": "a\u{0}b"}), "input"),
        (
            json!({"model": "mock-1", "input": "hi", "metadata": {"k": "\u{0}"}}),
            "metadata.k",
        ),
    ];
    let before = env.snapshot().await;
    for (body, param) in cases {
        let (status, error) = env.submit(&key, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
    }
    assert_eq!(env.snapshot().await, before, "a refusal wrote something");
    // At the limits, accepted.
    let three = json!([message, message, message]);
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": three, "background": true,
                   "metadata": {"k".repeat(64): "v".repeat(512)}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_scheme_is_case_insensitive_and_errors_echo_a_prefix() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let resp = env
            .http
            .post(env.url("/v1/responses"))
            .header("authorization", format!("{scheme} {key}"))
            .json(&json!({"model": "mock-1", "input": "hi", "background": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    let resp = env
        .http
        .post(env.url("/v1/responses"))
        .header("authorization", format!("Basic {key}"))
        .json(&json!({"model": "mock-1", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let long_id = format!("resp_{}", "a".repeat(10_000));
    let (status, error) = env.get(&key, &long_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.len() < 200, "{} bytes echoed", message.len());
    assert!(message.contains("resp_aaaa"), "{message}");
}
