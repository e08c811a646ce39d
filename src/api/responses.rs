//! `/v1/responses`: create (admission → job row → publish), retrieve, stream, cancel, delete.
//!
//! Every create goes through admission → job row → outbox → RabbitMQ → worker; the three modes
//! differ only in how the answer follows the job once admitted:
//! - `"background": true` (without `stream`): the `queued` object at once, to poll;
//! - `"stream": true` (with or without `background`): the event stream from `sequence_number` 0
//!   (see [`super::stream`]);
//! - neither: waits (woken by NOTIFY) until the job is finished, at most
//!   `server.sync_wait_seconds`, then answers the object as it stands.
//!
//! `store` is accepted and the job is stored whatever its value: the row is the job.

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, RawQuery, State},
    http::{HeaderMap, HeaderName, HeaderValue},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    bearer, body_error, input_items,
    object::response_object,
    openapi::{
        CreateResponse as CreateResponseBody, Deleted, ErrorBody, ResponseObject, StreamEventData,
    },
    query_pairs,
    stream::{Follower, StreamSlot},
    ApiError, AppState, JobPath,
};
use crate::{
    admission::{Admitted, Quota, RateReport, Rejection, Submission},
    billing,
    ids::JobId,
    request::CreateResponse,
    store::{
        jobs::{self, Cancelled, JobRow},
        keys::ApiKey,
    },
};

/// The routes, each documented by its handler's `#[utoipa::path]`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(retrieve, delete))
        .routes(routes!(cancel))
        .routes(routes!(input_items::list))
}

/// How the answer to a create follows the admitted job.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Background,
    Stream,
    Wait,
}

fn missing_key() -> ApiError {
    ApiError::Unauthorized(
        "You didn't provide an API key. Send it as a Bearer token in the Authorization header."
            .into(),
    )
}

/// The caller's live key, or 401.
pub(super) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<ApiKey, ApiError> {
    let secret = bearer(headers).ok_or_else(missing_key)?;
    Ok(state
        .admission
        .keys()
        .find_live(&state.pool, secret)
        .await?
        .ok_or(Rejection::InvalidKey)?)
}

/// The caller's key and the job id of the path (404 for what is not a job id).
pub(super) async fn owned_id(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<(ApiKey, JobId), ApiError> {
    let key = authenticate(state, headers).await?;
    let job_id = JobId::parse_public(id).ok_or_else(|| ApiError::job_not_found(id))?;
    Ok((key, job_id))
}

/// The caller's key and its job named by the path (404 when the key has no such job).
pub(super) async fn owned_job(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<(ApiKey, JobRow), ApiError> {
    let (key, job_id) = owned_id(state, headers, id).await?;
    let job = jobs::get_for_key(&state.pool, job_id, key.id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(id))?;
    Ok((key, job))
}

/// Creates a response: admission, then the job. The answer follows `background` and `stream`.
#[utoipa::path(
    post, path = "/v1/responses", tag = "responses", security(("api_key" = [])),
    request_body = CreateResponseBody,
    params(("Idempotency-Key" = Option<String>, Header,
            description = "The same key and idempotency key return the first job.")),
    responses(
        (status = 200, description = "The Response object: `queued` with `background: true`, \
            finished (or as it stands after `server.sync_wait_seconds`) without; with \
            `stream: true` the event stream.",
         content((ResponseObject = "application/json"),
                 (StreamEventData = "text/event-stream"))),
        (status = 400, description = "Invalid body, naming `param`; or a guardrail refused it",
         body = ErrorBody),
        (status = 401, description = "No key, or an invalid one", body = ErrorBody),
        (status = 403, description = "The key may not use the model", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body over `server.max_body_bytes`", body = ErrorBody),
        (status = 422, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 429, description = "A rate limit, jobs in flight, the budget, or (with \
            `stream: true`) `server.max_followers_per_key` streams already open", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job_id = tracing::field::Empty))]
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
                code: None,
            })
        }
    };
    let parsed = CreateResponse::parse(&body);
    let mode = match &parsed {
        Ok((request, _)) if request.stream == Some(true) => Mode::Stream,
        Ok((request, _)) if request.background == Some(true) => Mode::Background,
        _ => Mode::Wait,
    };
    // A stream takes its key's slot before admission, so a refused one writes nothing. A secret
    // that names no live key is left to admission, which refuses and counts it.
    let slot = match mode {
        Mode::Stream => match state
            .admission
            .keys()
            .find_live(&state.pool, secret)
            .await?
        {
            Some(key) => Some(StreamSlot::take(
                key.id,
                state.config.server.max_followers_per_key,
            )?),
            None => None,
        },
        Mode::Background | Mode::Wait => None,
    };
    let decision = state
        .admission
        .admit(Submission {
            secret,
            body: parsed,
            idempotency_key,
        })
        .await;
    let job = match decision.result {
        Ok(Admitted::New {
            job,
            outbox_id,
            message,
        }) => {
            // Published now; whatever fails here, the outbox relay publishes later.
            state.dispatch.publish(outbox_id, &message).await;
            tracing::Span::current().record("job_id", tracing::field::display(job.id));
            tracing::info!(model = %job.model, "job admitted");
            job
        }
        Ok(Admitted::Replayed(job)) => job,
        Err(rejection) => {
            tracing::info!(reason = %rejection.reason(), "request rejected");
            let mut response = ApiError::from(rejection).into_response();
            add_rate_headers(response.headers_mut(), &decision.rates);
            return Ok(response);
        }
    };
    let mut response = match mode {
        Mode::Background => Json(object_now(&state, &job).await?).into_response(),
        Mode::Stream => {
            let slot = match slot {
                Some(slot) => slot,
                // The key became live between the two reads.
                None => StreamSlot::take(job.key_id, state.config.server.max_followers_per_key)?,
            };
            Follower::new(state, job.id, slot, None).into_sse()
        }
        Mode::Wait => {
            let job = wait_finished(&state, job).await?;
            Json(object_now(&state, &job).await?).into_response()
        }
    };
    add_rate_headers(response.headers_mut(), &decision.rates);
    Ok(response)
}

/// The job once finished, or as it stands after `server.sync_wait_seconds` (or at shutdown).
async fn wait_finished(state: &AppState, job: JobRow) -> Result<JobRow, ApiError> {
    let mut subscription = state.watch.subscribe(job.id);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(state.config.server.sync_wait_seconds);
    loop {
        let current = jobs::get_for_key(&state.pool, job.id, job.key_id)
            .await?
            .ok_or_else(|| ApiError::job_not_found(&job.id.to_string()))?;
        if current.status.is_terminal() {
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, subscription.changed()).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                tracing::info!(job_id = %job.id, "stopped waiting; answering the job as it stands");
                return Ok(current);
            }
        }
    }
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

/// The Response object; with `?stream=true`, its event stream after `starting_after` (all of it
/// when absent), replayed from the rows and then followed live until the terminal event.
#[utoipa::path(
    get, path = "/v1/responses/{id}", tag = "responses", security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The response id, `resp_…`"),
        ("stream" = Option<bool>, Query, description = "Answer the event stream"),
        ("starting_after" = Option<u64>, Query,
         description = "With `stream`: only the events after this sequence number"),
    ),
    responses(
        (status = 200, description = "The Response object, or its event stream",
         content((ResponseObject = "application/json"),
                 (StreamEventData = "text/event-stream"))),
        (status = 400, description = "Invalid `stream` or `starting_after`", body = ErrorBody),
        (status = 401, description = "No key, or an invalid one", body = ErrorBody),
        (status = 404, description = "No such response for this key", body = ErrorBody),
        (status = 429, description = "With `stream`: the key already has \
            `server.max_followers_per_key` streams open", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job_id = %id))]
async fn retrieve(
    State(state): State<AppState>,
    headers: HeaderMap,
    JobPath(id): JobPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (key, job) = owned_job(&state, &headers, &id).await?;
    let query = query_pairs(query);
    let stream = match query.get("stream").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(invalid_param(
                "`stream` must be `true` or `false`.",
                "stream",
            ))
        }
    };
    let starting_after = match query.get("starting_after") {
        None => None,
        // A JSON integer as OpenAPI's `int64` has it, never negative.
        Some(n) => Some(
            n.parse::<i64>()
                .ok()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| {
                    invalid_param(
                        "`starting_after` must be an integer from 0 to 2^63 - 1.",
                        "starting_after",
                    )
                })?,
        ),
    };
    if stream {
        let slot = StreamSlot::take(key.id, state.config.server.max_followers_per_key)?;
        return Ok(Follower::new(state, job.id, slot, starting_after).into_sse());
    }
    Ok(Json(object_now(&state, &job).await?).into_response())
}

/// The Response object of `job` with its output as the rows hold it.
async fn object_now(state: &AppState, job: &JobRow) -> Result<Value, ApiError> {
    let output = jobs::output(&state.pool, job).await?;
    Ok(response_object(job, &output))
}

fn invalid_param(message: &str, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.into()),
        code: None,
    }
}

/// Deletes a job of the caller's key, finished or not (an unfinished one stops, and gives back
/// what admission took).
#[utoipa::path(
    delete, path = "/v1/responses/{id}", tag = "responses", security(("api_key" = [])),
    params(("id" = String, Path, description = "The response id, `resp_…`")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, description = "No key, or an invalid one", body = ErrorBody),
        (status = 404, description = "No such response for this key", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job_id = %id))]
async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    JobPath(id): JobPath,
) -> Result<Json<Value>, ApiError> {
    let (key, job_id) = owned_id(&state, &headers, &id).await?;
    let charge = |stopping: &jobs::Stopping| billing::for_stopped(&state.config, stopping);
    if !jobs::delete_for_key(&state.pool, job_id, key.id, charge).await? {
        return Err(ApiError::job_not_found(&id));
    }
    tracing::info!(job_id = %job_id, "deleted");
    Ok(Json(
        json!({"id": job_id.to_string(), "object": "response", "deleted": true}),
    ))
}

/// Cancels a queued or running job. Cancelling a cancelled job answers it again; cancelling a job
/// that finished otherwise is a 400, as with OpenAI.
#[utoipa::path(
    post, path = "/v1/responses/{id}/cancel", tag = "responses", security(("api_key" = [])),
    params(("id" = String, Path, description = "The response id, `resp_…`")),
    responses(
        (status = 200, description = "The cancelled Response object", body = ResponseObject),
        (status = 400, description = "The response already finished otherwise", body = ErrorBody),
        (status = 401, description = "No key, or an invalid one", body = ErrorBody),
        (status = 404, description = "No such response for this key", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job_id = %id))]
async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    JobPath(id): JobPath,
) -> Result<Response, ApiError> {
    let (key, job_id) = owned_id(&state, &headers, &id).await?;
    let charge = |stopping: &jobs::Stopping| billing::for_stopped(&state.config, stopping);
    match jobs::cancel(&state.pool, job_id, key.id, charge).await? {
        Cancelled::Now(job) => {
            tracing::info!(job_id = %job.id, "cancelled");
            Ok(Json(object_now(&state, &job).await?).into_response())
        }
        Cancelled::AlreadyFinished(job) if job.status == crate::ids::JobStatus::Cancelled => {
            Ok(Json(object_now(&state, &job).await?).into_response())
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
            code: None,
        }),
        Cancelled::NotFound => Err(ApiError::job_not_found(&id)),
    }
}
