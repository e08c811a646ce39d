//! The whole path through HTTP, RabbitMQ and the worker: submit, poll to completion, and what was
//! written on the way.

mod common;

use common::{
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use reqwest::StatusCode;
use serde_json::json;
use tollgate::config::{ModelConfig, ProviderKind};
use uuid::Uuid;

fn openai_model(name: &str, base_url: String) -> ModelConfig {
    ModelConfig {
        provider: ProviderKind::Openai,
        upstream_model: Some("upstream-model-x".into()),
        base_url: Some(base_url),
        input_price_per_1m: 3.0,
        output_price_per_1m: 15.0,
        ..ModelConfig::mock(name)
    }
}

/// Event rows of a job, in order: (attempt, seq_first, seq_last, deltas).
async fn events(env: &TestEnv, id: &str) -> Vec<(i32, i32, i32, Vec<String>)> {
    let uuid = Uuid::parse_str(id.strip_prefix("resp_").unwrap()).unwrap();
    sqlx::query_as(
        "SELECT attempt, seq_first, seq_last, deltas FROM tollgate.job_events
          WHERE job_id = $1 ORDER BY attempt, seq_first",
    )
    .bind(uuid)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_job_completes_through_the_whole_path() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;

    let (status, created) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "Hello", "background": true,
                   "instructions": "be brief", "metadata": {"run": "e2e"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["object"], "response");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["background"], true);
    assert_eq!(created["model"], "mock-1");
    assert_eq!(created["metadata"]["run"], "e2e");
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"));

    let done = env.poll_until_done(&key, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let expected: String = (0..20).map(tollgate::provider::mock_delta).collect();
    assert_eq!(done["output"][0]["type"], "message");
    assert_eq!(done["output"][0]["role"], "assistant");
    assert_eq!(done["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(done["output"][0]["content"][0]["text"], expected);
    assert_eq!(done["usage"]["output_tokens"], 20);
    assert_eq!(done["instructions"], "be brief");
    let input = done["usage"]["input_tokens"].as_i64().unwrap();
    assert!(input > 0);
    assert_eq!(done["usage"]["total_tokens"], input + 20);

    // Event rows: contiguous sequence ranges from 0, their deltas concatenate to the output, and
    // batching wrote fewer rows than deltas.
    let rows = events(&env, id).await;
    assert!(
        rows.len() > 1 && rows.len() < 20,
        "{} event rows",
        rows.len()
    );
    let mut next = 0;
    let mut text = String::new();
    for (attempt, first, last, deltas) in &rows {
        assert_eq!(*attempt, 1);
        assert_eq!(*first, next);
        assert_eq!(*last - *first + 1, deltas.len() as i32);
        next = last + 1;
        text.extend(deltas.iter().cloned());
    }
    // The message's opening (item, part) and its 20 text deltas; its `.done` pieces are added by
    // readers once the job has ended.
    assert_eq!(next, 22);
    assert_eq!(text, expected);

    // Cost at the mock's prices (1 and 2 USD per 1M tokens), added to the key's spend; the
    // in-flight slot and the reservation are given back.
    let (cost, in_flight, reserved, spent): (i64, i32, i64, i64) = sqlx::query_as(
        "SELECT j.cost_micro_usd, c.in_flight, c.reserved_micro_usd, c.spent_micro_usd
           FROM tollgate.jobs j JOIN tollgate.key_counters c ON c.key_id = j.key_id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(cost, input + 2 * 20);
    assert_eq!((in_flight, reserved, spent), (0, 0, cost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_upstream_is_streamed_and_its_usage_charged() {
    let deltas: Vec<String> = ["The", " answer", " is", " 42", "."]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let upstream = FakeUpstream::start(Script::Stream {
        deltas: deltas.clone(),
        prompt_tokens: 1_000,
        completion_tokens: 2_000,
    })
    .await;
    let env = TestEnv::start(vec![openai_model("gpt-test", upstream.base_url())]).await;
    let key = env.key().await;

    let (status, created) = env
        .submit(
            &key,
            json!({"model": "gpt-test", "background": true, "max_output_tokens": 3000,
                   "temperature": 0.5,
                   "input": [{"role": "user", "content": [{"type": "input_text", "text": "Question?"}]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap();
    let done = env.poll_until_done(&key, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"][0]["content"][0]["text"], "The answer is 42.");
    assert_eq!(done["usage"]["input_tokens"], 1_000);
    assert_eq!(done["usage"]["output_tokens"], 2_000);
    assert_eq!(done["temperature"], 0.5);

    // What went upstream: the upstream model name, streaming with usage, the mapped options.
    let sent = upstream.bodies();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["model"], "upstream-model-x");
    assert_eq!(sent[0]["stream"], true);
    assert_eq!(sent[0]["stream_options"]["include_usage"], true);
    assert_eq!(sent[0]["max_completion_tokens"], 3000);
    assert_eq!(
        sent[0]["messages"],
        json!([{"role": "user", "content": "Question?"}])
    );

    // 1,000 tokens at 3 USD/1M + 2,000 at 15 USD/1M = 0.003 + 0.03 USD.
    let (cost, spent): (i64, i64) = sqlx::query_as(
        "SELECT j.cost_micro_usd, c.spent_micro_usd
           FROM tollgate.jobs j JOIN tollgate.key_counters c ON c.key_id = j.key_id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((cost, spent), (33_000, 33_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_error_fails_the_job_and_releases_its_slot() {
    let upstream = FakeUpstream::start(Script::Status(400)).await;
    let env = TestEnv::start(vec![openai_model("gpt-test", upstream.base_url())]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "gpt-test", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_http_error");
    assert!(
        done["error"]["message"].as_str().unwrap().contains("400"),
        "{done}"
    );
    assert_eq!(done["usage"], serde_json::Value::Null);
    let counters = env.snapshot().await.counters;
    assert_eq!(counters.len(), 1);
    let (_, _, in_flight, reserved, spent) = counters[0];
    assert_eq!((in_flight, reserved, spent), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owning_key_reads_a_job() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let owner = env.key().await;
    let other = env.key().await;
    let id = env.submit_ok(&owner, "mock-1", "mine").await;

    let (status, body) = env.get(&other, &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _) = env.get(&owner, &id).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env.get("sk-tg-wrong", &id).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = env.get(&owner, "resp_not-an-id").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_views_answer_from_real_jobs() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "for the views").await;
    env.poll_until_done(&key, &id).await;
    let (status, _) = env
        .submit(
            &key,
            json!({"model": "nope", "input": "x", "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (jobs, p50_run): (i64, f64) = sqlx::query_as(
        "SELECT jobs, p50_run_ms FROM tollgate.jobs_by_status WHERE status = 'completed'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(jobs, 1);
    assert!(p50_run >= 0.0);
    let (cost, charged): (String, String) =
        sqlx::query_as("SELECT cost_usd::text, charged_usd::text FROM tollgate.spend_by_key_day")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(cost, charged);
    assert_ne!(cost, "0.000000");
    let (in_flight, spent): (i64, String) =
        sqlx::query_as("SELECT in_flight, spent_usd::text FROM tollgate.key_usage")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((in_flight, spent), (0, cost));
    let (reason, count): (String, i64) =
        sqlx::query_as("SELECT reason, rejections::bigint FROM tollgate.rejections_by_reason")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((reason.as_str(), count), ("unknown_model", 1));
}

/// The mock answers a forced `tool_choice` with a call: it is the job's output item, and its
/// arguments are on the row beside the (empty) text, where a stopped attempt's charge reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_function_call_is_the_output_and_its_arguments_are_on_the_row() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let (status, created) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "call it", "background": true,
                   "tools": [{"type": "function", "name": "now"}], "tool_choice": "required"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap();
    let done = env.poll_until_done(&key, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"].as_array().unwrap().len(), 1);
    assert_eq!(done["output"][0]["type"], "function_call");
    assert_eq!(done["output"][0]["name"], "now");
    assert_eq!(done["output"][0]["arguments"], "{}");
    let uuid = Uuid::parse_str(id.strip_prefix("resp_").unwrap()).unwrap();
    let (text, arguments): (String, String) =
        sqlx::query_as("SELECT output_text, output_arguments FROM tollgate.jobs WHERE id = $1")
            .bind(uuid)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((text.as_str(), arguments.as_str()), ("", "{}"));
}
