//! The values that go in and out of the queue.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

/// Which stream family a job goes to. Interactive jobs are always served before batch jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    Interactive,
    Batch,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Interactive, Lane::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Interactive => 0,
            Self::Batch => 1,
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job to enqueue. `id` is unique and is also the idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub id: String,
    pub lane: Lane,
    /// Higher is served sooner within the lane; each value has its own stream.
    pub priority: u8,
    /// Opaque to the queue; stored as JSON text.
    pub payload: serde_json::Value,
    /// Not started before this time (the job waits in the delayed set until then).
    pub not_before: Option<SystemTime>,
}

impl NewJob {
    /// An interactive job with priority 0, ready now.
    pub fn new(id: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            id: id.into(),
            lane: Lane::Interactive,
            priority: 0,
            payload,
            not_before: None,
        }
    }

    pub fn lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }
}

/// What `enqueue` did with a job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Accepted; carries the job id.
    New(String),
    /// A job with this id was accepted within the idempotency TTL; nothing was written.
    Duplicate(String),
}

impl Enqueued {
    pub fn job_id(&self) -> &str {
        match self {
            Self::New(id) | Self::Duplicate(id) => id,
        }
    }

    pub fn is_new(&self) -> bool {
        matches!(self, Self::New(_))
    }
}

/// A claimed job. Settle it with `ack`, `retry`, `release` or `dead_letter`; keep it alive with
/// `extend` while it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub job_id: String,
    pub lane: Lane,
    pub priority: u8,
    pub payload: serde_json::Value,
    /// 1-based; grows with each `retry`, not with `release` or a reclaim.
    pub attempt: u32,
    /// How often this attempt was handed to a worker (above 1: a worker died holding it).
    pub deliveries: u32,
    /// When the job was first enqueued (Redis clock).
    pub enqueued_at_ms: u64,
    /// The error of the previous attempt, if this is a retry.
    pub last_error: Option<String>,
    pub(crate) stream: String,
    pub(crate) entry_id: String,
    pub(crate) consumer: String,
}

impl Delivery {
    /// The stream entry id of this delivery (changes when the job is retried or released).
    pub fn entry_id(&self) -> &str {
        &self.entry_id
    }

    /// The stream this delivery came from.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The consumer that holds it.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }
}

/// This machine's host name (the pod name on Kubernetes).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// A consumer name, unique per process: `<prefix>-<host>-<pid>-<random>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConsumerId(String);

impl ConsumerId {
    pub fn unique(prefix: &str) -> Self {
        let host = hostname();
        let random: u32 = rand::rng().random();
        Self(format!(
            "{prefix}-{host}-{}-{random:08x}",
            std::process::id()
        ))
    }

    /// A fixed name (tests, or an operator who manages names).
    pub fn named(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `retry` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The job waits in the delayed set until `at`.
    Scheduled { at: SystemTime },
    /// `max_attempts` reached: the job is in the dead-letter stream.
    DeadLettered,
}

/// Depth of one lane, summed over its priority streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneDepth {
    pub lane: Lane,
    /// Entries not yet delivered to any consumer.
    pub ready: u64,
    /// Delivered, not yet settled (in flight, or held by a dead worker until reclaimed).
    pub pending: u64,
    /// Waiting for a retry backoff or a `not_before`.
    pub delayed: u64,
    /// Entries in the lane's dead-letter stream.
    pub dead: u64,
    /// Sum of the consumer groups' `lag` (what KEDA's redis-streams scaler reads); `None` when
    /// Redis cannot compute it (entries deleted ahead of the group, see `remove`).
    pub lag: Option<u64>,
    /// Age of the oldest ready entry.
    pub oldest_ready_age: Option<Duration>,
    /// Per priority: (priority, ready, pending).
    pub by_priority: Vec<(u8, u64, u64)>,
}

/// A job in a dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub job_id: String,
    pub lane: Lane,
    pub priority: Option<u8>,
    /// The payload as JSON, when it is JSON.
    pub payload: Option<serde_json::Value>,
    /// The payload exactly as it was stored.
    pub raw_payload: String,
    pub last_error: String,
    pub reason: String,
    pub attempts: u32,
    pub deliveries: u32,
    pub enqueued_at_ms: Option<u64>,
    pub dead_at_ms: u64,
    /// The dead-letter stream entry id.
    pub entry_id: String,
}

impl DeadLetter {
    /// `<lane>:<entry id>`, e.g. `interactive:1733000000000-0`: what replay and drop take.
    pub fn id(&self) -> String {
        format!("{}:{}", self.lane.as_str(), self.entry_id)
    }

    /// The lane and entry id of [`DeadLetter::id`], if `id` is one.
    pub fn parse_id(id: &str) -> Option<(Lane, &str)> {
        let (lane, entry) = id.split_once(':')?;
        let (ms, seq) = entry.split_once('-')?;
        // Stream ids are two u64s: anything else would be a Redis error, not "not found".
        let number = |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok();
        (number(ms) && number(seq)).then_some((Lane::parse(lane)?, entry))
    }
}

pub(crate) fn system_time_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn ms_to_system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_ids_are_unique_per_call_and_name_the_process() {
        let a = ConsumerId::unique("w");
        let b = ConsumerId::unique("w");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("w-"));
        assert!(a.as_str().contains(&format!("-{}-", std::process::id())));
    }
}
