//! Logging: `tracing` to stderr, text or JSON, filtered by `RUST_LOG` or the config's level.

use tracing_subscriber::EnvFilter;

/// Set up logging from the config's `[log]` section (`RUST_LOG` wins when set).
pub(crate) fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Logging for commands that take no config file (the simulator).
pub(crate) fn init_from_env() {
    let format = std::env::var("FANOUT_LOG_FORMAT").unwrap_or_else(|_| "text".into());
    init(&format, "info");
}

/// Logging at `level` unless RUST_LOG says otherwise (the demo keeps its terminal for progress).
pub(crate) fn init_from_env_with(level: &str) {
    let format = std::env::var("FANOUT_LOG_FORMAT").unwrap_or_else(|_| "text".into());
    init(&format, level);
}
