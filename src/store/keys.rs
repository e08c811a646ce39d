//! API keys. The secret is shown once, at creation; only its SHA-256 is stored.

use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{ids::KeyId, money::MicroUsd};

/// The limits a key is created with; `None` means unlimited.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub budget: Option<MicroUsd>,
    pub budget_period: Option<BudgetPeriod>,
    pub allowed_models: Option<Vec<String>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// How often a key's budget starts again (UTC days and months); mirrors `tollgate.budget_period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize, serde::Deserialize)]
#[sqlx(type_name = "tollgate.budget_period", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Daily,
    Monthly,
}

impl std::str::FromStr for BudgetPeriod {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "daily" => Ok(BudgetPeriod::Daily),
            "monthly" => Ok(BudgetPeriod::Monthly),
            other => Err(format!("{other:?} is not daily or monthly")),
        }
    }
}

/// A live key and its limits, as admission sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKey {
    pub id: KeyId,
    pub name: String,
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub budget_micro_usd: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
    pub allowed_models: Option<Vec<String>>,
}

impl ApiKey {
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// SHA-256 of a presented secret, the only form in which keys are stored and looked up.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("sk-tg-{}", hex::encode(bytes))
}

/// Characters of a secret shown as its prefix: `sk-tg-` and 8 hex digits.
pub const PREFIX_LEN: usize = 14;

/// Creates a key with its counter row and returns its id and secret (the only time the secret
/// exists outside the client).
#[tracing::instrument(skip_all, fields(name = %new.name))]
pub async fn create(pool: &PgPool, new: &NewKey) -> Result<(KeyId, String), sqlx::Error> {
    // A fresh secret whose prefix another key has (one chance in 2^32 per key) is drawn again.
    let mut tries = 0;
    loop {
        match try_create(pool, new).await {
            Err(sqlx::Error::Database(e))
                if e.constraint() == Some("api_keys_prefix") && tries < 5 =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

async fn try_create(pool: &PgPool, new: &NewKey) -> Result<(KeyId, String), sqlx::Error> {
    let id = KeyId(Uuid::now_v7());
    let secret = new_secret();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO tollgate.api_keys
             (id, name, key_hash, key_prefix, rpm_limit, tpm_limit, max_in_flight,
              budget_micro_usd, budget_period, allowed_models, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(id)
    .bind(&new.name)
    .bind(hash_secret(&secret))
    .bind(&secret[..PREFIX_LEN])
    .bind(new.rpm_limit)
    .bind(new.tpm_limit)
    .bind(new.max_in_flight)
    .bind(new.budget.map(|b| b.0))
    .bind(new.budget_period)
    .bind(&new.allowed_models)
    .bind(new.expires_at)
    .execute(&mut *tx)
    .await?;
    super::ledger::open(&mut tx, id).await?;
    tx.commit().await?;
    Ok((id, secret))
}

/// Finds the live (not revoked, not expired) key with this secret.
pub async fn find_live(pool: &PgPool, secret: &str) -> Result<Option<ApiKey>, sqlx::Error> {
    Ok(find_live_by_hash(pool, &hash_secret(secret))
        .await?
        .map(|(key, _)| key))
}

/// The live key with this secret hash, and when it expires.
pub(super) async fn find_live_by_hash(
    pool: &PgPool,
    hash: &[u8],
) -> Result<Option<(ApiKey, Option<DateTime<Utc>>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Found {
        #[sqlx(flatten)]
        key: ApiKey,
        expires_at: Option<DateTime<Utc>>,
    }
    let found: Option<Found> = sqlx::query_as(
        "SELECT id, name, rpm_limit, tpm_limit, max_in_flight, budget_micro_usd, budget_period,
                allowed_models, expires_at
           FROM tollgate.api_keys
          WHERE key_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await?;
    Ok(found.map(|f| (f.key, f.expires_at)))
}

/// What revoking found.
#[derive(Debug, PartialEq)]
pub enum Revoked {
    /// This key (id, name) is now revoked.
    One(KeyId, String),
    /// No live key has this id or prefix.
    None,
    /// The prefix names several live keys (id, name each): nothing was revoked.
    Ambiguous(Vec<(KeyId, String)>),
}

/// Revokes one live key, named by its id or its printed prefix. A prefix that names several live
/// keys revokes none: the caller names the key by its id instead.
pub async fn revoke(pool: &PgPool, id_or_prefix: &str) -> Result<Revoked, sqlx::Error> {
    let id = Uuid::try_parse(id_or_prefix).ok();
    let mut tx = pool.begin().await?;
    let matched: Vec<(KeyId, String)> = sqlx::query_as(
        "SELECT id, name FROM tollgate.api_keys
          WHERE revoked_at IS NULL AND (id = $1 OR key_prefix = $2)
          ORDER BY id FOR UPDATE",
    )
    .bind(id)
    .bind(id_or_prefix)
    .fetch_all(&mut *tx)
    .await?;
    let (key_id, name) = match <[_; 1]>::try_from(matched) {
        Ok([one]) => one,
        Err(matched) if matched.is_empty() => return Ok(Revoked::None),
        Err(matched) => return Ok(Revoked::Ambiguous(matched)),
    };
    sqlx::query("UPDATE tollgate.api_keys SET revoked_at = now() WHERE id = $1")
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
    // The row's trigger announces the change at commit: every front drops the key from its
    // cache (`store/key_cache.rs`).
    tx.commit().await?;
    Ok(Revoked::One(key_id, name))
}

/// A key as `tollgate keys list` shows it.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct KeyListing {
    pub id: Uuid,
    pub name: String,
    pub key_prefix: String,
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub budget_micro_usd: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
    pub allowed_models: Option<Vec<String>>,
    pub in_flight: i64,
    pub reserved_micro_usd: i64,
    pub spent_micro_usd: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Every key with its live counters (summed over its slots).
pub async fn list(pool: &PgPool) -> Result<Vec<KeyListing>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{LISTING} GROUP BY k.id ORDER BY k.created_at, k.id"
    ))
    .fetch_all(pool)
    .await
}

const LISTING: &str =
    "SELECT k.id, k.name, k.key_prefix, k.rpm_limit, k.tpm_limit, k.max_in_flight,
            k.budget_micro_usd, k.budget_period, k.allowed_models,
            coalesce(sum(c.in_flight), 0)::bigint AS in_flight,
            coalesce(sum(c.reserved_micro_usd), 0)::bigint AS reserved_micro_usd,
            coalesce(sum(c.spent_micro_usd), 0)::bigint AS spent_micro_usd,
            k.created_at, k.expires_at, k.revoked_at
       FROM tollgate.api_keys k LEFT JOIN tollgate.key_counters c ON c.key_id = k.id";

/// One key with its live counters, revoked or not.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<KeyListing>, sqlx::Error> {
    sqlx::query_as(&format!("{LISTING} WHERE k.id = $1 GROUP BY k.id"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A change to a live key: a field left `None` stays as it is; `Some(None)` lifts that limit.
#[derive(Debug, Clone, Default)]
pub struct KeyChange {
    pub name: Option<String>,
    pub rpm_limit: Option<Option<i32>>,
    pub tpm_limit: Option<Option<i32>>,
    pub max_in_flight: Option<Option<i32>>,
    pub budget: Option<Option<MicroUsd>>,
    pub budget_period: Option<Option<BudgetPeriod>>,
    pub allowed_models: Option<Option<Vec<String>>>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

/// Applies `change` to the live key `id` and returns it as it now is; `None` if there is no live
/// key with this id. The row's trigger tells every front to drop the key from its cache, so the
/// next admission of the key runs under the new limits. Jobs admitted before keep what they
/// reserved.
pub async fn update(
    pool: &PgPool,
    id: Uuid,
    change: &KeyChange,
) -> Result<Option<KeyListing>, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE tollgate.api_keys SET
                name = coalesce($2, name),
                rpm_limit = CASE WHEN $3 THEN $4 ELSE rpm_limit END,
                tpm_limit = CASE WHEN $5 THEN $6 ELSE tpm_limit END,
                max_in_flight = CASE WHEN $7 THEN $8 ELSE max_in_flight END,
                budget_micro_usd = CASE WHEN $9 THEN $10 ELSE budget_micro_usd END,
                budget_period = CASE WHEN $11 THEN $12 ELSE budget_period END,
                allowed_models = CASE WHEN $13 THEN $14 ELSE allowed_models END,
                expires_at = CASE WHEN $15 THEN $16 ELSE expires_at END
          WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .bind(&change.name)
    .bind(change.rpm_limit.is_some())
    .bind(change.rpm_limit.flatten())
    .bind(change.tpm_limit.is_some())
    .bind(change.tpm_limit.flatten())
    .bind(change.max_in_flight.is_some())
    .bind(change.max_in_flight.flatten())
    .bind(change.budget.is_some())
    .bind(change.budget.flatten().map(|b| b.0))
    .bind(change.budget_period.is_some())
    .bind(change.budget_period.flatten())
    .bind(change.allowed_models.is_some())
    .bind(change.allowed_models.clone().flatten())
    .bind(change.expires_at.is_some())
    .bind(change.expires_at.flatten())
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(None);
    }
    get(pool, id).await
}

/// A key's use now: what it holds, what it spent, this minute's requests and tokens, and its jobs
/// by status (all it has, as retention keeps them).
#[derive(Debug, serde::Serialize)]
pub struct Usage {
    pub in_flight: i64,
    pub reserved_micro_usd: i64,
    pub spent_micro_usd: i64,
    /// Start of the budget period `spent_micro_usd` counts, for a key whose budget resets.
    pub period_start: Option<DateTime<Utc>>,
    pub minute_start: DateTime<Utc>,
    pub requests_this_minute: i64,
    pub tokens_this_minute: i64,
    pub jobs: std::collections::BTreeMap<String, i64>,
}

/// The usage of key `id`, read in one snapshot.
pub async fn usage(pool: &PgPool, id: Uuid) -> Result<Usage, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (in_flight, reserved_micro_usd, spent_micro_usd, period_start): (
        i64,
        i64,
        i64,
        Option<DateTime<Utc>>,
    ) = sqlx::query_as(
        "SELECT coalesce(sum(in_flight), 0)::bigint, coalesce(sum(reserved_micro_usd), 0)::bigint,
                coalesce(sum(spent_micro_usd), 0)::bigint, max(period_start)
           FROM tollgate.key_counters WHERE key_id = $1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let (minute_start, requests_this_minute, tokens_this_minute): (DateTime<Utc>, i64, i64) =
        sqlx::query_as(
            "SELECT date_trunc('minute', now()), coalesce(sum(requests), 0)::bigint,
                    coalesce(sum(tokens), 0)::bigint
               FROM tollgate.rate_windows
              WHERE key_id = $1 AND window_start = date_trunc('minute', now())",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    let jobs: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status::text, count(*) FROM tollgate.jobs WHERE key_id = $1 GROUP BY status",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Usage {
        in_flight,
        reserved_micro_usd,
        spent_micro_usd,
        period_start,
        minute_start,
        requests_this_minute,
        tokens_this_minute,
        jobs: jobs.into_iter().collect(),
    })
}
