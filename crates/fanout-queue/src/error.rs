//! Errors of the queue.

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis answered with an error, or the connection failed or timed out. Retryable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be had from the pool. Retryable.
    #[error("redis pool: {0}")]
    Pool(#[from] fanout_core::redis::PoolError),
    /// The delivery is no longer held by this consumer: another consumer reclaimed it after
    /// missed heartbeats, it was already settled, or it was removed. Nothing was changed.
    #[error("job {job_id} (entry {entry_id}) is no longer held by this consumer")]
    Lost { job_id: String, entry_id: String },
    /// A job id the queue cannot store.
    #[error("job id `{0}` is invalid: it must be 1-200 bytes")]
    InvalidJobId(String),
    /// A script answered something this version does not understand.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// `run_worker` options that cannot work.
    #[error("invalid worker options: {0}")]
    Options(String),
}

impl Error {
    /// Whether trying again later may succeed (Redis or pool trouble).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Redis(_) | Self::Pool(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
