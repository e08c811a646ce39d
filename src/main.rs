use std::{path::PathBuf, sync::Arc};

use clap::{Args, Parser, Subcommand};
use tollgate::{
    config::Config, money::MicroUsd, run, store, store::keys::BudgetPeriod, telemetry, webhooks,
};

/// Admission-controlled, queue-backed background jobs for LLM requests.
#[derive(Parser)]
#[command(name = "tollgate", version)]
struct Cli {
    /// Configuration file (default: $TOLLGATE_CONFIG, else ./tollgate.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run the HTTP front and the outbox relay.
    Serve(Listen),
    /// Run the RabbitMQ worker.
    Worker,
    /// Run the front and the worker in one process.
    All(Listen),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage webhook endpoints and replay deliveries.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Add an endpoint to a key (or update the key's endpoint at this URL); prints its id, then
    /// its signing secret alone on the last line, shown this once (or a JSON object with --json).
    Add(AddEndpoint),
    /// List endpoints, live and removed, without their secrets (JSON lines).
    List,
    /// Remove an endpoint by its id: it receives nothing more; its deliveries stay on record.
    Remove { endpoint: uuid::Uuid },
    /// Send one recorded delivery (`tollgate.webhook_delivery_log.id`) again, now.
    Replay { delivery: i64 },
}

#[derive(Args)]
struct AddEndpoint {
    /// The id of the key whose jobs the endpoint hears about.
    #[arg(long)]
    key: uuid::Uuid,
    #[arg(long)]
    url: String,
    /// Event types, comma separated (default: all): response.completed, response.failed,
    /// response.cancelled, response.incomplete.
    #[arg(long, value_delimiter = ',')]
    events: Option<Vec<String>>,
    /// Use this secret (`whsec_` and base64) instead of a new one.
    #[arg(long)]
    secret: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct Listen {
    /// Address to listen on.
    #[arg(long, env = "TOLLGATE_LISTEN")]
    listen: Option<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; prints the secret alone on the last line (or a JSON object with --json).
    Create(CreateKey),
    /// List keys with their limits and live counters (JSON lines).
    List,
    /// Revoke one key by its id or its printed prefix (`sk-tg-` and 8 hex digits). A prefix that
    /// names several live keys (older keys had 4 digits) revokes none.
    Revoke { key: String },
    /// Change a live key's limits: the options given are set (`none` lifts a limit), the others
    /// kept; the key's next admission, on every front, runs under them. Prints the key (JSON).
    SetLimits(SetLimits),
}

#[derive(Args)]
struct SetLimits {
    /// The key's id.
    key: uuid::Uuid,
    #[arg(long)]
    name: Option<String>,
    /// Requests per minute, or `none`.
    #[arg(long)]
    rpm: Option<Limit<u32>>,
    /// Tokens per minute, or `none`.
    #[arg(long)]
    tpm: Option<Limit<u32>>,
    /// Jobs queued or running at once, or `none`.
    #[arg(long)]
    max_in_flight: Option<Limit<u32>>,
    /// Budget in USD, or `none`.
    #[arg(long)]
    budget_usd: Option<Limit<f64>>,
    /// `daily`, `monthly`, or `none` (the budget never starts again).
    #[arg(long)]
    budget_period: Option<Limit<BudgetPeriod>>,
    /// Models the key may use, comma separated, or `none` (all).
    #[arg(long)]
    models: Option<Limit<String>>,
    /// The key stops working this many days from now, or `none` (never).
    #[arg(long)]
    expires_in_days: Option<Limit<u32>>,
}

/// A limit given on the command line: a value, or `none` to lift it.
#[derive(Clone, Debug)]
enum Limit<T> {
    Set(T),
    Lifted,
}

impl<T: std::str::FromStr> std::str::FromStr for Limit<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "none" {
            return Ok(Limit::Lifted);
        }
        text.parse()
            .map(Limit::Set)
            .map_err(|e| format!("{e} (or `none`)"))
    }
}

impl<T> Limit<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Limit::Set(v) => Some(v),
            Limit::Lifted => None,
        }
    }
}

#[derive(Args)]
struct CreateKey {
    #[arg(long)]
    name: String,
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u32>,
    /// Tokens per minute (estimated input at admission, corrected to real usage when jobs finish).
    #[arg(long)]
    tpm: Option<u32>,
    /// Jobs queued or running at once.
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// Budget in USD.
    #[arg(long)]
    budget_usd: Option<f64>,
    /// When the budget starts again: daily or monthly (UTC). Default: never.
    #[arg(long, value_parser = ["daily", "monthly"])]
    budget_period: Option<String>,
    /// The key stops working after this many days.
    #[arg(long)]
    expires_in_days: Option<u32>,
    /// Models this key may use, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref())?;
    telemetry::init(config.log.format);
    if let Command::Serve(Listen { listen: Some(l) }) | Command::All(Listen { listen: Some(l) }) =
        &cli.command
    {
        config.server.listen = l.clone();
    }
    let config = Arc::new(config);
    let pool = run::prepare_database(&config).await?;

    match cli.command {
        Command::Migrate => {
            tracing::info!("database schema is up to date");
        }
        Command::Serve(_) => {
            let listener = run::bind(&config).await?;
            run::serve(config, pool, listener, run::shutdown_on_signal()).await?;
        }
        Command::Worker => {
            let shutdown = run::shutdown_on_signal();
            let publisher = Arc::new(tollgate::queue::Publisher::new(config.clone()));
            let probes = run::worker_probes(&config, &pool, &publisher, &shutdown).await?;
            run::work_on(config, pool, publisher, shutdown).await;
            if let Some(probes) = probes {
                let _ = probes.await;
            }
        }
        Command::All(_) => {
            let listener = run::bind(&config).await?;
            let shutdown = run::shutdown_on_signal();
            let worker = tokio::spawn(run::work(config.clone(), pool.clone(), shutdown.clone()));
            let served = run::serve(config, pool, listener, shutdown.clone()).await;
            shutdown.cancel();
            worker.await?;
            served?;
        }
        Command::Keys(KeysCommand::Create(args)) => create_key(&pool, args).await?,
        Command::Keys(KeysCommand::SetLimits(args)) => set_limits(&pool, args).await?,
        Command::Webhooks(command) => webhooks(&pool, &config, command).await?,
        Command::Keys(KeysCommand::List) => {
            for key in store::keys::list(&pool).await? {
                println!("{}", serde_json::to_string(&key)?);
            }
        }
        Command::Keys(KeysCommand::Revoke { key }) => {
            match store::keys::revoke(&pool, &key).await? {
                store::keys::Revoked::One(id, name) => println!("revoked {id} ({name})"),
                store::keys::Revoked::None => {
                    anyhow::bail!("no live key with id or prefix {key:?}")
                }
                store::keys::Revoked::Ambiguous(keys) => {
                    let listed: Vec<String> = keys
                        .iter()
                        .map(|(id, name)| format!("{id} ({name})"))
                        .collect();
                    anyhow::bail!(
                        "the prefix {key:?} names {} live keys; nothing was revoked. Revoke one by \
                         its id: {}",
                        keys.len(),
                        listed.join(", ")
                    )
                }
            }
        }
    }
    Ok(())
}

async fn webhooks(
    pool: &sqlx::PgPool,
    config: &Config,
    command: WebhooksCommand,
) -> anyhow::Result<()> {
    match command {
        WebhooksCommand::Add(args) => {
            let (id, secret) = webhooks::add_endpoint(
                pool,
                config,
                args.key,
                &args.url,
                args.events.as_deref(),
                args.secret.as_deref(),
            )
            .await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "key_id": args.key, "url": args.url,
                                       "events": args.events, "secret": secret})
                );
            } else {
                println!("webhook endpoint {id} for key {} at {}", args.key, args.url);
                println!("{secret}");
            }
        }
        WebhooksCommand::List => {
            for endpoint in store::webhooks::list(pool).await? {
                println!("{}", serde_json::to_string(&endpoint)?);
            }
        }
        WebhooksCommand::Remove { endpoint } => {
            if !store::webhooks::disable(pool, endpoint).await? {
                anyhow::bail!("no live webhook endpoint with id {endpoint}");
            }
            println!("removed webhook endpoint {endpoint}");
        }
        WebhooksCommand::Replay { delivery } => {
            let replayed = webhooks::replay(pool, config, delivery).await?;
            let answer = match &replayed.sent {
                Ok(code) => format!("answered {code}"),
                Err(e) => e.clone(),
            };
            println!(
                "delivery {delivery} sent again as delivery {} (attempt {}): {answer}, in {} ms",
                replayed.delivery_id,
                replayed.attempt,
                replayed.latency.as_millis()
            );
            if !matches!(replayed.sent, Ok(code) if (200..300).contains(&code)) {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

async fn create_key(pool: &sqlx::PgPool, args: CreateKey) -> anyhow::Result<()> {
    let to_i32 = |v: Option<u32>, what: &str| -> anyhow::Result<Option<i32>> {
        v.map(|n| {
            i32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| anyhow::anyhow!("--{what} must be between 1 and {}", i32::MAX))
        })
        .transpose()
    };
    let budget = args
        .budget_usd
        .map(|usd| {
            MicroUsd::from_usd(usd)
                .ok_or_else(|| anyhow::anyhow!("--budget-usd must be a non-negative amount"))
        })
        .transpose()?;
    let new = store::keys::NewKey {
        name: args.name.clone(),
        rpm_limit: to_i32(args.rpm, "rpm")?,
        tpm_limit: to_i32(args.tpm, "tpm")?,
        max_in_flight: to_i32(args.max_in_flight, "max-in-flight")?,
        budget,
        budget_period: match args.budget_period.as_deref() {
            Some("daily") => Some(BudgetPeriod::Daily),
            Some("monthly") => Some(BudgetPeriod::Monthly),
            _ => None,
        },
        allowed_models: args.models.clone(),
        expires_at: args
            .expires_in_days
            .map(|days| chrono::Utc::now() + chrono::Duration::days(days.into())),
    };
    let (id, secret) = store::keys::create(pool, &new).await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": id, "name": args.name, "key": secret, "rpm": new.rpm_limit,
                "tpm": new.tpm_limit, "budget_period": new.budget_period,
                "expires_at": new.expires_at,
                "max_in_flight": new.max_in_flight,
                "budget_usd": budget.map(|b| b.as_usd_string()), "models": args.models,
            })
        );
    } else {
        println!("created key {:?} (id {id})", args.name);
        println!("{secret}");
    }
    Ok(())
}

async fn set_limits(pool: &sqlx::PgPool, args: SetLimits) -> anyhow::Result<()> {
    let count = |limit: Option<Limit<u32>>, what: &str| -> anyhow::Result<Option<Option<i32>>> {
        limit
            .map(|l| {
                l.into_option()
                    .map(|n| {
                        i32::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                            anyhow::anyhow!("--{what} must be between 1 and {}, or none", i32::MAX)
                        })
                    })
                    .transpose()
            })
            .transpose()
    };
    let change = store::keys::KeyChange {
        name: args.name,
        rpm_limit: count(args.rpm, "rpm")?,
        tpm_limit: count(args.tpm, "tpm")?,
        max_in_flight: count(args.max_in_flight, "max-in-flight")?,
        budget: args
            .budget_usd
            .map(|l| {
                l.into_option()
                    .map(|usd| {
                        MicroUsd::from_usd(usd).ok_or_else(|| {
                            anyhow::anyhow!("--budget-usd must be a non-negative amount, or none")
                        })
                    })
                    .transpose()
            })
            .transpose()?,
        budget_period: args.budget_period.map(Limit::into_option),
        allowed_models: args.models.map(|l| {
            l.into_option()
                .map(|m| m.split(',').map(str::trim).map(str::to_owned).collect())
        }),
        expires_at: args.expires_in_days.map(|l| {
            l.into_option()
                .map(|days| chrono::Utc::now() + chrono::Duration::days(days.into()))
        }),
    };
    match store::keys::update(pool, args.key, &change).await? {
        Some(key) => println!("{}", serde_json::to_string(&key)?),
        None => anyhow::bail!("no live key with id {}", args.key),
    }
    Ok(())
}
