//! The OpenAPI 3.1 document served at `/openapi.json`. Its paths come from the `#[utoipa::path]`
//! attributes on the handlers, collected by the same `OpenApiRouter` that routes them, so a
//! documented path is a served path. The request body and the answers are read and built as JSON
//! (`request.rs`, `object.rs`); the shapes below describe them.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi, ToSchema,
};

use crate::config::Config;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tollgate",
        description = "Admission-controlled, queue-backed jobs for LLM requests: the OpenAI \
                       Responses API (background, streaming and synchronous modes).",
    ),
    modifiers(&BearerKey),
    tags(
        (name = "responses", description = "The OpenAI Responses API"),
        (name = "admin", description = "Keys and webhook endpoints, behind the master key \
                                        (open only when one is set)"),
    ),
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
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "admin_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// The body of `POST /v1/responses`. Its schema is written out by [`create_request_schema`]
/// (unions, limits and the served model names are more than a derived schema can say); this
/// type only names it in the routes' attributes.
#[derive(ToSchema)]
pub struct CreateResponse {}

/// A string with no NUL character (the front refuses NUL anywhere in a request).
const TEXT: &str = "^[^\\u0000]*$";

/// The schema of `POST /v1/responses`'s body as this server reads it (`request.rs`): the models
/// it serves, its `server.max_input_items`, OpenAI's metadata limits, and every field it honours;
/// any other field is a 400 `unknown_parameter`. What a schema cannot say is refused with a 400
/// naming the field: a `tool_choice` naming a function not in `tools`, two tools of one name, a
/// field the model's provider cannot carry out (the README's table), a NUL inside a JSON schema
/// or a function call's arguments object.
fn create_request_schema(config: &Config) -> Value {
    let text = json!({"type": "string", "pattern": TEXT});
    let optional = |schema: Value| json!({"oneOf": [{"type": "null"}, schema]});
    let name = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"});
    let parts = json!({
        "type": "array",
        "items": {"oneOf": [
            {"type": "object", "additionalProperties": false, "required": ["type", "text"],
             "properties": {"type": {"const": "input_text"}, "text": text}},
            {"type": "object", "additionalProperties": false, "required": ["type", "text"],
             "properties": {"type": {"const": "output_text"}, "text": text,
                            "annotations": {"type": ["array", "null"]},
                            "logprobs": {"type": ["array", "null"]},
                            "parsed": {"description": "Ignored: what the SDK's `parse` adds."}}},
            {"type": "object", "additionalProperties": false, "required": ["type", "refusal"],
             "properties": {"type": {"const": "refusal"}, "refusal": text}},
        ]},
    });
    let item = json!({"oneOf": [
        {"type": "object", "additionalProperties": false, "required": ["role", "content"],
         "description": "A message; `type` may be left out.",
         "properties": {
             "type": {"enum": ["message", null]},
             "role": {"enum": ["user", "assistant", "system", "developer"]},
             "content": {"oneOf": [text, parts]},
             "id": optional(text.clone()), "status": optional(text.clone()),
         }},
        {"type": "object", "additionalProperties": false,
         "required": ["type", "call_id", "name", "arguments"],
         "properties": {
             "type": {"const": "function_call"},
             "call_id": text, "name": text, "arguments": text,
             "id": optional(text.clone()), "status": optional(text.clone()),
             "parsed_arguments": {"description": "Ignored: what the SDK's `parse` adds."},
         }},
        {"type": "object", "additionalProperties": false, "required": ["type", "call_id", "output"],
         "properties": {
             "type": {"const": "function_call_output"},
             "call_id": text, "output": {"oneOf": [text, parts]},
             "id": optional(text.clone()), "status": optional(text.clone()),
         }},
    ]});
    let tool = json!({
        "type": "object", "additionalProperties": false, "required": ["type", "name"],
        "properties": {
            "type": {"const": "function"},
            "name": name,
            "description": optional(text.clone()),
            "parameters": optional(json!({"type": "object", "description": "A JSON schema."})),
            "strict": {"type": ["boolean", "null"]},
        },
    });
    let format = json!({"oneOf": [
        {"type": "object", "additionalProperties": false, "required": ["type"],
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "additionalProperties": false, "required": ["type", "name", "schema"],
         "properties": {
             "type": {"const": "json_schema"},
             "name": name,
             "schema": {"type": "object", "description": "A JSON schema."},
             "description": optional(text.clone()),
             "strict": {"type": ["boolean", "null"]},
         }},
    ]});
    let refused = |why: &str| json!({"type": "null", "description": why});
    let models: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
    let max_output_tokens = config.models.iter().map(|m| m.max_output_tokens).max();
    json!({
        "type": "object",
        "description": "The body of `POST /v1/responses`. Every field here is honoured, or \
            refused with a 400 (`unsupported_parameter`) for a model whose provider cannot carry \
            it out; any other field is a 400 `unknown_parameter`. An explicit `null` is the \
            field left out.",
        "additionalProperties": false,
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "enum": models,
                      "description": "One of the models this server serves."},
            "input": {
                "description": "A string (one user message), or a list of items: messages, \
                    `function_call` and `function_call_output`.",
                "oneOf": [text, {"type": "array", "minItems": 1,
                                 "maxItems": config.server.max_input_items, "items": item}],
            },
            "instructions": optional(text.clone()),
            "max_output_tokens": {"type": ["integer", "null"], "minimum": 1,
                                  "maximum": max_output_tokens,
                                  "description": "At most the model's `max_output_tokens`."},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "metadata": optional(json!({
                "type": "object", "maxProperties": 16,
                "propertyNames": {"maxLength": 64, "pattern": TEXT},
                "additionalProperties": {"type": "string", "maxLength": 512, "pattern": TEXT},
            })),
            "store": {"type": ["boolean", "null"],
                      "description": "Accepted; the job is stored whatever its value."},
            "background": {"type": ["boolean", "null"]},
            "stream": {"type": ["boolean", "null"]},
            "stream_options": optional(json!({
                "type": "object", "additionalProperties": false,
                "properties": {"include_obfuscation": {"enum": [false, null]}},
            })),
            "user": optional(text.clone()),
            "safety_identifier": optional(text.clone()),
            "prompt_cache_key": optional(text.clone()),
            "service_tier": {"enum": ["auto", "default", null]},
            "tools": optional(json!({"type": "array", "items": tool})),
            "tool_choice": {"oneOf": [
                {"enum": ["auto", "none", "required", null]},
                {"type": "object", "additionalProperties": false, "required": ["type", "name"],
                 "properties": {"type": {"const": "function"}, "name": text}},
            ]},
            "parallel_tool_calls": {"type": ["boolean", "null"]},
            "text": optional(json!({
                "type": "object", "additionalProperties": false,
                "properties": {"format": {"oneOf": [{"type": "null"}, format]}},
            })),
            "reasoning": optional(json!({
                "type": "object", "additionalProperties": false,
                "properties": {"effort": {
                    "enum": ["none", "minimal", "low", "medium", "high", "xhigh", null]}},
            })),
            "previous_response_id": optional(json!({
                "type": "string", "pattern": TEXT,
                "description": "A finished response of the same key to continue: its history, \
                    input and output come before this input.",
            })),
            "truncation": {"enum": ["disabled", null]},
            "include": optional(json!({"type": "array", "maxItems": 0})),
            "conversation": refused("Refused: continue with `previous_response_id`."),
            "prompt": refused("Refused: stored prompts live with OpenAI."),
            "top_logprobs": refused("Refused: no provider streams log probabilities here."),
            "max_tool_calls": refused("Refused: it limits hosted tools, which no provider here \
                runs."),
        },
    })
}

/// The document `/openapi.json` serves: the derived one, with the request body's schema for
/// this configuration and links from a created response to the operations on it.
pub fn document(derived: &utoipa::openapi::OpenApi, config: &Config) -> Value {
    let mut document = serde_json::to_value(derived).expect("the OpenAPI document serialises");
    document["components"]["schemas"]["CreateResponse"] = create_request_schema(config);
    let links: Map<String, Value> = [
        ("retrieve", "GetResponse"),
        ("delete", "DeleteResponse"),
        ("cancel", "CancelResponse"),
        ("list", "ListInputItems"),
    ]
    .into_iter()
    .map(|(operation, link)| {
        (
            link.to_string(),
            json!({"operationId": operation, "parameters": {"id": "$response.body#/id"}}),
        )
    })
    .collect();
    document["paths"]["/v1/responses"]["post"]["responses"]["200"]["links"] = Value::Object(links);
    for path in document["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|p| p.values_mut())
    {
        for operation in path
            .as_object_mut()
            .into_iter()
            .flat_map(|o| o.values_mut())
        {
            let responses = operation["responses"].as_object_mut();
            for response in responses.into_iter().flat_map(|r| r.values_mut()) {
                if let Some(stream) = response.pointer_mut("/content/text~1event-stream/schema") {
                    *stream = sse_event(stream.take());
                }
            }
        }
    }
    document
}

/// One server-sent event as OpenAPI 3.1 describes an item of `text/event-stream`: its `event`
/// line and its `data` line, a JSON text of `data` (the derived schema).
fn sse_event(data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": data},
        },
    })
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
