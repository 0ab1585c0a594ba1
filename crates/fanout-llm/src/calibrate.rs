//! Prompt estimates calibrated to how the provider counts.
//!
//! Admission reserves a prompt's tokens before the call, counted with the model's tokenizer. The
//! provider's limiter counts its own way: another tokenizer (a compatible server running another
//! model), a characters-based estimate at arrival, extra per-message overhead. A prompt it counts
//! 20% larger than we did overruns a short window by that much, and for a large prompt that is a
//! 429 no schedule can avoid. Every answer says how the provider counted the prompt
//! (`usage.prompt_tokens`), so each process keeps, per model, the largest ratio of the provider's
//! count to ours over its recent answers and scales its next estimates by it. A provider that counts
//! fewer tokens than we do is not followed below 1: the budget settles to the provider's count after
//! the call, so over-reserving costs a moment of headroom, not a 429.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::client::ChatRequest;
use crate::tokens::{PER_MESSAGE, PER_REPLY, estimate_prompt_tokens};

/// Answers remembered per model: the ratio follows a provider that changes its counting within
/// this many calls.
const SAMPLES: usize = 64;
/// Prompts shorter than this (by our count) say little about a ratio: a few tokens of overhead
/// would read as a large one.
const MIN_PROMPT: u64 = 32;
/// The ratio is never taken above this: a provider that reports four times our count is reporting
/// something else (cached or tool tokens), and following it would starve the budget.
const MAX_RATIO: f64 = 4.0;

/// Per-model ratios of the provider's prompt count to ours (see the module docs).
///
/// Two counts are kept side by side: the model's tokenizer, and characters / 4 (the rule of thumb
/// of limiters that estimate at arrival). Each is scaled by the largest ratio recent answers showed
/// for it, and the larger of the two is reserved: whichever way the provider counts, one of them
/// follows it, and a prompt of another kind of text than the earlier ones (a summary of generated
/// critiques after the persona prompts) is not counted short. Reserving more than the provider
/// counted costs nothing lasting: the budget settles to the provider's count after the call.
#[derive(Debug, Default)]
pub struct PromptCalibration {
    models: Mutex<HashMap<String, Samples>>,
}

#[derive(Debug, Default)]
struct Samples {
    tokenizer: VecDeque<f64>,
    chars: VecDeque<f64>,
}

/// What admission should reserve for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The prompt by the model's tokenizer.
    pub prompt: u64,
    /// The prompt as characters / 4 (plus the chat format's overhead).
    pub prompt_chars: u64,
    /// The prompt as the provider will likely count it, plus `max_tokens`: what to reserve.
    pub tokens: u64,
}

fn push(ring: &mut VecDeque<f64>, ratio: f64) {
    if ring.len() == SAMPLES {
        ring.pop_front();
    }
    ring.push_back(ratio);
}

fn largest(ring: &VecDeque<f64>) -> Option<f64> {
    ring.iter().copied().reduce(f64::max)
}

/// The scale of each count for a model: the tokenizer's (at least 1), and the characters' (none
/// until an answer came).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    pub tokenizer: f64,
    pub chars: Option<f64>,
}

/// A prompt's size as characters / 4, with the chat format's overhead (the same as the
/// tokenizer's estimate adds).
fn chars_estimate(system: Option<&str>, user: &str) -> u64 {
    let chars = |s: &str| s.chars().count().div_ceil(4) as u64;
    let system = system.map_or(0, |s| PER_MESSAGE + chars(s));
    PER_REPLY + system + PER_MESSAGE + chars(user)
}

impl PromptCalibration {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current ratios for `model`.
    pub fn ratios(&self, model: &str) -> Ratios {
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let samples = models.get(model);
        Ratios {
            tokenizer: samples
                .and_then(|s| largest(&s.tokenizer))
                .unwrap_or(1.0)
                .clamp(1.0, MAX_RATIO),
            chars: samples
                .and_then(|s| largest(&s.chars))
                .map(|r| r.clamp(1.0 / MAX_RATIO, MAX_RATIO)),
        }
    }

    /// What to reserve for `req`: its prompt as the provider will likely count it, plus
    /// `max_tokens`.
    pub fn estimate(&self, req: &ChatRequest) -> Estimate {
        let prompt = estimate_prompt_tokens(&req.model, req.system.as_deref(), &req.user);
        let prompt_chars = chars_estimate(req.system.as_deref(), &req.user);
        let ratios = self.ratios(&req.model);
        let by_tokenizer = (prompt as f64 * ratios.tokenizer).ceil() as u64;
        let by_chars = ratios
            .chars
            .map_or(0, |r| (prompt_chars as f64 * r).ceil() as u64);
        Estimate {
            prompt,
            prompt_chars,
            tokens: by_tokenizer.max(by_chars) + u64::from(req.max_tokens),
        }
    }

    /// Records an answer to a request estimated as `estimate`: the provider counted `theirs`
    /// prompt tokens.
    pub fn observe(&self, model: &str, estimate: &Estimate, theirs: u64) {
        if estimate.prompt < MIN_PROMPT || estimate.prompt_chars < MIN_PROMPT || theirs == 0 {
            return;
        }
        let before = self.ratios(model);
        {
            let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
            let samples = models.entry(model.to_owned()).or_default();
            push(
                &mut samples.tokenizer,
                theirs as f64 / estimate.prompt as f64,
            );
            push(
                &mut samples.chars,
                theirs as f64 / estimate.prompt_chars as f64,
            );
        }
        let after = self.ratios(model);
        if (after.tokenizer - before.tokenizer).abs() >= 0.05 {
            tracing::info!(
                model,
                ratio = format_args!("{:.2}", after.tokenizer),
                "the provider counts prompts larger than our tokenizer: estimates scaled"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: &str) -> ChatRequest {
        ChatRequest {
            model: "gpt-4o-mini".into(),
            system: None,
            user: user.into(),
            max_tokens: 100,
            temperature: None,
        }
    }

    /// Texts whose tokens per character differ a lot.
    const PERSONA: &str = "The founder has ten years in logistics and wants a B2B product. ";
    const SUMMARY: &str = "international organizations responsibilities ";

    #[test]
    fn estimates_follow_a_provider_that_counts_more() {
        let c = PromptCalibration::new();
        let r = req(&PERSONA.repeat(10));
        let plain = c.estimate(&r);
        assert_eq!(plain.tokens, plain.prompt + 100);
        c.observe("gpt-4o-mini", &plain, plain.prompt * 5 / 4);
        let scaled = c.estimate(&r);
        assert_eq!(scaled.prompt, plain.prompt);
        assert!(scaled.tokens >= plain.prompt * 5 / 4 + 100);
        // Other models keep their own ratios.
        assert_eq!(c.ratios("gpt-4o").tokenizer, 1.0);
    }

    #[test]
    fn another_kind_of_text_is_not_counted_short() {
        // A provider counting characters / 4: after persona prompts, a summary prompt of text
        // with far fewer characters per token is reserved at the provider's count.
        let c = PromptCalibration::new();
        for _ in 0..10 {
            let e = c.estimate(&req(&PERSONA.repeat(10)));
            c.observe("gpt-4o-mini", &e, e.prompt_chars);
        }
        let summary = c.estimate(&req(&SUMMARY.repeat(200)));
        assert!(summary.prompt_chars > summary.prompt, "{summary:?}");
        assert!(summary.tokens >= summary.prompt_chars + 100, "{summary:?}");
        // A provider counting with the tokenizer: its own count, whatever the text.
        let c = PromptCalibration::new();
        for _ in 0..10 {
            let e = c.estimate(&req(&SUMMARY.repeat(50)));
            c.observe("gpt-4o-mini", &e, e.prompt);
        }
        let other = c.estimate(&req(&SUMMARY.repeat(300)));
        assert!(other.tokens >= other.prompt + 100, "{other:?}");
        assert!(other.tokens <= other.prompt * 11 / 10 + 100, "{other:?}");
    }

    #[test]
    fn ratios_stay_within_bounds() {
        let e = |prompt| Estimate {
            prompt,
            prompt_chars: prompt,
            tokens: prompt,
        };
        let c = PromptCalibration::new();
        c.observe("m", &e(1000), 500);
        assert_eq!(c.ratios("m").tokenizer, 1.0);
        assert_eq!(c.ratios("m").chars, Some(0.5));
        c.observe("m", &e(1000), 100_000);
        assert_eq!(c.ratios("m").tokenizer, MAX_RATIO);
        // Short prompts and missing counts are ignored.
        let c = PromptCalibration::new();
        c.observe("m", &e(10), 30);
        c.observe("m", &e(1000), 0);
        assert_eq!(
            c.ratios("m"),
            Ratios {
                tokenizer: 1.0,
                chars: None
            }
        );
    }

    #[test]
    fn an_old_ratio_ages_out() {
        let e = Estimate {
            prompt: 1000,
            prompt_chars: 1000,
            tokens: 1000,
        };
        let c = PromptCalibration::new();
        c.observe("m", &e, 1500);
        for _ in 0..SAMPLES - 1 {
            c.observe("m", &e, 1100);
        }
        assert_eq!(c.ratios("m").tokenizer, 1.5);
        c.observe("m", &e, 1100);
        assert!((c.ratios("m").tokenizer - 1.1).abs() < 1e-9);
    }
}
