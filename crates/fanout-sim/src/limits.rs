//! Per-key rate limits, enforced the way OpenAI does: per-minute limits quantized to the second.
//!
//! Each limited dimension (requests, tokens) is a token bucket holding at most
//! `max(1, limit / 60)` units and refilling `limit / 60` units per second of real time, so a
//! 600 RPM key may send 10 requests at once and then one every 100 ms, never 600 in one burst.
//! A request must fit in both buckets at once or it takes nothing.
//!
//! A cost larger than the bucket (a prompt plus `max_tokens` above `tpm / 60`) is admitted when
//! the bucket is full and leaves it in debt, which later requests wait out. A cost larger than
//! the whole per-minute limit can never be served and is refused as "request too large".

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// What a request costs against a key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cost {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// Which limit refused a request; the OpenAI error `type` of the 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// Over the limit for now; it fits again after `retry_after`.
    Wait {
        dimension: Dimension,
        limit: u64,
        retry_after: Duration,
    },
    /// Bigger than the whole per-minute limit: it will never fit.
    TooLarge { limit: u64, requested: u64 },
}

/// The `x-ratelimit-*` values of one dimension, as sent on every response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitHeaders {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// Nanoseconds in a minute: levels are kept in "unit-nanoseconds" (units × 60e9) so that a
/// refill of `limit` per minute is exact integer arithmetic, with no rounding drift.
const NANOS_PER_MINUTE: i128 = 60_000_000_000;

/// A token bucket for one per-minute limit.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    limit_per_minute: u64,
    /// `max(1, limit / 60)` units, scaled.
    capacity: i128,
    /// Current level, scaled; negative while in debt.
    level: i128,
    updated: Instant,
}

impl Bucket {
    /// A full bucket for a per-minute limit (which must not be 0).
    pub(crate) fn new(limit_per_minute: u64, now: Instant) -> Self {
        // max(1, limit / 60) units × 60e9 = max(60, limit) × 1e9.
        let capacity = i128::from(limit_per_minute.max(60)) * 1_000_000_000;
        Self {
            limit_per_minute,
            capacity,
            level: capacity,
            updated: now,
        }
    }

    fn rate(&self) -> i128 {
        i128::from(self.limit_per_minute)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        let gained = i128::try_from(elapsed)
            .unwrap_or(i128::MAX / 2)
            .saturating_mul(self.rate());
        self.level = self.level.saturating_add(gained).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// How long until `cost` may be taken (zero if it may be taken now). Call after `refill`.
    fn wait_for(&self, cost: u64) -> Duration {
        let needed = (i128::from(cost) * NANOS_PER_MINUTE).min(self.capacity);
        self.time_to_reach(needed)
    }

    fn time_to_reach(&self, level: i128) -> Duration {
        let missing = level - self.level;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let nanos = (missing + self.rate() - 1) / self.rate();
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn take(&mut self, cost: u64) {
        self.level -= i128::from(cost) * NANOS_PER_MINUTE;
    }

    /// Remaining budget expressed on the per-minute scale of the limit, so that a full bucket
    /// reads `limit` and an empty one `0`, like OpenAI's `x-ratelimit-remaining-*`.
    fn headers(&self) -> LimitHeaders {
        let remaining = self.level.max(0) * self.rate() / self.capacity;
        LimitHeaders {
            limit: self.limit_per_minute,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset: self.time_to_reach(self.capacity),
        }
    }
}

/// The limits of one API key: a bucket per limited dimension (none when unlimited).
#[derive(Debug, Clone)]
pub(crate) struct KeyLimiter {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Header values of both dimensions after a decision (`None` for an unlimited dimension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RateHeaders {
    pub(crate) requests: Option<LimitHeaders>,
    pub(crate) tokens: Option<LimitHeaders>,
}

impl KeyLimiter {
    /// Full buckets for `rpm` and `tpm`; `0` means unlimited.
    pub(crate) fn new(rpm: u64, tpm: u64, now: Instant) -> Self {
        let bucket = |limit| (limit > 0).then(|| Bucket::new(limit, now));
        Self {
            requests: bucket(rpm),
            tokens: bucket(tpm),
        }
    }

    /// Charges `cost` to both buckets if it fits in both, or charges nothing and says why.
    pub(crate) fn admit(&mut self, cost: Cost, now: Instant) -> (Result<(), Refusal>, RateHeaders) {
        let _ = self.snapshot(now);
        let outcome = self.check(cost);
        if outcome.is_ok() {
            if let Some(bucket) = &mut self.requests {
                bucket.take(cost.requests);
            }
            if let Some(bucket) = &mut self.tokens {
                bucket.take(cost.tokens);
            }
        }
        (outcome, self.headers())
    }

    /// The header values now, charging nothing (for requests refused before admission).
    pub(crate) fn snapshot(&mut self, now: Instant) -> RateHeaders {
        for bucket in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            bucket.refill(now);
        }
        self.headers()
    }

    fn check(&self, cost: Cost) -> Result<(), Refusal> {
        if let Some(tokens) = &self.tokens {
            if cost.tokens > tokens.limit_per_minute {
                return Err(Refusal::TooLarge {
                    limit: tokens.limit_per_minute,
                    requested: cost.tokens,
                });
            }
        }
        let waits = [
            (Dimension::Requests, &self.requests, cost.requests),
            (Dimension::Tokens, &self.tokens, cost.tokens),
        ];
        let longest = waits
            .into_iter()
            .filter_map(|(dimension, bucket, cost)| {
                bucket
                    .as_ref()
                    .map(|b| (dimension, b.limit_per_minute, b.wait_for(cost)))
            })
            .filter(|(_, _, wait)| !wait.is_zero())
            .max_by_key(|(_, _, wait)| *wait);
        match longest {
            Some((dimension, limit, retry_after)) => Err(Refusal::Wait {
                dimension,
                limit,
                retry_after,
            }),
            None => Ok(()),
        }
    }

    fn headers(&self) -> RateHeaders {
        RateHeaders {
            requests: self.requests.as_ref().map(Bucket::headers),
            tokens: self.tokens.as_ref().map(Bucket::headers),
        }
    }
}

/// Formats a duration like OpenAI's `x-ratelimit-reset-*` headers (`6m0s`, `1s`, `1.5s`,
/// `250ms`), rounded up to the millisecond so that a non-zero wait never reads `0s`.
pub(crate) fn format_reset(duration: Duration) -> String {
    let total_ms = ceil_millis(duration);
    if total_ms == 0 {
        return "0s".to_owned();
    }
    if total_ms < 1000 {
        return format!("{total_ms}ms");
    }
    let hours = total_ms / 3_600_000;
    let minutes = total_ms / 60_000 % 60;
    let millis_in_minute = total_ms % 60_000;
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let seconds = millis_in_minute / 1000;
    let fraction = millis_in_minute % 1000;
    if fraction == 0 {
        let _ = write!(out, "{seconds}s");
    } else {
        let digits = format!("{fraction:03}");
        let _ = write!(out, "{seconds}.{}s", digits.trim_end_matches('0'));
    }
    out
}

/// Whole milliseconds, rounded up.
pub(crate) fn ceil_millis(duration: Duration) -> u64 {
    let millis = duration.as_millis();
    let rounded = if duration.subsec_nanos() % 1_000_000 == 0 {
        millis
    } else {
        millis + 1
    };
    u64::try_from(rounded).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up, at least 1 (the `retry-after` header).
pub(crate) fn ceil_secs(duration: Duration) -> u64 {
    ceil_millis(duration).div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn request(tokens: u64) -> Cost {
        Cost {
            requests: 1,
            tokens,
        }
    }

    #[test]
    fn rpm_is_quantized_to_the_second() {
        let t0 = Instant::now();
        // 600 RPM: 10 at once, then one every 100 ms.
        let mut limiter = KeyLimiter::new(600, 0, t0);
        for _ in 0..10 {
            assert!(limiter.admit(request(1), t0).0.is_ok());
        }
        let (refused, headers) = limiter.admit(request(1), t0);
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Requests,
                limit: 600,
                retry_after: ms(100)
            })
        );
        let requests = headers.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (600, 0));
        assert_eq!(requests.reset, Duration::from_secs(1));
        assert!(headers.tokens.is_none());

        assert!(limiter.admit(request(1), t0 + ms(50)).0.is_err());
        let (admitted, headers) = limiter.admit(request(1), t0 + ms(100));
        assert!(admitted.is_ok());
        assert_eq!(headers.requests.unwrap().remaining, 0);
    }

    #[test]
    fn small_limits_hold_one_request() {
        let t0 = Instant::now();
        // 3 RPM: capacity 1, one request every 20 s.
        let mut limiter = KeyLimiter::new(3, 0, t0);
        let (admitted, headers) = limiter.admit(request(1), t0);
        assert!(admitted.is_ok());
        assert_eq!(headers.requests.unwrap().reset, Duration::from_secs(20));
        let (refused, _) = limiter.admit(request(1), t0 + Duration::from_secs(5));
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Requests,
                limit: 3,
                retry_after: Duration::from_secs(15)
            })
        );
        assert!(
            limiter
                .admit(request(1), t0 + Duration::from_secs(20))
                .0
                .is_ok()
        );
    }

    #[test]
    fn tokens_are_charged_with_requests_or_not_at_all() {
        let t0 = Instant::now();
        // 6,000 TPM: 100 tokens per second.
        let mut limiter = KeyLimiter::new(600, 6_000, t0);
        assert!(limiter.admit(request(80), t0).0.is_ok());
        let (refused, headers) = limiter.admit(request(30), t0);
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Tokens,
                limit: 6_000,
                retry_after: ms(100)
            })
        );
        // The refused request took no request budget: 9 of 10 are left.
        assert_eq!(headers.requests.unwrap().remaining, 540);
        assert_eq!(headers.tokens.unwrap().remaining, 1_200);
        assert!(limiter.admit(request(30), t0 + ms(100)).0.is_ok());
    }

    #[test]
    fn oversized_costs_go_into_debt_or_are_too_large() {
        let t0 = Instant::now();
        let mut limiter = KeyLimiter::new(0, 6_000, t0);
        // 250 tokens > the 100-token bucket: admitted because the bucket is full.
        assert!(limiter.admit(request(250), t0).0.is_ok());
        // The debt of 150 plus a full bucket of 100 takes 2.5 s to refill.
        let (refused, headers) = limiter.admit(request(250), t0 + ms(500));
        assert_eq!(headers.tokens.unwrap().reset, ms(2_000));
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Tokens,
                limit: 6_000,
                retry_after: ms(2_000)
            })
        );
        assert!(limiter.admit(request(250), t0 + ms(2_500)).0.is_ok());
        assert_eq!(
            limiter
                .admit(request(6_001), t0 + Duration::from_secs(60))
                .0,
            Err(Refusal::TooLarge {
                limit: 6_000,
                requested: 6_001
            })
        );
    }

    #[test]
    fn unlimited_admits_everything() {
        let t0 = Instant::now();
        let mut limiter = KeyLimiter::new(0, 0, t0);
        for _ in 0..1_000 {
            assert_eq!(
                limiter.admit(request(1_000_000), t0),
                (Ok(()), RateHeaders::default())
            );
        }
    }

    #[test]
    fn a_clock_going_backwards_does_not_refill() {
        let t0 = Instant::now();
        let mut limiter = KeyLimiter::new(60, 0, t0 + Duration::from_secs(10));
        assert!(
            limiter
                .admit(request(1), t0 + Duration::from_secs(10))
                .0
                .is_ok()
        );
        assert!(limiter.admit(request(1), t0).0.is_err());
    }

    #[test]
    fn reset_durations_read_like_openai() {
        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_micros(1)), "1ms");
        assert_eq!(format_reset(ms(250)), "250ms");
        assert_eq!(format_reset(ms(1_000)), "1s");
        assert_eq!(format_reset(ms(1_500)), "1.5s");
        assert_eq!(format_reset(ms(3_125)), "3.125s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(ms(61_020)), "1m1.02s");
        assert_eq!(format_reset(Duration::from_secs(3_600)), "1h0m0s");
        assert_eq!(ceil_secs(ms(100)), 1);
        assert_eq!(ceil_secs(ms(1_001)), 2);
        assert_eq!(ceil_millis(Duration::from_micros(100_001)), 101);
    }
}
