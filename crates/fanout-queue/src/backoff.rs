//! Retry delays: exponential from a base, capped, with full jitter.

use std::time::Duration;

use rand::Rng;

/// The delay before `attempt + 1`, after `attempt` (1-based) failed: uniform in
/// `0..=min(max, base · 2^(attempt-1))`, and never shorter than `retry_after`.
pub fn retry_delay(
    attempt: u32,
    base_ms: u64,
    max_ms: u64,
    retry_after: Option<Duration>,
) -> Duration {
    let jittered = rand::rng().random_range(0..=cap_ms(attempt, base_ms, max_ms));
    Duration::from_millis(jittered).max(retry_after.unwrap_or_default())
}

pub(crate) fn cap_ms(attempt: u32, base_ms: u64, max_ms: u64) -> u64 {
    let doublings = attempt.saturating_sub(1).min(40);
    base_ms.saturating_mul(1u64 << doublings).min(max_ms)
}

/// Capped, jittered backoff for reconnecting after Redis errors.
#[derive(Debug)]
pub(crate) struct Reconnect {
    failures: u32,
    base: Duration,
    max: Duration,
}

impl Reconnect {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            failures: 0,
            base,
            max,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// The next wait: half fixed, half jitter, so many workers do not reconnect in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let cap = cap_ms(
            self.failures,
            self.base.as_millis() as u64,
            self.max.as_millis() as u64,
        );
        let half = cap / 2;
        Duration::from_millis(half + rand::rng().random_range(0..=cap - half))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_honour_retry_after() {
        assert_eq!(cap_ms(1, 500, 60_000), 500);
        assert_eq!(cap_ms(3, 500, 60_000), 2_000);
        assert_eq!(cap_ms(30, 500, 60_000), 60_000);
        for attempt in 1..10 {
            let d = retry_delay(attempt, 100, 1_000, None);
            assert!(d <= Duration::from_millis(cap_ms(attempt, 100, 1_000)));
            let d = retry_delay(attempt, 100, 1_000, Some(Duration::from_secs(5)));
            assert_eq!(d, Duration::from_secs(5));
        }
    }

    #[test]
    fn reconnect_backoff_is_capped() {
        let mut b = Reconnect::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d <= Duration::from_secs(2) && d >= Duration::from_millis(50),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
