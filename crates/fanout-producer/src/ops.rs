//! What an operator does without redis-cli: the system's status (queues, workers, budget,
//! webhooks), dead letters listed, replayed or dropped, dead webhooks re-delivered or dropped.
//! The API's admin routes and the CLI both call this, so they agree.
//!
//! Every change an operator makes is logged at INFO on the `fanout::audit` target, naming who
//! made it (the caller's tenant, or `cli@<user>`), what, and on which report.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_aggregator::webhook::{WebhookError, Webhooks};
use fanout_aggregator::{Reopened, Store};
use fanout_core::job::SectionJob;
use fanout_metrics::{METRICS, QueueDepth};
use fanout_queue::{DeadLetter, Queue, WorkerInfo};
use fanout_ratelimit::Budget;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most dead letters one listing or one selection looks at.
pub const DEAD_LETTERS_MAX: usize = 1_000;

/// What an operator action could not do.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Queue(#[from] fanout_queue::Error),
    #[error(transparent)]
    Store(#[from] fanout_aggregator::Error),
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
    #[error("budget: {0}")]
    Budget(#[from] fanout_ratelimit::Error),
    /// The request names something that is not there, or is malformed: `field` says what.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The whole system at a glance (`GET /v1/status`, `fanout status`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SystemStatus {
    /// Per lane: the queue.
    pub lanes: Vec<LaneStatus>,
    /// Worker processes alive now (their liveness beat is within its TTL).
    pub workers: Vec<WorkerInfo>,
    /// Per (API key, model family): the shared budget.
    pub budget: Vec<BudgetStatus>,
    pub webhooks: WebhookOutbox,
    /// The lane on the provider's Batch API.
    pub batch_api: BatchApiStatus,
    /// Things an operator should act on, e.g. work queued and no worker alive.
    pub warnings: Vec<String>,
}

/// Sections of `batch_api` reports on their way through the provider's Batch API.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct BatchApiStatus {
    /// Sections waiting for the next batch.
    pub waiting: u64,
    /// Batches formed and not finished (being submitted, or submitted and not ended).
    pub open_batches: u64,
    /// Sections in those batches.
    pub in_batches: u64,
    /// Their enqueued tokens (prompt + `max_tokens`), against the provider's limit.
    pub enqueued_tokens: u64,
}

/// One lane of the queue.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LaneStatus {
    /// `interactive` or `batch`.
    pub lane: String,
    /// Jobs waiting for a worker.
    pub ready: u64,
    /// Jobs a worker holds (running, or held by a worker that died until they are reclaimed).
    pub in_flight: u64,
    /// Jobs waiting for a retry backoff.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Entries not yet delivered to the consumer group (what autoscalers read); absent when
    /// Redis cannot tell.
    pub lag: Option<u64>,
    /// Age of the oldest ready job, in milliseconds.
    pub oldest_ready_ms: Option<u64>,
}

/// The shared budget of one (API key, model family), across every worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BudgetStatus {
    /// The key's name (never the key).
    pub key: String,
    pub family: String,
    /// The limits the budget paces to now: learnt or configured, capped, lowered while the
    /// adaptive rate is below them.
    pub requests_per_minute: f64,
    pub tokens_per_minute: f64,
    pub configured_requests_per_minute: u64,
    pub configured_tokens_per_minute: u64,
    pub learnt_requests_per_minute: Option<u64>,
    pub learnt_tokens_per_minute: Option<u64>,
    /// Requests admitted across the cluster in the last 60 s, and the tokens reserved for them.
    pub requests_last_minute: f64,
    pub tokens_last_minute: f64,
    /// Requests and tokens that could be taken now (negative: debt).
    pub requests_available: f64,
    pub tokens_available: f64,
    /// The provider asked to hold off this many more milliseconds.
    pub paused_for_ms: Option<u64>,
    /// Calls waiting for budget in this family.
    pub waiters: u64,
    /// Concurrency leases held across the cluster, and the limit.
    pub in_flight: u64,
    pub max_concurrent_requests: u32,
}

/// The webhook outbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookOutbox {
    /// Webhooks waiting to be delivered (first attempt or a retry).
    pub pending: u64,
    /// Webhooks given up on.
    pub dead: u64,
}

/// A dead-lettered job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterInfo {
    /// `<lane>:<entry>`: what replay and drop take.
    #[schema(example = "interactive:1764500000000-0")]
    pub id: String,
    pub lane: String,
    /// The queue's job id.
    pub job_id: String,
    /// The report and the section job it belongs to, when its payload names them.
    pub report_id: Option<String>,
    pub section: Option<String>,
    /// Why it was dead-lettered, and the last error it met.
    pub reason: String,
    pub last_error: String,
    pub attempts: u32,
    pub deliveries: u32,
    /// Milliseconds since the epoch.
    pub enqueued_at: Option<u64>,
    pub dead_at: u64,
}

impl DeadLetterInfo {
    fn of(d: &DeadLetter) -> Self {
        let job = section_job(d);
        Self {
            id: d.id(),
            lane: d.lane.as_str().to_owned(),
            job_id: d.job_id.clone(),
            report_id: job.as_ref().map(|j| j.report_id.clone()),
            section: job.map(|j| j.job_id),
            reason: d.reason.clone(),
            last_error: d.last_error.clone(),
            attempts: d.attempts,
            deliveries: d.deliveries,
            enqueued_at: d.enqueued_at_ms,
            dead_at: d.dead_at_ms,
        }
    }
}

fn section_job(d: &DeadLetter) -> Option<SectionJob> {
    serde_json::from_value(d.payload.clone()?).ok()
}

/// Which dead letters an action applies to: the listed ids, or every one matching the
/// filters (`all` with no filter: every dead letter, up to [`DEAD_LETTERS_MAX`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelection {
    /// Dead letter ids (`<lane>:<entry>`).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Every dead letter of this report.
    #[serde(default)]
    pub report_id: Option<String>,
    /// Every dead letter whose reason or last error contains this text.
    #[serde(default)]
    pub reason_contains: Option<String>,
    /// Every dead letter (with the filters above, those matching them).
    #[serde(default)]
    pub all: bool,
}

impl DeadLetterSelection {
    fn is_filter(&self) -> bool {
        self.all || self.report_id.is_some() || self.reason_contains.is_some()
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        let report_ok = self
            .report_id
            .as_ref()
            .is_none_or(|r| section_job(d).is_some_and(|j| &j.report_id == r));
        let reason_ok = self
            .reason_contains
            .as_ref()
            .is_none_or(|t| d.reason.contains(t.as_str()) || d.last_error.contains(t.as_str()));
        report_ok && reason_ok
    }
}

/// What an action did to one dead letter or webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resolution {
    /// The dead letter id, or the report id of a webhook.
    pub id: String,
    pub outcome: ResolutionOutcome,
    /// Why, when it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionOutcome {
    /// Back on the queue with fresh attempts (its report reopened if it had finished).
    Replayed,
    /// Queued for delivery again from its first attempt.
    Redelivered,
    /// Deleted.
    Dropped,
    /// Not there (any more): replayed or dropped already, or never was.
    NotFound,
    /// Left as it is; `detail` says why.
    Skipped,
}

/// Operator actions over one namespace. Cheap to clone.
#[derive(Clone)]
pub struct Operations {
    queue: Queue,
    store: Store,
    budget: Budget,
    webhooks: Webhooks,
    batches: fanout_queue::batch_api::BatchApiStore,
    key_names: Vec<String>,
    namespace: String,
    budget_config: fanout_core::config::BudgetConfig,
    default_model: String,
    /// The last discovery of budgets in use, and when.
    in_use: Arc<Mutex<Option<Discovered>>>,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations").finish_non_exhaustive()
    }
}

impl Operations {
    /// Over the producer's queue and store. The status lists the budget of every (key name,
    /// model family) found in Redis, and of `config`'s key names and default model.
    pub fn new(queue: Queue, store: Store, config: &fanout_core::Config) -> Result<Self, OpsError> {
        let key_names: Vec<String> = config
            .provider
            .keys
            .iter()
            .map(|k| k.name.clone())
            .collect();
        let budget = Budget::new(
            store.pool().clone(),
            &config.redis.namespace,
            config.budget.clone(),
            key_names.clone(),
        );
        budget.track(&config.provider.default_model);
        let webhooks = Webhooks::new(
            fanout_aggregator::webhook::WebhookOptions::default(),
            &store,
        )?;
        let batches = fanout_queue::batch_api::BatchApiStore::new(
            store.pool().clone(),
            &config.redis.namespace,
        );
        Ok(Self {
            queue,
            store,
            budget,
            webhooks,
            batches,
            key_names,
            namespace: config.redis.namespace.clone(),
            budget_config: config.budget.clone(),
            default_model: config.provider.default_model.clone(),
            in_use: Default::default(),
        })
    }

    pub async fn status(&self) -> Result<SystemStatus, OpsError> {
        let lanes = self.lanes().await?;
        let workers = self.queue.workers().await?;
        // The budgets the workers use, whether or not this process has their keys configured
        // (an API process usually has none).
        let in_use = self.budgets_in_use().await?;
        let mut names: Vec<String> = self.key_names.clone();
        for (key, _) in &in_use {
            if !names.contains(key) {
                names.push(key.clone());
            }
        }
        let budget = Budget::new(
            self.store.pool().clone(),
            &self.namespace,
            self.budget_config.clone(),
            names,
        );
        budget.track(&self.default_model);
        for (_, family) in &in_use {
            budget.track(family);
        }
        let budget = budget
            .snapshot()
            .await?
            .into_iter()
            .map(|b| BudgetStatus {
                key: b.key,
                family: b.family,
                requests_per_minute: b.requests_per_minute,
                tokens_per_minute: b.tokens_per_minute,
                configured_requests_per_minute: b.configured_requests_per_minute,
                configured_tokens_per_minute: b.configured_tokens_per_minute,
                learnt_requests_per_minute: b.learnt_requests_per_minute,
                learnt_tokens_per_minute: b.learnt_tokens_per_minute,
                requests_last_minute: b.requests_last_minute,
                tokens_last_minute: b.tokens_last_minute,
                requests_available: b.requests_available,
                tokens_available: b.tokens_available,
                paused_for_ms: b.paused_for.map(|p| p.as_millis() as u64),
                waiters: b.waiters,
                in_flight: b.leases_in_use,
                max_concurrent_requests: b.max_concurrent_requests,
            })
            .collect();
        let webhooks = WebhookOutbox {
            pending: self.webhooks.pending().await?,
            dead: self.webhooks.dead_count().await?,
        };
        let b = self.batches.summary().await?;
        let batch_api = BatchApiStatus {
            waiting: b.waiting,
            open_batches: b.open,
            in_batches: b.in_batches,
            enqueued_tokens: b.enqueued_tokens,
        };
        let mut warnings: Vec<String> = no_worker_warning(&lanes, workers.len())
            .into_iter()
            .collect();
        if workers.is_empty() && (b.waiting > 0 || b.open > 0) {
            warnings.push(format!(
                "{} sections wait in the Batch API lane and no worker is alive to submit or poll their batches",
                b.waiting + b.in_batches
            ));
        }
        Ok(SystemStatus {
            lanes,
            workers,
            budget,
            webhooks,
            batch_api,
            warnings,
        })
    }

    /// The (key, family) budgets in Redis: a SCAN over the keyspace, so done at most every
    /// [`BUDGETS_FRESH`] however often the status is read (the operations page polls it). An
    /// empty answer is not kept: the first budget appears with the first provider call.
    async fn budgets_in_use(&self) -> Result<Vec<(String, String)>, OpsError> {
        if let Some((at, pairs)) = self.in_use.lock().expect("in_use").as_ref()
            && at.elapsed() < BUDGETS_FRESH
        {
            return Ok(pairs.clone());
        }
        let pairs = self.budget.in_use().await?;
        if !pairs.is_empty() {
            *self.in_use.lock().expect("in_use") = Some((std::time::Instant::now(), pairs.clone()));
        }
        Ok(pairs)
    }

    /// A warning when work is queued and no worker is alive to run it (cheap: for every
    /// submit).
    pub async fn idle_warning(&self) -> Result<Option<String>, OpsError> {
        if self.queue.workers_alive().await? > 0 {
            return Ok(None);
        }
        Ok(no_worker_warning(&self.lanes().await?, 0))
    }

    async fn lanes(&self) -> Result<Vec<LaneStatus>, OpsError> {
        Ok(self
            .queue
            .depth()
            .await?
            .into_iter()
            .map(|l| LaneStatus {
                lane: l.lane.as_str().to_owned(),
                ready: l.ready,
                in_flight: l.pending,
                delayed: l.delayed,
                dead: l.dead,
                lag: l.lag,
                oldest_ready_ms: l.oldest_ready_age.map(|a| a.as_millis() as u64),
            })
            .collect())
    }

    /// Set the gauges an alert needs even when no worker runs: queue depth and workers alive.
    pub async fn export_gauges(&self) -> Result<(), OpsError> {
        for l in self.queue.depth().await? {
            METRICS.set_queue_depth(
                l.lane.as_str(),
                QueueDepth {
                    ready: l.ready,
                    pending: l.pending,
                    delayed: l.delayed,
                    dead: l.dead,
                    lag: l.lag.unwrap_or(l.ready),
                    oldest_ready_secs: l.oldest_ready_age.unwrap_or_default().as_secs_f64(),
                },
            );
        }
        METRICS
            .workers_alive
            .set(self.queue.workers_alive().await? as i64);
        Ok(())
    }

    /// The newest dead letters (at most `limit`, up to [`DEAD_LETTERS_MAX`]), optionally only
    /// those of one report.
    pub async fn dead_letters(
        &self,
        limit: usize,
        report_id: Option<&str>,
    ) -> Result<Vec<DeadLetterInfo>, OpsError> {
        let sel = DeadLetterSelection {
            report_id: report_id.map(str::to_owned),
            ..Default::default()
        };
        let all = self.queue.dead_letters(DEAD_LETTERS_MAX).await?;
        Ok(all
            .iter()
            .filter(|d| sel.matches(d))
            .take(limit.clamp(1, DEAD_LETTERS_MAX))
            .map(DeadLetterInfo::of)
            .collect())
    }

    async fn select(&self, sel: &DeadLetterSelection) -> Result<Vec<Resolved>, OpsError> {
        if sel.ids.is_empty() && !sel.is_filter() {
            return Err(OpsError::Invalid {
                field: "ids",
                message: "name dead letters by `ids`, or select them with `report_id`, \
                          `reason_contains` or `all: true`"
                    .into(),
            });
        }
        let mut out = Vec::new();
        for id in &sel.ids {
            if DeadLetter::parse_id(id).is_none() {
                return Err(OpsError::Invalid {
                    field: "ids",
                    message: format!("`{id}` is not a dead letter id (`<lane>:<entry>`)"),
                });
            }
            match self.queue.dead_letter_by_id(id).await? {
                Some(d) if sel.matches(&d) => out.push(Resolved::Found(d)),
                Some(_) => out.push(Resolved::Missing(id.clone())),
                None => out.push(Resolved::Missing(id.clone())),
            }
        }
        if sel.ids.is_empty() {
            for d in self.queue.dead_letters(DEAD_LETTERS_MAX).await? {
                if sel.matches(&d) {
                    out.push(Resolved::Found(d));
                }
            }
        }
        // Oldest first: a section dead-lettered before its dependents is reopened before them,
        // so a dependent that runs without a failed input is not released while that input is
        // about to run again.
        out.sort_by_key(|r| match r {
            Resolved::Found(d) => (0, d.dead_at_ms, d.entry_id.clone()),
            Resolved::Missing(_) => (1, 0, String::new()),
        });
        Ok(out)
    }

    /// Run the selected dead letters again with fresh attempts. A section's report is reopened
    /// first (a finished report goes back to running and is assembled again when it
    /// completes); then the letter goes back on the queue. Replaying the same letter twice
    /// runs it once more, not twice: the second finds it gone. `actor` is logged.
    pub async fn replay(
        &self,
        sel: &DeadLetterSelection,
        actor: &str,
    ) -> Result<Vec<Resolution>, OpsError> {
        let mut out = Vec::new();
        for r in self.select(sel).await? {
            let d = match r {
                Resolved::Found(d) => d,
                Resolved::Missing(id) => {
                    out.push(resolution(id, ResolutionOutcome::NotFound, None));
                    continue;
                }
            };
            let id = d.id();
            let job = section_job(&d);
            if let Some(job) = &job {
                // Reopen before the job is back on the queue: a worker that claimed it while
                // the section still read `failed` would drop it as already done. A crash
                // between the two leaves the letter here, and replaying it again finishes.
                let skip = match self.store.reopen(&job.report_id, &job.job_id).await {
                    Ok(Reopened::Reopened { .. }) => None,
                    Ok(Reopened::Waiting { .. }) => {
                        // Pending again behind a dependency that was reopened too: that one
                        // releases it when it finishes, so the letter itself is done with.
                        if self.queue.drop_dead(std::slice::from_ref(&d)).await?[0] {
                            audit(actor, "dead_letter.replay", &id, Some(job));
                            out.push(resolution(
                                id,
                                ResolutionOutcome::Replayed,
                                Some(
                                    "waits for a reopened dependency; runs when it finishes".into(),
                                ),
                            ));
                        } else {
                            out.push(resolution(id, ResolutionOutcome::NotFound, None));
                        }
                        continue;
                    }
                    Ok(Reopened::NotFailed { state }) if !state.is_terminal() => None,
                    Ok(Reopened::NotFailed { state }) => Some(format!(
                        "section `{}` is {} already",
                        job.job_id,
                        state.as_str()
                    )),
                    Ok(Reopened::Cancelled) => Some("the report was cancelled".to_owned()),
                    Err(fanout_aggregator::Error::ReportNotFound { .. }) => {
                        Some("the report expired; drop the letter".to_owned())
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(why) = skip {
                    out.push(resolution(id, ResolutionOutcome::Skipped, Some(why)));
                    continue;
                }
            }
            let replayed = self.queue.replay_dead(std::slice::from_ref(&d)).await?[0];
            if replayed {
                audit(actor, "dead_letter.replay", &id, job.as_ref());
                out.push(resolution(id, ResolutionOutcome::Replayed, None));
            } else {
                out.push(resolution(id, ResolutionOutcome::NotFound, None));
            }
        }
        Ok(out)
    }

    /// Delete the selected dead letters (their sections stay failed).
    pub async fn drop_dead_letters(
        &self,
        sel: &DeadLetterSelection,
        actor: &str,
    ) -> Result<Vec<Resolution>, OpsError> {
        let mut out = Vec::new();
        for r in self.select(sel).await? {
            match r {
                Resolved::Missing(id) => {
                    out.push(resolution(id, ResolutionOutcome::NotFound, None));
                }
                Resolved::Found(d) => {
                    let id = d.id();
                    if self.queue.drop_dead(std::slice::from_ref(&d)).await?[0] {
                        audit(actor, "dead_letter.drop", &id, section_job(&d).as_ref());
                        out.push(resolution(id, ResolutionOutcome::Dropped, None));
                    } else {
                        out.push(resolution(id, ResolutionOutcome::NotFound, None));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The newest dead webhooks.
    pub async fn dead_webhooks(&self, limit: usize) -> Result<Vec<DeadWebhookInfo>, OpsError> {
        Ok(self
            .webhooks
            .dead(limit.clamp(1, DEAD_LETTERS_MAX))
            .await?
            .into_iter()
            .map(|w| DeadWebhookInfo {
                report_id: w.report_id,
                url: w.url,
                attempts: w.attempts,
                reason: w.reason,
            })
            .collect())
    }

    /// Send reports' webhooks again from their first attempt (`all_dead`: every dead one).
    pub async fn redeliver_webhooks(
        &self,
        report_ids: &[String],
        all_dead: bool,
        actor: &str,
    ) -> Result<Vec<Resolution>, OpsError> {
        let ids = self.webhook_ids(report_ids, all_dead).await?;
        let mut out = Vec::new();
        for id in ids {
            if self.webhooks.redeliver(&id).await? {
                audit_report(actor, "webhook.redeliver", &id);
                out.push(resolution(id, ResolutionOutcome::Redelivered, None));
            } else {
                out.push(resolution(
                    id,
                    ResolutionOutcome::NotFound,
                    Some("unknown or expired report, or it has no callback_url".into()),
                ));
            }
        }
        Ok(out)
    }

    /// Forget reports' dead webhooks (`all_dead`: every one).
    pub async fn drop_webhooks(
        &self,
        report_ids: &[String],
        all_dead: bool,
        actor: &str,
    ) -> Result<Vec<Resolution>, OpsError> {
        let ids = self.webhook_ids(report_ids, all_dead).await?;
        let mut out = Vec::new();
        for id in ids {
            if self.webhooks.drop_dead(&id).await? {
                audit_report(actor, "webhook.drop", &id);
                out.push(resolution(id, ResolutionOutcome::Dropped, None));
            } else {
                out.push(resolution(id, ResolutionOutcome::NotFound, None));
            }
        }
        Ok(out)
    }

    async fn webhook_ids(
        &self,
        report_ids: &[String],
        all_dead: bool,
    ) -> Result<Vec<String>, OpsError> {
        if report_ids.is_empty() && !all_dead {
            return Err(OpsError::Invalid {
                field: "report_ids",
                message: "name reports by `report_ids`, or pass `all_dead: true`".into(),
            });
        }
        if let Some(bad) = report_ids
            .iter()
            .find(|r| !fanout_aggregator::is_report_id(r))
        {
            return Err(OpsError::Invalid {
                field: "report_ids",
                message: format!("`{bad}` is not a report id"),
            });
        }
        let mut ids = report_ids.to_vec();
        if all_dead {
            for w in self.webhooks.dead(DEAD_LETTERS_MAX).await? {
                if !ids.contains(&w.report_id) {
                    ids.push(w.report_id);
                }
            }
        }
        Ok(ids)
    }
}

/// A webhook given up on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadWebhookInfo {
    pub report_id: String,
    pub url: String,
    pub attempts: u32,
    pub reason: String,
}

enum Resolved {
    Found(DeadLetter),
    Missing(String),
}

fn resolution(id: String, outcome: ResolutionOutcome, detail: Option<String>) -> Resolution {
    Resolution {
        id,
        outcome,
        detail,
    }
}

fn audit(actor: &str, action: &str, id: &str, job: Option<&SectionJob>) {
    tracing::info!(
        target: "fanout::audit",
        actor,
        action,
        dead_letter = id,
        report = job.map_or("", |j| j.report_id.as_str()),
        section = job.map_or("", |j| j.job_id.as_str()),
        "operator action"
    );
}

fn audit_report(actor: &str, action: &str, report: &str) {
    tracing::info!(target: "fanout::audit", actor, action, report, "operator action");
}

fn no_worker_warning(lanes: &[LaneStatus], workers: usize) -> Option<String> {
    let waiting: u64 = lanes
        .iter()
        .map(|l| l.ready + l.delayed + l.in_flight)
        .sum();
    (workers == 0 && waiting > 0).then(|| {
        format!(
            "no worker is alive and {waiting} jobs are queued: they wait until a worker starts (`fanout worker`)"
        )
    })
}

/// When the budgets in use were last looked for, and what was found: (key, family) pairs.
type Discovered = (std::time::Instant, Vec<(String, String)>);

/// How long a discovery of the budgets in use is reused.
const BUDGETS_FRESH: Duration = Duration::from_secs(30);

/// How often the API process refreshes the gauges of [`Operations::export_gauges`].
pub const GAUGES_EVERY: Duration = Duration::from_secs(5);
