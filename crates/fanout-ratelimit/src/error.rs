//! What can go wrong while taking or settling budget.

use std::time::Duration;

/// A budget error. Everything but a configuration mistake is retryable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to Redis failed; the job should go back to the queue and be retried.
    #[error("budget redis call failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be had from the pool.
    #[error("budget could not get a redis connection: {0}")]
    Pool(#[from] fanout_core::redis::PoolError),
    /// The budget would not have room within the request's `max_wait`: hand the job back to the
    /// queue and try again after `retry_after` (the wait the budget predicted).
    #[error("waiting for budget would take too long, retry after {retry_after:?}")]
    WaitTooLong { retry_after: Duration },
    /// The request's estimated tokens exceed a whole minute of every key's token limit (the
    /// provider's, or the configured cap): no wait makes it fit, and the provider would refuse it
    /// as "request too large".
    #[error(
        "request too large: {tokens} estimated tokens (prompt + max_tokens) exceed the token budget of {tokens_per_minute} per minute; lower max_tokens or shorten the prompt"
    )]
    TooLarge { tokens: u64, tokens_per_minute: u64 },
    /// The budget was built without API keys.
    #[error("the budget has no api keys to take from")]
    NoKeys,
    /// Feedback named a key this budget does not know.
    #[error("api key `{0}` is not one of the budget's keys")]
    UnknownKey(String),
    /// A script answered something this crate does not understand (a version mismatch).
    #[error("unexpected reply from budget script `{script}`: {detail}")]
    Reply {
        script: &'static str,
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying the same thing later can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Self::NoKeys | Self::UnknownKey(_) | Self::TooLarge { .. }
        )
    }

    /// When to try again, if the budget knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::WaitTooLong { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}
