//! What the simulator saw, per API key and in total, for tests and benchmarks to check.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A snapshot of the simulator's counters (`GET /sim/stats`, [`crate::SimHandle::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// All keys together; its window maxima are over the whole account, not a sum.
    pub totals: Counters,
    /// One entry per API key seen, sorted by fingerprint.
    pub keys: Vec<KeyStats>,
    /// Requests refused with 401 because they carried no bearer token.
    pub unauthenticated: u64,
    /// What the Files and Batch APIs did; batch requests are in no other counter.
    #[serde(default)]
    pub batches: BatchStats,
}

/// The counters of the Files and Batch APIs, all keys together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchStats {
    /// Batch input files uploaded (and accepted).
    pub files_uploaded: u64,
    /// Batches created, including those that then failed validation.
    pub created: u64,
    /// Batches that ended `completed`.
    pub completed: u64,
    /// Batches that ended `failed` (validation: the enqueued-token limit, mixed models).
    pub failed: u64,
    /// Batches that ended `expired`.
    pub expired: u64,
    /// Batches that ended `cancelled`.
    pub cancelled: u64,
    /// Requests of ended batches answered with a 200 (output file lines).
    pub requests_completed: u64,
    /// Requests of ended batches that failed with an error status (error file lines with a
    /// `response`).
    pub requests_failed: u64,
    /// Requests left unfinished by expired batches (`batch_expired`).
    pub requests_expired: u64,
    /// Requests left unfinished by cancelled batches (`batch_cancelled`).
    pub requests_cancelled: u64,
    /// Prompt tokens reported in the `usage` of the answered batch requests.
    pub prompt_tokens: u64,
    /// Completion tokens reported in the `usage` of the answered batch requests.
    pub completion_tokens: u64,
    /// Tokens enqueued now: prompt + `max_tokens` of every request of the batches that have
    /// not ended (and did not fail validation).
    pub enqueued_tokens: u64,
}

/// The counters of one API key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    /// The key's fingerprint (`sk-…abcd`), never the secret itself.
    pub key: String,
    /// Requests per minute allowed (`0` = unlimited).
    pub rpm_limit: u64,
    /// Tokens per minute allowed (`0` = unlimited).
    pub tpm_limit: u64,
    /// What this key's requests met.
    #[serde(flatten)]
    pub counters: Counters,
}

/// Request and token counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests received with this key (every outcome).
    pub requests: u64,
    /// Requests that passed the rate limiter and were charged (whatever happened after).
    pub admitted: u64,
    /// Admitted requests answered in full (200 with a whole body or stream).
    pub completed: u64,
    /// 429 `rate_limit_exceeded` sent.
    pub rate_limited: u64,
    /// 429 `insufficient_quota` sent.
    pub quota_exceeded: u64,
    /// 4xx errors sent other than 429 (invalid requests, markers).
    pub client_errors: u64,
    /// 500 errors injected after admission.
    pub server_errors: u64,
    /// Admitted requests left hanging.
    pub hung: u64,
    /// Admitted requests whose body was cut.
    pub truncated: u64,
    /// Most requests admitted within any 1-second sliding window.
    pub max_admitted_1s: u64,
    /// Most requests admitted within any 60-second sliding window.
    pub max_admitted_60s: u64,
    /// Tokens charged to the rate limiter: prompt + `max_tokens` of each admitted request.
    pub tokens_charged: u64,
    /// Prompt tokens reported in the `usage` of 200 responses.
    pub prompt_tokens: u64,
    /// Completion tokens reported in the `usage` of 200 responses.
    pub completion_tokens: u64,
    /// Requests the simulated neighbour on the same key drew (`neighbour_share`), up to the
    /// snapshot; they are in no other counter.
    #[serde(default)]
    pub neighbour_requests: u64,
    /// Tokens the simulated neighbour on the same key drew; they are in no other counter.
    #[serde(default)]
    pub neighbour_tokens: u64,
}

/// How one request ended, as far as the counters care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    RateLimited,
    QuotaExceeded,
    ClientError,
    ServerError,
    Hung,
    Truncated,
    Completed,
}

/// Counters plus the admission times needed for the sliding-window maxima.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) counters: Counters,
    /// Admission times of the last 60 seconds, oldest first.
    recent: VecDeque<Instant>,
}

const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);

impl Tally {
    pub(crate) fn seen(&mut self) {
        self.counters.requests += 1;
    }

    /// Records an admission at `now` charging `tokens`; `now` never goes backwards.
    pub(crate) fn admitted(&mut self, now: Instant, tokens: u64) {
        let c = &mut self.counters;
        c.admitted += 1;
        c.tokens_charged += tokens;
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        // The busiest window always ends at an admission, so checking the windows that end now
        // is enough to keep the maxima exact.
        let in_last_second = self.recent.len()
            - self
                .recent
                .partition_point(|t| now.duration_since(*t) >= SECOND);
        c.max_admitted_60s = c.max_admitted_60s.max(self.recent.len() as u64);
        c.max_admitted_1s = c.max_admitted_1s.max(in_last_second as u64);
    }

    pub(crate) fn finished(&mut self, outcome: Outcome) {
        let c = &mut self.counters;
        let counter = match outcome {
            Outcome::RateLimited => &mut c.rate_limited,
            Outcome::QuotaExceeded => &mut c.quota_exceeded,
            Outcome::ClientError => &mut c.client_errors,
            Outcome::ServerError => &mut c.server_errors,
            Outcome::Hung => &mut c.hung,
            Outcome::Truncated => &mut c.truncated,
            Outcome::Completed => &mut c.completed,
        };
        *counter += 1;
    }

    /// Usage reported in a 200 response.
    pub(crate) fn usage(&mut self, prompt_tokens: u64, completion_tokens: u64) {
        self.counters.prompt_tokens += prompt_tokens;
        self.counters.completion_tokens += completion_tokens;
    }
}

/// A key as it may be shown: its prefix and last four characters (`sk-…abcd`), less for short
/// keys, so that stats and logs can tell keys apart without revealing them.
pub(crate) fn fingerprint(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let shown_tail = match chars.len() {
        0..=5 => 0,
        6..=11 => 2,
        _ => 4,
    };
    let prefix: String = match key.find('-') {
        Some(dash) if chars.len() >= 12 && dash <= 4 => key[..=dash].to_owned(),
        _ => String::new(),
    };
    let tail: String = chars[chars.len() - shown_tail..].iter().collect();
    format!("{prefix}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_maxima_slide() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut tally = Tally::default();
        for ms in [0, 100, 900, 1_000, 1_050] {
            tally.admitted(at(ms), 10);
        }
        // (50 ms, 1050 ms] holds 100, 900, 1000, 1050.
        assert_eq!(tally.counters.max_admitted_1s, 4);
        assert_eq!(tally.counters.max_admitted_60s, 5);
        tally.admitted(at(61_000), 10);
        assert_eq!(tally.counters.max_admitted_60s, 5);
        assert_eq!(tally.recent.len(), 2);
        assert_eq!(tally.counters.tokens_charged, 60);
        assert_eq!(tally.counters.admitted, 6);
    }

    #[test]
    fn fingerprints_hide_the_secret() {
        assert_eq!(fingerprint("sk-proj-abcdefghijklmnop"), "sk-…mnop");
        assert_eq!(fingerprint("sim-key-0001"), "sim-…0001");
        assert_eq!(fingerprint("secret"), "…et");
        assert_eq!(fingerprint("k1"), "…");
    }
}
