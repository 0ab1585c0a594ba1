//! The waiting room at scale: PROCESSES processes share WAITERS waiting callers on one budget of
//! RPM requests per minute, for SECONDS. Every caller acquires, settles at once and asks again, so
//! the room holds about WAITERS callers the whole time. Measures what Redis pays per admission
//! (`INFO commandstats`: script calls and their time) and the script's latency percentiles
//! (`INFO latencystats`), and whether admissions keep up with the limit.
//!
//! `cargo run --release -p fanout-ratelimit --example waiting_room [-- PROCESSES WAITERS SECONDS RPM]`
//! (defaults: 8 processes, 4,000 waiters, 20 s, 30,000 RPM: the largest plan)
//!
//! The output is markdown (`scripts/bench.sh waiting-room` writes it into BENCHMARKS.md).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fanout_core::config::{BudgetConfig, LimitCaps, ModelLimits};
use fanout_ratelimit::Budget;
use fanout_test_support::RedisServer;

const CHILD: &str = "FANOUT_WAITING_ROOM_CHILD";

fn config(rpm: u64) -> BudgetConfig {
    BudgetConfig {
        limits: ModelLimits {
            requests_per_minute: rpm,
            tokens_per_minute: 1_000_000_000_000,
        },
        caps: LimitCaps {
            requests_per_minute: Some(rpm),
            tokens_per_minute: None,
        },
        max_concurrent_requests: u32::MAX,
        max_wait_secs: 600,
        learn_limits: false,
        ..BudgetConfig::default()
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Ok(spec) = std::env::var(CHILD) {
        return rt.block_on(child(&spec));
    }
    let mut args = std::env::args().skip(1);
    let mut next = |default: u64| -> anyhow::Result<u64> {
        Ok(args
            .next()
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (processes, waiters, seconds, rpm) = (next(8)?, next(4_000)?, next(20)?, next(30_000)?);
    anyhow::ensure!(
        processes >= 1 && waiters >= processes,
        "need waiters >= processes >= 1"
    );
    let redis = RedisServer::start();
    let mut admin = redis.client().get_connection()?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut admin)?;
    println!(
        "waiting_room: {processes} processes, {waiters} waiting callers, one budget of {rpm} RPM, {seconds} s, a private redis-server\n"
    );
    let started = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|i| {
            let tasks = waiters / processes + u64::from(i < waiters % processes);
            Command::new(std::env::current_exe()?)
                .env(CHILD, format!("{} {tasks} {seconds} {rpm}", redis.url()))
                .stdout(Stdio::piped())
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut admitted = 0u64;
    let mut waits_ms = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "a child failed: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("ADMITTED ") {
                admitted += rest.trim().parse::<u64>()?;
            } else if let Some(rest) = line.strip_prefix("WAITS ") {
                waits_ms.extend(rest.split(',').filter_map(|w| w.parse::<u64>().ok()));
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut admin)?;
    let latency: String = redis::cmd("INFO").arg("latencystats").query(&mut admin)?;
    let stat = |text: &str, prefix: &str, field: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))?
            .split([':', ','])
            .find_map(|f| f.strip_prefix(field))?
            .parse()
            .ok()
    };
    let calls = stat(&info, "cmdstat_evalsha:", "calls=").unwrap_or(0.0);
    let usec = stat(&info, "cmdstat_evalsha:", "usec=").unwrap_or(0.0);
    let p50 = stat(&latency, "latency_percentiles_usec_evalsha:", "p50=");
    let p99 = stat(&latency, "latency_percentiles_usec_evalsha:", "p99=");
    let p999 = stat(&latency, "latency_percentiles_usec_evalsha:", "p99.9=");
    waits_ms.sort_unstable();
    let pct = |p: f64| {
        waits_ms
            .get(((waits_ms.len().max(1) - 1) as f64 * p) as usize)
            .copied()
    };
    // Each process counts what it admitted within its `seconds`; the wall time also holds the
    // processes' start and the last callers' wait past the end.
    let limit = rpm as f64 / 60.0;
    let us = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0}"));
    let ms = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| admissions per second (limit {limit:.0}, paced at {:.0}) | {:.0} |",
        limit * (1.0 - config(rpm).headroom),
        admitted as f64 / seconds as f64
    );
    println!(
        "| script calls per admission (acquire + settle) | {:.2} |",
        calls / admitted.max(1) as f64
    );
    println!(
        "| Redis script time per admission | {:.0} µs |",
        usec / admitted.max(1) as f64
    );
    println!(
        "| Redis CPU (script time over {elapsed:.1} s of wall time) | {:.1}% of one core |",
        usec / 1e6 / elapsed * 100.0
    );
    println!(
        "| script latency p50 / p99 / p99.9 (`INFO latencystats`, EVALSHA) | {} / {} / {} µs |",
        us(p50),
        us(p99),
        us(p999)
    );
    println!(
        "| a caller's wait for its turn, p50 / p99 | {} / {} ms |",
        ms(pct(0.5)),
        ms(pct(0.99))
    );
    Ok(())
}

/// One process: `tasks` callers looping acquire → settle until the deadline.
async fn child(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split(' ').collect();
    let (url, tasks, seconds, rpm) = (
        parts[0],
        parts[1].parse::<usize>()?,
        parts[2].parse::<u64>()?,
        parts[3].parse::<u64>()?,
    );
    let pool = fanout_test_support::redis_pool(url);
    let budget = Budget::new(pool, "room", config(rpm), vec!["k".into()]);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let admitted = Arc::new(AtomicU64::new(0));
    let waits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (b, admitted, waits) = (budget.clone(), admitted.clone(), waits.clone());
        set.spawn(async move {
            while Instant::now() < deadline {
                let a = b.acquire(b.request("gpt-4o-mini", 100)).await?;
                if Instant::now() < deadline {
                    admitted.fetch_add(1, Ordering::Relaxed);
                    waits
                        .lock()
                        .expect("waits")
                        .push(a.waited.as_millis() as u64);
                }
                b.settle(a, Some(100)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let waits = waits.lock().expect("waits");
    let sample: Vec<String> = waits.iter().step_by(10).map(u64::to_string).collect();
    println!("ADMITTED {}", admitted.load(Ordering::Relaxed));
    println!("WAITS {}", sample.join(","));
    Ok(())
}
