//! The section job handler: render → budget → call → settle → complete, with retries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;

use fanout_aggregator::{Released, SectionResult, StartOutcome, Started, Store};
use fanout_core::Config;
use fanout_core::job::SectionJob;
use fanout_llm::{
    CallError, ChatRequest, ChatResponse, LlmClient, PromptCalibration, ResponseCache, RetryPolicy,
};
use fanout_metrics::METRICS;
use fanout_queue::batch_api::{BatchApiStore, Settle, Where};
use fanout_queue::{Delivery, Handler, Lane, NewJob, Outcome, Queue};
use fanout_ratelimit::{AcquireRequest, Admission, Budget, Dimension, ProviderSignal};
use tokio_util::sync::CancellationToken;

/// Everything a worker process talks to, built once from the config.
#[derive(Debug, Clone)]
pub struct WorkerDeps {
    pub config: Arc<Config>,
    pub queue: Queue,
    pub budget: Budget,
    pub store: Store,
    pub llm: Arc<LlmClient>,
    pub cache: Arc<ResponseCache>,
    /// How the provider counts prompts against our tokenizer, learnt from its answers.
    pub prompts: Arc<PromptCalibration>,
    /// The Batch API lane's state: sections waiting for a batch, batches in flight.
    pub batches: BatchApiStore,
}

impl WorkerDeps {
    pub fn connect(config: Arc<Config>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !config.provider.keys.is_empty(),
            "no API key: set OPENAI_API_KEY (or the variable named by a [[provider.keys]] entry)"
        );
        let pool = redis_pool(&config)?;
        let ns = &config.redis.namespace;
        let key_names = config
            .provider
            .keys
            .iter()
            .map(|k| k.name.clone())
            .collect();
        let budget = Budget::new(pool.clone(), ns, config.budget.clone(), key_names);
        budget.track(&config.provider.default_model);
        Ok(Self {
            queue: Queue::from_config(pool.clone(), &config),
            budget,
            store: Store::new(
                pool.clone(),
                ns,
                Duration::from_secs(config.reports.ttl_secs),
            ),
            llm: Arc::new(LlmClient::new(&config.provider)?),
            cache: Arc::new(ResponseCache::new(
                pool.clone(),
                ns,
                Duration::from_secs(config.cache.ttl_secs),
            )),
            batches: BatchApiStore::new(pool, ns),
            prompts: Arc::new(PromptCalibration::new()),
            config,
        })
    }
}

/// A deadpool-redis pool from the config (URL, size, command timeout).
pub fn redis_pool(config: &Config) -> anyhow::Result<fanout_core::redis::Pool> {
    fanout_core::redis::pool(&config.redis).map_err(anyhow::Error::msg)
}

/// Runs one section job per delivery.
#[derive(Debug)]
pub struct SectionHandler {
    pub(crate) deps: WorkerDeps,
    retry: RetryPolicy,
}

impl SectionHandler {
    pub fn new(deps: WorkerDeps) -> Self {
        let retry = RetryPolicy::from_queue_config(&deps.config.queue);
        Self { deps, retry }
    }
}

/// How long a job handed back because Redis was unavailable waits before it is claimed again.
const REDIS_UNAVAILABLE_DELAY: Duration = Duration::from_secs(1);

/// Whether `e` is Redis being unavailable for a while (connection refused or dropped, a
/// timeout, no connection to be had in time, a cluster failing over, too few replicas), rather
/// than an answer that repeating would not change (a script error, a corrupt record, a wrong
/// password, a `redis://` URL aimed at a cluster node or at a replica), which spends attempts.
fn redis_unavailable(e: &anyhow::Error) -> bool {
    fn transient(e: &redis::RedisError) -> bool {
        e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::BusyLoading
                ) | redis::ErrorKind::ClusterConnectionNotFound
            )
    }
    fn pool(e: &fanout_core::redis::PoolError) -> bool {
        match e {
            fanout_core::redis::PoolError::Timeout(_) => true,
            fanout_core::redis::PoolError::Backend(e) => transient(e),
            _ => false,
        }
    }
    e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<redis::RedisError>() {
            return transient(e);
        }
        if let Some(e) = cause.downcast_ref::<fanout_core::redis::PoolError>() {
            return pool(e);
        }
        match cause.downcast_ref::<fanout_aggregator::Error>() {
            Some(fanout_aggregator::Error::Redis(e)) => return transient(e),
            Some(fanout_aggregator::Error::Pool(e)) => return pool(e),
            _ => {}
        }
        match cause.downcast_ref::<fanout_queue::Error>() {
            Some(fanout_queue::Error::Redis(e)) => transient(e),
            Some(fanout_queue::Error::Pool(e)) => pool(e),
            _ => false,
        }
    })
}

impl Handler for SectionHandler {
    async fn handle(&self, d: Delivery) -> Outcome {
        let job = match serde_json::from_value::<SectionJob>(d.payload.clone()) {
            Ok(job) => job,
            Err(e) => {
                return Outcome::Fatal {
                    error: format!("decode error: {e}"),
                };
            }
        };
        let lane = d.lane.to_string();
        let in_flight = InFlight::new();
        let started = Instant::now();
        let result = self.run(&job, &d, &lane).await;
        drop(in_flight);
        if job.live && matches!(result, Ok((Outcome::Done, _))) {
            // A live fallback of a batch line is settled: the lane forgets the line.
            if let Err(e) = self
                .deps
                .batches
                .settle(&job.member(), &Where::Live, Settle::Done)
                .await
            {
                tracing::warn!(report = %job.report_id, job = %job.job_id, error = %e, "could not forget a batch line run live");
            }
        }
        match result {
            Ok((outcome, label)) => {
                if let Some(section) = label {
                    METRICS
                        .job_duration
                        .with_label_values(&[section.as_str(), outcome_label(&outcome)])
                        .observe(started.elapsed().as_secs_f64());
                }
                outcome
            }
            // Redis unreachable, timing out, or failing over (a cluster shard without a
            // master, or too few replicas for `redis.wait_replicas`): the job goes back without
            // spending an attempt, as a provider that cannot be reached does. Nothing it did is
            // lost: each step is idempotent and the next delivery repeats it.
            Err(e) if redis_unavailable(&e) => {
                tracing::warn!(report = %job.report_id, job = %job.job_id, error = %e, "Redis unavailable, job handed back");
                Outcome::Release {
                    delay: REDIS_UNAVAILABLE_DELAY,
                }
            }
            Err(e) => {
                tracing::warn!(report = %job.report_id, job = %job.job_id, error = %e, "job hit an infrastructure error, will retry");
                Outcome::Retry {
                    error: e.to_string(),
                    retry_after: None,
                }
            }
        }
    }

    /// A dead-lettered section job (its worker kept dying, or our own infrastructure kept
    /// failing) fails its section with the reason, so the report still finishes.
    async fn dead_lettered(&self, lane: Lane, payload: serde_json::Value, reason: String) {
        // Counted here, undecodable jobs included: the queue calls this once per job it moves.
        METRICS
            .jobs_dead_lettered
            .with_label_values(&[lane.as_str()])
            .inc();
        let Ok(job) = serde_json::from_value::<SectionJob>(payload) else {
            return; // undecodable: nothing to attribute it to; the dead letter keeps it
        };
        if job.live {
            // A batch line moved to this live call: the lane forgets it (a replay runs the
            // section again through the lane).
            let _ = self
                .deps
                .batches
                .settle(&job.member(), &Where::Live, Settle::Done)
                .await;
        }
        let reason = format!("dead-lettered: {reason}");
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=5 {
            let result = async {
                let ctx = self
                    .deps
                    .store
                    .job_context(&job.report_id, &job.job_id)
                    .await?;
                let lane = ctx.lane.to_string();
                self.fail(&job, &ctx.node.section, &lane, "dead_letter", &reason, 0)
                    .await
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) if attempt == 5 => {
                    tracing::error!(report = %job.report_id, job = %job.job_id, error = %e, "could not mark a dead-lettered section failed");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

/// Counts a job in `fanout_jobs_in_flight` while it lives: also a job the queue aborts at its
/// timeout, whose handler future is dropped mid-await.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        METRICS.jobs_in_flight.inc();
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        METRICS.jobs_in_flight.dec();
    }
}

fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Done => "done",
        Outcome::Retry { .. } => "retry",
        Outcome::Fatal { .. } => "fatal",
        Outcome::Release { .. } => "released",
    }
}

/// How often a job backing off between provider attempts looks whether its report was
/// cancelled.
const CANCEL_CHECK: Duration = Duration::from_secs(1);

/// A job admitted after waiting this long for budget looks again whether its report was
/// cancelled meanwhile, before it calls the provider.
const WAITED_LOOK_AGAIN: Duration = Duration::from_millis(50);

impl SectionHandler {
    /// Sleep `delay` before the next attempt, looking every [`CANCEL_CHECK`] whether the report
    /// was cancelled meanwhile: true if it was (stop; the job slot is free at once rather than
    /// after a backoff of up to `queue.retry_max_ms`).
    async fn back_off(&self, report_id: &str, delay: Duration) -> anyhow::Result<bool> {
        let until = Instant::now() + delay;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(CANCEL_CHECK)).await;
            let status = self.deps.store.status(report_id).await?;
            if status == Some(fanout_core::ReportStatus::Cancelled) {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
        }
    }

    /// Returns the outcome and the section id (for metrics) once the job is known.
    async fn run(
        &self,
        job: &SectionJob,
        d: &Delivery,
        lane: &str,
    ) -> anyhow::Result<(Outcome, Option<String>)> {
        let store = &self.deps.store;
        let ctx = match store
            .start_with_context(&job.report_id, &job.job_id, d.attempt)
            .await?
        {
            Started::Run(ctx) => ctx,
            Started::Not(StartOutcome::AlreadyDone) => {
                // A previous delivery finished the section but died before enqueueing what it
                // released (or before the ack): release again, idempotently.
                let released = store.released(&job.report_id, &job.job_id).await?;
                self.enqueue_released(&job.report_id, &released, lane)
                    .await?;
                return Ok((Outcome::Done, None));
            }
            Started::Not(_) => return Ok((Outcome::Done, None)),
        };
        let section = ctx.node.section.clone();
        METRICS
            .jobs_started
            .with_label_values(&[lane, section.as_str()])
            .inc();

        let prompt = match fanout_core::render::render_prompt(
            &ctx.template,
            &ctx.node,
            &ctx.inputs,
            &ctx.deps,
            &self.deps.config.provider.default_model,
        ) {
            Ok(p) => p,
            Err(e) => {
                let reason = format!("prompt could not be rendered: {e}");
                self.fail(job, &section, lane, "render", &reason, 0).await?;
                return Ok((Outcome::Done, Some(section)));
            }
        };
        let req = ChatRequest {
            model: prompt.model,
            system: prompt.system,
            user: prompt.user,
            max_tokens: prompt.max_tokens,
            temperature: prompt.temperature,
        };
        // The template snapshot, inputs and dependency texts are not needed past rendering; a
        // worker holds a thousand calls in flight, so they go now.
        let (cache, priority) = (ctx.template.cache, ctx.node.priority);
        let tenant = ctx.tenant.clone();
        let (batch_api, deadline_ms) = (ctx.batch_api, ctx.deadline_ms);
        drop(ctx);

        if cache {
            if let Some(hit) = self.deps.cache.get(&req).await {
                METRICS.cache_requests.with_label_values(&["hit"]).inc();
                self.complete(job, &section, lane, &hit, 0, true, false)
                    .await?;
                return Ok((Outcome::Done, Some(section)));
            }
            METRICS.cache_requests.with_label_values(&["miss"]).inc();
        }

        let counted = self.deps.prompts.estimate(&req);
        let estimate = counted.tokens;
        // A batch report's section waits for its batch (and this job is done), unless the
        // report's deadline is too near for a batch: then it is called now.
        if batch_api && !job.live {
            let line = crate::batch_api::Line {
                report_id: job.report_id.clone(),
                job_id: job.job_id.clone(),
                section: section.clone(),
                lane: lane.to_owned(),
                priority,
                request: req.clone(),
                tokens: estimate,
                deadline_ms,
                attempts: 0,
            };
            if !line.near_deadline(&self.deps.config, crate::batch_api::now_ms()) {
                let at = self
                    .deps
                    .batches
                    .park(&job.member(), &line.encode(), line.deadline_ms)
                    .await?;
                if at == Where::Waiting {
                    METRICS.batch_api_lines.with_label_values(&["parked"]).inc();
                }
                tracing::debug!(report = %job.report_id, job = %job.job_id, at = ?at, "section waits for a batch");
                return Ok((Outcome::Done, Some(section)));
            }
            METRICS.batch_api_lines.with_label_values(&["live"]).inc();
        }
        let max_attempts = self.deps.config.queue.max_attempts;
        let max_wait = Duration::from_secs(self.deps.config.budget.max_wait_secs);
        let mut attempt = 0u32;
        // When this delivery met its first 429: from then on it is waiting for budget.
        let mut rate_limited_since: Option<Instant> = None;
        // When this delivery first failed to reach the provider, and how often since.
        let mut unreached_since: Option<Instant> = None;
        let mut unreached = 0u32;
        loop {
            attempt += 1;
            let admission = match self
                .deps
                .budget
                .acquire(AcquireRequest {
                    model: req.model.clone(),
                    estimated_tokens: estimate,
                    priority,
                    enqueued_at_ms: d.enqueued_at_ms,
                    max_wait,
                    tenant: Some(tenant.clone()),
                })
                .await
            {
                Ok(a) => a,
                Err(fanout_ratelimit::Error::WaitTooLong { retry_after }) => {
                    METRICS.budget_wait_timeouts.inc();
                    METRICS.jobs_released.with_label_values(&[lane]).inc();
                    tracing::debug!(report = %job.report_id, job = %job.job_id, "budget wait too long, handing the job back");
                    return Ok((Outcome::Release { delay: retry_after }, Some(section)));
                }
                Err(e @ fanout_ratelimit::Error::TooLarge { .. }) => {
                    // No budget can take it, and the provider would refuse it: fail it now,
                    // without a call, and let the rest of the report go on.
                    let reason = e.to_string();
                    tracing::warn!(report = %job.report_id, section = %job.job_id, model = %req.model, error = %reason, "section failed");
                    self.fail(job, &section, lane, "too_large", &reason, attempt - 1)
                        .await?;
                    return Ok((Outcome::Done, Some(section)));
                }
                Err(e) => return Err(e.into()),
            };
            // A job that waited for budget may outlive its report: a cancel while it waited
            // must not be followed by a provider call. (Unwaited admissions skip the look.)
            if admission.waited >= WAITED_LOOK_AGAIN
                && self.deps.store.status(&job.report_id).await?
                    == Some(fanout_core::ReportStatus::Cancelled)
            {
                self.deps.budget.settle_refused(admission).await?;
                return Ok((Outcome::Done, Some(section)));
            }
            let key = admission.key.clone();
            // Budget series are per (key, model family), like the budget and its gauges.
            let family = admission.family.clone();
            METRICS.budget_wait.observe(admission.waited.as_secs_f64());
            if self.deps.config.budget.tenant_shares.contains_key(&tenant) {
                METRICS
                    .budget_tenant_wait
                    .with_label_values(&[tenant.as_str()])
                    .observe(admission.tenant_waited.as_secs_f64());
            }
            METRICS
                .budget_admissions
                .with_label_values(&[key.as_str(), family.as_str()])
                .inc();
            METRICS
                .budget_admitted_tokens
                .with_label_values(&[key.as_str(), family.as_str()])
                .inc_by(estimate);
            let called = Instant::now();
            let result = self.deps.llm.call(&key, &req).await;
            let elapsed = called.elapsed();
            match result {
                Ok(resp) => {
                    self.deps
                        .prompts
                        .observe(&req.model, &counted, resp.prompt_tokens);
                    // What the provider's limiter took: the prompt as it counted it, and all of
                    // max_tokens unless unused tokens are refunded (then what was generated).
                    // Settling to it corrects a prompt our estimate counted short.
                    let completion = if self.deps.config.budget.refund_unused_tokens {
                        resp.completion_tokens
                    } else {
                        resp.completion_tokens.max(u64::from(req.max_tokens))
                    };
                    let used = resp.prompt_tokens + completion;
                    // Before settling: a probe's answer must be learnt before its lease goes.
                    let signal = signal(&admission, &resp.headers, 200, None);
                    self.feedback(&key, &req.model, signal).await;
                    self.deps.budget.settle(admission, Some(used)).await?;
                    record_call(&req.model, "ok", "200", elapsed);
                    tracing::info!(
                        report = %job.report_id, section = %job.job_id, model = %req.model, key = %key,
                        attempt, latency_ms = elapsed.as_millis() as u64,
                        prompt_tokens = resp.prompt_tokens, completion_tokens = resp.completion_tokens,
                        status = 200, "llm call succeeded"
                    );
                    if cache {
                        self.deps.cache.put(&req, &resp).await;
                    }
                    self.complete(job, &section, lane, &resp, attempt, false, false)
                        .await?;
                    return Ok((Outcome::Done, Some(section)));
                }
                Err(err) => {
                    // Only a rate limit says "slow down". `insufficient_quota` and "request too
                    // large" come as 429s too, but no wait fixes them: pausing (and emptying) the
                    // shared budget for them would stall every other job for nothing. Their rate
                    // headers still count.
                    let signal_status = match err.status {
                        Some(429) if err.kind != fanout_llm::ErrorKind::RateLimited => 200,
                        status => status.unwrap_or(0),
                    };
                    let limited = (signal_status == 429)
                        .then(|| limited_dimension(&err))
                        .flatten();
                    let mut signal = signal(&admission, &err.headers, signal_status, limited);
                    // A provider that cannot be reached (down, or a network outage) served and
                    // billed nothing, and no other call will reach it either: every process
                    // pauses the key (1 s, doubling while this delivery keeps failing), so an
                    // outage costs a few calls instead of every job's attempts.
                    let outage = err.unreached.then(|| {
                        unreached += 1;
                        Duration::from_secs(1 << (unreached - 1).min(5))
                    });
                    if let Some(pause) = outage {
                        signal.retry_after = signal.retry_after.or(Some(pause));
                    }
                    if err.status == Some(429) || err.unreached {
                        // Refused, not served: the provider counted none of it. Given back
                        // first, so that the 429's feedback empties the budget after it.
                        self.deps.budget.settle_refused(admission).await?;
                    } else {
                        self.deps.budget.settle(admission, None).await?;
                    }
                    self.feedback(&key, &req.model, signal).await;
                    let status = err
                        .status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| format!("{:?}", err.kind).to_lowercase());
                    record_call(&req.model, "error", &status, elapsed);
                    if err.kind == fanout_llm::ErrorKind::RateLimited {
                        METRICS
                            .budget_rate_limited
                            .with_label_values(&[key.as_str(), family.as_str()])
                            .inc();
                    }
                    // A 429 rate limit is not this section's failure: our budget ran ahead of the
                    // provider's (the feedback above paused it for every process). It costs no
                    // attempt; its wait counts as budget wait, and past `max_wait_secs` the job
                    // goes back to the queue, as when admission takes too long.
                    let rate_limited = err.kind == fanout_llm::ErrorKind::RateLimited;
                    // A call that found the provider unreachable spends no attempt; once this
                    // delivery has waited out the outage for `max_wait_secs`, it goes back to
                    // the queue as a retry, which counts one attempt of the job: an outage of
                    // about `max_attempts` × `max_wait_secs` is ridden out, and a provider that
                    // stays unreachable (a wrong base URL) fails the section with the
                    // connection error as its reason.
                    let delay = if let Some(delay) = outage {
                        let since = *unreached_since.get_or_insert_with(Instant::now);
                        if since.elapsed() + delay > max_wait {
                            tracing::debug!(report = %job.report_id, job = %job.job_id, "provider unreachable too long, handing the job back");
                            return Ok((
                                Outcome::Retry {
                                    error: format!(
                                        "provider unreachable for {} s: {}",
                                        since.elapsed().as_secs(),
                                        err.message
                                    ),
                                    retry_after: Some(delay),
                                },
                                Some(section),
                            ));
                        }
                        Some(delay)
                    } else if rate_limited {
                        let backoff = self.retry.backoff(1).unwrap_or_default();
                        let delay = backoff.max(err.retry_after().unwrap_or_default());
                        let since = *rate_limited_since.get_or_insert_with(Instant::now);
                        if since.elapsed() + delay > max_wait {
                            METRICS.budget_wait_timeouts.inc();
                            METRICS.jobs_released.with_label_values(&[lane]).inc();
                            tracing::debug!(report = %job.report_id, job = %job.job_id, "rate limited too long, handing the job back");
                            return Ok((Outcome::Release { delay }, Some(section)));
                        }
                        Some(delay)
                    } else if err.is_retryable() && attempt < max_attempts {
                        self.retry.next_delay(attempt, &err)
                    } else {
                        None
                    };
                    match delay {
                        Some(delay) => {
                            METRICS
                                .jobs_retried
                                .with_label_values(&[lane, section.as_str()])
                                .inc();
                            tracing::warn!(
                                report = %job.report_id, section = %job.job_id, model = %req.model, key = %key,
                                attempt, status = %status, kind = ?err.kind, delay_ms = delay.as_millis() as u64,
                                error = %err.message, "llm call failed, will retry"
                            );
                            if self.back_off(&job.report_id, delay).await? {
                                return Ok((Outcome::Done, Some(section)));
                            }
                            if rate_limited || outage.is_some() {
                                attempt -= 1;
                            }
                        }
                        None => {
                            let reason = failure_reason(&err, attempt);
                            tracing::warn!(
                                report = %job.report_id, section = %job.job_id, model = %req.model,
                                attempt, status = %status, kind = ?err.kind, error = %err.message,
                                "section failed"
                            );
                            let kind = format!("{:?}", err.kind).to_lowercase();
                            self.fail(job, &section, lane, &kind, &reason, attempt)
                                .await?;
                            return Ok((Outcome::Done, Some(section)));
                        }
                    }
                }
            }
        }
    }

    /// Store a section's answer (from a live call, the cache, or a batch: `batch_api`, priced
    /// at the batch price) and enqueue what it released.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn complete(
        &self,
        job: &SectionJob,
        section: &str,
        lane: &str,
        resp: &ChatResponse,
        attempts: u32,
        cached: bool,
        batch_api: bool,
    ) -> anyhow::Result<()> {
        let price = self
            .deps
            .config
            .price(&resp.model)
            .or_else(|| self.deps.config.price(&job_model(resp)))
            .map(|p| if batch_api { p.batch() } else { p });
        let cost = if cached {
            0.0
        } else {
            fanout_llm::cost(price, resp.prompt_tokens, resp.completion_tokens)
        };
        if !cached {
            METRICS
                .llm_tokens
                .with_label_values(&[resp.model.as_str(), "in"])
                .inc_by(resp.prompt_tokens);
            METRICS
                .llm_tokens
                .with_label_values(&[resp.model.as_str(), "out"])
                .inc_by(resp.completion_tokens);
            METRICS
                .llm_cost
                .with_label_values(&[resp.model.as_str()])
                .inc_by(cost);
        }
        let released = self
            .deps
            .store
            .complete(
                &job.report_id,
                &job.job_id,
                SectionResult {
                    text: resp.text.clone(),
                    model: resp.model.clone(),
                    prompt_tokens: resp.prompt_tokens,
                    completion_tokens: resp.completion_tokens,
                    cost,
                    latency_ms: resp.latency.as_millis() as u64,
                    attempts,
                    cached,
                    batch_api,
                },
            )
            .await?;
        METRICS
            .jobs_completed
            .with_label_values(&[lane, section])
            .inc();
        self.enqueue_released(&job.report_id, &released, lane).await
    }

    /// Fail the section for good after `attempts` provider calls in this delivery.
    pub(crate) async fn fail(
        &self,
        job: &SectionJob,
        section: &str,
        lane: &str,
        kind: &str,
        reason: &str,
        attempts: u32,
    ) -> anyhow::Result<()> {
        let released = self
            .deps
            .store
            .fail_after(&job.report_id, &job.job_id, reason, attempts)
            .await?;
        METRICS
            .jobs_failed
            .with_label_values(&[lane, section, kind])
            .inc();
        self.enqueue_released(&job.report_id, &released, lane).await
    }

    pub(crate) async fn enqueue_released(
        &self,
        report_id: &str,
        released: &Released,
        lane: &str,
    ) -> anyhow::Result<()> {
        if released.ready.is_empty() {
            return Ok(());
        }
        let lane_value = fanout_queue::Lane::parse(lane).unwrap_or(fanout_queue::Lane::Interactive);
        let jobs = released
            .ready
            .iter()
            .map(|node| {
                METRICS
                    .jobs_enqueued
                    .with_label_values(&[lane, node.section.as_str()])
                    .inc();
                let job = SectionJob::new(report_id, &node.id);
                NewJob::new(
                    job.queue_id(),
                    serde_json::to_value(&job).expect("a job serializes"),
                )
                .lane(lane_value)
                .priority(node.priority)
            })
            .collect();
        self.deps.queue.enqueue_many(jobs).await?;
        Ok(())
    }

    /// Hand the provider's view of every answer to the shared budget, which learns the
    /// advertised limits, pauses and lowers its rate on a 429, and skips the round trip when
    /// nothing is new.
    async fn feedback(&self, key: &str, model: &str, signal: ProviderSignal) {
        let paused = signal.status == 429 || signal.retry_after.is_some();
        match self.deps.budget.feedback(key, model, signal).await {
            Ok(()) if paused => METRICS
                .budget_pauses
                .with_label_values(&[key, fanout_core::config::model_family(model)])
                .inc(),
            Ok(()) => {}
            Err(e) => tracing::warn!(key, model, error = %e, "could not record provider feedback"),
        }
    }
}

/// What an answer (`status` 0: none) to the call `admission` admitted tells the budget.
fn signal(
    admission: &Admission,
    h: &fanout_llm::RateHeaders,
    status: u16,
    limited: Option<Dimension>,
) -> ProviderSignal {
    ProviderSignal {
        retry_after: if status == 429 { h.retry_after } else { None },
        limit_requests: h.limit_requests.map(u64::from),
        limit_tokens: h.limit_tokens.map(u64::from),
        remaining_requests: h.remaining_requests.map(u64::from),
        remaining_tokens: h.remaining_tokens.map(u64::from),
        reset_requests: h.reset_requests,
        reset_tokens: h.reset_tokens,
        limited,
        ..ProviderSignal::for_admission(admission, status)
    }
}

/// Which limit a 429 names: the exhausted `remaining` header, else the provider's message
/// (OpenAI: "… on requests per min (RPM)", "… on tokens per min (TPM)"). `None`: unknown.
fn limited_dimension(err: &fanout_llm::CallError) -> Option<Dimension> {
    let h = &err.headers;
    match (
        h.remaining_requests == Some(0),
        h.remaining_tokens == Some(0),
    ) {
        (true, false) => return Some(Dimension::Requests),
        (false, true) => return Some(Dimension::Tokens),
        _ => {}
    }
    let message = err.message.to_ascii_lowercase();
    match (
        message.contains("requests per min") || message.contains("(rpm)"),
        message.contains("tokens per min") || message.contains("(tpm)"),
    ) {
        (true, false) => Some(Dimension::Requests),
        (false, true) => Some(Dimension::Tokens),
        _ => None,
    }
}

fn job_model(resp: &ChatResponse) -> String {
    fanout_core::config::model_family(&resp.model).to_owned()
}

fn record_call(model: &str, outcome: &str, status: &str, elapsed: Duration) {
    METRICS
        .llm_duration
        .with_label_values(&[model, outcome])
        .observe(elapsed.as_secs_f64());
    METRICS
        .llm_responses
        .with_label_values(&[model, status])
        .inc();
}

pub(crate) fn failure_reason(err: &CallError, attempts: u32) -> String {
    let status = err.status.map(|s| format!(" ({s})")).unwrap_or_default();
    if err.is_retryable() {
        format!(
            "gave up after {attempts} attempts: {:?}{status}: {}",
            err.kind, err.message
        )
    } else {
        format!("{:?}{status}: {}", err.kind, err.message)
    }
}

/// Export queue depth and budget headroom as gauges every few seconds.
pub(crate) async fn export_gauges(deps: WorkerDeps, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(lanes) = deps.queue.depth().await {
            for l in lanes {
                METRICS.set_queue_depth(
                    l.lane.as_str(),
                    fanout_metrics::QueueDepth {
                        ready: l.ready,
                        pending: l.pending,
                        delayed: l.delayed,
                        dead: l.dead,
                        lag: l.lag.unwrap_or(l.ready),
                        oldest_ready_secs: l.oldest_ready_age.unwrap_or_default().as_secs_f64(),
                    },
                );
            }
        }
        if let Ok(budgets) = deps.budget.snapshot().await {
            for b in budgets {
                let labels = [b.key.as_str(), b.family.as_str()];
                METRICS
                    .budget_limit_requests
                    .with_label_values(&labels)
                    .set(b.requests_per_minute as i64);
                METRICS
                    .budget_limit_tokens
                    .with_label_values(&labels)
                    .set(b.tokens_per_minute as i64);
                METRICS
                    .budget_configured_requests
                    .with_label_values(&labels)
                    .set(i64::try_from(b.configured_requests_per_minute).unwrap_or(i64::MAX));
                METRICS
                    .budget_configured_tokens
                    .with_label_values(&labels)
                    .set(i64::try_from(b.configured_tokens_per_minute).unwrap_or(i64::MAX));
                METRICS
                    .budget_requests_available
                    .with_label_values(&labels)
                    .set(b.requests_available);
                METRICS
                    .budget_tokens_available
                    .with_label_values(&labels)
                    .set(b.tokens_available);
                // Leases are cluster-wide: every process reports the same number.
                METRICS
                    .concurrency_in_use
                    .set(i64::try_from(b.leases_in_use).unwrap_or(i64::MAX));
            }
        }
    }
}
