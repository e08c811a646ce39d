//! The identifiers and states that cross module boundaries, as types rather than bare strings.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job's id: a UUIDv7 (time-ordered), shown to clients as `resp_<32 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    const PREFIX: &'static str = "resp_";

    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses the public form `resp_…`; anything else is not a job id.
    pub fn parse_public(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(Self::PREFIX)?;
        if hex.len() != 32 {
            return None;
        }
        Uuid::try_parse(hex).ok().map(Self)
    }

    /// Id of the output item at `index` (`msg_…` for a message, `fc_…` for a function call),
    /// stable across polls, replays and attempts.
    pub fn output_item_id(&self, prefix: &str, index: usize) -> String {
        match index {
            0 => format!("{prefix}_{}", self.0.simple()),
            k => format!("{prefix}_{}_o{k}", self.0.simple()),
        }
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0.simple())
    }
}

/// An API key's row id (never the secret itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct KeyId(pub Uuid);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A job's state, mirrored by the Postgres enum `tollgate.job_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "tollgate.job_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    Incomplete,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::InProgress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_job_id_round_trips() {
        let id = JobId::new();
        let text = id.to_string();
        assert!(text.starts_with("resp_"));
        assert_eq!(JobId::parse_public(&text), Some(id));
        assert_eq!(JobId::parse_public("resp_nothex"), None);
        assert_eq!(JobId::parse_public(&id.0.to_string()), None);
    }
}
