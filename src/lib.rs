//! tollgate: admission-controlled, queue-backed background jobs for LLM requests — the OpenAI
//! Responses API (background, streaming and synchronous modes), every request run as a job.
//!
//! A request flows through the modules in this order:
//! [`api`] (HTTP front) → [`admission`] (one PostgreSQL transaction decides and writes the job and
//! its outbox row) → [`queue`] (publish to RabbitMQ, outbox relay) → [`worker`] (consume, run) →
//! [`provider`] (the upstream LLM) → [`store`] (job rows and their streamed output). [`billing`]
//! says what each attempt is charged, whichever way it ends.

pub mod admission;
pub mod api;
pub mod billing;
pub mod config;
pub mod ids;
pub mod metrics;
pub mod money;
pub mod output;
pub mod provider;
pub mod queue;
pub mod request;
pub mod run;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod webhooks;
pub mod worker;
