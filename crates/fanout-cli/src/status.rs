//! `fanout status`, `fanout dead`, `fanout webhooks`: what an operator looks at and acts on,
//! locally over Redis or through the API's admin routes (`--api`), with the same output.

use std::process::ExitCode;
use std::time::Duration;

use fanout_producer::api::WebhookSelection;
use fanout_producer::ops::{
    DeadLetterInfo, DeadLetterSelection, DeadWebhookInfo, Resolution, ResolutionOutcome,
    SystemStatus,
};

use crate::backend::{Backend, local_actor, remote_error};

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// Refresh every 2 seconds until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print the status as JSON (the body of `GET /v1/status`).
    #[arg(long, conflicts_with = "watch")]
    json: bool,
}

pub(crate) async fn status(backend: &Backend, args: StatusArgs) -> anyhow::Result<ExitCode> {
    loop {
        let s = fetch_status(backend).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
            return Ok(ExitCode::SUCCESS);
        }
        if args.watch {
            // Clear the screen and home the cursor, like watch(1).
            print!("\x1b[2J\x1b[H");
        }
        print_status(&s);
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn fetch_status(backend: &Backend) -> anyhow::Result<SystemStatus> {
    match backend {
        Backend::Local(local) => Ok(local.ops()?.status().await?),
        Backend::Remote(client) => client.status().await.map_err(remote_error),
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

fn print_status(s: &SystemStatus) {
    for w in &s.warnings {
        println!("WARNING: {w}\n");
    }
    println!(
        "{:<12} {:>7} {:>9} {:>8} {:>6} {:>7}  OLDEST READY",
        "LANE", "READY", "IN FLIGHT", "DELAYED", "DEAD", "LAG"
    );
    for l in &s.lanes {
        println!(
            "{:<12} {:>7} {:>9} {:>8} {:>6} {:>7}  {}",
            l.lane,
            l.ready,
            l.in_flight,
            l.delayed,
            l.dead,
            l.lag.map_or("?".to_owned(), |v| v.to_string()),
            l.oldest_ready_ms.map_or("-".to_owned(), secs)
        );
    }

    println!();
    println!(
        "{:<40} {:<10} {:>8} {:>11} {:>10}  STARTED",
        "WORKER", "VERSION", "IN FLIGHT", "CONCURRENCY", "LAST SEEN"
    );
    if s.workers.is_empty() {
        println!("(no worker alive)");
    }
    let now = now_ms();
    for w in &s.workers {
        println!(
            "{:<40} {:<10} {:>8} {:>11} {:>10}  {}",
            w.id,
            w.version,
            w.in_flight,
            w.concurrency,
            format!("{} ago", secs(now.saturating_sub(w.last_seen_ms))),
            fanout_aggregator::format_time(w.started_at_ms)
        );
    }

    println!();
    println!(
        "{:<24} {:>16} {:>18} {:>12} {:>14} {:>7} {:>8} {:>9}  PAUSED",
        "BUDGET (key/family)",
        "RPM now (config)",
        "TPM now (config)",
        "REQS LAST 60S",
        "TOKENS LAST 60S",
        "LEARNT",
        "WAITERS",
        "IN FLIGHT"
    );
    if s.budget.is_empty() {
        println!("(no budget in use yet: it appears with the first provider call)");
    }
    for b in &s.budget {
        let learnt = match (b.learnt_requests_per_minute, b.learnt_tokens_per_minute) {
            (None, None) => "no",
            _ => "yes",
        };
        println!(
            "{:<24} {:>16} {:>18} {:>12.0} {:>14.0} {:>7} {:>8} {:>9}  {}",
            format!("{}/{}", b.key, b.family),
            format!(
                "{:.0} ({})",
                b.requests_per_minute, b.configured_requests_per_minute
            ),
            format!(
                "{:.0} ({})",
                b.tokens_per_minute, b.configured_tokens_per_minute
            ),
            b.requests_last_minute,
            b.tokens_last_minute,
            learnt,
            b.waiters,
            format!("{}/{}", b.in_flight, b.max_concurrent_requests),
            b.paused_for_ms.map_or("-".to_owned(), secs)
        );
    }
    println!();
    println!(
        "webhooks: {} in the outbox, {} dead (fanout webhooks dead)",
        s.webhooks.pending, s.webhooks.dead
    );
    let b = &s.batch_api;
    println!(
        "batch API: {} sections waiting for a batch, {} in {} open batches ({} enqueued tokens)",
        b.waiting, b.in_batches, b.open_batches, b.enqueued_tokens
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum DeadCommand {
    /// The newest dead-lettered jobs with their reasons.
    #[command(visible_alias = "ls")]
    List {
        /// Only this report's.
        #[arg(long)]
        report: Option<String>,
        /// How many.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
    },
    /// Run dead-lettered jobs again with fresh attempts (their reports reopen if finished).
    Replay(Select),
    /// Delete dead-lettered jobs (their sections stay failed).
    Drop(Select),
}

#[derive(Debug, clap::Args)]
pub(crate) struct Select {
    /// Dead letter ids (`<lane>:<entry>`, as `fanout dead list` prints them).
    #[arg(required_unless_present_any = ["report", "reason", "all"])]
    ids: Vec<String>,
    /// Every dead letter of this report.
    #[arg(long, conflicts_with = "ids")]
    report: Option<String>,
    /// Every dead letter whose reason or last error contains this text.
    #[arg(long, conflicts_with = "ids")]
    reason: Option<String>,
    /// Every dead letter (with --report or --reason: every one that matches).
    #[arg(long, conflicts_with = "ids")]
    all: bool,
}

impl Select {
    fn selection(self) -> DeadLetterSelection {
        DeadLetterSelection {
            ids: self.ids,
            report_id: self.report,
            reason_contains: self.reason,
            all: self.all,
        }
    }
}

pub(crate) async fn dead(backend: &Backend, command: DeadCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadCommand::List { report, limit } => {
            anyhow::ensure!((1..=1000).contains(&limit), "--limit must be 1 to 1000");
            let letters: Vec<DeadLetterInfo> = match backend {
                Backend::Local(local) => {
                    local.ops()?.dead_letters(limit, report.as_deref()).await?
                }
                Backend::Remote(client) => client
                    .dead_letters(limit, report.as_deref())
                    .await
                    .map_err(remote_error)?,
            };
            if letters.is_empty() {
                println!("no dead letters");
            }
            for d in letters {
                println!(
                    "{}  {}  attempts {}  deliveries {}  {}\n    report {}  section {}\n    {}{}",
                    d.id,
                    fanout_aggregator::format_time(d.dead_at),
                    d.attempts,
                    d.deliveries,
                    d.job_id,
                    d.report_id.as_deref().unwrap_or("-"),
                    d.section.as_deref().unwrap_or("-"),
                    d.reason,
                    if d.last_error.is_empty() || d.last_error == d.reason {
                        String::new()
                    } else {
                        format!("\n    last error: {}", d.last_error)
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadCommand::Replay(select) => {
            let explicit = !select.ids.is_empty();
            let sel = select.selection();
            let results = match backend {
                Backend::Local(local) => local.ops()?.replay(&sel, &local_actor()).await?,
                Backend::Remote(client) => client.replay(&sel).await.map_err(remote_error)?,
            };
            Ok(print_resolutions(&results, explicit))
        }
        DeadCommand::Drop(select) => {
            let explicit = !select.ids.is_empty();
            let sel = select.selection();
            let results = match backend {
                Backend::Local(local) => {
                    local.ops()?.drop_dead_letters(&sel, &local_actor()).await?
                }
                Backend::Remote(client) => {
                    client.drop_dead_letters(&sel).await.map_err(remote_error)?
                }
            };
            Ok(print_resolutions(&results, explicit))
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum WebhooksCommand {
    /// The most recent webhooks given up on, newest first, with their reasons.
    Dead {
        /// How many to list.
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
    },
    /// Send reports' webhooks again from their first attempt (a dead one, or one its receiver
    /// lost).
    Redeliver {
        /// Report ids.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        reports: Vec<String>,
        /// Every dead webhook.
        #[arg(long)]
        all_dead: bool,
    },
    /// Forget dead webhooks.
    Drop {
        /// Report ids.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        reports: Vec<String>,
        /// Every dead webhook.
        #[arg(long)]
        all_dead: bool,
    },
}

pub(crate) async fn webhooks(
    backend: &Backend,
    command: WebhooksCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        WebhooksCommand::Dead { count } => {
            anyhow::ensure!((1..=1000).contains(&count), "--count must be 1 to 1000");
            let dead: Vec<DeadWebhookInfo> = match backend {
                Backend::Local(local) => local.ops()?.dead_webhooks(count).await?,
                Backend::Remote(client) => {
                    client.dead_webhooks(count).await.map_err(remote_error)?
                }
            };
            if dead.is_empty() {
                println!("no dead webhooks");
            }
            for d in dead {
                println!(
                    "{}  attempts {}  {}\n    {}",
                    d.report_id, d.attempts, d.url, d.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WebhooksCommand::Redeliver { reports, all_dead } => {
            let results = match backend {
                Backend::Local(local) => {
                    local
                        .ops()?
                        .redeliver_webhooks(&reports, all_dead, &local_actor())
                        .await?
                }
                Backend::Remote(client) => client
                    .redeliver_webhooks(&WebhookSelection {
                        report_ids: reports,
                        all_dead,
                    })
                    .await
                    .map_err(remote_error)?,
            };
            Ok(print_resolutions(&results, !all_dead))
        }
        WebhooksCommand::Drop { reports, all_dead } => {
            let results = match backend {
                Backend::Local(local) => {
                    local
                        .ops()?
                        .drop_webhooks(&reports, all_dead, &local_actor())
                        .await?
                }
                Backend::Remote(client) => client
                    .drop_webhooks(&WebhookSelection {
                        report_ids: reports,
                        all_dead,
                    })
                    .await
                    .map_err(remote_error)?,
            };
            Ok(print_resolutions(&results, !all_dead))
        }
    }
}

/// One line per item; with `explicit` (the items were named), exit 1 when one was not acted
/// on. A selection (`--all`, `--report`) reports what it skipped and succeeds.
fn print_resolutions(results: &[Resolution], explicit: bool) -> ExitCode {
    if results.is_empty() {
        println!("nothing selected");
    }
    let mut failed = false;
    for r in results {
        let what = match r.outcome {
            ResolutionOutcome::Replayed => "replayed",
            ResolutionOutcome::Redelivered => "queued for delivery again",
            ResolutionOutcome::Dropped => "dropped",
            ResolutionOutcome::NotFound => {
                failed = true;
                "not found (replayed or dropped already, or unknown)"
            }
            ResolutionOutcome::Skipped => {
                failed = true;
                "skipped"
            }
        };
        match &r.detail {
            Some(d) => println!("{}: {what}: {d}", r.id),
            None => println!("{}: {what}", r.id),
        }
    }
    if failed && explicit {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
