//! The ledger, whole: what admission takes from a key and a model, and what is given back.
//!
//! **The rows.**
//! - `tollgate.key_counters`, one row per key (`slot` 0; opened with the key, [`open`]):
//!   `in_flight` (jobs queued or running), `reserved_micro_usd` (their worst-case costs),
//!   `spent_micro_usd` and `period_start` (what finished jobs were charged in the key's budget
//!   period).
//! - `tollgate.rate_windows` (key, minute) and `tollgate.model_rate_windows` (model, minute):
//!   requests and tokens counted in each one-minute window, for keys and models with rpm/tpm
//!   limits only.
//! - On each job: `counter_slot`, `estimated_input_tokens`, `reserved_micro_usd` (what was
//!   taken for it) and `charged_micro_usd` (what its end moved from reserved to spent).
//!
//! **Taking** happens in one place: `tollgate.admit` (migration
//! `20261130000001_admit_in_one_statement.sql`), called for each request of a batch by
//! `tollgate.admit_many` (`20261201000003_admit_many_and_finish_by_key.sql`; the front's
//! batching is `admission/batches.rs`). Under the key's row lock it counts the windows, rolls the budget
//! period over, checks every limit, then takes the slot and the reservation and inserts the job.
//! A rejection is undone by the function's own exception block: nothing is taken.
//!
//! **Giving back** is done by triggers, so it happens exactly once whichever path ends a job
//! (`20261124000002_exact_admission.sql`):
//! - `jobs_release_admission`, when a job moves from `queued`/`in_progress` to a terminal state —
//!   the worker's finish (`jobs::finish_many`, `tollgate.finish_batch`), a cancel, a failure of
//!   an unreadable row, the expiry of a job left queued: gives back the slot, moves the charged
//!   cost (at most the reservation) from reserved to spent, and corrects the key's and the
//!   model's tpm windows from the estimate to the real usage when it is known;
//! - `jobs_release_on_delete`, when an unfinished job is deleted: gives back slot and
//!   reservation;
//! - `jobs_refuse_reopen`: a terminal job never becomes queued or running again (it would take a
//!   slot nobody gave).
//!
//! Retries and hand-backs keep the job unfinished, so they neither take nor give back.
//!
//! **Locks.** Every transaction that touches the ledger takes its rows in one order: job rows,
//! then key counter rows, then model windows; a statement that takes several of one kind takes
//! them sorted (`tollgate.finish_batch` by job id, key, model; an admission batch locks its keys
//! sorted — with `SKIP LOCKED` when it holds several, so it never waits for a key — and orders its
//! requests by model). No one holds a model's window while waiting for a key's row. So no two of
//! them wait for each other in a cycle (`tests/group_commit.rs`, `tests/admission_exact.rs`).
//!
//! **Invariants** (checked after every step of random sequences in `tests/counters_property.rs`,
//! and under concurrency in `tests/admission_exact.rs`): `in_flight` = the key's jobs queued or
//! running, never above `max_in_flight`; `reserved` = their reservations; `spent + reserved`
//! never above the budget; each window counts exactly the requests admitted in its minute.
//! Operators read the ledger in the `tollgate.key_usage` view.

use sqlx::PgConnection;

use crate::ids::KeyId;

/// Opens a new key's account (its counter row, all zero), in the transaction that creates the
/// key.
pub async fn open(tx: &mut PgConnection, key_id: KeyId) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO tollgate.key_counters (key_id, slot) VALUES ($1, 0)")
        .bind(key_id)
        .execute(tx)
        .await?;
    Ok(())
}
