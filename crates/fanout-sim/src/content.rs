//! Deterministic answers and the simulator's token count.
//!
//! The answer is a function of the model and the messages alone: the same prompt always gets the
//! same text, whatever the seed, the key or the time. It reads
//!
//! ```text
//! SIM-ANSWER 3f2a9c0d1e4b5a67
//! echo: <first 200 characters of the last user message, newlines as spaces>
//! refs: <the hashes of every `SIM-ANSWER` quoted anywhere in the messages, in order>
//! lorem words drawn from a generator seeded by the hash ...
//! ```
//!
//! Tokens are approximated as one per 4 characters (rounded up), plus 4 per message for the
//! prompt. The completion is cut or padded to exactly `4 × completion_tokens` characters, so its
//! count by the same rule is exact; with a small `max_tokens` even the first lines are cut.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};

use crate::api::ChatRequest;

/// Tokens added per message for its role and framing, like OpenAI's chat format does.
const TOKENS_PER_MESSAGE: u64 = 4;
/// Characters per token in the approximation.
const CHARS_PER_TOKEN: usize = 4;
/// How much of the last user message the answer echoes.
const ECHO_CHARS: usize = 200;

const WORDS: &[&str] = &[
    "market",
    "risk",
    "customer",
    "growth",
    "revenue",
    "signal",
    "segment",
    "pricing",
    "channel",
    "retention",
    "margin",
    "pilot",
    "metric",
    "launch",
    "budget",
    "partner",
    "cohort",
    "demand",
    "supply",
    "forecast",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "with",
    "for",
    "is",
    "by",
    "early",
    "strong",
    "weak",
    "clear",
    "likely",
    "next",
    "quarter",
    "team",
    "product",
    "founder",
];

/// A completion, decided before any latency is simulated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) content: String,
    pub(crate) completion_tokens: u64,
    /// `true` when the completion used all of `max_tokens` (`finish_reason: "length"`).
    pub(crate) hit_limit: bool,
}

/// Approximate tokens of a text: characters / 4, rounded up.
pub(crate) fn text_tokens(text: &str) -> u64 {
    text.chars().count().div_ceil(CHARS_PER_TOKEN) as u64
}

/// Approximate prompt tokens: each message's text tokens plus 4.
pub(crate) fn prompt_tokens(request: &ChatRequest) -> u64 {
    request
        .messages
        .iter()
        .map(|message| text_tokens(&message.text()) + TOKENS_PER_MESSAGE)
        .sum()
}

/// A hash of the messages only (roles and texts), as 16 hex digits.
pub(crate) fn messages_hash(request: &ChatRequest) -> String {
    digest(None, request)
}

/// A hash of the model and the messages, as 16 hex digits: the identity of an answer.
pub(crate) fn answer_hash(request: &ChatRequest) -> String {
    digest(Some(&request.model), request)
}

fn digest(model: Option<&str>, request: &ChatRequest) -> String {
    let mut hasher = Sha256::new();
    if let Some(model) = model {
        hasher.update(model.as_bytes());
        hasher.update([0]);
    }
    for message in &request.messages {
        hasher.update(message.role.as_bytes());
        hasher.update([0]);
        hasher.update(message.text().as_bytes());
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..8])
}

/// The answer to `request` with at most `max_tokens` completion tokens.
///
/// Its length is drawn in `[ceil(0.6 × max_tokens), max_tokens]` from a generator seeded by the
/// answer hash, so it too depends on the prompt only.
pub(crate) fn answer(request: &ChatRequest, max_tokens: u32) -> Answer {
    let hash = answer_hash(request);
    let mut rng = StdRng::seed_from_u64(u64::from_str_radix(&hash, 16).unwrap_or_default());
    let max_tokens = u64::from(max_tokens);
    let shortest = (max_tokens * 3).div_ceil(5);
    let completion_tokens = rng.random_range(shortest..=max_tokens);
    let length = usize::try_from(completion_tokens).unwrap_or(usize::MAX) * CHARS_PER_TOKEN;

    let echo: String = last_user_text(request)
        .chars()
        .take(ECHO_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let refs = quoted_answers(request).join(" ");
    let mut content = format!("SIM-ANSWER {hash}\necho: {echo}\nrefs: {refs}\n");
    let mut chars = content.chars().count();
    while chars < length {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        content.push_str(word);
        content.push(if rng.random_ratio(1, 12) { '\n' } else { ' ' });
        chars += word.len() + 1;
    }
    let content: String = content.chars().take(length).collect();
    Answer {
        content,
        completion_tokens,
        hit_limit: completion_tokens == max_tokens,
    }
}

/// Hashes of earlier answers quoted in the prompt: a pipeline test can see which results a
/// dependent call was given, without reading the prompt.
fn quoted_answers(request: &ChatRequest) -> Vec<String> {
    let mut refs = Vec::new();
    for message in &request.messages {
        let text = message.text();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("SIM-ANSWER ") {
            rest = &rest[at + "SIM-ANSWER ".len()..];
            let hash: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            if hash.len() == 16 && !refs.contains(&hash) {
                refs.push(hash);
            }
        }
    }
    refs
}

fn last_user_text(request: &ChatRequest) -> String {
    request
        .messages
        .iter()
        .rev()
        .find(|message| message.role == "user")
        .map(|message| message.text())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &str, user: &str) -> ChatRequest {
        serde_json::from_value(serde_json::json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": user}]},
            ],
        }))
        .unwrap()
    }

    #[test]
    fn answers_depend_on_model_and_messages_only() {
        let a = answer(&request("m", "hello\nworld"), 256);
        assert_eq!(a, answer(&request("m", "hello\nworld"), 256));
        assert_ne!(
            a.content,
            answer(&request("m2", "hello\nworld"), 256).content
        );
        let mut lines = a.content.lines();
        let first = lines.next().unwrap();
        assert!(first.starts_with("SIM-ANSWER ") && first.len() == "SIM-ANSWER ".len() + 16);
        assert_eq!(lines.next().unwrap(), "echo: hello world");
        assert!((154..=256).contains(&a.completion_tokens));
        assert_eq!(text_tokens(&a.content), a.completion_tokens);
        assert_eq!(a.hit_limit, a.completion_tokens == 256);
    }

    #[test]
    fn quoted_answers_are_listed_as_refs() {
        let first = answer(&request("m", "profile please"), 64);
        let hash = &first.content.lines().next().unwrap()["SIM-ANSWER ".len()..];
        let prompt = format!(
            "Build on this:\n{}\nand again SIM-ANSWER {hash}",
            first.content
        );
        let second = answer(&request("m", &prompt), 256);
        assert_eq!(
            second.content.lines().nth(2).unwrap(),
            format!("refs: {hash}")
        );
        let plain = answer(&request("m", "nothing quoted"), 256);
        assert_eq!(plain.content.lines().nth(2).unwrap(), "refs: ");
    }

    #[test]
    fn echo_is_capped_and_small_limits_cut_the_text() {
        let long = "x".repeat(500);
        let a = answer(&request("m", &long), 1_000);
        let echo = a.content.lines().nth(1).unwrap();
        assert_eq!(echo, format!("echo: {}", "x".repeat(200)));
        let tiny = answer(&request("m", "hi"), 1);
        assert_eq!((tiny.content.as_str(), tiny.completion_tokens), ("SIM-", 1));
        assert!(tiny.hit_limit);
    }

    #[test]
    fn prompt_tokens_are_chars_over_four_plus_four_per_message() {
        // "You are terse." is 14 chars → 4 tokens; "abcde" → 2 tokens; plus 2 × 4.
        assert_eq!(prompt_tokens(&request("m", "abcde")), 14);
        assert_ne!(
            messages_hash(&request("m", "a")),
            messages_hash(&request("m", "b"))
        );
        assert_eq!(
            messages_hash(&request("m", "a")),
            messages_hash(&request("n", "a"))
        );
    }
}
