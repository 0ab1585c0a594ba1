#![doc = include_str!("../README.md")]

mod backoff;
pub mod batch_api;
mod error;
mod job;
mod keys;
mod queue;
mod registry;
mod worker;

pub use backoff::retry_delay;
pub use error::{Error, Result};
pub use job::{ConsumerId, DeadLetter, Delivery, Enqueued, Lane, LaneDepth, NewJob, RetryOutcome};
pub use keys::GROUP;
pub use queue::{DEFAULT_IDEMPOTENCY_TTL, Queue};
pub use registry::WorkerInfo;
pub use worker::{Handler, Outcome, WorkerOptions, run_worker};
