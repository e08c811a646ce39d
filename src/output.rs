//! The output of a job — its items, assistant messages and function calls — and the pieces it is
//! streamed and stored as.
//!
//! A piece is one event of the response's stream: an item or content part opening, a text or
//! arguments delta, a `.done`. The worker turns the provider's chunks into pieces ([`Shaper`]) and
//! writes them, in order and numbered within the attempt, to `tollgate.job_events`; event
//! `3 + i` of the stream is piece `i` of the latest attempt (`api/stream.rs`). Every reader —
//! retrieve, the stream, the next turn of a conversation — folds the pieces into items
//! ([`Output`]), so the rows are the one record of what the model said.
//!
//! The worker closes an item (its `.done` pieces) when the next one opens. The last item is left
//! open: whether it ended `completed` or `incomplete` is only known when the job ends, and the
//! job may end without the worker (a cancel), so readers add its `.done` events once the job is
//! finished ([`Output::closing`]).

use serde_json::{json, Value};

/// One piece of the output, stored as a kind letter and a payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// `m`: an assistant message opens (`response.output_item.added`).
    MessageAdded,
    /// `p`: its text part opens (`response.content_part.added`).
    PartAdded,
    /// `t`: text (`response.output_text.delta`).
    Text(String),
    /// `T`: the text is whole (`response.output_text.done`).
    TextDone,
    /// `P`: the part is whole (`response.content_part.done`).
    PartDone,
    /// `f`: a function call opens (`response.output_item.added`); payload `{"call_id", "name"}`.
    CallAdded { call_id: String, name: String },
    /// `a`: arguments text (`response.function_call_arguments.delta`).
    Arguments(String),
    /// `A`: the arguments are whole (`response.function_call_arguments.done`).
    ArgumentsDone,
    /// `D`: the item is whole (`response.output_item.done`).
    ItemDone,
}

impl Piece {
    /// The letter stored in `job_events.kinds`.
    pub fn kind(&self) -> char {
        match self {
            Piece::MessageAdded => 'm',
            Piece::PartAdded => 'p',
            Piece::Text(_) => 't',
            Piece::TextDone => 'T',
            Piece::PartDone => 'P',
            Piece::CallAdded { .. } => 'f',
            Piece::Arguments(_) => 'a',
            Piece::ArgumentsDone => 'A',
            Piece::ItemDone => 'D',
        }
    }

    /// The payload stored in `job_events.deltas`: the text of a delta, the call's name and id as
    /// JSON, nothing for the rest.
    pub fn payload(&self) -> String {
        match self {
            Piece::Text(text) | Piece::Arguments(text) => text.clone(),
            Piece::CallAdded { call_id, name } => {
                json!({"call_id": call_id, "name": name}).to_string()
            }
            _ => String::new(),
        }
    }

    /// The piece stored as `kind` and `payload`.
    pub fn decode(kind: char, payload: String) -> Result<Piece, String> {
        Ok(match kind {
            'm' => Piece::MessageAdded,
            'p' => Piece::PartAdded,
            't' => Piece::Text(payload),
            'T' => Piece::TextDone,
            'P' => Piece::PartDone,
            'f' => {
                let call: Value = serde_json::from_str(&payload)
                    .map_err(|e| format!("function call piece unreadable: {e}"))?;
                let field = |name: &str| call[name].as_str().unwrap_or_default().to_string();
                Piece::CallAdded {
                    call_id: field("call_id"),
                    name: field("name"),
                }
            }
            'a' => Piece::Arguments(payload),
            'A' => Piece::ArgumentsDone,
            'D' => Piece::ItemDone,
            other => return Err(format!("unknown piece kind {other:?}")),
        })
    }
}

/// An output item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Message {
        text: String,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// An item and whether its `.done` pieces were written.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputItem {
    pub item: Item,
    pub done: bool,
}

/// The output items that pieces fold into.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub items: Vec<OutputItem>,
    /// How many pieces were folded.
    pub pieces: usize,
}

impl Output {
    pub fn from_pieces<'a>(pieces: impl IntoIterator<Item = &'a Piece>) -> Self {
        let mut output = Output::default();
        for piece in pieces {
            output.apply(piece);
        }
        output
    }

    /// Folds the next piece in. A delta with no item of its kind open is ignored (the writer
    /// never stores one).
    pub fn apply(&mut self, piece: &Piece) {
        self.pieces += 1;
        match piece {
            Piece::MessageAdded => self.items.push(OutputItem {
                item: Item::Message {
                    text: String::new(),
                },
                done: false,
            }),
            Piece::CallAdded { call_id, name } => self.items.push(OutputItem {
                item: Item::FunctionCall {
                    call_id: call_id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                },
                done: false,
            }),
            Piece::Text(delta) => {
                if let Some(OutputItem {
                    item: Item::Message { text },
                    done: false,
                }) = self.items.last_mut()
                {
                    text.push_str(delta);
                }
            }
            Piece::Arguments(delta) => {
                if let Some(OutputItem {
                    item: Item::FunctionCall { arguments, .. },
                    done: false,
                }) = self.items.last_mut()
                {
                    arguments.push_str(delta);
                }
            }
            Piece::ItemDone => {
                if let Some(last) = self.items.last_mut() {
                    last.done = true;
                }
            }
            Piece::PartAdded | Piece::TextDone | Piece::PartDone | Piece::ArgumentsDone => {}
        }
    }

    /// The `.done` pieces the last item still needs once the job has ended (none when it is
    /// closed, or there is no item).
    pub fn closing(&self) -> Vec<Piece> {
        match self.items.last() {
            Some(OutputItem {
                item: Item::Message { .. },
                done: false,
            }) => vec![Piece::TextDone, Piece::PartDone, Piece::ItemDone],
            Some(OutputItem {
                item: Item::FunctionCall { .. },
                done: false,
            }) => vec![Piece::ArgumentsDone, Piece::ItemDone],
            _ => Vec::new(),
        }
    }
}

/// Which item the writer has open.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum Open {
    #[default]
    Nothing,
    Message,
    Call,
}

/// Turns a provider's chunks into pieces: opens a message before the first text after anything
/// else, and closes the open item when another one opens.
#[derive(Debug, Default)]
pub struct Shaper {
    open: Open,
}

impl Shaper {
    fn close(&mut self, out: &mut Vec<Piece>) {
        match std::mem::take(&mut self.open) {
            Open::Nothing => {}
            Open::Message => out.extend([Piece::TextDone, Piece::PartDone, Piece::ItemDone]),
            Open::Call => out.extend([Piece::ArgumentsDone, Piece::ItemDone]),
        }
    }

    /// Text of the answer.
    pub fn text(&mut self, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        if self.open != Open::Message {
            self.close(out);
            out.extend([Piece::MessageAdded, Piece::PartAdded]);
            self.open = Open::Message;
        }
        out.push(Piece::Text(text));
    }

    /// A function call starts.
    pub fn call(&mut self, call_id: String, name: String, out: &mut Vec<Piece>) {
        self.close(out);
        out.push(Piece::CallAdded { call_id, name });
        self.open = Open::Call;
    }

    /// Arguments of the call started last; false when no call is open (the provider broke its
    /// own format).
    pub fn arguments(&mut self, arguments: String, out: &mut Vec<Piece>) -> bool {
        if self.open != Open::Call {
            return false;
        }
        if !arguments.is_empty() {
            out.push(Piece::Arguments(arguments));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_then_a_call_close_the_message_and_leave_the_call_open() {
        let mut shaper = Shaper::default();
        let mut pieces = Vec::new();
        shaper.text("Let me ".into(), &mut pieces);
        shaper.text("check.".into(), &mut pieces);
        shaper.call("call_1".into(), "get_weather".into(), &mut pieces);
        assert!(shaper.arguments("{\"city\":".into(), &mut pieces));
        assert!(shaper.arguments("\"Paris\"}".into(), &mut pieces));
        let kinds: String = pieces.iter().map(Piece::kind).collect();
        assert_eq!(kinds, "mpttTPDfaa");
        let output = Output::from_pieces(&pieces);
        assert_eq!(output.items.len(), 2);
        assert!(output.items[0].done && !output.items[1].done);
        assert_eq!(
            output.items[0].item,
            Item::Message {
                text: "Let me check.".into()
            }
        );
        assert_eq!(
            output.items[1].item,
            Item::FunctionCall {
                call_id: "call_1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into()
            }
        );
        assert_eq!(output.closing(), [Piece::ArgumentsDone, Piece::ItemDone]);
    }

    #[test]
    fn arguments_without_a_call_are_refused() {
        let mut shaper = Shaper::default();
        let mut pieces = Vec::new();
        assert!(!shaper.arguments("{}".into(), &mut pieces));
        shaper.text("x".into(), &mut pieces);
        assert!(!shaper.arguments("{}".into(), &mut pieces));
    }

    #[test]
    fn pieces_round_trip_through_their_stored_form() {
        let pieces = [
            Piece::MessageAdded,
            Piece::PartAdded,
            Piece::Text("a".into()),
            Piece::TextDone,
            Piece::PartDone,
            Piece::ItemDone,
            Piece::CallAdded {
                call_id: "c".into(),
                name: "n".into(),
            },
            Piece::Arguments("{}".into()),
            Piece::ArgumentsDone,
        ];
        for piece in pieces {
            assert_eq!(Piece::decode(piece.kind(), piece.payload()).unwrap(), piece);
        }
        assert!(Piece::decode('x', String::new()).is_err());
    }
}
