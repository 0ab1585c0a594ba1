//! Queue overhead benchmark: no-op jobs/s with 1 and 2 worker processes, Redis commands per job
//! (from `INFO commandstats`), and the enqueue-to-start latency of an idle worker.
//!
//! ```text
//! cargo run --release -p fanout-queue --example queue_bench -- [jobs] [concurrency] [--redis-url URL]
//! ```
//!
//! It starts its own redis-server (fanout-test-support), or uses the one at `--redis-url` (it
//! resets that server's INFO statistics; `bench/bullmq/run.sh` uses this to run BullMQ on the
//! same server), and re-executes itself as the worker processes. `--redis-url` may name a Redis
//! Cluster (`redis-cluster://…`); commands are then counted over its masters. It measures; it
//! does not pass or fail.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fanout_queue::{Delivery, Handler, Lane, NewJob, Outcome, Queue, WorkerOptions, run_worker};
use fanout_test_support::{RedisServer, test_config};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "QUEUE_BENCH_CHILD";

fn pool(url: &str) -> fanout_core::redis::Pool {
    fanout_test_support::redis_pool(url)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Does nothing, except in the latency phase: records how long after enqueue it started.
struct NoOp {
    pool: fanout_core::redis::Pool,
    latencies: String,
}

impl Handler for NoOp {
    async fn handle(&self, d: Delivery) -> Outcome {
        if let Some(t) = d.payload.get("t_us").and_then(|v| v.as_u64()) {
            let waited = now_us().saturating_sub(t);
            if let Ok(mut conn) = self.pool.get().await {
                let _: Result<i64, _> = conn.rpush(&self.latencies, waited).await;
            }
        }
        Outcome::Done
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec).await;
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let external_url = match args.iter().position(|a| a == "--redis-url") {
        Some(i) => {
            anyhow::ensure!(i + 1 < args.len(), "--redis-url needs a URL");
            let url = args.remove(i + 1);
            args.remove(i);
            Some(url)
        }
        None => None,
    };
    let jobs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);

    // Kept alive (and killed on drop) only when we started it.
    let (_own_redis, url) = match external_url {
        Some(url) => (None, url),
        None => {
            let redis = RedisServer::start();
            let url = redis.url();
            (Some(redis), url)
        }
    };
    let mut conn = fanout_core::redis::PooledConnection::take(pool(&url).get().await?);

    println!(
        "queue_bench: {jobs} no-op jobs, concurrency {concurrency} per process, redis at {url}\n"
    );
    println!(
        "| worker processes | jobs | enqueue jobs/s | process jobs/s | Redis cmds/job (total) | enqueue | worker |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut breakdowns = Vec::new();
    for processes in [1usize, 2] {
        let ns = format!("bench{processes}");
        let config = test_config(&url, &[]);
        let queue = Queue::new(pool(&url), &ns, config.queue.clone());
        queue.load_scripts().await?;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await?;

        let t = Instant::now();
        for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
            let batch = chunk
                .iter()
                .map(|i| NewJob::new(format!("job-{i}"), serde_json::json!({ "i": i })))
                .collect();
            queue.enqueue_many(batch).await?;
        }
        let enqueue_secs = t.elapsed().as_secs_f64();
        let enqueue_calls = worker_calls(&mut conn).await?;

        let t = Instant::now();
        let children: Vec<Child> = (0..processes)
            .map(|_| spawn_child(&url, &ns, concurrency))
            .collect::<Result<_, _>>()?;
        let stream = queue.stream_key(Lane::Interactive, 0);
        loop {
            let left: u64 = conn.xlen(&stream).await?;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        let total_calls = worker_calls(&mut conn).await?;
        let by_command = calls_by_command(&mut conn).await?;
        stop_children(children);
        breakdowns.push(format!(
            "{processes} process(es), calls per job: {}",
            by_command
                .iter()
                .map(|(n, c)| format!("{n} {:.3}", *c as f64 / jobs as f64))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let per_job = |calls: u64| calls as f64 / jobs as f64;
        println!(
            "| {processes} | {jobs} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            jobs as f64 / enqueue_secs,
            jobs as f64 / secs,
            per_job(total_calls),
            per_job(enqueue_calls),
            per_job(total_calls - enqueue_calls),
        );
    }

    println!();
    for b in &breakdowns {
        println!("- {b}");
    }

    // Latency of an idle worker: one job at a time, from just before enqueue to handler start.
    let ns = "latency";
    let config = test_config(&url, &[]);
    let queue = Queue::new(pool(&url), ns, config.queue.clone());
    queue.load_scripts().await?;
    let child = spawn_child(&url, ns, concurrency)?;
    let latencies_key = format!("{ns}:latencies");
    let samples = 500;
    // Warm up: let the worker connect and block.
    queue
        .enqueue(NewJob::new("warm", serde_json::json!({})))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await?;
    for i in 0..samples {
        queue
            .enqueue(NewJob::new(
                format!("lat-{i}"),
                serde_json::json!({ "t_us": now_us() }),
            ))
            .await?;
        // Idle again before the next one.
        loop {
            let n: usize = conn.llen(&latencies_key).await?;
            if n > i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Commands of the queue only: the handler's latency RPUSH (and its pool's recycle check) and
    // the benchmark's own polling are left out.
    let idle_calls: u64 = calls_by_command(&mut conn)
        .await?
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "rpush" | "unwatch" | "ping"))
        .map(|(_, c)| c)
        .sum();
    stop_children(vec![child]);
    let mut lat: Vec<u64> = conn.lrange(&latencies_key, 0, -1).await?;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "\n| idle worker, enqueue to handler start | p50 ms | p99 ms | max ms | samples | Redis cmds/job |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| 1 process, one job at a time | {:.2} | {:.2} | {:.2} | {} | {:.1} |",
        pct(0.50),
        pct(0.99),
        pct(1.0),
        lat.len(),
        idle_calls as f64 / samples as f64
    );
    Ok(())
}

/// Sum of `calls` in `INFO commandstats`, less the benchmark's own INFO/CONFIG/XLEN/LLEN.
async fn worker_calls(conn: &mut fanout_core::redis::Connection) -> anyhow::Result<u64> {
    Ok(calls_by_command(conn).await?.iter().map(|(_, c)| c).sum())
}

/// `calls` per command in `INFO commandstats` (summed over a cluster's masters), most first.
async fn calls_by_command(
    conn: &mut fanout_core::redis::Connection,
) -> anyhow::Result<Vec<(String, u64)>> {
    let nodes = fanout_core::redis::info_by_node(conn, "commandstats").await?;
    let mut out: Vec<(String, u64)> =
        fanout_core::redis::command_calls(nodes.iter().map(|(_, text)| text.as_str()))
            .into_iter()
            .filter(|(name, _)| {
                !matches!(
                    name.as_str(),
                    "info" | "config|resetstat" | "config" | "xlen" | "llen" | "script|load"
                )
            })
            .collect();
    out.sort_by_key(|b| std::cmp::Reverse(b.1));
    Ok(out)
}

fn spawn_child(url: &str, ns: &str, concurrency: usize) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, format!("{url} {ns} {concurrency}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
}

/// Close their stdin (they drain and exit), then reap them.
fn stop_children(children: Vec<Child>) {
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}

async fn child(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split(' ');
    let (url, ns, concurrency) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().and_then(|c| c.parse().ok()).unwrap_or(64),
    );
    let config = test_config(url, &[]);
    let queue = Queue::new(pool(url), ns, config.queue.clone());
    let stop = CancellationToken::new();
    // The parent closes our stdin to stop us.
    let watcher = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.cancel();
        })
    };
    let handler = Arc::new(NoOp {
        pool: pool(url),
        latencies: format!("{ns}:latencies"),
    });
    let options = WorkerOptions {
        concurrency,
        grace: Duration::from_secs(5),
        consumer_prefix: "bench".into(),
        ..WorkerOptions::default()
    };
    run_worker(queue, handler, options, stop).await?;
    watcher.await?;
    Ok(())
}
