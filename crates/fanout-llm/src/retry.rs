//! The one retry loop's policy: capped exponential backoff with full jitter, a maximum number of
//! attempts, and the provider's `retry-after` as a floor.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use fanout_core::config::QueueConfig;
use rand::Rng as _;
use tracing::debug;

use crate::client::{ChatRequest, ChatResponse, LlmClient};
use crate::error::CallError;

/// When to try again, and after how long.
///
/// The schedule is backon's exponential (`base · 2^(n-1)`, capped at `max`), with full jitter
/// (uniform in `[0, delay]`) applied here since backon's jitter only adds. The delay before the
/// next attempt is `max(jittered backoff, provider retry-after)`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    schedule: ExponentialBuilder,
    max_attempts: u32,
    jitter: bool,
}

impl RetryPolicy {
    /// Backoff from `base`, doubling, capped at `max`; at most `max_attempts` attempts in all.
    pub fn new(base: Duration, max: Duration, max_attempts: u32) -> Self {
        let max_attempts = max_attempts.max(1);
        Self {
            schedule: ExponentialBuilder::new()
                .with_min_delay(base)
                .with_max_delay(max.max(base))
                .with_factor(2.0)
                .with_max_times(max_attempts as usize - 1),
            max_attempts,
            jitter: true,
        }
    }

    /// `queue.retry_base_ms`, `queue.retry_max_ms`, `queue.max_attempts`.
    pub fn from_queue_config(queue: &QueueConfig) -> Self {
        Self::new(
            Duration::from_millis(queue.retry_base_ms),
            Duration::from_millis(queue.retry_max_ms),
            queue.max_attempts,
        )
    }

    /// The same schedule without jitter (deterministic delays, for tests).
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff after failed attempt number `attempt` (1-based), jittered; `None` once
    /// `attempt` reaches the maximum.
    pub fn backoff(&self, attempt: u32) -> Option<Duration> {
        let index = attempt.checked_sub(1)? as usize;
        // backon's iterator stops by itself after `max_times`: never an endless schedule.
        let ceiling = round_to_ms(self.schedule.build().nth(index)?);
        if !self.jitter || ceiling.is_zero() {
            return Some(ceiling);
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(rand::rng().random_range(0..=nanos)))
    }

    /// How long to wait before the attempt after failed attempt `attempt` (1-based), or `None`
    /// to stop: the error is fatal, or `attempt` was the last one allowed.
    pub fn next_delay(&self, attempt: u32, err: &CallError) -> Option<Duration> {
        if !err.is_retryable() {
            return None;
        }
        let backoff = self.backoff(attempt)?;
        Some(backoff.max(err.retry_after().unwrap_or_default()))
    }
}

/// backon multiplies in `f32` seconds (200 ms comes out as 200.000003 ms); our delays are
/// configured in milliseconds.
fn round_to_ms(d: Duration) -> Duration {
    Duration::from_millis(((d.as_secs_f64() * 1_000.0).round()) as u64)
}

/// The result of [`LlmClient::call_with_retries`] and how many provider calls it took.
#[derive(Debug)]
pub struct Retried {
    pub result: Result<ChatResponse, CallError>,
    pub attempts: u32,
}

impl LlmClient {
    /// Calls until success, a fatal error or `policy.max_attempts()`, sleeping
    /// [`RetryPolicy::next_delay`] between attempts. `before_attempt(n)` runs before every
    /// attempt, the first included (n = 1, 2, …): acquire the shared budget there.
    ///
    /// A worker that must settle the budget after each attempt, or stop on cancellation,
    /// drives [`LlmClient::call`] and [`RetryPolicy::next_delay`] itself; dropping this future
    /// cancels it.
    pub async fn call_with_retries<F, Fut>(
        &self,
        key_name: &str,
        req: &ChatRequest,
        policy: &RetryPolicy,
        mut before_attempt: F,
    ) -> Retried
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut attempt = 1;
        loop {
            before_attempt(attempt).await;
            let err = match self.call(key_name, req).await {
                Ok(response) => {
                    return Retried {
                        result: Ok(response),
                        attempts: attempt,
                    };
                }
                Err(err) => err,
            };
            let Some(delay) = policy.next_delay(attempt, &err) else {
                return Retried {
                    result: Err(err),
                    attempts: attempt,
                };
            };
            debug!(
                key = key_name,
                attempt,
                delay_ms = delay.as_millis() as u64,
                kind = %err.kind,
                "llm call failed, will retry"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::headers::RateHeaders;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn err(kind: ErrorKind, retry_after: Option<Duration>) -> CallError {
        CallError {
            headers: RateHeaders {
                retry_after,
                ..RateHeaders::default()
            },
            ..CallError::new(kind, "x")
        }
    }

    #[test]
    fn exponential_capped_and_bounded() {
        let p = RetryPolicy::new(ms(100), ms(500), 5).without_jitter();
        let delays: Vec<_> = (1..=5).map(|a| p.backoff(a)).collect();
        assert_eq!(
            delays,
            [
                Some(ms(100)),
                Some(ms(200)),
                Some(ms(400)),
                Some(ms(500)),
                None
            ]
        );
        assert_eq!(p.backoff(0), None);
        assert_eq!(p.backoff(u32::MAX), None);
        assert_eq!(RetryPolicy::new(ms(100), ms(500), 1).backoff(1), None);
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling() {
        let p = RetryPolicy::new(ms(100), ms(1_000), 10);
        let samples: Vec<Duration> = (0..200).map(|_| p.backoff(3).unwrap()).collect();
        assert!(samples.iter().all(|d| *d <= ms(400)));
        // Full jitter spreads over the whole range, not just above the base.
        assert!(samples.iter().any(|d| *d < ms(200)));
        assert!(samples.iter().any(|d| *d > ms(200)));
    }

    #[test]
    fn next_delay_honours_fatal_errors_attempts_and_retry_after() {
        let p = RetryPolicy::new(ms(100), ms(500), 3).without_jitter();
        assert_eq!(
            p.next_delay(1, &err(ErrorKind::Server, None)),
            Some(ms(100))
        );
        assert_eq!(
            p.next_delay(2, &err(ErrorKind::Timeout, None)),
            Some(ms(200))
        );
        assert_eq!(p.next_delay(3, &err(ErrorKind::Server, None)), None);
        assert_eq!(p.next_delay(1, &err(ErrorKind::BadRequest, None)), None);
        assert_eq!(
            p.next_delay(1, &err(ErrorKind::QuotaExceeded, Some(ms(5)))),
            None
        );
        let limited = err(ErrorKind::RateLimited, Some(ms(2_500)));
        assert_eq!(p.next_delay(1, &limited), Some(ms(2_500)));
        let jittered = RetryPolicy::new(ms(100), ms(500), 3);
        assert!(jittered.next_delay(1, &limited).unwrap() >= ms(2_500));
    }
}
