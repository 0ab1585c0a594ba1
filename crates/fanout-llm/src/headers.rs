//! The provider's rate headers (`retry-after`, `retry-after-ms`, `x-ratelimit-*`), which the typed
//! async-openai API drops and the capture service keeps.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

/// What the provider said about its limits on one response (success or error).
///
/// Every field is `None` when the header was absent or unreadable. Counts are `u32` (saturating)
/// so that a `CallError` stays small.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateHeaders {
    /// How long to wait before retrying: `retry-after-ms` if present, else `retry-after` seconds.
    pub retry_after: Option<Duration>,
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<u32>,
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u32>,
    /// `x-ratelimit-reset-requests` (`"1s"`, `"6m0s"`, `"250ms"`).
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u32>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u32>,
    /// `x-ratelimit-reset-tokens`.
    pub reset_tokens: Option<Duration>,
}

impl RateHeaders {
    /// Reads the rate headers of a response; unknown or malformed values are left `None`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        // u32 keeps `CallError` small; a larger count saturates (no real limit comes close).
        let number = |name: &str| {
            text(name)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        let reset = |name: &str| text(name).and_then(parse_reset);
        let retry_after_ms = text("retry-after-ms")
            .and_then(|v| v.parse::<f64>().ok())
            .and_then(|ms| Duration::try_from_secs_f64(ms / 1_000.0).ok());
        let retry_after_s = text("retry-after")
            .and_then(|v| v.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        Self {
            retry_after: retry_after_ms.or(retry_after_s),
            limit_requests: number("x-ratelimit-limit-requests"),
            remaining_requests: number("x-ratelimit-remaining-requests"),
            reset_requests: reset("x-ratelimit-reset-requests"),
            limit_tokens: number("x-ratelimit-limit-tokens"),
            remaining_tokens: number("x-ratelimit-remaining-tokens"),
            reset_tokens: reset("x-ratelimit-reset-tokens"),
        }
    }

    /// True when the provider sent none of these headers.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Parses OpenAI's reset durations: a sequence of number + unit (`h`, `m`, `s`, `ms`, `us`/`µs`,
/// `ns`), e.g. `"6m0s"`, `"1s"`, `"250ms"`, `"1h2m3.5s"`. A bare number is seconds.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = 0.0_f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn reset_formats() {
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("1s"), Some(ms(1_000)));
        assert_eq!(parse_reset("250ms"), Some(ms(250)));
        assert_eq!(parse_reset("1.5s"), Some(ms(1_500)));
        assert_eq!(parse_reset("1m1.02s"), Some(ms(61_020)));
        assert_eq!(parse_reset("1h2m3.5s"), Some(ms(3_723_500)));
        assert_eq!(parse_reset("0s"), Some(Duration::ZERO));
        assert_eq!(parse_reset("20"), Some(ms(20_000)));
        assert_eq!(parse_reset(""), None);
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset("5d"), None);
        assert_eq!(parse_reset("m5"), None);
    }

    #[test]
    fn headers_prefer_retry_after_ms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(RateHeaders::from_headers(&h).retry_after, Some(ms(2_000)));
        h.insert("retry-after-ms", HeaderValue::from_static("1250.5"));
        h.insert(
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("600"),
        );
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("599"),
        );
        h.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("100ms"),
        );
        h.insert(
            "x-ratelimit-limit-tokens",
            HeaderValue::from_static("150000"),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("149000"),
        );
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        let r = RateHeaders::from_headers(&h);
        assert_eq!(r.retry_after, Some(Duration::from_micros(1_250_500)));
        assert_eq!(r.limit_requests, Some(600));
        assert_eq!(r.remaining_requests, Some(599));
        assert_eq!(r.reset_requests, Some(ms(100)));
        assert_eq!(r.limit_tokens, Some(150_000));
        assert_eq!(r.remaining_tokens, Some(149_000));
        assert_eq!(r.reset_tokens, Some(Duration::from_secs(360)));
        assert!(RateHeaders::from_headers(&HeaderMap::new()).is_empty());
    }
}
