//! Conversation state through `previous_response_id`, at the level of admission and the job
//! rows: what is copied, what is counted, what is refused. (The SDK's view of whole
//! conversations, with tools, is in `fidelity.rs`.)

mod common;

use common::{leave_room_in_minute, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::{config::ModelConfig, store::keys::NewKey};
use uuid::Uuid;

fn uuid_of(id: &str) -> Uuid {
    Uuid::parse_str(id.strip_prefix("resp_").unwrap()).unwrap()
}

async fn job_columns(env: &TestEnv, id: &str) -> (i32, Option<Value>, Option<Uuid>) {
    sqlx::query_as(
        "SELECT estimated_input_tokens, history, previous_response_id FROM tollgate.jobs
          WHERE id = $1",
    )
    .bind(uuid_of(id))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn job_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tollgate.jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The previous response's input and output are copied onto the new job, counted in its estimate
/// and reservation, and echoed as `previous_response_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_copied_counted_and_echoed() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let long = "a".repeat(4000);
    let first = env.submit_ok(&key, "mock-1", &long).await;
    let first_done = env.poll_until_done(&key, &first).await;
    let answer = first_done["output"][0]["content"][0]["text"].clone();

    let (status, second) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "and then?", "background": true,
                   "previous_response_id": first}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["previous_response_id"], first.as_str());
    let second_id = second["id"].as_str().unwrap();
    let (estimate, history, previous) = job_columns(&env, second_id).await;
    assert_eq!(previous, Some(uuid_of(&first)));
    assert_eq!(
        history.unwrap(),
        json!([
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": long}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": answer, "annotations": []}]},
        ])
    );
    // 4000 bytes of history at the fallback's 4 bytes a token: the estimate holds them.
    assert!(estimate > 1000, "estimate {estimate}");
    let done = env.poll_until_done(&key, second_id).await;
    assert_eq!(done["status"], "completed");
    assert!(done["usage"]["input_tokens"].as_i64().unwrap() > 1000);
    // The input items are the request's own; the history is not repeated there.
    let (status, items) = env.get(&key, &format!("{second_id}/input_items")).await;
    assert_eq!(status, StatusCode::OK, "{items}");
    assert_eq!(items["data"].as_array().unwrap().len(), 1);
}

/// A tokens-per-minute limit sees the whole conversation: a follow-up that is small on its own
/// but carries a long history is refused, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tpm_limit_sees_the_history() {
    leave_room_in_minute(20).await;
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(NewKey {
            name: "tpm".into(),
            tpm_limit: Some(1500),
            ..Default::default()
        })
        .await;
    // About 1,000 tokens at 4 bytes a token.
    let first = env.submit_ok(&key, "mock-1", &"a".repeat(4000)).await;
    env.poll_until_done(&key, &first).await;
    let jobs = job_count(&env).await;
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "short", "background": true,
                   "previous_response_id": first}),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(job_count(&env).await, jobs);
    // The same follow-up without the history fits.
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "short", "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Only a finished response of the same key can be continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_finished_response_of_the_key_can_be_continued() {
    let slow = ModelConfig {
        mock_delay_ms: 200,
        ..ModelConfig::mock("slow")
    };
    let env = TestEnv::start(vec![slow, ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let other = env.key().await;
    let running = env.submit_ok(&key, "slow", "take your time").await;
    let follow_up = |previous: &str| {
        json!({"model": "mock-1", "input": "next", "background": true,
               "previous_response_id": previous})
    };
    let jobs = job_count(&env).await;
    let (status, body) = env.submit(&key, follow_up(&running)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "previous_response_in_progress");
    assert_eq!(body["error"]["param"], "previous_response_id");
    for (secret, previous) in [
        (&other, running.as_str()),
        (&key, "resp_0123456789abcdef0123456789abcdef"),
        (&key, "not-an-id"),
    ] {
        let (status, body) = env.submit(secret, follow_up(previous)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "previous_response_not_found");
        assert_eq!(body["error"]["param"], "previous_response_id");
    }
    assert_eq!(job_count(&env).await, jobs);
    env.poll_until_done(&key, &running).await;
    let (status, body) = env.submit(&key, follow_up(&running)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
