//! Token estimates for budget admission: the prompt counted with the model's tokenizer plus
//! `max_tokens`, which providers charge up front.

use tiktoken_rs::CoreBPE;

use crate::client::ChatRequest;

/// Tokens every chat message costs besides its content (`<|start|>role\n … <|end|>`).
const PER_MESSAGE: u64 = 4;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`).
const PER_REPLY: u64 = 3;

/// The tokenizer of `model`: `o200k_base` for the gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and o-series
/// families, `cl100k_base` otherwise.
///
/// Both are built once per process (tiktoken-rs keeps them in `LazyLock` statics; building one
/// takes ~100 ms), so call [`warm_up`] at startup to keep that off the first job.
fn bpe(model: &str) -> &'static CoreBPE {
    if uses_o200k(model) {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    }
}

fn uses_o200k(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model);
    let b = name.as_bytes();
    ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o"]
        .iter()
        .any(|p| name.starts_with(p))
        || (b.len() >= 2 && b[0] == b'o' && b[1].is_ascii_digit())
}

/// Builds both tokenizers now (blocking, ~0.2 s); run it in `spawn_blocking` at startup.
pub fn warm_up() {
    let _ = tiktoken_rs::o200k_base_singleton();
    let _ = tiktoken_rs::cl100k_base_singleton();
}

/// Tokens of `text` alone with `model`'s tokenizer (special-token text counts as plain text,
/// as the provider treats it).
pub fn count_tokens(model: &str, text: &str) -> u64 {
    bpe(model).encode_ordinary(text).len() as u64
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
}
