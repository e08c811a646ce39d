//! Requests at the limits a client may reach — OpenAI's metadata limits, the cap on input items —
//! are accepted. What lies past them is refused in `tests/bad_input.rs`, with every other bad
//! input.

mod common;

use common::{isolated_config, TestEnv};
use reqwest::StatusCode;
use serde_json::json;
use tollgate::config::ModelConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limits_a_request_is_accepted() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.max_input_items = 3;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let message = json!({"role": "user", "content": "hi"});
    let sixteen: serde_json::Map<String, serde_json::Value> = (0..16)
        .map(|i| (format!("{i:0>64}"), json!("v".repeat(512))))
        .collect();
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": [message, message, message], "background": true,
                   "metadata": sixteen}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["metadata"].as_object().unwrap().len(), 16);
    assert_eq!(env.snapshot().await.jobs, 1);
}
