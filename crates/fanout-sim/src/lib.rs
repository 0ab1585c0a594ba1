#![doc = include_str!("../README.md")]

mod api;
mod batch;
mod config;
mod content;
mod faults;
mod files;
mod latency;
mod limits;
mod server;
mod sim;
mod stats;

use std::path::PathBuf;

pub use config::{KeyLimits, LatencySpec, LimitShape, ModelSpec, SimArgs, SimConfig};
pub use server::{SimHandle, router, run, spawn};
pub use sim::{RateEvent, Sim};
pub use stats::{BatchStats, Counters, KeyStats, SimStats};

/// Errors of the simulator's library API (all about its config).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value is out of range.
    #[error("invalid sim config: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read sim config {}", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The config is not valid TOML for [`SimConfig`] (unknown fields are refused).
    #[error("cannot parse sim config")]
    ParseConfig(#[source] Box<toml::de::Error>),
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
