//! Token counts before the upstream has answered: admission's input estimate (tokens per minute)
//! and its upper bound (the worst-case budget reservation), and the fallback usage of a job whose
//! upstream reported none.
//!
//! OpenAI models are counted with their real encoding (`o200k_base` for the GPT-4o/4.1/5 and o-series
//! families, `cl100k_base` for GPT-4 and GPT-3.5), plus OpenAI's chat framing: 4 tokens per message
//! and 3 to prime the reply. Other models use the documented fallback: one token per 4 bytes of
//! UTF-8 text, with the same framing. The upper bound is what a reservation must cover: the
//! encoding's count plus 5% and 16 tokens of margin, or, for the fallback, one token per byte
//! (a byte-level BPE token is never shorter than a byte).

use tiktoken_rs::CoreBPE;

use crate::{
    config::{ModelConfig, ProviderKind, TokenizerKind},
    provider::ChatMessage,
};

const PER_MESSAGE: u32 = 4;
const REPLY_PRIMING: u32 = 3;

/// Input tokens of a request, as well as admission can tell before the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The best estimate (counted in the tokens-per-minute windows).
    pub tokens: u32,
    /// A bound the real count should not pass (reserved against the budget).
    pub upper_bound: u32,
}

/// The encoding admission counts a model's input with.
pub fn tokenizer_for(model: &ModelConfig) -> TokenizerKind {
    if let Some(kind) = model.tokenizer {
        return kind;
    }
    if !matches!(
        model.provider,
        ProviderKind::Openai | ProviderKind::OpenaiResponses
    ) {
        return TokenizerKind::Bytes;
    }
    match tiktoken_rs::tokenizer::get_tokenizer(model.upstream_model()) {
        Some(tiktoken_rs::tokenizer::Tokenizer::O200kBase) => TokenizerKind::O200kBase,
        Some(tiktoken_rs::tokenizer::Tokenizer::Cl100kBase) => TokenizerKind::Cl100kBase,
        _ => TokenizerKind::Bytes,
    }
}

fn bpe(kind: TokenizerKind) -> Option<&'static CoreBPE> {
    match kind {
        TokenizerKind::O200kBase => Some(tiktoken_rs::o200k_base_singleton()),
        TokenizerKind::Cl100kBase => Some(tiktoken_rs::cl100k_base_singleton()),
        TokenizerKind::Bytes => None,
    }
}

/// Estimates the input tokens of `messages` for `kind`.
pub fn estimate(kind: TokenizerKind, messages: &[ChatMessage]) -> Estimate {
    let framing = REPLY_PRIMING + PER_MESSAGE * messages.len() as u32;
    match bpe(kind) {
        Some(bpe) => {
            let counted: u32 = messages
                .iter()
                .map(|m| bpe.encode_ordinary(&m.content).len() as u32)
                .sum::<u32>()
                + framing;
            Estimate {
                tokens: counted,
                upper_bound: counted + counted / 20 + 16,
            }
        }
        None => {
            let bytes: u32 = messages.iter().map(|m| m.content.len() as u32).sum();
            Estimate {
                tokens: estimate_text(messages) + framing,
                upper_bound: bytes + framing,
            }
        }
    }
}

fn estimate_text(messages: &[ChatMessage]) -> u32 {
    messages
        .iter()
        .map(|m| bytes_to_tokens(m.content.len()))
        .sum()
}

/// Tokens of a model's output text, counted with `kind` (the fallback: one per 4 bytes). Used to
/// charge an answer whose upstream reported no usage, or stopped before reporting it.
pub fn count_output(kind: TokenizerKind, text: &str) -> u32 {
    match bpe(kind) {
        Some(bpe) => bpe.encode_ordinary(text).len() as u32,
        None => bytes_to_tokens(text.len()),
    }
}

/// The fallback's count for a length of text: one token per 4 bytes, rounded up.
pub fn bytes_to_tokens(bytes: usize) -> u32 {
    bytes.div_ceil(4) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", text)]
    }

    #[test]
    fn fallback_counts_bytes_and_framing() {
        assert_eq!(bytes_to_tokens(0), 0);
        assert_eq!(bytes_to_tokens(5), 2);
        let e = estimate(TokenizerKind::Bytes, &user("abcd"));
        assert_eq!(
            e,
            Estimate {
                tokens: 1 + 7,
                upper_bound: 4 + 7
            }
        );
    }

    #[test]
    fn openai_encodings_count_real_tokens() {
        // "hello world" is 2 tokens in both encodings.
        for kind in [TokenizerKind::O200kBase, TokenizerKind::Cl100kBase] {
            let e = estimate(kind, &user("hello world"));
            assert_eq!(e.tokens, 2 + 7);
            assert!(e.upper_bound > e.tokens);
        }
    }

    #[test]
    fn output_is_counted_with_the_encoding() {
        assert_eq!(count_output(TokenizerKind::O200kBase, "hello world"), 2);
        assert_eq!(count_output(TokenizerKind::Bytes, "hello world"), 3);
        assert_eq!(count_output(TokenizerKind::Bytes, ""), 0);
    }

    #[test]
    fn model_names_pick_their_encoding() {
        let mut m = ModelConfig::mock("x");
        assert_eq!(tokenizer_for(&m), TokenizerKind::Bytes);
        m.provider = ProviderKind::Openai;
        m.upstream_model = Some("gpt-4o-mini".into());
        assert_eq!(tokenizer_for(&m), TokenizerKind::O200kBase);
        m.upstream_model = Some("gpt-4".into());
        assert_eq!(tokenizer_for(&m), TokenizerKind::Cl100kBase);
        m.upstream_model = Some("llama-3-70b".into());
        assert_eq!(tokenizer_for(&m), TokenizerKind::Bytes);
    }
}
