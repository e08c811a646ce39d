//! The OpenAI Response object, built from a job row.

use serde_json::{json, Value};

use crate::{ids::JobStatus, store::jobs::JobRow};

pub fn response_object(job: &JobRow) -> Value {
    let request = &job.request.0;
    let field = |name: &str| request.get(name).cloned().unwrap_or(Value::Null);
    let status = job.status;
    let output = if job.output_text.is_empty() && status != JobStatus::Completed {
        json!([])
    } else {
        let item_status = match status {
            JobStatus::Completed => "completed",
            JobStatus::Queued | JobStatus::InProgress => "in_progress",
            _ => "incomplete",
        };
        json!([{
            "type": "message",
            "id": job.id.message_id(),
            "status": item_status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": job.output_text, "annotations": []}],
        }])
    };
    let usage = match (job.input_tokens, job.output_tokens) {
        (Some(input), Some(output)) => json!({
            "input_tokens": input,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
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
    json!({
        "id": job.id.to_string(),
        "object": "response",
        "created_at": job.created_at.timestamp(),
        "status": status,
        "background": field("background").as_bool().unwrap_or(false),
        "error": error,
        "incomplete_details": Value::Null,
        "instructions": field("instructions"),
        "max_output_tokens": field("max_output_tokens"),
        "model": job.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": Value::Null,
        "reasoning": {"effort": Value::Null, "summary": Value::Null},
        "store": field("store").as_bool().unwrap_or(true),
        "temperature": field("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": field("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": field("user"),
        "metadata": match field("metadata") { Value::Null => json!({}), m => m },
    })
}
