//! The OpenAPI 3.1 document served at `/openapi.json`. Its paths come from the `#[utoipa::path]`
//! attributes on the handlers, collected by the same `OpenApiRouter` that routes them, so a
//! documented path is a served path. The request body and the answers are read and built as JSON
//! (`request.rs`, `object.rs`); the shapes below describe them.

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

/// The body of `POST /v1/responses`. Every field here is honoured, or refused with a 400
/// (`unsupported_parameter`) for a model whose provider cannot carry it out; any other field is a
/// 400 `unknown_parameter`. The README's table says which provider honours what.
#[derive(Serialize, ToSchema)]
pub struct CreateResponse {
    model: String,
    /// A string (one user message), or a list of items: messages (`role`, `content` as a string
    /// or text parts), `function_call` and `function_call_output`.
    input: serde_json::Value,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    metadata: Option<HashMap<String, String>>,
    store: Option<bool>,
    background: Option<bool>,
    stream: Option<bool>,
    user: Option<String>,
    safety_identifier: Option<String>,
    prompt_cache_key: Option<String>,
    /// `auto` or `default`.
    service_tier: Option<String>,
    /// Tools of type `function` (`name`, `description`, `parameters`, `strict`).
    tools: Option<Vec<serde_json::Value>>,
    /// `auto`, `none`, `required`, or `{"type": "function", "name": …}`.
    tool_choice: Option<serde_json::Value>,
    parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    text: Option<serde_json::Value>,
    /// `{"effort": "minimal" | "low" | "medium" | "high" | …}`.
    reasoning: Option<serde_json::Value>,
    /// A response of the same key to continue: its history, input and output come before this
    /// input.
    previous_response_id: Option<String>,
    /// `disabled` only.
    truncation: Option<String>,
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
    /// The output items in order: assistant messages and function calls.
    output: Vec<OutputItem>,
    tools: Vec<serde_json::Value>,
    tool_choice: serde_json::Value,
    parallel_tool_calls: bool,
    text: serde_json::Value,
    reasoning: serde_json::Value,
    previous_response_id: Option<String>,
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

/// An output item.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // describes JSON built elsewhere; never constructed
pub enum OutputItem {
    Message(OutputMessage),
    FunctionCall(FunctionCall),
}

/// A function call the model made.
#[derive(Serialize, ToSchema)]
pub struct FunctionCall {
    /// Always `function_call`.
    #[serde(rename = "type")]
    kind: String,
    id: String,
    status: String,
    call_id: String,
    name: String,
    /// JSON text.
    arguments: String,
}

/// A function call's output sent by the client.
#[derive(Serialize, ToSchema)]
pub struct FunctionCallOutput {
    /// Always `function_call_output`.
    #[serde(rename = "type")]
    kind: String,
    id: String,
    status: String,
    call_id: String,
    output: String,
}

/// An input item.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // describes JSON built elsewhere; never constructed
pub enum InputItem {
    Message(InputMessage),
    FunctionCall(FunctionCall),
    FunctionCallOutput(FunctionCallOutput),
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
    data: Vec<InputItem>,
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
