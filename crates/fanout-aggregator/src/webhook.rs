//! Webhooks: when a report with a `callback_url` finishes, POST its final JSON there, signed.
//!
//! Deliveries are durable. The aggregator writes each finished report with a `callback_url` to
//! an outbox in Redis before the report counts as assembled; [`Webhooks::run`] (the `fanout
//! aggregator` process runs it; any number of them may) claims due entries with a lease,
//! POSTs the stored report JSON and settles each entry. An entry whose deliverer died or was
//! stopped mid-POST is claimed again when its lease runs out, so a webhook survives restarts and
//! crashes: it is delivered, retried, or given up on with a reason (the `webhooks:dead` stream),
//! never dropped. A slow or dead receiver never blocks assembly.
//!
//! Each webhook is tried `attempts` times with exponential backoff and jitter (by default 20
//! tries over about a day; a receiver's `retry-after` wins); 2xx is delivered, 408/425/429/5xx
//! and network errors are retried, other answers (including redirects, which are not followed)
//! give up at once. The report shows where its webhook stands (`webhook`: state, attempts, next
//! attempt, last error); a dead webhook can be sent again ([`Webhooks::redeliver`],
//! `fanout webhooks redeliver`).
//!
//! Headers of each POST:
//! - `X-Fanout-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` (when a
//!   secret is set; `FANOUT_WEBHOOK_SECRET`)
//! - `X-Fanout-Timestamp: <unix seconds>` (signed with the body: reject old ones to stop
//!   replays)
//! - `X-Fanout-Event: report.finished`, `X-Fanout-Report-Id: <id>` (the same on every attempt
//!   and on a rare repeat after a crash: deduplicate on it), `X-Fanout-Attempt: <n>`
//!
//! A report an operator reopened ([`crate::Store::reopen`]) finishes again and is sent again,
//! with the same report id and a later `finished_at` in the body: a receiver that deduplicates
//! on the id alone keeps the first finish.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Keys, Store};
use bytes::Bytes;
use fanout_core::Secret;
use fanout_core::config::WebhooksConfig;
use fanout_core::redis::Pool;
use fanout_metrics::METRICS;
use hmac::{Hmac, Mac};
use rand::Rng;
use redis::Script;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};
use url::Host;

use crate::target::WebhookTargets;
use crate::view::WebhookState;

pub const SIGNATURE_HEADER: &str = "x-fanout-signature";
pub const TIMESTAMP_HEADER: &str = "x-fanout-timestamp";
pub const EVENT_HEADER: &str = "x-fanout-event";
pub const REPORT_ID_HEADER: &str = "x-fanout-report-id";
pub const ATTEMPT_HEADER: &str = "x-fanout-attempt";
/// The environment variable the binaries read the signing secret from.
pub const SECRET_ENV: &str = "FANOUT_WEBHOOK_SECRET";

/// Dead webhooks kept in the `webhooks:dead` stream (the oldest are trimmed).
const DEAD_KEPT: u64 = 10_000;

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Signs every delivery; without one, deliveries are unsigned (a warning is logged).
    pub secret: Option<Secret>,
    /// Tries per webhook, the first included.
    pub attempts: u32,
    /// Backoff before the second try; doubles each time, with jitter, up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Timeout of one POST.
    pub timeout: Duration,
    /// How long a claimed webhook stays with its deliverer; past it (the deliverer died or
    /// stopped), another one claims it. Longer than `timeout`.
    pub lease: Duration,
    /// How often the outbox is checked for due webhooks.
    pub poll: Duration,
    /// POSTs in flight at once per process.
    pub max_in_flight: usize,
    /// Where webhooks may go (checked again at every delivery): public addresses, plus the
    /// internal receivers the operator allows.
    pub targets: Arc<WebhookTargets>,
}

impl Default for WebhookOptions {
    /// The schedule of [`WebhooksConfig::default`]: about a day of tries.
    fn default() -> Self {
        let c = WebhooksConfig::default();
        Self {
            secret: None,
            attempts: c.attempts,
            base_delay: Duration::from_secs(c.base_delay_secs),
            max_delay: Duration::from_secs(c.max_delay_secs),
            timeout: Duration::from_secs(c.timeout_secs),
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            max_in_flight: 32,
            targets: Arc::default(),
        }
    }
}

impl WebhookOptions {
    /// The options of `config` (schedule, timeout, allowed internal receivers), with the secret
    /// from `FANOUT_WEBHOOK_SECRET` in `env`.
    pub fn from_config(
        config: &WebhooksConfig,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Self, String> {
        let targets = WebhookTargets::new(&config.allow_hosts)
            .map_err(|e| format!("config key `webhooks.allow_hosts`: {e}"))?;
        Ok(Self {
            attempts: config.attempts,
            base_delay: Duration::from_secs(config.base_delay_secs),
            max_delay: Duration::from_secs(config.max_delay_secs),
            timeout: Duration::from_secs(config.timeout_secs),
            // A POST may take its whole timeout: the lease outlasts it.
            lease: Duration::from_secs(config.timeout_secs.saturating_mul(3).max(30)),
            targets: Arc::new(targets),
            ..Self::from_env(env)
        })
    }

    /// The defaults, with the secret from `FANOUT_WEBHOOK_SECRET` in `env` (the process
    /// environment in binaries, a map in tests).
    pub fn from_env(env: &std::collections::HashMap<String, String>) -> Self {
        Self {
            secret: env
                .get(SECRET_ENV)
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot build the webhook http client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("webhook outbox: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("webhook outbox: {0}")]
    Pool(#[from] fanout_core::redis::PoolError),
}

/// A webhook given up on, from the `webhooks:dead` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadWebhook {
    pub report_id: String,
    pub url: String,
    pub attempts: u32,
    pub reason: String,
}

/// The `fanout aggregator` process: assembles finished reports ([`crate::run`]) and delivers
/// their webhooks until `shutdown`. On shutdown, POSTs in flight get `grace`; whatever is left is
/// claimed again after its lease by another aggregator (or this one, restarted).
pub async fn serve(
    store: Store,
    options: crate::AggregatorOptions,
    webhooks: WebhookOptions,
    grace: Duration,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let webhooks = Webhooks::new(webhooks, &store)?;
    METRICS.zero_webhook_series();
    let delivering = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { webhooks.run(shutdown, grace).await }
    });
    let result = crate::run(store, options, shutdown.clone()).await;
    // The aggregator stops only on shutdown or a fatal error: either way, deliveries stop too.
    shutdown.cancel();
    let _ = delivering.await;
    Ok(result?)
}

/// Why [`serve`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
    #[error(transparent)]
    Aggregator(#[from] crate::Error),
}

/// The delivery side of webhooks: [`Webhooks::run`] drains the outbox the aggregator fills.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    options: WebhookOptions,
    pool: Pool,
    keys: Keys,
    /// Cancelled when the grace period after a stop runs out: POSTs in flight are dropped
    /// (their entries are claimed again after the lease).
    abandon: CancellationToken,
}

/// The outbox scripts, hashed once per process.
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));
static RESCHEDULE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RESCHEDULE));

/// Claims up to `ARGV[1]` due webhooks for `ARGV[2]` ms on the Redis clock; returns
/// `[id, attempt, …]`, counting the attempt now, so a deliverer that dies mid-POST used it.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HINCRBY', KEYS[2], id, 1)
end
return out
";

/// Puts a claimed webhook back, due `ARGV[2]` ms from now on the Redis clock (only if it is
/// still in the outbox).
const RESCHEDULE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
";

/// Records where a report's webhook stands on its record (only while the record exists):
/// ARGV state, attempts, ms until the next try ("" = none), last error ("" = none).
const STATUS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'webhook_state', ARGV[1], 'webhook_attempts', ARGV[2], 'webhook_error', ARGV[4])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'webhook_next_at')
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'webhook_next_at', now + tonumber(ARGV[3]))
end
return 1
";
static STATUS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(STATUS));

/// How a delivery ended for the outbox.
enum Settle {
    Delivered,
    /// Again after this long; why this try failed.
    Retry(Duration, String),
    Dead(String),
}

impl Webhooks {
    /// Deliverer of the outbox that `store`'s aggregators fill.
    pub fn new(options: WebhookOptions, store: &Store) -> Result<Self, WebhookError> {
        // Connections go only to addresses the target policy allows, from the lookup that
        // checked them (no second lookup an attacker's DNS could answer differently).
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would resolve the target itself, past the check.
            .no_proxy()
            .dns_resolver(options.targets.resolver())
            .user_agent(concat!("fanout-webhook/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                options,
                pool: store.pool().clone(),
                keys: store.keys().clone(),
                abandon: CancellationToken::new(),
            }),
        })
    }

    /// Deliver due webhooks until `shutdown`; then let POSTs in flight finish for up to
    /// `grace` and drop the rest (their entries stay in the outbox, claimed again after the
    /// lease). Redis trouble is logged and retried; this returns only after `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken, grace: Duration) {
        let inner = &self.inner;
        // Said by the deliverer only: the CLI's `webhooks` and `status` read the outbox too.
        if inner.options.secret.is_none() {
            warn!(
                env = SECRET_ENV,
                "no webhook secret set: webhook deliveries are not signed"
            );
        }
        let permits = Arc::new(Semaphore::new(inner.options.max_in_flight.max(1)));
        let tracker = TaskTracker::new();
        // Consecutive failed claims: the poll backs off (to 32 × `poll`) while Redis is away.
        let mut failures = 0u32;
        loop {
            let free = permits.available_permits();
            let mut claimed = Vec::new();
            if free > 0 {
                match self.claim(free).await {
                    Ok(c) => {
                        claimed = c;
                        failures = 0;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        warn!(error = %e, failures, "claiming webhooks failed, will retry");
                    }
                }
            }
            let full = claimed.len() == free;
            for (report_id, attempt) in claimed {
                let permit = permits
                    .clone()
                    .try_acquire_owned()
                    .expect("claimed no more than free permits");
                let this = self.clone();
                let span = tracing::info_span!("webhook", report = %report_id, attempt);
                tracker.spawn(
                    async move {
                        this.deliver(&report_id, attempt).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            // More may be due at once: claim again right away while slots were filled.
            if full && free > 0 {
                continue;
            }
            let pause = inner.options.poll * (1u32 << failures.min(5));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                in_flight = tracker.len(),
                "webhooks still in flight at the end of the grace period: left to the next claim"
            );
            inner.abandon.cancel();
            tracker.wait().await;
        }
    }

    /// Webhooks in the outbox: due, retrying or being delivered.
    pub async fn pending(&self) -> Result<u64, WebhookError> {
        let mut conn = self.inner.pool.get().await?;
        Ok(redis::cmd("ZCARD")
            .arg(self.inner.keys.webhooks_due())
            .query_async(&mut conn)
            .await?)
    }

    /// How many webhooks have been given up on (and not redelivered or dropped).
    pub async fn dead_count(&self) -> Result<u64, WebhookError> {
        let mut conn = self.inner.pool.get().await?;
        Ok(redis::cmd("XLEN")
            .arg(self.inner.keys.webhooks_dead())
            .query_async(&mut conn)
            .await?)
    }

    /// The most recent webhooks given up on, newest first.
    pub async fn dead(&self, count: usize) -> Result<Vec<DeadWebhook>, WebhookError> {
        let mut conn = self.inner.pool.get().await?;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.inner.keys.webhooks_dead())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids.iter().map(dead_webhook).collect())
    }

    /// Sends a report's webhook again, from its first attempt: a dead one, or a delivered one
    /// its receiver lost. The report's entries in the dead stream go. False when the report is
    /// unknown or expired, or has no `callback_url`.
    pub async fn redeliver(&self, report_id: &str) -> Result<bool, WebhookError> {
        let keys = &self.inner.keys;
        let report = keys.report(report_id);
        let mut conn = self.inner.pool.get().await?;
        let (url, doc): (Option<String>, bool) = redis::pipe()
            .cmd("HGET")
            .arg(report.meta())
            .arg("callback_url")
            .cmd("EXISTS")
            .arg(report.doc_json())
            .query_async(&mut conn)
            .await?;
        let Some(url) = url.filter(|_| doc) else {
            return Ok(false);
        };
        let _: i64 = STATUS_SCRIPT
            .key(report.meta())
            .arg(WebhookState::Pending.as_str())
            .arg(0)
            .arg("")
            .arg("")
            .invoke_async(&mut conn)
            .await?;
        let _: () = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(keys.webhooks_url())
            .arg(report_id)
            .arg(&url)
            .ignore()
            .cmd("HDEL")
            .arg(keys.webhooks_attempts())
            .arg(report_id)
            .ignore()
            .cmd("ZADD")
            .arg(keys.webhooks_due())
            .arg(0)
            .arg(report_id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        let dead = self.dead_entries(&mut conn).await?;
        let ids: Vec<&str> = dead
            .iter()
            .filter(|(_, d)| d.report_id == report_id)
            .map(|(id, _)| id.as_str())
            .collect();
        if !ids.is_empty() {
            let _: i64 = redis::cmd("XDEL")
                .arg(keys.webhooks_dead())
                .arg(&ids)
                .query_async(&mut conn)
                .await?;
        }
        info!(report = %report_id, "webhook queued for redelivery");
        Ok(true)
    }

    /// Sends every dead webhook again ([`Webhooks::redeliver`]). Returns how many were queued,
    /// and how many could not be (their report expired): those stay in the dead stream.
    pub async fn redeliver_dead(&self) -> Result<(usize, usize), WebhookError> {
        let mut conn = self.inner.pool.get().await?;
        let mut reports: Vec<String> = self
            .dead_entries(&mut conn)
            .await?
            .into_iter()
            .map(|(_, d)| d.report_id)
            .collect();
        drop(conn);
        reports.sort();
        reports.dedup();
        let (mut queued, mut expired) = (0, 0);
        for report in reports {
            if self.redeliver(&report).await? {
                queued += 1;
            } else {
                expired += 1;
            }
        }
        Ok((queued, expired))
    }

    /// Every entry of the dead stream with its stream id, oldest first.
    /// Forget a report's dead webhook: the operator gave up on it. False when it had none.
    pub async fn drop_dead(&self, report_id: &str) -> Result<bool, WebhookError> {
        let mut conn = self.inner.pool.get().await?;
        let ids: Vec<String> = self
            .dead_entries(&mut conn)
            .await?
            .into_iter()
            .filter(|(_, d)| d.report_id == report_id)
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(false);
        }
        let n: i64 = redis::cmd("XDEL")
            .arg(self.inner.keys.webhooks_dead())
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    async fn dead_entries(
        &self,
        conn: &mut fanout_core::redis::PooledConnection,
    ) -> Result<Vec<(String, DeadWebhook)>, WebhookError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.inner.keys.webhooks_dead())
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| (e.id.clone(), dead_webhook(&e)))
            .collect())
    }

    async fn claim(&self, max: usize) -> Result<Vec<(String, u32)>, WebhookError> {
        let keys = &self.inner.keys;
        let mut conn = self.inner.pool.get().await?;
        let flat: Vec<redis::Value> = CLAIM_SCRIPT
            .key(keys.webhooks_due())
            .key(keys.webhooks_attempts())
            .arg(max)
            .arg(self.inner.options.lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| {
                let id: String = redis::from_redis_value_ref(&pair[0]).ok()?;
                let attempt: u32 = redis::from_redis_value_ref(&pair[1]).ok()?;
                Some((id, attempt))
            })
            .collect())
    }

    /// One attempt at one claimed webhook, then its entry settled.
    async fn deliver(&self, report_id: &str, attempt: u32) {
        let inner = &self.inner;
        let (url, body) = match self.load(report_id).await {
            Ok(found) => found,
            Err(e) => {
                // Left claimed: tried again after the lease.
                warn!(error = %e, "reading a webhook failed, will retry after its lease");
                return;
            }
        };
        let Some(url) = url else {
            // Settled elsewhere meanwhile (a repeat claim after a lease ran out).
            debug!("webhook no longer in the outbox");
            return;
        };
        let attempts = inner.options.attempts.max(1);
        let settle = match body {
            None => Settle::Dead("the report expired before its webhook was delivered".into()),
            Some(_) if attempt > attempts => Settle::Dead(format!(
                "{attempts} attempts started without an answer (deliverers stopped mid-request)"
            )),
            Some(body) => {
                let body = Bytes::from(body);
                let outcome = tokio::select! {
                    _ = inner.abandon.cancelled() => return,
                    o = try_once(inner, &url, report_id, &body, attempt) => o,
                };
                match outcome {
                    Try::Delivered => Settle::Delivered,
                    Try::Retry(_, reason) if attempt >= attempts => {
                        Settle::Dead(format!("{attempts} attempts failed; the last: {reason}"))
                    }
                    Try::Retry(hint, reason) => {
                        Settle::Retry(backoff(&inner.options, attempt, hint), reason)
                    }
                    Try::GiveUp(reason) => Settle::Dead(reason),
                }
            }
        };
        if let Err(e) = self.settle(report_id, &url, attempt, settle).await {
            warn!(error = %e, "settling a webhook failed, it will be claimed again after its lease");
        }
    }

    /// The callback URL (None: no longer in the outbox) and the stored report JSON (None:
    /// expired).
    async fn load(
        &self,
        report_id: &str,
    ) -> Result<(Option<String>, Option<Vec<u8>>), WebhookError> {
        let keys = &self.inner.keys;
        let mut conn = self.inner.pool.get().await?;
        // The outbox and the report are in different slots: two commands, not a pipeline.
        let url: Option<String> = redis::cmd("HGET")
            .arg(keys.webhooks_url())
            .arg(report_id)
            .query_async(&mut conn)
            .await?;
        let doc: Option<Vec<u8>> = redis::cmd("GET")
            .arg(keys.report(report_id).doc_json())
            .query_async(&mut conn)
            .await?;
        Ok((url, doc))
    }

    async fn settle(
        &self,
        report_id: &str,
        url: &str,
        attempt: u32,
        settle: Settle,
    ) -> Result<(), WebhookError> {
        let keys = &self.inner.keys;
        let mut conn = self.inner.pool.get().await?;
        let outcome = match &settle {
            Settle::Delivered => "delivered",
            Settle::Retry(..) => "retried",
            Settle::Dead(_) => "dead",
        };
        METRICS.webhooks.with_label_values(&[outcome]).inc();
        let (state, wait, error) = match &settle {
            Settle::Delivered => (WebhookState::Delivered, None, ""),
            Settle::Retry(wait, reason) => (WebhookState::Retrying, Some(*wait), reason.as_str()),
            Settle::Dead(reason) => (WebhookState::Dead, None, reason.as_str()),
        };
        let _: i64 = STATUS_SCRIPT
            .key(keys.report(report_id).meta())
            .arg(state.as_str())
            .arg(attempt)
            .arg(wait.map_or(String::new(), |w| w.as_millis().to_string()))
            .arg(error)
            .invoke_async(&mut conn)
            .await?;
        match settle {
            Settle::Retry(wait, _) => {
                debug!(wait_ms = wait.as_millis() as u64, "webhook will retry");
                let _: i64 = RESCHEDULE_SCRIPT
                    .key(keys.webhooks_due())
                    .arg(report_id)
                    .arg(wait.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await?;
            }
            Settle::Delivered | Settle::Dead(_) => {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("ZREM")
                    .arg(keys.webhooks_due())
                    .arg(report_id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(keys.webhooks_url())
                    .arg(report_id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(keys.webhooks_attempts())
                    .arg(report_id)
                    .ignore();
                if let Settle::Dead(reason) = &settle {
                    warn!(attempt, %reason, "webhook given up on");
                    pipe.cmd("XADD")
                        .arg(keys.webhooks_dead())
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(DEAD_KEPT)
                        .arg("*")
                        .arg("report")
                        .arg(report_id)
                        .arg("url")
                        .arg(url)
                        .arg("attempts")
                        .arg(attempt)
                        .arg("reason")
                        .arg(reason)
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
        }
        Ok(())
    }
}

fn dead_webhook(e: &redis::streams::StreamId) -> DeadWebhook {
    let field = |name: &str| e.get::<String>(name).unwrap_or_default();
    DeadWebhook {
        report_id: field("report"),
        url: field("url"),
        attempts: field("attempts").parse().unwrap_or(0),
        reason: field("reason"),
    }
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, the `X-Fanout-Signature` value.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `signature` (an `X-Fanout-Signature` value) signs `timestamp` and `body` with
/// `secret`. Compares in constant time. Receivers should also reject timestamps older than
/// a few minutes.
pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&sig).is_ok()
}

fn mac(secret: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes a key of any size");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// What one try came to.
enum Try {
    Delivered,
    /// Retry, after at least this long if the receiver said so; why it failed.
    Retry(Option<Duration>, String),
    /// Not worth retrying, and why.
    GiveUp(String),
}

async fn try_once(inner: &Inner, url: &str, report_id: &str, body: &Bytes, attempt: u32) -> Try {
    // Checked again now: the policy may have changed since the submit, and an address literal
    // does not go through the resolver.
    let targets = &inner.options.targets;
    let checked = targets.parse(url).and_then(|u| {
        let host = crate::target::host_text(&u);
        match u.host() {
            Some(Host::Ipv4(ip)) => targets.check_addr(&host, ip.into()),
            Some(Host::Ipv6(ip)) => targets.check_addr(&host, ip.into()),
            _ => Ok(()),
        }
    });
    if let Err(e) = checked {
        warn!(error = %e, "webhook target not allowed, not sent");
        return Try::GiveUp(format!("the callback url is not allowed: {e}"));
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    let mut req = inner
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(TIMESTAMP_HEADER, &timestamp)
        .header(EVENT_HEADER, "report.finished")
        .header(REPORT_ID_HEADER, report_id)
        .header(ATTEMPT_HEADER, attempt.to_string())
        .body(body.clone());
    if let Some(secret) = &inner.options.secret {
        req = req.header(SIGNATURE_HEADER, sign(secret.expose(), &timestamp, body));
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                info!(attempt, status = status.as_u16(), "webhook delivered");
                return Try::Delivered;
            }
            let retryable = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
            if retryable {
                let hint = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                warn!(
                    attempt,
                    status = status.as_u16(),
                    "webhook receiver failed, will retry"
                );
                Try::Retry(hint, format!("the receiver answered {status}"))
            } else {
                warn!(
                    attempt,
                    status = status.as_u16(),
                    "webhook rejected by the receiver, not retried"
                );
                Try::GiveUp(format!("the receiver answered {status}, not retried"))
            }
        }
        Err(e) if e.is_builder() => {
            warn!(error = %e, "webhook url is not usable, not retried");
            Try::GiveUp(format!(
                "the callback url is not usable: {}",
                e.without_url()
            ))
        }
        Err(e) => {
            let e = e.without_url();
            warn!(attempt, error = %e, "webhook request failed, will retry");
            Try::Retry(None, format!("the request failed: {e}"))
        }
    }
}

/// Exponential backoff with jitter (75% to all of the step); a receiver's hint wins, capped.
fn backoff(options: &WebhookOptions, attempt: u32, hint: Option<Duration>) -> Duration {
    if let Some(h) = hint {
        return h.min(options.max_delay);
    }
    let step = options
        .base_delay
        .saturating_mul(1u32 << (attempt - 1).min(20))
        .min(options.max_delay);
    let jitter = rand::rng().random_range(0.75..=1.0);
    step.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_does_not() {
        let sig = sign("s3cret", "1718000000", b"{\"a\":1}");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), "sha256=".len() + 64);
        assert!(verify("s3cret", "1718000000", b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", "1718000001", b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", "1718000000", b"{\"a\":2}", &sig));
        assert!(!verify("other", "1718000000", b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", "1718000000", b"{\"a\":1}", "sha256=zz"));
        assert!(!verify("s3cret", "1718000000", b"{\"a\":1}", &sig[7..]));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_respects_hints_and_the_cap() {
        let o = WebhookOptions::default();
        for attempt in 1..=4u32 {
            let d = backoff(&o, attempt, None);
            let step = o.base_delay * (1 << (attempt - 1));
            assert!(d >= step * 3 / 4 && d <= step, "{attempt}: {d:?}");
        }
        assert!(backoff(&o, 30, None) <= o.max_delay);
        assert_eq!(
            backoff(&o, 1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(&o, 1, Some(Duration::from_secs(70_000))),
            o.max_delay
        );
    }

    #[test]
    fn the_default_schedule_keeps_trying_for_about_a_day() {
        let o = WebhookOptions::default();
        for _ in 0..20 {
            let span: Duration = (1..o.attempts).map(|a| backoff(&o, a, None)).sum();
            let hours = span.as_secs_f64() / 3600.0;
            assert!((18.0..=30.0).contains(&hours), "{hours} h");
        }
    }

    #[test]
    fn options_read_the_secret_and_debug_hides_it() {
        let env = [(SECRET_ENV.to_owned(), "whsec-123".to_owned())]
            .into_iter()
            .collect();
        let o = WebhookOptions::from_env(&env);
        assert_eq!(o.secret.as_ref().map(Secret::expose), Some("whsec-123"));
        assert!(!format!("{o:?}").contains("whsec-123"));
    }
}
