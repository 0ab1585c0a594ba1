//! The aggregator process: reads report notifications through a consumer group, assembles each
//! finished report once (Markdown + JSON, stored with the report TTL) and calls the
//! `on_finished` hook.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use redis::Script;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::assemble::{render_json, render_markdown};
use crate::error::Result;
use crate::store::Store;
use crate::view::ReportView;

/// The consumer group of the aggregator processes on the notification stream.
pub const GROUP: &str = "aggregator";

/// Called once per finish of a report, after its documents are stored (a report an operator
/// reopened finishes, and is assembled, again). It runs on the
/// aggregator's loop: hand the view to a channel or a task tracker rather than block.
pub type OnFinished = Arc<dyn Fn(ReportView) + Send + Sync>;

/// How an aggregator process runs.
#[derive(Clone)]
pub struct AggregatorOptions {
    /// Consumer name in the group; unique per process (the default is random).
    pub consumer: String,
    /// How long one read waits for notifications.
    pub block: Duration,
    /// Notifications read at once.
    pub batch: usize,
    /// A notification left unacknowledged this long (its aggregator died) is claimed by
    /// another one; also the lease of an assembly in progress.
    pub claim_idle: Duration,
    pub on_finished: Option<OnFinished>,
}

impl Default for AggregatorOptions {
    fn default() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            consumer: format!("aggregator-{}-{}", std::process::id(), &id[..8]),
            block: Duration::from_secs(2),
            batch: 64,
            claim_idle: Duration::from_secs(30),
            on_finished: None,
        }
    }
}

impl std::fmt::Debug for AggregatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregatorOptions")
            .field("consumer", &self.consumer)
            .field("block", &self.block)
            .field("batch", &self.batch)
            .field("claim_idle", &self.claim_idle)
            .field("on_finished", &self.on_finished.is_some())
            .finish()
    }
}

/// Stores a finished report's documents if it is still the finish that was rendered: an
/// operator may reopen the report meanwhile (`Store::reopen`), and documents of the earlier
/// finish would then be served, and never replaced. KEYS: meta, doc:md, doc:json (the report's
/// slot). ARGV: status, finished_at, markdown, json, ttl. Returns 1 when stored.
const STORE_DOCS: &str = r"
local m = redis.call('HMGET', KEYS[1], 'status', 'finished_at')
if m[1] ~= ARGV[1] or tonumber(m[2]) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
return 1
";
static STORE_DOCS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(STORE_DOCS));

/// Marks a report assembled under the same condition as [`STORE_DOCS`]: after a reopen the
/// next finish must find no `done`. KEYS: meta, assembled. ARGV: status, finished_at, ttl.
const MARK_DONE: &str = r"
local m = redis.call('HMGET', KEYS[1], 'status', 'finished_at')
if m[1] ~= ARGV[1] or tonumber(m[2]) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[2], 'done', 'EX', ARGV[3])
return 1
";
static MARK_DONE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(MARK_DONE));

/// What to do with a notification once handled.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ack,
    /// Another aggregator holds the assembly lease: leave the notification pending; it is
    /// claimed again after `claim_idle`, when the other one is done (or dead).
    Leave,
}

struct Aggregator {
    store: Store,
    options: AggregatorOptions,
    stream: String,
    /// The connection of the blocking reads, taken out of the pool.
    reader: Option<fanout_core::redis::Blocking>,
    group_ready: bool,
    /// Our own pending notifications were (re)read after a start or an error.
    own_pending_done: bool,
    last_claim: Option<Instant>,
    last_sweep: Option<Instant>,
}

/// How often an aggregator forgets the tenant index entries of expired reports.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Run an aggregator until `shutdown`. Several processes share the work through the consumer
/// group [`GROUP`]; notifications of a dead one are claimed after `claim_idle`. Redis errors
/// are logged and retried with backoff; this only returns on shutdown.
pub async fn run(
    store: Store,
    options: AggregatorOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    let stream = store.keys().notifications();
    info!(consumer = %options.consumer, stream = %stream, "aggregator started");
    let mut agg = Aggregator {
        store,
        options,
        stream,
        reader: None,
        group_ready: false,
        own_pending_done: false,
        last_claim: None,
        last_sweep: None,
    };
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match agg.step(&shutdown).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(e) => {
                if e.is_nogroup() {
                    agg.group_ready = false;
                }
                agg.reader = None;
                agg.own_pending_done = false;
                warn!(consumer = %agg.options.consumer, error = %e, retry_in_ms = delay.as_millis() as u64, "aggregator redis error, will retry");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    info!(consumer = %agg.options.consumer, "aggregator stopped");
    Ok(())
}

impl Aggregator {
    async fn step(&mut self, shutdown: &CancellationToken) -> Result<()> {
        if !self.group_ready {
            self.create_group().await?;
            self.group_ready = true;
        }
        if !self.own_pending_done {
            self.process_own_pending().await?;
            self.own_pending_done = true;
        }
        let claim_every = (self.options.claim_idle / 2).max(Duration::from_millis(100));
        if self.last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
            self.claim_stale().await?;
            self.last_claim = Some(Instant::now());
        }
        if self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
            self.last_sweep = Some(Instant::now());
            // Housekeeping: a failure here must not hold up the notifications.
            match self.store.forget_expired(10_000).await {
                Ok(0) => {}
                Ok(n) => debug!(
                    forgotten = n,
                    "expired reports forgotten by their tenant index"
                ),
                Err(e) => warn!(error = %e, "could not sweep the tenant indexes, will try again"),
            }
        }

        let reader = self
            .store
            .pool()
            .blocking(
                &mut self.reader,
                self.options.block + Duration::from_secs(5),
            )
            .await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.options.consumer)
            .arg("COUNT")
            .arg(self.options.batch.max(1))
            .arg("BLOCK")
            .arg(self.options.block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        let read = cmd.query_async::<Option<StreamReadReply>>(reader);
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = read => r?,
        };
        let entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        self.process(&entries).await
    }

    async fn create_group(&self) -> Result<()> {
        let mut conn = self.store.pool().get().await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {
                debug!(stream = %self.stream, group = GROUP, "consumer group created");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Notifications delivered to this consumer name and not acknowledged (a restart under
    /// the same name, or an error mid-batch).
    async fn process_own_pending(&self) -> Result<()> {
        let mut after = "0-0".to_owned();
        loop {
            let mut conn = self.store.pool().get().await?;
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.options.consumer)
                .arg("COUNT")
                .arg(self.options.batch.max(1))
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(&after)
                .query_async(&mut conn)
                .await?;
            drop(conn);
            let entries: Vec<StreamId> = reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect();
            let Some(last) = entries.last() else {
                return Ok(());
            };
            after = last.id.clone();
            self.process(&entries).await?;
        }
    }

    /// Take over notifications another aggregator left unacknowledged for `claim_idle`.
    async fn claim_stale(&self) -> Result<()> {
        let mut cursor = "0-0".to_owned();
        // Bounded: one pass over the pending list per claim round.
        for _ in 0..100 {
            let mut conn = self.store.pool().get().await?;
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(GROUP)
                .arg(&self.options.consumer)
                .arg(self.options.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.options.batch.max(1))
                .query_async(&mut conn)
                .await?;
            drop(conn);
            if !reply.claimed.is_empty() {
                info!(consumer = %self.options.consumer, count = reply.claimed.len(), "claimed stale report notifications");
                self.process(&reply.claimed).await?;
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        Ok(())
    }

    async fn process(&self, entries: &[StreamId]) -> Result<()> {
        for entry in entries {
            let outcome = match entry.get::<String>("report_id") {
                Some(report_id) => self.assemble(&report_id).await?,
                None => {
                    warn!(id = %entry.id, "notification without report_id, dropped");
                    Outcome::Ack
                }
            };
            if outcome == Outcome::Ack {
                let mut conn = self.store.pool().get().await?;
                let _: ((), ()) = redis::pipe()
                    .atomic()
                    .cmd("XACK")
                    .arg(&self.stream)
                    .arg(GROUP)
                    .arg(&entry.id)
                    .cmd("XDEL")
                    .arg(&self.stream)
                    .arg(&entry.id)
                    .query_async(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Assemble a finished report once across every aggregator: a lease (`SET NX PX`) while
    /// assembling, `done` when the documents are stored and the hook was called.
    async fn assemble(&self, report_id: &str) -> Result<Outcome> {
        let keys = self.store.keys().report(report_id);
        let token = format!("lock:{}", self.options.consumer);
        let ttl = self.store.ttl().as_secs().max(1);
        let mut conn = self.store.pool().get().await?;
        let mut owned = false;
        for _ in 0..3 {
            let set: Option<String> = redis::cmd("SET")
                .arg(keys.assembled())
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.options.claim_idle.as_millis().max(1) as u64)
                .query_async(&mut conn)
                .await?;
            if set.is_some() {
                owned = true;
                break;
            }
            let current: Option<String> = redis::cmd("GET")
                .arg(keys.assembled())
                .query_async(&mut conn)
                .await?;
            match current.as_deref() {
                Some("done") => return Ok(Outcome::Ack),
                // Our own lease, from an attempt that met an error.
                Some(t) if t == token => {
                    owned = true;
                    break;
                }
                Some(_) => return Ok(Outcome::Leave),
                // The lease expired between SET and GET: try again.
                None => continue,
            }
        }
        if !owned {
            return Ok(Outcome::Leave);
        }
        drop(conn);

        let Some(view) = self.store.view(report_id).await? else {
            debug!(report = %report_id, "notified report is gone (expired)");
            return Ok(Outcome::Ack);
        };
        if !view.status.is_terminal() {
            // Not finished: nothing final to assemble. Release the lease.
            let mut conn = self.store.pool().get().await?;
            let _: () = redis::cmd("DEL")
                .arg(keys.assembled())
                .query_async(&mut conn)
                .await?;
            return Ok(Outcome::Ack);
        }
        let markdown = render_markdown(&view);
        let json = render_json(&view).to_string();
        // The finish these documents are of: the report may be reopened until they are stored.
        let finish = (
            view.status.as_str(),
            view.finished_at.map_or(String::new(), |t| t.to_string()),
        );
        let mut conn = self.store.pool().get().await?;
        let stored: i64 = STORE_DOCS_SCRIPT
            .key(keys.meta())
            .key(keys.doc_markdown())
            .key(keys.doc_json())
            .arg(finish.0)
            .arg(&finish.1)
            .arg(markdown)
            .arg(json)
            .arg(ttl)
            .invoke_async(&mut conn)
            .await?;
        if stored == 0 {
            // Reopened (its lease went with it): its next finish notifies again.
            info!(report = %report_id, "report reopened while being assembled, left to its next finish");
            return Ok(Outcome::Ack);
        }
        if let Some(url) = &view.callback_url {
            // The webhook outbox, delivered by `webhook::Webhooks::run`. Written before
            // the report counts as assembled: a crash in between assembles it again (NX keeps
            // one entry), never loses the webhook.
            let k = self.store.keys();
            let _: () = redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(k.webhooks_url())
                .arg(report_id)
                .arg(url)
                .ignore()
                .cmd("ZADD")
                .arg(k.webhooks_due())
                .arg("NX")
                .arg(0) // due at once, whatever this host's clock says
                .arg(report_id)
                .ignore()
                .query_async(&mut conn)
                .await?;
            // Shown on the report (its own slot: a separate write; kept if already further).
            let _: () = redis::cmd("HSETNX")
                .arg(keys.meta())
                .arg("webhook_state")
                .arg(crate::WebhookState::Pending.as_str())
                .query_async(&mut conn)
                .await?;
        }
        drop(conn);

        let status = view.status;
        let sections = view.totals.sections;
        if let Some(hook) = &self.options.on_finished {
            // A panicking hook must not take the aggregator down.
            if std::panic::catch_unwind(AssertUnwindSafe(|| hook(view))).is_err() {
                error!(report = %report_id, "on_finished hook panicked");
            }
        }
        let mut conn = self.store.pool().get().await?;
        let marked: i64 = MARK_DONE_SCRIPT
            .key(keys.meta())
            .key(keys.assembled())
            .arg(finish.0)
            .arg(&finish.1)
            .arg(ttl)
            .invoke_async(&mut conn)
            .await?;
        if marked == 0 {
            // The reopen deleted the documents; the webhook entry written above is dropped by
            // it too, unless that write came after the reopen (then the deliverer gives it up
            // as expired, or the next finish reuses it).
            info!(report = %report_id, "report reopened right after it was assembled, left to its next finish");
        } else {
            info!(report = %report_id, status = %status, sections, "report assembled");
        }
        Ok(Outcome::Ack)
    }
}
