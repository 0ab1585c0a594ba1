//! The lane on the provider's Batch API: sections of `batch_api` reports wait as *lines* in
//! Redis (parked by the section handler, which then acks its job); one worker process at a
//! time (a lease in Redis) gathers them per (API key, model) into batch input files, uploads
//! them, creates the batches, polls them, and reads their output and error files back. Each
//! answer completes its section through the same path as a live call (at the batch price);
//! each error is classified like a live call's: a retryable one waits for the next batch (or
//! runs live when the report's deadline is near), the rest fail the section.
//!
//! Every step is recorded in Redis before the next one starts, and each external step can be
//! found again after a crash: the input file is named after our batch id, the provider batch
//! carries it in its metadata. A process that takes the lease over resumes where the last
//! one stopped; nothing is submitted twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanout_core::job::SectionJob;
use fanout_core::{Config, ReportStatus};
use fanout_llm::{BatchInfo, BatchState, CallError, ChatRequest, ErrorKind, parse_batch_record};
use fanout_metrics::METRICS;
use fanout_queue::NewJob;
use fanout_queue::batch_api::{OpenBatch, Settle, Where};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::section::{SectionHandler, failure_reason};

/// Metadata name under which a provider batch carries our batch id.
const METADATA_ID: &str = "fanout_batch";
/// Most waiting lines one pass looks at.
const MAX_SCAN: usize = 200_000;
/// How often waiting lines are looked at again while every key's queue is full.
const STALL_RECHECK: Duration = Duration::from_secs(60);
/// How long the submitter's lease lasts unless renewed (renewed every third of it while a
/// pass runs): how soon another process takes over from one that died.
const LEASE: Duration = Duration::from_secs(6);

/// A section waiting for (or in) a batch: everything needed to send it again, complete it
/// or fail it, without reading the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Line {
    pub report_id: String,
    pub job_id: String,
    pub section: String,
    pub lane: String,
    pub priority: u8,
    pub request: ChatRequest,
    /// Enqueued tokens it counts for: prompt estimate + `max_tokens`.
    pub tokens: u64,
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Batches that answered it with an error (or never answered it).
    #[serde(default)]
    pub attempts: u32,
}

impl Line {
    pub(crate) fn encode(&self) -> String {
        serde_json::to_string(self).expect("a line serializes")
    }

    fn job(&self) -> SectionJob {
        SectionJob::new(&self.report_id, &self.job_id)
    }

    /// The report's deadline is within `batch_api.live_margin_secs` of `now_ms`: a batch
    /// would not answer in time.
    pub(crate) fn near_deadline(&self, config: &Config, now_ms: u64) -> bool {
        let margin = config.batch_api.live_margin_secs.saturating_mul(1000);
        self.deadline_ms
            .is_some_and(|d| now_ms.saturating_add(margin) >= d)
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the lane in this process until `shutdown`: every tick, takes (or keeps) the lease and,
/// while it holds it, does one pass.
pub(crate) async fn run(handler: Arc<SectionHandler>, shutdown: CancellationToken) {
    let config = handler.deps.config.clone();
    let runner = Runner {
        owner: format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ),
        handler,
        stalled: std::sync::Mutex::new(None),
    };
    let cfg = &config.batch_api;
    let tick = Duration::from_millis((cfg.collect_ms.min(cfg.poll_ms) / 4).clamp(50, 5_000));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
        }
        match runner.holds_lease().await {
            Ok(true) => {
                // The lease is renewed while the pass runs (an upload of a large file takes a
                // while); a pass that loses it stops where it is, which is safe: every step
                // is recorded before the next, and the new holder resumes.
                let keep = async {
                    loop {
                        tokio::time::sleep(LEASE / 3).await;
                        if !matches!(runner.holds_lease().await, Ok(true)) {
                            return;
                        }
                    }
                };
                tokio::select! {
                    result = runner.pass() => {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "batch API pass failed; the next one resumes it");
                        }
                    }
                    _ = keep => tracing::warn!("batch API lease lost during a pass; another process resumes it"),
                    _ = shutdown.cancelled() => break,
                }
            }
            Ok(false) => {
                // The lane's gauges are the holder's: others show 0 (dashboards take the max).
                METRICS.batch_api_waiting.set(0);
                METRICS.batch_api_open.set(0);
                METRICS.batch_api_enqueued_tokens.reset();
            }
            Err(e) => tracing::debug!(error = %e, "batch API lease unavailable"),
        }
    }
    let _ = runner.deps().batches.release_lease(&runner.owner).await;
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned())
}

struct Runner {
    owner: String,
    handler: Arc<SectionHandler>,
    /// The number of open batches when no waiting line fitted any key's queue, and when:
    /// forming waits until that number changes (a batch ended), or [`STALL_RECHECK`] passed,
    /// rather than reading the waiting lines every pass.
    stalled: std::sync::Mutex<Option<(usize, std::time::Instant)>>,
}

/// The report of a line (`<report id>:<job id>`).
fn report_of(member: &str) -> &str {
    member.split_once(':').map_or(member, |(report, _)| report)
}

/// What a pass knows of reports: their status, read once per pass.
#[derive(Default)]
struct Reports(HashMap<String, Option<ReportStatus>>);

impl Runner {
    fn deps(&self) -> &crate::WorkerDeps {
        &self.handler.deps
    }

    fn config(&self) -> &Config {
        &self.handler.deps.config
    }

    async fn holds_lease(&self) -> anyhow::Result<bool> {
        Ok(self.deps().batches.lease(&self.owner, LEASE).await?)
    }

    /// Whether the report is gone or cancelled: its lines are dropped.
    async fn dropped(&self, reports: &mut Reports, report_id: &str) -> anyhow::Result<bool> {
        let status = match reports.0.get(report_id) {
            Some(s) => *s,
            None => {
                let s = self.deps().store.status(report_id).await?;
                reports.0.insert(report_id.to_owned(), s);
                s
            }
        };
        Ok(matches!(status, None | Some(ReportStatus::Cancelled)))
    }

    /// Drops `member` (now `at`) when its report was cancelled or is gone: true if so.
    async fn drop_if_gone(
        &self,
        reports: &mut Reports,
        member: &str,
        at: &Where,
    ) -> anyhow::Result<bool> {
        if !self.dropped(reports, report_of(member)).await? {
            return Ok(false);
        }
        if self.deps().batches.settle(member, at, Settle::Done).await? {
            METRICS
                .batch_api_lines
                .with_label_values(&["dropped"])
                .inc();
        }
        Ok(true)
    }

    /// One pass: waiting lines into new batches, then every open batch one step on.
    async fn pass(&self) -> anyhow::Result<()> {
        let mut reports = Reports::default();
        self.deadlines(&mut reports).await?;
        self.form(&mut reports).await?;
        let mut enqueued: BTreeMap<(String, String), u64> = BTreeMap::new();
        for batch in self.deps().batches.open().await? {
            if !self.holds_lease().await? {
                return Ok(());
            }
            let id = batch.id.clone();
            let tokens = (batch.key.clone(), batch.model.clone(), batch.tokens);
            match self.advance(batch, &mut reports).await {
                Ok(true) => {}
                Ok(false) => {
                    *enqueued.entry((tokens.0, tokens.1)).or_default() += tokens.2;
                }
                Err(e) => {
                    *enqueued.entry((tokens.0, tokens.1)).or_default() += tokens.2;
                    tracing::warn!(batch = %id, error = %e, "batch step failed; retried next pass");
                }
            }
        }
        let summary = self.deps().batches.summary().await?;
        METRICS.batch_api_waiting.set(summary.waiting as i64);
        METRICS.batch_api_open.set(summary.open as i64);
        METRICS.batch_api_enqueued_tokens.reset();
        for ((key, model), tokens) in enqueued {
            METRICS
                .batch_api_enqueued_tokens
                .with_label_values(&[key.as_str(), model.as_str()])
                .set(tokens as i64);
        }
        Ok(())
    }

    /// The enqueued-token limit for (`key`, `model`): configured, or lower when learnt.
    async fn limit(&self, key: &str, model: &str) -> anyhow::Result<u64> {
        let configured = self.config().batch_api.enqueued_tokens(model);
        let learnt = self.deps().batches.learnt(key, model).await?;
        Ok(learnt.map_or(configured, |l| l.min(configured)))
    }

    /// Waiting lines of dropped reports are forgotten, those near their deadline go live, and
    /// the rest are gathered per model into batches once the oldest has waited
    /// `batch_api.collect_ms` (or a file's worth is waiting), within each key's room under
    /// the enqueued-token limit.
    async fn form(&self, reports: &mut Reports) -> anyhow::Result<()> {
        let store = &self.deps().batches;
        let cfg = &self.config().batch_api;
        let now = now_ms();
        let (count, oldest) = store.waiting_since().await?;
        let Some(oldest) = oldest else {
            return Ok(());
        };
        if count < cfg.max_requests as u64 && oldest.saturating_add(cfg.collect_ms) > now {
            return Ok(());
        }
        // Every key's queue was full at the last try: nothing fits until a batch ends.
        let open_now = store.open().await?.len();
        if let Some((open, since)) = *self.stalled.lock().unwrap_or_else(|e| e.into_inner())
            && open == open_now
            && since.elapsed() < STALL_RECHECK
        {
            return Ok(());
        }
        let waiting = store.waiting(cfg.max_requests.min(MAX_SCAN)).await?;
        let mut by_model: BTreeMap<String, Vec<(String, Line, u64)>> = BTreeMap::new();
        for (member, raw, parked) in waiting {
            let Ok(line) = serde_json::from_str::<Line>(&raw) else {
                tracing::error!(member, "unreadable batch line dropped");
                store.settle(&member, &Where::Waiting, Settle::Done).await?;
                continue;
            };
            if self.drop_if_gone(reports, &member, &Where::Waiting).await? {
                continue;
            }
            if line.near_deadline(self.config(), now) {
                self.go_live(&member, &line, &Where::Waiting).await?;
                continue;
            }
            by_model
                .entry(line.request.model.clone())
                .or_default()
                .push((member, line, parked));
        }
        let open = store.open().await?;
        let keys: Vec<String> = self
            .config()
            .provider
            .keys
            .iter()
            .map(|k| k.name.clone())
            .collect();
        let (mut full, mut formed) = (false, false);
        for (model, lines) in by_model {
            let oldest = lines.iter().map(|l| l.2).min().unwrap_or(now);
            if lines.len() < cfg.max_requests && oldest.saturating_add(cfg.collect_ms) > now {
                continue;
            }
            // Each key's room for this model: (key, enqueued now, limit).
            let configured = cfg.enqueued_tokens(&model);
            let mut room: Vec<(String, u64, u64)> = Vec::with_capacity(keys.len());
            for key in &keys {
                let limit = self.limit(key, &model).await?;
                let used: u64 = open
                    .iter()
                    .filter(|b| &b.key == key && b.model == model)
                    .map(|b| b.tokens)
                    .sum();
                room.push((key.clone(), used, limit));
            }
            let mut rest = lines.into_iter().peekable();
            while rest.peek().is_some() {
                // The key with the most room takes the next batch.
                let Some(slot) = room
                    .iter_mut()
                    .max_by_key(|(_, used, limit)| limit.saturating_sub(*used))
                else {
                    break;
                };
                let free = slot.2.saturating_sub(slot.1);
                let mut taken: Vec<(String, u64)> = Vec::new();
                let (mut tokens, mut bytes) = (0u64, 0usize);
                while let Some((member, line, _)) = rest.peek() {
                    if line.tokens > configured {
                        // No batch can hold it (the provider refuses it alone): a live call can.
                        let (member, line) = (member.clone(), line.clone());
                        rest.next();
                        self.go_live(&member, &line, &Where::Waiting).await?;
                        continue;
                    }
                    let size = line.request.batch_line(member).len() + 1;
                    // A key with nothing enqueued takes one line even above a learnt limit: the
                    // provider's answer to it says whether that limit is still too high.
                    let probe = taken.is_empty() && slot.1 == 0;
                    if taken.len() >= cfg.max_requests
                        || bytes + size > cfg.max_file_bytes
                        || (tokens + line.tokens > free && !probe)
                    {
                        break;
                    }
                    tokens += line.tokens;
                    bytes += size;
                    taken.push((member.clone(), line.tokens));
                    rest.next();
                    if probe && tokens > free {
                        break;
                    }
                }
                if taken.is_empty() {
                    // The queue limit is full: the rest waits for batches to finish.
                    full = true;
                    break;
                }
                formed = true;
                let id = uuid::Uuid::now_v7().to_string();
                let claimed = store.claim(&id, &slot.0, &model, &taken).await?;
                slot.1 += tokens;
                tracing::info!(batch = %id, key = %slot.0, model = %model, lines = claimed.len(), tokens, "batch formed");
            }
        }
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) =
            (full && !formed).then(|| (open_now, std::time::Instant::now()));
        Ok(())
    }

    /// Lines whose report's deadline is within `batch_api.live_margin_secs`, waiting or in a
    /// batch, go to live calls.
    async fn deadlines(&self, reports: &mut Reports) -> anyhow::Result<()> {
        let store = &self.deps().batches;
        let margin = self
            .config()
            .batch_api
            .live_margin_secs
            .saturating_mul(1000);
        let due = store.due(now_ms().saturating_add(margin), MAX_SCAN).await?;
        let at = store.locate(&due).await?;
        for (member, at) in due.iter().zip(at) {
            let Some(at @ (Where::Waiting | Where::Batch(_))) = at else {
                continue;
            };
            if self.drop_if_gone(reports, member, &at).await? {
                continue;
            }
            self.live_now(member, &at).await?;
        }
        Ok(())
    }

    /// Moves `member` (now `at`) to a live call, reading its line.
    async fn live_now(&self, member: &str, at: &Where) -> anyhow::Result<()> {
        let store = &self.deps().batches;
        let raw = store.lines(&[member.to_owned()]).await?;
        match raw
            .into_iter()
            .next()
            .flatten()
            .and_then(|r| serde_json::from_str::<Line>(&r).ok())
        {
            Some(line) => self.go_live(member, &line, at).await,
            None => {
                store.settle(member, at, Settle::Done).await?;
                Ok(())
            }
        }
    }

    /// Moves a line to a live call: enqueues the section's live job, then marks the line.
    async fn go_live(&self, member: &str, line: &Line, at: &Where) -> anyhow::Result<()> {
        let job = line.job().live();
        let lane = fanout_queue::Lane::parse(&line.lane).unwrap_or(fanout_queue::Lane::Interactive);
        self.deps()
            .queue
            .enqueue(
                NewJob::new(
                    job.queue_id(),
                    serde_json::to_value(&job).expect("a job serializes"),
                )
                .lane(lane)
                .priority(line.priority),
            )
            .await?;
        if self.deps().batches.settle(member, at, Settle::Live).await? {
            METRICS.batch_api_lines.with_label_values(&["live"]).inc();
            tracing::info!(report = %line.report_id, job = %line.job_id, "batch line moved to a live call");
        }
        Ok(())
    }

    /// Extends the lease over a provider request that must not be made twice (an upload, a
    /// batch creation): no other process can take the lane over while it may be in flight.
    /// False when this process no longer holds the lease (stop).
    async fn hold_for_request(&self) -> anyhow::Result<bool> {
        let span = self.deps().llm.file_timeout() + LEASE;
        Ok(self.deps().batches.lease(&self.owner, span).await?)
    }

    /// The lease back to its usual length after such a request.
    async fn request_done(&self) {
        let _ = self.deps().batches.lease_exactly(&self.owner, LEASE).await;
    }

    /// One step of an open batch. Returns true when the batch is finished.
    async fn advance(&self, mut batch: OpenBatch, reports: &mut Reports) -> anyhow::Result<bool> {
        let store = &self.deps().batches;
        let llm = &self.deps().llm;
        let here = Where::Batch(batch.id.clone());
        if !self
            .config()
            .provider
            .keys
            .iter()
            .any(|k| k.name == batch.key)
            && batch.provider_id.is_none()
        {
            // Its key was removed from the configuration before it was submitted: its lines
            // wait again, to go out with another key.
            let members = store.members(&batch.id).await?;
            for (member, line) in self.lines_in(&batch, &members, reports).await? {
                store
                    .settle(&member, &here, Settle::Retry(line.encode()))
                    .await?;
            }
            self.finish(&batch, None).await?;
            return Ok(true);
        }
        if batch.state == "formed" {
            let members = store.members(&batch.id).await?;
            let lines = self.lines_in(&batch, &members, reports).await?;
            if lines.is_empty() {
                self.finish(&batch, None).await?;
                return Ok(true);
            }
            let mut content = Vec::new();
            for (member, line) in &lines {
                content.extend_from_slice(line.request.batch_line(member).as_bytes());
                content.push(b'\n');
            }
            drop(lines);
            let filename = format!("fanout-batch-{}.jsonl", batch.id);
            if !self.hold_for_request().await? {
                return Ok(false);
            }
            // Only a try that may have uploaded before (and stopped before recording it) looks
            // for its file first.
            let earlier = match batch.upload_started {
                true => llm
                    .find_batch_file(&batch.key, &filename)
                    .await
                    .ok()
                    .flatten(),
                false => None,
            };
            let file_id = match earlier {
                Some(id) => id,
                None => {
                    store
                        .record(&batch.id, &[("upload_started", "1".into())])
                        .await?;
                    let uploaded = llm.upload_batch_file(&batch.key, &filename, content).await;
                    self.request_done().await;
                    match uploaded {
                        Ok(id) => id,
                        Err(e) => return self.refused(&batch, e, reports).await,
                    }
                }
            };
            store
                .record(
                    &batch.id,
                    &[("file_id", file_id.clone()), ("state", "uploaded".into())],
                )
                .await?;
            batch.file_id = Some(file_id);
            batch.state = "uploaded".into();
        }
        if batch.state == "uploaded" {
            let Some(file_id) = batch.file_id.clone() else {
                anyhow::bail!("batch {} is uploaded without a file id", batch.id);
            };
            if !self.hold_for_request().await? {
                return Ok(false);
            }
            let earlier = match batch.create_started {
                true => llm
                    .find_batch(&batch.key, METADATA_ID, &batch.id)
                    .await
                    .ok()
                    .flatten(),
                false => None,
            };
            let created = match earlier {
                Some(b) => b,
                None => {
                    // Nothing left to send (every line went live or was dropped meanwhile).
                    let members = store.members(&batch.id).await?;
                    let at = store.locate(&members).await?;
                    if !at.iter().any(|w| w.as_ref() == Some(&here)) {
                        self.finish(&batch, None).await?;
                        return Ok(true);
                    }
                    store
                        .record(&batch.id, &[("create_started", "1".into())])
                        .await?;
                    let created = llm
                        .create_batch(&batch.key, &file_id, &[(METADATA_ID, &batch.id)])
                        .await;
                    self.request_done().await;
                    match created {
                        Ok(b) => b,
                        Err(e) => return self.refused(&batch, e, reports).await,
                    }
                }
            };
            let now = now_ms();
            store
                .record(
                    &batch.id,
                    &[
                        ("provider_id", created.id.clone()),
                        ("state", "submitted".into()),
                        ("submitted_ms", now.to_string()),
                        ("polled_ms", now.to_string()),
                    ],
                )
                .await?;
            METRICS
                .batch_api_batches
                .with_label_values(&["submitted"])
                .inc();
            tracing::info!(batch = %batch.id, provider_batch = %created.id, lines = batch.count, "batch submitted");
            return Ok(false);
        }
        let Some(provider_id) = batch.provider_id.clone() else {
            anyhow::bail!(
                "batch {} in state `{}` has no provider id",
                batch.id,
                batch.state
            );
        };
        let now = now_ms();
        if batch
            .polled_ms
            .saturating_add(self.config().batch_api.poll_ms)
            > now
        {
            return Ok(false);
        }
        // Lines whose report was cancelled are dropped (deadlines are seen to every pass, from
        // their own index). Read from where each line is: the lines are not loaded to poll.
        let members = store.members(&batch.id).await?;
        let at = store.locate(&members).await?;
        let mut still = 0usize;
        for (member, at) in members.iter().zip(at) {
            if at.as_ref() != Some(&here) || self.drop_if_gone(reports, member, &here).await? {
                continue;
            }
            still += 1;
        }
        if still == 0 && !batch.cancel_sent {
            // Nothing needs it any more: every report of it was cancelled, or every line went
            // live. Its answers so far are billed whatever we do; the rest need not be.
            match llm.cancel_batch(&batch.key, &provider_id).await {
                Ok(_) => {
                    tracing::info!(batch = %batch.id, provider_batch = %provider_id, "batch cancelled: no line needs it")
                }
                Err(e) => {
                    tracing::debug!(batch = %batch.id, error = %e, "batch cancel refused (it may have ended)")
                }
            }
            store
                .record(&batch.id, &[("cancel_sent", "1".into())])
                .await?;
        }
        let info = match llm.retrieve_batch(&batch.key, &provider_id).await {
            Ok(info) => info,
            // The provider does not know the batch (any more): its lines are sent again.
            Err(e) if e.status == Some(404) => {
                let e = CallError::new(
                    ErrorKind::Server,
                    format!("batch {provider_id} is unknown to the provider: {e}"),
                );
                return self.refused(&batch, e, reports).await;
            }
            // Anything else (unreachable, 5xx, a key the provider refuses) is tried again
            // next poll: the batch runs on at the provider whatever we know of it.
            Err(e) => return Err(e.into()),
        };
        store
            .record(&batch.id, &[("polled_ms", now.to_string())])
            .await?;
        if !info.state.is_final() {
            return Ok(false);
        }
        match self.settle_batch(&batch, &members, &info, reports).await {
            Ok(()) => Ok(true),
            // Its files cannot be read (gone, refused): its lines are sent again.
            Err(e) => match e.downcast::<CallError>() {
                Ok(e) if !e.is_retryable() => {
                    let e = CallError::new(
                        ErrorKind::Server,
                        format!("the results of batch {provider_id} could not be read: {e}"),
                    );
                    self.refused(&batch, e, reports).await
                }
                Ok(e) => Err(e.into()),
                Err(e) => Err(e),
            },
        }
    }

    /// Forgets `batch` (once replicas have it) and deletes its files at the provider:
    /// the input file, and the output and error files of `info`.
    async fn finish(&self, batch: &OpenBatch, info: Option<&BatchInfo>) -> anyhow::Result<()> {
        self.deps().batches.finish(&batch.id).await?;
        let files = [
            batch.file_id.as_ref(),
            info.and_then(|i| i.output_file_id.as_ref()),
            info.and_then(|i| i.error_file_id.as_ref()),
        ];
        for file in files.into_iter().flatten() {
            if let Err(e) = self.deps().llm.delete_file(&batch.key, file).await {
                tracing::debug!(file, error = %e, "batch file not deleted");
            }
        }
        Ok(())
    }

    /// A Files or Batch API request of `batch` failed. A retryable failure (the provider
    /// unreachable, a 5xx, a 429) is tried again next pass; any other ends the batch: each of
    /// its lines is retried or failed with that error, as a live call's would be.
    async fn refused(
        &self,
        batch: &OpenBatch,
        err: CallError,
        reports: &mut Reports,
    ) -> anyhow::Result<bool> {
        if err.is_retryable() {
            return Err(err.into());
        }
        tracing::warn!(batch = %batch.id, key = %batch.key, error = %err, "the provider refused a batch request: its lines are settled with that error");
        let here = Where::Batch(batch.id.clone());
        let members = self.deps().batches.members(&batch.id).await?;
        for (member, line) in self.lines_in(batch, &members, reports).await? {
            self.retry_or_fail(&member, &here, line, err.clone())
                .await?;
        }
        self.finish(batch, None).await?;
        Ok(true)
    }

    /// The lines still in `batch` (of its `members`), read: a line that cannot be read fails
    /// its section, and one whose report was cancelled or is gone is dropped, on the way.
    async fn lines_in(
        &self,
        batch: &OpenBatch,
        members: &[String],
        reports: &mut Reports,
    ) -> anyhow::Result<Vec<(String, Line)>> {
        let store = &self.deps().batches;
        let here = Where::Batch(batch.id.clone());
        let at = store.locate(members).await?;
        let raw = store.lines(members).await?;
        let mut out = Vec::with_capacity(members.len());
        for ((member, at), raw) in members.iter().zip(at).zip(raw) {
            if at.as_ref() != Some(&here) || self.drop_if_gone(reports, member, &here).await? {
                continue;
            }
            match raw.and_then(|r| serde_json::from_str::<Line>(&r).ok()) {
                Some(line) => out.push((member.clone(), line)),
                None => self.unreadable(member, &here).await?,
            }
        }
        Ok(out)
    }

    /// A line that cannot be read (written by another version, or damaged): its section
    /// fails with that reason, so that its report still finishes.
    async fn unreadable(&self, member: &str, at: &Where) -> anyhow::Result<()> {
        tracing::error!(member, "unreadable batch line: its section fails");
        let (report, job_id) = member.split_once(':').unwrap_or((member, ""));
        let job = SectionJob::new(report, job_id);
        match self.deps().store.job_context(report, job_id).await {
            Ok(ctx) => {
                let lane = ctx.lane.to_string();
                self.handler
                    .fail(
                        &job,
                        &ctx.node.section,
                        &lane,
                        "batch_line",
                        "its line in the Batch API lane could not be read",
                        0,
                    )
                    .await?;
            }
            Err(fanout_aggregator::Error::ReportNotFound { .. })
            | Err(fanout_aggregator::Error::UnknownJob { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.deps().batches.settle(member, at, Settle::Done).await?;
        Ok(())
    }

    /// A batch ended: every line still in it is completed, retried or failed from its output
    /// and error files; then the batch is forgotten and its files deleted.
    async fn settle_batch(
        &self,
        batch: &OpenBatch,
        members: &[String],
        info: &BatchInfo,
        reports: &mut Reports,
    ) -> anyhow::Result<()> {
        let store = &self.deps().batches;
        let llm = &self.deps().llm;
        let here = Where::Batch(batch.id.clone());
        let mut records = HashMap::new();
        for file in [&info.output_file_id, &info.error_file_id]
            .into_iter()
            .flatten()
        {
            let content = llm.file_content(&batch.key, file).await?;
            for line in String::from_utf8_lossy(&content).lines() {
                if let Some((id, outcome)) = parse_batch_record(line) {
                    records.insert(id, outcome);
                }
            }
        }
        let refused_for_tokens = info.state == BatchState::Failed
            && info
                .errors
                .iter()
                .any(|(code, _)| code == "token_limit_exceeded");
        // A line refused alone, with nothing else enqueued, is larger than the provider's
        // whole queue: it runs live.
        let mut too_large = false;
        if refused_for_tokens {
            // The provider's enqueued-token limit is lower than ours: learn it. It took every
            // other open batch of this key and model, and not this one on top.
            let others: u64 = store
                .open()
                .await?
                .iter()
                .filter(|b| b.id != batch.id && b.key == batch.key && b.model == batch.model)
                .map(|b| b.tokens)
                .sum();
            too_large = others == 0 && batch.count == 1;
            if !too_large {
                let learnt = (others + batch.tokens / 2).max(1);
                let ttl = Duration::from_secs(self.config().batch_api.learned_ttl_secs);
                store.learn(&batch.key, &batch.model, learnt, ttl).await?;
                tracing::warn!(batch = %batch.id, key = %batch.key, model = %batch.model, learnt, "the provider refused a batch for its enqueued tokens: limit lowered, its lines wait");
            }
        }
        let whole_batch_error = (!info.errors.is_empty()).then(|| {
            info.errors
                .iter()
                .map(|(code, message)| format!("{code}: {message}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let latency = Duration::from_millis(
            now_ms().saturating_sub(batch.submitted_ms.unwrap_or(batch.created_ms)),
        );
        for (member, line) in self.lines_in(batch, members, reports).await? {
            let member = member.as_str();
            let outcome = match records.remove(member) {
                Some(Ok(answer)) => answer.into_response(&line.request, latency),
                Some(Err(e)) => Err(e),
                None if too_large => {
                    tracing::warn!(report = %line.report_id, section = %line.job_id, tokens = line.tokens, "the provider's batch queue cannot hold this request alone: it runs live");
                    self.go_live(member, &line, &here).await?;
                    continue;
                }
                None if refused_for_tokens => {
                    // Not the line's fault: it waits for room, attempts unspent.
                    store
                        .settle(member, &here, Settle::Retry(line.encode()))
                        .await?;
                    continue;
                }
                // A batch the provider failed as a whole (a model it does not batch, a file
                // it does not accept) is the request's fault, as a live 400 is: no retry.
                None if info.state == BatchState::Failed => Err(CallError::new(
                    ErrorKind::BadRequest,
                    format!(
                        "batch {} failed{}",
                        info.id,
                        whole_batch_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                )),
                None => Err(CallError::new(
                    ErrorKind::Server,
                    format!(
                        "batch {} ended {} without answering it{}",
                        info.id,
                        info.state.as_str(),
                        whole_batch_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                )),
            };
            match outcome {
                Ok(resp) => {
                    let attempts = line.attempts + 1;
                    self.handler
                        .complete(
                            &line.job(),
                            &line.section,
                            &line.lane,
                            &resp,
                            attempts,
                            false,
                            true,
                        )
                        .await?;
                    if store.settle(member, &here, Settle::Done).await? {
                        METRICS
                            .batch_api_lines
                            .with_label_values(&["completed"])
                            .inc();
                    }
                }
                Err(e) => self.retry_or_fail(member, &here, line, e).await?,
            }
        }
        self.finish(batch, Some(info)).await?;
        METRICS
            .batch_api_batches
            .with_label_values(&[info.state.as_str()])
            .inc();
        tracing::info!(batch = %batch.id, provider_batch = %info.id, state = info.state.as_str(), "batch finished");
        Ok(())
    }

    /// A line that came back with an error: into the next batch (or live, near the deadline)
    /// while retryable and attempts are left, else its section fails with the reason.
    async fn retry_or_fail(
        &self,
        member: &str,
        at: &Where,
        mut line: Line,
        err: CallError,
    ) -> anyhow::Result<()> {
        let store = &self.deps().batches;
        // As on the live path, a rate limit is not the request's failure: no attempt spent.
        let spent = u32::from(err.kind != ErrorKind::RateLimited);
        let attempts = line.attempts + spent;
        if err.is_retryable() && attempts < self.config().queue.max_attempts {
            tracing::warn!(report = %line.report_id, section = %line.job_id, attempts, error = %err, "batch line failed, will retry");
            line.attempts = attempts;
            if line.near_deadline(self.config(), now_ms()) {
                return self.go_live(member, &line, at).await;
            }
            if store
                .settle(member, at, Settle::Retry(line.encode()))
                .await?
            {
                METRICS
                    .batch_api_lines
                    .with_label_values(&["retried"])
                    .inc();
                METRICS
                    .jobs_retried
                    .with_label_values(&[line.lane.as_str(), line.section.as_str()])
                    .inc();
            }
            return Ok(());
        }
        let reason = failure_reason(&err, attempts);
        tracing::warn!(report = %line.report_id, section = %line.job_id, attempts, error = %err, "batch line failed, section failed");
        self.handler
            .fail(
                &line.job(),
                &line.section,
                &line.lane,
                err.kind.as_str(),
                &reason,
                attempts,
            )
            .await?;
        if store.settle(member, at, Settle::Done).await? {
            METRICS.batch_api_lines.with_label_values(&["failed"]).inc();
        }
        Ok(())
    }
}
