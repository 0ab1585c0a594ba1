#![doc = include_str!("../README.md")]

mod budget;
mod error;
mod keeper;
mod keys;
mod redis_conn;
mod stats;

pub use budget::{AcquireRequest, Admission, Budget, BudgetSnapshot, Dimension, ProviderSignal};
pub use error::{Error, Result};
pub use stats::BudgetStats;
