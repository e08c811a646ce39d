//! The official OpenAI Python SDK as a real client: `tests/sdk/test_openai_sdk.py` runs against
//! the real front and worker. The SDK, pinned in `tests/sdk/requirements.txt`, is installed into
//! `.venv` in the project directory on first run (and again whenever the requirements change).
//! The README's SDK snippet runs too, as a user would copy it.

mod common;

use std::{fs, path::Path};

use common::{
    sdk::{project, python_with_sdk, run_python},
    upstream::{fixture, FakeUpstream, Script},
    TestEnv,
};
use serde_json::Value;
use tollgate::{
    config::{ModelConfig, ProviderKind},
    store::keys::NewKey,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_unchanged() {
    let python = tokio::task::spawn_blocking(python_with_sdk).await.unwrap();
    let slow = ModelConfig {
        mock_deltas: 200,
        mock_delay_ms: 50,
        ..ModelConfig::mock("mock-slow")
    };
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1"), slow]).await;
    let key = env.key().await;
    let limited = env
        .create_key(NewKey {
            name: "limited".into(),
            rpm_limit: Some(1),
            ..Default::default()
        })
        .await;
    common::leave_room_in_minute(20).await;
    let expected: String = (0..20).map(tollgate::provider::mock_delta).collect();
    let stdout = run_python(
        &python,
        &project().join("tests/sdk/test_openai_sdk.py"),
        &[
            ("TOLLGATE_BASE_URL", env.url("/v1").as_str()),
            ("TOLLGATE_KEY", &key),
            ("TOLLGATE_LIMITED_KEY", &limited),
            ("TOLLGATE_EXPECTED_TEXT", &expected),
        ],
    )
    .await;
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// The Python block of the README's "With the OpenAI SDK" section, aimed at `base_url` with `key`.
fn readme_snippet(base_url: &str, key: &str) -> String {
    let readme = fs::read_to_string(project().join("README.md")).expect("README.md");
    let section = readme
        .split("## With the OpenAI SDK")
        .nth(1)
        .expect("the README has the SDK section");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the SDK section has a Python block");
    assert!(code.contains("\"http://127.0.0.1:8080/v1\"") && code.contains("\"sk-tg-…\""));
    code.replace("\"http://127.0.0.1:8080/v1\"", &format!("{base_url:?}"))
        .replace("\"sk-tg-…\"", &format!("{key:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_snippet_runs() {
    let python = tokio::task::spawn_blocking(python_with_sdk).await.unwrap();
    // Slow enough that the snippet's cancel finds its job unfinished.
    let env = TestEnv::start(vec![ModelConfig {
        mock_delay_ms: 50,
        ..ModelConfig::mock("mock-1")
    }])
    .await;
    let key = env.key().await;
    let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme_snippet.py");
    fs::write(&script, readme_snippet(&env.url("/v1"), &key)).unwrap();
    let stdout = run_python(&python, &script, &[]).await;
    let expected: String = (0..20).map(tollgate::provider::mock_delta).collect();
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(stdout.contains("cancelled\nNever mind\n"), "{stdout}");
}

/// The answer text of a recorded stream, read straight from the fixture's events.
fn fixture_text(path: &str) -> String {
    fixture(path)
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|event| {
            let text = match event["type"].as_str() {
                Some("content_block_delta") => event.pointer("/delta/text"),
                Some("response.output_text.delta") => event.get("delta"),
                _ => event.pointer("/choices/0/delta/content"),
            };
            text.and_then(Value::as_str).map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_runs_jobs_of_every_provider() {
    let python = tokio::task::spawn_blocking(python_with_sdk).await.unwrap();
    let claude_up = FakeUpstream::start(Script::Fixture("anthropic/basic.sse")).await;
    let responses_up = FakeUpstream::start(Script::Fixture("openai_responses/basic.sse")).await;
    let length_up = FakeUpstream::start(Script::Fixture("openai_chat/length.sse")).await;
    let upstream = |name: &str, provider: ProviderKind, up: &FakeUpstream| ModelConfig {
        provider,
        base_url: Some(up.base_url()),
        ..ModelConfig::mock(name)
    };
    let env = TestEnv::start(vec![
        upstream("claude", ProviderKind::Anthropic, &claude_up),
        upstream("resp", ProviderKind::OpenaiResponses, &responses_up),
        upstream("chat-cut", ProviderKind::Openai, &length_up),
    ])
    .await;
    let key = env.key().await;
    let cases = format!(
        "claude={}\nresp={}\n",
        fixture_text("anthropic/basic.sse"),
        fixture_text("openai_responses/basic.sse")
    );
    let cut_off = format!("chat-cut={}\n", fixture_text("openai_chat/length.sse"));
    let stdout = run_python(
        &python,
        &project().join("tests/sdk/test_providers.py"),
        &[
            ("TOLLGATE_BASE_URL", env.url("/v1").as_str()),
            ("TOLLGATE_KEY", &key),
            ("TOLLGATE_CASES", &cases),
            ("TOLLGATE_CUT_OFF", &cut_off),
        ],
    )
    .await;
    assert!(stdout.contains("all provider checks passed"), "{stdout}");
    // Each upstream was called once per job: a background poll and a stream.
    for up in [&claude_up, &responses_up, &length_up] {
        assert_eq!(up.calls(), 2);
    }
}
