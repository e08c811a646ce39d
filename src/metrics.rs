//! Prometheus metrics, with the `metrics` crate and its Prometheus exporter, served at `/metrics`
//! by the front and by the worker's own listener (`worker.listen`).
//!
//! Each name is a constant here, described once ([`install`]); the code records with the
//! `metrics` macros. Histograms are in seconds, with [`BUCKETS`]. What lives in PostgreSQL or
//! RabbitMQ (backlogs, jobs by status, queue depth) and the pool's use are read when scraped
//! ([`render`]'s caller, `api::health`), so every process shows the same values and none keeps
//! a copy that could drift.

use std::sync::OnceLock;

pub use metrics::{counter, gauge, histogram, Counter};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// Counters.
pub const ADMITTED: &str = "tollgate_admitted_total";
pub const REJECTED: &str = "tollgate_rejected_total";
pub const JOBS_FINISHED: &str = "tollgate_jobs_finished_total";
pub const EVENTS_PUBLISHED: &str = "tollgate_events_published_total";
pub const WEBHOOK_DELIVERIES: &str = "tollgate_webhook_deliveries_total";
pub const DELTAS_WRITTEN: &str = "tollgate_deltas_written_total";
pub const TOKENS: &str = "tollgate_tokens_total";
pub const UPSTREAM_ERRORS: &str = "tollgate_upstream_errors_total";
pub const LEASE_RESCUES: &str = "tollgate_lease_rescues_total";
pub const DEAD_LETTERED: &str = "tollgate_dead_lettered_total";

// Histograms.
pub const ADMISSION_SECONDS: &str = "tollgate_admission_duration_seconds";
pub const PUBLISH_CONFIRM_SECONDS: &str = "tollgate_publish_confirm_seconds";
pub const QUEUE_WAIT_SECONDS: &str = "tollgate_queue_wait_seconds";
pub const FIRST_TOKEN_SECONDS: &str = "tollgate_time_to_first_token_seconds";
pub const JOB_RUN_SECONDS: &str = "tollgate_job_run_seconds";
pub const WEBHOOK_DELIVERY_SECONDS: &str = "tollgate_webhook_delivery_seconds";

// Gauges.
pub const OUTBOX_BACKLOG: &str = "tollgate_outbox_backlog";
pub const EVENT_BACKLOG: &str = "tollgate_event_backlog";
pub const JOBS: &str = "tollgate_jobs";
pub const QUEUE_MESSAGES: &str = "tollgate_queue_messages";
pub const WORKER_IN_FLIGHT: &str = "tollgate_worker_in_flight";
pub const SSE_FOLLOWERS: &str = "tollgate_sse_followers";
pub const DB_POOL_CONNECTIONS: &str = "tollgate_db_pool_connections";
pub const DB_POOL_MAX: &str = "tollgate_db_pool_max_connections";

/// Upper bounds of every histogram's buckets, in seconds: from an admission's milliseconds to a
/// long generation's minutes.
pub const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How often histograms are drained when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Option<Exporter>> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls do nothing) and describes
/// every metric. Metrics recorded before it are lost, so each entry point calls it first. If
/// another recorder was installed (an embedding program's), tollgate records into that one and
/// its own `/metrics` is empty.
pub fn install() {
    EXPORTER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
            .expect("the buckets are not empty")
            .install_recorder();
        let handle = match recorder {
            Ok(handle) => handle,
            Err(e) => {
                tracing::warn!(error = %e, "a metrics recorder is installed already; /metrics stays empty");
                return None;
            }
        };
        describe();
        let process = metrics_process::Collector::default();
        process.describe();
        // Series of known labels start at 0, so that `increase()` sees their first event and
        // dashboards show them before it.
        metrics::counter!(LEASE_RESCUES).absolute(0);
        for outcome in ["delivered", "retrying", "dead", "failed"] {
            metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).absolute(0);
        }
        for status in ["completed", "failed", "cancelled", "incomplete"] {
            metrics::counter!(JOBS_FINISHED, "status" => status).absolute(0);
        }
        let _ = metrics::histogram!(WEBHOOK_DELIVERY_SECONDS);
        metrics::gauge!(WORKER_IN_FLIGHT).set(0.0);
        metrics::gauge!(SSE_FOLLOWERS).set(0.0);
        // Histograms keep their observations until drained into their buckets: a scrape drains
        // them, and so does this, so that a process nobody scrapes does not grow.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
        Some(Exporter { handle, process })
    });
}

fn describe() {
    describe_counter!(ADMITTED, "Requests admitted, by model.");
    describe_counter!(
        REJECTED,
        "Requests refused by admission, by reason (tollgate.rejections_by_reason has them by key)."
    );
    describe_counter!(
        JOBS_FINISHED,
        "Jobs a worker brought to a terminal state, by status."
    );
    describe_counter!(
        EVENTS_PUBLISHED,
        "Lifecycle events published to the events exchange, by type."
    );
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook delivery attempts, by outcome.");
    describe_counter!(
        DELTAS_WRITTEN,
        "Output deltas (text and function call arguments) written to PostgreSQL, by model."
    );
    describe_counter!(
        TOKENS,
        Unit::Count,
        "Tokens of finished attempts, by model and kind (input or output)."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream attempts, by provider and status class: 4xx, 5xx, network (no \
         connection, a timeout, a cut-off stream), stream (a malformed or oversized stream, an \
         error event in it), config."
    );
    describe_counter!(
        LEASE_RESCUES,
        "Jobs taken back from a worker whose lease lapsed (the worker died or lost PostgreSQL)."
    );
    describe_counter!(
        DEAD_LETTERED,
        "Job messages a worker dead-lettered, by reason."
    );
    describe_histogram!(
        ADMISSION_SECONDS,
        Unit::Seconds,
        "Time to decide on a request, its commit included, by outcome (admitted or rejected)."
    );
    describe_histogram!(
        PUBLISH_CONFIRM_SECONDS,
        Unit::Seconds,
        "Time from publishing a job message to RabbitMQ's confirm."
    );
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time from a job's admission to the start of its first attempt, by model."
    );
    describe_histogram!(
        FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from an attempt's start to its first output delta, by model."
    );
    describe_histogram!(
        JOB_RUN_SECONDS,
        Unit::Seconds,
        "Time from an attempt's start to the job's terminal state, by model."
    );
    describe_histogram!(
        WEBHOOK_DELIVERY_SECONDS,
        Unit::Seconds,
        "Time of one webhook delivery attempt, until the endpoint's answer or the failure."
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Admitted jobs whose message RabbitMQ has not confirmed yet (tollgate.outbox, unsent)."
    );
    describe_gauge!(
        EVENT_BACKLOG,
        "Lifecycle events waiting to be published (tollgate.event_backlog)."
    );
    describe_gauge!(JOBS, "Live jobs, by status (queued, in_progress).");
    describe_gauge!(
        QUEUE_MESSAGES,
        "Messages ready in tollgate's RabbitMQ queues, by queue."
    );
    describe_gauge!(WORKER_IN_FLIGHT, "Jobs this worker runs now.");
    describe_gauge!(SSE_FOLLOWERS, "Event streams this front serves now.");
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "This process's PostgreSQL connections, by state (idle, in_use)."
    );
    describe_gauge!(
        DB_POOL_MAX,
        "The most PostgreSQL connections this process opens."
    );
}

/// The text exposition of every metric, with the process metrics read now.
pub fn render() -> String {
    install();
    match EXPORTER.get().and_then(Option::as_ref) {
        Some(exporter) => {
            exporter.process.collect();
            exporter.handle.run_upkeep();
            exporter.handle.render()
        }
        None => String::new(),
    }
}

/// The HTTP status class of an upstream failure for [`UPSTREAM_ERRORS`]: `4xx`, `5xx`, or
/// `network` when there was no status to class.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "network",
    }
}

/// Adds one to a gauge while alive: for what is counted from its start to its end, whichever way
/// it ends.
#[derive(Debug)]
pub struct InFlight(&'static str);

impl InFlight {
    pub fn start(gauge: &'static str) -> Self {
        metrics::gauge!(gauge).increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(429)), "4xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(None), "network");
    }

    #[test]
    fn renders_counters_histograms_and_gauges_under_their_names() {
        install();
        metrics::counter!(REJECTED, "reason" => "rpm").increment(2);
        metrics::histogram!(WEBHOOK_DELIVERY_SECONDS).record(0.03);
        metrics::histogram!(WEBHOOK_DELIVERY_SECONDS).record(400.0);
        {
            let _running = InFlight::start(SSE_FOLLOWERS);
            let text = render();
            assert!(text.contains("tollgate_sse_followers 1"), "{text}");
        }
        let text = render();
        assert!(text.contains("tollgate_sse_followers 0"), "{text}");
        assert!(
            text.contains("tollgate_rejected_total{reason=\"rpm\"} 2"),
            "{text}"
        );
        let name = WEBHOOK_DELIVERY_SECONDS;
        assert!(text.contains(&format!("# TYPE {name} histogram")), "{text}");
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"0.025\"}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"0.05\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"300\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 2")),
            "{text}"
        );
        assert!(text.contains("tollgate_lease_rescues_total 0"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
