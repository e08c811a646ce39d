//! schemathesis (pinned in `tests/schemathesis/requirements.txt`, installed into
//! `.venv-schemathesis` on first run) runs against the live `/openapi.json` of a real front and
//! worker with the mock model: the Responses API as a key holder, and the admin API with the master
//! key. Generated requests of every operation, valid and invalid, and sequences that follow the
//! document's links from a created response to the operations on it.
//!
//! Every check runs but `positive_data_acceptance`: no answer is a 5xx, every status, content
//! type, header and body (JSON, and each event of a stream) is the one documented, schema-invalid
//! requests are refused, a deleted response is gone, and no operation ignores the key. The
//! check left out asks that every schema-valid request succeed; some cannot, as OpenAI's own do
//! not: a `tool_choice` naming a function not in `tools`, a `previous_response_id` or `after` that
//! names nothing, a cancel of a finished response. Those are 400s that name the field.
//!
//! The run is bounded and seeded; to search longer or elsewhere:
//! `SCHEMATHESIS_MAX_EXAMPLES=1000 SCHEMATHESIS_SEED=7 cargo test --test schemathesis -- --nocapture`.

mod common;

use std::path::Path;

use common::{sdk::python_with, TestEnv};
use tollgate::config::{ModelConfig, Secret};

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Runs schemathesis on the operations whose path matches `paths`, as the holder of `secret`, and
/// checks it found nothing and tested `operations` operations with enough cases.
async fn run(env: &TestEnv, secret: &str, paths: &str, operations: usize) {
    let python = python_with(".venv-schemathesis", "tests/schemathesis/requirements.txt");
    let schemathesis = python.with_file_name("schemathesis");
    let output = tokio::process::Command::new(&schemathesis)
        .arg("run")
        .arg(env.url("/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {secret}")])
        .args(["--include-path-regex", paths])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args([
            "--max-examples",
            &setting("SCHEMATHESIS_MAX_EXAMPLES", "100"),
        ])
        .args(["--seed", &setting("SCHEMATHESIS_SEED", "20261130")])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .output()
        .await
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // It ran every operation and generated cases (a run that tested nothing also exits 0).
    assert!(
        stdout.contains(&format!("Tested: {operations}")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("Authentication failed"),
        "operations answered only 401/403:\n{stdout}"
    );
    // "Test cases:" is followed by "N generated, N passed, …".
    let generated: u64 = stdout
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            let n = words.next()?.parse().ok()?;
            (words.next()? == "generated,").then_some(n)
        })
        .unwrap_or_else(|| panic!("no count of generated cases in:\n{stdout}"));
    assert!(generated >= 200, "only {generated} cases generated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_schema() {
    let mut config = common::isolated_config(vec![ModelConfig::mock("mock-1")]);
    let master = "schemathesis-master-key-0123456789";
    config.admin.key = Some(Secret::new(master));
    let mut env = TestEnv::front_with(config).await;
    env.start_worker();
    let key = env.key().await;
    run(&env, &key, "^/v1/", 5).await;
    run(&env, master, "^/admin/", 9).await;
}
