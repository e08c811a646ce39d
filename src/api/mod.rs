//! The HTTP front: the OpenAI Responses API (background, streaming and synchronous modes) plus
//! health endpoints.
//! `app(state)` builds the router; [`serve`] serves it (`server.rs`: what happens below the
//! router — hyper's own errors, slow clients, the connection cap). Tests run both on port 0.

mod admin;
mod error;
mod health;
mod input_items;
mod object;
mod openapi;
mod responses;
mod server;
mod stream;

use std::sync::Arc;

use axum::{
    extract::{
        path::ErrorKind, rejection::BytesRejection, rejection::PathRejection, DefaultBodyLimit,
        FromRequestParts, MatchedPath, Path,
    },
    http::{header, request::Parts, HeaderMap, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use sqlx::PgPool;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
pub use health::{serve_probes, Probes};
pub use object::response_object;
pub use server::serve;
pub use stream::StreamEvent;

use crate::{
    admission::Admission,
    config::Config,
    queue::{outbox::Dispatch, Publisher},
    store::notify::JobWatch,
};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub publisher: Arc<Publisher>,
    /// Publishes admitted jobs and marks their outbox rows sent.
    pub dispatch: Dispatch,
    pub admission: Arc<Admission>,
    /// Wake-ups for readers that follow a job (streams, synchronous requests).
    pub watch: JobWatch,
}

pub fn app(state: AppState) -> Router {
    let body_limit = state.config.server.max_body_bytes;
    let (responses, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(responses::router())
        .merge(admin::router(state.clone()))
        .split_for_parts();
    let document = Arc::new(openapi::document(&document, &state.config));
    Router::new()
        .merge(responses)
        .merge(health::router())
        .route(
            "/openapi.json",
            get(move || async move { Json(document.as_ref().clone()) }),
        )
        .fallback(|| async {
            ApiError::NotFound {
                message: "Unknown request URL. Please check the URL and method.".into(),
                param: None,
                code: Some("unknown_url"),
            }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::map_response(openai_shaped))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

/// The header carrying a request's id: the client's, if it sent a sensible one, else a new
/// `req_…`; answered on every response, and on every log line of the request.
pub const REQUEST_ID: &str = "x-request-id";

/// Runs the request in a span holding its id, method and path, and answers the id.
async fn request_span(request: axum::extract::Request, next: middleware::Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = tracing::Instrument::instrument(next.run(request), span).await;
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// An error answered by an extractor's rejection (plain text) gets OpenAI's shape, with its status
/// and its text as the message; every other answer passes untouched.
async fn openai_shaped(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // A rejection's text is a sentence; more is not read.
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("Error").to_string(),
        text => text.to_string(),
    };
    ApiError::Rejected { status, message }.into_response()
}

/// The `{id}` of a `/v1/responses/{id}…` path. An id that is not UTF-8 once percent-decoded is no
/// job's id: it is kept with its bad bytes replaced (U+FFFD), so the handler answers it 404 as it
/// answers any unknown id, after checking the key.
pub(super) struct JobPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(JobPath(id)),
            Err(PathRejection::FailedToDeserializePathParams(e))
                if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                Ok(JobPath(raw_id(parts).unwrap_or_default()))
            }
            Err(rejection) => Err(rejection.into_response()),
        }
    }
}

/// The `{id}` segment of the request's path, percent-decoded lossily.
fn raw_id(parts: &Parts) -> Option<String> {
    let route = parts.extensions.get::<MatchedPath>()?.as_str();
    let index = route.split('/').position(|segment| segment == "{id}")?;
    let segment = parts.uri.path().split('/').nth(index)?;
    Some(
        percent_encoding::percent_decode_str(segment)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The bearer token of a request, if it has one. The scheme is case-insensitive (RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim_start();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A body that could not be read: over the size limit (413) or broken.
fn body_error(rejection: BytesRejection) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge.into_response()
    } else if server::is_body_timeout(&rejection) {
        ApiError::RequestTimeout.into_response()
    } else {
        ApiError::InvalidRequest {
            message: format!("Could not read the request body: {rejection}"),
            param: None,
            code: None,
        }
        .into_response()
    }
}

/// The query string's parameters; of a repeated one, the last.
fn query_pairs(query: Option<String>) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}
