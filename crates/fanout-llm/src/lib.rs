#![doc = include_str!("../README.md")]

mod batch;
mod bpe;
mod cache;
mod calibrate;
mod client;
mod cost;
mod error;
mod headers;
mod retry;
mod tokens;

pub use batch::{BATCH_ENDPOINT, BatchAnswer, BatchInfo, BatchState, parse_batch_record};
pub use cache::{CacheKeys, CacheStats, ResponseCache, request_hash};
pub use calibrate::{Estimate, PromptCalibration, Ratios};
pub use client::{ChatRequest, ChatResponse, LlmClient};
pub use cost::{CostTable, cost};
pub use error::{CallError, ErrorKind};
pub use headers::{RateHeaders, parse_reset};
pub use retry::{Retried, RetryPolicy};
pub use tokens::{
    count_tokens, estimate_prompt_tokens, estimate_tokens, warm_up as warm_up_tokenizers,
};

/// Building an [`LlmClient`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no api key is configured: set OPENAI_API_KEY, or the variable a [[provider.keys]] entry names"
    )]
    NoKeys,
    #[error("cannot build the http client: {0}")]
    Http(#[source] reqwest::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
