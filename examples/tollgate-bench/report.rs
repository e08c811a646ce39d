//! The figures of a run, the machine they were measured on, and the table that puts every
//! tollgate figure beside its ceiling and its target (printed at the end, and kept in
//! `docs/benchmarks.md`).

use std::fmt::Write;

use crate::Settings;

/// pgbench running the admission statement.
#[derive(Debug, Clone)]
pub struct Pgbench {
    pub tps: f64,
    pub latency_ms: f64,
}

/// One submit run.
#[derive(Debug, Clone)]
pub struct Submit {
    pub rate: f64,
    pub ok: u64,
    pub failed: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone)]
pub struct E2e {
    pub submit_rate: f64,
    pub submitted: u64,
    pub completed: u64,
    pub completion_rate: f64,
    pub delta_rate: f64,
    pub wait_p50: f64,
    pub wait_p99: f64,
    pub run_p50: f64,
    pub run_p99: f64,
    /// The mock's own time for one job (deltas × delay), in ms.
    pub ideal_run_ms: f64,
    /// Transactions committed in the bench database per job submitted (approximate: every
    /// process's statements, the relay's and sweeper's included, and the benchmark's polls).
    pub xacts_per_job: f64,
}

/// One streaming-writes run.
#[derive(Debug, Clone)]
pub struct Stream {
    pub label: String,
    pub deltas: u64,
    pub rate: f64,
    pub xacts_per_delta: f64,
    pub event_rows_per_delta: f64,
    pub job_updates_per_delta: f64,
}

#[derive(Debug, Clone)]
pub struct Memory {
    pub front_idle_kib: u64,
    pub front_followers_kib: u64,
    pub followers: usize,
    pub worker_idle_kib: u64,
    pub worker_busy_kib: u64,
    pub worker_concurrency: u16,
    pub running: u64,
}

/// Everything measured in a run; a phase left out leaves its figures `None`.
#[derive(Debug, Default)]
pub struct Figures {
    pub pg_spread: Option<Pgbench>,
    pub pg_hot: Option<Pgbench>,
    pub amqp_rate: Option<f64>,
    pub amqp_bytes: usize,
    pub submit_spread: Option<Submit>,
    pub submit_hot: Option<Submit>,
    pub e2e: Option<E2e>,
    pub streams: Vec<Stream>,
    pub memory: Option<Memory>,
    pub keys: usize,
    pub concurrency: usize,
}

/// Targets, from the issue.
pub const SUBMIT_VS_PGBENCH: f64 = 0.60;
pub const P99_VS_PGBENCH_AVG: f64 = 3.0;
pub const HOT_VS_SPREAD: f64 = 0.70;
pub const E2E_VS_SUBMIT: f64 = 0.5;
pub const STREAM_DELTAS_PER_S: f64 = 50_000.0;
pub const FRONT_RSS_MIB: f64 = 64.0;

/// `a / b`, when there is a `b`.
pub fn ratio(a: f64, b: Option<f64>) -> Option<f64> {
    b.filter(|b| *b > 0.0).map(|b| a / b)
}

/// A ratio as printed: two decimals, or `—` when its ceiling was not measured.
pub fn show_ratio(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}"))
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A whole number with thousands separated by commas.
pub fn n(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

struct Row {
    figure: String,
    measured: String,
    reference: String,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

fn row(figure: impl Into<String>, measured: impl Into<String>) -> Row {
    Row {
        figure: figure.into(),
        measured: measured.into(),
        reference: "—".into(),
        ratio: None,
        target: "—".into(),
        met: None,
    }
}

impl Row {
    fn against(mut self, reference: impl Into<String>, ratio: Option<f64>) -> Self {
        self.reference = reference.into();
        self.ratio = ratio;
        self
    }

    /// A target the ratio must reach (`at_least`) or stay under.
    fn target(mut self, bound: f64, at_least: bool) -> Self {
        self.target = format!("{} {bound:.2}", if at_least { "≥" } else { "≤" });
        self.met = self
            .ratio
            .map(|r| if at_least { r >= bound } else { r <= bound });
        self
    }

    fn target_text(mut self, text: impl Into<String>, met: Option<bool>) -> Self {
        self.target = text.into();
        self.met = met;
        self
    }
}

fn rows(f: &Figures) -> Vec<Row> {
    let mut rows = Vec::new();
    let c = f.concurrency;
    let pg_spread_tps = f.pg_spread.as_ref().map(|p| p.tps);
    let pg_hot_tps = f.pg_hot.as_ref().map(|p| p.tps);
    if let Some(p) = &f.pg_spread {
        rows.push(
            row(
                format!(
                    "Ceiling: pgbench `tollgate.admit`, {} keys, {c} clients",
                    f.keys
                ),
                format!("{} tx/s, avg {:.2} ms", n(p.tps), p.latency_ms),
            )
            .target_text("ceiling", None),
        );
    }
    if let Some(p) = &f.pg_hot {
        rows.push(
            row(
                format!("Ceiling: pgbench `tollgate.admit`, 1 hot key, {c} clients"),
                format!("{} tx/s, avg {:.2} ms", n(p.tps), p.latency_ms),
            )
            .target_text("ceiling", None),
        );
    }
    if let (Some(hot), Some(spread)) = (pg_hot_tps, pg_spread_tps) {
        rows.push(
            row(
                "Ceiling: pgbench hot-key rate / spread rate",
                format!("{} tx/s", n(hot)),
            )
            .against(format!("{} tx/s", n(spread)), ratio(hot, Some(spread))),
        );
    }
    if let Some(rate) = f.amqp_rate {
        rows.push(
            row(
                format!(
                    "Ceiling: RabbitMQ publish + confirm, {} B persistent, quorum queue, {c} in flight",
                    f.amqp_bytes
                ),
                format!("{} msg/s", n(rate)),
            )
            .target_text("ceiling", None),
        );
    }
    let submit = |label: &str, s: &Submit, pg: &Option<Pgbench>, rows: &mut Vec<Row>| {
        let pg_tps = pg.as_ref().map(|p| p.tps);
        let pg_avg = pg.as_ref().map(|p| p.latency_ms);
        rows.push(
            row(
                format!("Submit, {label}: throughput (2xx/s)"),
                format!("{}/s ({} requests)", n(s.rate), n(s.ok as f64)),
            )
            .against(
                pg_tps.map_or("—".into(), |t| format!("pgbench {}", n(t))),
                ratio(s.rate, pg_tps),
            )
            .target(SUBMIT_VS_PGBENCH, true),
        );
        rows.push(
            row(
                format!("Submit, {label}: p99 latency (p50 / p90 / max)"),
                format!(
                    "{:.1} ms ({:.1} / {:.1} / {:.1})",
                    s.p99, s.p50, s.p90, s.max
                ),
            )
            .against(
                pg_avg.map_or("—".into(), |a| format!("pgbench avg {a:.2} ms")),
                ratio(s.p99, pg_avg),
            )
            .target(P99_VS_PGBENCH_AVG, false),
        );
    };
    if let Some(s) = &f.submit_spread {
        submit(&format!("{} keys", f.keys), s, &f.pg_spread, &mut rows);
    }
    if let Some(s) = &f.submit_hot {
        submit("1 hot key", s, &f.pg_hot, &mut rows);
    }
    if let Some(hot) = &f.submit_hot {
        let spread = f.submit_spread.as_ref().map(|s| s.rate);
        rows.push(
            row(
                "Submit: hot-key rate / spread rate",
                format!("{}/s", n(hot.rate)),
            )
            .against(
                spread.map_or("—".into(), |s| format!("spread {}/s", n(s))),
                ratio(hot.rate, spread),
            )
            .target(HOT_VS_SPREAD, true),
        );
    }
    if let Some(s) = &f.submit_spread {
        rows.push(
            row(
                format!("Submit, {} keys, against the RabbitMQ ceiling", f.keys),
                format!("{}/s", n(s.rate)),
            )
            .against(
                f.amqp_rate
                    .map_or("—".into(), |r| format!("RabbitMQ {} msg/s", n(r))),
                ratio(s.rate, f.amqp_rate),
            ),
        );
    }
    let failed: Vec<u64> = [&f.submit_spread, &f.submit_hot]
        .iter()
        .filter_map(|s| s.as_ref().map(|s| s.failed))
        .collect();
    if !failed.is_empty() {
        let total: u64 = failed.iter().sum();
        rows.push(
            row("Submit: non-2xx answers", total.to_string()).target_text("0", Some(total == 0)),
        );
    }
    let spread_rate = f.submit_spread.as_ref().map(|s| s.rate);
    if let Some(e) = &f.e2e {
        let reference = || spread_rate.map_or("—".into(), |r| format!("submit alone {}/s", n(r)));
        rows.push(
            row(
                "End to end: completions/s (serve + worker, 20 deltas × 5 ms)",
                format!(
                    "{}/s ({} jobs)",
                    n(e.completion_rate),
                    n(e.completed as f64)
                ),
            )
            .against(reference(), ratio(e.completion_rate, spread_rate))
            .target(E2E_VS_SUBMIT, true),
        );
        rows.push(
            row(
                "End to end: submits/s while the worker runs",
                format!("{}/s ({} jobs)", n(e.submit_rate), n(e.submitted as f64)),
            )
            .against(reference(), ratio(e.submit_rate, spread_rate)),
        );
        rows.push(row(
            "End to end: deltas/s (completed × 20 / elapsed)",
            format!("{}/s", n(e.delta_rate)),
        ));
        rows.push(row(
            "End to end: queue wait p50 / p99 (started − created)",
            format!("{:.1} / {:.1} ms", e.wait_p50, e.wait_p99),
        ));
        rows.push(
            row(
                "End to end: run time p50 / p99 (finished − started)",
                format!("{:.1} / {:.1} ms", e.run_p50, e.run_p99),
            )
            .against(
                format!("mock alone {:.0} ms", e.ideal_run_ms),
                ratio(e.run_p50, Some(e.ideal_run_ms)),
            ),
        );
        rows.push(row(
            "End to end: PostgreSQL transactions per job (approx.)",
            format!("{:.2}", e.xacts_per_job),
        ));
    }
    for s in &f.streams {
        rows.push(
            row(
                format!("Streaming writes, {}: deltas/s", s.label),
                format!("{}/s", n(s.rate)),
            )
            .against(
                format!("target {}/s", n(STREAM_DELTAS_PER_S)),
                ratio(s.rate, Some(STREAM_DELTAS_PER_S)),
            )
            .target(1.0, true),
        );
        rows.push(row(
            format!("Streaming writes, {}: per delta", s.label),
            format!(
                "{:.4} transactions, {:.4} event rows, {:.4} job-row updates",
                s.xacts_per_delta, s.event_rows_per_delta, s.job_updates_per_delta
            ),
        ));
    }
    if let Some(m) = &f.memory {
        rows.push(row(
            "Front RSS, idle",
            format!("{:.1} MiB", mib(m.front_idle_kib)),
        ));
        let with = mib(m.front_followers_kib);
        rows.push(
            row(
                format!("Front RSS, {} SSE followers open", n(m.followers as f64)),
                format!(
                    "{with:.1} MiB ({:.1} KiB a follower)",
                    (m.front_followers_kib as f64 - m.front_idle_kib as f64)
                        / m.followers.max(1) as f64
                ),
            )
            .against(
                format!("target {FRONT_RSS_MIB:.0} MiB"),
                ratio(with, Some(FRONT_RSS_MIB)),
            )
            .target(1.0, false),
        );
        rows.push(row(
            "Worker RSS, idle",
            format!("{:.1} MiB", mib(m.worker_idle_kib)),
        ));
        rows.push(row(
            format!(
                "Worker RSS, concurrency {}, {} jobs running",
                m.worker_concurrency, m.running
            ),
            format!("{:.1} MiB", mib(m.worker_busy_kib)),
        ));
    }
    rows
}

/// The table of every figure, as markdown.
pub fn markdown(f: &Figures) -> String {
    let mut out = String::from(
        "| Figure | Measured | Ceiling / reference | Ratio | Target (ratio) | Met |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows(f) {
        let [figure, measured, reference, ratio, target, met] = cells(&r);
        let met = if met == "no" { "**no**".into() } else { met };
        let _ = writeln!(
            out,
            "| {figure} | {measured} | {reference} | {ratio} | {target} | {met} |"
        );
    }
    out
}

/// What the run ran on.
pub struct Machine {
    pub cores: String,
    pub cpu: String,
    pub ram: String,
    pub postgres: String,
    pub rabbitmq: String,
}

impl Machine {
    pub async fn probe(settings: &Settings) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or("unknown".into(), |kib| {
                format!("{:.1} GiB", kib / 1024.0 / 1024.0)
            });
        let cores =
            std::thread::available_parallelism().map_or("unknown".into(), |n| n.to_string());
        let postgres = async {
            use sqlx::Connection;
            let mut conn =
                sqlx::PgConnection::connect(&format!("{}/postgres", settings.pg_base)).await?;
            let (v,): (String,) = sqlx::query_as("SHOW server_version")
                .fetch_one(&mut conn)
                .await?;
            conn.close().await?;
            Ok::<_, anyhow::Error>(v)
        }
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
        let rabbitmq = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "version"])
            .output()
            .await
            .ok()
            .filter(|o| o.status.success())
            .map_or("unknown".into(), |o| {
                String::from_utf8_lossy(&o.stdout).trim().to_string()
            });
        Self {
            cores,
            cpu,
            ram,
            postgres,
            rabbitmq,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "machine: {} cores ({}), {} RAM; PostgreSQL {}; RabbitMQ {}",
            self.cores, self.cpu, self.ram, self.postgres, self.rabbitmq
        )
    }

    pub fn markdown(&self) -> String {
        format!(
            "Machine: {} cores, {}, {} RAM; PostgreSQL {}, RabbitMQ {} (same machine).\n",
            self.cores, self.cpu, self.ram, self.postgres, self.rabbitmq
        )
    }
}

/// The phase a row of the table belongs to.
fn phase_of(figure: &str) -> &'static str {
    if figure.starts_with("Ceiling") {
        "ceilings"
    } else if figure.starts_with("Submit") {
        "submit"
    } else if figure.starts_with("End to end") {
        "e2e"
    } else if figure.starts_with("Streaming") {
        "stream"
    } else {
        "memory"
    }
}

/// A row's cells as the tables show them.
fn cells(r: &Row) -> [String; 6] {
    let met = match r.met {
        Some(true) => "yes",
        Some(false) => "no",
        None => "—",
    };
    [
        r.figure.clone(),
        r.measured.clone(),
        r.reference.clone(),
        show_ratio(r.ratio),
        r.target.clone(),
        met.into(),
    ]
}

const TITLES: [&str; 6] = [
    "figure",
    "measured",
    "ceiling / reference",
    "ratio",
    "target",
    "met",
];

/// The rows of one phase as an aligned text table.
pub fn text(f: &Figures, phase: &str) -> String {
    let table: Vec<[String; 6]> = rows(f)
        .iter()
        .filter(|r| phase_of(&r.figure) == phase)
        .map(cells)
        .collect();
    let mut widths = TITLES.map(|t| t.chars().count());
    for cells in &table {
        for (w, cell) in widths.iter_mut().zip(cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from(" ");
        for (cell, w) in cells.iter().zip(&widths) {
            let pad = w.saturating_sub(cell.chars().count());
            let _ = write!(s, " {cell}{}  ", " ".repeat(pad));
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&TITLES.map(String::from));
    for cells in &table {
        out.push_str(&line(cells));
    }
    out
}
