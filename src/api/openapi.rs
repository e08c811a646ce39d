//! The OpenAPI 3.1 document served at `/openapi.json`. Its paths come from the `#[utoipa::path]`
//! attributes on the handlers, collected by the same `OpenApiRouter` that routes them, so a
//! documented path is a served path. The request body's schema is derived from the type the
//! front parses; the answers, built as JSON, are described by the shapes below.

use std::collections::HashMap;

use serde::Serialize;
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi, ToSchema,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tollgate",
        description = "Admission-controlled, queue-backed jobs for LLM requests: the OpenAI \
                       Responses API (background, streaming and synchronous modes).",
    ),
    modifiers(&BearerKey),
    tags((name = "responses", description = "The OpenAI Responses API")),
)]
pub struct ApiDoc;

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// OpenAI's Response object.
#[derive(Serialize, ToSchema)]
pub struct ResponseObject {
    /// `resp_` and 32 hex digits.
    id: String,
    /// Always `response`.
    object: String,
    /// Unix seconds.
    created_at: i64,
    /// `queued`, `in_progress`, `completed`, `failed`, `cancelled` or `incomplete`.
    status: String,
    background: bool,
    error: Option<ResponseError>,
    incomplete_details: Option<HashMap<String, String>>,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    model: String,
    /// One assistant message once a worker has started the job, else empty.
    output: Vec<OutputMessage>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    store: bool,
    user: Option<String>,
    usage: Option<Usage>,
    metadata: HashMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct ResponseError {
    code: String,
    message: String,
}

#[derive(Serialize, ToSchema)]
pub struct OutputMessage {
    /// Always `message`.
    #[serde(rename = "type")]
    kind: String,
    id: String,
    status: String,
    /// Always `assistant`.
    role: String,
    content: Vec<OutputText>,
}

#[derive(Serialize, ToSchema)]
pub struct OutputText {
    /// Always `output_text`.
    #[serde(rename = "type")]
    kind: String,
    text: String,
    annotations: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Usage {
    input_tokens: u32,
    input_tokens_details: HashMap<String, u32>,
    output_tokens: u32,
    output_tokens_details: HashMap<String, u32>,
    total_tokens: u32,
}

/// One server-sent event: `event: <type>` and `data: <this JSON>`. Besides `type` and
/// `sequence_number`, each type carries its own fields (`response`, `item`, `part`, `delta`,
/// `text`, …) as OpenAI's.
#[derive(Serialize, ToSchema)]
pub struct StreamEventData {
    #[serde(rename = "type")]
    kind: String,
    sequence_number: u64,
}

/// `{"error": {...}}`, OpenAI's error shape.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    message: String,
    #[serde(rename = "type")]
    kind: String,
    param: Option<String>,
    code: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    id: String,
    /// Always `response`.
    object: String,
    deleted: bool,
}

/// A page of input items.
#[derive(Serialize, ToSchema)]
pub struct InputItemList {
    /// Always `list`.
    object: String,
    data: Vec<InputMessage>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

#[derive(Serialize, ToSchema)]
pub struct InputMessage {
    /// Always `message`.
    #[serde(rename = "type")]
    kind: String,
    id: String,
    status: String,
    role: String,
    /// `input_text` parts (`output_text` for assistant messages).
    content: Vec<InputText>,
}

#[derive(Serialize, ToSchema)]
pub struct InputText {
    #[serde(rename = "type")]
    kind: String,
    text: String,
}
