//! `GET /v1/responses/{id}/input_items`: a job's input as OpenAI's list of items (messages,
//! function calls and function call outputs), read back from the request stored on the job row.
//! `instructions` is not an input item, as with OpenAI. Pagination: `limit` (1–100, default 20),
//! `order` (`asc` or `desc`, default `desc`), `after` and `before` (item ids).
//!
//! An input may hold thousands of items, so a page is sliced from the stored request in
//! PostgreSQL ([`jobs::input_slice`]): only the page's items (and one more, to know whether there
//! are more) are sent and parsed, never the whole request.

use std::collections::HashMap;

use axum::{
    extract::{RawQuery, State},
    http::HeaderMap,
    Json,
};
use serde_json::{json, Value};

use super::{
    openapi::{ErrorBody, InputItemList},
    query_pairs,
    responses::owned_id,
    ApiError, AppState, JobPath,
};
use crate::{
    ids::{JobId, KeyId},
    request::{self, InputItem},
    store::jobs::{self, InputWindow},
};

/// The id prefix of an item of this kind (its `type`): `msg` for a message, `fc` for a function
/// call, `fco` for a function call's output.
fn prefix(kind: &str) -> &'static str {
    match kind {
        "function_call" => "fc",
        "function_call_output" => "fco",
        _ => "msg",
    }
}

/// The stable id of the input item at `index`: `<prefix>_<job>_<index>`.
fn item_id(job: JobId, index: usize, item: &InputItem) -> String {
    let prefix = match item {
        InputItem::Message { .. } => "msg",
        InputItem::FunctionCall { .. } => "fc",
        InputItem::FunctionCallOutput { .. } => "fco",
    };
    format!("{prefix}_{}_{index}", job.0.simple())
}

/// The index an item id of job `job` names, and its prefix; None for what is no such id.
fn parse_item_id(id: &str, job: JobId) -> Option<(&str, usize)> {
    let (prefix, rest) = id.split_once('_')?;
    let index = rest
        .strip_prefix(&job.0.simple().to_string())?
        .strip_prefix('_')?;
    let i: usize = index.parse().ok()?;
    // Only the id as written (`…_7`, not `…_07` or `…_+7`).
    (i.to_string() == index).then_some((prefix, i))
}

fn invalid(message: &str, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.into()),
        code: None,
    }
}

/// What the query asks for. A malformed value is kept as its error, answered once the job is
/// known to exist (a missing job is a 404 whatever the query).
struct PageQuery<'a> {
    limit: Result<usize, ApiError>,
    ascending: Result<bool, ApiError>,
    after: Cursor<'a>,
    before: Cursor<'a>,
}

/// A cursor (`after`, `before`) when one was sent: the prefix and index of the item it names, or
/// None when it is no item id of this job.
type Cursor<'a> = Option<Option<(&'a str, usize)>>;

impl<'a> PageQuery<'a> {
    fn read(query: &'a HashMap<String, String>, job: JobId) -> Self {
        let cursor = |param: &str| query.get(param).map(|id| parse_item_id(id, job));
        Self {
            limit: match query.get("limit") {
                None => Ok(20),
                Some(l) => l
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=100).contains(l))
                    .ok_or_else(|| invalid("`limit` must be an integer from 1 to 100.", "limit")),
            },
            ascending: match query.get("order").map(String::as_str) {
                None | Some("desc") => Ok(false),
                Some("asc") => Ok(true),
                Some(_) => Err(invalid("`order` must be `asc` or `desc`.", "order")),
            },
            after: cursor("after"),
            before: cursor("before"),
        }
    }
}

/// Checks that a cursor names an item of the input: its index is in it, and its prefix is that of
/// the item's kind.
fn check_cursor(
    cursor: Cursor,
    total: usize,
    kind: Option<&str>,
    param: &str,
) -> Result<(), ApiError> {
    match cursor {
        None => Ok(()),
        Some(Some((sent, index))) if index < total && kind.map(prefix) == Some(sent) => Ok(()),
        Some(_) => Err(invalid("No input item with this id.", param)),
    }
}

/// One page of the input items of job `id` of `key_id` (oldest first in the input; the page in
/// the order asked) as OpenAI's list object; None when the key has no such job.
async fn page(
    state: &AppState,
    id: JobId,
    key_id: KeyId,
    query: &HashMap<String, String>,
) -> Result<Option<Value>, ApiError> {
    let asked = PageQuery::read(query, id);
    let limit = *asked.limit.as_ref().unwrap_or(&20);
    let ascending = *asked.ascending.as_ref().unwrap_or(&false);
    let index = |cursor: Cursor| cursor.flatten().map(|(_, i)| i);
    let (after, before) = (index(asked.after), index(asked.before));
    // In input order the window lies strictly between the two cursors: `after` is its lower
    // bound in ascending order, its upper bound in descending order.
    let (lo, hi) = if ascending {
        (after, before)
    } else {
        (before, after)
    };
    let window = InputWindow {
        lo,
        hi,
        descending: !ascending,
        count: limit + 1,
        kinds_at: [after, before],
    };
    let Some(slice) = jobs::input_slice(&state.pool, id, key_id, window).await? else {
        return Ok(None);
    };
    asked.limit?;
    asked.ascending?;
    let [after_kind, before_kind] = &slice.kinds;
    check_cursor(asked.after, slice.total, after_kind.as_deref(), "after")?;
    check_cursor(asked.before, slice.total, before_kind.as_deref(), "before")?;
    let has_more = slice.items.len() > limit;
    let data = slice
        .items
        .iter()
        .take(limit)
        .map(|(index, value)| {
            let item = request::stored_input_item(value, *index).map_err(|e| {
                ApiError::Internal(anyhow::anyhow!("stored request unreadable: {}", e.message))
            })?;
            Ok(item.to_json(&item_id(id, *index, &item)))
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(Some(json!({
        "object": "list",
        "first_id": data.first().map(|item| item["id"].clone()),
        "last_id": data.last().map(|item| item["id"].clone()),
        "has_more": has_more,
        "data": data,
    })))
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
    JobPath(id): JobPath,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let (key, job_id) = owned_id(&state, &headers, &id).await?;
    page(&state, job_id, key.id, &query_pairs(query))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::job_not_found(&id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_are_read_back_exactly() {
        let job = JobId::new();
        let hex = job.0.simple();
        assert_eq!(
            parse_item_id(&format!("msg_{hex}_0"), job),
            Some(("msg", 0))
        );
        assert_eq!(
            parse_item_id(&format!("fco_{hex}_34999"), job),
            Some(("fco", 34999))
        );
        for id in [
            format!("msg_{hex}_07"),
            format!("msg_{hex}_+7"),
            format!("msg_{hex}_"),
            format!("msg_{hex}7"),
            format!("msg_{}_1", JobId::new().0.simple()),
            "msg".into(),
        ] {
            assert_eq!(parse_item_id(&id, job), None, "{id}");
        }
    }
}
