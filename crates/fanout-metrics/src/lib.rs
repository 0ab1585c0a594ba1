#![doc = include_str!("../README.md")]

use std::net::SocketAddr;
use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// Buckets for provider calls and jobs: 50 ms to 5 min.
const CALL_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
];
/// Buckets for budget waits: 1 ms to 1 min.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for whole reports: 1 s to 30 min.
const REPORT_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0,
];

/// The queue's lanes, as labels.
const LANES: [&str; 2] = ["interactive", "batch"];

/// A lane's depth for [`Metrics::set_queue_depth`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepth {
    pub ready: u64,
    pub pending: u64,
    pub delayed: u64,
    pub dead: u64,
    pub lag: u64,
    pub oldest_ready_secs: f64,
}

/// Every metric of a Fanout process, registered in [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub jobs_enqueued: IntCounterVec,
    pub jobs_started: IntCounterVec,
    pub jobs_completed: IntCounterVec,
    pub jobs_failed: IntCounterVec,
    pub jobs_retried: IntCounterVec,
    pub jobs_dead_lettered: IntCounterVec,
    pub jobs_released: IntCounterVec,
    pub job_duration: HistogramVec,
    pub jobs_in_flight: IntGauge,
    pub llm_duration: HistogramVec,
    pub llm_responses: IntCounterVec,
    pub llm_tokens: IntCounterVec,
    pub llm_cost: prometheus::CounterVec,
    pub budget_limit_requests: IntGaugeVec,
    pub budget_limit_tokens: IntGaugeVec,
    pub budget_configured_requests: IntGaugeVec,
    pub budget_configured_tokens: IntGaugeVec,
    pub budget_requests_available: prometheus::GaugeVec,
    pub budget_tokens_available: prometheus::GaugeVec,
    pub budget_admissions: IntCounterVec,
    pub budget_admitted_tokens: IntCounterVec,
    pub budget_wait: Histogram,
    pub budget_tenant_wait: HistogramVec,
    pub budget_wait_timeouts: IntCounter,
    pub budget_rate_limited: IntCounterVec,
    pub budget_pauses: IntCounterVec,
    pub concurrency_in_use: IntGauge,
    pub concurrency_limit: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub queue_lag: IntGaugeVec,
    pub queue_oldest_age: prometheus::GaugeVec,
    pub reports_submitted: IntCounterVec,
    pub reports_finished: IntCounterVec,
    pub report_duration: HistogramVec,
    pub cache_requests: IntCounterVec,
    pub batch_api_lines: IntCounterVec,
    pub batch_api_batches: IntCounterVec,
    pub batch_api_waiting: IntGauge,
    pub batch_api_open: IntGauge,
    pub batch_api_enqueued_tokens: IntGaugeVec,
    pub webhooks: IntCounterVec,
    pub worker_up: Gauge,
    pub workers_alive: IntGauge,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn fgauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
    let g = prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Metrics {
    /// One lane's depth, as every process that samples the queue exports it (the values are
    /// cluster-wide: aggregate them with `max`, not `sum`).
    pub fn set_queue_depth(&self, lane: &str, depth: QueueDepth) {
        for (state, v) in [
            ("ready", depth.ready),
            ("pending", depth.pending),
            ("delayed", depth.delayed),
            ("dead", depth.dead),
        ] {
            self.queue_depth
                .with_label_values(&[lane, state])
                .set(v as i64);
        }
        self.queue_lag
            .with_label_values(&[lane])
            .set(depth.lag as i64);
        self.queue_oldest_age
            .with_label_values(&[lane])
            .set(depth.oldest_ready_secs);
    }

    /// Create at 0 the worker's series whose labels are known at start: per API key and model
    /// family the budget's admissions, 429s and pauses; per lane the dead letters and
    /// releases; cache hits and misses; per provider model (the default one) the 200 and 429
    /// answers and the call latency; per tenant with a budget share its wait. A counter that
    /// first appears at its first event is invisible to `rate()` for that event, and
    /// dashboards show "No data" instead of 0.
    pub fn zero_worker_series(
        &self,
        keys: &[&str],
        families: &[&str],
        models: &[&str],
        tenants: &[&str],
    ) {
        for key in keys {
            for family in families {
                for c in [
                    &self.budget_admissions,
                    &self.budget_admitted_tokens,
                    &self.budget_rate_limited,
                    &self.budget_pauses,
                ] {
                    c.with_label_values(&[key, family]);
                }
            }
        }
        for lane in LANES {
            self.jobs_dead_lettered.with_label_values(&[lane]);
            self.jobs_released.with_label_values(&[lane]);
        }
        for result in ["hit", "miss"] {
            self.cache_requests.with_label_values(&[result]);
        }
        for outcome in [
            "parked",
            "completed",
            "failed",
            "retried",
            "live",
            "dropped",
        ] {
            self.batch_api_lines.with_label_values(&[outcome]);
        }
        for event in ["submitted", "completed", "failed", "expired", "cancelled"] {
            self.batch_api_batches.with_label_values(&[event]);
        }
        for model in models {
            for status in ["200", "429"] {
                self.llm_responses.with_label_values(&[model, status]);
            }
            for outcome in ["ok", "error"] {
                self.llm_duration.with_label_values(&[model, outcome]);
            }
        }
        for tenant in tenants {
            self.budget_tenant_wait.with_label_values(&[tenant]);
        }
    }

    /// Create at 0 the webhook outcomes (aggregator) and the reports submitted per known
    /// template (API), for the same reason.
    pub fn zero_webhook_series(&self) {
        for outcome in ["delivered", "retried", "dead"] {
            self.webhooks.with_label_values(&[outcome]);
        }
    }

    /// See [`Metrics::zero_webhook_series`].
    pub fn zero_template_series(&self, templates: &[&str]) {
        for t in templates {
            self.reports_submitted.with_label_values(&[t]);
        }
    }

    /// Create at 0 the aggregator's reports finished per known template and final status, and
    /// their durations: the first failed report is then an increase that `rate()` and the
    /// unhealthy-share alert see.
    pub fn zero_report_series(&self, templates: &[&str]) {
        for t in templates {
            for status in [
                "completed",
                "completed_with_failures",
                "failed",
                "cancelled",
            ] {
                self.reports_finished.with_label_values(&[t, status]);
            }
            self.report_duration.with_label_values(&[t]);
        }
    }

    fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            r.register(Box::new(pc)).expect("process collector");
        }
        let budget_wait = Histogram::with_opts(
            HistogramOpts::new(
                "fanout_budget_wait_seconds",
                "Time a provider call waited for budget (rate and concurrency) before admission.",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(budget_wait.clone()))
            .expect("registered once");
        let budget_wait_timeouts = IntCounter::new(
            "fanout_budget_wait_timeouts_total",
            "Jobs handed back to the queue because budget did not come within budget.max_wait_secs.",
        )
        .expect("valid metric");
        r.register(Box::new(budget_wait_timeouts.clone()))
            .expect("registered once");
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let jobs_in_flight =
            int_gauge("fanout_jobs_in_flight", "Jobs this process is running now.");
        let concurrency_in_use = int_gauge(
            "fanout_concurrency_in_use",
            "Provider calls in flight across the whole cluster (leases held).",
        );
        let workers_alive = int_gauge(
            "fanout_workers_alive",
            "Worker processes alive in the registry (beat within their liveness TTL), as the API process sees them.",
        );
        let concurrency_limit = int_gauge(
            "fanout_concurrency_limit",
            "The cluster-wide limit on provider calls in flight.",
        );
        let worker_up = Gauge::new(
            "fanout_worker_up",
            "1 while this worker process runs; sum over processes is the worker count.",
        )
        .expect("valid metric");
        r.register(Box::new(worker_up.clone()))
            .expect("registered once");
        Self {
            jobs_enqueued: counter(
                &r,
                "fanout_jobs_enqueued_total",
                "Section jobs put on a queue.",
                &["lane", "section"],
            ),
            jobs_started: counter(
                &r,
                "fanout_jobs_started_total",
                "Section jobs a worker started.",
                &["lane", "section"],
            ),
            jobs_completed: counter(
                &r,
                "fanout_jobs_completed_total",
                "Section jobs that finished with a result.",
                &["lane", "section"],
            ),
            jobs_failed: counter(
                &r,
                "fanout_jobs_failed_total",
                "Section jobs that failed for good, by error kind.",
                &["lane", "section", "reason"],
            ),
            jobs_retried: counter(
                &r,
                "fanout_jobs_retried_total",
                "Provider call attempts that failed and were retried.",
                &["lane", "section"],
            ),
            jobs_dead_lettered: counter(
                &r,
                "fanout_jobs_dead_lettered_total",
                "Jobs moved to the dead-letter stream.",
                &["lane"],
            ),
            jobs_released: counter(
                &r,
                "fanout_jobs_released_total",
                "Jobs handed back to the queue after waiting too long for budget.",
                &["lane"],
            ),
            job_duration: histogram(
                &r,
                "fanout_job_duration_seconds",
                "Wall time of a section job in a worker, budget waits and retries included.",
                &["section", "outcome"],
                CALL_BUCKETS,
            ),
            jobs_in_flight,
            llm_duration: histogram(
                &r,
                "fanout_llm_request_duration_seconds",
                "Latency of one provider call attempt.",
                &["model", "outcome"],
                CALL_BUCKETS,
            ),
            llm_responses: counter(
                &r,
                "fanout_llm_responses_total",
                "Provider responses by HTTP status (or timeout, connection, decode).",
                &["model", "status"],
            ),
            llm_tokens: counter(
                &r,
                "fanout_llm_tokens_total",
                "Tokens used, from the provider's usage.",
                &["model", "direction"],
            ),
            llm_cost: {
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        "fanout_llm_cost_dollars_total",
                        "Cost of provider calls from usage and the configured price table.",
                    ),
                    &["model"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("registered once");
                c
            },
            budget_limit_requests: gauge(
                &r,
                "fanout_budget_limit_requests_per_minute",
                "Requests per minute the budget paces to now: the provider's advertised limit (or the configured one), capped, lowered while the adaptive rate is below it.",
                &["key", "model"],
            ),
            budget_limit_tokens: gauge(
                &r,
                "fanout_budget_limit_tokens_per_minute",
                "Tokens per minute the budget paces to now: the provider's advertised limit (or the configured one), capped, lowered while the adaptive rate is below it.",
                &["key", "model"],
            ),
            budget_configured_requests: gauge(
                &r,
                "fanout_budget_configured_requests_per_minute",
                "Requests per minute configured (the plan's or set explicitly): the starting value, and a cap when set explicitly.",
                &["key", "model"],
            ),
            budget_configured_tokens: gauge(
                &r,
                "fanout_budget_configured_tokens_per_minute",
                "Tokens per minute configured (the plan's or set explicitly): the starting value, and a cap when set explicitly.",
                &["key", "model"],
            ),
            budget_requests_available: fgauge(
                &r,
                "fanout_budget_requests_available",
                "Requests the shared bucket could admit now.",
                &["key", "model"],
            ),
            budget_tokens_available: fgauge(
                &r,
                "fanout_budget_tokens_available",
                "Tokens the shared bucket could admit now.",
                &["key", "model"],
            ),
            budget_admissions: counter(
                &r,
                "fanout_budget_admissions_total",
                "Provider calls admitted by the shared budget.",
                &["key", "model"],
            ),
            budget_admitted_tokens: counter(
                &r,
                "fanout_budget_admitted_tokens_total",
                "Estimated tokens taken from the shared budget at admission.",
                &["key", "model"],
            ),
            budget_wait,
            budget_wait_timeouts,
            budget_rate_limited: counter(
                &r,
                "fanout_budget_rate_limited_total",
                "429 rate-limit answers from the provider.",
                &["key", "model"],
            ),
            budget_pauses: counter(
                &r,
                "fanout_budget_pauses_total",
                "Shared pauses applied to a budget after provider feedback.",
                &["key", "model"],
            ),
            concurrency_in_use,
            concurrency_limit,
            queue_depth: gauge(
                &r,
                "fanout_queue_depth",
                "Jobs per lane and state (ready, pending, delayed, dead).",
                &["lane", "state"],
            ),
            queue_lag: gauge(
                &r,
                "fanout_queue_lag",
                "Entries of the lane's stream not yet delivered to the worker group.",
                &["lane"],
            ),
            queue_oldest_age: fgauge(
                &r,
                "fanout_queue_oldest_age_seconds",
                "Age of the oldest ready job in the lane.",
                &["lane"],
            ),
            reports_submitted: counter(
                &r,
                "fanout_reports_submitted_total",
                "Reports accepted.",
                &["template"],
            ),
            reports_finished: counter(
                &r,
                "fanout_reports_finished_total",
                "Reports that reached a final status.",
                &["template", "status"],
            ),
            webhooks: counter(
                &r,
                "fanout_webhooks_total",
                "Webhook delivery attempts by outcome: delivered, retried (will try again) or dead (given up, kept with its reason).",
                &["outcome"],
            ),
            budget_tenant_wait: histogram(
                &r,
                "fanout_budget_tenant_wait_seconds",
                "Time a call of a tenant with a budget share ([budget_tenants]) waited for that share, before the shared budget.",
                &["tenant"],
                WAIT_BUCKETS,
            ),
            report_duration: histogram(
                &r,
                "fanout_report_duration_seconds",
                "Wall time from submission to final status.",
                &["template"],
                REPORT_BUCKETS,
            ),
            cache_requests: counter(
                &r,
                "fanout_cache_requests_total",
                "Response cache lookups by result (hit, miss).",
                &["result"],
            ),
            batch_api_lines: counter(
                &r,
                "fanout_batch_api_lines_total",
                "Sections in the Batch API lane by what became of them: parked (waiting for a \
                 batch), completed, failed, retried (into the next batch), live (moved to a \
                 live call for the deadline or the queue limit), dropped (report cancelled or \
                 gone).",
                &["outcome"],
            ),
            batch_api_batches: counter(
                &r,
                "fanout_batch_api_batches_total",
                "Provider batches by event: submitted, then how each ended (completed, failed, \
                 expired, cancelled).",
                &["event"],
            ),
            batch_api_waiting: {
                let g = IntGauge::new(
                    "fanout_batch_api_waiting_lines",
                    "Sections waiting for the next batch (cluster-wide; aggregate with max).",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            batch_api_open: {
                let g = IntGauge::new(
                    "fanout_batch_api_open_batches",
                    "Batches submitted (or being submitted) and not finished (cluster-wide).",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            batch_api_enqueued_tokens: gauge(
                &r,
                "fanout_batch_api_enqueued_tokens",
                "Enqueued tokens of the open batches per API key and model, against the \
                 provider's enqueued-token limit.",
                &["key", "model"],
            ),
            worker_up,
            workers_alive,
            registry: r,
        }
    }
}

/// The Prometheus text exposition of every metric of this process.
pub fn encode() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("prometheus text is utf-8")
}

/// An axum route serving `/metrics`, for processes that already run an HTTP server.
pub fn router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                encode(),
            )
        }),
    )
}

/// Serve `/metrics` on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_help() {
        METRICS
            .jobs_started
            .with_label_values(&["batch", "x"])
            .inc();
        METRICS.budget_wait.observe(0.01);
        let text = encode();
        assert!(text.contains("# HELP fanout_jobs_started_total"));
        assert!(text.contains("fanout_budget_wait_seconds_bucket"));
    }
}
