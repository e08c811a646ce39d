//! Standard Webhooks signing (<https://www.standardwebhooks.com/>), the scheme OpenAI's webhooks use,
//! so a receiver can check a delivery with the official OpenAI SDKs' `client.webhooks.unwrap` or any
//! Standard Webhooks library. Each endpoint has its own secret, shown once as `whsec_<base64>`; a
//! delivery carries `webhook-id`, `webhook-timestamp` and `webhook-signature`, the last an
//! HMAC-SHA256 of `"{id}.{timestamp}.{body}"` under that secret. Receivers refuse timestamps more than
//! a few minutes away from their clock (the OpenAI SDKs: 300 s), so the timestamp must be the time of
//! the attempt, not of the event.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::TryRngCore as _;
use sha2::Sha256;

const PREFIX: &str = "whsec_";
/// Length of a generated key; the Standard Webhooks libraries generate 24 bytes too.
const GENERATED_LEN: usize = 24;
const MIN_LEN: usize = 16;
const MAX_LEN: usize = 64;

/// An endpoint's signing secret (the key bytes).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A new random secret (24 random bytes from rand's OS rng) and its text form `whsec_<base64 std>`.
    pub fn generate() -> (Secret, String) {
        let mut key = vec![0; GENERATED_LEN];
        // Without the OS's randomness there is no secret worth handing out; this is as fatal as
        // failing to allocate.
        OsRng
            .try_fill_bytes(&mut key)
            .expect("the operating system's random number generator failed");
        let text = format!("{PREFIX}{}", STANDARD.encode(&key));
        (Secret(key), text)
    }

    /// Parses `whsec_<base64>` (standard base64 with padding); refuses anything else, and keys shorter
    /// than 16 bytes or longer than 64.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let encoded = text.strip_prefix(PREFIX).ok_or(SecretError::Prefix)?;
        // The decode error is dropped on purpose: it quotes the offending byte of the secret.
        let key = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !(MIN_LEN..=MAX_LEN).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Secret(key))
    }
}

impl fmt::Debug for Secret {
    // Secrets end up in `Debug` output of whatever holds them (configs, tracing fields); the key
    // must never be part of it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a text is not a webhook secret. The messages never quote the text.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret starts with \"{PREFIX}\"")]
    Prefix,
    #[error("a webhook secret is \"{PREFIX}\" followed by standard base64 (with padding)")]
    Base64,
    #[error("a webhook secret's key is {MIN_LEN} to {MAX_LEN} bytes, not {0}")]
    Length(usize),
}

/// `v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`
pub fn signature(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The three headers of one delivery: ("webhook-id", id), ("webhook-timestamp", timestamp as decimal
/// seconds), ("webhook-signature", signature(..)).
pub fn headers(
    secret: &Secret,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature(secret, id, timestamp, body)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification and its reference libraries.
    #[test]
    fn standard_webhooks_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn headers_carry_id_timestamp_and_signature() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let [id, timestamp, sig] =
            headers(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            id,
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".to_owned())
        );
        assert_eq!(timestamp, ("webhook-timestamp", "1614265330".to_owned()));
        assert_eq!(
            sig,
            (
                "webhook-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_owned()
            )
        );
    }

    #[test]
    fn generated_secret_parses_back_to_the_same_key() {
        let (secret, text) = Secret::generate();
        assert!(text.starts_with("whsec_"), "{text}");
        assert_eq!(secret.0.len(), GENERATED_LEN);
        let parsed = Secret::parse(&text).unwrap();
        assert_eq!(parsed.0, secret.0);
        assert_eq!(
            signature(&parsed, "msg_1", 1, b"{}"),
            signature(&secret, "msg_1", 1, b"{}")
        );
        let (other, _) = Secret::generate();
        assert_ne!(other.0, secret.0);
    }

    #[test]
    fn parse_refuses_what_is_not_a_secret() {
        let key = |n: usize| format!("whsec_{}", STANDARD.encode(vec![7u8; n]));
        assert!(matches!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Prefix)
        ));
        assert!(matches!(
            Secret::parse("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Prefix)
        ));
        assert!(matches!(
            Secret::parse("whsec_not base64!"),
            Err(SecretError::Base64)
        ));
        // 17 bytes need padding; URL-safe alphabet is not standard base64.
        let unpadded = key(17).trim_end_matches('=').to_owned();
        assert!(matches!(Secret::parse(&unpadded), Err(SecretError::Base64)));
        assert!(matches!(
            Secret::parse("whsec_-_-_-_-_-_-_-_-_-_-_-_"),
            Err(SecretError::Base64)
        ));
        assert!(matches!(
            Secret::parse("whsec_"),
            Err(SecretError::Length(0))
        ));
        assert!(matches!(
            Secret::parse(&key(15)),
            Err(SecretError::Length(15))
        ));
        assert!(matches!(
            Secret::parse(&key(65)),
            Err(SecretError::Length(65))
        ));
        assert!(Secret::parse(&key(16)).is_ok());
        assert!(Secret::parse(&key(17)).is_ok());
        assert!(Secret::parse(&key(64)).is_ok());
    }

    #[test]
    fn errors_do_not_quote_the_text() {
        let err = Secret::parse("whsec_sec!ret").unwrap_err().to_string();
        assert!(!err.contains("sec!ret"), "{err}");
    }

    #[test]
    fn debug_hides_the_key() {
        let (secret, text) = Secret::generate();
        let shown = format!("{secret:?} {:?}", Some(secret.clone()));
        assert_eq!(shown, "Secret(..) Some(Secret(..))");
        assert!(!shown.contains(text.trim_start_matches("whsec_")));
    }
}
