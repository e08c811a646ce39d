//! The Responses API request (`POST /v1/responses` body), as the front validates it and the worker
//! reads it back from the job row.
//!
//! Every field of the API is handled in one of two ways, and never dropped silently:
//! - honoured: read here, translated for the model's provider (`provider/`), and echoed in the
//!   Response object (`api/object.rs`);
//! - refused: a 400 naming the field, code `unsupported_parameter`; a field the API does not have
//!   at all is a 400 `unknown_parameter`, as OpenAI answers it.
//!
//! What no provider can do is refused here ([`CreateResponse::parse`]); what only some providers
//! can do is refused for the others by [`CreateResponse::check_for`]. The README's table of
//! request fields says the same per provider.
//!
//! The body is read field by field from JSON rather than by a derived `Deserialize`, so that every
//! refusal names its field exactly (`tools[1].type`, `input[0].content[2].type`).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::{
    config::{ModelConfig, ProviderKind},
    output::Item,
    provider::{CallRequest, FunctionTool, OutputFormat, Role, ToolChoice, Turn},
};

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateResponse {
    pub model: String,
    pub input: Vec<InputItem>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: Option<HashMap<String, String>>,
    pub store: Option<bool>,
    pub background: Option<bool>,
    pub stream: Option<bool>,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub service_tier: Option<String>,
    pub tools: Vec<FunctionTool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub format: Option<OutputFormat>,
    pub reasoning_effort: Option<String>,
    pub previous_response_id: Option<String>,
}

/// One item of a conversation, as the Responses API names it: the request's `input`, and the
/// history a `previous_response_id` brings (stored on the job row in this same shape).
#[derive(Debug, Clone, PartialEq)]
pub enum InputItem {
    Message {
        /// `user`, `assistant`, `system` or `developer`.
        role: String,
        /// The text parts, in order.
        parts: Vec<String>,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: String,
    },
}

impl InputItem {
    /// The item as a turn of the conversation sent upstream.
    pub fn to_turn(&self) -> Turn {
        match self {
            InputItem::Message { role, parts } => Turn::Message {
                role: match role.as_str() {
                    "assistant" => Role::Assistant,
                    "system" | "developer" => Role::System,
                    _ => Role::User,
                },
                text: parts.concat(),
            },
            InputItem::FunctionCall {
                call_id,
                name,
                arguments,
            } => Turn::FunctionCall {
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
            },
            InputItem::FunctionCallOutput { call_id, output } => Turn::FunctionOutput {
                call_id: call_id.clone(),
                output: output.clone(),
            },
        }
    }

    /// The item as a Responses API input item (what a job's `history` stores).
    pub fn to_value(&self) -> Value {
        match self {
            InputItem::Message { role, parts } => {
                let content: Vec<Value> = parts
                    .iter()
                    .map(|text| {
                        if role == "assistant" {
                            json!({"type": "output_text", "text": text, "annotations": []})
                        } else {
                            json!({"type": "input_text", "text": text})
                        }
                    })
                    .collect();
                json!({"type": "message", "role": role, "content": content})
            }
            InputItem::FunctionCall {
                call_id,
                name,
                arguments,
            } => json!({"type": "function_call", "call_id": call_id, "name": name,
                        "arguments": arguments}),
            InputItem::FunctionCallOutput { call_id, output } => {
                json!({"type": "function_call_output", "call_id": call_id, "output": output})
            }
        }
    }

    /// The item as `input_items` lists it: with its id, and `completed`.
    pub fn to_json(&self, id: &str) -> Value {
        let mut value = self.to_value();
        value["id"] = json!(id);
        value["status"] = json!("completed");
        value
    }
}

/// An output item of an earlier response, as the next turn's history holds it.
impl From<Item> for InputItem {
    fn from(item: Item) -> Self {
        match item {
            Item::Message { text } => InputItem::Message {
                role: "assistant".into(),
                parts: vec![text],
            },
            Item::FunctionCall {
                call_id,
                name,
                arguments,
            } => InputItem::FunctionCall {
                call_id,
                name,
                arguments,
            },
        }
    }
}

/// Why a body was refused: the message, the offending parameter, and OpenAI's code for the kind
/// of refusal (`unknown_parameter`, `unsupported_parameter`, `invalid_value`), if any.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRequest {
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl InvalidRequest {
    fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    fn at(param: &str, message: impl Into<String>) -> Self {
        Self::new(message, Some(param))
    }

    fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_value"),
            ..Self::at(param, message)
        }
    }

    /// A field the API does not have.
    fn unknown(param: &str) -> Self {
        Self {
            code: Some("unknown_parameter"),
            ..Self::at(param, format!("Unknown parameter: '{param}'."))
        }
    }

    /// A field of the API that tollgate (or the model's provider) does not carry out.
    fn unsupported(param: &str, why: impl std::fmt::Display) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::at(param, format!("Unsupported parameter: '{param}' {why}."))
        }
    }
}

/// At most the first 64 characters of something a client sent, for an error message: enough to
/// recognise it, never a megabyte echoed back.
pub fn echo(sent: &str) -> String {
    const MAX: usize = 64;
    match sent.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &sent[..cut]),
        None => sent.to_string(),
    }
}

/// Top-level fields that are honoured (by every provider, or refused per provider in
/// [`CreateResponse::check_for`]).
const HONOURED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "metadata",
    "store",
    "background",
    "stream",
    "stream_options",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "previous_response_id",
    "truncation",
    "include",
];

/// Top-level fields of the API that tollgate refuses whenever they are set, and why.
const REFUSED: &[(&str, &str)] = &[
    (
        "conversation",
        "is not supported: continue a conversation with `previous_response_id`",
    ),
    (
        "prompt",
        "is not supported: stored prompt templates live with OpenAI",
    ),
    (
        "top_logprobs",
        "is not supported: no provider streams log probabilities here",
    ),
    (
        "max_tool_calls",
        "is not supported: it limits hosted tools, which no configured provider runs",
    ),
];

/// Hosted tools: run by OpenAI's own service, not by a model behind tollgate.
const HOSTED_TOOLS: &str = "is a hosted tool that no configured provider runs; only `function` \
    tools are supported";

/// An object of the body, read field by field; `path` names it in errors (`tools[0]`).
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Fields<'a> {
    fn of(value: &'a Value, path: &str) -> Result<Self, InvalidRequest> {
        match value {
            Value::Object(map) => Ok(Self {
                map,
                path: path.to_string(),
            }),
            _ => Err(InvalidRequest::at(
                path,
                format!("Invalid type for '{path}': expected an object."),
            )),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// Refuses any field not in `names` as unknown.
    fn known(&self, names: &[&str]) -> Result<(), InvalidRequest> {
        match self.map.keys().find(|k| !names.contains(&k.as_str())) {
            Some(unknown) => Err(InvalidRequest::unknown(&self.path(unknown))),
            None => Ok(()),
        }
    }

    /// The field, None when absent or `null` (as OpenAI treats an explicit null).
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn wrong_type(&self, name: &str, expected: &str) -> InvalidRequest {
        let path = self.path(name);
        InvalidRequest::at(
            &path,
            format!("Invalid type for '{path}': expected {expected}."),
        )
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, InvalidRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong_type(name, "a string")),
        }
    }

    fn required_string(&self, name: &str) -> Result<&'a str, InvalidRequest> {
        self.string(name)?.ok_or_else(|| {
            let path = self.path(name);
            InvalidRequest::at(&path, format!("Missing required parameter: '{path}'."))
        })
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, InvalidRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong_type(name, "a boolean")),
        }
    }

    fn number(&self, name: &str) -> Result<Option<f64>, InvalidRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(name, "a number")),
        }
    }

    fn count(&self, name: &str) -> Result<Option<u32>, InvalidRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong_type(name, "a non-negative integer")),
        }
    }

    fn array(&self, name: &str) -> Result<Option<&'a Vec<Value>>, InvalidRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(self.wrong_type(name, "an array")),
        }
    }

    /// A string field that must be one of `allowed`.
    fn choice(&self, name: &str, allowed: &[&str]) -> Result<Option<&'a str>, InvalidRequest> {
        match self.string(name)? {
            Some(s) if !allowed.contains(&s) => {
                let path = self.path(name);
                Err(InvalidRequest::invalid_value(
                    &path,
                    format!(
                        "Invalid value for '{path}': {s:?}. Supported values are: {}.",
                        allowed.join(", ")
                    ),
                ))
            }
            other => Ok(other),
        }
    }
}

/// Where in `value` a string (or an object key) holds a NUL character, as a parameter path
/// (`metadata.k`, `input[0].content`); None when nowhere.
fn nul_path(value: &Value, at: String) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then_some(at),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_path(item, format!("{at}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(name, field)| {
            let path = if at.is_empty() {
                name.clone()
            } else {
                format!("{at}.{name}")
            };
            if name.contains('\0') {
                return Some(path.replace('\0', "\\u0000"));
            }
            nul_path(field, path)
        }),
        _ => None,
    }
}

/// A function or schema name as OpenAI allows it: 1–64 of `a-z A-Z 0-9 _ -`.
fn check_name(name: &str, param: &str) -> Result<(), InvalidRequest> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(InvalidRequest::invalid_value(
            param,
            format!(
                "Invalid '{param}': {name:?}. Names are 1 to 64 letters, digits, underscores \
                 or dashes."
            ),
        ))
    }
}

/// Text of a list of content parts: `input_text`, `output_text` and `refusal` carry text; images,
/// files and audio are refused (no provider here receives them).
fn text_parts(parts: &[Value], path: &str) -> Result<Vec<String>, InvalidRequest> {
    parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            let part = Fields::of(part, &format!("{path}[{j}]"))?;
            match part.required_string("type")? {
                "input_text" => {
                    part.known(&["type", "text"])?;
                    Ok(part.required_string("text")?.to_string())
                }
                // Output items sent back as input; `parsed` is what the SDK's `parse` adds,
                // derived from the text.
                "output_text" => {
                    part.known(&["type", "text", "annotations", "logprobs", "parsed"])?;
                    part.array("annotations")?;
                    part.array("logprobs")?;
                    Ok(part.required_string("text")?.to_string())
                }
                "refusal" => {
                    part.known(&["type", "refusal"])?;
                    Ok(part.required_string("refusal")?.to_string())
                }
                kind @ ("input_image" | "input_file" | "input_audio") => {
                    Err(InvalidRequest::unsupported(
                        &part.path("type"),
                        format_args!(
                            "({kind:?}) is not supported: only text reaches the models here"
                        ),
                    ))
                }
                other => Err(InvalidRequest::invalid_value(
                    &part.path("type"),
                    format!("Invalid content part type {other:?}."),
                )),
            }
        })
        .collect()
}

/// Parses a list of conversation items (`input`, or a stored history).
pub fn parse_items(items: &[Value], path: &str) -> Result<Vec<InputItem>, InvalidRequest> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_item(item, &format!("{path}[{i}]")))
        .collect()
}

fn parse_item(item: &Value, path: &str) -> Result<InputItem, InvalidRequest> {
    let fields = Fields::of(item, path)?;
    // An item sent back as it was answered carries its `id` and `status`; they are not read.
    fields.string("id")?;
    fields.string("status")?;
    // A message may leave out its type (the SDK's "easy input message").
    let kind = match fields.string("type")? {
        Some(kind) => kind,
        None if fields.get("role").is_some() => "message",
        None => {
            return Err(InvalidRequest::at(
                &fields.path("type"),
                format!("Missing required parameter: '{path}.type'."),
            ))
        }
    };
    match kind {
        "message" => {
            fields.known(&["type", "role", "content", "id", "status"])?;
            let role = fields.choice("role", &["user", "assistant", "system", "developer"])?;
            let role = role.ok_or_else(|| {
                InvalidRequest::at(
                    &fields.path("role"),
                    format!("Missing required parameter: '{path}.role'."),
                )
            })?;
            let parts = match fields.get("content") {
                Some(Value::String(text)) => vec![text.clone()],
                Some(Value::Array(parts)) => text_parts(parts, &fields.path("content"))?,
                Some(_) => return Err(fields.wrong_type("content", "a string or an array")),
                None => {
                    return Err(InvalidRequest::at(
                        &fields.path("content"),
                        format!("Missing required parameter: '{path}.content'."),
                    ))
                }
            };
            Ok(InputItem::Message {
                role: role.to_string(),
                parts,
            })
        }
        "function_call" => {
            // `parsed_arguments` is what the SDK's `parse` adds, derived from `arguments`.
            fields.known(&[
                "type",
                "call_id",
                "name",
                "arguments",
                "id",
                "status",
                "parsed_arguments",
            ])?;
            Ok(InputItem::FunctionCall {
                call_id: fields.required_string("call_id")?.to_string(),
                name: fields.required_string("name")?.to_string(),
                arguments: fields.required_string("arguments")?.to_string(),
            })
        }
        "function_call_output" => {
            fields.known(&["type", "call_id", "output", "id", "status"])?;
            let output = match fields.get("output") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => text_parts(parts, &fields.path("output"))?.concat(),
                Some(_) => return Err(fields.wrong_type("output", "a string or an array")),
                None => {
                    return Err(InvalidRequest::at(
                        &fields.path("output"),
                        format!("Missing required parameter: '{path}.output'."),
                    ))
                }
            };
            Ok(InputItem::FunctionCallOutput {
                call_id: fields.required_string("call_id")?.to_string(),
                output,
            })
        }
        other => Err(InvalidRequest::unsupported(
            &fields.path("type"),
            format_args!(
                "({other:?}) is not supported: input items are messages, `function_call` and \
                 `function_call_output`"
            ),
        )),
    }
}

fn parse_tools(items: &[Value]) -> Result<Vec<FunctionTool>, InvalidRequest> {
    let mut tools: Vec<FunctionTool> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let fields = Fields::of(item, &format!("tools[{i}]"))?;
        match fields.required_string("type")? {
            "function" => {}
            other => {
                return Err(InvalidRequest::unsupported(
                    &fields.path("type"),
                    format_args!("({other:?}) {HOSTED_TOOLS}"),
                ))
            }
        }
        fields.known(&["type", "name", "description", "parameters", "strict"])?;
        let name = fields.required_string("name")?;
        check_name(name, &fields.path("name"))?;
        if tools.iter().any(|t| t.name == name) {
            return Err(InvalidRequest::invalid_value(
                &fields.path("name"),
                format!("Duplicate function name {name:?} in 'tools'."),
            ));
        }
        let parameters = match fields.get("parameters") {
            None => None,
            Some(p @ Value::Object(_)) => Some(p.clone()),
            Some(_) => return Err(fields.wrong_type("parameters", "a JSON schema object")),
        };
        tools.push(FunctionTool {
            name: name.to_string(),
            description: fields.string("description")?.map(str::to_string),
            parameters,
            strict: fields.bool("strict")?,
        });
    }
    Ok(tools)
}

fn parse_tool_choice(value: &Value, tools: &[FunctionTool]) -> Result<ToolChoice, InvalidRequest> {
    let choice = match value {
        Value::String(s) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(InvalidRequest::invalid_value(
                    "tool_choice",
                    format!(
                        "Invalid value for 'tool_choice': {other:?}. Supported values are: \
                         auto, none, required, or a function."
                    ),
                ))
            }
        },
        other => {
            let fields = Fields::of(other, "tool_choice")?;
            match fields.required_string("type")? {
                "function" => {}
                other => {
                    return Err(InvalidRequest::unsupported(
                        "tool_choice.type",
                        format_args!("({other:?}) names a tool kind no configured provider runs"),
                    ))
                }
            }
            fields.known(&["type", "name"])?;
            let name = fields.required_string("name")?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(InvalidRequest::invalid_value(
                    "tool_choice.name",
                    format!("Tool choice function {name:?} is not in 'tools'."),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
    };
    if tools.is_empty() && choice == ToolChoice::Required {
        return Err(InvalidRequest::invalid_value(
            "tool_choice",
            "'tool_choice' is 'required' but 'tools' is empty.",
        ));
    }
    Ok(choice)
}

fn parse_format(value: &Value) -> Result<Option<OutputFormat>, InvalidRequest> {
    let fields = Fields::of(value, "text.format")?;
    match fields.required_string("type")? {
        "text" => {
            fields.known(&["type"])?;
            Ok(None)
        }
        "json_object" => {
            fields.known(&["type"])?;
            Ok(Some(OutputFormat::JsonObject))
        }
        "json_schema" => {
            fields.known(&["type", "name", "schema", "description", "strict"])?;
            let name = fields.required_string("name")?;
            check_name(name, "text.format.name")?;
            let schema = match fields.get("schema") {
                Some(schema @ Value::Object(_)) => schema.clone(),
                Some(_) => return Err(fields.wrong_type("schema", "a JSON schema object")),
                None => {
                    return Err(InvalidRequest::at(
                        "text.format.schema",
                        "Missing required parameter: 'text.format.schema'.",
                    ))
                }
            };
            Ok(Some(OutputFormat::JsonSchema {
                name: name.to_string(),
                description: fields.string("description")?.map(str::to_string),
                schema,
                strict: fields.bool("strict")?,
            }))
        }
        other => Err(InvalidRequest::invalid_value(
            "text.format.type",
            format!(
                "Invalid value for 'text.format.type': {other:?}. Supported values are: text, \
                 json_object, json_schema."
            ),
        )),
    }
}

/// `input`: a string (one user message) or a non-empty list of items.
fn parse_input(input: Option<&Value>) -> Result<Vec<InputItem>, InvalidRequest> {
    match input.filter(|v| !v.is_null()) {
        Some(Value::String(text)) => Ok(vec![InputItem::Message {
            role: "user".into(),
            parts: vec![text.clone()],
        }]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(InvalidRequest::at("input", "`input` must not be empty."))
        }
        Some(Value::Array(items)) => parse_items(items, "input"),
        Some(_) => Err(InvalidRequest::at(
            "input",
            "Invalid type for 'input': expected a string or an array.",
        )),
        None => Err(InvalidRequest::at(
            "input",
            "Missing required parameter: 'input'.",
        )),
    }
}

/// The input of a request stored on a job row, read without judging the rest of it (a row
/// written by an earlier version may hold fields this one refuses).
pub fn stored_input(request: &Value) -> Result<Vec<InputItem>, InvalidRequest> {
    parse_input(request.get("input"))
}

/// The item at `index` of a stored request's `input` (`input_items` reads a page of them this
/// way, never the whole input). A string is the user message an input given as a string stands
/// for.
pub fn stored_input_item(item: &Value, index: usize) -> Result<InputItem, InvalidRequest> {
    match item {
        Value::String(text) => Ok(InputItem::Message {
            role: "user".into(),
            parts: vec![text.clone()],
        }),
        item => parse_item(item, &format!("input[{index}]")),
    }
}

/// A job row's `history` (absent: none).
pub fn stored_history(history: Option<&Value>) -> Result<Vec<InputItem>, InvalidRequest> {
    match history {
        Some(Value::Array(items)) => parse_items(items, "history"),
        _ => Ok(Vec::new()),
    }
}

impl CreateResponse {
    /// Parses and validates a request body. Returns the typed request and the body as JSON (stored
    /// as given on the job row).
    pub fn parse(body: &[u8]) -> Result<(Self, Value), InvalidRequest> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            InvalidRequest::new(
                format!("We could not parse the JSON body of your request: {e}"),
                None,
            )
        })?;
        if !value.is_object() {
            return Err(InvalidRequest::new(
                "The request body must be a JSON object.",
                None,
            ));
        }
        if let Some(path) = nul_path(&value, String::new()) {
            // PostgreSQL can store no NUL character, and no model needs one.
            return Err(InvalidRequest::new(
                "Strings in the request must not contain the NUL character (\\u0000).",
                Some(&path),
            ));
        }
        let request = Self::from_value(&value)?;
        Ok((request, value))
    }

    /// Reads a request from its JSON (a body, or the one stored on a job row).
    pub fn from_value(value: &Value) -> Result<Self, InvalidRequest> {
        let body = Fields::of(value, "")?;
        for name in body.map.keys() {
            if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| refused == name) {
                if body.get(name).is_some() {
                    return Err(InvalidRequest::unsupported(name, why));
                }
            } else if !HONOURED.contains(&name.as_str()) {
                return Err(InvalidRequest::unknown(name));
            }
        }
        let model = body
            .string("model")?
            .ok_or_else(|| InvalidRequest::at("model", "Missing required parameter: 'model'."))?;
        let input = parse_input(body.get("input"))?;
        let metadata = match body.get("metadata") {
            None => None,
            Some(value) => {
                let fields = Fields::of(value, "metadata")?;
                let mut metadata = HashMap::with_capacity(fields.map.len());
                for key in fields.map.keys() {
                    let value = fields.string(key)?.unwrap_or_default();
                    metadata.insert(key.clone(), value.to_string());
                }
                Some(metadata)
            }
        };
        let tools = match body.array("tools")? {
            Some(items) => parse_tools(items)?,
            None => Vec::new(),
        };
        let tool_choice = match body.get("tool_choice") {
            Some(choice) => Some(parse_tool_choice(choice, &tools)?),
            None => None,
        };
        let format = match body.get("text") {
            None => None,
            Some(text) => {
                let text = Fields::of(text, "text")?;
                text.known(&["format", "verbosity"])?;
                if text.get("verbosity").is_some() {
                    return Err(InvalidRequest::unsupported(
                        "text.verbosity",
                        "is not supported: no provider here takes it",
                    ));
                }
                match text.get("format") {
                    Some(format) => parse_format(format)?,
                    None => None,
                }
            }
        };
        let reasoning_effort = match body.get("reasoning") {
            None => None,
            Some(reasoning) => {
                let reasoning = Fields::of(reasoning, "reasoning")?;
                reasoning.known(&["effort", "summary", "generate_summary"])?;
                for name in ["summary", "generate_summary"] {
                    if reasoning.get(name).is_some() {
                        return Err(InvalidRequest::unsupported(
                            &format!("reasoning.{name}"),
                            "is not supported: reasoning summaries are not streamed here",
                        ));
                    }
                }
                reasoning
                    .choice(
                        "effort",
                        &["none", "minimal", "low", "medium", "high", "xhigh"],
                    )?
                    .map(str::to_string)
            }
        };
        if body.choice("truncation", &["disabled", "auto"])? == Some("auto") {
            return Err(InvalidRequest::unsupported(
                "truncation",
                "('auto') is not supported: tollgate never drops input; use 'disabled'",
            ));
        }
        if let Some(include) = body.array("include")? {
            if !include.is_empty() {
                return Err(InvalidRequest::unsupported(
                    "include[0]",
                    "is not supported: no additional output data is produced here",
                ));
            }
        }
        if let Some(options) = body.get("stream_options") {
            let options = Fields::of(options, "stream_options")?;
            options.known(&["include_obfuscation"])?;
            if options.bool("include_obfuscation")? == Some(true) {
                return Err(InvalidRequest::unsupported(
                    "stream_options.include_obfuscation",
                    "(true) is not supported: tollgate's streams are not obfuscated",
                ));
            }
        }
        let service_tier = body.choice(
            "service_tier",
            &["auto", "default", "flex", "priority", "scale"],
        )?;
        if let Some(tier @ ("flex" | "priority" | "scale")) = service_tier {
            return Err(InvalidRequest::unsupported(
                "service_tier",
                format_args!(
                    "({tier:?}) is not supported: it is priced differently from the model's \
                     configured price, which admission reserves"
                ),
            ));
        }
        let request = Self {
            model: model.to_string(),
            input,
            instructions: body.string("instructions")?.map(str::to_string),
            max_output_tokens: body.count("max_output_tokens")?,
            temperature: body.number("temperature")?,
            top_p: body.number("top_p")?,
            metadata,
            store: body.bool("store")?,
            background: body.bool("background")?,
            stream: body.bool("stream")?,
            user: body.string("user")?.map(str::to_string),
            safety_identifier: body.string("safety_identifier")?.map(str::to_string),
            prompt_cache_key: body.string("prompt_cache_key")?.map(str::to_string),
            service_tier: service_tier.map(str::to_string),
            tools,
            tool_choice,
            parallel_tool_calls: body.bool("parallel_tool_calls")?,
            format,
            reasoning_effort,
            previous_response_id: body.string("previous_response_id")?.map(str::to_string),
        };
        request.validate()?;
        Ok(request)
    }

    fn validate(&self) -> Result<(), InvalidRequest> {
        if self.model.trim().is_empty() {
            return Err(InvalidRequest::new(
                "`model` must not be empty.",
                Some("model"),
            ));
        }
        if let Some(metadata) = &self.metadata {
            // OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
            if metadata.len() > 16 {
                return Err(InvalidRequest::new(
                    format!(
                        "`metadata` may hold at most 16 pairs, got {}.",
                        metadata.len()
                    ),
                    Some("metadata"),
                ));
            }
            for (key, value) in metadata {
                if key.chars().count() > 64 {
                    return Err(InvalidRequest::new(
                        "`metadata` keys may be at most 64 characters long.",
                        Some("metadata"),
                    ));
                }
                if value.chars().count() > 512 {
                    return Err(InvalidRequest::new(
                        "`metadata` values may be at most 512 characters long.",
                        Some(&format!("metadata.{key}")),
                    ));
                }
            }
        }
        if self.max_output_tokens == Some(0) {
            return Err(InvalidRequest::new(
                "`max_output_tokens` must be at least 1.",
                Some("max_output_tokens"),
            ));
        }
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return Err(InvalidRequest::new(
                format!("`temperature` must be between 0 and 2, got {t}."),
                Some("temperature"),
            ));
        }
        if let Some(p) = self.top_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(InvalidRequest::new(
                format!("`top_p` must be between 0 and 1, got {p}."),
                Some("top_p"),
            ));
        }
        Ok(())
    }

    /// The output cap of this request on `model`: its `max_output_tokens`, else the model's.
    /// Admission reserves the budget for exactly this many output tokens, and the worker sends
    /// exactly this cap upstream, so the reservation is the upstream's worst-case bill (reasoning
    /// tokens included: every provider counts them inside the cap).
    pub fn output_cap(&self, model: &ModelConfig) -> u32 {
        self.max_output_tokens.unwrap_or(model.max_output_tokens)
    }

    /// Refuses what this server's limits (`server.max_input_items`) or `model`'s provider cannot
    /// take (a 400 naming the field), rather than changing it silently. `history` is what a
    /// `previous_response_id` brings before the input.
    pub fn check_for(
        &self,
        model: &ModelConfig,
        history: &[InputItem],
        max_input_items: usize,
    ) -> Result<(), InvalidRequest> {
        let items = history.len() + self.input.len();
        if items > max_input_items {
            let message = if history.is_empty() {
                format!(
                    "`input` may hold at most {max_input_items} items, got {}.",
                    self.input.len()
                )
            } else {
                format!(
                    "The conversation (the previous responses' {} items and the {} of `input`) \
                     may hold at most {max_input_items} items.",
                    history.len(),
                    self.input.len()
                )
            };
            return Err(InvalidRequest::new(message, Some("input")));
        }
        if model.provider != ProviderKind::Anthropic {
            return Ok(());
        }
        let refuse = |param: &str| {
            InvalidRequest::unsupported(
                param,
                format_args!(
                    "is not supported for model {} (an Anthropic model)",
                    model.name
                ),
            )
        };
        if let Some(t) = self.temperature.filter(|t| *t > 1.0) {
            return Err(InvalidRequest::new(
                format!(
                    "`temperature` must be between 0 and 1 for model {}, got {t}.",
                    model.name
                ),
                Some("temperature"),
            ));
        }
        if self.format.is_some() {
            return Err(refuse("text.format"));
        }
        if self.reasoning_effort.is_some() {
            return Err(refuse("reasoning.effort"));
        }
        if self.prompt_cache_key.is_some() {
            return Err(refuse("prompt_cache_key"));
        }
        if self.service_tier.as_deref() == Some("default") {
            return Err(refuse("service_tier"));
        }
        if let Some(i) = self.tools.iter().position(|t| t.strict == Some(true)) {
            return Err(refuse(&format!("tools[{i}].strict")));
        }
        // Anthropic takes a call's arguments as a JSON object, not as text.
        for (i, item) in self.input.iter().enumerate() {
            if let InputItem::FunctionCall { arguments, .. } = item {
                if !serde_json::from_str::<Value>(arguments).is_ok_and(|v| v.is_object()) {
                    return Err(InvalidRequest::invalid_value(
                        &format!("input[{i}].arguments"),
                        format!(
                            "The arguments of a function call must be a JSON object for \
                             model {}.",
                            model.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the model's provider is asked for: the history, `instructions` as a system message,
    /// then the input, and every honoured option.
    pub fn call_request(&self, model: &ModelConfig, history: &[InputItem]) -> CallRequest {
        let mut turns: Vec<Turn> = history.iter().map(InputItem::to_turn).collect();
        if let Some(instructions) = &self.instructions {
            turns.push(Turn::Message {
                role: Role::System,
                text: instructions.clone(),
            });
        }
        turns.extend(self.input.iter().map(InputItem::to_turn));
        CallRequest {
            turns,
            max_output_tokens: self.output_cap(model),
            temperature: self.temperature,
            top_p: self.top_p,
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            parallel_tool_calls: self.parallel_tool_calls,
            format: self.format.clone(),
            reasoning_effort: self.reasoning_effort.clone(),
            end_user: self.safety_identifier.clone().or_else(|| self.user.clone()),
            prompt_cache_key: self.prompt_cache_key.clone(),
            // `auto` is every upstream's default.
            service_tier: self.service_tier.clone().filter(|t| t != "auto"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<CreateResponse, InvalidRequest> {
        CreateResponse::parse(body.to_string().as_bytes()).map(|(r, _)| r)
    }

    #[test]
    fn accepts_string_and_item_inputs() {
        let r = parse(json!({"model": "m", "input": "hi", "background": true})).unwrap();
        assert_eq!(r.input.len(), 1);
        let r = parse(json!({"model": "m", "instructions": "be brief", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                         {"type": "input_text", "text": "b"}]}]}))
        .unwrap();
        let call = r.call_request(&ModelConfig::mock("m"), &[]);
        assert_eq!(
            call.turns,
            [
                Turn::Message {
                    role: Role::System,
                    text: "be brief".into()
                },
                Turn::Message {
                    role: Role::User,
                    text: "ab".into()
                }
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused_naming_them() {
        for (body, param) in [
            (json!({"model": "m", "input": "x", "colour": 1}), "colour"),
            (
                json!({"model": "m", "input": "x", "reasoning": {"effort": "low", "depth": 2}}),
                "reasoning.depth",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": "x", "mood": 1}]}),
                "input[0].mood",
            ),
            (
                json!({"model": "m", "input": "x",
                       "tools": [{"type": "function", "name": "f", "params": {}}]}),
                "tools[0].params",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.code, Some("unknown_parameter"), "{e:?}");
            assert_eq!(e.param.as_deref(), Some(param));
        }
    }

    #[test]
    fn what_is_not_carried_out_is_refused_naming_it() {
        for (body, param) in [
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "reasoning": {"summary": "auto"}}),
                "reasoning.summary",
            ),
            (
                json!({"model": "m", "input": "x", "include": ["reasoning.encrypted_content"]}),
                "include[0]",
            ),
            (
                json!({"model": "m", "input": "x", "truncation": "auto"}),
                "truncation",
            ),
            (
                json!({"model": "m", "input": "x", "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"model": "m", "input": "x", "service_tier": "flex"}),
                "service_tier",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [
                    {"type": "input_image", "image_url": "https://x/y.png"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}),
                "input[0].type",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.code, Some("unsupported_parameter"), "{e:?}");
            assert_eq!(e.param.as_deref(), Some(param));
        }
        // An explicit null is the same as leaving the field out.
        assert!(parse(json!({"model": "m", "input": "x", "top_logprobs": null})).is_ok());
    }

    #[test]
    fn tools_formats_and_reasoning_are_read() {
        let r = parse(json!({"model": "m", "input": "weather?",
            "tools": [{"type": "function", "name": "get_weather", "strict": true,
                       "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": false,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
            "reasoning": {"effort": "high"}}))
        .unwrap();
        let call = r.call_request(&ModelConfig::mock("m"), &[]);
        assert_eq!(call.tools[0].name, "get_weather");
        assert_eq!(call.tools[0].strict, Some(true));
        assert_eq!(
            call.tool_choice,
            Some(ToolChoice::Function("get_weather".into()))
        );
        assert_eq!(call.parallel_tool_calls, Some(false));
        assert!(
            matches!(call.format, Some(OutputFormat::JsonSchema { ref name, .. }) if name == "w")
        );
        assert_eq!(call.reasoning_effort.as_deref(), Some("high"));
        let e = parse(json!({"model": "m", "input": "x", "tool_choice": "required"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = parse(
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "a"}],
                             "tool_choice": {"type": "function", "name": "b"}}),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice.name"));
        let e =
            parse(json!({"model": "m", "input": "x", "reasoning": {"effort": "max"}})).unwrap_err();
        assert_eq!(e.code, Some("invalid_value"));
    }

    #[test]
    fn function_call_items_become_turns() {
        let r = parse(json!({"model": "m", "input": [
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}",
             "id": "fc_1", "status": "completed"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]}))
        .unwrap();
        let call = r.call_request(&ModelConfig::mock("m"), &[]);
        assert_eq!(
            call.turns[1],
            Turn::FunctionOutput {
                call_id: "call_1".into(),
                output: "sunny".into()
            }
        );
        let e = parse(
            json!({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].call_id"));
    }

    #[test]
    fn anthropic_models_refuse_what_anthropic_cannot_take() {
        let mut model = ModelConfig::mock("claude");
        model.provider = ProviderKind::Anthropic;
        for (body, param) in [
            (
                json!({"text": {"format": {"type": "json_object"}}}),
                "text.format",
            ),
            (json!({"reasoning": {"effort": "low"}}), "reasoning.effort"),
            (
                json!({"tools": [{"type": "function", "name": "f", "strict": true}]}),
                "tools[0].strict",
            ),
        ] {
            let mut body = body;
            body["model"] = json!("claude");
            body["input"] = json!("x");
            let e = parse(body)
                .unwrap()
                .check_for(&model, &[], 100)
                .unwrap_err();
            assert_eq!(e.code, Some("unsupported_parameter"));
            assert_eq!(e.param.as_deref(), Some(param));
        }
        let r = parse(json!({"model": "claude", "input": [
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}))
        .unwrap();
        let e = r.check_for(&model, &[], 100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].arguments"));
        assert!(r.check_for(&ModelConfig::mock("m"), &[], 100).is_ok());
    }

    #[test]
    fn metadata_has_openai_limits() {
        let pairs: serde_json::Map<String, Value> = (0..17)
            .map(|i| (format!("k{i}"), Value::from("v")))
            .collect();
        let e = parse(json!({"model": "m", "input": "x", "metadata": pairs})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata"));
        let e = parse(json!({"model": "m", "input": "x", "metadata": {"k": "v".repeat(513)}}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata.k"));
        assert!(
            parse(json!({"model": "m", "input": "x", "metadata": {"k".repeat(65): "v"}})).is_err()
        );
        assert!(parse(json!({"model": "m", "input": "x",
            "metadata": {"k".repeat(64): "v".repeat(512)}}))
        .is_ok());
        let e = parse(json!({"model": "m", "input": "x", "metadata": {"k": 1}})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata.k"));
    }

    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        let e = CreateResponse::parse(br#"{"model":"m","input":"hi","metadata":{"k":"a\u0000b"}}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata.k"));
        let e = CreateResponse::parse(
            br#"{"model":"m","input":[{"role":"user","content":"x\u0000"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].content"));
        let e = CreateResponse::parse(br#"{"model":"m","input":"hi","x\u0000":1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("x\\u0000"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse(json!({"model": "m", "input": "x", "max_output_tokens": "ten"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_output_tokens"));
        let e = parse(json!({"input": "x"})).unwrap_err();
        assert!(e.message.contains("model"), "{}", e.message);
        let e = CreateResponse::parse(b"{not json").unwrap_err();
        assert_eq!(e.param, None);
        let e = parse(json!({"model": "m", "input": "x", "temperature": 5})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e =
            parse(json!({"model": "m", "input": [{"role": "robot", "content": "x"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].role"));
    }
}
