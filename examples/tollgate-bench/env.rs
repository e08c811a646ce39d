//! One phase's own tollgate: an empty database `tollgate_bench_<uuid>`, AMQP names suffixed by the
//! same uuid, a free port and a config file in a temporary directory; the `serve` / `worker`
//! processes started from the binary under measure; and the clean-up that removes all of it
//! (processes, database, queues, exchanges, directory), which [`Env::finish`] runs whether the
//! phase succeeded or not, and [`Registry::clean_all`] runs for a phase that was interrupted.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use lapin::{
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    ConnectionProperties,
};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};
use tollgate::config::{Config, ModelConfig};
use uuid::Uuid;

use crate::{
    report::{self, Figures},
    Settings,
};

/// The database, the AMQP names and the directory of every phase that has not cleaned up yet.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<Vec<Leftover>>>);

#[derive(Clone, Debug)]
pub struct Leftover {
    id: String,
    db_name: String,
    dir: PathBuf,
}

impl Registry {
    fn add(&self, leftover: Leftover) {
        self.0.lock().expect("registry lock").push(leftover);
    }

    fn remove(&self, id: &str) {
        self.0.lock().expect("registry lock").retain(|l| l.id != id);
    }

    /// Removes what phases left behind (they were interrupted or panicked).
    pub async fn clean_all(&self, settings: &Settings) {
        let left: Vec<Leftover> = self.0.lock().expect("registry lock").drain(..).collect();
        for leftover in left {
            eprintln!("removing what was left of {}", leftover.db_name);
            remove_everything(settings, &leftover).await;
        }
    }
}

/// Which tollgate command a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Serve,
    Worker,
}

impl Role {
    fn command(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Worker => "worker",
        }
    }
}

struct Proc {
    role: Role,
    child: Child,
    log: PathBuf,
}

/// A key created with `tollgate keys create`.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: Uuid,
    pub secret: String,
}

pub struct Env {
    pub id: String,
    pub db_name: String,
    pub db_url: String,
    pub base_url: String,
    pub config: Config,
    pub keys: Vec<Key>,
    settings: Arc<Settings>,
    registry: Registry,
    config_path: PathBuf,
    dir: PathBuf,
    procs: Vec<Proc>,
    started: usize,
}

/// The mock model every phase has: 20 deltas, 5 ms apart.
pub const MODEL: &str = "mock-1";

impl Env {
    /// Writes the config of a new environment; `tune` sets what the phase needs. Nothing is
    /// created in PostgreSQL or RabbitMQ until a command runs.
    pub fn new(
        settings: &Arc<Settings>,
        registry: &Registry,
        phase: &str,
        tune: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("tollgate_bench_{id}");
        let dir = std::env::temp_dir().join(format!("tollgate-bench-{id}"));
        std::fs::create_dir_all(&dir)?;
        registry.add(Leftover {
            id: id.clone(),
            db_name: db_name.clone(),
            dir: dir.clone(),
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();

        let mut config = Config::default();
        config.database.url = format!("{}/{db_name}", settings.pg_base);
        config.database.max_connections = settings.db_connections;
        config.amqp.url = settings.amqp_url.clone();
        config.amqp.exchange = format!("tollgate.{id}");
        config.amqp.queue = format!("tollgate.jobs.{id}");
        config.amqp.dead_letter_exchange = format!("tollgate.dlx.{id}");
        config.amqp.dead_letter_queue = format!("tollgate.jobs.dead.{id}");
        config.events.exchange = format!("tollgate.events.{id}");
        config.webhooks.queue = format!("tollgate.webhooks.{id}");
        config.amqp.connection_name = format!("tollgate-bench-{phase}");
        config.server.listen = format!("127.0.0.1:{port}");
        config.server.shutdown_grace_seconds = 2;
        config.worker.shutdown_grace_seconds = 2;
        let mut model = ModelConfig::mock(MODEL);
        model.mock_deltas = 20;
        model.mock_delay_ms = 5;
        config.models = vec![model];
        tune(&mut config);
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)?;

        Ok(Self {
            base_url: format!("http://127.0.0.1:{port}"),
            id,
            db_name,
            db_url: config.database.url.clone(),
            config,
            keys: Vec::new(),
            settings: settings.clone(),
            registry: registry.clone(),
            config_path,
            dir,
            procs: Vec::new(),
            started: 0,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.settings.binary);
        command
            .args(args)
            .env("TOLLGATE_CONFIG", &self.config_path)
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .env_remove("TOLLGATE_LISTEN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(filter) = &self.settings.rust_log {
            command.env("RUST_LOG", filter);
        }
        command
    }

    /// Runs a tollgate command to its end and returns what it printed.
    pub async fn tollgate(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .command(args)
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.settings.binary.display()))?;
        if !output.status.success() {
            bail!(
                "`tollgate {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Creates the database and its schema (`tollgate migrate`).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.tollgate(&["migrate"]).await.map(drop)
    }

    /// Creates `n` keys with no rpm and no in-flight limit and a budget no run reaches, named
    /// `bench-0` …; they are appended to [`Env::keys`] in that order.
    pub async fn create_keys(&mut self, n: usize) -> anyhow::Result<()> {
        let first = self.keys.len();
        let this = &*self;
        let created: Vec<Key> = futures::stream::iter(first..first + n)
            .map(|i| async move {
                let name = format!("bench-{i}");
                let out = this
                    .tollgate(&[
                        "keys",
                        "create",
                        "--name",
                        &name,
                        "--budget-usd",
                        "1000000",
                        "--json",
                    ])
                    .await?;
                let line = out.lines().last().context("keys create printed nothing")?;
                let json: serde_json::Value = serde_json::from_str(line)?;
                Ok::<_, anyhow::Error>(Key {
                    id: json["id"].as_str().context("no id")?.parse()?,
                    secret: json["key"].as_str().context("no key")?.to_string(),
                })
            })
            .buffered(4)
            .try_collect()
            .await?;
        self.keys.extend(created);
        Ok(())
    }

    /// The secrets of keys `range`.
    pub fn secrets(&self, range: std::ops::Range<usize>) -> Vec<String> {
        self.keys[range].iter().map(|k| k.secret.clone()).collect()
    }

    /// Starts `tollgate serve` or `tollgate worker` and waits until it is ready: the front
    /// answers `/readyz` with 200, the worker consumes from the jobs queue. Returns its pid.
    pub async fn start(&mut self, role: Role) -> anyhow::Result<u32> {
        self.started += 1;
        let log = self
            .dir
            .join(format!("{}-{}.log", role.command(), self.started));
        let file = std::fs::File::create(&log)?;
        let child = self
            .command(&[role.command()])
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start tollgate {}", role.command()))?;
        let pid = child.id().context("the process has no pid")?;
        self.procs.push(Proc { role, child, log });
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        loop {
            let proc = self.procs.last_mut().expect("just pushed");
            if let Some(status) = proc.child.try_wait()? {
                bail!(
                    "tollgate {} exited at start ({status}):\n{}",
                    role.command(),
                    tail(&proc.log, 30)
                );
            }
            let ready = match role {
                Role::Serve => http
                    .get(format!("{}/readyz", self.base_url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                Role::Worker => self.consumers().await.unwrap_or(0) > 0,
            };
            if ready {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "tollgate {} was not ready after 60 s:\n{}",
                    role.command(),
                    tail(&self.procs.last().expect("pushed").log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Consumers of the jobs queue (0 while it does not exist).
    async fn consumers(&self) -> anyhow::Result<u32> {
        let conn = lapin::Connection::connect(
            &self.settings.amqp_url,
            ConnectionProperties::default().with_connection_name("tollgate-bench-probe".into()),
        )
        .await?;
        let channel = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(
                self.config.amqp.queue.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "probed".into()).await;
        Ok(declared?.consumer_count())
    }

    /// Stops the processes of `role`: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, role: Role) -> anyhow::Result<()> {
        let (stopping, kept): (Vec<Proc>, Vec<Proc>) =
            self.procs.drain(..).partition(|p| p.role == role);
        self.procs = kept;
        for proc in stopping {
            terminate(proc, Duration::from_secs(20)).await?;
        }
        Ok(())
    }

    /// A connection to the phase's database.
    pub async fn pg(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect(&self.db_url).await?)
    }

    /// Ends the phase: on error shows the end of each process's log; then stops the processes
    /// and removes the database, the queues, the exchanges and the directory.
    pub async fn finish<T>(mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            for proc in &self.procs {
                eprintln!(
                    "--- end of {} ---\n{}",
                    proc.log.display(),
                    tail(&proc.log, 20)
                );
            }
        }
        for proc in self.procs.drain(..) {
            if let Err(e) = terminate(proc, Duration::from_secs(10)).await {
                eprintln!("warning: {e}");
            }
        }
        let leftover = Leftover {
            id: self.id.clone(),
            db_name: self.db_name.clone(),
            dir: self.dir.clone(),
        };
        remove_everything(&self.settings, &leftover).await;
        self.registry.remove(&self.id);
        result
    }
}

/// Runs one phase in a tollgate of its own (`tune` adjusts its configuration): `measure` fills
/// `figures`; the processes, database and queues are removed whatever the result, and the
/// phase's figures are printed.
pub async fn phase(
    settings: &Arc<Settings>,
    registry: &Registry,
    name: &str,
    tune: impl FnOnce(&mut Config),
    figures: &mut Figures,
    measure: impl AsyncFnOnce(&mut Env, &mut Figures) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut env = Env::new(settings, registry, name, tune)?;
    let result = measure(&mut env, figures).await;
    env.finish(result).await?;
    println!("{}", report::text(figures, name));
    Ok(())
}

/// SIGTERM, a bounded wait, then SIGKILL.
async fn terminate(mut proc: Proc, grace: Duration) -> anyhow::Result<()> {
    if proc.child.try_wait()?.is_some() {
        return Ok(());
    }
    if let Some(pid) = proc.child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(grace, proc.child.wait())
        .await
        .is_err()
    {
        eprintln!(
            "warning: tollgate {} did not stop within {grace:?}; killed",
            proc.role.command()
        );
        proc.child.kill().await?;
    }
    Ok(())
}

/// Drops the database and deletes every queue and exchange whose name holds the phase's uuid,
/// then the directory. Failures are reported, not raised: clean-up goes as far as it can.
async fn remove_everything(settings: &Settings, leftover: &Leftover) {
    let dropped = async {
        let mut admin = PgConnection::connect(&format!("{}/postgres", settings.pg_base)).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            leftover.db_name
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = dropped.await {
        eprintln!("warning: cannot drop database {}: {e}", leftover.db_name);
    }
    if let Err(e) = delete_amqp(settings, &leftover.id).await {
        eprintln!(
            "warning: cannot delete the queues and exchanges of {}: {e}",
            leftover.id
        );
    }
    let _ = std::fs::remove_dir_all(&leftover.dir);
}

/// Names RabbitMQ lists (`rabbitmqctl -q list_<what> name`) that hold `id`.
async fn listed(what: &str, id: &str) -> anyhow::Result<Vec<String>> {
    let output = Command::new("rabbitmqctl")
        .args(["-q", &format!("list_{what}"), "name"])
        .output()
        .await
        .context("cannot run rabbitmqctl")?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl list_{what} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| name.contains(id))
        .map(String::from)
        .collect())
}

async fn delete_amqp(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let queues = listed("queues", id).await?;
    let exchanges = listed("exchanges", id).await?;
    if queues.is_empty() && exchanges.is_empty() {
        return Ok(());
    }
    let conn = lapin::Connection::connect(
        &settings.amqp_url,
        ConnectionProperties::default().with_connection_name("tollgate-bench-cleanup".into()),
    )
    .await?;
    for queue in &queues {
        let channel = conn.create_channel().await?;
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("queue {queue}"))?;
    }
    for exchange in &exchanges {
        let channel = conn.create_channel().await?;
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("exchange {exchange}"))?;
    }
    let _ = conn.close(200, "cleaned up".into()).await;
    Ok(())
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Resident memory of a process, in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}
