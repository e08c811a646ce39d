//! A small incremental parser for `text/event-stream`: bytes in, each complete event out (its
//! `event` name, if any, and its `data`). Events end at a blank line; multi-line `data` is joined
//! with `\n`; comments and the other fields are ignored; `\r\n` and `\n` are both line ends.
//!
//! An upstream is not trusted to keep its events small: a line or an event past `max_event_bytes`
//! is an error, so a hostile or broken upstream costs a failed attempt, never unbounded memory.

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field (Anthropic and the Responses API name every event; chat completions
    /// names none).
    pub event: Option<String>,
    pub data: String,
}

/// A line or an event longer than the parser's bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an upstream event is larger than {0} bytes")]
pub struct Oversized(pub usize);

#[derive(Debug)]
pub struct SseParser {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already searched for a line end.
    scanned: usize,
    event: Option<String>,
    data: Option<String>,
    max_event_bytes: usize,
}

/// The bound used by the providers: 1 MiB per line and per event, far above any real event.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseParser {
    pub fn with_limit(max_event_bytes: usize) -> Self {
        Self {
            buffer: Vec::new(),
            scanned: 0,
            event: None,
            data: None,
            max_event_bytes,
        }
    }

    /// Feeds bytes and returns every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, Oversized> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(offset) = self.buffer[start + self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let end = start + self.scanned + offset;
            self.scanned = 0;
            let mut line = &self.buffer[start..end];
            start = end + 1;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    events.push(SseEvent {
                        event: self.event.take(),
                        data,
                    });
                }
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                },
                "event" => self.event = Some(value.to_string()),
                _ => {}
            }
            let held = self.data.as_ref().map_or(0, String::len);
            if held > self.max_event_bytes {
                return Err(Oversized(self.max_event_bytes));
            }
        }
        self.buffer.drain(..start);
        self.scanned = self.buffer.len();
        if self.buffer.len() > self.max_event_bytes {
            return Err(Oversized(self.max_event_bytes));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: Vec<SseEvent>) -> Vec<String> {
        events.into_iter().map(|e| e.data).collect()
    }

    #[test]
    fn events_split_across_chunks_and_line_endings() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(
            data(p.push(b":1}\r\n\r\n: comment\n").unwrap()),
            vec!["{\"a\":1}"]
        );
        let events = p
            .push(b"event: x\ndata: one\ndata: two\n\ndata: [DONE]\n\n")
            .unwrap();
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: Some("x".into()),
                    data: "one\ntwo".into()
                },
                SseEvent {
                    event: None,
                    data: "[DONE]".into()
                }
            ]
        );
    }

    #[test]
    fn a_byte_at_a_time_gives_the_same_events() {
        let text = b"event: a\ndata: 1\n\nevent: b\r\ndata: 2\r\n\r\n";
        let mut p = SseParser::default();
        let mut all = Vec::new();
        for b in text {
            all.extend(p.push(&[*b]).unwrap());
        }
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].event.as_deref(), Some("b"));
        assert_eq!(all[1].data, "2");
    }

    #[test]
    fn oversized_lines_and_events_are_errors() {
        let mut p = SseParser::with_limit(16);
        assert_eq!(p.push(&[b'x'; 17]), Err(Oversized(16)));
        let mut p = SseParser::with_limit(16);
        assert!(p.push(b"data: 0123456789\n").is_ok());
        assert_eq!(p.push(b"data: 0123456789\n"), Err(Oversized(16)));
    }
}
