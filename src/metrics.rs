//! Prometheus metrics, served at `/metrics` in the text exposition format. A handful of counters
//! kept in one map: enough for admissions, rejections and finished jobs, with no extra crate.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{Mutex, OnceLock},
};

fn counters() -> &'static Mutex<BTreeMap<(&'static str, String), u64>> {
    static COUNTERS: OnceLock<Mutex<BTreeMap<(&'static str, String), u64>>> = OnceLock::new();
    COUNTERS.get_or_init(Default::default)
}

const HELP: &[(&str, &str)] = &[
    ("tollgate_admitted_total", "Requests admitted, by model."),
    (
        "tollgate_rejected_total",
        "Requests rejected by admission, by reason.",
    ),
    (
        "tollgate_jobs_finished_total",
        "Jobs that reached a terminal state in a worker, by status.",
    ),
    (
        "tollgate_events_published_total",
        "Lifecycle events published to the events exchange, by type.",
    ),
    (
        "tollgate_webhook_deliveries_total",
        "Webhook delivery attempts, by outcome.",
    ),
];

/// Adds one to the counter `name` with the label `label_name="label"`.
pub fn increment(name: &'static str, label_name: &str, label: &str) {
    let series = format!(
        "{label_name}=\"{}\"",
        label.replace('\\', "\\\\").replace('"', "\\\"")
    );
    *counters()
        .lock()
        .expect("metrics lock")
        .entry((name, series))
        .or_default() += 1;
}

/// The text exposition of every counter.
pub fn render() -> String {
    let counters = counters().lock().expect("metrics lock");
    let mut out = String::new();
    for (name, help) in HELP {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let series = counters
            .range((*name, String::new())..)
            .take_while(|((n, _), _)| n == name);
        for ((_, labels), value) in series {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_series_under_its_name() {
        increment("tollgate_rejected_total", "reason", "rpm");
        increment("tollgate_rejected_total", "reason", "rpm");
        increment("tollgate_admitted_total", "model", "m\"1");
        let text = render();
        assert!(
            text.contains("tollgate_rejected_total{reason=\"rpm\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tollgate_admitted_total{model=\"m\\\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE tollgate_jobs_finished_total counter"));
    }
}
