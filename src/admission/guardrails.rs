//! Guardrails: checks on a request's input, run before the admission transaction (so no lock is
//! held while a webhook answers). Configured in `[guardrails]` of `tollgate.toml`.
//!
//! The webhook protocol: tollgate POSTs `{"guardrail", "model", "messages": [{"role", "content"}]}`
//! and expects `{"allow": true}` or `{"allow": false, "reason": "..."}` with a 2xx status. A timeout,
//! another status or another body counts as the webhook failing, and then `fail_open` decides.

use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_json::json;

use crate::{
    config::{GuardrailsConfig, WebhookGuardrail},
    provider::ChatMessage,
};

/// A guardrail refused the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    pub guardrail: String,
    pub reason: String,
}

pub struct Guardrails {
    max_input_bytes: Option<usize>,
    deny: Vec<(String, Regex)>,
    webhooks: Vec<WebhookGuardrail>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Verdict {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
}

impl Guardrails {
    pub fn new(config: &GuardrailsConfig) -> Result<Self, regex::Error> {
        let deny = config
            .deny
            .iter()
            .map(|d| Ok((d.name.clone(), Regex::new(&d.pattern)?)))
            .collect::<Result<_, regex::Error>>()?;
        Ok(Self {
            max_input_bytes: config.max_input_bytes,
            deny,
            webhooks: config.webhooks.clone(),
            http: reqwest::Client::new(),
        })
    }

    /// Runs every guardrail in order: size, patterns, webhooks. The first refusal wins.
    pub async fn check(&self, model: &str, messages: &[ChatMessage]) -> Result<(), Blocked> {
        if let Some(max) = self.max_input_bytes {
            let size: usize = messages.iter().map(|m| m.content.len()).sum();
            if size > max {
                return Err(Blocked {
                    guardrail: "max_input_bytes".into(),
                    reason: format!("the input is {size} bytes, over the limit of {max}"),
                });
            }
        }
        for (name, pattern) in &self.deny {
            if messages.iter().any(|m| pattern.is_match(&m.content)) {
                return Err(Blocked {
                    guardrail: name.clone(),
                    reason: "the input matches a denied pattern".into(),
                });
            }
        }
        for hook in &self.webhooks {
            match self.ask(hook, model, messages).await {
                Ok(Verdict { allow: true, .. }) => {}
                Ok(Verdict {
                    allow: false,
                    reason,
                }) => {
                    return Err(Blocked {
                        guardrail: hook.name.clone(),
                        reason: reason.unwrap_or_else(|| "denied".into()),
                    })
                }
                Err(failure) if hook.fail_open => {
                    tracing::warn!(guardrail = %hook.name, %failure, "guardrail webhook failed; allowing (fail_open)");
                }
                Err(failure) => {
                    return Err(Blocked {
                        guardrail: hook.name.clone(),
                        reason: format!("the guardrail could not decide ({failure})"),
                    })
                }
            }
        }
        Ok(())
    }

    async fn ask(
        &self,
        hook: &WebhookGuardrail,
        model: &str,
        messages: &[ChatMessage],
    ) -> Result<Verdict, String> {
        let response = self
            .http
            .post(&hook.url)
            .timeout(Duration::from_millis(hook.timeout_ms))
            .json(&json!({"guardrail": hook.name, "model": model, "messages": messages}))
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    format!("unreachable: {e}")
                }
            })?;
        if !response.status().is_success() {
            return Err(format!("answered HTTP {}", response.status().as_u16()));
        }
        response
            .json::<Verdict>()
            .await
            .map_err(|e| format!("unreadable answer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DenyPattern;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", text)]
    }

    #[tokio::test]
    async fn size_and_patterns_name_the_guardrail() {
        let g = Guardrails::new(&GuardrailsConfig {
            max_input_bytes: Some(20),
            deny: vec![DenyPattern {
                name: "no-ssn".into(),
                pattern: r"\d{3}-\d{2}-\d{4}".into(),
            }],
            webhooks: vec![],
        })
        .unwrap();
        assert_eq!(g.check("m", &user("fine")).await, Ok(()));
        assert_eq!(
            g.check("m", &user("123456789012345678901"))
                .await
                .unwrap_err()
                .guardrail,
            "max_input_bytes"
        );
        assert_eq!(
            g.check("m", &user("123-45-6789"))
                .await
                .unwrap_err()
                .guardrail,
            "no-ssn"
        );
    }
}
