//! The OpenAI Response object and its output items, built from a job row and its output.
//!
//! Every field a request may set is echoed as the request set it (or with OpenAI's default), so
//! the object says truthfully what the model was asked for: `tools`, `tool_choice`,
//! `parallel_tool_calls`, `text.format`, `reasoning.effort`, `previous_response_id`, and the rest.

use serde_json::{json, Value};

use crate::{
    ids::JobStatus,
    output::{Item, Output, OutputItem},
    store::jobs::JobRow,
};

/// The status of an output item: `completed` once a later item followed it; the last item's
/// follows the job (`in_progress` while it runs, `incomplete` if it ended any way but
/// `completed`).
pub fn item_status(job: &JobRow, done: bool) -> &'static str {
    if done {
        return "completed";
    }
    match job.status {
        JobStatus::Completed => "completed",
        JobStatus::Queued | JobStatus::InProgress => "in_progress",
        _ => "incomplete",
    }
}

/// The id of the output item at `index`.
pub fn item_id(job: &JobRow, index: usize, item: &Item) -> String {
    let prefix = match item {
        Item::Message { .. } => "msg",
        Item::FunctionCall { .. } => "fc",
    };
    job.id.output_item_id(prefix, index)
}

pub fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// The output item at `index` as OpenAI shows it, with `status`.
pub fn output_item(job: &JobRow, index: usize, item: &Item, status: &str) -> Value {
    let id = item_id(job, index, item);
    match item {
        Item::Message { text } => json!({
            "type": "message",
            "id": id,
            "status": status,
            "role": "assistant",
            "content": [output_text_part(text)],
        }),
        Item::FunctionCall {
            call_id,
            name,
            arguments,
        } => json!({
            "type": "function_call",
            "id": id,
            "status": status,
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        }),
    }
}

/// The item as `response.output_item.added` announces it: empty, in progress.
pub fn opened_item(job: &JobRow, index: usize, item: &Item) -> Value {
    let empty = match item {
        Item::Message { .. } => Item::Message {
            text: String::new(),
        },
        Item::FunctionCall { call_id, name, .. } => Item::FunctionCall {
            call_id: call_id.clone(),
            name: name.clone(),
            arguments: String::new(),
        },
    };
    let mut value = output_item(job, index, &empty, "in_progress");
    if let Item::Message { .. } = item {
        value["content"] = json!([]);
    }
    value
}

/// The Response object as a client sees it now, with the job's `output` as it stands.
pub fn response_object(job: &JobRow, output: &Output) -> Value {
    let request = &job.request.0;
    let field = |name: &str| request.get(name).cloned().unwrap_or(Value::Null);
    let or = |name: &str, default: Value| match field(name) {
        Value::Null => default,
        given => given,
    };
    let status = job.status;
    let items: Vec<Value> = output
        .items
        .iter()
        .enumerate()
        .map(|(i, OutputItem { item, done })| output_item(job, i, item, item_status(job, *done)))
        .collect();
    let usage = match (job.input_tokens, job.output_tokens) {
        (Some(input), Some(output)) => json!({
            "input_tokens": input,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": job.reasoning_tokens.unwrap_or(0)},
            "total_tokens": input + output,
        }),
        _ => Value::Null,
    };
    let error = match (&job.error, status) {
        (Some(e), JobStatus::Failed) => json!({
            "code": e.0.get("code").cloned().unwrap_or(json!("server_error")),
            "message": e.0.get("message").cloned().unwrap_or(json!("the job failed")),
        }),
        _ => Value::Null,
    };
    let incomplete_details = match status {
        JobStatus::Incomplete => json!({
            "reason": job.incomplete_reason.as_deref().unwrap_or("max_output_tokens")
        }),
        _ => Value::Null,
    };
    let text_format = request
        .pointer("/text/format")
        .filter(|f| !f.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"type": "text"}));
    let effort = request
        .pointer("/reasoning/effort")
        .cloned()
        .unwrap_or(Value::Null);
    json!({
        "id": job.id.to_string(),
        "object": "response",
        "created_at": job.created_at.timestamp(),
        "status": status,
        "background": field("background").as_bool().unwrap_or(false),
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": field("instructions"),
        "max_output_tokens": field("max_output_tokens"),
        "model": job.model,
        "output": items,
        "parallel_tool_calls": or("parallel_tool_calls", json!(true)),
        "previous_response_id": field("previous_response_id"),
        "prompt_cache_key": field("prompt_cache_key"),
        "reasoning": {"effort": effort, "summary": Value::Null},
        "safety_identifier": field("safety_identifier"),
        "service_tier": or("service_tier", json!("auto")),
        "store": field("store").as_bool().unwrap_or(true),
        "temperature": field("temperature"),
        "text": {"format": text_format},
        "tool_choice": or("tool_choice", json!("auto")),
        "tools": or("tools", json!([])),
        "top_p": field("top_p"),
        "truncation": or("truncation", json!("disabled")),
        "usage": usage,
        "user": field("user"),
        "metadata": or("metadata", json!({})),
    })
}

/// The Response object as it stood at `status`, before any output: what the `response.created`,
/// `response.queued` and `response.in_progress` events carry, the same whenever they are read.
pub fn response_before_output(job: &JobRow, status: JobStatus) -> Value {
    let mut object = response_object(job, &Output::default());
    object["status"] = json!(status);
    object["usage"] = Value::Null;
    object["error"] = Value::Null;
    object["incomplete_details"] = Value::Null;
    object
}
