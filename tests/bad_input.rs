//! Every bad input in one table: what a client may send wrong, from the HTTP layer (a URL or head
//! hyper cannot take, conflicting lengths, an oversized body) to the JSON (NUL characters, wrong
//! types, OpenAI's metadata limits) and other keys' jobs. Each row goes over a raw connection and
//! must be answered with its status in OpenAI's error shape (`content-type: application/json`,
//! `error.message`, `type`, `param`, `code`), leaving the rows and the queue as they were.

mod common;

use common::{http_request, isolated_config, raw_request, RawResponse, TestEnv};
use serde_json::{json, Value};
use tollgate::config::ModelConfig;

/// One bad input and what it must get.
struct Row {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    /// The `param` the error must name, when it names one.
    param: Option<String>,
    /// A further check of the answer.
    check: Option<fn(&RawResponse)>,
}

fn row(name: &'static str, request: Vec<u8>, status: u16) -> Row {
    Row {
        name,
        request,
        status,
        param: None,
        check: None,
    }
}

impl Row {
    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.into());
        self
    }

    fn check(mut self, check: fn(&RawResponse)) -> Self {
        self.check = Some(check);
        self
    }
}

/// `POST /v1/responses` with `body` as is.
fn post(key: &str, body: impl AsRef<[u8]>) -> Vec<u8> {
    let auth = format!("Bearer {key}");
    http_request(
        "POST",
        "/v1/responses",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_ref(),
    )
}

fn post_json(key: &str, body: Value) -> Vec<u8> {
    post(key, body.to_string())
}

fn with_key(method: &str, key: &str, path: &str) -> Vec<u8> {
    http_request(
        method,
        path,
        &[("authorization", &format!("Bearer {key}"))],
        b"",
    )
}

/// A gzip member whose DEFLATE stream (one block of fixed Huffman codes: a literal `a`, then
/// matches of 258 bytes at distance 1) inflates `1 + 258 × matches` bytes of `a` from 13 bits per
/// match.
fn gzip_bomb(matches: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        /// `count` bits of `value`, least significant first.
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.n;
            self.n += count;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code, most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            let reversed = (0..len).fold(0, |r, i| (r << 1) | ((code >> i) & 1));
            self.put(reversed, len);
        }
    }
    let mut bits = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // the last block
    bits.put(1, 2); // fixed Huffman codes
    bits.code(0x30 + u64::from(b'a'), 8);
    for _ in 0..matches {
        bits.code(0b1100_0101, 8); // length 258
        bits.code(0, 5); // distance 1
    }
    bits.code(0, 7); // end of block
    if bits.n > 0 {
        bits.put(0, 8 - bits.n);
    }
    let size = 1 + 258 * matches as u64;
    let mut crc = !0u32;
    let mut table = [0u32; 256];
    for (i, entry) in table.iter_mut().enumerate() {
        *entry = (0..8).fold(i as u32, |c, _| {
            if c & 1 == 1 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            }
        });
    }
    for _ in 0..size {
        crc = table[((crc ^ u32::from(b'a')) & 0xff) as usize] ^ (crc >> 8);
    }
    let mut out = bits.out;
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_in_openai_shape_and_leaves_nothing() {
    let mut config = isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.max_body_bytes = 1024 * 1024;
    config.server.max_input_items = 3;
    let env = TestEnv::front_with(config).await;
    let key = env.key().await;
    let other = env.key().await;
    let mine = env.submit_ok(&key, "mock-1", "mine").await;
    let theirs = env.submit_ok(&other, "mock-1", "theirs").await;

    let ok = |input: Value| json!({"model": "mock-1", "input": input, "background": true});
    let with = |field: &str, value: Value| {
        let mut body = ok(json!("hi"));
        body[field] = value;
        body
    };
    let message = json!({"role": "user", "content": "hi"});
    let seventeen: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let deep = format!(
        r#"{{"model":"mock-1","input":{}"hi"{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    // 26 MB of JSON-ish text once inflated, from 163 KB; the front never inflates it.
    let bomb = gzip_bomb(100_000);
    assert!(bomb.len() < 200_000, "{} bytes", bomb.len());
    let long_id = format!("/v1/responses/resp_{}", "a".repeat(10_000));
    let big_token = format!("Bearer {}", "k".repeat(1 << 20));
    let thousand_headers: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("x-h{i}"), "v".to_string()))
        .collect();
    let thousand_headers: Vec<(&str, &str)> = thousand_headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut bad_utf8 = br#"{"model":"mock-1","input":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bad_utf8.extend_from_slice(br#""}"#);
    let two_lengths = format!(
        "POST /v1/responses HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{{}}"
    )
    .into_bytes();

    let rows = vec![
        // NUL characters, each named.
        row("NUL in input", post_json(&key, ok(json!("a\u{0}b"))), 400).param("input"),
        row(
            "NUL in a message",
            post_json(&key, ok(json!([{"role": "user", "content": "x\u{0}"}]))),
            400,
        )
        .param("input[0].content"),
        row(
            "NUL in instructions",
            post_json(&key, with("instructions", json!("be\u{0}nice"))),
            400,
        )
        .param("instructions"),
        row(
            "NUL in a metadata key",
            post_json(&key, with("metadata", json!({"k\u{0}": "v"}))),
            400,
        )
        .param("metadata.k\\u0000"),
        row(
            "NUL in a metadata value",
            post_json(&key, with("metadata", json!({"k": "\u{0}"}))),
            400,
        )
        .param("metadata.k"),
        row(
            "NUL in user",
            post_json(&key, with("user", json!("u\u{0}"))),
            400,
        )
        .param("user"),
        row(
            "NUL in an unknown field",
            post_json(&key, with("bogus", json!("\u{0}"))),
            400,
        )
        .param("bogus"),
        // OpenAI's metadata limits.
        row(
            "17 metadata pairs",
            post_json(&key, with("metadata", Value::Object(seventeen))),
            400,
        )
        .param("metadata"),
        row(
            "a 65-character metadata key",
            post_json(&key, with("metadata", json!({"k".repeat(65): "v"}))),
            400,
        )
        .param("metadata"),
        row(
            "a 513-character metadata value",
            post_json(&key, with("metadata", json!({"k": "v".repeat(513)}))),
            400,
        )
        .param("metadata.k"),
        row(
            "more items than max_input_items",
            post_json(&key, ok(json!([message, message, message, message]))),
            400,
        )
        .param("input"),
        // The JSON.
        row(
            "an unknown field",
            post_json(&key, with("bogus", json!(1))),
            400,
        )
        .param("bogus"),
        row(
            "a content part of an unknown type with a text field",
            post_json(
                &key,
                ok(json!([{"role": "user", "content": [{"type": "bogus", "text": "hi"}]}])),
            ),
            400,
        )
        .param("input[0].content[0].type"),
        row(
            "model of the wrong type",
            post_json(&key, json!({"model": 1, "input": "hi"})),
            400,
        )
        .param("model"),
        row(
            "input of the wrong type",
            post_json(&key, json!({"model": "mock-1", "input": 5})),
            400,
        )
        .param("input"),
        row(
            "max_output_tokens of the wrong type",
            post_json(&key, with("max_output_tokens", json!("ten"))),
            400,
        )
        .param("max_output_tokens"),
        row(
            "metadata of the wrong type",
            post_json(&key, with("metadata", json!("x"))),
            400,
        )
        .param("metadata"),
        row("not JSON", post(&key, "{\"model\": "), 400),
        row("a JSON array", post(&key, "[1, 2]"), 400),
        row("deep JSON nesting", post(&key, deep), 400),
        row("bad UTF-8 in the body", post(&key, bad_utf8), 400),
        row(
            "a gzip bomb",
            http_request(
                "POST",
                "/v1/responses",
                &[
                    ("authorization", &format!("Bearer {key}")),
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                &bomb,
            ),
            400,
        ),
        // Sizes.
        row(
            "a body over max_body_bytes",
            post(&key, vec![b' '; 2 * 1024 * 1024]),
            413,
        ),
        row(
            "a 50 MB body",
            post(&key, vec![b' '; 50 * 1024 * 1024]),
            413,
        ),
        row(
            "a 1 MB header",
            http_request(
                "GET",
                &format!("/v1/responses/{mine}"),
                &[
                    ("authorization", &format!("Bearer {key}")),
                    ("x-big", &"h".repeat(1 << 20)),
                ],
                b"",
            ),
            431,
        ),
        row(
            "1,000 headers",
            http_request("GET", "/v1/responses", &thousand_headers, b""),
            431,
        ),
        row(
            "a 1 MB bearer token",
            http_request(
                "GET",
                &format!("/v1/responses/{mine}"),
                &[("authorization", &big_token)],
                b"",
            ),
            431,
        ),
        row(
            "a 100 KB path",
            with_key(
                "GET",
                &key,
                &format!("/v1/responses/resp_{}", "a".repeat(100 * 1024)),
            ),
            414,
        ),
        row("two different Content-Lengths", two_lengths, 400),
        row(
            "Transfer-Encoding beside Content-Length",
            format!(
                "POST /v1/responses HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\n\
                 transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        row(
            "a Transfer-Encoding that is not chunked",
            http_request(
                "POST",
                "/v1/responses",
                &[
                    ("authorization", &format!("Bearer {key}")),
                    ("transfer-encoding", "gzip"),
                ],
                b"",
            ),
            400,
        ),
        row(
            "a malformed request line",
            b"GET /v1/responses\r\nhost: tollgate\r\n\r\n".to_vec(),
            400,
        ),
        row(
            "a header name with a space",
            b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\nbad header: x\r\n\r\n".to_vec(),
            400,
        ),
        row(
            "a bare CR in a header value",
            b"GET /healthz HTTP/1.1\r\nhost: tollgate\r\nx-a: b\rc\r\n\r\n".to_vec(),
            400,
        ),
        row(
            "a 10 KB id, echoed as a short prefix",
            with_key("GET", &key, &long_id),
            404,
        )
        .check(|answer| {
            let message = answer.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(message.len() < 200, "{} bytes echoed", message.len());
            assert!(message.contains("resp_aaaa"), "{message}");
        }),
        // Routes and methods.
        row(
            "a wrong method",
            with_key("PUT", &key, "/v1/responses"),
            405,
        ),
        row(
            "a wrong method on a job",
            with_key("PATCH", &key, &format!("/v1/responses/{mine}")),
            405,
        ),
        row(
            "an unknown route",
            with_key("GET", &key, "/v1/nothing"),
            404,
        ),
        // Ids.
        row(
            "an id that is not UTF-8",
            with_key("GET", &key, "/v1/responses/resp_%FF"),
            404,
        ),
        row(
            "an id that is not UTF-8, cancelled",
            with_key("POST", &key, "/v1/responses/resp_%FF/cancel"),
            404,
        ),
        row(
            "an id that is not UTF-8, deleted",
            with_key("DELETE", &key, "/v1/responses/resp_%FF"),
            404,
        ),
        row(
            "an id that is not UTF-8, its input items",
            with_key("GET", &key, "/v1/responses/resp_%FF/input_items"),
            404,
        ),
        row(
            "SQL metacharacters in an id",
            with_key(
                "GET",
                &key,
                "/v1/responses/resp_1'%20OR%20'1'='1';%20DROP%20TABLE%20tollgate.jobs;--",
            ),
            404,
        ),
        row(
            "SQL metacharacters in an id, cancelled",
            with_key(
                "POST",
                &key,
                "/v1/responses/'%3B%20DELETE%20FROM%20jobs%3B--/cancel",
            ),
            404,
        ),
        row(
            "SQL metacharacters in an id, deleted",
            with_key("DELETE", &key, "/v1/responses/resp_%25'%20OR%201=1--"),
            404,
        ),
        // Keys.
        row(
            "no key",
            http_request("GET", &format!("/v1/responses/{mine}"), &[], b""),
            401,
        ),
        row(
            "an unknown key",
            with_key("GET", "tg_not_a_key", &format!("/v1/responses/{mine}")),
            401,
        ),
        row(
            "a Basic scheme",
            http_request(
                "GET",
                &format!("/v1/responses/{mine}"),
                &[("authorization", &format!("Basic {key}"))],
                b"",
            ),
            401,
        ),
        row(
            "an uppercase BEARER scheme is accepted",
            http_request(
                "GET",
                &format!("/v1/responses/{mine}"),
                &[("authorization", &format!("BEARER {key}"))],
                b"",
            ),
            200,
        ),
        row(
            "a lowercase bearer scheme is accepted",
            http_request(
                "GET",
                &format!("/v1/responses/{mine}"),
                &[("authorization", &format!("bearer {key}"))],
                b"",
            ),
            200,
        ),
        row(
            "another key's job",
            with_key("GET", &key, &format!("/v1/responses/{theirs}")),
            404,
        ),
        row(
            "another key's job, streamed",
            with_key("GET", &key, &format!("/v1/responses/{theirs}?stream=true")),
            404,
        ),
        row(
            "another key's job, cancelled",
            with_key("POST", &key, &format!("/v1/responses/{theirs}/cancel")),
            404,
        ),
        row(
            "another key's job, deleted",
            with_key("DELETE", &key, &format!("/v1/responses/{theirs}")),
            404,
        ),
        row(
            "another key's job, its input items",
            with_key("GET", &key, &format!("/v1/responses/{theirs}/input_items")),
            404,
        ),
    ];

    let before = env.snapshot().await;
    let mut failures = Vec::new();
    let count = rows.len();
    for row in rows {
        let answer = raw_request(env.addr, row.request).await;
        let body = answer.json();
        let mut wrong = Vec::new();
        if answer.status != row.status {
            wrong.push(format!(
                "status {} instead of {}",
                answer.status, row.status
            ));
        }
        if row.status >= 400 {
            let content_type = answer.header("content-type").unwrap_or_default();
            if !content_type.starts_with("application/json") {
                wrong.push(format!("content-type {content_type:?}"));
            }
            for field in ["message", "type", "param", "code"] {
                if body["error"].get(field).is_none() {
                    wrong.push(format!("no error.{field}"));
                }
            }
            if !body["error"]["message"].is_string() || !body["error"]["type"].is_string() {
                wrong.push("error.message and error.type must be strings".into());
            }
        }
        if let Some(param) = &row.param {
            if body["error"]["param"] != json!(param) {
                wrong.push(format!(
                    "param {} instead of {param:?}",
                    body["error"]["param"]
                ));
            }
        }
        if let Some(check) = row.check {
            check(&answer);
        }
        if env.snapshot().await != before {
            wrong.push("rows, counters or the queue changed".into());
        }
        if !wrong.is_empty() {
            let shown: String = String::from_utf8_lossy(&answer.body)
                .chars()
                .take(300)
                .collect();
            failures.push(format!("{}: {} — {shown}", row.name, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Both jobs are as they were.
    for (secret, id) in [(&key, &mine), (&other, &theirs)] {
        let (status, job) = env.get(secret, id).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{job}");
        assert_eq!(job["status"], "queued");
    }
}
