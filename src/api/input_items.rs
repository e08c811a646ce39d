//! `GET /v1/responses/{id}/input_items`: a job's input as OpenAI's list of items (messages,
//! function calls and function call outputs), read back from the request stored on the job row. `instructions` is not an input item, as with
//! OpenAI. Pagination: `limit` (1–100, default 20), `order` (`asc` or `desc`, default `desc`),
//! `after` and `before` (item ids).

use std::collections::HashMap;

use axum::{
    extract::{Path, RawQuery, State},
    http::HeaderMap,
    Json,
};
use serde_json::{json, Value};

use super::{
    openapi::{ErrorBody, InputItemList},
    query_pairs,
    responses::owned_job,
    ApiError, AppState,
};
use crate::{
    request::{self, InputItem},
    store::jobs::JobRow,
};

/// The input items of a job, oldest first, each with a stable id `<prefix>_<job>_<index>`
/// (`msg_` for a message, `fc_` for a function call, `fco_` for a function call's output).
pub fn input_items(job: &JobRow) -> Result<Vec<Value>, ApiError> {
    let items = request::stored_input(&job.request.0).map_err(|e| {
        ApiError::Internal(anyhow::anyhow!("stored request unreadable: {}", e.message))
    })?;
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = match item {
                InputItem::Message { .. } => "msg",
                InputItem::FunctionCall { .. } => "fc",
                InputItem::FunctionCallOutput { .. } => "fco",
            };
            item.to_json(&format!("{prefix}_{}_{i}", job.id.0.simple()))
        })
        .collect())
}

fn invalid(message: &str, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.into()),
        code: None,
    }
}

/// One page of `items` (oldest first) as OpenAI's list object.
pub fn page(mut items: Vec<Value>, query: &HashMap<String, String>) -> Result<Value, ApiError> {
    let limit = match query.get("limit") {
        None => 20,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| invalid("`limit` must be an integer from 1 to 100.", "limit"))?,
    };
    match query.get("order").map(String::as_str) {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(_) => return Err(invalid("`order` must be `asc` or `desc`.", "order")),
    }
    let position = |param: &str| -> Result<Option<usize>, ApiError> {
        match query.get(param) {
            None => Ok(None),
            Some(id) => items
                .iter()
                .position(|item| item["id"] == id.as_str())
                .map(Some)
                .ok_or_else(|| invalid("No input item with this id.", param)),
        }
    };
    let start = position("after")?.map_or(0, |i| i + 1);
    let end = position("before")?.unwrap_or(items.len()).max(start);
    let window = &items[start..end];
    let data: Vec<Value> = window.iter().take(limit).cloned().collect();
    Ok(json!({
        "object": "list",
        "first_id": data.first().map(|item| item["id"].clone()),
        "last_id": data.last().map(|item| item["id"].clone()),
        "has_more": window.len() > limit,
        "data": data,
    }))
}

/// The input items of a response.
#[utoipa::path(
    get, path = "/v1/responses/{id}/input_items", tag = "responses", security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The response id, `resp_…`"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("order" = Option<String>, Query, description = "`asc` or `desc` (default)"),
        ("after" = Option<String>, Query, description = "An item id: the items after it"),
        ("before" = Option<String>, Query, description = "An item id: the items before it"),
    ),
    responses(
        (status = 200, description = "A page of input items", body = InputItemList),
        (status = 400, description = "Invalid pagination", body = ErrorBody),
        (status = 401, description = "No key, or an invalid one", body = ErrorBody),
        (status = 404, description = "No such response for this key", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job_id = %id))]
pub(super) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let (_, job) = owned_job(&state, &headers, &id).await?;
    Ok(Json(page(input_items(&job)?, &query_pairs(query))?))
}
