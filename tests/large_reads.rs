//! `input_items` on a job with a large input: pages are sliced from the stored request, and read
//! the same as on a small one — first and last ids, `has_more`, `after`/`before` in both orders,
//! every item exactly once when walking the pages.

mod common;

use common::{isolated_config, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::config::ModelConfig;

const ITEMS: usize = 5_000;

/// The i-th input item: messages, with a function call and its output now and then.
fn item(i: usize) -> Value {
    match i % 7 {
        3 => json!({"type": "function_call", "call_id": format!("call_{i}"), "name": "f",
                    "arguments": format!("{{\"i\":{i}}}")}),
        4 => json!({"type": "function_call_output", "call_id": format!("call_{}", i - 1),
                    "output": format!("out {i}")}),
        5 => json!({"role": "assistant", "content": format!("answer {i}")}),
        _ => json!({"role": "user", "content": format!("message {i}")}),
    }
}

fn prefix(i: usize) -> &'static str {
    match i % 7 {
        3 => "fc",
        4 => "fco",
        _ => "msg",
    }
}

/// The indices of a page's items, checking each id names its job and its kind.
fn indices(list: &Value, job: &str) -> Vec<usize> {
    let hex = job.strip_prefix("resp_").unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let id = item["id"].as_str().unwrap();
            let i: usize = id.rsplit('_').next().unwrap().parse().unwrap();
            assert_eq!(id, format!("{}_{hex}_{i}", prefix(i)));
            assert_eq!(item["status"], "completed");
            i
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_input_is_paged_like_a_small_one() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.max_input_items = ITEMS;
    config.server.max_body_bytes = 16 * 1024 * 1024;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let input: Vec<Value> = (0..ITEMS).map(item).collect();
    let (status, created) = env
        .submit(
            &key,
            json!({"model": "mock-1", "background": true, "input": input}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap();
    let hex = id.strip_prefix("resp_").unwrap();
    let last = ITEMS - 1;

    // The newest item by default, the oldest in ascending order.
    let (status, newest) = env.input_items(&key, id, "?limit=1").await;
    assert_eq!(status, StatusCode::OK, "{newest}");
    assert_eq!(indices(&newest, id), [last]);
    assert_eq!(newest["first_id"], newest["data"][0]["id"]);
    assert_eq!(newest["last_id"], newest["data"][0]["id"]);
    assert_eq!(newest["has_more"], true);
    assert_eq!(
        newest["data"][0]["content"],
        json!([{"type": "input_text", "text": format!("message {last}")}])
    );
    let (_, oldest) = env.input_items(&key, id, "?limit=1&order=asc").await;
    assert_eq!(indices(&oldest, id), [0]);
    assert_eq!(oldest["has_more"], true);

    // Each kind of item reads back whole.
    let (_, some) = env.input_items(&key, id, "?limit=4&order=asc").await;
    assert_eq!(indices(&some, id), [0, 1, 2, 3]);
    assert_eq!(some["first_id"], format!("msg_{hex}_0"));
    assert_eq!(some["last_id"], format!("fc_{hex}_3"));
    assert_eq!(
        some["data"][3],
        json!({"type": "function_call", "id": format!("fc_{hex}_3"), "status": "completed",
               "call_id": "call_3", "name": "f", "arguments": "{\"i\":3}"})
    );
    let (_, tail) = env
        .input_items(&key, id, &format!("?order=asc&after=fc_{hex}_3&limit=2"))
        .await;
    assert_eq!(indices(&tail, id), [4, 5]);
    assert_eq!(tail["data"][0]["output"], "out 4");
    assert_eq!(
        tail["data"][1]["content"],
        json!([{"type": "output_text", "text": "answer 5", "annotations": []}])
    );

    // The last page has no more; a window between two cursors, in both orders.
    let (_, end) = env
        .input_items(
            &key,
            id,
            &format!("?order=asc&after={}_{hex}_{}", prefix(last - 2), last - 2),
        )
        .await;
    assert_eq!(indices(&end, id), [last - 1, last]);
    assert_eq!(end["has_more"], false);
    let (_, between) = env
        .input_items(
            &key,
            id,
            &format!("?after=msg_{hex}_100&before=msg_{hex}_90"),
        )
        .await;
    assert_eq!(indices(&between, id), (91..100).rev().collect::<Vec<_>>());
    assert_eq!(between["has_more"], false);
    let (_, between) = env
        .input_items(
            &key,
            id,
            &format!("?order=asc&after=msg_{hex}_90&before=msg_{hex}_100&limit=5"),
        )
        .await;
    assert_eq!(indices(&between, id), [91, 92, 93, 94, 95]);
    assert_eq!(between["has_more"], true);

    // Cursors that name no item of this input: past its end, another kind's prefix, not as
    // written, another job's.
    for cursor in [
        format!("msg_{hex}_{ITEMS}"),
        format!("msg_{hex}_3"),
        format!("msg_{hex}_01"),
        format!("msg_{}_1", "0".repeat(32)),
        "nonsense".into(),
    ] {
        let (status, error) = env.input_items(&key, id, &format!("?after={cursor}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{cursor}: {error}");
        assert_eq!(error["error"]["param"], "after");
        let (status, error) = env
            .input_items(&key, id, &format!("?before={cursor}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{cursor}: {error}");
        assert_eq!(error["error"]["param"], "before");
    }

    // Walking every page, newest first, gives every item once.
    let mut seen = Vec::new();
    let mut query = "?limit=100".to_string();
    loop {
        let (status, list) = env.input_items(&key, id, &query).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        seen.extend(indices(&list, id));
        if list["has_more"] == false {
            break;
        }
        query = format!("?limit=100&after={}", list["last_id"].as_str().unwrap());
    }
    assert_eq!(seen, (0..ITEMS).rev().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_job_is_a_404_whatever_the_query() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let missing = format!("resp_{}", "0".repeat(32));
    for query in ["", "?limit=0", "?order=sideways", "?after=nonsense"] {
        let (status, error) = env.input_items(&key, &missing, query).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{query}: {error}");
    }
    // A string input is one item.
    let id = env.submit_ok(&key, "mock-1", "just a string").await;
    let (_, list) = env.input_items(&key, &id, "?limit=1").await;
    assert_eq!(indices(&list, &id), [0]);
    assert_eq!(list["has_more"], false);
    let (_, list) = env
        .input_items(
            &key,
            &id,
            &format!("?after={}", list["first_id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(list["data"], json!([]));
    assert_eq!(list["first_id"], Value::Null);
}
