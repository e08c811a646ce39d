//! Token estimates: admission's input estimate (rate limits, the worst-case budget reservation),
//! and the fallback usage of a job whose upstream reported none.
//!
//! Fallback estimator, used for every model: one token per 4 bytes of UTF-8 text, rounded up, plus
//! 4 tokens of framing per message and 3 for the reply's priming, as OpenAI's chat format counts
//! them. It is an estimate; finishing a job charges the real usage the upstream reports.

use crate::provider::ChatMessage;

pub fn estimate_text(text: &str) -> u32 {
    text.len().div_ceil(4) as u32
}

pub fn estimate_messages(messages: &[ChatMessage]) -> u32 {
    3 + messages
        .iter()
        .map(|m| 4 + estimate_text(&m.content))
        .sum::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_counts_text_and_framing() {
        assert_eq!(estimate_text(""), 0);
        assert_eq!(estimate_text("abcde"), 2);
        let m = ChatMessage {
            role: "user".into(),
            content: "abcd".into(),
        };
        assert_eq!(estimate_messages(&[m]), 3 + 4 + 1);
    }
}
