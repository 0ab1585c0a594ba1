//! The queue handle: enqueue, claim, extend, settle, inspect.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fanout_core::config::QueueConfig;
use fanout_core::redis::Connection as RedisConnection;
use fanout_core::redis::SharedConnection;
use redis::Value;

use crate::backoff::retry_delay;
use crate::error::{Error, Result};
use crate::job::{
    ConsumerId, DeadLetter, Delivery, Enqueued, Lane, LaneDepth, NewJob, RetryOutcome,
    ms_to_system_time, system_time_ms,
};
use crate::keys::{GROUP, Keys, order_score};

static ENQUEUE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/enqueue.lua")));
static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/claim.lua")));
static EXTEND: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/extend.lua")));
static SETTLE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/settle.lua")));
static REPLAY: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/replay.lua")));
static DEPTH: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/depth.lua")));

/// How long an idempotency key lives unless changed with [`Queue::with_idempotency_ttl`].
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Delayed jobs scheduled by other processes are looked for at least this often by a busy
/// claimer (an idle one is woken by the wake stream).
const PROMOTE_EVERY: Duration = Duration::from_millis(250);

/// Lapsed workers (whose jobs are taken over) are looked for at least this often by a busy
/// claimer; an idle one is woken by the `lapsed` wake entry a live worker's beat adds.
const LAPSED_EVERY: Duration = Duration::from_millis(500);

/// Dead consumers are looked for on every this many reclaim passes (one XINFO per stream).
const CLEANUP_EVERY_RECLAIMS: u64 = 10;

/// A consumer with nothing pending and idle this many visibility timeouts is removed.
const DEAD_CONSUMER_TIMEOUTS: u64 = 10;

/// The job queue. Cheap to clone; every clone shares one pool and one claim state.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    pool: fanout_core::redis::Pool,
    keys: Keys,
    config: QueueConfig,
    idempotency_ttl: Duration,
    state: Mutex<ClaimState>,
    /// One multiplexed connection shared by every non-blocking call: no pool checkout (and its
    /// recycle PING) per command. Replaced after a connection error.
    shared: SharedConnection,
}

#[derive(Debug, Default)]
struct ClaimState {
    /// Earliest due time (Redis clock, ms) of a delayed job, as last seen.
    next_due_ms: Option<u64>,
    last_promote: Option<Instant>,
    last_lapsed: Option<Instant>,
    last_reclaim: Option<Instant>,
    reclaim_passes: u64,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("keys", &self.inner.keys)
            .field("config", &self.inner.config)
            .field("idempotency_ttl", &self.inner.idempotency_ttl)
            .finish_non_exhaustive()
    }
}

/// The result of one claim script.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) deliveries: Vec<Delivery>,
    /// Entries the script returned, decodable or not.
    pub(crate) entries: usize,
    /// Where to block (stream, last id) when the script found nothing.
    pub(crate) block: Option<Vec<(String, String)>>,
    /// Lanes, payloads and reasons of the jobs dead-lettered while claiming: for too many
    /// deliveries, or undecodable (their payload is `null`).
    pub(crate) dead: Vec<(Lane, serde_json::Value, String)>,
}

impl Queue {
    pub fn new(pool: fanout_core::redis::Pool, namespace: &str, config: QueueConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                keys: Keys::new(namespace),
                config,
                idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
                state: Mutex::new(ClaimState::default()),
                shared: SharedConnection::new(pool.clone()),
                pool,
            }),
        }
    }

    /// The queue of a Fanout deployment: `redis.namespace` and `queue` of `config`.
    pub fn from_config(pool: fanout_core::redis::Pool, config: &fanout_core::Config) -> Self {
        Self::new(pool, &config.redis.namespace, config.queue.clone())
    }

    /// Change how long a job id is remembered for deduplication (default 24 h).
    pub fn with_idempotency_ttl(self, ttl: Duration) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                pool: inner.pool.clone(),
                keys: inner.keys.clone(),
                config: inner.config.clone(),
                idempotency_ttl: ttl.max(Duration::from_secs(1)),
                state: Mutex::new(ClaimState::default()),
                shared: inner.shared.clone(),
            }),
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// The stream key of a (lane, priority), e.g. `{fanout:queue}:stream:interactive:0`.
    pub fn stream_key(&self, lane: Lane, priority: u8) -> String {
        self.inner.keys.stream(lane, priority)
    }

    /// The consumer group on every stream.
    pub fn group(&self) -> &'static str {
        GROUP
    }

    /// Every stream written so far, in serving order.
    pub async fn streams(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        redis::cmd("ZRANGE")
            .arg(self.inner.keys.registry())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))
    }

    /// Load every script, so the first real call does not pay a NOSCRIPT round trip.
    pub async fn load_scripts(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        for script in [
            &*ENQUEUE,
            &*CLAIM,
            &*EXTEND,
            &*SETTLE,
            &*DEPTH,
            &*REPLAY,
            &*crate::registry::BEAT,
        ] {
            script.prepare_invoke().load_async(&mut conn).await?;
        }
        Ok(())
    }

    pub(crate) async fn conn(&self) -> Result<RedisConnection> {
        Ok(self.inner.shared.get().await?)
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Map a Redis error; a connection-level one retires the shared connection.
    pub(crate) fn broken(&self, e: redis::RedisError) -> Error {
        self.inner.shared.check(&e);
        Error::Redis(e)
    }

    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued> {
        let mut out = self.enqueue_many(vec![job]).await?;
        out.pop()
            .ok_or_else(|| Error::Protocol("enqueue returned nothing".into()))
    }

    /// Enqueue many jobs in one script (one round trip). A job id seen within the idempotency
    /// TTL, or twice in `jobs`, comes back as [`Enqueued::Duplicate`].
    pub async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.inner.keys;
        let mut inv = ENQUEUE.prepare_invoke();
        inv.key(keys.registry())
            .key(keys.ready())
            .key(keys.delayed(Lane::Interactive))
            .key(keys.delayed(Lane::Batch))
            .key(keys.delayed_jobs())
            .key(keys.wake());
        inv.arg(self.inner.idempotency_ttl.as_secs()).arg(GROUP);
        for job in &jobs {
            if job.id.is_empty() || job.id.len() > 200 {
                return Err(Error::InvalidJobId(job.id.clone()));
            }
            inv.key(keys.idempotency(&job.id))
                .key(keys.stream(job.lane, job.priority));
            inv.arg(&job.id)
                .arg(job.lane.index())
                .arg(order_score(job.lane, job.priority))
                .arg(job.payload.to_string())
                .arg(job.not_before.map(system_time_ms).unwrap_or(0));
        }
        let mut conn = self.conn().await?;
        let codes: Vec<i64> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        // An enqueue is kept once it returns: `redis.wait_replicas` replicas hold it.
        self.inner
            .shared
            .replicated(&conn, &[&keys.ready()])
            .await
            .map_err(|e| self.broken(e))?;
        if codes.len() != jobs.len() {
            return Err(Error::Protocol(format!(
                "enqueue answered {} codes for {} jobs",
                codes.len(),
                jobs.len()
            )));
        }
        let mut earliest_delayed: Option<u64> = None;
        let out = jobs
            .into_iter()
            .zip(codes)
            .map(|(job, code)| match code {
                0 => Enqueued::Duplicate(job.id),
                _ => {
                    if code == 2
                        && let Some(at) = job.not_before
                    {
                        let at = system_time_ms(at);
                        earliest_delayed = Some(earliest_delayed.map_or(at, |e| e.min(at)));
                    }
                    Enqueued::New(job.id)
                }
            })
            .collect();
        if let Some(at) = earliest_delayed {
            self.note_due(at);
        }
        Ok(out)
    }

    fn note_due(&self, at_ms: u64) {
        let mut st = self.inner.state.lock().unwrap();
        st.next_due_ms = Some(st.next_due_ms.map_or(at_ms, |d| d.min(at_ms)));
    }

    /// Claim up to `max` jobs (never more). Serves interactive before batch, higher priority
    /// first. When nothing is ready it blocks up to `block` (XREAD BLOCK on its own connection),
    /// so a job enqueued meanwhile is returned within milliseconds. Entries that cannot be
    /// decoded are dead-lettered here and not returned.
    pub async fn claim(
        &self,
        consumer: &ConsumerId,
        max: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut waiter = None;
        let mut force_promote = false;
        let deadline = Instant::now() + block;
        loop {
            let claimed = self
                .claim_once(consumer, max, !block.is_zero(), force_promote)
                .await?;
            if !claimed.deliveries.is_empty() {
                return Ok(claimed.deliveries);
            }
            if claimed.entries > 0 {
                // Everything claimed was undecodable and went to the dead letter: look again.
                continue;
            }
            let Some(block_on) = claimed.block else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let timeout = self.block_timeout(deadline - now);
            force_promote = self.wait_for_work(&mut waiter, &block_on, timeout).await?;
        }
    }

    /// How long an idle claimer may block: at most `block`, and no later than the next delayed
    /// job falls due or the next reclaim pass is due.
    pub(crate) fn block_timeout(&self, block: Duration) -> Duration {
        let st = self.inner.state.lock().unwrap();
        let mut t = block;
        if let Some(due) = st.next_due_ms {
            let now = system_time_ms(SystemTime::now());
            t = t.min(Duration::from_millis(due.saturating_sub(now)));
        }
        if let Some(last) = st.last_reclaim {
            t = t.min(self.reclaim_every().saturating_sub(last.elapsed()));
        }
        t.max(Duration::from_millis(1))
    }

    fn reclaim_every(&self) -> Duration {
        Duration::from_millis(self.inner.config.visibility_timeout_secs * 1000 / 2)
    }

    /// Run the claim script once. `want_block`: when nothing is claimed, return where to block.
    pub(crate) async fn claim_once(
        &self,
        consumer: &ConsumerId,
        max: usize,
        want_block: bool,
        force_promote: bool,
    ) -> Result<Claimed> {
        let cfg = &self.inner.config;
        let keys = &self.inner.keys;
        let (promote, reclaim, cleanup, lapsed) = {
            let mut st = self.inner.state.lock().unwrap();
            let now_ms = system_time_ms(SystemTime::now());
            let promote = force_promote
                || st.next_due_ms.is_some_and(|d| d <= now_ms)
                || st.last_promote.is_none_or(|t| t.elapsed() >= PROMOTE_EVERY);
            let reclaim = st
                .last_reclaim
                .is_none_or(|t| t.elapsed() >= self.reclaim_every());
            if promote {
                st.last_promote = Some(Instant::now());
            }
            let lapsed =
                force_promote || st.last_lapsed.is_none_or(|t| t.elapsed() >= LAPSED_EVERY);
            if lapsed {
                st.last_lapsed = Some(Instant::now());
            }
            let mut cleanup = false;
            if reclaim {
                st.last_reclaim = Some(Instant::now());
                cleanup = st.reclaim_passes % CLEANUP_EVERY_RECLAIMS == 0;
                st.reclaim_passes += 1;
            }
            (promote, reclaim, cleanup, lapsed)
        };
        let visibility_ms = cfg.visibility_timeout_secs * 1000;
        let mut inv = CLAIM.prepare_invoke();
        inv.key(keys.registry())
            .key(keys.ready())
            .key(keys.delayed(Lane::Interactive))
            .key(keys.delayed(Lane::Batch))
            .key(keys.delayed_jobs())
            .key(keys.wake())
            .key(keys.dead(Lane::Interactive))
            .key(keys.dead(Lane::Batch))
            .key(keys.workers())
            .key(keys.worker_info())
            .key(keys.last_beat());
        inv.arg(GROUP)
            .arg(consumer.as_str())
            .arg(max)
            .arg(u8::from(promote))
            .arg(u8::from(reclaim))
            .arg(visibility_ms)
            .arg(cfg.max_deliveries)
            .arg(cfg.dead_letter_max)
            .arg(visibility_ms * DEAD_CONSUMER_TIMEOUTS)
            .arg(u8::from(want_block))
            .arg(u8::from(cleanup))
            .arg(u8::from(lapsed));
        let reply: Value = {
            let mut conn = self.conn().await?;
            inv.invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let parts = array(reply, "claim reply")?;
        let [entries, next_due, block, dead]: [Value; 4] = parts
            .try_into()
            .map_err(|_| Error::Protocol("claim reply has not 4 parts".into()))?;
        let next_due = int(&next_due).unwrap_or(-2);
        if next_due >= -1 {
            self.inner.state.lock().unwrap().next_due_ms = u64::try_from(next_due).ok();
        }
        let mut dead: Vec<(Lane, serde_json::Value, String)> = array(dead, "claim dead")?
            .into_iter()
            .filter_map(|entry| {
                let [payload, reason, stream]: [Value; 3] =
                    array(entry, "dead entry").ok()?.try_into().ok()?;
                let payload = serde_json::from_str(&string(&payload).ok()?).unwrap_or_default();
                let lane = self
                    .inner
                    .keys
                    .parse_stream(&string(&stream).ok()?)
                    .map_or(Lane::Batch, |(l, _)| l);
                Some((lane, payload, string(&reason).ok()?))
            })
            .collect();
        if !dead.is_empty() {
            tracing::warn!(
                count = dead.len(),
                max_deliveries = cfg.max_deliveries,
                "jobs dead-lettered after too many deliveries"
            );
        }
        let entries = array(entries, "claim entries")?;
        let got_entries = entries.len();
        let mut deliveries = Vec::with_capacity(entries.len());
        for entry in entries {
            let raw = RawEntry::parse(entry)?;
            match self.decode(&raw, consumer) {
                Ok(d) => deliveries.push(d),
                Err(reason) => {
                    let lane = self.dead_letter_raw(&raw, consumer, &reason).await?;
                    dead.push((lane, serde_json::Value::Null, reason));
                }
            }
        }
        let block = if got_entries > 0 || !want_block {
            None
        } else {
            let flat = array(block, "claim block ids")?;
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(id)) = (it.next(), it.next()) {
                pairs.push((string(&k)?, string(&id)?));
            }
            Some(pairs)
        };
        Ok(Claimed {
            deliveries,
            entries: got_entries,
            block,
            dead,
        })
    }

    fn decode(&self, raw: &RawEntry, consumer: &ConsumerId) -> Result<Delivery, String> {
        let (lane, priority) = self
            .inner
            .keys
            .parse_stream(&raw.stream)
            .ok_or_else(|| format!("decode error: unknown stream {}", raw.stream))?;
        let field = |name: &str| {
            raw.fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
        };
        let text = |name: &str| -> Result<String, String> {
            let v = field(name).ok_or_else(|| format!("decode error: missing field `{name}`"))?;
            String::from_utf8(v.to_vec())
                .map_err(|_| format!("decode error: field `{name}` is not UTF-8"))
        };
        let number = |name: &str| -> Result<u64, String> {
            text(name)?
                .parse::<u64>()
                .map_err(|_| format!("decode error: field `{name}` is not a number"))
        };
        let job_id = text("id")?;
        let payload = serde_json::from_str(&text("p")?)
            .map_err(|e| format!("decode error: payload is not JSON: {e}"))?;
        let attempt = u32::try_from(number("a")?)
            .ok()
            .filter(|a| *a >= 1)
            .ok_or("decode error: field `a` is out of range")?;
        let enqueued_at_ms = number("t")?;
        let last_error = field("e").map(|v| String::from_utf8_lossy(v).into_owned());
        Ok(Delivery {
            job_id,
            lane,
            priority,
            payload,
            attempt,
            deliveries: raw.deliveries,
            enqueued_at_ms,
            last_error,
            stream: raw.stream.clone(),
            entry_id: raw.entry_id.clone(),
            consumer: consumer.as_str().to_owned(),
        })
    }

    /// Dead-letter an entry that cannot be decoded; returns its lane.
    async fn dead_letter_raw(
        &self,
        raw: &RawEntry,
        consumer: &ConsumerId,
        reason: &str,
    ) -> Result<Lane> {
        tracing::warn!(stream = %raw.stream, entry = %raw.entry_id, reason, "undecodable entry dead-lettered");
        let lane = self
            .inner
            .keys
            .parse_stream(&raw.stream)
            .map_or(Lane::Batch, |(l, _)| l);
        let attempts = raw
            .fields
            .iter()
            .find(|(k, _)| k == "a")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
            .unwrap_or(0);
        let job_id = raw
            .fields
            .iter()
            .find(|(k, _)| k == "id")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let target = SettleTarget {
            job_id: &job_id,
            stream: &raw.stream,
            entry_id: &raw.entry_id,
            consumer: consumer.as_str(),
            lane,
            score: 0,
            deliveries: raw.deliveries,
        };
        self.settle(&target, Settle::Dead { attempts, reason })
            .await
            .map(|_| lane)
    }

    /// Block until a stream in `block_on` gets an entry past the given id, or `timeout` passes.
    /// Nothing is consumed: the caller runs the claim script next. Returns whether delayed jobs
    /// and lapsed workers should be looked at (a wake entry says `due` or `lapsed`, or the wait
    /// timed out) rather than only new jobs.
    pub(crate) async fn wait_for_work(
        &self,
        waiter: &mut Option<fanout_core::redis::Blocking>,
        block_on: &[(String, String)],
        timeout: Duration,
    ) -> Result<bool> {
        if block_on.is_empty() {
            tokio::time::sleep(timeout).await;
            return Ok(true);
        }
        // Blocking reads get their own connection, taken out of the pool for good.
        let conn = self
            .inner
            .pool
            .blocking(waiter, timeout + Duration::from_secs(2))
            .await?;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(16)
            .arg("BLOCK")
            .arg(timeout.as_millis().max(1) as u64)
            .arg("STREAMS");
        for (k, _) in block_on {
            cmd.arg(k);
        }
        for (_, id) in block_on {
            cmd.arg(id);
        }
        match cmd.query_async::<Value>(conn).await {
            // Timed out, or a wake entry says a job was delayed: look at the delayed sets too.
            Ok(v) => Ok(matches!(v, Value::Nil) || wake_mentions_due(v)),
            Err(e) => {
                *waiter = None;
                Err(e.into())
            }
        }
    }

    /// Heartbeat: reset the idle timer of a delivery. `false` if it is no longer ours.
    pub async fn extend(&self, d: &Delivery) -> Result<bool> {
        Ok(self
            .extend_many(std::slice::from_ref(d))
            .await?
            .pop()
            .unwrap_or(false))
    }

    /// Heartbeat many deliveries of one consumer in one script.
    pub async fn extend_many(&self, ds: &[Delivery]) -> Result<Vec<bool>> {
        if ds.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(ds.len());
        // All deliveries of one call must share a consumer; group them.
        let mut by_consumer: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, d) in ds.iter().enumerate() {
            by_consumer.entry(&d.consumer).or_default().push(i);
        }
        out.resize(ds.len(), false);
        let mut conn = self.conn().await?;
        for (consumer, idx) in by_consumer {
            let mut inv = EXTEND.prepare_invoke();
            inv.arg(GROUP).arg(consumer);
            for &i in &idx {
                inv.key(&ds[i].stream).arg(&ds[i].entry_id);
            }
            let flags: Vec<i64> = inv
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            for (&i, f) in idx.iter().zip(flags) {
                out[i] = f == 1;
            }
        }
        Ok(out)
    }

    /// Done: XACK + XDEL. Idempotent.
    pub async fn ack(&self, d: &Delivery) -> Result<()> {
        self.ack_many(std::slice::from_ref(d)).await
    }

    /// Ack many deliveries in one round trip (one XACK and one XDEL per stream).
    pub async fn ack_many(&self, ds: &[Delivery]) -> Result<()> {
        if ds.is_empty() {
            return Ok(());
        }
        let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for d in ds {
            by_stream.entry(&d.stream).or_default().push(&d.entry_id);
        }
        let mut pipe = redis::pipe();
        for (stream, ids) in &by_stream {
            pipe.cmd("XACK").arg(stream).arg(GROUP).arg(ids).ignore();
            pipe.cmd("XDEL").arg(stream).arg(ids).ignore();
        }
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// Failed, retryable: schedule the next attempt after exponential backoff with full jitter
    /// (never sooner than `retry_after`), or dead-letter it when `max_attempts` is reached.
    pub async fn retry(
        &self,
        d: &Delivery,
        error: &str,
        retry_after: Option<Duration>,
    ) -> Result<RetryOutcome> {
        let cfg = &self.inner.config;
        let target = SettleTarget::of(d);
        if d.attempt >= cfg.max_attempts {
            let reason = format!("attempts exhausted: {} of {}", d.attempt, cfg.max_attempts);
            self.settle(
                &target,
                Settle::DeadWithError {
                    attempts: d.attempt,
                    error,
                    reason: &reason,
                },
            )
            .await?;
            return Ok(RetryOutcome::DeadLettered);
        }
        let delay = retry_delay(d.attempt, cfg.retry_base_ms, cfg.retry_max_ms, retry_after);
        let due = self
            .settle(
                &target,
                Settle::Later {
                    delay,
                    attempt: d.attempt + 1,
                    error,
                },
            )
            .await?;
        self.note_due(due);
        Ok(RetryOutcome::Scheduled {
            at: ms_to_system_time(due),
        })
    }

    /// Hand the job back without counting an attempt; it is ready again after `delay`.
    pub async fn release(&self, d: &Delivery, delay: Duration) -> Result<()> {
        let due = self
            .settle(
                &SettleTarget::of(d),
                Settle::Later {
                    delay,
                    attempt: d.attempt,
                    error: "",
                },
            )
            .await?;
        self.note_due(due);
        Ok(())
    }

    /// Fatal: move the job to its lane's dead-letter stream with `reason`, without retrying.
    pub async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<()> {
        self.settle(
            &SettleTarget::of(d),
            Settle::DeadWithError {
                attempts: d.attempt,
                error: reason,
                reason,
            },
        )
        .await
        .map(|_| ())
    }

    async fn settle(&self, t: &SettleTarget<'_>, how: Settle<'_>) -> Result<u64> {
        let keys = &self.inner.keys;
        let mut inv = SETTLE.prepare_invoke();
        inv.key(t.stream)
            .key(keys.delayed(t.lane))
            .key(keys.delayed_jobs())
            .key(keys.dead(t.lane))
            .key(keys.wake());
        inv.arg(GROUP).arg(t.consumer).arg(t.entry_id);
        match how {
            Settle::Later {
                delay,
                attempt,
                error,
            } => {
                inv.arg("later")
                    .arg(delay.as_millis() as u64)
                    .arg(attempt)
                    .arg(error)
                    .arg("");
            }
            Settle::Dead { attempts, reason } => {
                inv.arg("dead")
                    .arg(self.inner.config.dead_letter_max)
                    .arg(attempts)
                    .arg("")
                    .arg(reason);
            }
            Settle::DeadWithError {
                attempts,
                error,
                reason,
            } => {
                inv.arg("dead")
                    .arg(self.inner.config.dead_letter_max)
                    .arg(attempts)
                    .arg(error)
                    .arg(reason);
            }
        }
        inv.arg(t.score).arg(t.deliveries);
        let reply: Value = {
            let mut conn = self.conn().await?;
            inv.invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let parts = array(reply, "settle reply")?;
        let status = parts.first().map(string).transpose()?.unwrap_or_default();
        let due = parts.get(1).and_then(int).unwrap_or(0);
        match status.as_str() {
            "ok" => Ok(due.max(0) as u64),
            "lost" | "gone" => Err(Error::Lost {
                job_id: t.job_id.to_owned(),
                entry_id: t.entry_id.to_owned(),
            }),
            other => Err(Error::Protocol(format!("settle answered `{other}`"))),
        }
    }

    /// Depth of each lane: ready, pending, delayed, dead, group lag, oldest ready age.
    /// One read-only script: XLEN, XINFO GROUPS and ZCARD per stream.
    pub async fn depth(&self) -> Result<Vec<LaneDepth>> {
        let keys = &self.inner.keys;
        let mut inv = DEPTH.prepare_invoke();
        inv.key(keys.registry())
            .key(keys.delayed(Lane::Interactive))
            .key(keys.delayed(Lane::Batch))
            .key(keys.dead(Lane::Interactive))
            .key(keys.dead(Lane::Batch))
            .arg(GROUP);
        let reply: Value = {
            let mut conn = self.conn().await?;
            inv.invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let parts = array(reply, "depth reply")?;
        if parts.len() < 5 {
            return Err(Error::Protocol("depth reply too short".into()));
        }
        let n = |v: &Value| int(v).unwrap_or(0).max(0) as u64;
        let now = n(&parts[0]);
        let mut lanes: Vec<LaneDepth> = Lane::ALL
            .iter()
            .map(|&lane| LaneDepth {
                lane,
                ready: 0,
                pending: 0,
                delayed: n(&parts[1 + lane.index()]),
                dead: n(&parts[3 + lane.index()]),
                lag: Some(0),
                oldest_ready_age: None,
                by_priority: Vec::new(),
            })
            .collect();
        for s in parts.into_iter().skip(5) {
            let row = array(s, "depth row")?;
            if row.len() < 5 {
                return Err(Error::Protocol("depth row too short".into()));
            }
            let key = string(&row[0])?;
            let Some((lane, priority)) = keys.parse_stream(&key) else {
                continue;
            };
            let (len, pending, lag) = (n(&row[1]), n(&row[2]), int(&row[3]).unwrap_or(-1));
            let oldest = string(&row[4])?;
            // Acked entries are deleted, so a stream holds exactly its pending and ready ones
            // (less any pending entry removed by `remove`).
            let ready = len.saturating_sub(pending);
            let l = &mut lanes[lane.index()];
            l.ready += ready;
            l.pending += pending;
            l.lag = match (l.lag, lag) {
                (Some(a), b) if b >= 0 => Some(a + b as u64),
                _ => None,
            };
            if let Some(ms) = oldest.split('-').next().and_then(|m| m.parse::<u64>().ok()) {
                let age = Duration::from_millis(now.saturating_sub(ms));
                l.oldest_ready_age = Some(l.oldest_ready_age.map_or(age, |a| a.max(age)));
            }
            l.by_priority.push((priority, ready, pending));
        }
        Ok(lanes)
    }

    /// The newest `limit` dead letters of both lanes, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut conn = self.conn().await?;
        let mut all = Vec::new();
        for lane in Lane::ALL {
            let entries: Value = redis::cmd("XREVRANGE")
                .arg(self.inner.keys.dead(lane))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(limit.max(1))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            for e in array(entries, "dead letters")? {
                let mut parts = array(e, "dead letter")?.into_iter();
                let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                    continue;
                };
                all.push(self.dead_letter_from(lane, string(&id)?, fields)?);
            }
        }
        all.sort_by_key(|d| std::cmp::Reverse(entry_order(&d.entry_id)));
        all.truncate(limit);
        Ok(all)
    }

    /// One dead letter by its [`DeadLetter::id`], if it is still there.
    pub async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>> {
        let Some((lane, entry)) = DeadLetter::parse_id(id) else {
            return Ok(None);
        };
        let mut conn = self.conn().await?;
        let entries: Value = redis::cmd("XRANGE")
            .arg(self.inner.keys.dead(lane))
            .arg(entry)
            .arg(entry)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let Some(e) = array(entries, "dead letter")?.into_iter().next() else {
            return Ok(None);
        };
        let mut parts = array(e, "dead letter")?.into_iter();
        match (parts.next(), parts.next()) {
            (Some(id), Some(fields)) => {
                Ok(Some(self.dead_letter_from(lane, string(&id)?, fields)?))
            }
            _ => Ok(None),
        }
    }

    /// Put dead letters back in the queue as new jobs with fresh attempts (in the stream they
    /// died in, or the lane's priority-0 stream when that is not a queue stream). One flag per
    /// letter: `false` when it was gone already (replayed or dropped by someone else), so a
    /// repeated replay does not run the job twice.
    pub async fn replay_dead(&self, letters: &[DeadLetter]) -> Result<Vec<bool>> {
        self.resolve_dead(letters, "replay").await
    }

    /// Delete dead letters; `false` for each that was gone already.
    pub async fn drop_dead(&self, letters: &[DeadLetter]) -> Result<Vec<bool>> {
        self.resolve_dead(letters, "drop").await
    }

    async fn resolve_dead(&self, letters: &[DeadLetter], mode: &str) -> Result<Vec<bool>> {
        let keys = &self.inner.keys;
        let mut out = vec![false; letters.len()];
        let mut conn = self.conn().await?;
        for lane in Lane::ALL {
            let idx: Vec<usize> = (0..letters.len())
                .filter(|&i| letters[i].lane == lane)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let mut inv = REPLAY.prepare_invoke();
            inv.key(keys.dead(lane))
                .key(keys.registry())
                .key(keys.ready())
                .key(keys.wake())
                .arg(GROUP)
                .arg(mode);
            for &i in &idx {
                let d = &letters[i];
                let priority = d.priority.unwrap_or(0);
                inv.arg(&d.entry_id)
                    .arg(keys.stream(lane, priority))
                    .arg(order_score(lane, priority));
            }
            let flags: Vec<i64> = inv
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            for (&i, f) in idx.iter().zip(flags) {
                out[i] = f == 1;
            }
        }
        Ok(out)
    }

    fn dead_letter_from(&self, lane: Lane, entry_id: String, fields: Value) -> Result<DeadLetter> {
        let flat = array(fields, "dead letter fields")?;
        let mut m = BTreeMap::new();
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            m.insert(string(&k)?, lossy(&v));
        }
        let get = |k: &str| m.get(k).cloned().unwrap_or_default();
        let raw_payload = get("payload");
        let priority = self.inner.keys.parse_stream(&get("stream")).map(|(_, p)| p);
        Ok(DeadLetter {
            job_id: get("job"),
            lane,
            priority,
            payload: serde_json::from_str(&raw_payload).ok(),
            raw_payload,
            last_error: get("error"),
            reason: get("reason"),
            attempts: get("attempts").parse().unwrap_or(0),
            deliveries: get("deliveries").parse().unwrap_or(0),
            enqueued_at_ms: get("enqueued_at").parse().ok(),
            dead_at_ms: get("dead_at").parse().unwrap_or(0),
            entry_id,
        })
    }

    /// Drop queued jobs (ready or delayed) by id, for cancellation; returns how many were
    /// dropped. In-flight jobs are not stopped: best effort, their handler should check for
    /// cancellation itself. Scans the ready part of every stream (O(ready backlog)). Their
    /// idempotency keys stay, so a cancelled job is not accepted again within the TTL.
    pub async fn remove(&self, job_ids: &[String]) -> Result<usize> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        let keys = &self.inner.keys;
        let mut conn = self.conn().await?;
        // Delayed first: a job promoted meanwhile is then found in its stream below.
        let mut pipe = redis::pipe();
        for lane in Lane::ALL {
            pipe.cmd("ZREM").arg(keys.delayed(lane)).arg(job_ids);
        }
        pipe.cmd("HDEL")
            .arg(keys.delayed_jobs())
            .arg(job_ids)
            .ignore();
        let (a, b): (usize, usize) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut removed = a + b;
        let wanted: HashSet<&str> = job_ids.iter().map(String::as_str).collect();
        let streams: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.registry())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        for stream in streams {
            let mut start = match last_delivered(&mut conn, &stream).await? {
                Some(id) => format!("({id}"),
                None => "-".to_owned(),
            };
            loop {
                let page: Value = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.broken(e))?;
                let page = array(page, "xrange")?;
                let full = page.len() == 500;
                let mut hits = Vec::new();
                let mut last = None;
                for e in page {
                    let raw = RawEntry::parse_plain(&stream, e)?;
                    if raw
                        .fields
                        .iter()
                        .any(|(k, v)| k == "id" && wanted.contains(&*String::from_utf8_lossy(v)))
                    {
                        hits.push(raw.entry_id.clone());
                    }
                    last = Some(raw.entry_id);
                }
                if !hits.is_empty() {
                    let n: usize = redis::cmd("XDEL")
                        .arg(&stream)
                        .arg(&hits)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.broken(e))?;
                    removed += n;
                }
                match (full, last) {
                    (true, Some(id)) => start = format!("({id}"),
                    _ => break,
                }
            }
        }
        Ok(removed)
    }
}

async fn last_delivered(conn: &mut RedisConnection, stream: &str) -> Result<Option<String>> {
    let groups: Value = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(v) => v,
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    for g in array(groups, "xinfo groups")? {
        let pairs = map_pairs(g)?;
        if pairs.iter().any(|(k, v)| k == "name" && v == GROUP) {
            return Ok(pairs
                .into_iter()
                .find(|(k, _)| k == "last-delivered-id")
                .map(|(_, v)| v));
        }
    }
    Ok(None)
}

enum Settle<'a> {
    Later {
        delay: Duration,
        attempt: u32,
        error: &'a str,
    },
    Dead {
        attempts: u32,
        reason: &'a str,
    },
    DeadWithError {
        attempts: u32,
        error: &'a str,
        reason: &'a str,
    },
}

struct SettleTarget<'a> {
    job_id: &'a str,
    stream: &'a str,
    entry_id: &'a str,
    consumer: &'a str,
    lane: Lane,
    score: u32,
    deliveries: u32,
}

impl<'a> SettleTarget<'a> {
    fn of(d: &'a Delivery) -> Self {
        Self {
            job_id: &d.job_id,
            stream: &d.stream,
            entry_id: &d.entry_id,
            consumer: &d.consumer,
            lane: d.lane,
            score: order_score(d.lane, d.priority),
            deliveries: d.deliveries,
        }
    }
}

/// A stream entry as the claim script returns it.
#[derive(Debug)]
struct RawEntry {
    stream: String,
    entry_id: String,
    deliveries: u32,
    fields: Vec<(String, Vec<u8>)>,
}

impl RawEntry {
    /// `{stream, id, deliveries, {field, value, ...}}`
    fn parse(v: Value) -> Result<Self> {
        let mut parts = array(v, "claimed entry")?.into_iter();
        let (Some(stream), Some(id), Some(deliveries), Some(fields)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::Protocol("claimed entry has not 4 parts".into()));
        };
        Ok(Self {
            stream: string(&stream)?,
            entry_id: string(&id)?,
            deliveries: int(&deliveries).unwrap_or(1).clamp(1, u32::MAX as i64) as u32,
            fields: fields_of(fields)?,
        })
    }

    /// `{id, {field, value, ...}}` as XRANGE returns it.
    fn parse_plain(stream: &str, v: Value) -> Result<Self> {
        let mut parts = array(v, "stream entry")?.into_iter();
        let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
            return Err(Error::Protocol("stream entry has not 2 parts".into()));
        };
        Ok(Self {
            stream: stream.to_owned(),
            entry_id: string(&id)?,
            deliveries: 0,
            fields: fields_of(fields)?,
        })
    }
}

fn fields_of(v: Value) -> Result<Vec<(String, Vec<u8>)>> {
    let flat = match v {
        Value::Nil => Vec::new(),
        v => array(v, "entry fields")?,
    };
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((lossy(&k), bytes(v)));
    }
    Ok(out)
}

fn map_pairs(v: Value) -> Result<Vec<(String, String)>> {
    match v {
        Value::Map(pairs) => Ok(pairs.iter().map(|(k, v)| (lossy(k), lossy(v))).collect()),
        v => {
            let flat = array(v, "map")?;
            let mut out = Vec::new();
            let mut it = flat.iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((lossy(k), lossy(v)));
            }
            Ok(out)
        }
    }
}

/// Whether an XREAD reply of the wake stream holds an entry whose first field is `due`.
fn wake_mentions_due(v: Value) -> bool {
    let streams: Vec<Value> = match v {
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        Value::Array(items) => items
            .into_iter()
            .filter_map(|i| array(i, "xread").ok()?.into_iter().nth(1))
            .collect(),
        _ => Vec::new(),
    };
    streams.into_iter().any(|entries| {
        array(entries, "xread entries")
            .unwrap_or_default()
            .into_iter()
            .any(|e| {
                let fields = array(e, "xread entry")
                    .ok()
                    .and_then(|p| p.into_iter().nth(1))
                    .and_then(|f| array(f, "xread fields").ok())
                    .unwrap_or_default();
                fields
                    .first()
                    .is_some_and(|f| matches!(lossy(f).as_str(), "due" | "lapsed"))
            })
    })
}

pub(crate) fn array(v: Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::Protocol(format!(
            "{what}: expected an array, got {other:?}"
        ))),
    }
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(crate) fn string(v: &Value) -> Result<String> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b.clone()).map_err(|_| Error::Protocol("expected UTF-8 text".into()))
        }
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Okay => Ok("OK".into()),
        other => Err(Error::Protocol(format!("expected text, got {other:?}"))),
    }
}

fn lossy(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn xread_reply(first_field: &str) -> Value {
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk(first_field), bulk("1")]),
        ]);
        Value::Array(vec![Value::Array(vec![
            bulk("{t:queue}:wake"),
            Value::Array(vec![entry]),
        ])])
    }

    #[test]
    fn only_a_due_wake_entry_asks_for_the_delayed_sets() {
        assert!(wake_mentions_due(xread_reply("due")));
        assert!(!wake_mentions_due(xread_reply("ready")));
        let resp3 = Value::Map(vec![(
            bulk("{t:queue}:wake"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("due"), bulk("5")]),
            ])]),
        )]);
        assert!(wake_mentions_due(resp3));
    }

    #[test]
    fn entry_ids_order_by_time_then_sequence() {
        assert!(entry_order("10-2") > entry_order("10-1"));
        assert!(entry_order("11-0") > entry_order("10-99"));
    }

    #[test]
    fn claimed_entries_parse_and_keep_raw_bytes() {
        let v = Value::Array(vec![
            bulk("{t:queue}:stream:batch:3"),
            bulk("5-1"),
            Value::Int(2),
            Value::Array(vec![
                bulk("id"),
                bulk("j"),
                bulk("p"),
                Value::BulkString(vec![0xff]),
            ]),
        ]);
        let raw = RawEntry::parse(v).unwrap();
        assert_eq!((raw.entry_id.as_str(), raw.deliveries), ("5-1", 2));
        assert_eq!(raw.fields[1], ("p".to_owned(), vec![0xff]));
        let q_keys = Keys::new("t");
        assert_eq!(q_keys.parse_stream(&raw.stream), Some((Lane::Batch, 3)));
    }
}
