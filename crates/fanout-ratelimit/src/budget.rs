//! The shared budget: admission, settlement, provider feedback and snapshots.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fanout_core::config::{BudgetConfig, LimitCaps, ModelLimits, model_family};
use fanout_core::redis::Pool;
use rand::Rng as _;
use redis::Value;
use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::keeper::{Chore, Keeper};
use crate::keys::Keys;
use crate::redis_conn::{Redis, SCRIPTS, array, float, int, text};
use crate::stats::BudgetStats;

/// How long past its predicted turn a silent waiter keeps its place in the waiting room.
const WAITER_GRACE_MS: u64 = 1_000;
/// Concurrency waits poll (releases are not scheduled): this times the place in line, capped at 20×.
const CONCURRENCY_POLL_MS: u64 = 10;
/// How far ahead of its schedule an admission may run: a waiter that wakes up to twice this late
/// (timer granularity, a round trip) loses no budget; a provider window of W seconds sees at most
/// (W + burst + 2 × this) of budget, which the headroom covers.
const LATENESS_MS: f64 = 5.0;
/// How long the first call to a budget whose limits are unknown holds the others back at most:
/// a probe slower than this (a long or hung call) lets another one go.
const PROBE_HOLD: Duration = Duration::from_secs(5);
/// Waiters ahead that one admission plays through, at most.
const AHEAD_LIMIT: u64 = 64;
/// A provider's `remaining` is news only when it is this share of the burst below our view.
const REMAINING_TOLERANCE: f64 = 0.5;
/// Pause after a 429 that carried neither retry-after nor a usable reset.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// Advertised limits already in Redis are confirmed at most this often by one process (every
/// response carries them; one write a while renews their TTL).
const LEARN_REFRESH: Duration = Duration::from_secs(30);

/// What a caller wants admitted.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// The model the call will use; its family selects the budget.
    pub model: String,
    /// Tokens the call may use: prompt + `max_tokens` (from fanout-llm's estimate).
    pub estimated_tokens: u64,
    /// Higher goes first when the budget binds.
    pub priority: u8,
    /// When the work was enqueued (ms since the epoch): older first at equal priority.
    pub enqueued_at_ms: u64,
    /// Give up (with [`Error::WaitTooLong`]) rather than wait longer than this.
    pub max_wait: Duration,
    /// Whose work it is: a tenant with a share in the config (`[budget_tenants]`) takes its
    /// share first.
    pub tenant: Option<String>,
}

impl AcquireRequest {
    /// The same request at `priority` (higher first under scarcity).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// The same request, waiting at most `max_wait`.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The same request, on behalf of `tenant`.
    pub fn with_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.to_owned());
        self
    }

    /// The same request, ordered as enqueued at `enqueued_at_ms` (ms since the epoch).
    pub fn with_enqueued_at_ms(mut self, enqueued_at_ms: u64) -> Self {
        self.enqueued_at_ms = enqueued_at_ms;
        self
    }
}

/// An admitted request. Holds a cluster-wide concurrency lease, renewed in the background while
/// this value lives; [`Budget::settle`] releases it, and so does dropping it (best effort).
#[derive(Debug)]
pub struct Admission {
    /// Name of the API key to call with.
    pub key: String,
    /// The model family whose budget was charged.
    pub family: String,
    /// Tokens charged up front.
    pub estimated_tokens: u64,
    /// Time spent waiting for budget.
    pub waited: Duration,
    /// The part of `waited` spent on the tenant's share (zero when it did not have to wait, or
    /// has no share).
    pub tenant_waited: Duration,
    /// When the budget admitted the request (ms since the epoch, Redis clock).
    pub admitted_at_ms: u64,
    /// The first call to a budget whose limits were not known: its answer teaches them, and
    /// other calls to that budget wait for it. Pass its signal to [`Budget::feedback`].
    pub probe: bool,
    lease: Option<Lease>,
}

impl Admission {
    /// The lease id (also the waiter id used while waiting).
    pub fn lease_id(&self) -> &str {
        self.lease.as_ref().map(|l| l.id.as_str()).unwrap_or("")
    }
}

/// What the provider said about a key: from a 429, or `x-ratelimit-*` headers of any response.
#[derive(Debug, Clone, Default)]
pub struct ProviderSignal {
    pub retry_after: Option<Duration>,
    /// The per-minute limits the provider advertised (`x-ratelimit-limit-*`).
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
    /// The HTTP status; 0 when the call never got an answer (a transport failure). Only a 429
    /// for the rate (not "request too large", not `insufficient_quota`) should be passed as 429.
    pub status: u16,
    /// Which limit a 429 names (`None`: unknown, both are lowered).
    pub limited: Option<Dimension>,
    /// When the budget admitted the call ([`Admission::admitted_at_ms`]): a 429 for a call
    /// admitted before the last decrease does not lower the rate again.
    pub admitted_at_ms: Option<u64>,
    /// The call was a probe ([`Admission::probe`]): its answer must reach Redis.
    pub probe: bool,
}

/// A rate limit's dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Requests,
    Tokens,
}

impl ProviderSignal {
    /// The signal of one answer to the call `admission` admitted.
    pub fn for_admission(admission: &Admission, status: u16) -> Self {
        Self {
            status,
            admitted_at_ms: Some(admission.admitted_at_ms),
            probe: admission.probe,
            ..Self::default()
        }
    }
}

/// The state of one (key, family) budget, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSnapshot {
    pub key: String,
    pub family: String,
    /// The limits the budget paces to now (before headroom): learnt or configured, capped, and
    /// lowered while the adaptive rate is below them.
    pub requests_per_minute: f64,
    pub tokens_per_minute: f64,
    /// The configured limits (the plan's or set explicitly): the starting value or cap.
    pub configured_requests_per_minute: u64,
    pub configured_tokens_per_minute: u64,
    /// What the provider advertised, if it did (and learning is on).
    pub learnt_requests_per_minute: Option<u64>,
    pub learnt_tokens_per_minute: Option<u64>,
    /// Requests that could start now (negative: debt).
    pub requests_available: f64,
    /// Requests admitted across the cluster in the last 60 s, and the tokens reserved for them
    /// (estimates; what providers count at admission).
    pub requests_last_minute: f64,
    pub tokens_last_minute: f64,
    /// Tokens that could be taken now (negative: debt from an under-estimate or a big request).
    pub tokens_available: f64,
    /// How long the provider asked us to hold off, if it did and the time is not over.
    pub paused_for: Option<Duration>,
    /// Concurrency leases held across the cluster (all keys and families).
    pub leases_in_use: u64,
    pub max_concurrent_requests: u32,
    /// Waiters in this family's waiting room.
    pub waiters: u64,
}

/// The budget that every worker process shares through Redis. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Arc<Redis>,
    keys: Keys,
    namespace: String,
    config: BudgetConfig,
    key_names: Vec<String>,
    stats: Arc<BudgetStats>,
    families: Mutex<BTreeSet<String>>,
    keeper: Keeper,
    /// Per limits key: the advertised limits this process last stored, and when.
    learnt: Mutex<HashMap<String, (Advertised, Instant)>>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("namespace", &self.inner.namespace)
            .field("keys", &self.inner.key_names)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Advertised (requests, tokens) per minute.
type Advertised = (Option<u64>, Option<u64>);

/// The lease half of an admission: releases itself when dropped unsettled.
struct Lease {
    id: String,
    family: String,
    budget: Arc<Inner>,
    bucket_key: String,
    limits_key: String,
    /// What the admission charged after the request besides its weight (ms of budget; an
    /// outlier's, see acquire.lua): a refusal gives it back too.
    after_ms: f64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.budget.keeper.drop_lease(&self.id) {
            debug!(lease = %self.id, "budget admission dropped without settle, releasing its lease");
            self.budget.keeper.send(Chore::Leave {
                family: self.family.clone(),
                id: self.id.clone(),
            });
        }
    }
}

/// A place in the waiting room, given up when an acquire is cancelled.
struct Waiter<'a> {
    id: String,
    family: &'a str,
    budget: &'a Inner,
    armed: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.budget.keeper.send(Chore::Leave {
                family: self.family.to_owned(),
                id: self.id.clone(),
            });
        }
    }
}

enum Reply {
    Admitted {
        key_index: usize,
        now_ms: f64,
        probe: bool,
        after_ms: f64,
    },
    Wait {
        wait: Duration,
        reason: String,
    },
    TooLarge {
        tokens_per_minute: u64,
    },
}

impl Budget {
    /// A budget over `key_names` (the names of the provider keys; their secrets never reach
    /// Redis), with keys under `namespace`.
    pub fn new(pool: Pool, namespace: &str, config: BudgetConfig, key_names: Vec<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis: Arc::new(Redis::new(pool)),
                keys: Keys::new(namespace),
                namespace: namespace.to_owned(),
                config,
                key_names,
                stats: Arc::default(),
                families: Mutex::default(),
                keeper: Keeper::new(),
                learnt: Mutex::default(),
            }),
        }
    }

    /// A request for `model` and `estimated_tokens` at priority 0, enqueued now, waiting at most
    /// `max_wait_secs` from the config.
    pub fn request(&self, model: &str, estimated_tokens: u64) -> AcquireRequest {
        AcquireRequest {
            model: model.to_owned(),
            estimated_tokens,
            priority: 0,
            enqueued_at_ms: unix_ms(),
            max_wait: Duration::from_secs(self.inner.config.max_wait_secs),
            tenant: None,
        }
    }

    /// Report `model`'s family in [`Budget::snapshot`] from now on, before this process has
    /// acquired for it (a worker tracks its default model at start, so its gauges exist before
    /// its first job). [`Budget::acquire`] tracks every model it is asked for.
    pub fn track(&self, model: &str) {
        let family = model_family(model);
        let mut families = self.inner.families.lock().expect("families");
        if !families.contains(family) {
            families.insert(family.to_owned());
        }
    }

    /// The (key name, model family) budgets that exist in Redis, whoever uses them: what an
    /// operator's process (which may hold no provider key itself) lists in its status. A SCAN:
    /// for operator reads, not for a hot path.
    pub async fn in_use(&self) -> Result<Vec<(String, String)>> {
        let inner = &*self.inner;
        let mut pairs = BTreeSet::new();
        for pattern in inner.keys.pair_patterns() {
            for key in inner.redis.scan(&pattern).await? {
                if let Some(pair) = inner.keys.parse_pair(&key) {
                    pairs.insert(pair);
                }
            }
        }
        Ok(pairs.into_iter().collect())
    }

    /// This process's counters.
    pub fn stats(&self) -> Arc<BudgetStats> {
        self.inner.stats.clone()
    }

    /// The configuration the budget runs with.
    pub fn config(&self) -> &BudgetConfig {
        &self.inner.config
    }

    /// Wait until one request and `estimated_tokens` fit the budget of some key for the model's
    /// family, in waiting-room order, and a cluster-wide concurrency lease is free. Sleeps the
    /// time the script predicts (plus a little jitter), never polls the budget in a loop. Gives
    /// up with [`Error::WaitTooLong`] as soon as the predicted wait would pass `max_wait`.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<Admission> {
        let inner = &*self.inner;
        if inner.key_names.is_empty() {
            return Err(Error::NoKeys);
        }
        inner.keeper.ensure_started(
            &inner.redis,
            &inner.keys,
            Duration::from_secs(inner.config.lease_secs),
        );
        let family = model_family(&req.model).to_owned();
        self.track(&req.model);
        let limits = inner.config.limits_for(&req.model);
        let started = Instant::now();
        let mut tenant_waited = Duration::ZERO;
        if let Some(tenant) = &req.tenant
            && let Some(&share) = inner.config.tenant_shares.get(tenant)
            && self
                .take_tenant_share(tenant, share, &family, &req, started)
                .await?
        {
            tenant_waited = started.elapsed();
            BudgetStats::add(&inner.stats.waits, 1);
        }
        let mut waiter = Waiter {
            id: uuid::Uuid::new_v4().simple().to_string(),
            family: &family,
            budget: inner,
            armed: true,
        };
        // A wait for the tenant's share counts as the request's wait, as one in the room does.
        let mut waited_once = !tenant_waited.is_zero();
        let score = order_score(req.priority, req.enqueued_at_ms);
        let bucket_keys: Vec<String> = inner
            .key_names
            .iter()
            .map(|k| inner.keys.bucket(k, &family))
            .collect();
        let limit_keys: Vec<String> = inner
            .key_names
            .iter()
            .map(|k| inner.keys.limits(k, &family))
            .collect();
        let caps = inner.config.caps_for(&req.model);
        let tokens = req.estimated_tokens.max(1);
        loop {
            let mut inv = SCRIPTS.acquire.prepare_invoke();
            inv.key(inner.keys.leases())
                .key(inner.keys.room(&family))
                .key(inner.keys.room_expiry(&family))
                .key(inner.keys.room_cost(&family))
                .key(&bucket_keys)
                .key(&limit_keys)
                .arg(&waiter.id)
                .arg(score)
                .arg(tokens);
            limit_args(&mut inv, limits, caps);
            inv.arg(burst_ms(&inner.config))
                .arg(inner.config.headroom)
                .arg(inner.config.max_concurrent_requests)
                .arg(inner.config.lease_secs * 1000)
                .arg(WAITER_GRACE_MS)
                .arg(CONCURRENCY_POLL_MS)
                .arg(AHEAD_LIMIT);
            adaptive_args(&mut inv, &inner.config);
            inv.arg(LATENESS_MS).arg(PROBE_HOLD.as_millis() as u64);
            let reply = parse_acquire(inner.redis.run(&inv).await?)?;
            match reply {
                Reply::Admitted {
                    key_index,
                    now_ms,
                    probe,
                    after_ms,
                } => {
                    waiter.armed = false;
                    let waited = started.elapsed();
                    let key = inner.key_names[key_index].clone();
                    inner.keeper.hold(&waiter.id);
                    BudgetStats::add(&inner.stats.admissions, 1);
                    if probe {
                        BudgetStats::add(&inner.stats.probes, 1);
                        debug!(key, family, "limits not known yet: this call learns them");
                    }
                    if waited_once {
                        BudgetStats::add(&inner.stats.wait_micros, waited.as_micros() as u64);
                    }
                    return Ok(Admission {
                        lease: Some(Lease {
                            id: waiter.id.clone(),
                            family: family.clone(),
                            budget: self.inner.clone(),
                            bucket_key: bucket_keys[key_index].clone(),
                            limits_key: limit_keys[key_index].clone(),
                            after_ms,
                        }),
                        probe,
                        key,
                        family: family.clone(),
                        estimated_tokens: tokens,
                        waited,
                        tenant_waited,
                        admitted_at_ms: now_ms as u64,
                    });
                }
                Reply::TooLarge { tokens_per_minute } => {
                    waiter.armed = false;
                    return Err(Error::TooLarge {
                        tokens,
                        tokens_per_minute,
                    });
                }
                Reply::Wait { wait, reason } => {
                    tracing::trace!(
                        family,
                        reason,
                        wait_ms = wait.as_millis() as u64,
                        "budget wait"
                    );
                    if !waited_once {
                        waited_once = true;
                        BudgetStats::add(&inner.stats.waits, 1);
                    }
                    let elapsed = started.elapsed();
                    if elapsed + wait > req.max_wait {
                        waiter.armed = false;
                        self.leave(&family, &waiter.id).await?;
                        BudgetStats::add(&inner.stats.wait_too_long, 1);
                        BudgetStats::add(&inner.stats.wait_micros, elapsed.as_micros() as u64);
                        debug!(
                            family,
                            reason,
                            wait_ms = wait.as_millis() as u64,
                            "budget wait too long, giving up"
                        );
                        return Err(Error::WaitTooLong { retry_after: wait });
                    }
                    tokio::time::sleep(with_jitter(wait)).await;
                }
            }
        }
    }

    /// Wait until `tenant`'s `share` of the family's budget (of every key's limits together)
    /// takes the request, or give up as [`Budget::acquire`] does. Sleeps the time the script
    /// predicts; nothing of the shared budget is held meanwhile. Returns whether it waited.
    async fn take_tenant_share(
        &self,
        tenant: &str,
        share: f64,
        family: &str,
        req: &AcquireRequest,
        started: Instant,
    ) -> Result<bool> {
        let inner = &*self.inner;
        let limits = inner.config.limits_for(family);
        let keys = inner.key_names.len() as f64;
        let per_minute = |limit: u64| ((limit as f64 * keys * share).round() as u64).max(1);
        let mut inv = SCRIPTS.tenant.prepare_invoke();
        inv.key(inner.keys.tenant(tenant, family))
            .arg(req.estimated_tokens.max(1))
            .arg(per_minute(limits.requests_per_minute))
            .arg(per_minute(limits.tokens_per_minute))
            .arg(burst_ms(&inner.config));
        let mut waited = false;
        loop {
            let reply = array(inner.redis.run(&inv).await?).unwrap_or_default();
            let wait = match (reply.first().and_then(int), reply.get(1).and_then(int)) {
                (Some(1), _) => return Ok(waited),
                (Some(0), Some(ms)) => Duration::from_millis(ms.max(1) as u64),
                _ => {
                    return Err(Error::Reply {
                        script: "tenant",
                        detail: format!("unexpected reply {reply:?}"),
                    });
                }
            };
            let elapsed = started.elapsed();
            if elapsed + wait > req.max_wait {
                BudgetStats::add(&inner.stats.wait_too_long, 1);
                debug!(
                    tenant,
                    family,
                    wait_ms = wait.as_millis() as u64,
                    "tenant over its share for too long, giving up"
                );
                return Err(Error::WaitTooLong { retry_after: wait });
            }
            waited = true;
            tokio::time::sleep(with_jitter(wait)).await;
        }
    }

    async fn leave(&self, family: &str, id: &str) -> Result<()> {
        let keys = &self.inner.keys;
        let mut inv = SCRIPTS.leave.prepare_invoke();
        inv.key(keys.room(family))
            .key(keys.room_expiry(family))
            .key(keys.room_cost(family))
            .key(keys.leases())
            .arg(id);
        self.inner.redis.run(&inv).await?;
        Ok(())
    }

    /// After the call: release the lease and settle the tokens. With `actual_tokens` (prompt +
    /// completion, as the provider reported) above the estimate, the difference is charged (the
    /// provider charged it too); below it, the difference is refunded if `refund_unused_tokens`
    /// (never past a full bucket). `None` (no usage known, e.g. a failed call) keeps the estimate
    /// charged. Settling twice, or after the lease expired, changes nothing.
    pub async fn settle(&self, admission: Admission, actual_tokens: Option<u64>) -> Result<()> {
        self.release(admission, actual_tokens, false).await
    }

    /// After a call the provider refused without counting it (a 429: over its rate, or "request
    /// too large"): release the lease and give back the request and all its estimated tokens,
    /// whatever `refund_unused_tokens` says, so a refusal does not leave our budget in debt for
    /// what the provider never charged. Idempotent like [`Budget::settle`].
    pub async fn settle_refused(&self, admission: Admission) -> Result<()> {
        self.release(admission, Some(0), true).await
    }

    async fn release(
        &self,
        mut admission: Admission,
        actual_tokens: Option<u64>,
        refused: bool,
    ) -> Result<()> {
        let Some(lease) = admission.lease.take() else {
            return Ok(());
        };
        let inner = &*self.inner;
        let delta: i64 = match actual_tokens {
            Some(actual) => {
                let d = actual as i64 - admission.estimated_tokens as i64;
                if d < 0 && !inner.config.refund_unused_tokens && !refused {
                    0
                } else {
                    d
                }
            }
            None => 0,
        };
        let mut inv = SCRIPTS.settle.prepare_invoke();
        inv.key(inner.keys.leases())
            .key(&lease.bucket_key)
            .key(&lease.limits_key)
            .arg(&lease.id)
            .arg(delta)
            .arg(u8::from(refused));
        limit_args(
            &mut inv,
            inner.config.limits_for(&admission.family),
            inner.config.caps_for(&admission.family),
        );
        adaptive_args(&mut inv, &inner.config);
        inv.arg(inner.config.headroom)
            .arg(if refused { lease.after_ms } else { 0.0 });
        let result = inner.redis.run(&inv).await;
        if result.is_ok() {
            // Released: the drop must not release it again.
            inner.keeper.drop_lease(&lease.id);
        }
        drop(lease);
        result.map(|_| ())
    }

    /// What the provider said about `key` for `model`, on any answer: advertised limits are
    /// learnt for every process; a 429 (or any retry-after) pauses that budget for every process
    /// until the time is over, and, when the call was admitted after the last decrease, lowers
    /// the rate (adaptive); `remaining` headers well below our own view lower what the budget
    /// thinks is available. Goes to Redis only when there is news (a 429, a probe's answer, a
    /// limit that changed or is due for confirmation, an exhausted `remaining`); returns once
    /// Redis has it.
    pub async fn feedback(&self, key: &str, model: &str, signal: ProviderSignal) -> Result<()> {
        let inner = &*self.inner;
        if !inner.key_names.iter().any(|k| k == key) {
            return Err(Error::UnknownKey(key.to_owned()));
        }
        let family = model_family(model);
        self.track(model);
        let limits = inner.config.limits_for(model);
        let caps = inner.config.caps_for(model);
        let limits_key = inner.keys.limits(key, family);
        let is_429 = signal.status == 429;
        if is_429 {
            BudgetStats::add(&inner.stats.feedback_429, 1);
        }
        let learn = inner.config.learn_limits;
        let advertised = (
            signal.limit_requests.filter(|&n| n > 0),
            signal.limit_tokens.filter(|&n| n > 0),
        );
        let learn_news = learn && self.learn_is_news(&limits_key, advertised);
        // A low `remaining` can be news only for a bucket that holds a burst (see feedback.lua).
        let low = |remaining: Option<u64>, limit: Option<u64>| match (remaining, limit) {
            (Some(0), _) => true,
            (Some(r), Some(l)) => inner.config.burst_seconds > 0.0 && r * 2 < l,
            _ => false,
        };
        let low = low(
            signal.remaining_requests,
            advertised.0.or(Some(limits.requests_per_minute)),
        ) || low(
            signal.remaining_tokens,
            advertised.1.or(Some(limits.tokens_per_minute)),
        );
        if !(is_429 || signal.probe || learn_news || low || signal.retry_after.is_some()) {
            BudgetStats::add(&inner.stats.feedback_skipped, 1);
            return Ok(());
        }
        let pause = pause_for(&signal);
        // A remaining count is a share of the limit it was counted against: the advertised one.
        let fraction = |remaining: Option<u64>, limit: u64| {
            remaining.map_or(-1.0, |r| (r as f64 / limit.max(1) as f64).min(1.0))
        };
        let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1000.0);
        let lower = if is_429 && inner.config.adaptive.enabled {
            match signal.limited {
                Some(Dimension::Requests) => 1,
                Some(Dimension::Tokens) => 2,
                None => 3,
            }
        } else {
            0
        };
        let mut inv = SCRIPTS.feedback.prepare_invoke();
        inv.key(inner.keys.bucket(key, family))
            .key(&limits_key)
            .arg(pause.map_or(0, |p| p.as_millis() as u64))
            .arg(fraction(
                signal.remaining_requests,
                advertised.0.unwrap_or(limits.requests_per_minute),
            ))
            .arg(fraction(
                signal.remaining_tokens,
                advertised.1.unwrap_or(limits.tokens_per_minute),
            ))
            .arg(ms(signal.reset_requests))
            .arg(ms(signal.reset_tokens))
            .arg(burst_ms(&inner.config))
            .arg(REMAINING_TOLERANCE)
            .arg(u8::from(is_429));
        limit_args(&mut inv, limits, caps);
        adaptive_args(&mut inv, &inner.config);
        let signed = |n: Option<u64>| n.map_or(-1, |n| n as i64);
        inv.arg(signed(advertised.0))
            .arg(signed(advertised.1))
            .arg(u8::from(signal.status != 0))
            .arg(lower)
            .arg(signed(signal.admitted_at_ms))
            .arg(inner.config.adaptive.decrease)
            .arg(inner.config.learned_ttl_secs.saturating_mul(1000));
        let reply = array(inner.redis.run(&inv).await?).ok_or_else(|| Error::Reply {
            script: "feedback",
            detail: "expected an array".into(),
        })?;
        if learn && (advertised.0.is_some() || advertised.1.is_some()) {
            self.inner
                .learnt
                .lock()
                .expect("learnt")
                .insert(limits_key, (advertised, Instant::now()));
        }
        let flag = |i: usize| reply.get(i).and_then(int) == Some(1);
        let number = |i: usize| reply.get(i).and_then(float).filter(|v| *v > 0.0);
        let (effective_rpm, effective_tpm) = (number(6).unwrap_or(0.0), number(7).unwrap_or(0.0));
        if flag(0) || flag(1) || flag(2) {
            BudgetStats::add(&inner.stats.pauses_applied, 1);
            debug!(
                key,
                family,
                status = signal.status,
                paused_ms = pause.map(|p| p.as_millis() as u64),
                lowered_requests = flag(1),
                lowered_tokens = flag(2),
                "budget held back on provider feedback"
            );
        }
        if flag(3) {
            BudgetStats::add(&inner.stats.limits_learnt, 1);
            match advertised {
                (None, None) => info!(
                    key,
                    family,
                    "provider advertises no limits: the configured ones apply, lowered on 429s"
                ),
                (r, t) => info!(
                    key,
                    family,
                    advertised_rpm = r,
                    advertised_tpm = t,
                    effective_rpm = effective_rpm.round() as u64,
                    effective_tpm = effective_tpm.round() as u64,
                    "budget adopted the provider's advertised limits"
                ),
            }
        }
        let decreased = (number(4), number(5));
        if decreased.0.is_some() || decreased.1.is_some() {
            BudgetStats::add(&inner.stats.decreases, 1);
            info!(
                key,
                family,
                requests_per_minute = decreased.0.map(|v| v.round() as u64),
                tokens_per_minute = decreased.1.map(|v| v.round() as u64),
                "unexpected 429: budget rate lowered for every process"
            );
        }
        Ok(())
    }

    /// Whether advertised limits differ from what this process last stored, or are due for
    /// confirmation.
    fn learn_is_news(&self, limits_key: &str, advertised: Advertised) -> bool {
        if advertised == (None, None) {
            return false;
        }
        let learnt = self.inner.learnt.lock().expect("learnt");
        let refresh =
            LEARN_REFRESH.min(Duration::from_secs(self.inner.config.learned_ttl_secs / 4));
        match learnt.get(limits_key) {
            Some(&(stored, at)) => stored != advertised || at.elapsed() >= refresh,
            None => true,
        }
    }

    /// Per (key, family) — families named in the config plus those this process has used — the
    /// effective, configured and learnt limits, what is available now, any pause, leases in use
    /// and waiters. Logs (once across processes) an adaptive rate that has climbed back.
    pub async fn snapshot(&self) -> Result<Vec<BudgetSnapshot>> {
        let inner = &*self.inner;
        let mut families: BTreeSet<String> = inner.config.models.keys().cloned().collect();
        families.extend(inner.families.lock().expect("families").iter().cloned());
        let families: Vec<String> = families.into_iter().collect();
        let pairs: Vec<(&String, &String)> = inner
            .key_names
            .iter()
            .flat_map(|k| families.iter().map(move |f| (k, f)))
            .collect();
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = SCRIPTS.snapshot.prepare_invoke();
        inv.key(inner.keys.leases());
        for (k, f) in &pairs {
            inv.key(inner.keys.bucket(k, f));
        }
        for (k, f) in &pairs {
            inv.key(inner.keys.limits(k, f));
        }
        for f in &families {
            inv.key(inner.keys.room_expiry(f));
        }
        inv.arg(pairs.len())
            .arg(u8::from(inner.config.learn_limits))
            .arg(inner.config.adaptive.quiet_secs * 1000.0)
            .arg(inner.config.adaptive.recovery_secs * 1000.0);
        for (_, f) in &pairs {
            limit_args(
                &mut inv,
                inner.config.limits_for(f),
                inner.config.caps_for(f),
            );
        }
        let bad = |detail: &str| Error::Reply {
            script: "snapshot",
            detail: detail.to_owned(),
        };
        let reply = array(inner.redis.run(&inv).await?).ok_or_else(|| bad("expected an array"))?;
        if reply.len() != 2 + pairs.len() + families.len() {
            return Err(bad("wrong length"));
        }
        let now = float(&reply[0]).ok_or_else(|| bad("now"))?;
        let leases = int(&reply[1]).unwrap_or(0).max(0) as u64;
        let burst = burst_ms(&inner.config);
        let pace = 1.0 - inner.config.headroom;
        let mut out = Vec::with_capacity(pairs.len());
        for (i, (key, family)) in pairs.iter().enumerate() {
            let state = array(reply[2 + i].clone()).unwrap_or_default();
            let field = |j: usize| state.get(j).and_then(float).unwrap_or(0.0);
            let learnt = |j: usize| state.get(j).and_then(float).map(|v| v as u64);
            let (rtat, ttat, paused) = (field(0), field(1), field(2));
            let (rpm, tpm) = (field(3), field(4));
            if state.get(7).and_then(int) == Some(1) {
                info!(
                    key = key.as_str(),
                    family = family.as_str(),
                    requests_per_minute = rpm.round() as u64,
                    tokens_per_minute = tpm.round() as u64,
                    "budget rate back at its limit"
                );
            }
            let configured: ModelLimits = inner.config.limits_for(family);
            let available = |tat: f64, per_minute: f64| {
                (burst - (tat - now).max(0.0)) * per_minute * pace / 60_000.0
            };
            let family_index = families.iter().position(|f| f == *family).unwrap_or(0);
            out.push(BudgetSnapshot {
                key: (*key).clone(),
                family: (*family).clone(),
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                configured_requests_per_minute: configured.requests_per_minute,
                configured_tokens_per_minute: configured.tokens_per_minute,
                learnt_requests_per_minute: learnt(5),
                learnt_tokens_per_minute: learnt(6),
                requests_available: available(rtat, rpm),
                tokens_available: available(ttat, tpm),
                requests_last_minute: field(8),
                tokens_last_minute: field(9),
                paused_for: (paused > now)
                    .then(|| Duration::from_secs_f64((paused - now) / 1000.0)),
                leases_in_use: leases,
                max_concurrent_requests: inner.config.max_concurrent_requests,
                waiters: int(&reply[2 + pairs.len() + family_index])
                    .unwrap_or(0)
                    .max(0) as u64,
            });
        }
        Ok(out)
    }
}

/// The starting limits and caps of a family, as the scripts take them (ARGV: start rpm, start
/// tpm, cap rpm, cap tpm; 0 = no cap).
fn limit_args(inv: &mut redis::ScriptInvocation<'_>, limits: ModelLimits, caps: LimitCaps) {
    inv.arg(limits.requests_per_minute.max(1))
        .arg(limits.tokens_per_minute.max(1))
        .arg(caps.requests_per_minute.unwrap_or(0))
        .arg(caps.tokens_per_minute.unwrap_or(0));
}

/// Learning and the adaptive rate, as the scripts take them (ARGV: learn, quiet ms, recovery ms).
fn adaptive_args(inv: &mut redis::ScriptInvocation<'_>, config: &BudgetConfig) {
    inv.arg(u8::from(config.learn_limits))
        .arg(config.adaptive.quiet_secs * 1000.0)
        .arg(config.adaptive.recovery_secs * 1000.0);
}

fn parse_acquire(v: Value) -> Result<Reply> {
    let bad = |detail: &str| Error::Reply {
        script: "acquire",
        detail: detail.to_owned(),
    };
    let items = array(v).ok_or_else(|| bad("expected an array"))?;
    match items.first().and_then(int) {
        Some(1) => {
            let index = items.get(1).and_then(int).ok_or_else(|| bad("key index"))?;
            let now_ms = items.get(2).and_then(float).ok_or_else(|| bad("now"))?;
            let probe = items.get(3).and_then(int) == Some(1);
            let after_ms = items.get(4).and_then(float).unwrap_or(0.0);
            Ok(Reply::Admitted {
                key_index: usize::try_from(index - 1).map_err(|_| bad("key index"))?,
                now_ms,
                probe,
                after_ms,
            })
        }
        Some(0) => {
            let wait = items.get(1).and_then(int).ok_or_else(|| bad("wait"))?;
            let reason = items.get(2).and_then(text).unwrap_or("budget").to_owned();
            Ok(Reply::Wait {
                wait: Duration::from_millis(wait.max(1) as u64),
                reason,
            })
        }
        Some(2) => {
            let limit = items.get(1).and_then(float).unwrap_or(0.0);
            Ok(Reply::TooLarge {
                tokens_per_minute: limit as u64,
            })
        }
        _ => Err(bad("expected 0, 1 or 2 first")),
    }
}

/// Sorts ascending: higher priority first, then older first.
fn order_score(priority: u8, enqueued_at_ms: u64) -> u64 {
    const SPAN: u64 = 1 << 41; // ms since the epoch fit until the year 2039
    u64::from(255 - priority) * SPAN + enqueued_at_ms.min(SPAN - 1)
}

fn burst_ms(config: &BudgetConfig) -> f64 {
    config.burst_seconds * 1000.0
}

/// A little later rather than earlier: waking early costs a round trip, waking late costs
/// nothing while the (small) burst absorbs it; the spread keeps waiters with equal waits apart.
/// At most a millisecond: lateness beyond the burst is budget lost for good.
fn with_jitter(wait: Duration) -> Duration {
    let max = (wait / 20).min(Duration::from_millis(1));
    let extra = rand::rng().random_range(0..=max.as_micros() as u64);
    wait + Duration::from_micros(extra)
}

fn pause_for(signal: &ProviderSignal) -> Option<Duration> {
    if let Some(r) = signal.retry_after {
        return Some(r);
    }
    if signal.status != 429 {
        return None;
    }
    let exhausted = [
        (signal.remaining_requests, signal.reset_requests),
        (signal.remaining_tokens, signal.reset_tokens),
    ]
    .into_iter()
    .filter(|(remaining, _)| *remaining == Some(0))
    .filter_map(|(_, reset)| reset)
    .max();
    Some(exhausted.unwrap_or(DEFAULT_PAUSE))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_then_older_sorts_first() {
        assert!(order_score(5, 2_000) < order_score(0, 1_000));
        assert!(order_score(3, 1_000) < order_score(3, 1_001));
        assert!(order_score(255, u64::MAX) < order_score(254, 0));
        // Exact in a double (Redis scores are doubles).
        let s = order_score(0, 1_800_000_000_000);
        assert_eq!(s as f64 as u64, s);
    }

    #[test]
    fn pause_comes_from_retry_after_then_the_exhausted_reset() {
        let s = ProviderSignal {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(pause_for(&s), Some(Duration::from_secs(2)));
        let s = ProviderSignal {
            status: 429,
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_millis(300)),
            remaining_tokens: Some(10),
            reset_tokens: Some(Duration::from_secs(9)),
            ..Default::default()
        };
        assert_eq!(pause_for(&s), Some(Duration::from_millis(300)));
        let s = ProviderSignal {
            status: 429,
            ..Default::default()
        };
        assert_eq!(pause_for(&s), Some(DEFAULT_PAUSE));
        let s = ProviderSignal {
            status: 200,
            remaining_requests: Some(0),
            ..Default::default()
        };
        assert_eq!(pause_for(&s), None);
    }

    #[test]
    fn jitter_only_adds_a_little() {
        for ms in [0, 1, 30, 100, 10_000] {
            let d = Duration::from_millis(ms);
            let j = with_jitter(d);
            assert!(j >= d && j <= d + Duration::from_millis(1), "{ms}: {j:?}");
        }
    }
}
