//! The Responses API request (`POST /v1/responses` body), as the front validates it and the worker
//! reads it back from the job row. Unknown fields are accepted and ignored, as OpenAI's SDKs send
//! fields this server may not know; a known field of the wrong type is refused, naming the field.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::{
    config::{ModelConfig, ProviderKind},
    provider::{CallRequest, ChatMessage, Role, Turn},
};

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct CreateResponse {
    pub model: String,
    pub input: Input,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: Option<HashMap<String, String>>,
    pub store: Option<bool>,
    pub background: Option<bool>,
    pub stream: Option<bool>,
    pub user: Option<String>,
}

/// `input`: a string, or a list of message items.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<InputItem>),
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct InputItem {
    #[serde(rename = "type", default = "message_type")]
    pub kind: String,
    pub role: String,
    pub content: Content,
}

fn message_type() -> String {
    "message".into()
}

/// A message's content: a string, or a list of text parts.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

/// Why a body was refused: the message and the offending parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRequest {
    pub message: String,
    pub param: Option<String>,
}

impl InvalidRequest {
    fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_string),
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
        let request: Self = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            let param = (path != ".").then_some(path);
            InvalidRequest {
                message: format!("Invalid request body: {}", e.inner()),
                param,
            }
        })?;
        request.validate()?;
        Ok((request, value))
    }

    fn validate(&self) -> Result<(), InvalidRequest> {
        if self.model.trim().is_empty() {
            return Err(InvalidRequest::new(
                "`model` must not be empty.",
                Some("model"),
            ));
        }
        if let Input::Items(items) = &self.input {
            if items.is_empty() {
                return Err(InvalidRequest::new(
                    "`input` must not be empty.",
                    Some("input"),
                ));
            }
            for (i, item) in items.iter().enumerate() {
                if item.kind != "message" {
                    return Err(InvalidRequest::new(
                        format!("Input items of type {:?} are not supported.", item.kind),
                        Some(&format!("input[{i}].type")),
                    ));
                }
                if !matches!(
                    item.role.as_str(),
                    "user" | "assistant" | "system" | "developer"
                ) {
                    return Err(InvalidRequest::new(
                        format!("Invalid role {:?}.", item.role),
                        Some(&format!("input[{i}].role")),
                    ));
                }
            }
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

    /// The chat messages sent upstream: `instructions` as a system message, then the input.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut messages = Vec::new();
        if let Some(instructions) = &self.instructions {
            messages.push(ChatMessage::new("system", instructions.as_str()));
        }
        match &self.input {
            Input::Text(text) => messages.push(ChatMessage::new("user", text.as_str())),
            Input::Items(items) => messages.extend(items.iter().map(|item| {
                ChatMessage {
                    role: if item.role == "developer" {
                        "system".into()
                    } else {
                        item.role.clone()
                    },
                    content: match &item.content {
                        Content::Text(text) => text.clone(),
                        Content::Parts(parts) => parts
                            .iter()
                            .map(|p| p.text.as_str())
                            .collect::<Vec<_>>()
                            .join(""),
                    },
                }
            })),
        }
        messages
    }

    /// The output cap of this request on `model`: its `max_output_tokens`, else the model's.
    /// Admission reserves the budget for exactly this many output tokens, and the worker sends
    /// exactly this cap upstream, so the reservation is the upstream's worst-case bill.
    pub fn output_cap(&self, model: &ModelConfig) -> u32 {
        self.max_output_tokens.unwrap_or(model.max_output_tokens)
    }

    /// Refuses what this server's limits (`server.max_input_items`) or `model`'s provider cannot
    /// take (a 400 naming the field), rather than changing it silently.
    pub fn check_for(
        &self,
        model: &ModelConfig,
        max_input_items: usize,
    ) -> Result<(), InvalidRequest> {
        if let Input::Items(items) = &self.input {
            if items.len() > max_input_items {
                return Err(InvalidRequest::new(
                    format!(
                        "`input` may hold at most {max_input_items} items, got {}.",
                        items.len()
                    ),
                    Some("input"),
                ));
            }
        }
        if model.provider == ProviderKind::Anthropic {
            if let Some(t) = self.temperature.filter(|t| *t > 1.0) {
                return Err(InvalidRequest::new(
                    format!(
                        "`temperature` must be between 0 and 1 for model {}, got {t}.",
                        model.name
                    ),
                    Some("temperature"),
                ));
            }
        }
        Ok(())
    }

    /// What the model's provider is asked for.
    pub fn call_request(&self, model: &ModelConfig) -> CallRequest {
        let turns = self
            .messages()
            .into_iter()
            .map(|m| Turn::Message {
                role: match m.role.as_str() {
                    "system" => Role::System,
                    "assistant" => Role::Assistant,
                    _ => Role::User,
                },
                text: m.content,
            })
            .collect();
        CallRequest {
            temperature: self.temperature,
            top_p: self.top_p,
            ..CallRequest::plain(turns, self.output_cap(model))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_string_and_item_inputs_and_ignores_unknown_fields() {
        let (r, _) = CreateResponse::parse(
            br#"{"model":"m","input":"hi","background":true,"reasoning":{"effort":"low"}}"#,
        )
        .unwrap();
        assert_eq!(r.messages().len(), 1);
        let (r, _) = CreateResponse::parse(
            br#"{"model":"m","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"a"},{"type":"input_text","text":"b"}]}]}"#,
        )
        .unwrap();
        let messages = r.messages();
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].content, "ab");
    }

    #[test]
    fn metadata_has_openai_limits() {
        let pairs: serde_json::Map<String, Value> = (0..17)
            .map(|i| (format!("k{i}"), Value::from("v")))
            .collect();
        let body = serde_json::json!({"model": "m", "input": "x", "metadata": pairs});
        let e = CreateResponse::parse(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata"));
        let body =
            serde_json::json!({"model": "m", "input": "x", "metadata": {"k": "v".repeat(513)}});
        let e = CreateResponse::parse(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata.k"));
        let body =
            serde_json::json!({"model": "m", "input": "x", "metadata": {"k".repeat(65): "v"}});
        assert!(CreateResponse::parse(body.to_string().as_bytes()).is_err());
        let body = serde_json::json!({"model": "m", "input": "x",
            "metadata": {"k".repeat(64): "v".repeat(512)}});
        assert!(CreateResponse::parse(body.to_string().as_bytes()).is_ok());
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
        let e = CreateResponse::parse(br#"{"model":"m","input":"x","max_output_tokens":"ten"}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_output_tokens"));
        let e = CreateResponse::parse(br#"{"input":"x"}"#).unwrap_err();
        assert!(e.message.contains("model"), "{}", e.message);
        let e = CreateResponse::parse(b"{not json").unwrap_err();
        assert_eq!(e.param, None);
        let e = CreateResponse::parse(br#"{"model":"m","input":"x","temperature":5}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
    }
}
