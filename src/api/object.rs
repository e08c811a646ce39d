//! The OpenAI Response object and its output message, built from a job row.

use serde_json::{json, Value};

use crate::{ids::JobStatus, store::jobs::JobRow};

/// The output message item of a job: one assistant message with one `output_text` part.
pub fn output_message(job: &JobRow, text: &str) -> Value {
    let item_status = match job.status {
        JobStatus::Completed => "completed",
        JobStatus::Queued | JobStatus::InProgress => "in_progress",
        _ => "incomplete",
    };
    json!({
        "type": "message",
        "id": job.id.message_id(),
        "status": item_status,
        "role": "assistant",
        "content": [output_text_part(text)],
    })
}

pub fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// The Response object as a client sees it now. A job has its output message from the moment a
/// worker first claimed it (`attempt` ≥ 1), as the stream announces it then.
pub fn response_object(job: &JobRow) -> Value {
    let request = &job.request.0;
    let field = |name: &str| request.get(name).cloned().unwrap_or(Value::Null);
    let status = job.status;
    let output = if job.attempt >= 1 || status == JobStatus::Completed {
        json!([output_message(job, &job.output_text)])
    } else {
        json!([])
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
    let incomplete_details = match status {
        JobStatus::Incomplete => json!({
            "reason": job.incomplete_reason.as_deref().unwrap_or("max_output_tokens")
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
        "incomplete_details": incomplete_details,
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

/// The Response object as it stood at `status`, before any output: what the `response.created`,
/// `response.queued` and `response.in_progress` events carry, the same whenever they are read.
pub fn response_before_output(job: &JobRow, status: JobStatus) -> Value {
    let mut object = response_object(job);
    object["status"] = json!(status);
    object["output"] = json!([]);
    object["usage"] = Value::Null;
    object["error"] = Value::Null;
    object["incomplete_details"] = Value::Null;
    object
}
