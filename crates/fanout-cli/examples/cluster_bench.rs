//! One redis-server against a local Redis Cluster of 3 masters (no replicas), side by side on
//! this machine, three rounds in alternating order (the single server first in rounds 1 and 3):
//!
//! - no-op jobs/s of the queue: `queue_bench --redis-url` (1 and 2 worker processes);
//! - report wall time: `fanout bench --only reports --runs 1 --redis-url`, the dependency-aware
//!   runs of the startup report and the 20-persona panel;
//! - where Redis's work goes at the largest plan (30,000 requests per minute):
//!   `fanout bench --only load --redis-url`, per server.
//!
//! ```text
//! cargo build --release -p fanout-cli --bin fanout
//! cargo build --release -p fanout-queue --example queue_bench
//! cargo run --release -p fanout-cli --example cluster_bench
//! ```
//!
//! It runs the `fanout` binary and `queue_bench` built beside it (target/release) as child
//! processes, and prints markdown: every round's figures, their median, and cluster / single.
//! It measures; it does not pass or fail.

use std::path::Path;
use std::process::Command;

use fanout_test_support::{RedisCluster, RedisServer};

const ROUNDS: usize = 3;
const TOPOLOGIES: [&str; 2] = ["single", "cluster"];
/// The plan `fanout bench --only load` runs at (its default).
const PLAN_CALLS_PER_SEC: f64 = 500.0;

/// What one round measured on one topology.
#[derive(Default)]
struct Measured {
    /// No-op jobs/s and Redis commands per job with 1 and 2 worker processes.
    jobs_per_sec: [f64; 2],
    commands_per_job: [f64; 2],
    /// Idle worker, enqueue to handler start, p50 (ms).
    pickup_ms: f64,
    /// Wall time (s) of the startup report and the persona panel, dependency-aware.
    startup_s: f64,
    panel_s: f64,
    /// Provider calls/s during the load window.
    calls_per_sec: f64,
    /// The load table's rows: server, hash tags, commands/s, share, CPU s/s, CPU ms per 1,000.
    servers: Vec<Vec<String>>,
    /// Each server's commands per provider call, as the load benchmark lists them.
    breakdown: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        !fanout_test_support::cluster_mode(),
        "unset FANOUT_TEST_REDIS: this benchmark starts one server and one cluster itself"
    );
    let examples = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let fanout = examples
        .parent()
        .map(|release| release.join("fanout"))
        .unwrap_or_default();
    let queue_bench = examples.join("queue_bench");
    for (path, build) in [
        (&fanout, "cargo build --release -p fanout-cli --bin fanout"),
        (
            &queue_bench,
            "cargo build --release -p fanout-queue --example queue_bench",
        ),
    ] {
        anyhow::ensure!(path.is_file(), "{} missing: run `{build}`", path.display());
    }

    let single = RedisServer::start();
    let cluster = RedisServer::on_cluster(RedisCluster::start());
    let servers = [&single, &cluster];
    let info: String = redis::cmd("INFO").arg("server").query(&mut single.conn())?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();

    let mut rounds: Vec<[Measured; 2]> = Vec::new();
    for round in 1..=ROUNDS {
        let mut measured = [Measured::default(), Measured::default()];
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for t in order {
            let (name, redis) = (TOPOLOGIES[t], servers[t]);
            measured[t] = measure(round, name, redis, &fanout, &queue_bench)?;
        }
        rounds.push(measured);
    }

    println!("# cluster_bench\n");
    println!(
        "cluster_bench: one redis-server {version} and a Redis Cluster of 3 masters (no replicas), {ROUNDS} rounds: the single server first in rounds 1 and 3, the cluster first in round 2.\n"
    );
    print_queue(&rounds);
    print_reports(&rounds);
    print_load(&rounds);
    Ok(())
}

/// Run the three measurements on one topology, from an empty Redis.
fn measure(
    round: usize,
    name: &str,
    redis: &RedisServer,
    fanout: &Path,
    queue_bench: &Path,
) -> anyhow::Result<Measured> {
    let url = redis.url();
    let mut m = Measured::default();
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn())?;
    eprintln!("cluster_bench: round {round}, {name}: queue_bench");
    let out = run(queue_bench, &["--redis-url", &url])?;
    for row in rows(&out) {
        match row.first().map(String::as_str) {
            Some(p @ ("1" | "2")) if row.len() == 7 => {
                let i = usize::from(p == "2");
                m.jobs_per_sec[i] = number(&row[3]);
                m.commands_per_job[i] = number(&row[4]);
            }
            Some(first) if first.starts_with("1 process") => m.pickup_ms = number(&row[1]),
            _ => {}
        }
    }

    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn())?;
    eprintln!("cluster_bench: round {round}, {name}: fanout bench --only reports");
    let out = run(
        fanout,
        &[
            "bench",
            "--only",
            "reports",
            "--runs",
            "1",
            "--redis-url",
            &url,
        ],
    )?;
    for row in rows(&out) {
        if row.get(1).is_some_and(|v| v.starts_with("fanout")) {
            let wall = number(&row[2]);
            if row[0].starts_with("startup") {
                m.startup_s = wall;
            } else {
                m.panel_s = wall;
            }
        }
    }

    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn())?;
    eprintln!("cluster_bench: round {round}, {name}: fanout bench --only load");
    let out = run(fanout, &["bench", "--only", "load", "--redis-url", &url])?;
    m.calls_per_sec = out
        .lines()
        .find_map(|l| l.strip_prefix("Provider calls: "))
        .map_or(0.0, number);
    m.servers = rows(&out)
        .into_iter()
        .filter(|r| r.len() == 6 && r[0] != "server")
        .collect();
    m.breakdown = out
        .lines()
        .filter(|l| l.starts_with("- ") && l.contains("commands per provider call"))
        .map(str::to_owned)
        .collect();
    Ok(m)
}

/// Run `program args`, its stderr passed through; its stdout.
fn run(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed: {}",
        program.display(),
        args.join(" "),
        out.status
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The cells of every markdown table row in `out`, separator rows left out.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| l.starts_with('|') && !l.contains("---"))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The number a cell or line starts with (`1.57 s`, `25,389`, `55.0%`, `487/s`).
fn number(text: &str) -> f64 {
    let digits: String = text
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ','))
        .filter(|&c| c != ',')
        .collect();
    digits.parse().unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Who went first in `round` (1-based).
fn first(round: usize) -> &'static str {
    if round % 2 == 1 { "single" } else { "cluster" }
}

/// Rows of single, cluster and cluster / single, each round's then the median's, for one
/// figure.
fn side_by_side(
    rounds: &[[Measured; 2]],
    label: &str,
    figure: impl Fn(&Measured) -> f64,
    format: impl Fn(f64) -> String,
) {
    let mut ratios = Vec::new();
    for (i, [single, cluster]) in rounds.iter().enumerate() {
        let (s, c) = (figure(single), figure(cluster));
        ratios.push(c / s);
        println!(
            "| {} ({}) | {label} | {} | {} | {:.2}× |",
            i + 1,
            first(i + 1),
            format(s),
            format(c),
            c / s
        );
    }
    let s = median(rounds.iter().map(|[s, _]| figure(s)).collect());
    let c = median(rounds.iter().map(|[_, c]| figure(c)).collect());
    println!(
        "| **median** | {label} | **{}** | **{}** | **{:.2}×** |",
        format(s),
        format(c),
        median(ratios)
    );
}

fn print_queue(rounds: &[[Measured; 2]]) {
    println!("## No-op jobs/s (queue_bench: 50000 jobs, concurrency 64 per worker process)\n");
    println!("| round (first) | worker processes | single | cluster | cluster / single |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let jobs = |n: f64| format!("{n:.0} jobs/s");
    side_by_side(rounds, "1", |m| m.jobs_per_sec[0], jobs);
    side_by_side(rounds, "2", |m| m.jobs_per_sec[1], jobs);
    println!();
    let cmds =
        |i: usize, t: usize| median(rounds.iter().map(|r| r[t].commands_per_job[i]).collect());
    let pickup = |t: usize| median(rounds.iter().map(|r| r[t].pickup_ms).collect());
    println!(
        "Redis commands per job (median; counted over the cluster's masters): single {:.2} and {:.2}, cluster {:.2} and {:.2} with 1 and 2 worker processes. An idle worker's pick-up, enqueue to handler start, p50: single {:.2} ms, cluster {:.2} ms.\n",
        cmds(0, 0),
        cmds(1, 0),
        cmds(0, 1),
        cmds(1, 1),
        pickup(0),
        pickup(1)
    );
}

fn print_reports(rounds: &[[Measured; 2]]) {
    println!(
        "## Report wall time (`fanout bench --only reports --runs 1`, dependency-aware scheduling)\n"
    );
    println!("| round (first) | report | single | cluster | cluster / single |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let secs = |s: f64| format!("{s:.2} s");
    side_by_side(rounds, "startup report", |m| m.startup_s, secs);
    side_by_side(rounds, "persona panel (20)", |m| m.panel_s, secs);
    println!();
}

fn print_load(rounds: &[[Measured; 2]]) {
    println!(
        "## Where Redis's work goes at 30000 requests per minute (`fanout bench --only load`)\n"
    );
    println!(
        "| round | Redis | provider calls/s | server | hash tags it serves | commands/s | share of commands | CPU s/s (main thread) | CPU ms per 1,000 calls |"
    );
    println!("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |");
    for (i, round) in rounds.iter().enumerate() {
        for (t, m) in round.iter().enumerate() {
            for server in &m.servers {
                println!(
                    "| {} | {} | {:.0} | {} |",
                    i + 1,
                    TOPOLOGIES[t],
                    m.calls_per_sec,
                    server.join(" | ")
                );
            }
        }
    }
    // CPU s/s of the server that serves `tag` (one server serves them all).
    let cpu = |t: usize, tag: &str| {
        let of = |m: &Measured| {
            m.servers
                .iter()
                .filter(|s| s[1].split(", ").any(|x| x == tag || x == "all"))
                .map(|s| number(&s[4]))
                .fold(0.0, f64::max)
        };
        median(rounds.iter().map(|r| of(&r[t])).collect())
    };
    let calls = |t: usize| median(rounds.iter().map(|r| r[t].calls_per_sec).collect());
    let drain = median(
        rounds
            .iter()
            .map(|[_, c]| c.jobs_per_sec.iter().copied().fold(0.0, f64::max))
            .collect(),
    );
    println!(
        "\n- **Main thread CPU** (median of {ROUNDS} rounds; a Redis main thread saturates at 1 CPU s/s): on the cluster at {:.0} provider calls/s, the queue's master {:.3} CPU s/s, the budget's {:.3}, the aggregator's {:.3}; the single server, which serves everything, {:.3} at {:.0} calls/s.",
        calls(1),
        cpu(1, "queue"),
        cpu(1, "budget"),
        cpu(1, "aggregator"),
        cpu(0, "all"),
        calls(0)
    );
    println!(
        "- **Headroom:** at that CPU per call, the queue's master would saturate at about {:.0} provider calls/s, the budget's at {:.0} ({:.1}× and {:.1}× the largest plan's {PLAN_CALLS_PER_SEC:.0}); the cluster's queue drains up to {drain:.0} no-op jobs/s (queue_bench above, the better of 1 and 2 worker processes, median), {:.0}× the plan.\n",
        calls(1) / cpu(1, "queue"),
        calls(1) / cpu(1, "budget"),
        calls(1) / cpu(1, "queue") / PLAN_CALLS_PER_SEC,
        calls(1) / cpu(1, "budget") / PLAN_CALLS_PER_SEC,
        drain / PLAN_CALLS_PER_SEC
    );
    println!("<details><summary>Redis commands per provider call, by server</summary>\n");
    for (i, round) in rounds.iter().enumerate() {
        for (t, m) in round.iter().enumerate() {
            for line in &m.breakdown {
                println!("- round {}, {}: {}", i + 1, TOPOLOGIES[t], &line[2..]);
            }
        }
    }
    println!("\n</details>\n");
}
