//! `/v1/responses`: create (admission → job row → publish) and retrieve.

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};

use super::{bearer, body_error, object::response_object, ApiError, AppState};
use crate::{
    admission,
    ids::JobId,
    queue::outbox,
    request::{CreateResponse, InvalidRequest},
    store::{jobs, keys},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve))
}

fn missing_key() -> ApiError {
    ApiError::Unauthorized(
        "You didn't provide an API key. Send it as a Bearer token in the Authorization header."
            .into(),
    )
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
    let admitted = admission::admit(&state.pool, &state.config, secret, parsed).await?;

    // Fast path: publish now. If RabbitMQ is unreachable the job is still committed and its
    // outbox row unsent; the relay publishes it when RabbitMQ is back.
    match state.publisher.publish(&admitted.message).await {
        Ok(()) => {
            if let Err(e) = outbox::mark_sent(&state.pool, admitted.outbox_id).await {
                tracing::warn!(job_id = %admitted.job.id, error = %e, "published, but could not mark the outbox row sent; the relay may publish it again");
            }
        }
        Err(e) => {
            tracing::warn!(job_id = %admitted.job.id, error = %e, "publish failed; the outbox relay will retry");
        }
    }
    Ok(Json(response_object(&admitted.job)).into_response())
}

#[tracing::instrument(skip_all, fields(job_id = %id))]
async fn retrieve(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let secret = bearer(&headers).ok_or_else(missing_key)?;
    let key = keys::find_live(&state.pool, secret)
        .await?
        .ok_or(admission::Rejection::InvalidKey)?;
    let job_id = JobId::parse_public(&id).ok_or_else(|| ApiError::job_not_found(&id))?;
    let job = jobs::get_for_key(&state.pool, job_id, key.id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(&id))?;
    Ok(Json(response_object(&job)).into_response())
}
