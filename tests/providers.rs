//! Real providers' behaviour, against a fake upstream the test controls (a real HTTP server
//! serving recorded streams of each wire format): one upstream call per attempt however slow the
//! headers, the reserved cap always sent, every terminal path charged, cut-off answers
//! `incomplete`, broken streams retried, hostile upstreams bounded.

mod common;

use std::time::Duration;

use common::{
    isolated_config,
    upstream::{FakeUpstream, Script},
    TestEnv,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::{
    config::{CapField, Config, ModelConfig, ProviderKind, TokenizerKind},
    store::keys::NewKey,
    tokens,
};
use uuid::Uuid;

fn model(name: &str, provider: ProviderKind, upstream: &FakeUpstream) -> ModelConfig {
    ModelConfig {
        provider,
        upstream_model: Some("gpt-4o-mini".into()),
        base_url: Some(upstream.base_url()),
        input_price_per_1m: 3.0,
        output_price_per_1m: 15.0,
        max_output_tokens: 1000,
        ..ModelConfig::mock(name)
    }
}

fn chat(name: &str, upstream: &FakeUpstream) -> ModelConfig {
    model(name, ProviderKind::Openai, upstream)
}

/// Fast retries, short leases and an eager sweeper, so a lapsed lease would be rescued at once.
fn quick(models: Vec<ModelConfig>) -> Config {
    let mut config = isolated_config(models);
    config.worker.retry_base_ms = 50;
    config.worker.lease_seconds = 2;
    config.server.sweep_interval_ms = 100;
    config
}

async fn start(config: Config) -> TestEnv {
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    env
}

fn uuid_of(id: &str) -> Uuid {
    Uuid::parse_str(id.strip_prefix("resp_").unwrap()).unwrap()
}

/// What the job row says it cost: (status, attempt, output_text, estimated_input_tokens,
/// input_tokens, output_tokens, usage_estimated, cost, charged).
#[derive(Debug, sqlx::FromRow)]
struct Billed {
    status: String,
    attempt: i32,
    output_text: String,
    estimated_input_tokens: i32,
    input_tokens: Option<i32>,
    output_tokens: Option<i32>,
    usage_estimated: Option<bool>,
    cost_micro_usd: Option<i64>,
    charged_micro_usd: Option<i64>,
    reserved_micro_usd: i64,
}

async fn billed(env: &TestEnv, id: &str) -> Billed {
    sqlx::query_as(
        "SELECT status::text, attempt, output_text, estimated_input_tokens, input_tokens,
                output_tokens, usage_estimated, cost_micro_usd, charged_micro_usd,
                reserved_micro_usd
           FROM tollgate.jobs WHERE id = $1",
    )
    .bind(uuid_of(id))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// A key with this budget in micro-dollars.
async fn budgeted_key(env: &TestEnv, budget: i64) -> String {
    env.create_key(NewKey {
        name: "budgeted".into(),
        budget: Some(tollgate::money::MicroUsd(budget)),
        ..Default::default()
    })
    .await
}

/// Deltas the job's latest attempt has written.
async fn deltas_written(env: &TestEnv, id: &str) -> i32 {
    // Text pieces (`t`) of the latest attempt.
    sqlx::query_scalar(
        "SELECT coalesce(sum(length(e.kinds) - length(replace(e.kinds, 't', ''))), 0)::integer
           FROM tollgate.job_events e
           JOIN tollgate.jobs j ON j.id = e.job_id AND j.attempt = e.attempt
          WHERE e.job_id = $1",
    )
    .bind(uuid_of(id))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// One job ("hi") of the chat model `up` against an upstream following `script`, run to its end:
/// (upstream, env, the finished Response object).
async fn one_job(script: Script) -> (FakeUpstream, TestEnv, Value) {
    let upstream = FakeUpstream::start(script).await;
    let env = start(quick(vec![chat("up", &upstream)])).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "up", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    (upstream, env, done)
}

/// A job of a key with `budget` micro-dollars, streaming from a slow upstream (400 deltas, 15 ms
/// apart), once it has written `min_deltas`: (upstream, env, key, job id).
async fn streaming_job(budget: i64, min_deltas: i32) -> (FakeUpstream, TestEnv, String, String) {
    let upstream = FakeUpstream::start(Script::Slow {
        deltas: 400,
        delay_ms: 15,
    })
    .await;
    let env = start(quick(vec![chat("up", &upstream)])).await;
    let key = budgeted_key(&env, budget).await;
    let id = env.submit_ok(&key, "up", "Tell me a long story").await;
    env.wait_for(Duration::from_secs(20), || async {
        deltas_written(&env, &id).await >= min_deltas
    })
    .await;
    (upstream, env, key, id)
}

/// The event types of a job's whole stream, read to its end.
async fn stream_types(env: &TestEnv, key: &str, id: &str) -> Vec<String> {
    let resp = env
        .http
        .get(env.url(&format!("/v1/responses/{id}?stream=true")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    body.lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_delayed_past_two_leases_are_one_upstream_call() {
    // The issue's case: headers after 12 s under a 5 s lease. A lease renewed only while deltas
    // flow would lapse twice, and the sweeper (every 100 ms) would hand the job to another
    // attempt, calling the upstream again.
    let upstream = FakeUpstream::start(Script::DelayHeaders {
        delay_ms: 12_000,
        then: Box::new(Script::Fixture("openai_chat/basic.sse")),
    })
    .await;
    let mut config = quick(vec![chat("up", &upstream)]);
    config.worker.lease_seconds = 5;
    let env = start(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "up", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    eprintln!(
        "headers after 12 s, lease 5 s: {} upstream call(s)",
        upstream.calls()
    );
    assert_eq!(upstream.calls(), 1, "the upstream was called again");
    let row = billed(&env, &id).await;
    assert_eq!(row.attempt, 1);
    assert_eq!(row.output_text, "Hello! How can I assist you today?");
    assert_eq!((row.input_tokens, row.output_tokens), (Some(19), Some(10)));
    assert_eq!(row.usage_estimated, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_is_sent_the_reserved_cap_in_its_own_field() {
    let chat_up = FakeUpstream::start(Script::Fixture("openai_chat/basic.sse")).await;
    let anthropic_up = FakeUpstream::start(Script::Fixture("anthropic/basic.sse")).await;
    let responses_up = FakeUpstream::start(Script::Fixture("openai_responses/basic.sse")).await;
    std::env::set_var("TOLLGATE_TEST_UPSTREAM_KEY", "sk-upstream-secret");
    // Chat completions configured as Azure OpenAI would be: key header, api-version, extra header.
    let azure = ModelConfig {
        api_key_env: Some("TOLLGATE_TEST_UPSTREAM_KEY".into()),
        api_key_header: Some("api-key".into()),
        extra_query: [("api-version".to_string(), "2024-10-21".to_string())].into(),
        extra_headers: [("x-title".to_string(), "tollgate".to_string())].into(),
        cap_field: CapField::Both,
        ..chat("chat", &chat_up)
    };
    let claude = ModelConfig {
        api_key_env: Some("TOLLGATE_TEST_UPSTREAM_KEY".into()),
        upstream_model: Some("claude-sonnet-4-5".into()),
        ..model("claude", ProviderKind::Anthropic, &anthropic_up)
    };
    let responses = ModelConfig {
        api_key_env: Some("TOLLGATE_TEST_UPSTREAM_KEY".into()),
        ..model("resp", ProviderKind::OpenaiResponses, &responses_up)
    };
    let env = start(quick(vec![azure, claude, responses])).await;
    let key = env.key().await;
    for (name, upstream) in [
        ("chat", &chat_up),
        ("claude", &anthropic_up),
        ("resp", &responses_up),
    ] {
        for cap in [None, Some(77)] {
            let mut body = json!({"model": name, "background": true,
                "instructions": "Be brief.", "input": "Say hi"});
            if let Some(cap) = cap {
                body["max_output_tokens"] = json!(cap);
            }
            let (status, created) = env.submit(&key, body).await;
            assert_eq!(status, StatusCode::OK, "{created}");
            let done = env
                .poll_until_done(&key, created["id"].as_str().unwrap())
                .await;
            assert_eq!(done["status"], "completed", "{name}: {done}");
            assert!(!done["output"][0]["content"][0]["text"]
                .as_str()
                .unwrap()
                .is_empty());
            let sent = upstream.requests().pop().unwrap();
            // The model's cap (1000) when the client set none.
            let want = json!(cap.unwrap_or(1000));
            match name {
                "chat" => {
                    assert_eq!(sent.path, "chat/completions");
                    assert_eq!(sent.body["max_completion_tokens"], want);
                    assert_eq!(sent.body["max_tokens"], want);
                    assert_eq!(sent.headers["api-key"], "sk-upstream-secret");
                    assert!(sent.headers.get("authorization").is_none());
                    assert_eq!(sent.headers["x-title"], "tollgate");
                    assert_eq!(sent.query["api-version"], "2024-10-21");
                    assert_eq!(sent.body["messages"][0]["role"], "system");
                }
                "claude" => {
                    assert_eq!(sent.path, "messages");
                    assert_eq!(sent.body["max_tokens"], want);
                    assert_eq!(sent.body["model"], "claude-sonnet-4-5");
                    assert_eq!(sent.body["system"], "Be brief.");
                    assert_eq!(
                        sent.body["messages"],
                        json!([{"role": "user", "content": "Say hi"}])
                    );
                    assert_eq!(sent.headers["x-api-key"], "sk-upstream-secret");
                    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
                }
                _ => {
                    assert_eq!(sent.path, "responses");
                    assert_eq!(sent.body["max_output_tokens"], want);
                    assert_eq!(sent.body["instructions"], "Be brief.");
                    assert_eq!(sent.body["stream"], true);
                    assert_eq!(sent.headers["authorization"], "Bearer sk-upstream-secret");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_stream_charges_the_streamed_tokens_within_the_budget() {
    let (_upstream, env, key, id) = streaming_job(100_000, 40).await;
    let (status, cancelled) = env
        .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");

    let row = billed(&env, &id).await;
    assert_eq!(row.status, "cancelled");
    // What the row kept is what was charged: the streamed text counted with the model's
    // tokenizer (o200k_base for gpt-4o-mini), the input as admission counted it.
    let output = tokens::count_output(TokenizerKind::O200kBase, &row.output_text);
    assert!(output >= 40, "{output} tokens for {:?}", row.output_text);
    assert_eq!(row.output_tokens, Some(output as i32));
    assert_eq!(row.input_tokens, Some(row.estimated_input_tokens));
    assert_eq!(row.usage_estimated, Some(true));
    let model = env.config.model("up").unwrap();
    let expected = model
        .cost(row.estimated_input_tokens as u64, output as u64)
        .0;
    assert!(expected > 0);
    assert_eq!(row.cost_micro_usd, Some(expected));
    assert_eq!(
        row.charged_micro_usd,
        Some(expected.min(row.reserved_micro_usd))
    );
    let (in_flight, reserved, spent) = env.counters_of(&key).await;
    eprintln!(
        "cancelled after {} deltas: {output} output + {} input tokens, charged {spent} micro-USD",
        deltas_written(&env, &id).await,
        row.estimated_input_tokens
    );
    assert_eq!((in_flight, reserved, spent), (0, 0, expected));
    assert!(spent <= 100_000);
    // The cancel's answer showed the same usage.
    assert_eq!(cancelled["usage"]["output_tokens"], output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_while_running_charges_the_streamed_tokens() {
    let (upstream, env, key, id) = streaming_job(1_000_000, 20).await;
    assert_eq!(env.delete(&key, &id).await.0, StatusCode::OK);
    let (in_flight, reserved, spent) = env.counters_of(&key).await;
    assert_eq!((in_flight, reserved), (0, 0));
    // At least 20 deltas of "wN " (2 tokens each in o200k_base) at 15 USD/1M, plus the input.
    assert!(spent >= 20 * 2 * 15, "spent {spent}");
    // The worker heard of it and hung up on the upstream.
    env.wait_for(Duration::from_secs(5), || async {
        !upstream.hangups().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_before_any_upstream_call_pays_nothing() {
    let upstream = FakeUpstream::start(Script::Fixture("openai_chat/basic.sse")).await;
    let env = TestEnv::front_with(quick(vec![chat("up", &upstream)])).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "up", "hi").await;
    let (status, cancelled) = env
        .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["usage"], Value::Null);
    let row = billed(&env, &id).await;
    assert_eq!((row.cost_micro_usd, row.charged_micro_usd), (None, Some(0)));
    assert_eq!(env.counters_of(&key).await, (0, 0, 0));
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_stop_is_incomplete_in_every_provider_and_on_the_stream() {
    let chat_up = FakeUpstream::start(Script::Fixture("openai_chat/length.sse")).await;
    let anthropic_up = FakeUpstream::start(Script::Fixture("anthropic/max_tokens.sse")).await;
    let responses_up =
        FakeUpstream::start(Script::Fixture("openai_responses/incomplete.sse")).await;
    let env = start(quick(vec![
        chat("chat", &chat_up),
        model("claude", ProviderKind::Anthropic, &anthropic_up),
        model("resp", ProviderKind::OpenaiResponses, &responses_up),
    ]))
    .await;
    let key = env.key().await;
    for name in ["chat", "claude", "resp"] {
        let id = env.submit_ok(&key, name, "Tell me a story").await;
        let done = env.poll_until_done(&key, &id).await;
        assert_eq!(done["status"], "incomplete", "{name}: {done}");
        assert_eq!(
            done["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(done["output"][0]["status"], "incomplete");
        assert!(done["usage"]["output_tokens"].as_u64().unwrap() > 0);
        let types = stream_types(&env, &key, &id).await;
        assert_eq!(types.last().unwrap(), "response.incomplete", "{types:?}");
        let row = billed(&env, &id).await;
        assert!(row.cost_micro_usd.unwrap() > 0);
        assert_eq!(row.usage_estimated, Some(false));
    }
    // Nothing is left reserved or in flight.
    let (in_flight, reserved, _) = env.counters_of(&key).await;
    assert_eq!((in_flight, reserved), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_its_end_marker_is_retried_and_its_partial_output_paid() {
    // Every provider's cut-off stream, then the whole one.
    let cases = [
        (ProviderKind::Openai, "openai_chat"),
        (ProviderKind::Anthropic, "anthropic"),
        (ProviderKind::OpenaiResponses, "openai_responses"),
    ];
    let mut upstreams = Vec::new();
    let mut models = Vec::new();
    for (i, (kind, dir)) in cases.iter().enumerate() {
        let truncated: &'static str = Box::leak(format!("{dir}/truncated.sse").into_boxed_str());
        let basic: &'static str = Box::leak(format!("{dir}/basic.sse").into_boxed_str());
        let upstream = FakeUpstream::start(Script::Sequence(vec![
            Script::Fixture(truncated),
            Script::Fixture(basic),
        ]))
        .await;
        models.push(model(&format!("m{i}"), kind.clone(), &upstream));
        upstreams.push(upstream);
    }
    let env = start(quick(models)).await;
    let key = env.key().await;
    for (i, upstream) in upstreams.iter().enumerate() {
        let id = env.submit_ok(&key, &format!("m{i}"), "hi").await;
        let done = env.poll_until_done(&key, &id).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(upstream.calls(), 2);
        let row = billed(&env, &id).await;
        assert_eq!(row.attempt, 2);
        // The cost holds both attempts: the reported usage of the second, and the estimate of
        // the first one's streamed text.
        let model = env.config.model(&format!("m{i}")).unwrap();
        let second = model.cost(
            row.input_tokens.unwrap() as u64,
            row.output_tokens.unwrap() as u64,
        );
        assert!(
            row.cost_micro_usd.unwrap() > second.0,
            "{row:?}: the first attempt was not paid"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_at_every_attempt_fails_and_is_charged() {
    let upstream = FakeUpstream::start(Script::Fixture("openai_chat/truncated.sse")).await;
    let mut config = quick(vec![chat("up", &upstream)]);
    config.worker.max_attempts = 2;
    let env = start(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "up", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_truncated");
    assert_eq!(upstream.calls(), 2);
    let row = billed(&env, &id).await;
    assert_eq!(row.output_text, "The answer is");
    assert_eq!(row.usage_estimated, Some(true));
    let model = env.config.model("up").unwrap();
    let one = model.cost(
        row.estimated_input_tokens as u64,
        tokens::count_output(TokenizerKind::O200kBase, "The answer is") as u64,
    );
    assert_eq!(
        row.cost_micro_usd,
        Some(2 * one.0),
        "two attempts, each paid"
    );
    assert_eq!(env.counters_of(&key).await.2, 2 * one.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_fails_the_attempt_and_the_worker_goes_on() {
    let huge = FakeUpstream::start(Script::HugeEvent {
        bytes: 8 * 1024 * 1024,
    })
    .await;
    let fine = FakeUpstream::start(Script::Fixture("openai_chat/basic.sse")).await;
    let env = start(quick(vec![chat("huge", &huge), chat("fine", &fine)])).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "huge", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_oversized");
    let id = env.submit_ok(&key, "fine", "hi").await;
    assert_eq!(env.poll_until_done(&key, &id).await["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_error_body_is_read_bounded_and_its_status_retried() {
    let (upstream, _env, done) = one_job(Script::Sequence(vec![
        Script::HugeError {
            status: 503,
            bytes: 64 * 1024 * 1024,
        },
        Script::Fixture("openai_chat/basic.sse"),
    ]))
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_retry_after_sets_the_delay_before_the_next_attempt() {
    // The backoff alone would retry after 50 ms.
    let (upstream, _env, done) = one_job(Script::Sequence(vec![
        Script::StatusRetryAfter(429, "2"),
        Script::Fixture("openai_chat/basic.sse"),
    ]))
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let calls = upstream.requests();
    assert_eq!(calls.len(), 2);
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_millis(1_900),
        "retried after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_delta_does_not_break_the_job() {
    let (_upstream, _env, done) = one_job(Script::Stream {
        deltas: vec!["a\u{0}b".into(), " c".into()],
        prompt_tokens: 3,
        completion_tokens: 2,
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"][0]["content"][0]["text"], "a\u{FFFD}b c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_the_input_is_a_400_naming_the_field_and_writes_nothing() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let before = env.snapshot().await;
    for (body, param) in [
        (
            r#"{"model":"mock-1","input":"hi","metadata":{"k":"a\u0000b"}}"#,
            "metadata.k",
        ),
        (r#"{"model":"mock-1","input":"h\u0000i"}"#, "input"),
        (
            r#"{"model":"mock-1","input":"hi","instructions":"\u0000"}"#,
            "instructions",
        ),
        (r#"{"model":"mock-1","input":"hi","user":"\u0000"}"#, "user"),
    ] {
        let (status, error, _) = env.submit_raw(Some(&key), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["param"], param);
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert_eq!(env.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_charged_for_what_it_streamed() {
    let upstream = FakeUpstream::start(Script::Slow {
        deltas: 400,
        delay_ms: 20,
    })
    .await;
    let timed = ModelConfig {
        timeout_seconds: 1,
        ..chat("up", &upstream)
    };
    let env = start(quick(vec![timed])).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "up", "hi").await;
    let done = env.poll_until_done(&key, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "job_timeout");
    let row = billed(&env, &id).await;
    assert!(!row.output_text.is_empty());
    assert_eq!(row.usage_estimated, Some(true));
    let output = tokens::count_output(TokenizerKind::O200kBase, &row.output_text);
    let model = env.config.model("up").unwrap();
    let expected = model
        .cost(row.estimated_input_tokens as u64, output as u64)
        .0;
    assert_eq!(row.cost_micro_usd, Some(expected));
    assert_eq!(env.counters_of(&key).await, (0, 0, expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_ignores_the_cap_is_charged_at_most_the_reservation() {
    // The upstream reports 100,000 output tokens for a request capped at 10.
    let upstream = FakeUpstream::start(Script::Stream {
        deltas: (0..50).map(|i| format!("w{i} ")).collect(),
        prompt_tokens: 10,
        completion_tokens: 100_000,
    })
    .await;
    let env = start(quick(vec![chat("up", &upstream)])).await;
    let budget = 1_000_000;
    let key = budgeted_key(&env, budget).await;
    let (status, created) = env
        .submit(
            &key,
            json!({"model": "up", "input": "hi", "background": true, "max_output_tokens": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap();
    let done = env.poll_until_done(&key, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(upstream.bodies()[0]["max_completion_tokens"], 10);
    let row = billed(&env, id).await;
    // The row keeps the real cost; the key pays the reservation and no more.
    assert_eq!(row.cost_micro_usd, Some(1_500_030));
    assert_eq!(row.charged_micro_usd, Some(row.reserved_micro_usd));
    let (_, _, spent) = env.counters_of(&key).await;
    assert_eq!(spent, row.reserved_micro_usd);
    assert!(spent <= budget);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temperature_anthropic_cannot_take_is_refused_not_clamped() {
    let upstream = FakeUpstream::start(Script::Fixture("anthropic/basic.sse")).await;
    let env = TestEnv::front_only(vec![model("claude", ProviderKind::Anthropic, &upstream)]).await;
    let key = env.key().await;
    let before = env.snapshot().await;
    let (status, error) = env
        .submit(
            &key,
            json!({"model": "claude", "input": "hi", "background": true, "temperature": 1.5}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "temperature");
    assert_eq!(env.snapshot().await, before);
}
