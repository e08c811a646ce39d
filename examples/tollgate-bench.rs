//! tollgate's benchmark: a live tollgate, started from the release binary, measured against the
//! ceilings of the services it runs on, measured in the same run.
//!
//! ```text
//! cargo build --release --bin tollgate                          # the binary under measure
//! cargo run --release --example tollgate-bench                 # every phase, about 5 minutes
//! cargo run --release --example tollgate-bench -- submit e2e   # some phases
//! ```
//!
//! Phases, in this order (`docs/benchmarks.md` says what each figure means and its target):
//! - `ceilings`: pgbench running tollgate's own admission statement ([`ADMIT_SQL`]) over 16 keys
//!   and on one hot key; RabbitMQ publishing with confirms at the size of a job message.
//! - `submit`: `tollgate serve` alone, `POST /v1/responses` in background mode at full speed.
//! - `e2e`: `tollgate serve` and `tollgate worker`, a mock model of 20 deltas 5 ms apart.
//! - `stream`: the worker's streaming writes, one job of 10,000 deltas and 200 jobs of 200.
//! - `memory`: the front's RSS idle and with 1,000 SSE followers, the worker's at full concurrency.
//!
//! Every phase runs its own tollgate on an empty database `tollgate_bench_<uuid>` with AMQP names
//! suffixed by the same uuid and a free port; at the end (also on error or Ctrl-C) the processes
//! are stopped, the database dropped and the queues and exchanges deleted. A figure whose
//! ceiling was not measured in the run (a phase left out) shows its ratio as `—`.
//!
//! Environment (defaults in brackets):
//! - `BENCH_SECONDS` [15]: the measured window of pgbench, of each submit run and of e2e submits;
//!   `BENCH_WARMUP_SECONDS` [2] before each submit run; `BENCH_AMQP_SECONDS` [5].
//! - `BENCH_CONCURRENCY` [32]: HTTP connections of the load generator, pgbench clients and
//!   RabbitMQ publishers; `BENCH_KEYS` [16]: keys the load is spread over.
//! - `BENCH_DB_CONNECTIONS` [32]: `database.max_connections` of each tollgate process.
//! - `BENCH_WORKER_CONCURRENCY` [tollgate's default, 1024]: `worker.concurrency` in e2e, stream
//!   and memory.
//! - `BENCH_DRAIN_SECONDS` [180]: longest wait for submitted jobs to finish.
//! - `BENCH_STREAM_DELTAS` [10000]; `BENCH_STREAM_JOBS` [200] of `BENCH_STREAM_JOB_DELTAS` [200].
//! - `BENCH_FOLLOWERS` [1000]: SSE streams held open in `memory`.
//! - `BENCH_RUST_LOG`: `RUST_LOG` of the tollgate processes (default: tollgate's, `info`).
//! - `BENCH_TOLLGATE_BIN`: the binary to measure (default: `tollgate` in this example's target
//!   directory and profile; the run stops if it is missing or older than `src/`).
//! - `TOLLGATE_TEST_PG` [`postgres://postgres@127.0.0.1:5432`] and `TOLLGATE_TEST_AMQP`
//!   [`amqp://guest:guest@127.0.0.1:5672/%2f`], as for the tests.
//!
//! `pgbench` and `rabbitmqctl` must be on `PATH`. Nothing is installed into the servers.
//!
//! [`ADMIT_SQL`]: tollgate::admission::ADMIT_SQL

#[path = "tollgate-bench/ceilings.rs"]
mod ceilings;
#[path = "tollgate-bench/e2e.rs"]
mod e2e;
#[path = "tollgate-bench/env.rs"]
mod env;
#[path = "tollgate-bench/load.rs"]
mod load;
#[path = "tollgate-bench/memory.rs"]
mod memory;
#[path = "tollgate-bench/report.rs"]
mod report;
#[path = "tollgate-bench/stream.rs"]
mod stream;
#[path = "tollgate-bench/submit.rs"]
mod submit;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context};

use env::Registry;
use report::Figures;

/// What the environment variables set.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seconds: Duration,
    pub warmup: Duration,
    pub amqp_seconds: Duration,
    pub concurrency: usize,
    pub keys: usize,
    pub db_connections: u32,
    pub worker_concurrency: u16,
    pub drain: Duration,
    pub stream_deltas: u32,
    pub stream_jobs: usize,
    pub stream_job_deltas: u32,
    pub followers: usize,
    pub rust_log: Option<String>,
    pub binary: PathBuf,
    pub pg_base: String,
    pub amqp_url: String,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env(binary: PathBuf) -> anyhow::Result<Self> {
        let secs = |name, default| env_or(name, default).map(Duration::from_secs_f64);
        let settings = Self {
            seconds: secs("BENCH_SECONDS", 15.0)?,
            warmup: secs("BENCH_WARMUP_SECONDS", 2.0)?,
            amqp_seconds: secs("BENCH_AMQP_SECONDS", 5.0)?,
            concurrency: env_or("BENCH_CONCURRENCY", 32)?,
            keys: env_or("BENCH_KEYS", 16)?,
            db_connections: env_or("BENCH_DB_CONNECTIONS", 32)?,
            worker_concurrency: env_or(
                "BENCH_WORKER_CONCURRENCY",
                tollgate::config::Config::default().worker.concurrency,
            )?,
            drain: secs("BENCH_DRAIN_SECONDS", 180.0)?,
            stream_deltas: env_or("BENCH_STREAM_DELTAS", 10_000)?,
            stream_jobs: env_or("BENCH_STREAM_JOBS", 200)?,
            stream_job_deltas: env_or("BENCH_STREAM_JOB_DELTAS", 200)?,
            followers: env_or("BENCH_FOLLOWERS", 1000)?,
            rust_log: std::env::var("BENCH_RUST_LOG").ok(),
            binary,
            pg_base: std::env::var("TOLLGATE_TEST_PG")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
                .trim_end_matches('/')
                .to_string(),
            amqp_url: std::env::var("TOLLGATE_TEST_AMQP")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        };
        if settings.concurrency == 0 || settings.keys == 0 || settings.worker_concurrency == 0 {
            bail!("BENCH_CONCURRENCY, BENCH_KEYS and BENCH_WORKER_CONCURRENCY must be above 0");
        }
        Ok(settings)
    }
}

const PHASES: [&str; 5] = ["ceilings", "submit", "e2e", "stream", "memory"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut phases: Vec<String> = std::env::args().skip(1).collect();
    if phases.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: cargo run --release --example tollgate-bench [-- PHASE...]\n\
             phases: {} (default: all, in this order); settings: see the doc comment of \
             examples/tollgate-bench.rs",
            PHASES.join(" ")
        );
        return Ok(());
    }
    if let Some(unknown) = phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
        bail!("unknown phase {unknown:?}; phases: {}", PHASES.join(" "));
    }
    if phases.is_empty() {
        phases = PHASES.iter().map(|p| p.to_string()).collect();
    }
    let settings = Arc::new(Settings::from_env(tollgate_binary()?)?);
    let machine = report::Machine::probe(&settings).await;
    println!("{}", machine.describe());
    println!("tollgate binary: {}", settings.binary.display());

    let registry = Registry::default();
    let mut run = tokio::spawn(run_phases(
        phases.clone(),
        settings.clone(),
        registry.clone(),
    ));
    let outcome = tokio::select! {
        joined = &mut run => Some(joined),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: cleaning up");
            run.abort();
            // Dropping the phase's processes kills them.
            let _ = run.await;
            None
        }
    };
    // Whatever a phase left (interrupted, panicked) is removed here; a phase that ended cleaned
    // up after itself.
    registry.clean_all(&settings).await;
    match outcome {
        Some(Ok(Ok(figures))) => {
            println!("\n## Summary ({})\n", phases.join(", "));
            println!("{}", machine.markdown());
            println!(
                "Settings: BENCH_SECONDS={:.0}, {} connections / pgbench clients / publishers, \
                 {} keys, database.max_connections {}, worker.concurrency {}, {} followers.\n",
                settings.seconds.as_secs_f64(),
                settings.concurrency,
                settings.keys,
                settings.db_connections,
                settings.worker_concurrency,
                settings.followers
            );
            println!("{}", report::markdown(&figures));
            Ok(())
        }
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => bail!("a phase panicked: {e}"),
        None => bail!("interrupted"),
    }
}

async fn run_phases(
    phases: Vec<String>,
    settings: Arc<Settings>,
    registry: Registry,
) -> anyhow::Result<Figures> {
    let mut figures = Figures {
        keys: settings.keys,
        concurrency: settings.concurrency,
        ..Figures::default()
    };
    for phase in &phases {
        println!("\n=== {phase} ===");
        match phase.as_str() {
            "ceilings" => ceilings::run(&settings, &registry, &mut figures).await?,
            "submit" => submit::run(&settings, &registry, &mut figures).await?,
            "e2e" => e2e::run(&settings, &registry, &mut figures).await?,
            "stream" => stream::run(&settings, &registry, &mut figures).await?,
            "memory" => memory::run(&settings, &registry, &mut figures).await?,
            _ => unreachable!("phases are checked"),
        }
    }
    Ok(figures)
}

/// The tollgate binary to measure: `BENCH_TOLLGATE_BIN`, else the one of this example's profile,
/// which must be newer than the sources it is built from.
fn tollgate_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("BENCH_TOLLGATE_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("BENCH_TOLLGATE_BIN={} is not a file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    // <target>/<profile>/examples/tollgate-bench
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("cannot tell the target directory from this executable's path")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let build = if release {
        "cargo build --release --bin tollgate"
    } else {
        eprintln!("warning: not a release build; run with `cargo run --release` for real figures");
        "cargo build --bin tollgate"
    };
    let binary = profile_dir.join("tollgate");
    let built = match std::fs::metadata(&binary).and_then(|m| m.modified()) {
        Ok(built) => built,
        Err(_) => bail!(
            "{} does not exist: build it with `{build}`",
            binary.display()
        ),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = ["src", "migrations", "Cargo.toml", "Cargo.lock"].map(|p| root.join(p));
    if let Some(changed) = sources.iter().filter_map(|p| newest(p)).max() {
        if changed > built {
            bail!(
                "{} is older than its sources: build it with `{build}`",
                binary.display()
            );
        }
    }
    Ok(binary)
}

/// The latest modification time of a file, or of the files under a directory.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| newest(&entry.path()))
        .max()
}
