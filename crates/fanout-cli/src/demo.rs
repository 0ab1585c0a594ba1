//! `fanout demo`: the whole system in one process on the simulated provider — a startup report
//! and a 20-persona panel, with live progress, written to files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fanout_aggregator::{AggregatorOptions, Format, ReportView, Store};
use fanout_core::Config;
use fanout_producer::{Producer, SubmitRequest, Templates};
use indicatif::MultiProgress;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::local_redis::LocalRedis;
use crate::report_cmds::Progress;

const STARTUP_INPUTS: &str = include_str!("../../../config/examples/startup-report.json");
const PANEL_INPUTS: &str = include_str!("../../../config/examples/persona-panel.json");

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Simulated provider time per real second: 0.05 makes a 30 s call take 1.5 s.
    #[arg(long, default_value_t = 0.05)]
    time_scale: f64,
    /// Worker runtimes to start (each like a separate `fanout worker`).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Jobs in flight per worker.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Where the reports are written.
    #[arg(long, default_value = "reports")]
    out: PathBuf,
    /// Use this Redis instead of REDIS_URL or a private redis-server.
    #[arg(long)]
    redis_url: Option<String>,
}

pub(crate) async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.time_scale > 0.0 && args.time_scale <= 10.0,
        "--time-scale must be above 0 and at most 10, got {}",
        args.time_scale
    );
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    // Redis: the one given, REDIS_URL, or a private server that goes away with the demo.
    let mut _local = None;
    let redis_url = match args.redis_url.or_else(|| std::env::var("REDIS_URL").ok()) {
        Some(url) => url,
        None => {
            let local = LocalRedis::start().await?;
            let url = local.url();
            _local = Some(local);
            url
        }
    };
    // The simulator with the old tool's latencies (gpt-4o-mini: ~25 ms per output token).
    let sim = fanout_sim::spawn(fanout_sim::SimConfig {
        time_scale: args.time_scale,
        rpm: 3_500,
        tpm: 2_000_000,
        seed: 7,
        ..fanout_sim::SimConfig::default()
    })
    .await
    .context("start the simulated provider")?;
    let namespace = format!("fanout-demo-{}", std::process::id());
    let env: HashMap<String, String> = [
        ("REDIS_URL", redis_url.as_str()),
        ("OPENAI_BASE_URL", sim.base_url().as_str()),
        ("OPENAI_API_KEY", "sk-demo-0000000000000000"),
        ("REQUESTS_PER_MINUTE", "3500"),
        ("TOKENS_PER_MINUTE", "2000000"),
        ("MAX_CONCURRENT_REQUESTS", "40"),
        ("FANOUT_REDIS__NAMESPACE", namespace.as_str()),
        ("FANOUT_REPORTS__TTL_SECS", "3600"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = Arc::new(Config::load(None, &env)?);
    let pool = fanout_worker::redis_pool(&config)?;
    anyhow::ensure!(
        crate::ops::redis_ready(&pool).await,
        "redis at {} does not answer",
        fanout_core::config::redact_url(&redis_url)
    );
    eprintln!(
        "fanout demo: redis {}, simulated provider {} (time scale {}), {} workers × {} jobs",
        fanout_core::config::redact_url(&redis_url),
        sim.base_url(),
        args.time_scale,
        args.workers,
        args.concurrency
    );

    let tasks = TaskTracker::new();
    let stop = shutdown.child_token();
    for _ in 0..args.workers {
        let (config, stop) = (config.clone(), stop.clone());
        let options = fanout_worker::WorkerOptions {
            concurrency: args.concurrency,
            grace: Duration::from_secs(5),
        };
        tasks.spawn(async move {
            if let Err(e) = fanout_worker::run(config, options, stop).await {
                tracing::error!(error = %e, "worker stopped with an error");
            }
        });
    }
    let store = Store::from_config(pool.clone(), &config);
    {
        let (store, stop) = (store.clone(), stop.clone());
        tasks.spawn(async move {
            if let Err(e) = fanout_aggregator::run(store, AggregatorOptions::default(), stop).await
            {
                tracing::error!(error = %e, "aggregator stopped with an error");
            }
        });
    }
    tasks.close();

    let producer = Producer::new(
        store.clone(),
        fanout_queue::Queue::from_config(pool.clone(), &config),
        Templates::builtin(),
    );
    let started = Instant::now();
    let mut ids = Vec::new();
    for (template, inputs) in [
        ("startup-report", STARTUP_INPUTS),
        ("persona-panel", PANEL_INPUTS),
    ] {
        let submitted = producer
            .submit(
                "default",
                SubmitRequest {
                    template: template.into(),
                    inputs: serde_json::from_str(inputs).expect("embedded examples are JSON"),
                    lane: None,
                    idempotency_key: None,
                    callback_url: None,
                    batch_api: None,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("submit {template}: {e}"))?;
        ids.push(submitted.report_id);
    }

    let views = follow(&store, &ids, &shutdown).await?;
    let elapsed = started.elapsed();
    stop.cancel();
    tasks.wait().await;
    let _ = sim.shutdown().await;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    println!();
    println!("| report | status | sections | wall time | sum of call latencies | speed-up |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut ok = true;
    for view in &views {
        for (format, ext) in [(Format::Markdown, "md"), (Format::Json, "json")] {
            let doc = store.document(&view.id, format).await?.unwrap_or_default();
            let path = args
                .out
                .join(format!("{}-{}.{ext}", view.template, view.id));
            std::fs::write(&path, doc)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let sum_ms: u64 = view.sections.iter().filter_map(|s| s.latency_ms).sum();
        let wall = view.totals.wall_ms.max(1);
        println!(
            "| {} | {} | {}/{} | {:.2}s | {:.2}s | {:.1}× |",
            view.template,
            view.status,
            view.totals.done,
            view.totals.sections,
            wall as f64 / 1000.0,
            sum_ms as f64 / 1000.0,
            sum_ms as f64 / wall as f64
        );
        ok &= view.status == fanout_core::report::ReportStatus::Completed;
    }
    println!();
    println!(
        "reports written to {}/ (Markdown and JSON) in {:.1}s",
        args.out.display(),
        elapsed.as_secs_f64()
    );
    println!(
        "(time scale {}: multiply by {:.0} for the provider's real latencies)",
        args.time_scale,
        1.0 / args.time_scale
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Show progress for every report until all are final.
async fn follow(
    store: &Store,
    ids: &[String],
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<ReportView>> {
    let multi = MultiProgress::new();
    let mut views = Vec::new();
    for id in ids {
        views.push(store.view(id).await?.context("report vanished")?);
    }
    let mut bars: Vec<Progress> = views.iter().map(|v| Progress::new(&multi, v)).collect();
    loop {
        for (bar, view) in bars.iter_mut().zip(&views) {
            bar.update(view);
        }
        if views.iter().all(|v| v.status.is_terminal()) {
            for (bar, view) in bars.iter().zip(&views) {
                bar.finish(view);
            }
            return Ok(views);
        }
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
        for (view, id) in views.iter_mut().zip(ids) {
            *view = store.view(id).await?.context("report vanished")?;
        }
    }
}
