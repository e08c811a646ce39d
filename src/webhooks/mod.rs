//! Webhooks in OpenAI's shape, signed by the Standard Webhooks specification: one consumer of the
//! lifecycle events (`queue/events.rs`). The whole story:
//!
//! - **Endpoints** belong to a key and name the types they want (`response.completed`,
//!   `response.failed`, `response.cancelled`, `response.incomplete`). They are added with the CLI
//!   (`tollgate webhooks add`, which shows a new `whsec_…` secret once) or declared in the
//!   configuration (`[[webhooks.endpoints]]`, registered when a worker starts). A URL must be
//!   http(s) and resolve to public addresses only, unless `webhooks.allow_networks` permits
//!   others ([`ssrf`]); stored in `tollgate.webhook_endpoints` (`store/webhooks.rs`).
//! - **Deliveries** ([`deliver`]): every worker process consumes the terminal events from the
//!   quorum queue `webhooks.queue` and POSTs each to the endpoints of the job's key that want its
//!   type: the body [`payload`], the headers `webhook-id` (the event id, the same on every
//!   attempt), `webhook-timestamp` and `webhook-signature` ([`sign`]), resolved through a
//!   resolver that refuses non-public addresses (so DNS cannot be re-pointed at the inside), no
//!   redirect followed.
//! - **Retries**: an attempt that fails to connect, times out or gets an answer other than 2xx is
//!   retried after `webhooks.retry_schedule_secs[n - 1]` (the message waits in the delay queue
//!   `<queue>.delay.<n>`, then comes back), up to 24 hours by default; after the last retry the
//!   delivery goes to `<queue>.dead`.
//! - **Records**: every attempt is a row of `tollgate.webhook_deliveries` (view
//!   `tollgate.webhook_delivery_log`), and counted in `tollgate_webhook_deliveries_total` and
//!   `tollgate_webhook_delivery_seconds`.
//! - **Replay** ([`replay`]): `tollgate webhooks replay <delivery id>` sends a recorded delivery
//!   again, now, and records it.
//!
//! Delivery is at least once: a receiver may get an event again (a worker stopped between the
//! answer and the ack), with the same `webhook-id`.

pub mod deliver;
pub mod sign;
pub mod ssrf;

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{config::Config, queue::events::JobEvent, store};

/// The webhook event types, as OpenAI names them.
pub const EVENT_TYPES: [&str; 4] = [
    "response.completed",
    "response.failed",
    "response.cancelled",
    "response.incomplete",
];

/// The webhook type of a job that reached `status`, if it has one.
pub fn webhook_type(status: &str) -> Option<&'static str> {
    match status {
        "completed" => Some(EVENT_TYPES[0]),
        "failed" => Some(EVENT_TYPES[1]),
        "cancelled" => Some(EVENT_TYPES[2]),
        "incomplete" => Some(EVENT_TYPES[3]),
        _ => None,
    }
}

/// The body of a webhook, OpenAI's shape: `{"id": "evt_…", "object": "event", "type": …,
/// "created_at": <unix seconds>, "data": {"id": "resp_…"}}`.
pub fn payload(event: &JobEvent, kind: &str) -> String {
    json!({
        "id": event.id,
        "object": "event",
        "type": kind,
        "created_at": event.occurred_at.timestamp(),
        "data": {"id": event.job_id},
    })
    .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Endpoint(#[from] ssrf::EndpointError),
    #[error("unknown event type {0:?}; the types are {EVENT_TYPES:?}")]
    UnknownType(String),
    #[error(transparent)]
    Secret(#[from] sign::SecretError),
    #[error("no key with id {0}")]
    NoSuchKey(Uuid),
    #[error("no webhook delivery with id {0}")]
    NoSuchDelivery(i64),
    #[error("the endpoint of delivery {0} was removed; it is not sent again")]
    EndpointRemoved(i64),
    #[error("invalid webhooks.allow_networks: {0}")]
    AllowList(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Checks the event types an endpoint asks for (`None` or empty: all).
pub fn check_types(types: Option<&[String]>) -> Result<Option<Vec<String>>, WebhookError> {
    let Some(types) = types.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if let Some(bad) = types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
        return Err(WebhookError::UnknownType(bad.clone()));
    }
    Ok(Some(types.to_vec()))
}

/// Adds an endpoint to a key (or updates the key's live endpoint at this URL), after checking its
/// URL against the address policy. With no `secret`, a new one is made. Returns the endpoint's
/// id and its secret.
pub async fn add_endpoint(
    pool: &PgPool,
    config: &Config,
    key_id: Uuid,
    url: &str,
    types: Option<&[String]>,
    secret: Option<&str>,
) -> Result<(Uuid, String), WebhookError> {
    let types = check_types(types)?;
    let policy = ssrf::AddressPolicy::new(&config.webhooks.allow_networks)
        .map_err(WebhookError::AllowList)?;
    let url = policy.check_url(url).await?;
    let secret = match secret {
        Some(text) => {
            sign::Secret::parse(text)?;
            text.to_string()
        }
        None => sign::Secret::generate().1,
    };
    let id = store::webhooks::upsert(pool, key_id, url.as_str(), types.as_deref(), &secret)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                WebhookError::NoSuchKey(key_id)
            }
            _ => WebhookError::Database(e),
        })?;
    Ok((id, secret))
}

/// What one POST of a webhook gave: the answer's status, or why there was none.
pub type Sent = Result<u16, String>;

/// POSTs a webhook body to `url`, signed for this moment. IP-literal hosts are checked here
/// (the client's resolver sees names only).
pub async fn send(
    client: &reqwest::Client,
    policy: &ssrf::AddressPolicy,
    url: &url::Url,
    secret: &sign::Secret,
    event_id: &str,
    body: &str,
) -> Sent {
    ssrf::check_literal(policy, url).map_err(|e| e.to_string())?;
    let timestamp = chrono::Utc::now().timestamp();
    let mut request = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            reqwest::header::USER_AGENT,
            concat!("tollgate-webhooks/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in sign::headers(secret, event_id, timestamp, body.as_bytes()) {
        request = request.header(name, value);
    }
    match request.body(body.to_string()).send().await {
        Ok(answer) => Ok(answer.status().as_u16()),
        Err(e) => Err(describe(&e)),
    }
}

/// A failed request's cause chain, in one line.
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_string()
    } else if error.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What a replay gave.
#[derive(Debug)]
pub struct Replayed {
    /// The id of the new delivery row.
    pub delivery_id: i64,
    pub attempt: i32,
    pub sent: Sent,
    pub latency: Duration,
}

/// Sends the recorded delivery `id` again, now (signed anew, the same `webhook-id` and body), and
/// records the attempt as a replay (`outcome` delivered or failed; a replay is not retried).
pub async fn replay(pool: &PgPool, config: &Config, id: i64) -> Result<Replayed, WebhookError> {
    let recorded = store::webhooks::recorded(pool, id)
        .await?
        .ok_or(WebhookError::NoSuchDelivery(id))?;
    if recorded.disabled {
        return Err(WebhookError::EndpointRemoved(id));
    }
    let policy = ssrf::AddressPolicy::new(&config.webhooks.allow_networks)
        .map_err(WebhookError::AllowList)?;
    let url = policy.check_url(&recorded.url).await?;
    let secret = sign::Secret::parse(&recorded.secret)?;
    let client = ssrf::client(&policy, Duration::from_millis(config.webhooks.timeout_ms));
    let started = Instant::now();
    let sent = send(
        &client,
        &policy,
        &url,
        &secret,
        &recorded.event_id,
        &recorded.payload,
    )
    .await;
    let latency = started.elapsed();
    let delivered = matches!(sent, Ok(code) if (200..300).contains(&code));
    let attempt = store::webhooks::Attempt {
        endpoint_id: recorded.endpoint_id,
        event_id: recorded.event_id,
        event_type: recorded.event_type,
        job_id: recorded.job_id,
        attempt: recorded.next_attempt,
        outcome: if delivered { "delivered" } else { "failed" },
        status_code: sent.as_ref().ok().map(|c| i32::from(*c)),
        latency_ms: Some(latency.as_millis().min(i32::MAX as u128) as i32),
        error: error_of(&sent),
        replay: true,
        payload: recorded.payload,
    };
    let delivery_id = store::webhooks::record(pool, &attempt).await?;
    Ok(Replayed {
        delivery_id,
        attempt: attempt.attempt,
        sent,
        latency,
    })
}

/// The error to record for an attempt: why there was no answer, or which answer it was.
pub fn error_of(sent: &Sent) -> Option<String> {
    match sent {
        Ok(code) if (200..300).contains(code) => None,
        Ok(code) => Some(format!("the endpoint answered {code}")),
        Err(e) => Some(e.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(status: &str) -> JobEvent {
        serde_json::from_value(json!({
            "v": 1, "id": "evt_0123456789abcdef0123456789abcdef", "type": format!("job.{status}"),
            "job_id": "resp_019ad8f2c4e07b21a1f0c3d5e7f90123",
            "key_id": "019ad8f1-0b2c-7d3e-8f40-5a6b7c8d9e0f", "model": "mock-1",
            "status": status, "seq": 3, "attempt": 1, "input_tokens": null,
            "output_tokens": null, "usage_estimated": null, "reserved_micro_usd": 0,
            "cost_micro_usd": null, "charged_micro_usd": null, "error": null,
            "incomplete_reason": null, "created_at": "2026-12-01T05:31:02.114208Z",
            "started_at": null, "finished_at": null,
            "occurred_at": "2026-12-01T05:31:02.362950Z"
        }))
        .unwrap()
    }

    #[test]
    fn each_ending_has_its_openai_type_and_nothing_else_has_one() {
        let ends = ["completed", "failed", "cancelled", "incomplete"];
        let types: Vec<_> = ends.iter().map(|s| webhook_type(s)).collect();
        assert_eq!(types, EVENT_TYPES.map(Some));
        for status in ["queued", "in_progress", "deleted", ""] {
            assert_eq!(webhook_type(status), None, "{status}");
        }
    }

    #[test]
    fn the_payload_has_openai_s_shape() {
        let body: serde_json::Value =
            serde_json::from_str(&payload(&event("incomplete"), "response.incomplete")).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "evt_0123456789abcdef0123456789abcdef",
                "object": "event",
                "type": "response.incomplete",
                "created_at": 1_796_103_062,
                "data": {"id": "resp_019ad8f2c4e07b21a1f0c3d5e7f90123"},
            })
        );
    }

    #[test]
    fn endpoints_ask_for_known_types_only() {
        assert_eq!(check_types(None).unwrap(), None);
        assert_eq!(check_types(Some(&[])).unwrap(), None);
        let failed = vec!["response.failed".to_string()];
        assert_eq!(check_types(Some(&failed)).unwrap(), Some(failed));
        let err = check_types(Some(&["response.done".into()])).unwrap_err();
        assert!(err.to_string().contains("response.done"), "{err}");
    }
}
