//! `fanout`: the one binary. Thin by design: parse flags, load config, set up tracing, metrics
//! and signals, then call the owning crate's `run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fanout_core::Config;
use tokio_util::sync::CancellationToken;

mod backend;
mod bench;
mod bench_budget;
mod bench_load;
mod demo;
mod local_redis;
mod ops;
mod report_cmds;
mod status;
mod telemetry;

/// Fanout: LLM report jobs on Redis, run by any number of workers under one shared provider
/// budget.
///
/// Configuration: config/default.toml documents every key; `--config FILE` layers a file over
/// it; `FANOUT_<SECTION>__<KEY>` variables and REDIS_URL, OPENAI_API_KEY, OPENAI_BASE_URL,
/// REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE, MAX_CONCURRENT_REQUESTS override both.
#[derive(Debug, Parser)]
#[command(name = "fanout", version, propagate_version = true)]
struct Cli {
    /// A TOML config file layered over the defaults (see config/default.toml for every key).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    remote: backend::RemoteArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API for backend services (submit, follow, fetch, cancel; /openapi.json).
    Api(ApiArgs),
    /// Run a worker process: claim section jobs, take the shared budget, call the provider.
    Worker(WorkerArgs),
    /// Run an aggregator process: assemble reports as their sections finish.
    Aggregator(AggregatorArgs),
    /// Submit a report from a template and an inputs file; prints the report id.
    Submit(report_cmds::SubmitArgs),
    /// Follow a report live: one progress line per section (per persona).
    Watch(report_cmds::WatchArgs),
    /// Print a report (partial while it runs) as Markdown or JSON.
    Report(report_cmds::ReportArgs),
    /// Cancel a running report: its queued sections are dropped, its lines in the Batch API
    /// lane too (and their batch, when no other report shares it).
    Cancel(report_cmds::CancelArgs),
    /// A tenant's reports, newest first.
    #[command(visible_alias = "ls")]
    Reports(report_cmds::ReportsArgs),
    /// The queue per lane, the workers alive, the shared budget per key and model family, and
    /// the webhook outbox.
    Status(status::StatusArgs),
    /// Dead-lettered jobs: list them, run them again, or drop them.
    #[command(subcommand)]
    Dead(status::DeadCommand),
    /// Dead webhooks: list them, send them again, or drop them.
    #[command(subcommand)]
    Webhooks(status::WebhooksCommand),
    /// Run everything in one process on the simulated provider: a startup report and a
    /// 20-persona panel.
    Demo(demo::DemoArgs),
    /// Measure report scheduling, the shared budget, worker memory and Redis load on the simulated
    /// provider.
    Bench(bench::BenchArgs),
    /// Run the simulated OpenAI-compatible provider (latency model, rate limits, faults).
    Sim(fanout_sim::SimArgs),
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Jobs in flight in this process (default: worker.concurrency, or MAX_CONCURRENT_REQUESTS).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds in-flight jobs get to finish after SIGTERM (default: worker.grace_secs).
    #[arg(long)]
    grace: Option<u64>,
    /// Serve /metrics, /healthz and /readyz here (default: metrics.listen; off when empty).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Address to listen on (default: api.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct AggregatorArgs {
    /// Serve /metrics, /healthz and /readyz here (default: metrics.listen; off when empty).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Arc<Config>> {
    let config = Config::from_env(path)?;
    telemetry::init(&config.log.format, &config.log.level);
    Ok(Arc::new(config))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let mut cli = cli;
    // An empty FANOUT_API or FANOUT_TOKEN (as compose files leave them) means unset.
    cli.remote.api = cli.remote.api.filter(|v| !v.trim().is_empty());
    cli.remote.token = cli.remote.token.filter(|v| !v.trim().is_empty());
    let config_path = cli.config.as_deref();
    let remote_command = matches!(
        cli.command,
        Command::Submit(_)
            | Command::Watch(_)
            | Command::Report(_)
            | Command::Cancel(_)
            | Command::Reports(_)
            | Command::Status(_)
            | Command::Dead(_)
            | Command::Webhooks(_)
    );
    if cli.remote.api.is_some() && !remote_command {
        anyhow::bail!(
            "--api (or FANOUT_API) applies to submit, watch, report, reports, status, dead and webhooks; unset it to run this command"
        );
    }
    match cli.command {
        Command::Sim(args) => {
            telemetry::init_from_env();
            let listen = args.listen;
            let config = args.into_config()?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on --listen {listen}"))?;
            tracing::info!(addr = %listener.local_addr()?, "simulated provider listening");
            fanout_sim::run(listener, config, shutdown).await?;
        }
        Command::Api(args) => {
            let config = load_config(config_path)?;
            let listen = match args.listen {
                Some(a) => a,
                None => config.api.listen.parse()?,
            };
            let state = fanout_producer::api::ApiState::from_config(&config)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            tracing::info!(addr = %listener.local_addr()?, "api listening");
            fanout_producer::api::run(state, listener, shutdown.clone()).await?;
        }
        Command::Worker(args) => {
            let config = load_config(config_path)?;
            let mut options = fanout_worker::WorkerOptions::from_config(&config);
            if let Some(n) = args.concurrency {
                anyhow::ensure!(n > 0, "--concurrency must be at least 1");
                options.concurrency = n;
            }
            if let Some(g) = args.grace {
                options.grace = Duration::from_secs(g);
            }
            // The ops endpoint outlives the drain: metrics and probes keep answering until
            // the last in-flight job is done.
            let ops_stop = CancellationToken::new();
            let ops = serve_ops(&config, args.metrics_addr, &ops_stop)?;
            let result = fanout_worker::run(config, options, shutdown.clone()).await;
            ops_stop.cancel();
            if let Some(ops) = ops {
                ops.await??;
            }
            result?;
        }
        Command::Aggregator(args) => {
            let config = load_config(config_path)?;
            let pool = fanout_worker::redis_pool(&config)?;
            let ops_stop = CancellationToken::new();
            let ops = serve_ops(&config, args.metrics_addr, &ops_stop)?;
            let store = fanout_aggregator::Store::from_config(pool, &config);
            // Reports finished per known template exist at 0 from the start (a template
            // directory the API would refuse leaves the built-in ones).
            let templates = fanout_producer::Templates::load(&config.reports.templates_dir)
                .unwrap_or_else(|_| fanout_producer::Templates::builtin());
            fanout_metrics::METRICS.zero_report_series(
                &templates
                    .names()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            );
            let options = fanout_aggregator::AggregatorOptions {
                on_finished: Some(Arc::new(move |view: fanout_aggregator::ReportView| {
                    let m = &fanout_metrics::METRICS;
                    m.reports_finished
                        .with_label_values(&[view.template.as_str(), view.status.as_str()])
                        .inc();
                    m.report_duration
                        .with_label_values(&[view.template.as_str()])
                        .observe(view.totals.wall_ms as f64 / 1000.0);
                })),
                ..Default::default()
            };
            let webhooks = fanout_aggregator::webhook::WebhookOptions::from_config(
                &config.webhooks,
                &std::env::vars().collect(),
            )
            .map_err(anyhow::Error::msg)?;
            let grace = Duration::from_secs(config.worker.grace_secs);
            let result = fanout_aggregator::webhook::serve(
                store,
                options,
                webhooks,
                grace,
                shutdown.clone(),
            )
            .await;
            ops_stop.cancel();
            if let Some(ops) = ops {
                ops.await??;
            }
            result?;
        }
        Command::Status(args) => {
            return status::status(&backend(&cli.remote, config_path)?, args).await;
        }
        Command::Dead(command) => {
            return status::dead(&backend(&cli.remote, config_path)?, command).await;
        }
        Command::Webhooks(command) => {
            return status::webhooks(&backend(&cli.remote, config_path)?, command).await;
        }
        Command::Reports(args) => {
            return report_cmds::reports(&backend(&cli.remote, config_path)?, args).await;
        }
        Command::Submit(args) => {
            return report_cmds::submit(&backend(&cli.remote, config_path)?, args).await;
        }
        Command::Watch(args) => {
            return report_cmds::watch(&backend(&cli.remote, config_path)?, args).await;
        }
        Command::Report(args) => {
            return report_cmds::report(&backend(&cli.remote, config_path)?, args).await;
        }
        Command::Cancel(args) => {
            return report_cmds::cancel(&backend(&cli.remote, config_path)?, args).await;
        }
        Command::Bench(args) => {
            telemetry::init_from_env_with("warn");
            return bench::run(args, shutdown).await;
        }
        Command::Demo(args) => {
            telemetry::init_from_env_with("warn");
            return demo::run(args, shutdown).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The commands that work over Redis or over the API (`--api`).
fn backend(
    remote: &backend::RemoteArgs,
    config: Option<&std::path::Path>,
) -> anyhow::Result<backend::Backend> {
    if remote.api.is_some() {
        telemetry::init_from_env_with("warn");
    }
    backend::Backend::new(remote, config.map(std::path::Path::to_path_buf))
}

type OpsTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Start the /metrics + health endpoint when an address is configured.
fn serve_ops(
    config: &Config,
    flag: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<OpsTask>> {
    let addr = match flag {
        Some(a) => a,
        None if config.metrics.listen.is_empty() => return Ok(None),
        None => config.metrics.listen.parse()?,
    };
    let pool = fanout_worker::redis_pool(config)?;
    Ok(Some(tokio::spawn(ops::serve(addr, pool, shutdown.clone()))))
}

/// SIGINT or SIGTERM cancels the root token; a second signal exits at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n > 0 {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            }
            tracing::info!("shutdown requested: draining");
            shutdown.cancel();
        }
    });
}
