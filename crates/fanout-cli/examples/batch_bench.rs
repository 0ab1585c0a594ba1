//! A 50-persona panel run live and through the provider's Batch API, side by side on one
//! cluster of real processes (`fanout sim`, 2 `fanout worker`s, a `fanout aggregator`, a
//! private redis-server), three rounds in alternating order: cost and wall time of each.
//!
//! ```text
//! cargo build --release -p fanout-cli --bin fanout
//! cargo run --release -p fanout-cli --example batch_bench
//! ```
//!
//! Time runs on the simulator's clock, scaled by `TIME_SCALE`: a live call takes its modelled
//! latency × scale, a batch `SIM_TURNAROUND` provider-seconds × scale, and the lane's gathering
//! window and poll interval are the defaults (60 s, 30 s) × scale too. Wall times are printed
//! in provider-seconds (real / scale), so they read as they would against a provider whose
//! batches take `SIM_TURNAROUND` seconds. Real batch turnaround varies from minutes to 24 h;
//! the cost ratio does not depend on it. It measures; it does not pass or fail.

use std::path::Path;
use std::time::{Duration, Instant};

use fanout_test_support::{FanoutProcess, RedisServer, free_port, run_fanout, wait_for_port};
use serde_json::Value;

const ROUNDS: usize = 3;
const PERSONAS: usize = 50;
const TIME_SCALE: f64 = 0.01;
/// The simulator's batch turnaround (provider seconds): its default, 10 minutes.
const SIM_TURNAROUND: f64 = 600.0;
/// The account's live limits per provider minute: OpenAI's tier 1 for gpt-4o-mini. The
/// simulator enforces (and advertises) them per real minute, so they are given ÷ scale: the
/// budget then paces live calls as it would against tier 1 in provider time.
const TIER1_RPM: f64 = 500.0;
const TIER1_TPM: f64 = 200_000.0;

fn main() -> anyhow::Result<()> {
    let fanout = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|release| release.join("fanout"))
        .unwrap_or_default();
    anyhow::ensure!(
        fanout.is_file(),
        "{} missing: run `cargo build --release -p fanout-cli --bin fanout`",
        fanout.display()
    );
    fanout_test_support::use_fanout_bin(&fanout.display().to_string());
    let root = fanout_test_support::workspace_root();
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("panel-50.json");
    std::fs::write(&input, panel(&root, PERSONAS)?.to_string())?;
    let input = input.display().to_string();

    let redis = RedisServer::start();
    let sim_port = free_port();
    let listen = format!("127.0.0.1:{sim_port}");
    let scale = TIME_SCALE.to_string();
    let turnaround = SIM_TURNAROUND.to_string();
    let rpm = ((TIER1_RPM / TIME_SCALE) as u64).to_string();
    let tpm = ((TIER1_TPM / TIME_SCALE) as u64).to_string();
    let _sim = FanoutProcess::start(
        "sim",
        &[
            "sim",
            "--listen",
            &listen,
            "--time-scale",
            &scale,
            "--batch-turnaround-secs",
            &turnaround,
            "--rpm",
            &rpm,
            "--tpm",
            &tpm,
        ],
        &[],
    );
    anyhow::ensure!(
        wait_for_port(sim_port, Duration::from_secs(20)),
        "fanout sim did not listen"
    );
    let scaled = |ms: f64| ((ms * TIME_SCALE).round() as u64).max(1).to_string();
    let env: Vec<(String, String)> = [
        ("REDIS_URL", redis.url()),
        ("OPENAI_BASE_URL", format!("http://127.0.0.1:{sim_port}/v1")),
        ("OPENAI_API_KEY", "sk-batch-bench-key-0001".to_owned()),
        ("FANOUT_REDIS__NAMESPACE", "batchbench".to_owned()),
        ("FANOUT_BATCH_API__COLLECT_MS", scaled(60_000.0)),
        ("FANOUT_BATCH_API__POLL_MS", scaled(30_000.0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let _workers: Vec<FanoutProcess> = (0..2)
        .map(|i| {
            FanoutProcess::start(
                &format!("worker-{i}"),
                &["worker", "--concurrency", "50"],
                &env,
            )
        })
        .collect();
    let _aggregator = FanoutProcess::start("aggregator", &["aggregator"], &env);

    println!(
        "### A {PERSONAS}-persona panel, live and through the Batch API\n\n\
         {ROUNDS} rounds, alternating (live first in rounds 1 and 3); simulator time scale \
         {TIME_SCALE}, batch turnaround {SIM_TURNAROUND} provider-s, live limits {TIER1_RPM} \
         RPM and {TIER1_TPM} TPM per provider minute; wall times in provider-seconds (real ÷ \
         scale).\n"
    );
    println!("| round | mode | cost | tokens | wall (provider s) | batches | live calls |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut costs = [Vec::new(), Vec::new()];
    let mut walls = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for mode in order {
            let before = stats(sim_port)?;
            let flag = if mode == 0 { "--live" } else { "--batch-api" };
            let started = Instant::now();
            let (code, out, err) = run_fanout(
                &[
                    "submit",
                    "--template",
                    "persona-panel",
                    "--input",
                    &input,
                    flag,
                    "--wait",
                ],
                &env,
            );
            let wall = started.elapsed().as_secs_f64() / TIME_SCALE;
            anyhow::ensure!(code == 0, "{flag} panel failed: {err}");
            let id = out.lines().next().unwrap_or_default().trim().to_owned();
            let (code, doc, err) = run_fanout(&["report", &id, "--format", "json"], &env);
            anyhow::ensure!(code == 0, "report: {err}");
            let doc: Value = serde_json::from_str(&doc)?;
            let after = stats(sim_port)?;
            let cost = doc["totals"]["cost"].as_f64().unwrap_or(0.0);
            let tokens = doc["totals"]["total_tokens"].as_u64().unwrap_or(0);
            let batches = after["batches"]["created"].as_u64().unwrap_or(0)
                - before["batches"]["created"].as_u64().unwrap_or(0);
            let calls = after["totals"]["requests"].as_u64().unwrap_or(0)
                - before["totals"]["requests"].as_u64().unwrap_or(0);
            println!(
                "| {} | {} | ${cost:.5} | {tokens} | {wall:.0} | {batches} | {calls} |",
                round + 1,
                if mode == 0 { "live" } else { "batch API" },
            );
            costs[mode].push(cost);
            walls[mode].push(wall);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (live_cost, batch_cost) = (median(&mut costs[0]), median(&mut costs[1]));
    let (live_wall, batch_wall) = (median(&mut walls[0]), median(&mut walls[1]));
    println!(
        "\nMedians: cost ${batch_cost:.5} through the Batch API against ${live_cost:.5} live \
         ({:.3}×); wall time {batch_wall:.0} provider-s against {live_wall:.0} ({:.1}×).",
        batch_cost / live_cost,
        batch_wall / live_wall
    );
    Ok(())
}

/// The example panel's inputs with `n` personas (its own, repeated with numbered names).
fn panel(root: &Path, n: usize) -> anyhow::Result<Value> {
    let mut inputs: Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("config/examples/persona-panel.json"),
    )?)?;
    let base = inputs["personas"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(!base.is_empty(), "the example panel has no personas");
    let personas: Vec<Value> = (0..n)
        .map(|i| {
            let mut p = base[i % base.len()].clone();
            let name = p["name"].as_str().unwrap_or("persona").to_owned();
            p["name"] = Value::from(format!("{name} #{i}"));
            p
        })
        .collect();
    inputs["personas"] = Value::from(personas);
    Ok(inputs)
}

fn stats(port: u16) -> anyhow::Result<Value> {
    let (status, body) = fanout_system_tests::http_get(port, "/sim/stats");
    anyhow::ensure!(status == 200, "sim stats: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}
