//! Submissions to `tollgate serve` alone (no worker, so nothing but admission and publishing
//! runs): background requests of about 1 KB at full speed from kept-alive connections, spread
//! over the keys, then all on one hot key.

use std::sync::Arc;

use crate::{
    env::{self, Env, Registry, Role, MODEL},
    load::{self, LoadOutcome},
    report::{Figures, Submit},
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
        "submit",
        |_| {},
        figures,
        async |env, figures| measure(settings, env, figures).await,
    )
    .await
}

async fn measure(settings: &Settings, env: &mut Env, figures: &mut Figures) -> anyhow::Result<()> {
    env.migrate().await?;
    env.create_keys(settings.keys + 1).await?;
    env.start(Role::Serve).await?;
    let body = load::request_body(MODEL, 1024);
    println!(
        "POST /v1/responses, {} B body, {} connections, {:.0} s warm-up + {:.0} s",
        body.len(),
        settings.concurrency,
        settings.warmup.as_secs_f64(),
        settings.seconds.as_secs_f64()
    );
    for (label, secrets) in [
        (
            format!("{} keys", settings.keys),
            env.secrets(0..settings.keys),
        ),
        (
            "1 hot key".to_string(),
            env.secrets(settings.keys..settings.keys + 1),
        ),
    ] {
        let outcome = load::submit_for(
            &env.base_url,
            &secrets,
            &body,
            settings.concurrency,
            settings.warmup,
            settings.seconds,
        )
        .await?;
        println!(
            "  {label}: {:.0}/s, {} ok, {} non-2xx",
            outcome.rate,
            outcome.ok,
            outcome.failed()
        );
        outcome.print_failures();
        let submit = summary(&outcome);
        if label.contains("hot") {
            figures.submit_hot = Some(submit);
        } else {
            figures.submit_spread = Some(submit);
        }
    }
    Ok(())
}

pub fn summary(outcome: &LoadOutcome) -> Submit {
    let l = &outcome.latencies;
    Submit {
        rate: outcome.rate,
        ok: outcome.ok,
        failed: outcome.failed(),
        p50: l.pct(0.50),
        p90: l.pct(0.90),
        p99: l.pct(0.99),
        max: l.max(),
    }
}
