//! `fanout status`: the queue per lane, the shared budget per (key, model family) and the webhook
//! outbox, read from Redis in one go.

use std::process::ExitCode;
use std::sync::Arc;

use fanout_core::Config;

pub(crate) async fn status(config: Arc<Config>) -> anyhow::Result<ExitCode> {
    let pool = fanout_worker::redis_pool(&config)?;
    let ns = &config.redis.namespace;
    let queue = fanout_queue::Queue::new(pool.clone(), ns, config.queue.clone());
    let key_names: Vec<String> = config
        .provider
        .keys
        .iter()
        .map(|k| k.name.clone())
        .collect();
    let budget =
        fanout_ratelimit::Budget::new(pool.clone(), ns, config.budget.clone(), key_names.clone());
    budget.track(&config.provider.default_model);
    let store = fanout_aggregator::Store::from_config(pool, &config);
    let lanes = queue.depth().await?;
    println!(
        "{:<12} {:>7} {:>9} {:>8} {:>6} {:>7}  OLDEST READY",
        "LANE", "READY", "IN FLIGHT", "DELAYED", "DEAD", "LAG"
    );
    for l in &lanes {
        println!(
            "{:<12} {:>7} {:>9} {:>8} {:>6} {:>7}  {}",
            l.lane.to_string(),
            l.ready,
            l.pending,
            l.delayed,
            l.dead,
            l.lag.map_or("?".to_owned(), |v| v.to_string()),
            l.oldest_ready_age
                .map_or("-".to_owned(), |a| format!("{:.1} s", a.as_secs_f64()))
        );
    }

    println!();
    println!(
        "{:<24} {:>18} {:>22} {:>8} {:>8} {:>9}  PAUSED",
        "BUDGET (key/family)",
        "RPM now (config)",
        "TPM now (config)",
        "LEARNT",
        "WAITERS",
        "IN FLIGHT"
    );
    if key_names.is_empty() {
        println!(
            "(no API key configured here: the budget is listed per key name, as the workers see them)"
        );
    }
    for b in budget.snapshot().await? {
        let learnt = match (b.learnt_requests_per_minute, b.learnt_tokens_per_minute) {
            (None, None) => "no",
            _ => "yes",
        };
        println!(
            "{:<24} {:>18} {:>22} {:>8} {:>8} {:>9}  {}",
            format!("{}/{}", b.key, b.family),
            format!(
                "{:.0} ({})",
                b.requests_per_minute, b.configured_requests_per_minute
            ),
            format!(
                "{:.0} ({})",
                b.tokens_per_minute, b.configured_tokens_per_minute
            ),
            learnt,
            b.waiters,
            format!("{}/{}", b.leases_in_use, b.max_concurrent_requests),
            b.paused_for
                .map_or("-".to_owned(), |p| format!("{:.1} s", p.as_secs_f64()))
        );
    }

    let webhooks = fanout_aggregator::webhook::Webhooks::new(
        fanout_aggregator::webhook::WebhookOptions::default(),
        &store,
    )?;
    println!();
    println!(
        "webhooks: {} in the outbox, {} dead (fanout webhooks dead)",
        webhooks.pending().await?,
        webhooks.dead(10_000).await?.len()
    );
    Ok(ExitCode::SUCCESS)
}
