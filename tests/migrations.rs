//! Migrations that rewrite data: they are run on rows written by the schema before them.

mod common;

use std::borrow::Cow;

use serde_json::json;
use sqlx::{migrate::Migrator, Connection, PgConnection, PgPool};
use tollgate::{
    ids::JobId,
    output::{Item, Output},
    store::{jobs, MIGRATOR},
};
use uuid::Uuid;

/// A fresh database of its own, dropped by `drop_database`.
async fn fresh_database() -> (PgPool, String) {
    let name = format!("tollgate_test_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{}/postgres", common::pg_base()))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let pool = PgPool::connect(&format!("{}/{name}", common::pg_base()))
        .await
        .unwrap();
    (pool, name)
}

async fn drop_database(pool: PgPool, name: &str) {
    pool.close().await;
    let mut admin = PgConnection::connect(&format!("{}/postgres", common::pg_base()))
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Event rows written before output items existed (text deltas only, numbered from 0) read, after
/// the migration, as one message: the same text, the same stream numbers for the deltas (5 on).
#[tokio::test]
async fn text_only_event_rows_become_a_message() {
    let (pool, name) = fresh_database().await;
    let output_items = 20261125000004;
    let before = Migrator {
        migrations: Cow::Owned(
            MIGRATOR
                .iter()
                .filter(|m| m.version < output_items)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    let key = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tollgate.api_keys (id, name, key_hash, key_prefix)
         VALUES ($1, 'k', '\\x01', 'sk-tg-00000000')",
    )
    .bind(key)
    .execute(&pool)
    .await
    .unwrap();
    let id = JobId::new();
    sqlx::query(
        "INSERT INTO tollgate.jobs (id, key_id, model, status, request, output_text,
                                    estimated_input_tokens, attempt)
         VALUES ($1, $2, 'm', 'completed', $3, 'abc', 1, 2)",
    )
    .bind(id)
    .bind(key)
    .bind(json!({"model": "m", "input": "x"}))
    .execute(&pool)
    .await
    .unwrap();
    // Attempt 1 was abandoned after one delta; attempt 2 wrote three, in two batches.
    for (attempt, first, last, deltas) in [
        (1, 0, 0, vec!["z"]),
        (2, 0, 1, vec!["a", "b"]),
        (2, 2, 2, vec!["c"]),
    ] {
        sqlx::query(
            "INSERT INTO tollgate.job_events (job_id, attempt, seq_first, seq_last, deltas)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(attempt)
        .bind(first)
        .bind(last)
        .bind(deltas)
        .execute(&pool)
        .await
        .unwrap();
    }

    MIGRATOR.run(&pool).await.unwrap();

    let read = jobs::attempt_pieces(&pool, id, 2, 0).await.unwrap();
    let kinds: String = read.pieces.iter().map(|p| p.kind()).collect();
    assert_eq!(kinds, "mpttt");
    assert_eq!(read.total, 5);
    let output = Output::from_pieces(&read.pieces);
    assert_eq!(
        output.items.iter().map(|i| &i.item).collect::<Vec<_>>(),
        [&Item::Message { text: "abc".into() }]
    );
    // Reading from the middle finds the renumbered rows.
    let rest = jobs::attempt_pieces(&pool, id, 2, 4).await.unwrap();
    assert_eq!(rest.pieces.len(), 1);
    let abandoned = jobs::attempt_pieces(&pool, id, 1, 0).await.unwrap();
    assert_eq!(abandoned.total, 3);
    drop_database(pool, &name).await;
}
