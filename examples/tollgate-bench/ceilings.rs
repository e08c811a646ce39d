//! The ceilings tollgate's figures are held against, measured on the same machine in the same run:
//!
//! - pgbench running tollgate's admission statement, [`ADMIT_SQL`] itself with its parameters
//!   replaced by pgbench expressions (so the ceiling cannot drift from the real statement), with
//!   the token estimate, reservation and request hash tollgate computes for the load's request
//!   body — over the load's keys, then on one hot key;
//! - RabbitMQ publishing with confirms, persistent messages the size of a job message to a
//!   quorum queue of its own, many publishes in flight on one channel, as the front publishes.

use std::{sync::Arc, time::Instant};

use anyhow::{bail, Context};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, ConnectionProperties,
};
use sha2::{Digest, Sha256};
use tollgate::{
    admission::{self, ADMIT_SQL},
    ids::JobId,
    queue::JobMessage,
    request::CreateResponse,
    tokens,
};

use crate::{
    env::{self, Env, Registry, MODEL},
    load,
    report::{Figures, Pgbench},
    Settings,
};

pub async fn run(
    settings: &Arc<Settings>,
    registry: &Registry,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    env::phase(
        settings,
        registry,
        "ceilings",
        |_| {},
        figures,
        async |env, figures| measure(settings, env, figures).await,
    )
    .await
}

async fn measure(settings: &Settings, env: &mut Env, figures: &mut Figures) -> anyhow::Result<()> {
    env.migrate().await?;
    // Keys 0..keys carry the spread load; key `keys` is the hot one.
    env.create_keys(settings.keys + 1).await?;
    let mut pg = env.pg().await?;
    sqlx::query("CREATE TABLE public.bench_keys (n integer PRIMARY KEY, key_id uuid NOT NULL)")
        .execute(&mut pg)
        .await?;
    for (n, key) in env.keys.iter().enumerate() {
        sqlx::query("INSERT INTO public.bench_keys VALUES ($1, $2)")
            .bind(n as i32)
            .bind(key.id)
            .execute(&mut pg)
            .await?;
    }
    drop(pg);

    let statement = admit_statement(env)?;
    println!(
        "pgbench: -c {} -j 2 -T {:.0} -M prepared, one statement: {}…",
        settings.concurrency,
        settings.seconds.as_secs_f64(),
        statement.chars().take(140).collect::<String>()
    );
    let spread = format!("\\set k random(0, {})\n{statement};\n", settings.keys - 1);
    let hot = format!("\\set k {}\n{statement};\n", settings.keys);
    let result = pgbench(settings, env, "spread", &spread).await?;
    println!(
        "  {} keys:  {:>8.0} tx/s, latency average {:.2} ms",
        settings.keys, result.tps, result.latency_ms
    );
    figures.pg_spread = Some(result);
    let result = pgbench(settings, env, "hot", &hot).await?;
    println!(
        "  1 hot key: {:>8.0} tx/s, latency average {:.2} ms",
        result.tps, result.latency_ms
    );
    figures.pg_hot = Some(result);

    let (rate, bytes) = amqp_publish(settings, env).await?;
    println!("  RabbitMQ: {rate:>8.0} msg/s ({bytes} B, publisher confirms)");
    figures.amqp_rate = Some(rate);
    figures.amqp_bytes = bytes;
    Ok(())
}

/// [`ADMIT_SQL`] with each parameter replaced by what the load's requests bind, computed with
/// tollgate's own code: key id (from `:k`), estimated tokens, reservation, model, no model
/// limits, no Idempotency-Key, the request's hash, a new job id, the request, no history, no
/// previous response, the outbox payload.
fn admit_statement(env: &Env) -> anyhow::Result<String> {
    let model = env.config.model(MODEL).context("the bench model")?;
    let body = load::request_body(MODEL, 1024);
    let (request, raw) =
        CreateResponse::parse(body.as_bytes()).map_err(|e| anyhow::anyhow!(e.message))?;
    let estimate = tokens::estimate(
        tokens::tokenizer_for(model),
        &request.call_request(model, &[]).as_messages(),
    );
    let reserve = admission::worst_case_cost(model, &request);
    let hash = hex::encode(Sha256::digest(serde_json::to_vec(&raw)?));
    let payload = serde_json::to_string(&JobMessage::new(JobId::new(), MODEL))?;
    // A space after each key's colon: pgbench would take `:true` or `:1` for a variable.
    // (jsonb keeps no whitespace, so the stored value is the same.)
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''").replace("\":", "\": "));
    let values = [
        "(SELECT key_id FROM public.bench_keys WHERE n = :k)".to_string(),
        estimate.tokens.to_string(),
        reserve.0.to_string(),
        quote(MODEL),
        "NULL".into(),
        "NULL".into(),
        "NULL".into(),
        format!("'\\x{hash}'::bytea"),
        "gen_random_uuid()".into(),
        format!("{}::jsonb", quote(&raw.to_string())),
        "NULL".into(),
        "NULL".into(),
        format!("{}::jsonb", quote(&payload)),
    ];
    if ADMIT_SQL.matches('$').count() != values.len() {
        bail!("ADMIT_SQL has not {} parameters: {ADMIT_SQL}", values.len());
    }
    let mut sql = ADMIT_SQL.to_string();
    // From the last, so that `$1` does not match the start of `$13`.
    for (i, value) in values.iter().enumerate().rev() {
        let placeholder = format!("${}", i + 1);
        if !sql.contains(&placeholder) {
            bail!("ADMIT_SQL has no {placeholder}: {ADMIT_SQL}");
        }
        sql = sql.replace(&placeholder, value);
    }
    Ok(sql)
}

async fn pgbench(
    settings: &Settings,
    env: &Env,
    name: &str,
    script: &str,
) -> anyhow::Result<Pgbench> {
    let path = std::env::temp_dir().join(format!("tollgate-bench-{}-{name}.sql", env.id));
    std::fs::write(&path, script)?;
    let output = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &settings.concurrency.to_string(),
            "-j",
            &settings.concurrency.min(2).to_string(),
            "-T",
            &settings.seconds.as_secs_f64().round().max(1.0).to_string(),
            "-f",
        ])
        .arg(&path)
        .arg(&env.db_url)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run pgbench")?;
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let failed = field("number of failed transactions:").unwrap_or(0.0);
    match (
        output.status.success(),
        field("tps ="),
        field("latency average ="),
    ) {
        (true, Some(tps), Some(latency_ms)) if failed == 0.0 => Ok(Pgbench { tps, latency_ms }),
        _ => bail!(
            "pgbench ({name}) failed ({}):\n{stdout}\n{}",
            output.status,
            stderr.lines().take(20).collect::<Vec<_>>().join("\n")
        ),
    }
}

/// Publishes job-sized messages with confirms, `settings.concurrency` in flight on one channel,
/// for a warm-up second and then `settings.amqp_seconds`; returns msg/s and the message size.
async fn amqp_publish(settings: &Settings, env: &Env) -> anyhow::Result<(f64, usize)> {
    let conn = lapin::Connection::connect(
        &settings.amqp_url,
        ConnectionProperties::default().with_connection_name("tollgate-bench-ceiling".into()),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("tollgate.bench-ceiling.{}", env.id);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    let message = JobMessage::new(JobId::new(), MODEL);
    let body = serde_json::to_vec(&message)?;
    let bytes = body.len();
    let start = Instant::now() + std::time::Duration::from_secs(1);
    let end = start + settings.amqp_seconds;
    let publishers: Vec<_> = (0..settings.concurrency)
        .map(|_| {
            let channel = channel.clone();
            let queue = queue.clone();
            let body = body.clone();
            let id = message.job_id.clone();
            tokio::spawn(async move {
                let mut confirmed = 0u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let properties = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into())
                        .with_message_id(id.as_str().into())
                        .with_type("tollgate.job".into());
                    let confirmation = channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            &body,
                            properties,
                        )
                        .await?
                        .await?;
                    if confirmation.is_nack() {
                        bail!("RabbitMQ nacked a message");
                    }
                    if sent >= start {
                        confirmed += 1;
                    }
                }
                Ok::<_, anyhow::Error>(confirmed)
            })
        })
        .collect();
    let mut total = 0;
    for publisher in publishers {
        total += publisher.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "measured".into()).await;
    Ok((total as f64 / elapsed, bytes))
}
