//! The admin API, `/admin/…`: API keys (create, list, get, change limits, revoke, usage) and
//! webhook endpoints, for operators who cannot reach the database with the CLI.
//!
//! Open only when a master key is set (`TOLLGATE_ADMIN_KEY`, or a file: `config::AdminConfig`);
//! without one every route answers 403 `admin_disabled` (401 to a request with no credentials).
//! The master key travels as `Authorization: Bearer …` and is compared in constant time (the
//! SHA-256 of each side, so not even its length shows in the time taken). An ordinary API key opens nothing here. Errors have
//! OpenAI's shape, as everywhere; a refused request writes nothing.

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Json,
};
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{openapi::ErrorBody, ApiError, AppState};
use crate::{
    money::MicroUsd,
    store::{
        self,
        keys::{BudgetPeriod, KeyChange, KeyListing, NewKey, Revoked},
    },
    webhooks::{self, WebhookError},
};

/// The routes, each documented by its handler's `#[utoipa::path]`, behind the master key.
pub fn router(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(get_key, update_key))
        .routes(routes!(revoke_key))
        .routes(routes!(key_usage))
        .routes(routes!(add_webhook, list_webhooks))
        .routes(routes!(remove_webhook))
        .layer(middleware::from_fn_with_state(state, require_master_key))
}

/// Lets a request through only with the master key.
async fn require_master_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(master) = &state.config.admin.key else {
        if presented.is_empty() {
            return ApiError::Unauthorized(
                "The admin API needs the master key as `Authorization: Bearer <key>`; it is not \
                 enabled on this server (no master key is set)."
                    .into(),
            )
            .into_response();
        }
        return ApiError::Forbidden {
            message: "The admin API is not enabled on this server: it opens when a master key \
                      is set (TOLLGATE_ADMIN_KEY or TOLLGATE_ADMIN_KEY_FILE)."
                .into(),
            code: "admin_disabled",
        }
        .into_response();
    };
    let matches: bool = Sha256::digest(presented.as_bytes())
        .ct_eq(&Sha256::digest(master.expose().as_bytes()))
        .into();
    if !matches {
        tracing::warn!("admin request refused: no master key, or a wrong one");
        return ApiError::Unauthorized(
            "The admin API needs the master key as `Authorization: Bearer <key>`.".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// A key as the admin API shows it (never its secret, except once at creation).
#[derive(Serialize, ToSchema)]
pub struct AdminKey {
    /// `admin.key`.
    object: &'static str,
    id: Uuid,
    name: String,
    /// The secret's first characters, `sk-tg-` and 8 hex digits.
    key_prefix: String,
    /// The secret: only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    rpm_limit: Option<i32>,
    tpm_limit: Option<i32>,
    max_in_flight: Option<i32>,
    budget_micro_usd: Option<i64>,
    budget_period: Option<String>,
    allowed_models: Option<Vec<String>>,
    in_flight: i64,
    reserved_micro_usd: i64,
    spent_micro_usd: i64,
    /// Unix seconds.
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl From<KeyListing> for AdminKey {
    fn from(k: KeyListing) -> Self {
        Self {
            object: "admin.key",
            id: k.id,
            name: k.name,
            key_prefix: k.key_prefix,
            key: None,
            rpm_limit: k.rpm_limit,
            tpm_limit: k.tpm_limit,
            max_in_flight: k.max_in_flight,
            budget_micro_usd: k.budget_micro_usd,
            budget_period: k.budget_period.map(|p| period_name(p).into()),
            allowed_models: k.allowed_models,
            in_flight: k.in_flight,
            reserved_micro_usd: k.reserved_micro_usd,
            spent_micro_usd: k.spent_micro_usd,
            created_at: k.created_at.timestamp(),
            expires_at: k.expires_at.map(|t| t.timestamp()),
            revoked_at: k.revoked_at.map(|t| t.timestamp()),
        }
    }
}

fn period_name(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Daily => "daily",
        BudgetPeriod::Monthly => "monthly",
    }
}

#[derive(Serialize, ToSchema)]
pub struct AdminKeyList {
    /// `list`.
    object: &'static str,
    data: Vec<AdminKey>,
}

/// The body of a key's creation: `name`, and any limits (absent or `null`: none).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AdminKeyCreate {
    name: String,
    rpm_limit: Option<i32>,
    tpm_limit: Option<i32>,
    max_in_flight: Option<i32>,
    budget_micro_usd: Option<i64>,
    /// `daily` or `monthly` (UTC); absent: the budget never starts again.
    budget_period: Option<String>,
    allowed_models: Option<Vec<String>>,
    /// Unix seconds.
    expires_at: Option<i64>,
}

/// The body of a change: the fields given are set (`null` lifts a limit), the others kept.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AdminKeyChange {
    name: Option<String>,
    rpm_limit: Option<i32>,
    tpm_limit: Option<i32>,
    max_in_flight: Option<i32>,
    budget_micro_usd: Option<i64>,
    budget_period: Option<String>,
    allowed_models: Option<Vec<String>>,
    expires_at: Option<i64>,
}

/// A key's use now.
#[derive(Serialize, ToSchema)]
pub struct KeyUsage {
    /// `admin.key.usage`.
    object: &'static str,
    key_id: Uuid,
    in_flight: i64,
    reserved_micro_usd: i64,
    spent_micro_usd: i64,
    /// Unix seconds: the start of the budget period `spent_micro_usd` counts, if it resets.
    period_start: Option<i64>,
    /// Unix seconds: the start of the minute the next two count.
    minute_start: i64,
    requests_this_minute: i64,
    tokens_this_minute: i64,
    /// Jobs by status, as retention keeps them.
    jobs: std::collections::BTreeMap<String, i64>,
}

/// A webhook endpoint (its secret only in the answer to its creation).
#[derive(Serialize, ToSchema)]
pub struct AdminWebhook {
    /// `admin.webhook_endpoint`.
    object: &'static str,
    id: Uuid,
    key_id: Uuid,
    url: String,
    event_types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    created_at: i64,
    disabled_at: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct AdminWebhookList {
    object: &'static str,
    data: Vec<AdminWebhook>,
}

/// The body of an endpoint's creation.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AdminWebhookCreate {
    key_id: Uuid,
    url: String,
    /// Default: every type (`response.completed`, `.failed`, `.cancelled`, `.incomplete`).
    event_types: Option<Vec<String>>,
    /// `whsec_…`; default: a new one, answered once.
    secret: Option<String>,
}

/// The fields of a JSON object body, refusing any not in `known` (400 `unknown_parameter`).
fn object_body(body: &[u8], known: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("The body is not valid JSON: {e}"),
        param: None,
        code: None,
    })?;
    let Value::Object(fields) = value else {
        return Err(ApiError::InvalidRequest {
            message: "The body must be a JSON object.".into(),
            param: None,
            code: None,
        });
    };
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::InvalidRequest {
            message: format!("Unknown parameter: '{}'.", crate::request::echo(unknown)),
            param: Some(unknown.clone()),
            code: Some("unknown_parameter"),
        });
    }
    Ok(fields)
}

fn invalid(param: &str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: Some(param.into()),
        code: Some("invalid_value"),
    }
}

/// `None`: absent; `Some(None)`: `null`; `Some(Some(v))`: a value, read by `read`.
fn field<T>(
    fields: &Map<String, Value>,
    name: &str,
    read: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<Option<T>>, ApiError> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(value) => read(value)
            .map(|v| Some(Some(v)))
            .ok_or_else(|| invalid(name, format!("Invalid '{name}': expected {expected}."))),
    }
}

fn positive_i32(value: &Value) -> Option<i32> {
    value
        .as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .filter(|n| *n > 0)
}

fn name_of(value: &Value) -> Option<String> {
    value
        .as_str()
        .filter(|s| (1..=200).contains(&s.chars().count()) && !s.contains('\0'))
        .map(str::to_owned)
}

/// The limits shared by a creation and a change.
fn read_change(fields: &Map<String, Value>) -> Result<KeyChange, ApiError> {
    let models = |v: &Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|m| m.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
            .collect()
    };
    Ok(KeyChange {
        name: field(fields, "name", name_of, "a name of 1 to 200 characters")?.flatten(),
        rpm_limit: field(
            fields,
            "rpm_limit",
            positive_i32,
            "a positive integer or null",
        )?,
        tpm_limit: field(
            fields,
            "tpm_limit",
            positive_i32,
            "a positive integer or null",
        )?,
        max_in_flight: field(
            fields,
            "max_in_flight",
            positive_i32,
            "a positive integer or null",
        )?,
        budget: field(
            fields,
            "budget_micro_usd",
            |v| v.as_i64().filter(|n| *n >= 0).map(MicroUsd),
            "a non-negative integer (micro-dollars) or null",
        )?,
        budget_period: field(
            fields,
            "budget_period",
            |v| match v.as_str() {
                Some("daily") => Some(BudgetPeriod::Daily),
                Some("monthly") => Some(BudgetPeriod::Monthly),
                _ => None,
            },
            "\"daily\", \"monthly\" or null",
        )?,
        allowed_models: field(
            fields,
            "allowed_models",
            models,
            "an array of model names or null",
        )?,
        expires_at: field(
            fields,
            "expires_at",
            |v| {
                v.as_i64()
                    .and_then(|s| Utc.timestamp_opt(s, 0).single())
                    .filter(|t: &DateTime<Utc>| t.timestamp() > 0)
            },
            "unix seconds or null",
        )?,
    })
}

const KEY_FIELDS: [&str; 8] = [
    "name",
    "rpm_limit",
    "tpm_limit",
    "max_in_flight",
    "budget_micro_usd",
    "budget_period",
    "allowed_models",
    "expires_at",
];

fn key_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(id).map_err(|_| key_not_found(id))
}

/// The key of path segment `id`, live or revoked, or 404.
async fn key_by_id(state: &AppState, id: &str) -> Result<KeyListing, ApiError> {
    store::keys::get(&state.pool, key_id(id)?)
        .await?
        .ok_or_else(|| key_not_found(id))
}

fn key_not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("No key found with id '{}'.", crate::request::echo(id)),
        param: None,
        code: Some("key_not_found"),
    }
}

#[utoipa::path(
    post, path = "/admin/keys", tag = "admin", security(("admin_key" = [])),
    request_body = AdminKeyCreate,
    responses(
        (status = 201, description = "The key, with its secret (shown this once)", body = AdminKey),
        (status = 400, description = "Invalid body, naming `param`", body = ErrorBody),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
    ),
)]
async fn create_key(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let fields = object_body(&body, &KEY_FIELDS)?;
    let change = read_change(&fields)?;
    let Some(name) = change.name.clone() else {
        return Err(invalid(
            "name",
            "Missing required parameter: 'name'.".into(),
        ));
    };
    let new = NewKey {
        name,
        rpm_limit: change.rpm_limit.flatten(),
        tpm_limit: change.tpm_limit.flatten(),
        max_in_flight: change.max_in_flight.flatten(),
        budget: change.budget.flatten(),
        budget_period: change.budget_period.flatten(),
        allowed_models: change.allowed_models.flatten(),
        expires_at: change.expires_at.flatten(),
    };
    let (id, secret) = store::keys::create(&state.pool, &new).await?;
    let listing = store::keys::get(&state.pool, id.0)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("key {id} not found after creation")))?;
    tracing::info!(key_id = %id, "key created through the admin API");
    let mut key = AdminKey::from(listing);
    key.key = Some(secret);
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

#[utoipa::path(
    get, path = "/admin/keys", tag = "admin", security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every key, live and revoked, oldest first", body = AdminKeyList),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
    ),
)]
async fn list_keys(State(state): State<AppState>) -> Result<Json<AdminKeyList>, ApiError> {
    let data = store::keys::list(&state.pool)
        .await?
        .into_iter()
        .map(AdminKey::from)
        .collect();
    Ok(Json(AdminKeyList {
        object: "list",
        data,
    }))
}

#[utoipa::path(
    get, path = "/admin/keys/{id}", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path, description = "The key's id (a UUID)")),
    responses(
        (status = 200, description = "The key", body = AdminKey),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ),
)]
async fn get_key(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<AdminKey>, ApiError> {
    Ok(Json(key_by_id(&state, &id).await?.into()))
}

#[utoipa::path(
    patch, path = "/admin/keys/{id}", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path, description = "The key's id (a UUID)")),
    request_body = AdminKeyChange,
    responses(
        (status = 200, description = "The key as changed; its next admission runs under the \
            new limits", body = AdminKey),
        (status = 400, description = "Invalid body, naming `param`", body = ErrorBody),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
        (status = 404, description = "No such live key", body = ErrorBody),
    ),
)]
async fn update_key(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<AdminKey>, ApiError> {
    let uuid = key_id(&id)?;
    let change = read_change(&object_body(&body, &KEY_FIELDS)?)?;
    let key = store::keys::update(&state.pool, uuid, &change)
        .await?
        .ok_or_else(|| key_not_found(&id))?;
    tracing::info!(key_id = %uuid, "key changed through the admin API");
    Ok(Json(key.into()))
}

#[utoipa::path(
    post, path = "/admin/keys/{id}/revoke", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path, description = "The key's id (a UUID)")),
    responses(
        (status = 200, description = "The key, revoked: every front refuses it from now on; \
            its jobs run on, and its record stays (with `revoked_at`)", body = AdminKey),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
        (status = 404, description = "No such live key", body = ErrorBody),
    ),
)]
async fn revoke_key(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<AdminKey>, ApiError> {
    let uuid = key_id(&id)?;
    match store::keys::revoke(&state.pool, &uuid.to_string()).await? {
        Revoked::One(..) => {}
        Revoked::None | Revoked::Ambiguous(_) => return Err(key_not_found(&id)),
    }
    tracing::info!(key_id = %uuid, "key revoked through the admin API");
    Ok(Json(key_by_id(&state, &id).await?.into()))
}

#[utoipa::path(
    get, path = "/admin/keys/{id}/usage", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path, description = "The key's id (a UUID)")),
    responses(
        (status = 200, description = "The key's use now", body = KeyUsage),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ),
)]
async fn key_usage(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<KeyUsage>, ApiError> {
    let uuid = key_by_id(&state, &id).await?.id;
    let usage = store::keys::usage(&state.pool, uuid).await?;
    Ok(Json(KeyUsage {
        object: "admin.key.usage",
        key_id: uuid,
        in_flight: usage.in_flight,
        reserved_micro_usd: usage.reserved_micro_usd,
        spent_micro_usd: usage.spent_micro_usd,
        period_start: usage.period_start.map(|t| t.timestamp()),
        minute_start: usage.minute_start.timestamp(),
        requests_this_minute: usage.requests_this_minute,
        tokens_this_minute: usage.tokens_this_minute,
        jobs: usage.jobs,
    }))
}

fn webhook(endpoint: store::webhooks::Endpoint, secret: Option<String>) -> AdminWebhook {
    AdminWebhook {
        object: "admin.webhook_endpoint",
        id: endpoint.id,
        key_id: endpoint.key_id,
        url: endpoint.url,
        event_types: endpoint.event_types,
        secret,
        created_at: endpoint.created_at.timestamp(),
        disabled_at: endpoint.disabled_at.map(|t| t.timestamp()),
    }
}

#[utoipa::path(
    post, path = "/admin/webhooks", tag = "admin", security(("admin_key" = [])),
    request_body = AdminWebhookCreate,
    responses(
        (status = 201, description = "The endpoint, with its signing secret (shown this once)",
         body = AdminWebhook),
        (status = 400, description = "Invalid body, or a URL refused (not https/http, or an \
            address that is not public)", body = ErrorBody),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ),
)]
async fn add_webhook(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let fields = object_body(&body, &["key_id", "url", "event_types", "secret"])?;
    let key_id = field(
        &fields,
        "key_id",
        |v| v.as_str().and_then(|s| Uuid::try_parse(s).ok()),
        "a key's id",
    )?
    .flatten()
    .ok_or_else(|| invalid("key_id", "Missing required parameter: 'key_id'.".into()))?;
    let url = field(&fields, "url", |v| v.as_str().map(str::to_owned), "a URL")?
        .flatten()
        .ok_or_else(|| invalid("url", "Missing required parameter: 'url'.".into()))?;
    let types = field(
        &fields,
        "event_types",
        |v| {
            v.as_array()?
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<Vec<String>>>()
        },
        "an array of event types or null",
    )?
    .flatten();
    let secret = field(
        &fields,
        "secret",
        |v| v.as_str().map(str::to_owned),
        "a whsec_ secret",
    )?
    .flatten();
    let added = webhooks::add_endpoint(
        &state.pool,
        &state.config,
        key_id,
        &url,
        types.as_deref(),
        secret.as_deref(),
    )
    .await;
    let (id, secret) = match added {
        Ok(added) => added,
        Err(WebhookError::NoSuchKey(id)) => return Err(key_not_found(&id.to_string())),
        Err(WebhookError::Database(e)) => return Err(e.into()),
        Err(WebhookError::UnknownType(t)) => {
            return Err(invalid("event_types", format!("Unknown event type {t:?}.")))
        }
        Err(WebhookError::Secret(e)) => return Err(invalid("secret", e.to_string())),
        Err(e) => return Err(invalid("url", e.to_string())),
    };
    let endpoint = store::webhooks::get(&state.pool, id)
        .await?
        .ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("endpoint {id} not found after adding"))
        })?;
    tracing::info!(endpoint_id = %id, %key_id, "webhook endpoint added through the admin API");
    Ok((StatusCode::CREATED, Json(webhook(endpoint, Some(secret)))).into_response())
}

#[utoipa::path(
    get, path = "/admin/webhooks", tag = "admin", security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every endpoint, live and removed, without secrets",
         body = AdminWebhookList),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
    ),
)]
async fn list_webhooks(State(state): State<AppState>) -> Result<Json<AdminWebhookList>, ApiError> {
    let data = store::webhooks::list(&state.pool)
        .await?
        .into_iter()
        .map(|e| webhook(e, None))
        .collect();
    Ok(Json(AdminWebhookList {
        object: "list",
        data,
    }))
}

#[utoipa::path(
    delete, path = "/admin/webhooks/{id}", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path, description = "The endpoint's id (a UUID)")),
    responses(
        (status = 200, description = "Removed: it receives nothing more; its deliveries stay \
            on record"),
        (status = 401, description = "No master key, or a wrong one", body = ErrorBody),
        (status = 403, description = "The admin API is not enabled", body = ErrorBody),
        (status = 404, description = "No such live endpoint", body = ErrorBody),
    ),
)]
async fn remove_webhook(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::NotFound {
        message: format!(
            "No live webhook endpoint found with id '{}'.",
            crate::request::echo(&id)
        ),
        param: None,
        code: Some("endpoint_not_found"),
    };
    let uuid = Uuid::try_parse(&id).map_err(|_| not_found())?;
    if !store::webhooks::disable(&state.pool, uuid).await? {
        return Err(not_found());
    }
    tracing::info!(endpoint_id = %uuid, "webhook endpoint removed through the admin API");
    Ok(Json(
        json!({"id": uuid, "object": "admin.webhook_endpoint.deleted", "deleted": true}),
    ))
}
