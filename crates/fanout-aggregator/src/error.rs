//! Errors of the report store and the aggregator.

/// What can go wrong talking to the report store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    Pool(#[from] fanout_core::redis::PoolError),
    /// The report never existed or has expired (`reports.ttl_secs` after it finished).
    #[error("report `{report}` not found (unknown or expired)")]
    ReportNotFound { report: String },
    #[error("report `{report}` has no job `{job}`")]
    UnknownJob { report: String, job: String },
    /// The report handed to `create` cannot be stored (empty or inconsistent job graph, bad
    /// lane).
    #[error("invalid report: {0}")]
    InvalidReport(String),
    /// The idempotency key was used for another request (template, inputs, lane or callback)
    /// of the same tenant: `report` is the report it made.
    #[error("the idempotency key was used for another request (report `{report}`)")]
    IdempotencyConflict { report: String },
    /// Something in Redis does not have the shape this code writes.
    #[error("corrupt report record `{report}`: {message}")]
    Corrupt { report: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A transient failure (Redis unreachable, pool exhausted): the same call may succeed
    /// later. Everything else is fatal for the call that met it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Redis(e) => !matches!(e.retry_method(), redis::RetryMethod::NoRetry),
            Self::Pool(_) => true,
            _ => false,
        }
    }

    /// The report is unknown or expired.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::ReportNotFound { .. })
    }

    pub(crate) fn corrupt(report: &str, message: impl Into<String>) -> Self {
        Self::Corrupt {
            report: report.to_owned(),
            message: message.into(),
        }
    }

    /// The consumer group or its stream is gone (Redis restarted, stream deleted).
    pub(crate) fn is_nogroup(&self) -> bool {
        matches!(self, Self::Redis(e) if e.code() == Some("NOGROUP"))
    }
}
