#![doc = include_str!("../README.md")]

mod batch_api;
mod section;

pub use section::{SectionHandler, WorkerDeps, redis_pool};

use std::sync::Arc;
use std::time::Duration;

use fanout_core::Config;
use tokio_util::sync::CancellationToken;

/// Options of one worker process beyond the shared config.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs in flight in this process.
    pub concurrency: usize,
    /// How long in-flight jobs may take to finish after shutdown is requested.
    pub grace: Duration,
}

impl WorkerOptions {
    pub fn from_config(config: &Config) -> Self {
        Self {
            concurrency: config.worker.concurrency,
            grace: Duration::from_secs(config.worker.grace_secs),
        }
    }
}

/// Run a worker process until `shutdown`: claim section jobs, take budget, call the provider,
/// complete sections and release their dependents. Returns after draining.
pub async fn run(
    config: Arc<Config>,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let deps = WorkerDeps::connect(config.clone())?;
    let handler = Arc::new(SectionHandler::new(deps.clone()));
    // The default model's tokenizer, built now rather than inside the first job.
    let model = config.provider.default_model.clone();
    tokio::task::spawn_blocking(move || fanout_llm::warm_up_tokenizers(&model)).await?;
    let queue_options = fanout_queue::WorkerOptions {
        concurrency: options.concurrency.max(1),
        grace: options.grace,
        job_timeout: Duration::from_secs(config.worker.job_timeout_secs),
        liveness_ttl: Duration::from_millis(config.worker.liveness_ttl_ms),
        ..fanout_queue::WorkerOptions::default()
    };
    fanout_metrics::METRICS.worker_up.set(1.0);
    // Series whose labels are known now exist from the start at 0: panels show 0, not
    // "No data", and `rate()` alerts see the first 429 or dead letter as an increase.
    let keys: Vec<&str> = config
        .provider
        .keys
        .iter()
        .map(|k| k.name.as_str())
        .collect();
    let default_model = config.provider.default_model.as_str();
    let mut families = vec![fanout_core::config::model_family(default_model)];
    families.extend(config.budget.models.keys().map(String::as_str));
    families.sort_unstable();
    families.dedup();
    let tenants: Vec<&str> = config
        .budget
        .tenant_shares
        .keys()
        .map(String::as_str)
        .collect();
    fanout_metrics::METRICS.zero_worker_series(&keys, &families, &[default_model], &tenants);
    fanout_metrics::METRICS
        .concurrency_limit
        .set(i64::from(config.budget.max_concurrent_requests));
    tracing::info!(
        concurrency = queue_options.concurrency,
        keys = config.provider.keys.len(),
        "worker started"
    );
    let gauges = tokio::spawn(section::export_gauges(deps.clone(), shutdown.child_token()));
    let batches = tokio::spawn(batch_api::run(handler.clone(), shutdown.child_token()));
    let result =
        fanout_queue::run_worker(deps.queue.clone(), handler, queue_options, shutdown.clone())
            .await;
    shutdown.cancel();
    let _ = gauges.await;
    let _ = batches.await;
    fanout_metrics::METRICS.worker_up.set(0.0);
    tracing::info!("worker stopped");
    result.map_err(Into::into)
}
