//! Helpers shared by this crate's tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use fanout_core::config::{BudgetConfig, LimitCaps, ModelLimits};
use fanout_core::redis::Pool;
use fanout_ratelimit::Budget;

pub const MODEL: &str = "gpt-4o-mini";

/// How far ahead of its schedule an admission may run (`LATENESS_MS` in the budget), in seconds.
pub const LATENESS_SECS: f64 = 0.005;

pub fn pool(url: &str) -> Pool {
    fanout_test_support::redis_pool(url)
}

/// A budget told `rpm` and `tpm` explicitly, paced at exactly those (no headroom), that learns
/// nothing (no provider here): the mechanism alone.
pub fn config(rpm: u64, tpm: u64, burst_seconds: f64, max_concurrent: u32) -> BudgetConfig {
    BudgetConfig {
        limits: ModelLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        },
        caps: LimitCaps {
            requests_per_minute: Some(rpm),
            tokens_per_minute: Some(tpm),
        },
        models: BTreeMap::new(),
        burst_seconds,
        headroom: 0.0,
        max_concurrent_requests: max_concurrent,
        refund_unused_tokens: true,
        learn_limits: false,
        ..BudgetConfig::default()
    }
}

pub fn budget(url: &str, config: BudgetConfig, keys: &[&str]) -> Budget {
    Budget::new(
        pool(url),
        "t",
        config,
        keys.iter().map(|k| k.to_string()).collect(),
    )
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Checks that admission times (ms, sorted) never exceed a token bucket of `capacity` units
/// refilled at `per_minute / 60` units per second: for every i < j, the j - i + 1 admissions in
/// [t_i, t_j] fit in capacity + rate × (t_j - t_i). Returns the worst excess (<= 0 is conforming).
pub fn worst_excess(times: &[u64], per_minute: u64, capacity: f64) -> f64 {
    let rate = per_minute as f64 / 60_000.0;
    let mut worst = f64::MIN;
    for i in 0..times.len() {
        for j in i..times.len() {
            let count = (j - i + 1) as f64;
            let allowed = capacity.max(1.0) + rate * (times[j] - times[i]) as f64;
            worst = worst.max(count - allowed);
        }
    }
    worst
}
