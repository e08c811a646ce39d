//! The HTTP front: the OpenAI Responses API (background, streaming and synchronous modes) plus
//! health endpoints.
//! `app(state)` builds the router; serving it is the caller's business, so tests run the real
//! router on port 0.

mod error;
mod health;
mod input_items;
mod object;
mod openapi;
mod responses;
mod stream;

use std::sync::Arc;

use axum::{
    extract::{rejection::BytesRejection, DefaultBodyLimit},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use sqlx::PgPool;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
pub use object::response_object;
pub use stream::StreamEvent;

use crate::{admission::Admission, config::Config, queue::Publisher, store::notify::JobWatch};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub publisher: Arc<Publisher>,
    pub admission: Arc<Admission>,
    /// Wake-ups for readers that follow a job (streams, synchronous requests).
    pub watch: JobWatch,
}

pub fn app(state: AppState) -> Router {
    let body_limit = state.config.server.max_body_bytes;
    let (responses, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(responses::router())
        .split_for_parts();
    let document = Arc::new(document);
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
        .with_state(state)
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
