//! The OpenAI Responses API surface: streaming (SSE framing, numbering, resume after every N,
//! live followers), the synchronous mode, delete, input items, ownership, and the error shape of
//! the routes' edges.

mod common;

use std::time::Duration;

use common::{isolated_config, TestEnv};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::{config::ModelConfig, store::keys::NewKey};
use uuid::Uuid;

/// One SSE event as the wire carries it.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    event: String,
    data: Value,
}

/// Parses an SSE body: blocks separated by a blank line, `event:` and `data:` lines, comments
/// (keep-alives) skipped.
fn parse_sse(body: &str) -> Vec<Sse> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            let event = event?;
            let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
            Some(Sse { event, data })
        })
        .collect()
}

/// Reads an SSE response to its end (the stream ends after its terminal event).
async fn read_sse(resp: reqwest::Response) -> Vec<Sse> {
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let body = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    parse_sse(&body)
}

async fn stream_of(env: &TestEnv, key: &str, id: &str, starting_after: Option<u64>) -> Vec<Sse> {
    follow(env, key, id, starting_after).await.unwrap()
}

/// A follower of a job's stream, reading it to its end in a task of its own.
fn follow(
    env: &TestEnv,
    key: &str,
    id: &str,
    starting_after: Option<u64>,
) -> tokio::task::JoinHandle<Vec<Sse>> {
    let mut url = env.url(&format!("/v1/responses/{id}?stream=true"));
    if let Some(n) = starting_after {
        url.push_str(&format!("&starting_after={n}"));
    }
    let (http, key) = (env.http.clone(), key.to_string());
    tokio::spawn(
        async move { read_sse(http.get(url).bearer_auth(key).send().await.unwrap()).await },
    )
}

fn types(events: &[Sse]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// Checks a whole stream of a completed job: framing, order, numbering, text.
fn assert_complete_stream(events: &[Sse], n_deltas: usize) -> String {
    let mut expected = vec![
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", n_deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(types(events), expected);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.data["type"], e.event, "{e:?}");
        assert_eq!(e.data["sequence_number"], i as u64, "{e:?}");
    }
    let text: String = events
        .iter()
        .filter(|e| e.event == "response.output_text.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    let done = &events[events.len() - 4];
    assert_eq!(done.data["text"], text);
    let last = &events.last().unwrap().data["response"];
    assert_eq!(last["status"], "completed");
    assert_eq!(last["output"][0]["content"][0]["text"], text);
    assert_eq!(events[0].data["response"]["status"], "queued");
    assert_eq!(events[2].data["response"]["status"], "in_progress");
    text
}

fn mock_text(n: usize) -> String {
    (0..n).map(tollgate::provider::mock_delta).collect()
}

fn slow_mock(name: &str, deltas: u32, delay_ms: u64) -> ModelConfig {
    ModelConfig {
        mock_deltas: deltas,
        mock_delay_ms: delay_ms,
        ..ModelConfig::mock(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_stream_answers_the_event_stream() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    for body in [
        json!({"model": "mock-1", "input": "Hello", "stream": true}),
        json!({"model": "mock-1", "input": "Hello", "stream": true, "background": true}),
    ] {
        let resp = env
            .http
            .post(env.url("/v1/responses"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let events = read_sse(resp).await;
        let text = assert_complete_stream(&events, 20);
        assert_eq!(text, mock_text(20));
        let id = events[0].data["response"]["id"].as_str().unwrap();
        assert_eq!(
            events[0].data["response"]["background"],
            body["background"].as_bool().unwrap_or(false)
        );
        // The same stream is there afterwards, to anyone holding the key.
        assert_eq!(stream_of(&env, &key, id, None).await, events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_after_every_n_yields_exactly_the_rest() {
    let env = TestEnv::start(vec![slow_mock("mock-1", 13, 0)]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "resume me").await;
    env.poll_until_done(&key, &id).await;
    let all = stream_of(&env, &key, &id, None).await;
    assert_complete_stream(&all, 13);
    for n in 0..all.len() as u64 {
        let rest = stream_of(&env, &key, &id, Some(n)).await;
        assert_eq!(rest, all[n as usize + 1..], "starting_after={n}");
    }
    // Past the end: an empty stream that ends at once.
    assert!(stream_of(&env, &key, &id, Some(1_000)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_live_followers_see_one_stream_woken_by_notify() {
    let mut config = isolated_config(vec![slow_mock("mock-1", 30, 25)]);
    // A fallback poll that never fires within the test: followers must be woken by NOTIFY.
    config.server.stream_fallback_poll_ms = 600_000;
    let mut env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "follow me").await;

    // Followers joining before the worker runs, and with various resume points.
    let early: Vec<_> = [None, None, Some(0), Some(3)]
        .into_iter()
        .map(|after| follow(&env, &key, &id, after))
        .collect();
    env.start_worker();
    // A follower joining mid-stream.
    let pool = env.pool.clone();
    let uuid = Uuid::parse_str(id.strip_prefix("resp_").unwrap()).unwrap();
    env.wait_for(Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM tollgate.job_events WHERE job_id = $1",
            )
            .bind(uuid)
            .fetch_one(&pool)
            .await
            .unwrap()
                > 0
        }
    })
    .await;
    let status: String = sqlx::query_scalar("SELECT status::text FROM tollgate.jobs WHERE id = $1")
        .bind(uuid)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "in_progress", "the job should still be running");
    let late = follow(&env, &key, &id, None);
    let late_resumed = follow(&env, &key, &id, Some(7));

    let mut streams = Vec::new();
    for handle in early {
        streams.push(handle.await.unwrap());
    }
    let full = streams[0].clone();
    assert_complete_stream(&full, 30);
    assert_eq!(streams[1], full);
    assert_eq!(streams[2], full[1..]);
    assert_eq!(streams[3], full[4..]);
    assert_eq!(late.await.unwrap(), full);
    assert_eq!(late_resumed.await.unwrap(), full[8..]);
    env.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_follower_hears_of_an_abandoned_attempt() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.stream_fallback_poll_ms = 600_000;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "restart").await;
    let uuid = Uuid::parse_str(id.strip_prefix("resp_").unwrap()).unwrap();
    // Play a worker by hand: attempt 1 claims and writes a message with two deltas.
    sqlx::query("UPDATE tollgate.jobs SET status = 'in_progress', attempt = 1 WHERE id = $1")
        .bind(uuid)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO tollgate.job_events (job_id, attempt, seq_first, seq_last, deltas, kinds)
         VALUES ($1, 1, 0, 3, ARRAY['', '', 'a', 'b'], 'mptt')",
    )
    .bind(uuid)
    .execute(&env.pool)
    .await
    .unwrap();

    let resp = env
        .http
        .get(env.url(&format!("/v1/responses/{id}?stream=true")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while parse_sse(&text).len() < 7 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // Another worker takes the job over: attempt 2.
    sqlx::query("UPDATE tollgate.jobs SET attempt = 2, output_text = '' WHERE id = $1")
        .bind(uuid)
        .execute(&env.pool)
        .await
        .unwrap();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("the stream goes on or ends")
    {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = parse_sse(&text);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.queued",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "error"
        ]
    );
    assert_eq!(events[7].data["code"], "response_restarted");

    // A resume from 4 follows the new attempt: a delta of attempt 2, then its end.
    sqlx::query(
        "INSERT INTO tollgate.job_events (job_id, attempt, seq_first, seq_last, deltas, kinds)
         VALUES ($1, 2, 0, 2, ARRAY['', '', 'c'], 'mpt')",
    )
    .bind(uuid)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE tollgate.jobs SET output_text = 'c', status = 'completed', input_tokens = 1,
                output_tokens = 1 WHERE id = $1",
    )
    .bind(uuid)
    .execute(&env.pool)
    .await
    .unwrap();
    let rest = stream_of(&env, &key, &id, Some(4)).await;
    assert_eq!(
        types(&rest),
        [
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(rest[0].data["delta"], "c");
    assert_eq!(rest[0].data["sequence_number"], 5);
    assert_eq!(rest[1].data["text"], "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_queued_streams_to_its_end() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "never run").await;
    let follower = follow(&env, &key, &id, None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = env
        .post_empty(&key, &format!("/v1/responses/{id}/cancel"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = follower.await.unwrap();
    assert_eq!(
        types(&events),
        ["response.created", "response.queued", "response.cancelled"]
    );
    assert_eq!(events[2].data["sequence_number"], 2);
    assert_eq!(events[2].data["response"]["status"], "cancelled");
    assert_eq!(stream_of(&env, &key, &id, None).await, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_background_or_stream_the_request_waits_for_the_result() {
    let env = TestEnv::start(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let (status, body) = env
        .submit(
            &key,
            json!({"model": "mock-1", "input": "wait for it", "store": false,
                   "metadata": {"k": "v"}, "user": "u-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["background"], false);
    assert_eq!(body["store"], false);
    assert_eq!(body["user"], "u-1");
    assert_eq!(body["metadata"]["k"], "v");
    assert_eq!(body["output"][0]["content"][0]["text"], mock_text(20));
    assert_eq!(body["usage"]["output_tokens"], 20);
    // It went through the queue and the worker like any job.
    let (jobs, attempt): (i64, i32) =
        sqlx::query_as("SELECT count(*), max(attempt) FROM tollgate.jobs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((jobs, attempt), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_request_answers_after_its_wait_bound() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.sync_wait_seconds = 1;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let started = std::time::Instant::now();
    let (status, body) = env
        .submit(&key, json!({"model": "mock-1", "input": "no worker"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "queued");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_stream_request_is_a_plain_error() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env
        .create_key(NewKey {
            name: "one".into(),
            rpm_limit: Some(1),
            ..Default::default()
        })
        .await;
    common::leave_room_in_minute(5).await;
    let body = json!({"model": "mock-1", "input": "x", "stream": true, "background": true});
    let first = env
        .http
        .post(env.url("/v1/responses"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    drop(first);
    let (status, error) = env.submit(&key, body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_job_and_gives_back_its_slot() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "delete me").await;
    assert_eq!(env.counters_of(&key).await.0, 1);
    let (status, body) = env.delete(&key, &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"id": id, "object": "response", "deleted": true})
    );
    assert_eq!(env.counters_of(&key).await, (0, 0, 0));
    let (status, _) = env.get(&key, &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(env.delete(&key, &id).await.0, StatusCode::NOT_FOUND);
    let snapshot = env.snapshot().await;
    assert_eq!((snapshot.jobs, snapshot.outbox), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_a_deleted_job_ends() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.stream_fallback_poll_ms = 600_000;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "gone soon").await;
    let follower = follow(&env, &key, &id, None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.delete(&key, &id).await.0, StatusCode::OK);
    let events = follower.await.unwrap();
    assert_eq!(
        types(&events),
        ["response.created", "response.queued", "error"]
    );
    assert_eq!(events[2].data["code"], "response_deleted");
    assert_eq!(events[2].data["sequence_number"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_items_list_the_stored_input() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let id = env.submit_ok(&key, "mock-1", "just a string").await;
    let (status, list) = env.input_items(&key, &id, "").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], false);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let item = &list["data"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "user");
    assert_eq!(
        item["content"],
        json!([{"type": "input_text", "text": "just a string"}])
    );
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(list["first_id"], item["id"]);
    assert_eq!(list["last_id"], item["id"]);

    let (_, created) = env
        .submit(
            &key,
            json!({"model": "mock-1", "background": true, "instructions": "not an item",
            "input": [
                {"role": "developer", "content": "d"},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "u1"},
                             {"type": "input_text", "text": "u2"}]},
                {"role": "assistant", "content": "a"},
            ]}),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let (_, list) = env.input_items(&key, id, "").await;
    let roles: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["assistant", "user", "developer"], "newest first");
    let (_, asc) = env.input_items(&key, id, "?order=asc&limit=2").await;
    assert_eq!(asc["data"][0]["role"], "developer");
    assert_eq!(
        asc["data"][1]["content"],
        json!([{"type": "input_text", "text": "u1"}, {"type": "input_text", "text": "u2"}])
    );
    assert_eq!(asc["has_more"], true);
    let after = asc["last_id"].as_str().unwrap();
    let (_, next) = env
        .input_items(&key, id, &format!("?order=asc&after={after}"))
        .await;
    assert_eq!(next["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        next["data"][0]["content"],
        json!([{"type": "output_text", "text": "a", "annotations": []}])
    );
    assert_eq!(next["has_more"], false);
    let (status, error) = env.input_items(&key, id, "?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["param"], "limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keys_job_is_not_found_on_every_route() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let owner = env.key().await;
    let other = env.key().await;
    let id = env.submit_ok(&owner, "mock-1", "mine").await;
    let routes = [
        (reqwest::Method::GET, format!("/v1/responses/{id}")),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{id}?stream=true"),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{id}?stream=true&starting_after=1"),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{id}/input_items"),
        ),
        (reqwest::Method::POST, format!("/v1/responses/{id}/cancel")),
        (reqwest::Method::DELETE, format!("/v1/responses/{id}")),
    ];
    for (method, path) in &routes {
        let resp = env
            .http
            .request(method.clone(), env.url(path))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let resp = env
            .http
            .request(method.clone(), env.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // Untouched: still queued, still the owner's.
    let (status, body) = env.get(&owner, &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edges_answer_in_openai_error_shape() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.max_body_bytes = 1024;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let check = |status: StatusCode, body: &Value, expected: StatusCode| {
        assert_eq!(status, expected, "{body}");
        for field in ["message", "type", "param", "code"] {
            assert!(
                body["error"].get(field).is_some(),
                "{field} missing: {body}"
            );
        }
    };
    // Unknown route.
    let resp = env
        .http
        .get(env.url("/v1/nothing"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    check(status, &resp.json().await.unwrap(), StatusCode::NOT_FOUND);
    // Wrong method.
    let resp = env
        .http
        .put(env.url("/v1/responses"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    check(
        status,
        &resp.json().await.unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
    );
    // Over the body limit.
    let big = json!({"model": "mock-1", "input": "x".repeat(4096), "background": true});
    let (status, body, _) = env.submit_raw(Some(&key), &big.to_string()).await;
    check(status, &body, StatusCode::PAYLOAD_TOO_LARGE);
    // Malformed JSON.
    let (status, body, _) = env.submit_raw(Some(&key), "{\"model\": ").await;
    check(status, &body, StatusCode::BAD_REQUEST);
    // A bad resume point.
    let id = env.submit_ok(&key, "mock-1", "x").await;
    let resp = env
        .http
        .get(env.url(&format!("/v1/responses/{id}?stream=true&starting_after=-1")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    check(status, &body, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "starting_after");
    assert_eq!(env.snapshot().await.jobs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let doc: Value = env
        .http
        .get(env.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "delete", "put", "patch"].contains(&m.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    documented.sort();
    assert_eq!(
        documented,
        [
            ("delete", "/admin/webhooks/{id}"),
            ("delete", "/v1/responses/{id}"),
            ("get", "/admin/keys"),
            ("get", "/admin/keys/{id}"),
            ("get", "/admin/keys/{id}/usage"),
            ("get", "/admin/webhooks"),
            ("get", "/v1/responses/{id}"),
            ("get", "/v1/responses/{id}/input_items"),
            ("patch", "/admin/keys/{id}"),
            ("post", "/admin/keys"),
            ("post", "/admin/keys/{id}/revoke"),
            ("post", "/admin/webhooks"),
            ("post", "/v1/responses"),
            ("post", "/v1/responses/{id}/cancel"),
        ]
        .map(|(m, p)| (m.to_string(), p.to_string()))
    );
    assert!(doc["components"]["schemas"]["CreateResponse"]["properties"]["input"].is_object());
    assert!(paths["/v1/responses"]["post"]["responses"]["429"].is_object());

    // Every documented route is served: a request reaches its handler, not the fallbacks.
    let unknown = format!("resp_{}", Uuid::nil().simple());
    for (method, path) in &documented {
        let resp = env
            .http
            .request(
                method.to_uppercase().parse().unwrap(),
                env.url(&path.replace("{id}", &unknown)),
            )
            .bearer_auth(&key)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_ne!(body["error"]["code"], "unknown_url", "{method} {path}");
    }
}
