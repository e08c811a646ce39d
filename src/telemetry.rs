//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`, sqlx's notices muted), as
//! human-readable lines or as one JSON object per line (`log.format`, `TOLLGATE_LOG_FORMAT`).
//!
//! A line carries the fields of the spans it happens in: `request_id` (and `job_id` once known) at
//! the front, `job_id` in the worker. No line carries a key's secret, a prompt or an output: what
//! is logged is ids, counts, statuses and errors.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}
