//! `fanout bench`: the numbers DESIGN.md aims for, measured side by side in one run on the
//! simulated provider. It reports; it never passes or fails on time.
//!
//! 1. Report scheduling: the startup report's wall time against its critical path (the longest
//!    chain of measured section durations), against a sequential run (one job at a time) and
//!    against "core, then enhancements in parallel" (the old tool's plan) — same latencies.
//! 2. Shared budget (`bench_budget`): a matrix of the provider's enforcement shape × worker
//!    processes × the limit that binds × what the budget was told: 429s, 429s per success, the
//!    share of the real limit used while there is a backlog, and how soon the 429s stop.
//! 3. Worker memory: the resident memory of one `fanout worker` idle and with `--in-flight`
//!    provider calls in flight.
//! 4. Redis load (`bench_load`): commands and CPU per server (each master of a Redis Cluster)
//!    while worker processes run at a plan's full rate.
//!
//! It starts a private redis-server, or runs against `--redis-url` (one server or a cluster).
//!
//! The output is markdown; `scripts/bench.sh` writes each part into BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fanout_aggregator::{AggregatorOptions, ReportView, Store};
use fanout_core::{Config, Template};
use fanout_producer::{Producer, SubmitRequest, Templates};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::local_redis::LocalRedis;

const STARTUP_INPUTS: &str = include_str!("../../../config/examples/startup-report.json");
const PANEL_INPUTS: &str = include_str!("../../../config/examples/persona-panel.json");
const CORE: &[&str] = &["profile", "research", "recommendations"];

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Simulated provider time per real second (0.02: a 30 s call takes 0.6 s).
    #[arg(long, default_value_t = 0.02)]
    time_scale: f64,
    /// Repetitions of each report variant (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    budget: crate::bench_budget::BudgetArgs,
    /// Calls in flight in the worker-memory benchmark.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    #[command(flatten)]
    load: crate::bench_load::LoadArgs,
    /// Run only this part: reports, budget, memory or load.
    #[arg(long, value_parser = ["reports", "budget", "memory", "load"])]
    only: Option<String>,
    /// Run against this Redis (`redis://…`, or `redis-cluster://…` for a Redis Cluster) instead
    /// of a private redis-server. Every run has a namespace of its own; its keys stay behind.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
}

pub(crate) async fn run(args: BenchArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    // Kept alive (and killed on drop) only when we started it.
    let (_local, url) = match &args.redis_url {
        Some(url) => (None, url.clone()),
        None => {
            let local = LocalRedis::start().await?;
            let url = local.url();
            (Some(local), url)
        }
    };
    println!("# fanout bench\n");
    let part = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    if part("reports") {
        reports(&args, &url, &shutdown).await?;
    }
    if part("budget") {
        crate::bench_budget::run(&args.budget, &url, &shutdown).await?;
    }
    if part("memory") {
        memory(&args, &url, &shutdown).await?;
    }
    if part("load") {
        crate::bench_load::run(&args.load, &url, &shutdown).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Config for an in-process or child run against `sim_url`.
pub(crate) fn env_for(
    redis_url: &str,
    sim_url: &str,
    namespace: &str,
    rpm: u64,
) -> HashMap<String, String> {
    [
        ("REDIS_URL", redis_url),
        ("OPENAI_BASE_URL", sim_url),
        ("OPENAI_API_KEY", "sk-bench-000000000000"),
        ("REQUESTS_PER_MINUTE", &rpm.to_string()),
        ("TOKENS_PER_MINUTE", "100000000"),
        ("MAX_CONCURRENT_REQUESTS", "200"),
        ("FANOUT_REDIS__NAMESPACE", namespace),
        ("FANOUT_LOG__LEVEL", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn reports(
    args: &BenchArgs,
    redis_url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // Deterministic latencies (no spread) so the variants see the same calls.
    let mut sim_config = fanout_sim::SimConfig {
        time_scale: args.time_scale,
        seed: 1,
        ..fanout_sim::SimConfig::default()
    };
    for m in &mut sim_config.models {
        m.spread = 0.0;
    }
    let sim = fanout_sim::spawn(sim_config).await?;
    let startup = Templates::builtin().resolve("startup-report")?;
    let core_first = core_then_enhancements(&startup);
    let startup_inputs: serde_json::Value = serde_json::from_str(STARTUP_INPUTS)?;
    let panel_inputs: serde_json::Value = serde_json::from_str(PANEL_INPUTS)?;

    println!(
        "## Report scheduling (simulated provider, time scale {}, median of {} runs)\n",
        args.time_scale, args.runs
    );
    println!(
        "| report | variant | wall time | critical path | wall / critical path | speed-up vs sequential |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut handoffs: Vec<u64> = Vec::new();
    for (name, template, inputs) in [
        ("startup-report", (*startup).clone(), &startup_inputs),
        (
            "persona-panel (20)",
            (*Templates::builtin().resolve("persona-panel")?).clone(),
            &panel_inputs,
        ),
    ] {
        let mut variants: Vec<(&str, Template, usize)> = vec![("sequential", template.clone(), 1)];
        if name == "startup-report" {
            variants.push((
                "core, then enhancements in parallel",
                core_first.clone(),
                32,
            ));
        }
        variants.push(("fanout (dependency-aware)", template.clone(), 32));
        let mut sequential_ms = None;
        for (variant, t, concurrency) in variants {
            let dag = variant.starts_with("fanout");
            let mut walls = Vec::new();
            let mut paths = Vec::new();
            for run in 0..args.runs {
                let ns = format!("bench-{}-{run}-{}", variant.len(), uuid_like());
                let mut env = env_for(redis_url, &sim.base_url(), &ns, 100_000);
                // Each run has a namespace of its own, so a budget that learns the provider's
                // limits would start every run cold: its first call a probe the others wait
                // for (one call's latency, which a running deployment pays once per key and
                // hour). Told the limits instead, every run starts as a warm deployment does.
                env.insert("FANOUT_BUDGET__LEARN_LIMITS".into(), "false".into());
                let view =
                    run_report(env, t.clone(), inputs.clone(), concurrency, shutdown).await?;
                anyhow::ensure!(view.status.is_terminal(), "report did not finish");
                walls.push(view.totals.wall_ms);
                paths.push(critical_path_ms(&t, &view));
                if dag {
                    handoffs.extend(handoff_ms(&t, &view));
                }
            }
            let wall = median(&mut walls);
            let path = median(&mut paths);
            let seq = *sequential_ms.get_or_insert(wall);
            println!(
                "| {name} | {variant} | {:.2} s | {:.2} s | {:.3} | {:.2}× |",
                wall as f64 / 1000.0,
                path as f64 / 1000.0,
                wall as f64 / path.max(1) as f64,
                seq as f64 / wall.max(1) as f64
            );
        }
    }
    handoffs.sort_unstable();
    let pct = |p: f64| handoffs[((handoffs.len() - 1) as f64 * p).round() as usize];
    if !handoffs.is_empty() {
        println!(
            "\nDependency hand-off (a dependent starts after its last input finished; {} samples, ms resolution): p50 {} ms, p99 {} ms, max {} ms.",
            handoffs.len(),
            pct(0.5),
            pct(0.99),
            handoffs[handoffs.len() - 1]
        );
    }
    println!(
        "\nCritical path: the longest dependency chain of measured section durations (start to finish) in that run; sequential runs one job at a time.\n"
    );
    let _ = sim.shutdown().await;
    Ok(())
}

pub(crate) fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    )
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The old tool's plan: the core chain first, every enhancement after it, in parallel.
fn core_then_enhancements(t: &Template) -> Template {
    let mut t = t.clone();
    for s in &mut t.sections {
        if !CORE.contains(&s.id.as_str()) && s.depends_on.is_empty() {
            s.depends_on.push("recommendations".into());
        }
    }
    t
}

/// Longest chain of measured job durations through the job graph (ms).
fn critical_path_ms(t: &Template, view: &ReportView) -> u64 {
    let inputs = serde_json::Value::Null;
    let _ = inputs;
    let mut finish: BTreeMap<&str, u64> = BTreeMap::new();
    let duration = |s: &fanout_aggregator::SectionView| match (s.started_at, s.finished_at) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    // Sections are in template order, which is a topological order.
    let mut best = 0;
    for s in &view.sections {
        let deps = t
            .section(&s.section)
            .map(|x| x.depends_on.clone())
            .unwrap_or_default();
        let start = view
            .sections
            .iter()
            .filter(|d| deps.contains(&d.section))
            .filter_map(|d| finish.get(d.job_id.as_str()).copied())
            .max()
            .unwrap_or(0);
        let end = start + duration(s);
        finish.insert(&s.job_id, end);
        best = best.max(end);
    }
    best
}

/// For every job with dependencies: its start minus the finish of its last input (ms).
fn handoff_ms(t: &Template, view: &ReportView) -> Vec<u64> {
    view.sections
        .iter()
        .filter_map(|s| {
            let deps = &t.section(&s.section)?.depends_on;
            let ready = view
                .sections
                .iter()
                .filter(|d| deps.contains(&d.section))
                .filter_map(|d| d.finished_at)
                .max()?;
            Some(s.started_at?.saturating_sub(ready))
        })
        .collect()
}

async fn run_report(
    env: HashMap<String, String>,
    template: Template,
    inputs: serde_json::Value,
    concurrency: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<ReportView> {
    let config = Arc::new(Config::load(None, &env)?);
    let pool = fanout_worker::redis_pool(&config)?;
    let store = Store::from_config(pool.clone(), &config);
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    {
        let (config, stop) = (config.clone(), stop.clone());
        tasks.spawn(async move {
            let options = fanout_worker::WorkerOptions {
                concurrency,
                grace: Duration::from_secs(5),
            };
            if let Err(e) = fanout_worker::run(config, options, stop).await {
                tracing::error!(error = %e, "bench worker failed");
            }
        });
    }
    {
        let (store, stop) = (store.clone(), stop.clone());
        tasks.spawn(async move {
            let _ = fanout_aggregator::run(store, AggregatorOptions::default(), stop).await;
        });
    }
    tasks.close();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("{}.toml", template.name));
    // The variant travels as a template file, like a user's own template would.
    std::fs::write(&path, template_toml(&template)?)?;
    let producer = Producer::new(
        store.clone(),
        fanout_queue::Queue::from_config(pool, &config),
        Templates::builtin(),
    );
    let submitted = producer
        .submit(
            "default",
            SubmitRequest {
                template: path.display().to_string(),
                inputs,
                lane: None,
                idempotency_key: None,
                callback_url: None,
                batch_api: None,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let view = crate::report_cmds::wait_final(&store, &submitted.report_id).await?;
    stop.cancel();
    tasks.wait().await;
    Ok(view)
}

fn template_toml(t: &Template) -> anyhow::Result<String> {
    toml::to_string(t).context("serialize template")
}

/// Resident memory of one `fanout worker` process holding `--in-flight` provider calls.
async fn memory(
    args: &BenchArgs,
    redis_url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // Calls of ~3 s (a 650-token answer at time scale 0.2), so they pile up in flight.
    let sim = fanout_sim::spawn(fanout_sim::SimConfig {
        time_scale: 0.2,
        seed: 3,
        ..fanout_sim::SimConfig::default()
    })
    .await?;
    let ns = format!("bench-memory-{}", uuid_like());
    let mut env = env_for(redis_url, &sim.base_url(), &ns, 10_000_000);
    env.insert(
        "MAX_CONCURRENT_REQUESTS".into(),
        (args.in_flight * 2).to_string(),
    );
    env.insert("FANOUT_REDIS__POOL_SIZE".into(), "64".into());
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let concurrency = args.in_flight.to_string();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut child = spawn_worker(
        &env,
        &["--concurrency", &concurrency, "--metrics-addr", &metrics],
    )?;
    let pid = child.id().context("worker pid")?;
    let (store, producer) = producer_for(&env)?;
    // Idle once the worker is up (its tokenizer built: on a busy machine that takes longer than
    // the fixed pause alone, and the build's transient tables would count as idle).
    let ready_by = Instant::now() + Duration::from_secs(30);
    while scrape_gauge(metrics_port, "fanout_worker_up").await != Some(1.0)
        && Instant::now() < ready_by
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss = {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_kib(pid).unwrap_or(0)
    };
    let ids = submit_persona_backlog(&producer, args.in_flight, None).await?;
    let (mut peak_rss, mut peak_in_flight) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_flight = scrape_gauge(metrics_port, "fanout_jobs_in_flight")
            .await
            .unwrap_or(0.0) as u64;
        let rss = rss_kib(pid).unwrap_or(0);
        if in_flight >= peak_in_flight {
            peak_in_flight = in_flight;
            peak_rss = peak_rss.max(rss);
        }
        let mut done = true;
        for id in &ids {
            done &= store.status(id).await?.is_some_and(|s| s.is_terminal());
        }
        if done || Instant::now() > deadline || shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = sim.shutdown().await;
    println!(
        "## Worker memory (one `fanout worker --concurrency {}`)\n",
        args.in_flight
    );
    println!("| provider calls in flight (peak) | RSS idle | RSS at peak in flight |");
    println!("| --- | --- | --- |");
    println!(
        "| {} | {:.1} MiB | {:.1} MiB |\n",
        peak_in_flight,
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    if peak_in_flight > 0 {
        println!(
            "Each call in flight adds about {:.0} KiB ((RSS at peak − RSS idle) / calls in flight).\n",
            peak_rss.saturating_sub(idle_rss) as f64 / peak_in_flight as f64
        );
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One unlabelled gauge from a process's `/metrics`.
async fn scrape_gauge(port: u16, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

/// A `fanout worker` child process with exactly `env` (plus PATH and, to experiment with the
/// allocator, MALLOC_ARENA_MAX); killed when dropped.
pub(crate) fn spawn_worker(
    env: &HashMap<String, String>,
    args: &[&str],
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(std::env::current_exe()?)
        .args(["worker", "--grace", "5"])
        .args(args)
        .env_clear()
        .envs(env)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(
            std::env::var("MALLOC_ARENA_MAX")
                .ok()
                .map(|v| ("MALLOC_ARENA_MAX", v)),
        )
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start a worker process")
}

/// The report store and a producer on `env`'s Redis and namespace.
pub(crate) fn producer_for(env: &HashMap<String, String>) -> anyhow::Result<(Store, Producer)> {
    let config = Config::load(None, env)?;
    let pool = fanout_worker::redis_pool(&config)?;
    let store = Store::from_config(pool.clone(), &config);
    let queue = fanout_queue::Queue::from_config(pool, &config);
    Ok((
        store.clone(),
        Producer::new(store, queue, Templates::builtin()),
    ))
}

/// A backlog of `calls` persona critiques, as panels of up to 100 personas; the report ids.
pub(crate) async fn submit_persona_backlog(
    producer: &Producer,
    calls: usize,
    lane: Option<fanout_core::Lane>,
) -> anyhow::Result<Vec<String>> {
    let persona = serde_json::json!({"name": "Bench persona", "description": "A careful buyer."});
    let mut ids = Vec::new();
    let mut left = calls;
    while left > 0 {
        let n = left.min(100);
        left -= n;
        let inputs = serde_json::json!({
            "content": "A short landing page for a kitchen stock tracker.",
            "personas": vec![persona.clone(); n],
        });
        let request = SubmitRequest {
            template: "persona-panel".into(),
            inputs,
            lane,
            idempotency_key: None,
            callback_url: None,
            batch_api: None,
        };
        let submitted = producer
            .submit("default", request)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ids.push(submitted.report_id);
    }
    Ok(ids)
}
