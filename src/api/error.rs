//! The HTTP error type. Every error leaves as OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, with OpenAI's status code; internal errors are
//! logged with their cause and answered without details.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::{admission::Rejection, request::echo};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: no key, or a key that is unknown, revoked or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// 400: a malformed or invalid request.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        /// OpenAI's code for the refusal (`unknown_parameter`, `unsupported_parameter`, …).
        code: Option<&'static str>,
    },
    /// 403: the key may not do this.
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    /// 404: no such route, job, or model.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413: the body is over the configured limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 408: the request's head or body did not arrive in time; the connection closes.
    #[error("The request was not received in time. Send the whole request without pausing.")]
    RequestTimeout,
    /// 400: hyper could not parse the request (request line, a header, conflicting
    /// `Content-Length`s); the connection closes.
    #[error("The request could not be parsed as HTTP/1.1: a malformed request line or header, or conflicting Content-Length headers.")]
    MalformedRequest,
    /// 414: a URL over hyper's 64 KiB; the connection closes.
    #[error("The request URL is too long.")]
    UriTooLong,
    /// 431: a head over hyper's ~400 KiB buffer or with over 100 headers; the connection closes.
    #[error("The request headers are too large: at most about 400 KiB and 100 headers.")]
    HeadersTooLarge,
    /// An extractor's plain-text rejection (its 4xx or 5xx status), given OpenAI's shape.
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    /// 422: the Idempotency-Key was used before with another body.
    #[error("{0}")]
    Unprocessable(String),
    /// 429: a rate limit; `retry_after` in seconds.
    #[error("{message}")]
    RateLimited {
        message: String,
        kind: &'static str,
        retry_after: Option<u64>,
    },
    /// 400 naming the guardrail that refused the request.
    #[error("{0}")]
    Guardrail(String),
    /// 429 `insufficient_quota`: the key's budget cannot cover the request.
    #[error("{0}")]
    InsufficientQuota(String),
    /// 429 `too_many_streams`: the key already holds `server.max_followers_per_key` live event
    /// streams on this front.
    #[error("{0}")]
    TooManyStreams(String),
    /// 503: PostgreSQL is out of reach; nothing was written, the client may retry.
    #[error("The service is temporarily unavailable. Please retry shortly.")]
    Unavailable,
    /// 500: logged, answered without details.
    #[error("internal error: {0}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn job_not_found(id: &str) -> Self {
        ApiError::NotFound {
            message: format!("No response found with id '{}'.", echo(id)),
            param: None,
            code: None,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    /// PostgreSQL out of reach is a 503 the client may retry; any other database error is a 500.
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "PostgreSQL unavailable");
                ApiError::Unavailable
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        let message = rejection.to_string();
        match rejection {
            Rejection::InvalidKey => ApiError::Unauthorized(
                "Incorrect API key provided. You can find your API key with `tollgate keys`."
                    .into(),
            ),
            Rejection::InvalidRequest(e) => ApiError::InvalidRequest {
                message: e.message,
                param: e.param,
                code: e.code,
            },
            Rejection::PreviousResponseNotFound(id) => ApiError::NotFound {
                message: format!("Previous response with id '{}' not found.", echo(&id)),
                param: Some("previous_response_id".into()),
                code: Some("previous_response_not_found"),
            },
            Rejection::UnknownModel(_) => ApiError::NotFound {
                message: format!("The model does not exist: {message}."),
                param: Some("model".into()),
                code: Some("model_not_found"),
            },
            Rejection::ModelNotAllowed(_) => ApiError::Forbidden {
                message: format!("Forbidden: {message}."),
                code: "model_not_allowed",
            },
            Rejection::OutputCapExceeded { .. } => ApiError::InvalidRequest {
                message: format!("Invalid request: {message}."),
                param: Some("max_output_tokens".into()),
                code: None,
            },
            Rejection::RequestsPerMinute {
                retry_after_secs, ..
            } => ApiError::RateLimited {
                message: format!("Rate limit reached: {message}. Please try again later."),
                kind: "requests",
                retry_after: Some(retry_after_secs),
            },
            Rejection::TokensPerMinute {
                retry_after_secs, ..
            } => ApiError::RateLimited {
                message: format!("Rate limit reached: {message}. Please try again later."),
                kind: "tokens",
                retry_after: Some(retry_after_secs),
            },
            Rejection::InFlight { .. } => ApiError::RateLimited {
                message: format!("Rate limit reached: {message}. Retry when a job finishes."),
                kind: "requests",
                retry_after: Some(1),
            },
            Rejection::Guardrail(_) => ApiError::Guardrail(format!("{message}.")),
            Rejection::IdempotencyMismatch => ApiError::Unprocessable(format!("{message}.")),
            Rejection::Budget { .. } => {
                ApiError::InsufficientQuota(format!("You exceeded your current quota: {message}."))
            }
            Rejection::Database(e) => e.into(),
        }
    }
}

impl ApiError {
    /// The status and OpenAI's body, `{"error": {"message", "type", "param", "code"}}`. Also
    /// written below the router, by `server.rs`.
    pub(super) fn openai(&self) -> (StatusCode, serde_json::Value) {
        type Parts = (
            StatusCode,
            &'static str,
            Option<String>,
            Option<&'static str>,
        );
        let invalid = |status| -> Parts { (status, "invalid_request_error", None, None) };
        let (status, kind, param, code) = match self {
            ApiError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            ApiError::InvalidRequest { param, code, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                param.clone(),
                *code,
            ),
            ApiError::Forbidden { code, .. } => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                None,
                Some(*code),
            ),
            ApiError::NotFound { param, code, .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                param.clone(),
                *code,
            ),
            ApiError::MethodNotAllowed => invalid(StatusCode::METHOD_NOT_ALLOWED),
            ApiError::PayloadTooLarge => invalid(StatusCode::PAYLOAD_TOO_LARGE),
            ApiError::RequestTimeout => invalid(StatusCode::REQUEST_TIMEOUT),
            ApiError::MalformedRequest => invalid(StatusCode::BAD_REQUEST),
            ApiError::UriTooLong => invalid(StatusCode::URI_TOO_LONG),
            ApiError::HeadersTooLarge => invalid(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            ApiError::Rejected { status, .. } if status.is_server_error() => {
                (*status, "server_error", None, None)
            }
            ApiError::Rejected { status, .. } => invalid(*status),
            ApiError::RateLimited { kind, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                *kind,
                None,
                Some("rate_limit_exceeded"),
            ),
            ApiError::Guardrail(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("input".into()),
                Some("guardrail_violation"),
            ),
            ApiError::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                None,
                Some("idempotency_key_reused"),
            ),
            ApiError::InsufficientQuota(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                None,
                Some("insufficient_quota"),
            ),
            ApiError::TooManyStreams(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                None,
                Some("too_many_streams"),
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("service_unavailable"),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        };
        let message = match self {
            ApiError::Internal(_) => {
                "The server had an error while processing your request.".into()
            }
            _ => self.to_string(),
        };
        let body =
            json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
        (status, body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "internal error");
        }
        let (status, body) = self.openai();
        let mut response = (status, Json(body)).into_response();
        match &self {
            ApiError::RateLimited {
                retry_after: Some(secs),
                ..
            } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            // What is left of the request is not read: the connection cannot serve another.
            ApiError::RequestTimeout => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_out_of_reach_is_a_retryable_503_and_other_database_errors_a_500() {
        let unavailable = ApiError::from(sqlx::Error::PoolTimedOut).into_response();
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        let broken = ApiError::from(sqlx::Error::RowNotFound).into_response();
        assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
