//! Token estimates for budget admission: the prompt counted with the model's tokenizer plus
//! `max_tokens`, which providers charge up front.

use std::sync::LazyLock;

use crate::bpe::Encoding;
use crate::client::ChatRequest;

/// Tokens every chat message costs besides its content (`<|start|>role\n … <|end|>`).
pub(crate) const PER_MESSAGE: u64 = 4;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`).
pub(crate) const PER_REPLY: u64 = 3;

static O200K: LazyLock<Encoding> = LazyLock::new(Encoding::o200k_base);
static CL100K: LazyLock<Encoding> = LazyLock::new(Encoding::cl100k_base);

/// The tokenizer of `model`: `o200k_base` for the gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and o-series
/// families, `cl100k_base` otherwise.
///
/// Each is built once per process, on first use (~0.2 s, ~5 MiB), so call [`warm_up`] at startup
/// to keep that off the first job.
fn encoding(model: &str) -> &'static Encoding {
    if uses_o200k(model) { &O200K } else { &CL100K }
}

fn uses_o200k(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model);
    let b = name.as_bytes();
    ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o"]
        .iter()
        .any(|p| name.starts_with(p))
        || (b.len() >= 2 && b[0] == b'o' && b[1].is_ascii_digit())
}

/// Builds the tokenizer of `model` now (blocking, ~0.2 s); run it in `spawn_blocking` at startup.
pub fn warm_up(model: &str) {
    LazyLock::force(if uses_o200k(model) { &O200K } else { &CL100K });
}

/// Tokens of `text` alone with `model`'s tokenizer (special-token text counts as plain text,
/// as the provider treats it).
pub fn count_tokens(model: &str, text: &str) -> u64 {
    encoding(model).count(text) as u64
}

/// Prompt tokens of a system + user conversation, with the per-message overhead of the chat
/// format. Matches the provider's `usage.prompt_tokens` within a few tokens.
pub fn estimate_prompt_tokens(model: &str, system: Option<&str>, user: &str) -> u64 {
    let system = system.map_or(0, |s| PER_MESSAGE + count_tokens(model, s));
    PER_REPLY + system + PER_MESSAGE + count_tokens(model, user)
}

/// What admission should reserve for `req`: its prompt plus `max_tokens`.
pub fn estimate_tokens(req: &ChatRequest) -> u64 {
    estimate_prompt_tokens(&req.model, req.system.as_deref(), &req.user) + u64::from(req.max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_pick_their_tokenizer() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini-2024-07-18",
            "gpt-4.1-nano",
            "o1",
            "o3-mini",
            "gpt-5",
        ] {
            assert!(uses_o200k(m), "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-3.5-turbo",
            "gpt-4-turbo",
            "llama-3.1-8b",
            "omni",
        ] {
            assert!(!uses_o200k(m), "{m}");
        }
    }

    #[test]
    fn estimates_count_content_and_overhead() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count_tokens("gpt-4o", "hello world"), 2);
        assert_eq!(count_tokens("gpt-4", "hello world"), 2);
        assert_eq!(
            estimate_prompt_tokens("gpt-4o", None, "hello world"),
            3 + 4 + 2
        );
        assert_eq!(
            estimate_prompt_tokens("gpt-4o", Some("hello world"), "hello world"),
            3 + 8 + 4
        );
        // Special-token text is counted, not rejected.
        assert!(count_tokens("gpt-4o", "<|endoftext|>") > 1);
        let req = ChatRequest {
            model: "gpt-4o-mini".into(),
            system: None,
            user: "hello world".into(),
            max_tokens: 100,
            temperature: None,
        };
        assert_eq!(estimate_tokens(&req), 109);
    }

    /// Varied text: prose, code, numbers, several scripts, emoji and combining marks, runs of
    /// whitespace and punctuation long enough for the heap-based merge, the built-in templates,
    /// and random strings over a mixed alphabet.
    fn corpus() -> Vec<String> {
        use rand::{Rng, SeedableRng};

        let mut texts: Vec<String> = [
            "hello world",
            "The founder has ten years in logistics and wants a B2B product.\n\n## Risks\n- churn",
            "fn main() {\n    println!(\"{}\", 1_000_000 + 0x2A);\n}\n",
            "Prices: $1,299.99 or €1.299,99 (2024-07-18T12:34:56Z) 3.14159265358979",
            "日本語のテキストと中文文本，还有한국어 텍스트。",
            "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
            "emoji 👩‍👩‍👧‍👦 🚀🚀🚀 flags 🇩🇪🇫🇷 and é vs e\u{301} combining",
            "I'm sure they'll say we've done it; DON'T they'd?",
            "<|endoftext|> is text here, and <|fim_prefix|> too",
            "   leading spaces\t\ttabs\r\nwindows newlines\n\n\n   trailing   ",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        texts.push(" ".repeat(250));
        texts.push(format!("a{}b", "\n".repeat(130)));
        texts.push("!?-=".repeat(60));
        texts.push("abcdefghij".repeat(30));
        texts.push("Σ".repeat(120));
        texts.push("1234567890".repeat(20));
        let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/templates");
        for entry in std::fs::read_dir(templates).unwrap() {
            texts.push(std::fs::read_to_string(entry.unwrap().path()).unwrap());
        }
        let alphabet: Vec<char> =
            "aeiou bcdfgxyzAEIOUQ0123456789 \t\n\r.,;:!?'\"-_/()[]{}<>|$€£é日本語ЖжΩ🚀👍\u{301}"
                .chars()
                .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..400 {
            let len = rng.random_range(1..300);
            texts.push(
                (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect(),
            );
        }
        texts
    }

    #[test]
    fn counts_match_tiktoken_rs() {
        let cases = [
            ("gpt-4o", tiktoken_rs::o200k_base_singleton()),
            ("gpt-4", tiktoken_rs::cl100k_base_singleton()),
        ];
        for (model, reference) in cases {
            for text in corpus() {
                assert_eq!(
                    count_tokens(model, &text),
                    reference.encode_ordinary(&text).len() as u64,
                    "{model}: {text:?}"
                );
            }
        }
    }
}
