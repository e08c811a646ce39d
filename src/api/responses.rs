//! `/v1/responses`: create (admission → job row → publish), retrieve and cancel.

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, State},
    http::{HeaderMap, HeaderName, HeaderValue},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};

use super::{bearer, body_error, object::response_object, ApiError, AppState};
use crate::{
    admission::{Admitted, Quota, RateReport, Rejection, Submission},
    ids::JobId,
    queue::outbox,
    request::{CreateResponse, InvalidRequest},
    store::{
        jobs::{self, Cancelled},
        keys::{self, ApiKey},
    },
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve))
        .route("/v1/responses/{id}/cancel", post(cancel))
}

fn missing_key() -> ApiError {
    ApiError::Unauthorized(
        "You didn't provide an API key. Send it as a Bearer token in the Authorization header."
            .into(),
    )
}

/// The caller's live key, or 401.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<ApiKey, ApiError> {
    let secret = bearer(headers).ok_or_else(missing_key)?;
    Ok(keys::find_live(&state.pool, secret)
        .await?
        .ok_or(Rejection::InvalidKey)?)
}

/// The caller's key and the job id of the path (404 for what is not a job id).
async fn owned_id(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<(ApiKey, JobId), ApiError> {
    let key = authenticate(state, headers).await?;
    let job_id = JobId::parse_public(id).ok_or_else(|| ApiError::job_not_found(id))?;
    Ok((key, job_id))
}

#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return Ok(body_error(rejection)),
    };
    let secret = bearer(&headers).ok_or_else(missing_key)?;
    let idempotency_key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= 255 => Some(k),
        Some(_) => {
            return Err(ApiError::InvalidRequest {
                message: "The Idempotency-Key header must be 1 to 255 visible ASCII characters."
                    .into(),
                param: None,
            })
        }
    };
    let parsed = CreateResponse::parse(&body).and_then(|(request, raw)| {
        if request.background != Some(true) {
            return Err(InvalidRequest {
                message: "Only background mode is served: set \"background\": true.".into(),
                param: Some("background".into()),
            });
        }
        if request.stream == Some(true) {
            return Err(InvalidRequest {
                message: "Streaming is not served yet: leave \"stream\" unset or false and poll."
                    .into(),
                param: Some("stream".into()),
            });
        }
        Ok((request, raw))
    });
    let decision = state
        .admission
        .admit(Submission {
            secret,
            body: parsed,
            idempotency_key,
        })
        .await;
    let mut response = match decision.result {
        Ok(Admitted::New {
            job,
            outbox_id,
            message,
        }) => {
            // Fast path: publish now. If RabbitMQ is unreachable the job is still committed and
            // its outbox row unsent; the relay publishes it when RabbitMQ is back.
            match state.publisher.publish(&message).await {
                Ok(()) => {
                    if let Err(e) = outbox::mark_sent(&state.pool, outbox_id).await {
                        tracing::warn!(job_id = %job.id, error = %e, "published, but could not mark the outbox row sent; the relay may publish it again");
                    }
                }
                Err(e) => {
                    tracing::warn!(job_id = %job.id, error = %e, "publish failed; the outbox relay will retry");
                }
            }
            Json(response_object(&job)).into_response()
        }
        Ok(Admitted::Replayed(job)) => Json(response_object(&job)).into_response(),
        Err(rejection) => ApiError::from(rejection).into_response(),
    };
    add_rate_headers(response.headers_mut(), &decision.rates);
    Ok(response)
}

/// OpenAI's `x-ratelimit-*` headers for the key's windows that have a limit.
fn add_rate_headers(headers: &mut HeaderMap, rates: &RateReport) {
    let mut put = |kind: &str, quota: &Option<Quota>| {
        if let Some(q) = quota {
            for (name, value) in [
                ("limit", q.limit.to_string()),
                ("remaining", q.remaining.to_string()),
                ("reset", format!("{}s", q.reset_secs)),
            ] {
                headers.insert(
                    HeaderName::try_from(format!("x-ratelimit-{name}-{kind}")).expect("valid name"),
                    HeaderValue::try_from(value).expect("valid value"),
                );
            }
        }
    };
    put("requests", &rates.requests);
    put("tokens", &rates.tokens);
}

#[tracing::instrument(skip_all, fields(job_id = %id))]
async fn retrieve(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (key, job_id) = owned_id(&state, &headers, &id).await?;
    let job = jobs::get_for_key(&state.pool, job_id, key.id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(&id))?;
    Ok(Json(response_object(&job)).into_response())
}

/// Cancels a queued or running job. Cancelling a cancelled job answers it again; cancelling a job
/// that finished otherwise is a 400, as with OpenAI.
#[tracing::instrument(skip_all, fields(job_id = %id))]
async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (key, job_id) = owned_id(&state, &headers, &id).await?;
    match jobs::cancel(&state.pool, job_id, key.id).await? {
        Cancelled::Now(job) => {
            tracing::info!(job_id = %job.id, "cancelled");
            Ok(Json(response_object(&job)).into_response())
        }
        Cancelled::AlreadyFinished(job) if job.status == crate::ids::JobStatus::Cancelled => {
            Ok(Json(response_object(&job)).into_response())
        }
        Cancelled::AlreadyFinished(job) => Err(ApiError::InvalidRequest {
            message: format!(
                "Cannot cancel a response that is already {}.",
                serde_json::to_value(job.status)
                    .expect("status serialises")
                    .as_str()
                    .unwrap_or("finished")
            ),
            param: None,
        }),
        Cancelled::NotFound => Err(ApiError::job_not_found(&id)),
    }
}
