//! Injected failures: random ones at the configured rates, and deterministic ones asked for by
//! markers in the prompt.
//!
//! | marker | effect |
//! | --- | --- |
//! | `[sim:fail]` | 500 after admission |
//! | `[sim:hang]` | admitted, then no answer until the client gives up or the sim shuts down |
//! | `[sim:truncate]` | 200 whose body stops in the middle of the JSON |
//! | `[sim:quota]` | 429 `insufficient_quota`, without `retry-after`, before admission |
//! | `[sim:error=400]`, `=401`, `=404`, `=500` | that status with an OpenAI error body |
//! | `[sim:context_length]` | 400 `context_length_exceeded` |
//! | `[sim:fail_first=N]` | 500 for the first N admitted requests with the same messages |

use std::collections::HashMap;

use rand::Rng;

use crate::api::ChatRequest;
use crate::config::SimConfig;

/// What the markers of one request ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Markers {
    /// `[sim:error=N]`.
    pub(crate) error: Option<u16>,
    pub(crate) context_length: bool,
    pub(crate) quota: bool,
    pub(crate) fail: bool,
    pub(crate) hang: bool,
    pub(crate) truncate: bool,
    /// `[sim:fail_first=N]`.
    pub(crate) fail_first: Option<u32>,
}

impl Markers {
    /// Reads every `[sim:…]` marker in any message; an unknown one is an error so that a typo in
    /// a test does not pass silently.
    pub(crate) fn parse(request: &ChatRequest) -> Result<Self, String> {
        let mut markers = Self::default();
        for message in &request.messages {
            let text = message.text();
            let mut rest = text.as_str();
            while let Some(start) = rest.find("[sim:") {
                let after = &rest[start + "[sim:".len()..];
                let Some(end) = after.find(']') else { break };
                markers.apply(&after[..end])?;
                rest = &after[end..];
            }
        }
        Ok(markers)
    }

    fn apply(&mut self, marker: &str) -> Result<(), String> {
        let unknown = || format!("unknown simulator marker [sim:{marker}]");
        match marker.split_once('=') {
            None => match marker {
                "fail" => self.fail = true,
                "hang" => self.hang = true,
                "truncate" => self.truncate = true,
                "quota" => self.quota = true,
                "context_length" => self.context_length = true,
                _ => return Err(unknown()),
            },
            Some(("error", status)) => match status.parse() {
                Ok(status @ (400 | 401 | 404 | 500)) => self.error = Some(status),
                _ => return Err(unknown()),
            },
            Some(("fail_first", n)) => self.fail_first = Some(n.parse().map_err(|_| unknown())?),
            Some(_) => return Err(unknown()),
        }
        Ok(())
    }
}

/// A fault drawn at the configured rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RandomFault {
    None,
    Fail,
    Hang,
    Truncate,
    Quota,
}

impl RandomFault {
    /// One uniform draw split by the rates, so that they never overlap (their sum is at most 1).
    pub(crate) fn draw(config: &SimConfig, rng: &mut impl Rng) -> Self {
        let u: f64 = rng.random();
        let bands = [
            (config.fail_rate, Self::Fail),
            (config.hang_rate, Self::Hang),
            (config.truncate_rate, Self::Truncate),
            (config.quota_rate, Self::Quota),
        ];
        let mut edge = 0.0;
        for (rate, fault) in bands {
            edge += rate;
            if u < edge {
                return fault;
            }
        }
        Self::None
    }
}

/// Counts admitted requests per messages hash for `[sim:fail_first=N]`.
#[derive(Debug, Default)]
pub(crate) struct FailFirst {
    seen: HashMap<String, u32>,
}

impl FailFirst {
    /// Records one more admitted request with these messages; true while it is among the first `n`.
    pub(crate) fn should_fail(&mut self, messages_hash: &str, n: u32) -> bool {
        let seen = self.seen.entry(messages_hash.to_owned()).or_default();
        *seen = seen.saturating_add(1);
        *seen <= n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    fn request(text: &str) -> ChatRequest {
        serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": text}],
        }))
        .unwrap()
    }

    #[test]
    fn markers_are_read_anywhere() {
        let markers =
            Markers::parse(&request("a [sim:hang] b [sim:error=401][sim:fail_first=2]")).unwrap();
        assert!(markers.hang);
        assert_eq!(markers.error, Some(401));
        assert_eq!(markers.fail_first, Some(2));
        assert_eq!(
            Markers::parse(&request("[sim:nope]")),
            Err("unknown simulator marker [sim:nope]".into())
        );
        assert!(Markers::parse(&request("[sim:error=418]")).is_err());
        assert_eq!(
            Markers::parse(&request("[sim: unterminated")),
            Ok(Markers::default())
        );
    }

    #[test]
    fn fail_first_counts_per_prompt() {
        let mut fail_first = FailFirst::default();
        assert!(fail_first.should_fail("a", 2));
        assert!(fail_first.should_fail("a", 2));
        assert!(!fail_first.should_fail("a", 2));
        assert!(fail_first.should_fail("b", 2));
    }

    #[test]
    fn random_faults_follow_the_rates() {
        let config = SimConfig {
            fail_rate: 0.25,
            quota_rate: 0.25,
            ..SimConfig::instant()
        };
        let mut rng = StdRng::seed_from_u64(3);
        let draws: Vec<RandomFault> = (0..4_000)
            .map(|_| RandomFault::draw(&config, &mut rng))
            .collect();
        let share = |fault| draws.iter().filter(|d| **d == fault).count() as f64 / 4_000.0;
        assert!((0.22..0.28).contains(&share(RandomFault::Fail)));
        assert!((0.22..0.28).contains(&share(RandomFault::Quota)));
        assert_eq!(share(RandomFault::Hang), 0.0);
        assert!((0.47..0.53).contains(&share(RandomFault::None)));
    }
}
