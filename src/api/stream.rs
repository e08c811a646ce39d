//! The Responses API event stream (SSE), derived from the stored rows alone, so any number of
//! clients can follow one job, join late, and resume after any `sequence_number`.
//!
//! # Numbering
//!
//! A job's events are numbered from its row and the pieces of its latest attempt (`attempt` on
//! the job row; a worker's claim raises it). Each piece the worker wrote is one event (see
//! `output.rs`); with `n` the number of pieces that attempt has written:
//!
//! | sequence_number | event | present when |
//! |---|---|---|
//! | 0 | `response.created` | always |
//! | 1 | `response.queued` | always |
//! | 2 | `response.in_progress` | a worker claimed the job (`attempt` ≥ 1) |
//! | 3 + i | piece i of the attempt, for i in 0..n | 〃 |
//! | 3 + n … | the `.done` events of the last item, if it is open | 〃, and the job is finished |
//! | then | the terminal event | 〃 |
//! | 2 | the terminal event | the job finished without ever being claimed |
//!
//! Pieces are the events of OpenAI's stream: a message is `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta`s, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done`; a function call is
//! `response.output_item.added`, `response.function_call_arguments.delta`s,
//! `response.function_call_arguments.done`, `response.output_item.done`. Each item has its
//! `output_index`, in order.
//!
//! The terminal event is `response.completed`, `response.failed`, `response.incomplete`, or
//! `response.cancelled` (a cancelled job; OpenAI's API names no event for this), and carries the
//! full Response object. Events 0–2 carry the object as it stood then (no output, no usage).
//!
//! # Attempts
//!
//! Only the latest attempt's pieces count. Numbers 0–2 mean the same in every attempt; from 3 on
//! they follow the latest attempt. A live reader that has already sent pieces (numbers ≥ 3) of an
//! attempt that a worker then abandons (the worker died and another took the job over) sends an
//! `error` event with code `response_restarted` and ends the stream: the output it sent is void,
//! and the client starts again from `starting_after=2` (or retrieves the object). A client that
//! resumes with `starting_after` ≥ 3 after such a restart gets the new attempt's events after
//! that number; what it had before belonged to the abandoned attempt.
//!
//! # Followers
//!
//! Each live stream holds a [`StreamSlot`] of its key for as long as its response body lives: until
//! the stream ends, or its client goes away and the server drops the body. A key may hold
//! `server.max_followers_per_key` slots on one front process; past that a new stream is refused
//! with 429 `too_many_streams` before anything is read or written.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{LazyLock, Mutex},
    time::Duration,
};

use axum::response::{
    sse::{Event, KeepAlive, Sse},
    IntoResponse, Response,
};
use futures::{stream, StreamExt};
use serde_json::{json, Value};

use super::{
    object::{
        item_id, item_status, opened_item, output_item, output_text_part, response_before_output,
        response_object,
    },
    ApiError, AppState,
};
use crate::{
    ids::{JobId, JobStatus, KeyId},
    output::{Item, Output, Piece},
    store::{
        jobs::{self, AttemptPieces, JobRow},
        notify::Subscription,
    },
};

/// Sequence number of the first piece.
pub const FIRST_PIECE: u64 = 3;

/// One event of the stream: its type and its data (which repeats `type` and `sequence_number`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub sequence_number: u64,
    pub kind: &'static str,
    pub data: Value,
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

/// The event of a piece, once `output` has folded it in (the piece concerns the last item).
/// `closing`: a `.done` the reader adds for a finished job, whose item status follows the job.
fn piece_event(
    job: &JobRow,
    output: &Output,
    piece: &Piece,
    closing: bool,
) -> (&'static str, Value) {
    let index = output.items.len().saturating_sub(1);
    let Some(last) = output.items.last() else {
        // Only a broken row has a delta before any item; it is shown as an empty delta.
        return (
            "response.output_text.delta",
            json!({"output_index": 0, "delta": ""}),
        );
    };
    let item = &last.item;
    let id = item_id(job, index, item);
    let (text, arguments) = match item {
        Item::Message { text } => (text.as_str(), ""),
        Item::FunctionCall { arguments, .. } => ("", arguments.as_str()),
    };
    match piece {
        Piece::MessageAdded | Piece::CallAdded { .. } => (
            "response.output_item.added",
            json!({"output_index": index, "item": opened_item(job, index, item)}),
        ),
        Piece::PartAdded => (
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                   "part": output_text_part("")}),
        ),
        Piece::Text(delta) => (
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                   "delta": delta, "logprobs": []}),
        ),
        Piece::TextDone => (
            "response.output_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                   "text": text, "logprobs": []}),
        ),
        Piece::PartDone => (
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                   "part": output_text_part(text)}),
        ),
        Piece::Arguments(delta) => (
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": delta}),
        ),
        Piece::ArgumentsDone => {
            let name = match item {
                Item::FunctionCall { name, .. } => name.as_str(),
                Item::Message { .. } => "",
            };
            (
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": index, "name": name,
                       "arguments": arguments}),
            )
        }
        Piece::ItemDone => {
            let status = item_status(job, !closing);
            (
                "response.output_item.done",
                json!({"output_index": index, "item": output_item(job, index, item, status)}),
            )
        }
    }
}

impl StreamEvent {
    /// The events of `job` numbered `next` and on, as far as the rows define them, folding the
    /// newly read pieces into `output`. `read` holds the latest attempt's pieces from index
    /// `output.pieces` on (what `output` has not folded yet). Returns the events and whether the
    /// stream is complete (the terminal event is among them or before `next`).
    pub fn from_rows(
        job: &JobRow,
        output: &mut Output,
        read: &AttemptPieces,
        next: u64,
    ) -> (Vec<StreamEvent>, bool) {
        let started = job.attempt >= 1;
        let mut events: Vec<(u64, &'static str, Value)> = Vec::new();
        let mut push = |seq: u64, kind: &'static str, data: Value| {
            if seq >= next {
                events.push((seq, kind, data));
            }
        };
        push(
            0,
            "response.created",
            json!({"response": response_before_output(job, JobStatus::Queued)}),
        );
        push(
            1,
            "response.queued",
            json!({"response": response_before_output(job, JobStatus::Queued)}),
        );
        let mut complete = false;
        if !started {
            if job.status.is_terminal() {
                push(
                    2,
                    terminal_kind(job.status),
                    json!({"response": response_object(job, output)}),
                );
                complete = true;
            }
        } else {
            push(
                2,
                "response.in_progress",
                json!({"response": response_before_output(job, JobStatus::InProgress)}),
            );
            for piece in &read.pieces {
                let seq = FIRST_PIECE + output.pieces as u64;
                output.apply(piece);
                let (kind, data) = piece_event(job, output, piece, false);
                push(seq, kind, data);
            }
            if job.status.is_terminal() && output.pieces >= read.total {
                let mut seq = FIRST_PIECE + output.pieces as u64;
                for piece in output.closing() {
                    let (kind, data) = piece_event(job, output, &piece, true);
                    push(seq, kind, data);
                    seq += 1;
                }
                push(
                    seq,
                    terminal_kind(job.status),
                    json!({"response": response_object(job, output)}),
                );
                complete = true;
            }
        }
        let events = events
            .into_iter()
            .map(|(seq, kind, mut data)| {
                data["type"] = json!(kind);
                data["sequence_number"] = json!(seq);
                StreamEvent {
                    sequence_number: seq,
                    kind,
                    data,
                }
            })
            .collect();
        (events, complete)
    }

    /// The event as it is sent: `event: <type>`, then its data as one line of JSON (serde_json
    /// escapes every newline inside a string, so the data never spans lines).
    pub fn to_sse(&self) -> Event {
        Event::default()
            .event(self.kind)
            .data(self.data.to_string())
    }
}

/// How many live streams each key holds on this front process. A process-wide map rather than a
/// field of the state: a front is one process, and keys are unique, so fronts sharing a process
/// (as in tests) never share an entry.
static LIVE_STREAMS: LazyLock<Mutex<HashMap<KeyId, usize>>> = LazyLock::new(Default::default);

/// One of a key's live streams on this front; dropping it gives the place back.
#[derive(Debug)]
pub struct StreamSlot {
    key_id: KeyId,
    _counted: crate::metrics::InFlight,
}

impl StreamSlot {
    /// A place for one more stream of `key_id`, or 429 `too_many_streams` when the key already
    /// holds `max` of them.
    pub fn take(key_id: KeyId, max: usize) -> Result<Self, ApiError> {
        let mut live = LIVE_STREAMS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = live.entry(key_id).or_default();
        if *count >= max {
            if *count == 0 {
                live.remove(&key_id);
            }
            return Err(ApiError::TooManyStreams(format!(
                "Too many streams: this key already has {max} streams open, the most allowed. \
                 Close one, or poll the response instead."
            )));
        }
        *count += 1;
        Ok(Self {
            key_id,
            _counted: crate::metrics::InFlight::start(crate::metrics::SSE_FOLLOWERS),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut live = LIVE_STREAMS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = live.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                live.remove(&self.key_id);
            }
        }
    }
}

/// A reader of one job's events: reads what the rows hold after `next`, then waits for a change.
pub struct Follower {
    state: AppState,
    id: JobId,
    key_id: KeyId,
    next: u64,
    /// The latest attempt's output as far as it was read, and which attempt that is.
    output: Output,
    folded_attempt: i32,
    /// The attempt whose pieces this reader has sent, once it has sent any.
    streamed_attempt: Option<i32>,
    subscription: Subscription,
    done: bool,
    /// Given back when the stream's body is dropped.
    _slot: StreamSlot,
}

impl Follower {
    /// A reader of the events after `starting_after` (all of them when `None`), holding `slot`
    /// (its key's). Subscribes before the first read, so no change is missed.
    pub fn new(state: AppState, id: JobId, slot: StreamSlot, starting_after: Option<u64>) -> Self {
        let subscription = state.watch.subscribe(id);
        let key_id = slot.key_id;
        Self {
            state,
            id,
            key_id,
            next: starting_after.map_or(0, |n| n.saturating_add(1)),
            output: Output::default(),
            folded_attempt: 0,
            streamed_attempt: None,
            subscription,
            done: false,
            _slot: slot,
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
                "The response was restarted after a worker failure and the output streamed so \
                 far is void; resume with starting_after=2 or retrieve the response.",
            )]);
        }
        if job.attempt != self.folded_attempt {
            self.output = Output::default();
            self.folded_attempt = job.attempt;
        }
        let read = if job.attempt >= 1 {
            jobs::attempt_pieces(&self.state.pool, self.id, job.attempt, self.output.pieces).await?
        } else {
            AttemptPieces::default()
        };
        let (events, complete) = StreamEvent::from_rows(&job, &mut self.output, &read, self.next);
        if let Some(last) = events.last() {
            self.next = last.sequence_number + 1;
        }
        if job.attempt >= 1 && self.next > FIRST_PIECE {
            self.streamed_attempt = Some(job.attempt);
        }
        self.done = complete;
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
        .map(|event| Ok::<_, Infallible>(event.to_sse()));
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
    use crate::{ids::KeyId, output::Shaper};

    fn job(status: JobStatus, attempt: i32) -> JobRow {
        JobRow {
            id: JobId::new(),
            key_id: KeyId(uuid::Uuid::nil()),
            model: "m".into(),
            status,
            request: Json(json!({"model": "m", "input": "x"})),
            output_text: String::new(),
            input_tokens: None,
            output_tokens: None,
            reasoning_tokens: None,
            history: None,
            previous_response_id: None,
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

    /// The pieces a worker writes for these text deltas.
    fn text_pieces(deltas: &[&str]) -> Vec<Piece> {
        let mut shaper = Shaper::default();
        let mut pieces = Vec::new();
        for d in deltas {
            shaper.text(d.to_string(), &mut pieces);
        }
        pieces
    }

    /// All events of `job` after `next`, reading `pieces` in one go.
    fn read_all(job: &JobRow, pieces: &[Piece], next: u64) -> (Vec<StreamEvent>, bool) {
        let read = AttemptPieces {
            pieces: pieces.to_vec(),
            total: pieces.len(),
        };
        StreamEvent::from_rows(job, &mut Output::default(), &read, next)
    }

    fn kinds(events: &[StreamEvent]) -> Vec<&str> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_job_never_claimed_has_three_events_at_most() {
        let (events, complete) = read_all(&job(JobStatus::Queued, 0), &[], 0);
        assert_eq!(kinds(&events), ["response.created", "response.queued"]);
        assert!(!complete);
        let (events, complete) = read_all(&job(JobStatus::Failed, 0), &[], 1);
        assert_eq!(kinds(&events), ["response.queued", "response.failed"]);
        assert_eq!(events[1].data["sequence_number"], 2);
        assert!(complete);
    }

    #[test]
    fn numbers_follow_the_pieces_and_resume_anywhere() {
        let pieces = text_pieces(&["a", "b", "c"]);
        let done = job(JobStatus::Completed, 2);
        let (full, complete) = read_all(&done, &pieces, 0);
        assert!(complete);
        assert_eq!(
            kinds(&full),
            [
                "response.created",
                "response.queued",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, e) in full.iter().enumerate() {
            assert_eq!(e.sequence_number, i as u64);
            assert_eq!(e.data["sequence_number"], i as u64);
            assert_eq!(e.data["type"], e.kind);
        }
        for next in 0..=full.len() as u64 {
            assert_eq!(read_all(&done, &pieces, next).0, full[next as usize..]);
        }
        assert_eq!(full[6].data["delta"], "b");
        assert_eq!(full[8].data["text"], "abc");
        assert_eq!(full[10].data["item"]["status"], "completed");
        assert_eq!(
            full[11].data["response"]["output"][0]["content"][0]["text"],
            "abc"
        );
    }

    #[test]
    fn reading_in_parts_gives_the_same_events() {
        let pieces = text_pieces(&["a", "b", "c"]);
        let done = job(JobStatus::Completed, 1);
        let (full, _) = read_all(&done, &pieces, 0);
        let mut output = Output::default();
        let mut seen = Vec::new();
        let mut next = 0;
        for chunk in pieces.chunks(2) {
            let read = AttemptPieces {
                pieces: chunk.to_vec(),
                total: output.pieces + chunk.len(),
            };
            let running = job(JobStatus::InProgress, 1);
            let running = JobRow {
                id: done.id,
                created_at: done.created_at,
                ..running
            };
            let (batch, _) = StreamEvent::from_rows(&running, &mut output, &read, next);
            next = batch.last().map_or(next, |e| e.sequence_number + 1);
            seen.extend(batch);
        }
        let (rest, complete) = StreamEvent::from_rows(
            &done,
            &mut output,
            &AttemptPieces {
                pieces: Vec::new(),
                total: pieces.len(),
            },
            next,
        );
        assert!(complete);
        seen.extend(rest);
        assert_eq!(kinds(&seen), kinds(&full));
        assert_eq!(seen.last(), full.last());
    }

    #[test]
    fn a_function_call_follows_the_text_with_its_own_index() {
        let mut shaper = Shaper::default();
        let mut pieces = Vec::new();
        shaper.text("Checking.".into(), &mut pieces);
        shaper.call("call_1".into(), "get_weather".into(), &mut pieces);
        shaper.arguments("{\"city\":".into(), &mut pieces);
        shaper.arguments("\"Paris\"}".into(), &mut pieces);
        let (events, _) = read_all(&job(JobStatus::Completed, 1), &pieces, 0);
        let tail: Vec<&str> = kinds(&events)[8..].to_vec();
        assert_eq!(
            tail,
            [
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let added = &events[9].data;
        assert_eq!(added["output_index"], 1);
        assert_eq!(added["item"]["type"], "function_call");
        assert_eq!(added["item"]["arguments"], "");
        assert_eq!(events[12].data["arguments"], "{\"city\":\"Paris\"}");
        let output = &events[14].data["response"]["output"];
        assert_eq!(output[1]["call_id"], "call_1");
        assert_eq!(output[1]["status"], "completed");
        assert!(output[1]["id"].as_str().unwrap().starts_with("fc_"));
    }

    #[test]
    fn a_running_job_shows_what_is_written_and_no_more() {
        let (events, complete) =
            read_all(&job(JobStatus::InProgress, 1), &text_pieces(&["a", "b"]), 0);
        assert!(!complete);
        assert_eq!(events.len(), 7);
        assert_eq!(events[6].kind, "response.output_text.delta");
    }

    #[test]
    fn a_cancelled_running_job_ends_with_response_cancelled() {
        let (events, _) = read_all(&job(JobStatus::Cancelled, 1), &text_pieces(&["a"]), 0);
        assert_eq!(events.last().unwrap().kind, "response.cancelled");
        assert_eq!(events[8].data["item"]["status"], "incomplete");
        // A job that failed before any output has no items at all.
        let (events, _) = read_all(&job(JobStatus::Failed, 1), &[], 0);
        assert_eq!(
            kinds(&events),
            [
                "response.created",
                "response.queued",
                "response.in_progress",
                "response.failed"
            ]
        );
    }
}
