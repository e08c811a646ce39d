//! API keys. The secret is shown once, at creation; only its SHA-256 is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::{ids::KeyId, money::MicroUsd};

/// The limits a key is created with; `None` means unlimited.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub rpm_limit: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub budget: Option<MicroUsd>,
    pub allowed_models: Option<Vec<String>>,
}

/// A live key and its limits, as admission sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKey {
    pub id: KeyId,
    pub name: String,
    pub rpm_limit: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub budget_micro_usd: Option<i64>,
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

/// Creates a key with its counter row and returns its id and secret (the only time the secret
/// exists outside the client).
#[tracing::instrument(skip_all, fields(name = %new.name))]
pub async fn create(pool: &PgPool, new: &NewKey) -> Result<(KeyId, String), sqlx::Error> {
    let id = KeyId(Uuid::now_v7());
    let secret = new_secret();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO tollgate.api_keys
             (id, name, key_hash, key_prefix, rpm_limit, max_in_flight, budget_micro_usd, allowed_models)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(&new.name)
    .bind(hash_secret(&secret))
    .bind(&secret[..10])
    .bind(new.rpm_limit)
    .bind(new.max_in_flight)
    .bind(new.budget.map(|b| b.0))
    .bind(&new.allowed_models)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO tollgate.key_counters (key_id, slot) VALUES ($1, 0)")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((id, secret))
}

/// Finds the live (not revoked, not expired) key with this secret.
pub async fn find_live<'e>(
    executor: impl PgExecutor<'e>,
    secret: &str,
) -> Result<Option<ApiKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, rpm_limit, max_in_flight, budget_micro_usd, allowed_models
           FROM tollgate.api_keys
          WHERE key_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(hash_secret(secret))
    .fetch_optional(executor)
    .await
}
