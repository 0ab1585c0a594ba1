//! The latency model: a log-normal time to first token, then a fixed time per output token,
//! both multiplied by the config's `time_scale`.

use std::time::Duration;

use rand::Rng;

use crate::config::LatencySpec;

/// Latencies are capped here so that a wild config cannot overflow a deadline.
const MAX_LATENCY: Duration = Duration::from_secs(24 * 60 * 60);

/// The timing of one response, already scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timing {
    pub(crate) first_token: Duration,
    pub(crate) per_token: Duration,
}

impl Timing {
    /// Draws the time to first token as `ttft_ms × exp(spread × z)` with `z` standard normal, so
    /// `ttft_ms` is the median and `spread` the log-normal sigma.
    pub(crate) fn draw(spec: &LatencySpec, time_scale: f64, rng: &mut impl Rng) -> Self {
        let z = standard_normal(rng);
        let first_token_ms = spec.ttft_ms * (spec.spread * z).exp();
        Self {
            first_token: scaled_ms(first_token_ms, time_scale),
            per_token: scaled_ms(spec.ms_per_output_token, time_scale),
        }
    }

    /// When the `tokens`-th output token is out, counted from the request's arrival.
    pub(crate) fn after_tokens(&self, tokens: u64) -> Duration {
        let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
        self.first_token
            .saturating_add(self.per_token.saturating_mul(tokens))
            .min(MAX_LATENCY)
    }
}

fn scaled_ms(ms: f64, time_scale: f64) -> Duration {
    Duration::try_from_secs_f64(ms * time_scale / 1000.0)
        .unwrap_or(MAX_LATENCY)
        .min(MAX_LATENCY)
}

/// A standard normal draw (Box–Muller), so no distribution crate is needed for one formula.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln stays finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    #[test]
    fn ttft_is_log_normal_around_the_median() {
        let spec = LatencySpec {
            ttft_ms: 400.0,
            ms_per_output_token: 25.0,
            spread: 0.3,
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut samples: Vec<Duration> = (0..2_001)
            .map(|_| Timing::draw(&spec, 1.0, &mut rng).first_token)
            .collect();
        samples.sort();
        let median = samples[1_000].as_secs_f64() * 1000.0;
        assert!((370.0..430.0).contains(&median), "median {median} ms");
    }

    #[test]
    fn time_scale_and_tokens() {
        let spec = LatencySpec {
            ttft_ms: 1000.0,
            ms_per_output_token: 10.0,
            spread: 0.0,
        };
        let mut rng = StdRng::seed_from_u64(1);
        let timing = Timing::draw(&spec, 0.5, &mut rng);
        assert_eq!(timing.first_token, Duration::from_millis(500));
        assert_eq!(timing.after_tokens(100), Duration::from_millis(1_000));
        let instant = Timing::draw(&spec, 0.0, &mut rng);
        assert_eq!(instant.after_tokens(u64::MAX), Duration::ZERO);
        let huge = Timing::draw(&spec, f64::MAX, &mut rng);
        assert_eq!(huge.after_tokens(10), MAX_LATENCY);
    }
}
