//! `fanout bench --only load`: where Redis's work goes at a plan's full rate. Real `fanout
//! worker` processes and an aggregator work through persona panels submitted at the plan's rate
//! (100-persona panels, a few a second) against the simulated provider, whose limit is the
//! plan's; after a warm-up, `INFO commandstats` and `INFO cpu` of every server that holds data
//! (each master of a Redis Cluster) are read at the start and the end of a window. It reports,
//! per server: commands per second, its share of them, and the CPU its main thread spent per
//! second of wall time (a Redis main thread saturates at 1), with which of the namespace's hash
//! tags it serves. On a cluster the run's namespace is picked so that the queue's, the budget's
//! and the aggregator's tags fall on different masters; each report's keys have a hash tag of
//! their own and spread over every master.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fanout_aggregator::AggregatorOptions;
use fanout_core::redis::{PooledConnection, info_by_node, key_slot};
use fanout_sim::SimConfig;
use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::bench::{env_for, producer_for, spawn_worker, submit_persona_backlog, uuid_like};

/// The load benchmark's own flags (part of `fanout bench`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LoadArgs {
    /// Requests per minute of the plan: the provider enforces it, the budget is told it (30000,
    /// the largest plan, is 500 calls a second).
    #[arg(long, default_value_t = 30_000)]
    load_rpm: u64,
    /// Seconds measured, after 5 s of warm-up.
    #[arg(long, default_value_t = 20)]
    load_secs: u64,
    /// Worker processes (64 jobs in flight each).
    #[arg(long, default_value_t = 2)]
    load_processes: usize,
}

/// What one server's counters said at one moment.
struct Sample {
    /// Calls per command (the benchmark's own INFO left out).
    by_command: BTreeMap<String, u64>,
    commands: u64,
    /// Seconds of CPU its main thread has used (user + system).
    cpu: f64,
}

pub(crate) async fn run(
    args: &LoadArgs,
    redis_url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.load_rpm >= 600, "--load-rpm must be at least 600");
    anyhow::ensure!(args.load_secs >= 1, "--load-secs must be at least 1");
    anyhow::ensure!(
        args.load_processes >= 1,
        "--load-processes must be at least 1"
    );
    // Persona calls of ~30 ms (time scale 0.002), no limit on tokens.
    let sim = fanout_sim::spawn(SimConfig {
        time_scale: 0.002,
        rpm: args.load_rpm,
        seed: 5,
        ..SimConfig::default()
    })
    .await?;
    let config = fanout_core::Config::load(
        None,
        &HashMap::from([("REDIS_URL".to_owned(), redis_url.to_owned())]),
    )?;
    let mut conn = PooledConnection::take(fanout_worker::redis_pool(&config)?.get().await?);
    let ranges = slot_ranges(&mut conn).await?;
    let ns = namespace(&ranges);
    let mut env = env_for(redis_url, &sim.base_url(), &ns, args.load_rpm);
    env.insert("FANOUT_BUDGET__LEARN_LIMITS".into(), "false".into());
    let (store, producer) = producer_for(&env)?;

    let per_sec = args.load_rpm as f64 / 60.0;
    // Two seconds of backlog first, so that the budget, not the submissions, sets the pace.
    submit_persona_backlog(&producer, (2.0 * per_sec) as usize, None).await?;
    let submitter = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(100.0 / per_sec));
        loop {
            tick.tick().await;
            if let Err(e) = submit_persona_backlog(&producer, 100, None).await {
                tracing::error!(error = %e, "bench submitter failed");
                return;
            }
        }
    });
    let mut workers = Vec::new();
    for _ in 0..args.load_processes {
        workers.push(spawn_worker(&env, &["--concurrency", "64"])?);
    }
    let stop = shutdown.child_token();
    let aggregator = tokio::spawn(fanout_aggregator::run(
        store,
        AggregatorOptions::default(),
        stop.clone(),
    ));

    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    }
    let (start, start_ms) = (Instant::now(), now_ms());
    let before = samples(&mut conn).await?;
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(args.load_secs)) => {}
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    }
    let after = samples(&mut conn).await?;
    let (wall, end_ms) = (start.elapsed().as_secs_f64(), now_ms());

    submitter.abort();
    for mut w in workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    stop.cancel();
    let _ = aggregator.await;
    let timeline = sim.timeline();
    let _ = sim.shutdown().await;
    let in_window = timeline
        .iter()
        .filter(|e| (start_ms..end_ms).contains(&e.at_ms));
    let (calls, refused) = in_window.fold((0u64, 0u64), |(ok, no), e| {
        if e.admitted {
            (ok + 1, no)
        } else {
            (ok, no + 1)
        }
    });
    let calls_per_sec = calls as f64 / wall;

    println!(
        "## Redis load at {} requests per minute ({} worker processes, simulated provider)\n",
        args.load_rpm, args.load_processes
    );
    println!(
        "Provider calls: {calls_per_sec:.0}/s over {wall:.1} s ({refused} refused with a 429; the plan is {per_sec:.0}/s, the budget paces at 98%).\n"
    );
    println!(
        "| server | hash tags it serves | commands/s | share of commands | CPU s/s (main thread) | CPU ms per 1,000 calls |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let holds = tags_by_node(&ranges, &ns);
    let total: u64 = after
        .iter()
        .map(|(node, a)| a.commands - before.get(node).map_or(0, |b| b.commands))
        .sum();
    let mut nodes: Vec<&String> = after.keys().collect();
    nodes.sort();
    for &node in &nodes {
        let (a, b) = (&after[node], before.get(node));
        let commands = a.commands - b.map_or(0, |b| b.commands);
        let cpu = a.cpu - b.map_or(0.0, |b| b.cpu);
        let name = if node.is_empty() {
            "the one server"
        } else {
            node
        };
        let tags = holds
            .get(node.as_str())
            .filter(|t| !t.is_empty())
            .map_or("none (reports only)", String::as_str);
        println!(
            "| {name} | {tags} | {:.0} | {:.1}% | {:.3} | {:.0} |",
            commands as f64 / wall,
            100.0 * commands as f64 / total.max(1) as f64,
            cpu / wall,
            1e6 * cpu / calls.max(1) as f64,
        );
    }
    println!();
    for &node in &nodes {
        let a = &after[node];
        let name = if node.is_empty() {
            "the one server"
        } else {
            node
        };
        let mut per_call: Vec<(&str, f64)> = a
            .by_command
            .iter()
            .map(|(command, n)| {
                let was = before.get(node).and_then(|b| b.by_command.get(command));
                (
                    command.as_str(),
                    (n - was.unwrap_or(&0)) as f64 / calls.max(1) as f64,
                )
            })
            .filter(|(_, per)| *per >= 0.05)
            .collect();
        per_call.sort_by(|x, y| y.1.total_cmp(&x.1));
        let list: Vec<String> = per_call
            .iter()
            .map(|(c, n)| format!("{c} {n:.1}"))
            .collect();
        println!("- {name}, commands per provider call: {}", list.join(", "));
    }
    println!(
        "\nHash tags: `{{{ns}:queue}}` every queue key, `{{{ns}:budget}}` every budget key, `{{{ns}}}` the aggregator's notifications, indexes and webhook outbox; each report's keys `{{r:<id>}}` spread over every slot.\n"
    );
    Ok(())
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Commands served (the benchmark's own INFO left out) and main-thread CPU of every server.
async fn samples(
    conn: &mut fanout_core::redis::Connection,
) -> anyhow::Result<HashMap<String, Sample>> {
    let stats = info_by_node(conn, "commandstats").await?;
    let cpu = info_by_node(conn, "cpu").await?;
    let mut out = HashMap::new();
    for (node, text) in stats {
        let mut by_command = fanout_core::redis::command_calls([text.as_str()]);
        by_command.remove("info");
        let commands = by_command.values().sum();
        let cpu_text = cpu.iter().find(|(n, _)| *n == node).map_or("", |(_, t)| t);
        let field = |name: &str| {
            cpu_text.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        let cpu = match (
            field("used_cpu_user_main_thread"),
            field("used_cpu_sys_main_thread"),
        ) {
            (Some(user), Some(sys)) => user + sys,
            // Before Redis 6.2: the whole process.
            _ => field("used_cpu_user").unwrap_or(0.0) + field("used_cpu_sys").unwrap_or(0.0),
        };
        out.insert(
            node,
            Sample {
                by_command,
                commands,
                cpu,
            },
        );
    }
    Ok(out)
}

/// The namespace's shared hash tags, as crates/fanout-queue/src/keys.rs,
/// crates/fanout-ratelimit/src/keys.rs and crates/fanout-aggregator/src/keys.rs make them.
fn shared_tags(ns: &str) -> [(&'static str, String); 3] {
    [
        ("queue", format!("{{{ns}:queue}}")),
        ("budget", format!("{{{ns}:budget}}")),
        ("aggregator", format!("{{{ns}}}")),
    ]
}

/// The master (`host:port`) of each of a cluster's slot ranges; none on one server.
async fn slot_ranges(
    conn: &mut fanout_core::redis::Connection,
) -> anyhow::Result<Vec<(i64, i64, String)>> {
    if !matches!(conn, fanout_core::redis::Connection::Cluster(_)) {
        return Ok(Vec::new());
    }
    // [[first slot, last slot, [master ip, port, id, …], replicas…], …]
    let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut out = Vec::new();
    for range in slots.as_sequence().into_iter().flatten() {
        if let Some(
            [
                Value::Int(first),
                Value::Int(last),
                Value::Array(master),
                ..,
            ],
        ) = range.as_sequence()
            && let (Some(Value::BulkString(ip)), Some(Value::Int(port))) =
                (master.first(), master.get(1))
        {
            out.push((
                *first,
                *last,
                format!("{}:{port}", String::from_utf8_lossy(ip)),
            ));
        }
    }
    Ok(out)
}

/// The master serving `tag`'s slot.
fn master_of<'a>(ranges: &'a [(i64, i64, String)], tag: &str) -> Option<&'a str> {
    let slot = i64::from(key_slot(tag.as_bytes()));
    ranges
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(.., node)| node.as_str())
}

/// A namespace for this run. On a cluster, one whose queue, budget and aggregator tags fall on
/// different masters (as many as there are), so that each master's figures are one tag's.
fn namespace(ranges: &[(i64, i64, String)]) -> String {
    let base = format!("bench-load-{}", uuid_like());
    let mut masters: Vec<&str> = ranges.iter().map(|(.., node)| node.as_str()).collect();
    masters.sort_unstable();
    masters.dedup();
    let want = masters.len().min(3);
    (0..10_000)
        .map(|i| format!("{base}-{i}"))
        .find(|ns| {
            let mut used: Vec<_> = shared_tags(ns)
                .iter()
                .map(|(_, tag)| master_of(ranges, tag))
                .collect();
            used.sort_unstable();
            used.dedup();
            used.len() == want
        })
        .unwrap_or(base)
}

/// Which of the namespace's shared hash tags each master serves; one server (node name empty)
/// serves them all.
fn tags_by_node(ranges: &[(i64, i64, String)], ns: &str) -> HashMap<String, String> {
    if ranges.is_empty() {
        return HashMap::from([(String::new(), "all".to_owned())]);
    }
    let mut out: HashMap<String, Vec<&str>> = ranges
        .iter()
        .map(|(.., node)| (node.clone(), Vec::new()))
        .collect();
    for (name, tag) in shared_tags(ns) {
        if let Some(node) = master_of(ranges, &tag) {
            out.entry(node.to_owned()).or_default().push(name);
        }
    }
    out.into_iter()
        .map(|(node, names)| (node, names.join(", ")))
        .collect()
}
