//! Shared helpers for the queue's crate tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fanout_core::Config;
use fanout_queue::{NewJob, Queue};
use fanout_test_support::{RedisServer, test_config};

pub fn pool(url: &str) -> fanout_core::redis::Pool {
    fanout_test_support::redis_pool(url)
}

/// A config for tests: short visibility timeout and backoff unless overridden.
pub fn config(url: &str, overrides: &[(&str, &str)]) -> Config {
    let mut all = vec![
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "1"),
        ("FANOUT_QUEUE__RETRY_BASE_MS", "20"),
        ("FANOUT_QUEUE__RETRY_MAX_MS", "100"),
        ("FANOUT_QUEUE__CLAIM_BLOCK_MS", "500"),
    ];
    all.extend_from_slice(overrides);
    test_config(url, &all)
}

static NS: AtomicUsize = AtomicUsize::new(0);

pub fn namespace() -> String {
    format!("t{}", NS.fetch_add(1, Ordering::Relaxed))
}

pub struct Setup {
    pub redis: RedisServer,
    pub queue: Queue,
    pub config: Config,
    pub ns: String,
}

pub fn setup(overrides: &[(&str, &str)]) -> Setup {
    let redis = RedisServer::start();
    let config = config(&redis.url(), overrides);
    let ns = namespace();
    let queue = Queue::new(pool(&redis.url()), &ns, config.queue.clone());
    Setup {
        redis,
        queue,
        config,
        ns,
    }
}

pub fn job(id: &str) -> NewJob {
    NewJob::new(id, serde_json::json!({ "job": id }))
}

/// Poll `check` every 10 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection for assertions, to one server or to a cluster, like the queue's own.
pub async fn redis_conn(url: &str) -> fanout_core::redis::Connection {
    fanout_core::redis::PooledConnection::take(pool(url).get().await.unwrap())
}

/// Sum of `calls` over `INFO commandstats`, and the per-command map (summed over the masters
/// of a cluster, which answers INFO with one text per node).
pub async fn command_calls(conn: &mut fanout_core::redis::Connection) -> (u64, Vec<(String, u64)>) {
    let nodes = fanout_core::redis::info_by_node(conn, "commandstats")
        .await
        .unwrap();
    let per = fanout_core::redis::command_calls(nodes.iter().map(|(_, text)| text.as_str()));
    (per.values().sum(), per.into_iter().collect())
}
