//! The PostgreSQL side: connecting (and creating the database on first run), the schema
//! migrations, and the queries on keys and jobs. Everything lives in the `tollgate` schema. What
//! admission takes and what is given back — the ledger — is told whole in [`ledger`].

pub mod jobs;
pub mod key_cache;
pub mod keys;
pub mod ledger;
pub mod notify;
pub mod retention;
pub mod webhooks;

use sqlx::{
    migrate::{MigrateDatabase, MigrateError, Migrator},
    postgres::PgPoolOptions,
    PgPool, Postgres,
};

use crate::config::DatabaseConfig;

/// One parameter array of a batch statement: `f` of each row, in order (`unnest` and the batch
/// functions take one array per column).
pub(crate) fn column<T, U>(rows: &[T], f: impl FnMut(&T) -> U) -> Vec<U> {
    rows.iter().map(f).collect()
}

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!();

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach PostgreSQL at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error(
        "the database schema is newer than this tollgate binary (it has migration {0} which this \
         binary does not know); run a tollgate at least as new as the one that migrated it"
    )]
    SchemaTooNew(i64),
    #[error("cannot migrate the database schema: {0}")]
    Migrate(#[source] MigrateError),
}

/// Connects to the configured database, creating it first when it does not exist (through
/// `direct_url` when set).
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let direct = config.direct_url.as_deref().unwrap_or(&config.url);
    let connect_err = |source| StoreError::Connect {
        url: redact(&config.url),
        source,
    };
    if !Postgres::database_exists(direct)
        .await
        .map_err(connect_err)?
    {
        match Postgres::create_database(direct).await {
            Ok(()) => tracing::info!(url = %redact(direct), "created database"),
            // Another process created it between our check and our create: that is fine.
            // (42P04; or 23505 when both CREATE DATABASE statements ran at once.)
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(connect_err(e)),
        }
    }
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&config.url)
        .await
        .map_err(connect_err)
}

/// Applies pending migrations (under sqlx's advisory lock, so concurrent starts are safe), and
/// refuses a database migrated by a newer tollgate. The lock is a session's, so with a
/// `direct_url` they run on a connection of their own to it.
pub async fn migrate(pool: &PgPool, config: &DatabaseConfig) -> Result<(), StoreError> {
    let direct;
    let on = match &config.direct_url {
        Some(url) => {
            direct = PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .map_err(|source| StoreError::Connect {
                    url: redact(url),
                    source,
                })?;
            &direct
        }
        None => pool,
    };
    let migrated = MIGRATOR.run(on).await.map_err(|e| match e {
        MigrateError::VersionMissing(v) => StoreError::SchemaTooNew(v),
        other => StoreError::Migrate(other),
    });
    if !std::ptr::eq(on, pool) {
        on.close().await;
    }
    migrated
}

/// A LISTEN connection: to `direct_url` when set (a transaction-mode pooler cannot hold one),
/// else one of the pool's settings.
pub async fn listener(
    pool: &PgPool,
    config: &DatabaseConfig,
) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    match &config.direct_url {
        Some(url) => sqlx::postgres::PgListener::connect(url).await,
        None => sqlx::postgres::PgListener::connect_with(pool).await,
    }
}

/// The URL with any password replaced, fit for logs and error messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}
