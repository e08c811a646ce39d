//! Housekeeping: finished jobs are kept for `server.retention_days`, then removed in batches
//! (their events and outbox rows go with them, and each gets its `deleted` lifecycle event);
//! published outbox rows and rate windows are removed
//! after a day (a window matters for its minute and for correcting the tokens of the jobs admitted
//! in it), rejection counts and webhook deliveries after the retention.

use sqlx::PgPool;

/// Rows removed per statement, so no purge holds locks for long.
const BATCH: i64 = 1000;

/// Each purge: what it removes, and the age in days past which it does (`None`: the retention).
/// `$1` is the age in days, `$2` the batch size.
const PURGES: &[(&str, Option<i32>, &str)] = &[
    (
        "jobs",
        None,
        "DELETE FROM tollgate.jobs WHERE id IN (
             SELECT id FROM tollgate.jobs
              WHERE finished_at < now() - make_interval(days => $1) LIMIT $2)",
    ),
    (
        "outbox",
        Some(1),
        "DELETE FROM tollgate.outbox WHERE id IN (
             SELECT id FROM tollgate.outbox
              WHERE sent_at < now() - make_interval(days => $1) LIMIT $2)",
    ),
    (
        "rate_windows",
        Some(1),
        "DELETE FROM tollgate.rate_windows WHERE ctid IN (
             SELECT ctid FROM tollgate.rate_windows
              WHERE window_start < now() - make_interval(days => $1) LIMIT $2)",
    ),
    (
        "model_rate_windows",
        Some(1),
        "DELETE FROM tollgate.model_rate_windows WHERE ctid IN (
             SELECT ctid FROM tollgate.model_rate_windows
              WHERE window_start < now() - make_interval(days => $1) LIMIT $2)",
    ),
    (
        "webhook_deliveries",
        None,
        "DELETE FROM tollgate.webhook_deliveries WHERE id IN (
             SELECT id FROM tollgate.webhook_deliveries
              WHERE attempted_at < now() - make_interval(days => $1) LIMIT $2)",
    ),
    (
        "rejections",
        None,
        "DELETE FROM tollgate.rejections WHERE ctid IN (
             SELECT ctid FROM tollgate.rejections
              WHERE minute < now() - make_interval(days => $1) LIMIT $2)",
    ),
];

/// Removes what retention no longer keeps, a batch at a time. Returns the rows removed per table.
pub async fn purge(
    pool: &PgPool,
    retention_days: u32,
) -> Result<Vec<(&'static str, u64)>, sqlx::Error> {
    let mut removed = Vec::new();
    for (table, days, sql) in PURGES {
        let days = days.unwrap_or(retention_days as i32);
        let mut total = 0;
        loop {
            let batch = sqlx::query(sql)
                .bind(days)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            total += batch;
            if batch < BATCH as u64 {
                break;
            }
        }
        if total > 0 {
            removed.push((*table, total));
        }
    }
    Ok(removed)
}
