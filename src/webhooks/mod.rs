//! Webhooks in OpenAI's shape, signed by the Standard Webhooks specification: one consumer of the
//! lifecycle events.
