//! Lifecycle events: the contract tollgate offers consumers outside it (billing, audit,
//! notifications, and its own webhooks), documented in the README's "Lifecycle events".
//!
//! Each transition of a job is written as a row of `tollgate.event_outbox` by a trigger, in the
//! transaction that makes it (migration `20261201000004_lifecycle_events.sql`); the event relay
//! (`queue/outbox.rs`, [`super::outbox::run_event_relay`]) publishes the rows, in order, to the
//! topic exchange `events.exchange` as [`JobEvent`] bodies with routing key
//! `job.<status>.<model>`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ids::JobId;

/// Version of [`JobEvent`]'s body. Fields may be added within a version; a field removed,
/// renamed or changed in meaning makes a new version.
pub const EVENT_VERSION: u32 = 1;

/// The body of a lifecycle event, as published (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Schema version ([`EVENT_VERSION`]).
    pub v: u32,
    /// The event's id, `evt_<32 hex digits>`, unique per event and the same on every copy of
    /// it: the dedup key (also the AMQP `message_id`).
    pub id: String,
    /// `job.<status>`; also the AMQP `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The job's public id (`resp_…`).
    pub job_id: String,
    /// The id of the key that submitted it.
    pub key_id: Uuid,
    pub model: String,
    /// `queued`, `in_progress`, `completed`, `failed`, `cancelled`, `incomplete` or `deleted`.
    pub status: String,
    /// The job's events are numbered 1, 2, 3… in the order they happened.
    pub seq: i32,
    /// The attempt (0 before the first attempt started).
    pub attempt: i32,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    /// true: tollgate estimated the usage (the upstream reported none); false: reported by the
    /// upstream; null: no usage.
    pub usage_estimated: Option<bool>,
    /// What admission reserved of the key's budget, in micro-dollars.
    pub reserved_micro_usd: i64,
    /// The real cost of every attempt so far, in micro-dollars (set when the job finishes).
    pub cost_micro_usd: Option<i64>,
    /// What the key's spend was charged: the cost capped at the reservation.
    pub charged_micro_usd: Option<i64>,
    /// The job's error (`failed`), in OpenAI's shape `{code, message}`.
    pub error: Option<Value>,
    /// Why a job ended `incomplete`.
    pub incomplete_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When the transaction that made the transition began (PostgreSQL's `now()`).
    pub occurred_at: DateTime<Utc>,
    /// The stored request, only with `events.include_content` and only on terminal events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    /// The output text, only with `events.include_content` and only on terminal events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_text: Option<String>,
}

impl JobEvent {
    /// The event's routing key: `job.<status>.<model>`. Dots in a model name would split it into
    /// more words, so they travel as `_`; the body keeps the model name as it is.
    pub fn routing_key(&self) -> String {
        format!("job.{}.{}", self.status, routing_word(&self.model))
    }

    /// The public form of an event id.
    pub fn public_id(event_id: Uuid) -> String {
        format!("evt_{}", event_id.simple())
    }

    /// The job this event is about.
    pub fn job(&self) -> Option<JobId> {
        JobId::parse_public(&self.job_id)
    }

    /// Whether the job ended with this event (it is not queued, running, or deleted).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "cancelled" | "incomplete"
        )
    }
}

/// A model name as one word of a topic routing key: `.` (the word separator) and the wildcards
/// `*` and `#` become `_`.
pub fn routing_word(model: &str) -> String {
    model.replace(['.', '*', '#'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_stay_one_word_of_the_routing_key() {
        assert_eq!(routing_word("gpt-4.1-mini"), "gpt-4_1-mini");
        assert_eq!(routing_word("a*b#c"), "a_b_c");
        assert_eq!(routing_word("mock-1"), "mock-1");
    }
}
