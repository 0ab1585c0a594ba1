//! Admission throughput and Redis time per script call, on a private redis-server.
//!
//! `cargo run --release -p fanout-ratelimit --example budget_bench [-- TASKS SECONDS]`
//!
//! Phase 1 runs only the admission script (each lease then removed with a plain ZREM) from TASKS
//! concurrent tasks with a budget too large to bind; phase 2 runs acquire + settle, the two
//! script calls a worker makes per LLM call. Redis time comes from `INFO commandstats`
//! (`usec_per_call` of EVALSHA), reset before each phase. Both phases run twice, alternating.
//! The output is markdown (`scripts/bench.sh budget-script` writes it into BENCHMARKS.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fanout_core::config::{BudgetConfig, ModelLimits, Plan};
use fanout_ratelimit::Budget;
use fanout_test_support::RedisServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let redis = RedisServer::start();
    let pool = fanout_test_support::redis_pool(&redis.url());
    let config = BudgetConfig {
        plan: Plan::Tier5,
        limits: ModelLimits {
            requests_per_minute: 1_000_000_000,
            tokens_per_minute: 1_000_000_000_000,
        },
        burst_seconds: 1.0,
        max_concurrent_requests: u32::MAX,
        lease_secs: 3_600,
        refund_unused_tokens: true,
        learn_limits: false,
        ..BudgetConfig::default()
    };
    let budget = Budget::new(pool, "bench", config, vec!["k1".into(), "k2".into()]);
    let mut admin = redis.client().get_connection()?;
    println!(
        "budget_bench: {tasks} tasks, {seconds} s per phase, 2 keys, a private redis-server\n"
    );
    println!("| phase | admissions/s | script calls/s | Redis µs per script call |");
    println!("|---|---:|---:|---:|");

    // Calibration: the cheapest script, so the numbers below can be read against this machine.
    {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut admin)?;
        let conn = redis.client().get_multiplexed_async_connection().await?;
        let script = redis::Script::new("return redis.call('TIME')");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(2);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let (mut conn, script) = (conn.clone(), script.clone());
            set.spawn(async move {
                while Instant::now() < deadline {
                    let _: Vec<String> = script.invoke_async(&mut conn).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        let (calls, per_call) = evalsha_stats(&mut admin)?;
        println!(
            "| baseline: a script that only reads `TIME` | – | {:.0} | {per_call} |",
            calls / started.elapsed().as_secs_f64()
        );
    }

    let plain = redis.client().get_multiplexed_async_connection().await?;
    for (i, settle) in [true, false, true, false].into_iter().enumerate() {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut admin)?;
        let count = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let (b, count, mut plain) = (budget.clone(), count.clone(), plain.clone());
            set.spawn(async move {
                while Instant::now() < deadline {
                    let a = b.acquire(b.request("gpt-4o-mini", 500)).await?;
                    if settle {
                        b.settle(a, Some(300)).await?;
                    } else {
                        // Release with a plain ZREM so EVALSHA counts the admission script only
                        // (dropping the admission would release it through a script).
                        let _: () = redis::cmd("ZREM")
                            .arg("{bench:budget}:leases")
                            .arg(a.lease_id())
                            .query_async(&mut plain)
                            .await?;
                        std::mem::forget(a);
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let n = count.load(Ordering::Relaxed);
        let (calls, per_call) = evalsha_stats(&mut admin)?;
        let phase = if settle {
            "acquire + settle"
        } else {
            "acquire only"
        };
        println!(
            "| {phase} (run {}) | {:.0} | {:.0} | {per_call} |",
            i / 2 + 1,
            n as f64 / elapsed,
            calls / elapsed
        );
        if !settle {
            redis::cmd("DEL")
                .arg("{bench:budget}:leases")
                .query::<()>(&mut admin)?;
        }
    }
    println!(
        "\n\"acquire only\" is the admission script alone (each lease then removed with a plain ZREM); \"acquire + settle\" averages the two script calls a worker makes per provider call. The baseline, the cheapest script there is, shows what this machine's Redis pays for any script call."
    );
    Ok(())
}

/// EVALSHA's `calls` and `usec_per_call` in `INFO commandstats` since the last reset.
fn evalsha_stats(admin: &mut redis::Connection) -> anyhow::Result<(f64, String)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(admin)?;
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or("");
    let field = |name: &str| {
        line.split([':', ','])
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_owned)
    };
    let calls = field("calls=").and_then(|c| c.parse().ok()).unwrap_or(0.0);
    Ok((calls, field("usec_per_call=").unwrap_or_else(|| "?".into())))
}
