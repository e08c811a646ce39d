//! Prometheus metrics, served at `/metrics` in the text exposition format. A handful of counters
//! kept in one map, and histograms of fixed buckets: enough for admissions, rejections, finished
//! jobs, events and webhooks, with no extra crate.

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

/// Upper bounds of the histograms' buckets, in seconds.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A histogram: the count per bucket (not cumulative), the sum and the count.
#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

const HISTOGRAM_HELP: &[(&str, &str)] = &[(
    "tollgate_webhook_delivery_seconds",
    "Time of one webhook delivery attempt, until the endpoint's answer (or the failure).",
)];

fn histograms() -> &'static Mutex<BTreeMap<&'static str, Histogram>> {
    static HISTOGRAMS: OnceLock<Mutex<BTreeMap<&'static str, Histogram>>> = OnceLock::new();
    HISTOGRAMS.get_or_init(Default::default)
}

/// Records one observation of `seconds` in the histogram `name`.
pub fn observe(name: &'static str, seconds: f64) {
    let mut histograms = histograms().lock().expect("metrics lock");
    let h = histograms.entry(name).or_default();
    if let Some(i) = BUCKETS.iter().position(|le| seconds <= *le) {
        h.buckets[i] += 1;
    }
    h.sum += seconds;
    h.count += 1;
}

/// The text exposition of every counter and histogram.
pub fn render() -> String {
    let mut out = String::new();
    {
        let histograms = histograms().lock().expect("metrics lock");
        for (name, help) in HISTOGRAM_HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let empty = Histogram::default();
            let h = histograms.get(name).unwrap_or(&empty);
            let mut cumulative = 0;
            for (le, n) in BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
        }
    }
    let counters = counters().lock().expect("metrics lock");
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

    #[test]
    fn histograms_count_each_observation_in_its_bucket_and_above() {
        observe("tollgate_webhook_delivery_seconds", 0.03);
        observe("tollgate_webhook_delivery_seconds", 20.0);
        let text = render();
        let name = "tollgate_webhook_delivery_seconds";
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"0.025\"}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"0.05\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"10\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 2")),
            "{text}"
        );
        assert!(text.contains(&format!("{name}_count 2")), "{text}");
    }
}
