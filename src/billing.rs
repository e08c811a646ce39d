//! What an attempt of a job is charged: the one rule, used by the worker when an attempt ends
//! (completed, incomplete, failed, timed out, retried, handed back) and by the front when a
//! client cancels or deletes a running job.
//!
//! - When the upstream reported its usage and the answer ended with its end marker, that usage is
//!   the charge (`usage_estimated = false`).
//! - Otherwise the charge is estimated (`usage_estimated = true`): the input as admission counted
//!   it with the model's tokenizer (`jobs.estimated_input_tokens`), the output as the text
//!   streamed so far counted with the model's tokenizer. If the upstream had reported usage
//!   before the answer was cut off (Anthropic reports at the start), its input count is used, and
//!   the larger of its output count and the estimate.
//! - An attempt that streamed nothing and reported nothing, and did not end with the end marker,
//!   costs nothing: the upstream was never reached, or refused before generating anything.
//! - An attempt whose worker died is charged by the next claim, from the text it had written
//!   (`jobs.settled_attempt` says which attempts were charged).
//!
//! The key's spend is charged at most the job's reservation: the `jobs_release_admission`
//! trigger (migration `20261124000002`) caps it when the job reaches its terminal state, so spend
//! never passes the budget. The job row keeps the uncapped cost (`cost_micro_usd`, summed over
//! attempts) beside the charge (`charged_micro_usd`).

use crate::{
    config::{Config, ModelConfig, TokenizerKind},
    money::MicroUsd,
    provider,
    store::jobs::{Spent, Stopping},
    tokens,
};

/// The tokens one attempt used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// The reasoning part of `output_tokens`, when the upstream reported it.
    pub reasoning_tokens: Option<u32>,
    /// Whether the counts are tollgate's estimate rather than the upstream's report.
    pub estimated: bool,
}

impl Usage {
    pub fn cost(&self, model: &ModelConfig) -> MicroUsd {
        model.cost(self.input_tokens as u64, self.output_tokens as u64)
    }
}

/// How an attempt ended, as far as its bill is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// Input tokens as admission estimated them.
    pub input_estimate: u32,
    /// The last usage the upstream reported.
    pub reported: Option<provider::Usage>,
    /// Everything generated so far: message text, function names and arguments.
    pub output_text: &'a str,
    /// The upstream's end marker arrived: the answer (and its usage) is final.
    pub ended: bool,
}

/// The usage to charge for an attempt, or `None` when it cost nothing.
pub fn attempt_usage(kind: TokenizerKind, attempt: Attempt<'_>) -> Option<Usage> {
    match (attempt.reported, attempt.ended) {
        (Some(reported), true) => Some(Usage {
            input_tokens: reported.input_tokens,
            output_tokens: reported.output_tokens,
            reasoning_tokens: Some(reported.reasoning_tokens),
            estimated: false,
        }),
        (Some(reported), false) => {
            let counted = tokens::count_output(kind, attempt.output_text);
            Some(Usage {
                input_tokens: reported.input_tokens,
                output_tokens: reported.output_tokens.max(counted),
                reasoning_tokens: Some(reported.reasoning_tokens),
                estimated: counted > reported.output_tokens,
            })
        }
        (None, ended) => {
            if !ended && attempt.output_text.is_empty() {
                return None;
            }
            Some(Usage {
                input_tokens: attempt.input_estimate,
                output_tokens: tokens::count_output(kind, attempt.output_text),
                reasoning_tokens: None,
                estimated: true,
            })
        }
    }
}

/// What an attempt's usage writes on the job row: its counts and its cost at the model's prices
/// (nothing, when it cost nothing).
pub fn spent(model: &ModelConfig, usage: Option<Usage>) -> Spent {
    match usage {
        Some(usage) => Spent {
            input_tokens: Some(usage.input_tokens as i32),
            output_tokens: Some(usage.output_tokens as i32),
            reasoning_tokens: usage.reasoning_tokens.map(|r| r as i32),
            usage_estimated: Some(usage.estimated),
            cost: usage.cost(model),
        },
        None => Spent::default(),
    }
}

/// The charge for an attempt stopped before its end marker with no usage to show: stopped by its
/// client (cancel, delete), or abandoned by a worker that died. The text streamed so far is
/// estimated, since the upstream's usage never arrives. A model no longer configured has
/// no prices: nothing is charged.
pub fn for_stopped(config: &Config, stopping: &Stopping) -> Spent {
    let Some(model) = config.model(&stopping.model) else {
        return Spent::default();
    };
    let usage = attempt_usage(
        tokens::tokenizer_for(model),
        Attempt {
            input_estimate: stopping.estimated_input_tokens.max(0) as u32,
            reported: None,
            output_text: &stopping.output_text,
            ended: false,
        },
    );
    spent(model, usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: TokenizerKind = TokenizerKind::O200kBase;

    fn attempt(reported: Option<(u32, u32)>, text: &str, ended: bool) -> Attempt<'_> {
        Attempt {
            input_estimate: 10,
            reported: reported.map(|(input_tokens, output_tokens)| provider::Usage {
                input_tokens,
                output_tokens,
                reasoning_tokens: 0,
            }),
            output_text: text,
            ended,
        }
    }

    #[test]
    fn reported_usage_of_a_whole_answer_is_the_charge() {
        let u = attempt_usage(KIND, attempt(Some((7, 3)), "hello world", true)).unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (7, 3, false)
        );
    }

    #[test]
    fn a_cut_off_answer_pays_for_what_was_streamed() {
        // "hello world" is 2 tokens; the upstream had reported 1 output token at the start.
        let u = attempt_usage(KIND, attempt(Some((7, 1)), "hello world", false)).unwrap();
        assert_eq!((u.input_tokens, u.output_tokens, u.estimated), (7, 2, true));
        let u = attempt_usage(KIND, attempt(None, "hello world", false)).unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (10, 2, true)
        );
    }

    #[test]
    fn nothing_streamed_and_nothing_reported_costs_nothing() {
        assert_eq!(attempt_usage(KIND, attempt(None, "", false)), None);
        // A whole, empty answer still processed the input.
        let u = attempt_usage(KIND, attempt(None, "", true)).unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (10, 0, true)
        );
    }
}
