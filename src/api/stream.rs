//! The Responses API event stream (SSE), derived from the stored rows alone, so any number of
//! clients can follow one job, join late, and resume after any `sequence_number`.
//!
//! # Numbering
//!
//! A job's events are numbered from its row and the event rows of its latest attempt (`attempt`
//! on the job row; a worker's claim raises it and clears `output_text`). With `n` the number of
//! deltas that attempt has written:
//!
//! | sequence_number | event | present when |
//! |---|---|---|
//! | 0 | `response.created` | always |
//! | 1 | `response.queued` | always |
//! | 2 | `response.in_progress` | a worker claimed the job (`attempt` ≥ 1) |
//! | 3 | `response.output_item.added` | 〃 |
//! | 4 | `response.content_part.added` | 〃 |
//! | 5 + i | `response.output_text.delta` with delta i of the attempt | 〃, for i in 0..n |
//! | 5 + n | `response.output_text.done` | 〃, and the job is finished |
//! | 6 + n | `response.content_part.done` | 〃 |
//! | 7 + n | `response.output_item.done` | 〃 |
//! | 8 + n | the terminal event | 〃 |
//! | 2 | the terminal event | the job finished without ever being claimed |
//!
//! The terminal event is `response.completed`, `response.failed`, `response.incomplete`, or
//! `response.cancelled` (a cancelled job; OpenAI's API names no event for this), and carries the
//! full Response object. Events 0–2 carry the object as it stood then (no output, no usage).
//!
//! # Attempts
//!
//! Only the latest attempt's deltas count. Numbers 0–4 mean the same in every attempt; from 5 on
//! they follow the latest attempt. A live reader that has already sent deltas (numbers ≥ 5) of an
//! attempt that a worker then abandons (the worker died and another took the job over) sends an
//! `error` event with code `response_restarted` and ends the stream: the text it sent is void, and
//! the client starts again from `starting_after=4` (or retrieves the object). A client that resumes
//! with `starting_after` ≥ 5 after such a restart gets the new attempt's events after that number;
//! the text it had before belonged to the abandoned attempt.

use std::{convert::Infallible, time::Duration};

use axum::response::{
    sse::{Event, KeepAlive, Sse},
    IntoResponse, Response,
};
use futures::{stream, StreamExt};
use serde_json::{json, Value};

use super::{
    object::{output_message, output_text_part, response_before_output, response_object},
    AppState,
};
use crate::{
    ids::{JobId, JobStatus, KeyId},
    store::{
        jobs::{self, AttemptDeltas, JobRow},
        notify::Subscription,
    },
};

/// Sequence number of the first delta.
pub const FIRST_DELTA: u64 = 5;

/// One event of the stream: its type and its data (which repeats `type` and `sequence_number`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub sequence_number: u64,
    pub kind: &'static str,
    pub data: Value,
}

/// One past the last sequence number the rows define so far; when the job is finished, the
/// number of events it has in all.
pub fn known_end(job: &JobRow, total_deltas: usize) -> u64 {
    let started = job.attempt >= 1;
    match (started, job.status.is_terminal()) {
        (false, false) => 2,
        (false, true) => 3,
        (true, false) => FIRST_DELTA + total_deltas as u64,
        (true, true) => FIRST_DELTA + total_deltas as u64 + 4,
    }
}

fn terminal_kind(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Completed => "response.completed",
        JobStatus::Failed => "response.failed",
        JobStatus::Incomplete => "response.incomplete",
        JobStatus::Cancelled => "response.cancelled",
        JobStatus::Queued | JobStatus::InProgress => unreachable!("not a terminal status"),
    }
}

/// The events of `job` numbered `next` and on, as far as the rows define them. `deltas` are the
/// latest attempt's deltas from index `next - FIRST_DELTA` (or 0) on.
pub fn events_from(job: &JobRow, deltas: &AttemptDeltas, next: u64) -> Vec<StreamEvent> {
    let started = job.attempt >= 1;
    let n = deltas.total as u64;
    let first_fetched = next.saturating_sub(FIRST_DELTA);
    let mut end = known_end(job, deltas.total);
    // Never past a delta that was not read (the rows are read in one statement, so this guards
    // only against a caller passing less than it should).
    let fetched_end = first_fetched + deltas.deltas.len() as u64;
    if started && fetched_end < n {
        end = end.min(FIRST_DELTA + fetched_end);
    }
    let item_id = job.id.message_id();
    let text = || job.output_text.as_str();
    (next..end)
        .map(|seq| {
            let (kind, mut data) = match seq {
                0 => (
                    "response.created",
                    json!({"response": response_before_output(job, JobStatus::Queued)}),
                ),
                1 => (
                    "response.queued",
                    json!({"response": response_before_output(job, JobStatus::Queued)}),
                ),
                2 if !started => (
                    terminal_kind(job.status),
                    json!({"response": response_object(job)}),
                ),
                2 => (
                    "response.in_progress",
                    json!({"response": response_before_output(job, JobStatus::InProgress)}),
                ),
                3 => (
                    "response.output_item.added",
                    json!({"output_index": 0, "item": {
                        "id": item_id, "type": "message", "status": "in_progress",
                        "role": "assistant", "content": [],
                    }}),
                ),
                4 => (
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "part": output_text_part("")}),
                ),
                s if s < FIRST_DELTA + n => (
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "delta": deltas.deltas[(s - FIRST_DELTA - first_fetched) as usize],
                           "logprobs": []}),
                ),
                s if s == FIRST_DELTA + n => (
                    "response.output_text.done",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "text": text(), "logprobs": []}),
                ),
                s if s == FIRST_DELTA + n + 1 => (
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "part": output_text_part(text())}),
                ),
                s if s == FIRST_DELTA + n + 2 => (
                    "response.output_item.done",
                    json!({"output_index": 0, "item": output_message(job, text())}),
                ),
                _ => (
                    terminal_kind(job.status),
                    json!({"response": response_object(job)}),
                ),
            };
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            StreamEvent {
                sequence_number: seq,
                kind,
                data,
            }
        })
        .collect()
}

/// A reader of one job's events: reads what the rows hold after `next`, then waits for a change.
pub struct Follower {
    state: AppState,
    id: JobId,
    key_id: KeyId,
    next: u64,
    /// The attempt whose deltas this reader has sent, once it has sent any.
    streamed_attempt: Option<i32>,
    subscription: Subscription,
    done: bool,
}

impl Follower {
    /// A reader of the events after `starting_after` (all of them when `None`). Subscribes before
    /// the first read, so no change is missed.
    pub fn new(state: AppState, id: JobId, key_id: KeyId, starting_after: Option<u64>) -> Self {
        let subscription = state.watch.subscribe(id);
        Self {
            state,
            id,
            key_id,
            next: starting_after.map_or(0, |n| n.saturating_add(1)),
            streamed_attempt: None,
            subscription,
            done: false,
        }
    }

    /// The next events, waiting for them if need be; `None` once the stream has ended (the
    /// terminal event was sent, or the job is gone).
    pub async fn next_batch(&mut self) -> Option<Vec<StreamEvent>> {
        loop {
            if self.done {
                return None;
            }
            match self.read().await {
                Ok(events) if !events.is_empty() => return Some(events),
                Ok(_) if self.done => return None,
                Ok(_) => {
                    if !self.subscription.changed().await {
                        // Shutting down: the client resumes from its last sequence number.
                        return None;
                    }
                }
                Err(e) => {
                    tracing::error!(job_id = %self.id, error = %e, "cannot read the job's events");
                    self.done = true;
                    return Some(vec![self.error_event(
                        "server_error",
                        "The server had an error while reading the response's events.",
                    )]);
                }
            }
        }
    }

    async fn read(&mut self) -> Result<Vec<StreamEvent>, sqlx::Error> {
        // The job row first: its events were written before any status it shows.
        let Some(job) = jobs::get_for_key(&self.state.pool, self.id, self.key_id).await? else {
            // Deleted: nothing more will come, and the client must hear so rather than wait for
            // a terminal event that will never be written.
            self.done = true;
            return Ok(vec![self.error_event(
                "response_deleted",
                "The response was deleted while it was being streamed.",
            )]);
        };
        if self.streamed_attempt.is_some_and(|a| a != job.attempt) {
            self.done = true;
            return Ok(vec![self.error_event(
                "response_restarted",
                "The response was restarted after a worker failure and the text streamed so far \
                 is void; resume with starting_after=4 or retrieve the response.",
            )]);
        }
        let deltas = if job.attempt >= 1 {
            jobs::attempt_deltas(
                &self.state.pool,
                self.id,
                job.attempt,
                self.next.saturating_sub(FIRST_DELTA) as usize,
            )
            .await?
        } else {
            AttemptDeltas::default()
        };
        let events = events_from(&job, &deltas, self.next);
        if let Some(last) = events.last() {
            self.next = last.sequence_number + 1;
        }
        if job.attempt >= 1 && self.next > FIRST_DELTA {
            self.streamed_attempt = Some(job.attempt);
        }
        if job.status.is_terminal() && self.next >= known_end(&job, deltas.total) {
            self.done = true;
        }
        Ok(events)
    }

    fn error_event(&self, code: &str, message: &str) -> StreamEvent {
        StreamEvent {
            sequence_number: self.next,
            kind: "error",
            data: json!({"type": "error", "sequence_number": self.next, "code": code,
                         "message": message, "param": null}),
        }
    }

    /// The stream as an SSE response: `event: <type>` and `data: <json>` per event.
    pub fn into_sse(self) -> Response {
        let events = stream::unfold(self, |mut follower| async move {
            let batch = follower.next_batch().await?;
            Some((stream::iter(batch), follower))
        })
        .flatten()
        .map(|event| {
            Ok::<_, Infallible>(
                Event::default()
                    .event(event.kind)
                    .data(event.data.to_string()),
            )
        });
        Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;
    use sqlx::types::Json;

    use super::*;
    use crate::ids::KeyId;

    fn job(status: JobStatus, attempt: i32, text: &str) -> JobRow {
        JobRow {
            id: JobId::new(),
            key_id: KeyId(uuid::Uuid::nil()),
            model: "m".into(),
            status,
            request: Json(json!({"model": "m", "input": "x"})),
            output_text: text.into(),
            input_tokens: None,
            output_tokens: None,
            cost_micro_usd: None,
            usage_estimated: None,
            incomplete_reason: None,
            error: None,
            attempt,
            created_at: Utc::now(),
            started_at: None,
            finished_at: None,
        }
    }

    fn deltas(all: &[&str], from: usize) -> AttemptDeltas {
        AttemptDeltas {
            deltas: all[from.min(all.len())..]
                .iter()
                .map(|d| d.to_string())
                .collect(),
            total: all.len(),
        }
    }

    fn kinds(events: &[StreamEvent]) -> Vec<&str> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_job_never_claimed_has_three_events_at_most() {
        let queued = job(JobStatus::Queued, 0, "");
        let events = events_from(&queued, &AttemptDeltas::default(), 0);
        assert_eq!(kinds(&events), ["response.created", "response.queued"]);
        let expired = job(JobStatus::Failed, 0, "");
        let events = events_from(&expired, &AttemptDeltas::default(), 1);
        assert_eq!(kinds(&events), ["response.queued", "response.failed"]);
        assert_eq!(events[1].data["sequence_number"], 2);
    }

    #[test]
    fn numbers_follow_the_deltas_and_resume_anywhere() {
        let all = ["a", "b", "c"];
        let done = job(JobStatus::Completed, 2, "abc");
        let full = events_from(&done, &deltas(&all, 0), 0);
        assert_eq!(full.len() as u64, known_end(&done, 3));
        assert_eq!(full.len(), 5 + 3 + 4);
        for (i, e) in full.iter().enumerate() {
            assert_eq!(e.sequence_number, i as u64);
            assert_eq!(e.data["sequence_number"], i as u64);
            assert_eq!(e.data["type"], e.kind);
        }
        for next in 0..=full.len() as u64 {
            let from = next.saturating_sub(FIRST_DELTA) as usize;
            assert_eq!(
                events_from(&done, &deltas(&all, from), next),
                full[next as usize..]
            );
        }
        assert_eq!(full[6].data["delta"], "b");
        assert_eq!(full[8].data["text"], "abc");
    }

    #[test]
    fn a_running_job_shows_what_is_written_and_no_more() {
        let running = job(JobStatus::InProgress, 1, "ab");
        let events = events_from(&running, &deltas(&["a", "b"], 0), 0);
        assert_eq!(events.len(), 7);
        assert_eq!(events[6].kind, "response.output_text.delta");
        // Fewer deltas read than counted: stop before the first missing one.
        let short = AttemptDeltas {
            deltas: vec!["a".into()],
            total: 2,
        };
        assert_eq!(events_from(&running, &short, 0).len(), 6);
    }

    #[test]
    fn a_cancelled_running_job_ends_with_response_cancelled() {
        let cancelled = job(JobStatus::Cancelled, 1, "a");
        let events = events_from(&cancelled, &deltas(&["a"], 0), 0);
        assert_eq!(events.last().unwrap().kind, "response.cancelled");
        assert_eq!(events[8].data["item"]["status"], "incomplete");
    }
}
