//! Counters of this process's budget activity, for the metrics crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Monotonic counters, updated with relaxed atomics (each is independent).
#[derive(Debug, Default)]
pub struct BudgetStats {
    /// Requests admitted (an `acquire` that returned an [`Admission`](crate::Admission)).
    pub admissions: AtomicU64,
    /// Acquires that had to sleep at least once before being admitted or giving up.
    pub waits: AtomicU64,
    /// Total time acquires spent waiting, in microseconds (admitted or not).
    pub wait_micros: AtomicU64,
    /// Acquires that gave up with [`Error::WaitTooLong`](crate::Error::WaitTooLong).
    pub wait_too_long: AtomicU64,
    /// Feedback calls that paused a budget or lowered its availability.
    pub pauses_applied: AtomicU64,
    /// Feedback calls reporting a 429.
    pub feedback_429: AtomicU64,
    /// Adaptive decreases this process applied (a 429 the schedule did not expect).
    pub decreases: AtomicU64,
    /// Feedback calls that stored newly advertised limits (or that the provider advertises none).
    pub limits_learnt: AtomicU64,
    /// Admissions that were the first call to a budget whose limits were not known yet.
    pub probes: AtomicU64,
    /// Feedback calls answered from this process's memory (nothing new for Redis).
    pub feedback_skipped: AtomicU64,
}

impl BudgetStats {
    /// Total time spent waiting for budget.
    pub fn total_wait(&self) -> Duration {
        Duration::from_micros(self.wait_micros.load(Ordering::Relaxed))
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
