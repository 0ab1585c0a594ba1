//! Per-key rate limits, enforced in the shapes real providers use ([`LimitShape`]).
//!
//! A per-minute limit `L` is enforced over a window `W` (`window_secs`) with a capacity of
//! `C = L × W / 60` per window (at least one unit), in one of three shapes:
//!
//! - **Token bucket** (OpenAI's "quantized" limits, Anthropic): holds at most `C` and refills
//!   `L / 60` per second, so a 600 RPM key with `W` = 1 s may send 10 requests at once and then
//!   one every 100 ms, never 600 in one burst. A cost above `C` is admitted when the bucket is
//!   full and leaves it in debt, which later requests wait out.
//! - **Sliding window** (a log): a cost fits if what was admitted in `(now − W, now]` plus the
//!   cost is at most `C`. A cost above `C` is admitted only when the window holds none of the
//!   key's own requests, and then stays in the log for `W × cost / C`, so that the per-minute
//!   rate holds (without that, one such request per window would exceed `L` many times over).
//! - **Fixed window** (Azure's minute, OpenRouter's 10 s): windows `[k·W, (k+1)·W)` from the
//!   limiter's creation, usage back to zero at each boundary. A cost above `C` is admitted in a
//!   window that holds none of the key's own requests; what it takes beyond `C` carries into the
//!   next windows, for the same reason.
//!
//! A request must fit in both dimensions at once or it takes nothing. A token cost above the
//! whole per-minute limit can never be served and is refused as "request too large".
//!
//! A neighbour (another application on the same key, `neighbour_share`) wants `share × L` per
//! minute of each limited dimension and takes only what fits; like any client it retries, so
//! what it was refused it takes as soon as there is room, up to one window's worth of its
//! demand. It is charged lazily: whenever the limiter is touched, for the time since the last
//! touch, as if it had drawn all along. It draws continuously from a bucket and from a fixed
//! window; a sliding log records its draw in steps of `W / 20`. A bucket's `retry-after` and
//! `reset` count its steady draw (else a client waiting as told would find the bucket short again
//! and again); a window's count what leaves it. It never keeps a cost above `C`
//! out: only the key's own requests count as "holding" the window, or the neighbour's trickle
//! would starve such a request forever.
//!
//! Levels are kept in "unit-nanoseconds" (units × 60e9), so that `L` per minute is `L` per
//! nanosecond and every refill and capacity is exact integer arithmetic, with no rounding drift.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::config::LimitShape;

/// What a request costs against a key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cost {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// Which limit refused a request; the OpenAI error `type` of the 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// Over the limit for now; it fits again after `retry_after`.
    Wait {
        dimension: Dimension,
        limit: u64,
        retry_after: Duration,
    },
    /// Bigger than the whole per-minute limit: it will never fit.
    TooLarge { limit: u64, requested: u64 },
}

/// The `x-ratelimit-*` values of one dimension, as sent on every response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitHeaders {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// How every limiter of a simulator enforces its limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Policy {
    pub(crate) shape: LimitShape,
    /// The window `W`: of the bucket's capacity, or of the log, or of each fixed window.
    pub(crate) window: Duration,
    /// Whether responses advertise the limits in `x-ratelimit-*` headers.
    pub(crate) headers: bool,
    /// The share of each limited dimension another application on the key draws, in `[0, 1)`.
    pub(crate) neighbour_share: f64,
}

impl Default for Policy {
    /// Today's OpenAI: a one-second token bucket, advertised, no neighbour.
    fn default() -> Self {
        Self {
            shape: LimitShape::TokenBucket,
            window: Duration::from_secs(1),
            headers: true,
            neighbour_share: 0.0,
        }
    }
}

/// Nanoseconds in a minute: levels are kept in "unit-nanoseconds" (units × 60e9) so that a
/// refill of `limit` per minute is exact integer arithmetic, with no rounding drift.
const NANOS_PER_MINUTE: i128 = 60_000_000_000;

/// The neighbour's share is kept in parts per billion.
const PARTS: i128 = 1_000_000_000;

/// Steps per window in which a sliding log records the neighbour's draw.
const NEIGHBOUR_STEPS: i128 = 20;

/// What one dimension of a limiter enforces, fixed at its creation.
#[derive(Debug, Clone, Copy)]
struct Params {
    limit_per_minute: u64,
    /// `C`, scaled: `max(1, L × W / 60)` units × 60e9 = `max(60e9, L × W in nanoseconds)`.
    capacity: i128,
    /// `W` in nanoseconds.
    window: i128,
    /// The neighbour's share in parts per billion, below one whole.
    neighbour: i128,
}

impl Params {
    fn new(limit_per_minute: u64, policy: &Policy) -> Self {
        let window = i128::try_from(policy.window.as_nanos())
            .unwrap_or(i128::MAX)
            .max(1);
        let share = policy.neighbour_share;
        // `as` saturates (and sends NaN to 0); the clamp keeps the key from starving entirely.
        let neighbour = if share.is_finite() && share > 0.0 {
            ((share * 1e9).round() as i128).clamp(0, PARTS - 1)
        } else {
            0
        };
        Self {
            limit_per_minute,
            capacity: i128::from(limit_per_minute)
                .saturating_mul(window)
                .max(NANOS_PER_MINUTE),
            window,
            neighbour,
        }
    }

    /// The refill rate: `L` per minute is `L` scaled units per nanosecond.
    fn rate(&self) -> i128 {
        i128::from(self.limit_per_minute)
    }

    /// What the neighbour wants to draw in `nanos`, scaled.
    fn neighbour_draw(&self, nanos: i128) -> i128 {
        self.rate()
            .saturating_mul(nanos)
            .saturating_mul(self.neighbour)
            / PARTS
    }

    /// The step of a sliding log's neighbour, at least `W / 20` so that a window holds at most
    /// 20 of its steps.
    fn neighbour_step(&self) -> i128 {
        (self.window + NEIGHBOUR_STEPS - 1) / NEIGHBOUR_STEPS
    }

    /// What the neighbour draws per step, at most `C / 20` so that its steps always fit in a
    /// window the key leaves alone.
    fn neighbour_step_draw(&self) -> i128 {
        self.neighbour_draw(self.neighbour_step())
            .min(self.capacity / NEIGHBOUR_STEPS)
    }

    fn oversized(&self, cost: i128) -> bool {
        cost > self.capacity
    }

    /// `left` (of `C`) on the per-minute scale of the limit: `C` reads `limit`, nothing `0`.
    fn per_minute(&self, left: i128) -> u64 {
        let remaining = left.clamp(0, self.capacity).saturating_mul(self.rate()) / self.capacity;
        u64::try_from(remaining).unwrap_or(0)
    }
}

/// Whether `cost` fits a window holding `used` (`own` of it the key's own requests): within the
/// capacity, or, for a cost above it, only in a window the key's own requests left empty.
fn window_fits(p: &Params, used: i128, own: i128, cost: i128) -> bool {
    if p.oversized(cost) {
        own == 0
    } else {
        used + cost <= p.capacity
    }
}

fn scaled(cost: u64) -> i128 {
    i128::from(cost) * NANOS_PER_MINUTE
}

fn nanos_between(from: Instant, to: Instant) -> i128 {
    i128::try_from(to.saturating_duration_since(from).as_nanos()).unwrap_or(i128::MAX / 2)
}

fn nanos(nanos: i128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
}

fn ceil_div(a: i128, b: i128) -> i128 {
    (a + b - 1).div_euclid(b)
}

/// The neighbour of one meter: what it drew and what it was refused and still wants.
#[derive(Debug, Clone, Copy, Default)]
struct Neighbour {
    /// Everything it drew, scaled.
    drawn: i128,
    /// What it was refused and will take as soon as there is room, scaled; at most its
    /// demand over one window.
    owed: i128,
}

impl Neighbour {
    /// The neighbour wants `wanted` more, plus what it owes, and gets at most `room`; returns
    /// what it took.
    fn draw(&mut self, p: &Params, wanted: i128, room: i128) -> i128 {
        let want = wanted.saturating_add(self.owed);
        let taken = want.min(room.max(0));
        self.owed = (want - taken).min(p.neighbour_draw(p.window));
        self.drawn = self.drawn.saturating_add(taken);
        taken
    }
}

/// One limited dimension of a key (or of a key and model).
#[derive(Debug, Clone)]
struct Meter {
    params: Params,
    neighbour: Neighbour,
    state: MeterState,
}

#[derive(Debug, Clone)]
enum MeterState {
    Bucket(Bucket),
    Log(Log),
    Windows(Windows),
}

impl Meter {
    fn new(limit_per_minute: u64, policy: &Policy, now: Instant) -> Self {
        let params = Params::new(limit_per_minute, policy);
        let state = match policy.shape {
            LimitShape::TokenBucket => MeterState::Bucket(Bucket {
                level: params.capacity,
                updated: now,
            }),
            LimitShape::SlidingWindow => MeterState::Log(Log {
                entries: VecDeque::new(),
                used: 0,
                own: 0,
                origin: now,
                updated: now,
                next_step: 1,
            }),
            LimitShape::FixedWindow => MeterState::Windows(Windows {
                origin: now,
                index: 0,
                used: 0,
                own: 0,
                updated: now,
            }),
        };
        Self {
            params,
            neighbour: Neighbour::default(),
            state,
        }
    }

    fn limit(&self) -> u64 {
        self.params.limit_per_minute
    }

    /// Brings the meter to `now`: refills, ages out, rolls windows, charges the neighbour.
    fn advance(&mut self, now: Instant) {
        let (p, neighbour) = (&self.params, &mut self.neighbour);
        match &mut self.state {
            MeterState::Bucket(bucket) => bucket.advance(p, neighbour, now),
            MeterState::Log(log) => log.advance(p, neighbour, now),
            MeterState::Windows(windows) => windows.advance(p, neighbour, now),
        }
    }

    /// How long until `cost` fits (zero if it fits now), as a provider computes `retry-after`:
    /// from what refills or leaves the window, assuming no new requests (a bucket counts the
    /// neighbour's steady draw). Call after `advance`.
    fn wait_for(&self, cost: u64, now: Instant) -> Duration {
        let (p, cost) = (&self.params, scaled(cost));
        match &self.state {
            MeterState::Bucket(bucket) => bucket.wait_for(p, &self.neighbour, cost),
            MeterState::Log(log) => log.wait_for(p, cost, now),
            MeterState::Windows(windows) => windows.wait_for(p, cost, now),
        }
    }

    fn take(&mut self, cost: u64) {
        let (p, cost) = (&self.params, scaled(cost));
        match &mut self.state {
            MeterState::Bucket(bucket) => bucket.level -= cost,
            MeterState::Log(log) => log.take(p, cost),
            MeterState::Windows(windows) => windows.take(cost),
        }
    }

    fn headers(&self, now: Instant) -> LimitHeaders {
        let p = &self.params;
        let (left, reset) = match &self.state {
            MeterState::Bucket(bucket) => (
                bucket.level,
                bucket.time_to_reach(p, &self.neighbour, p.capacity),
            ),
            MeterState::Log(log) => (p.capacity - log.used, log.reset(now)),
            MeterState::Windows(windows) => (p.capacity - windows.used, windows.reset(p, now)),
        };
        LimitHeaders {
            limit: p.limit_per_minute,
            remaining: p.per_minute(left),
            reset,
        }
    }

    /// Whole units the neighbour drew so far.
    fn neighbour_units(&self) -> u64 {
        u64::try_from(self.neighbour.drawn / NANOS_PER_MINUTE).unwrap_or(u64::MAX)
    }
}

/// A token bucket: up to `C`, refilling `L` per minute.
#[derive(Debug, Clone)]
struct Bucket {
    /// Current level, scaled; negative while in debt.
    level: i128,
    updated: Instant,
}

impl Bucket {
    /// Refills for the time since the last touch, while the neighbour draws its share of the
    /// refill (none of it while the bucket is in debt).
    fn advance(&mut self, p: &Params, neighbour: &mut Neighbour, now: Instant) {
        let mut elapsed = nanos_between(self.updated, now);
        self.updated = self.updated.max(now);
        let rate = p.rate();
        if self.level < 0 {
            let to_even = ceil_div(-self.level, rate).min(elapsed);
            self.level += to_even * rate;
            neighbour.draw(p, p.neighbour_draw(to_even), 0);
            elapsed -= to_even;
            if self.level < 0 {
                return;
            }
        }
        // The refill outpaces the neighbour's share, so that always fits; what it owes it
        // takes from the rest.
        let gained = elapsed.saturating_mul(rate);
        let drawn = neighbour.draw(
            p,
            p.neighbour_draw(elapsed),
            self.level.saturating_add(gained),
        );
        self.level = self.level.saturating_add(gained - drawn).min(p.capacity);
    }

    /// A cost above the capacity only needs a full bucket, and then leaves it in debt.
    fn wait_for(&self, p: &Params, neighbour: &Neighbour, cost: i128) -> Duration {
        self.time_to_reach(p, neighbour, cost.min(p.capacity))
    }

    /// How long the refill takes to bring the bucket to `target`, net of what the neighbour
    /// draws meanwhile (else a client that waits as told would find it short again, and again,
    /// each wait a fraction of the last).
    fn time_to_reach(&self, p: &Params, neighbour: &Neighbour, target: i128) -> Duration {
        if self.level >= target {
            return Duration::ZERO;
        }
        let rate = p.rate();
        let (mut level, mut owed, mut wait) = (self.level, neighbour.owed, 0);
        if level < 0 {
            // Paying off the debt, the neighbour is refused and owes what it wanted.
            wait = ceil_div(-level, rate);
            level += wait * rate;
            owed = (owed + p.neighbour_draw(wait)).min(p.neighbour_draw(p.window));
            if level >= target {
                return nanos(wait);
            }
        }
        // Then the neighbour takes its share and what it owes first.
        let missing = target - level + owed;
        let net_rate = rate * (PARTS - p.neighbour);
        nanos(wait + ceil_div(missing.saturating_mul(PARTS), net_rate))
    }
}

/// A sliding window: a log of what was admitted in the last `W`.
#[derive(Debug, Clone)]
struct Log {
    /// In order of expiry (see `take` and `expire`).
    entries: VecDeque<Entry>,
    /// Sum of the entries' amounts.
    used: i128,
    /// Sum of the amounts of the key's own entries (the rest is the neighbour's).
    own: i128,
    origin: Instant,
    /// The latest time seen: entries are stamped with it, so they stay in order of expiry even
    /// if a caller's clock goes back.
    updated: Instant,
    /// The neighbour's next step, due at `origin + next_step × step`.
    next_step: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    expires: Instant,
    amount: i128,
    own: bool,
}

impl Log {
    /// Ages entries out and records the neighbour's steps up to `now`, each taking what fits
    /// at its time.
    fn advance(&mut self, p: &Params, neighbour: &mut Neighbour, now: Instant) {
        self.updated = self.updated.max(now);
        if p.neighbour > 0 {
            self.neighbour_steps(p, neighbour, now);
        }
        self.expire(p, neighbour, now);
    }

    fn neighbour_steps(&mut self, p: &Params, neighbour: &mut Neighbour, now: Instant) {
        let step = p.neighbour_step();
        let per_step = p.neighbour_step_draw();
        let origin = self.origin;
        let step_at = move |index: u64| origin + nanos(i128::from(index) * step);
        let last = u64::try_from(nanos_between(origin, now) / step).unwrap_or(u64::MAX);
        let per_window = NEIGHBOUR_STEPS as u64 + 1;
        while self.next_step <= last {
            let at = step_at(self.next_step);
            self.expire(p, neighbour, at);
            let steps = last - self.next_step + 1;
            if self.own == 0 && steps > per_window {
                // The key has been idle for more than a window: the neighbour alone gets all
                // it wants, and only its last steps are still in the window at `now` (the
                // earlier entries have left it by then).
                neighbour.draw(p, i128::from(steps) * per_step, i128::MAX);
                for index in last + 1 - per_window..=last {
                    self.push(step_at(index) + nanos(p.window), per_step, false);
                }
                self.next_step = last + 1;
                break;
            }
            let room = p.capacity - self.used;
            if room <= 0 {
                // Full until the oldest entry leaves: the steps before that find no room.
                let free_at = self.entries.front().map_or(at, |e| e.expires);
                let free_step = ceil_div(nanos_between(origin, free_at), step);
                let free_step = u64::try_from(free_step)
                    .unwrap_or(u64::MAX)
                    .clamp(self.next_step + 1, last + 1);
                let refused = i128::from(free_step - self.next_step) * per_step;
                neighbour.draw(p, refused, 0);
                self.next_step = free_step;
                continue;
            }
            let taken = neighbour.draw(p, per_step, room);
            if taken > 0 {
                self.push(at + nanos(p.window), taken, false);
            }
            self.next_step += 1;
        }
    }

    fn push(&mut self, expires: Instant, amount: i128, own: bool) {
        self.entries.push_back(Entry {
            expires,
            amount,
            own,
        });
        self.used += amount;
        if own {
            self.own += amount;
        }
    }

    /// Drops the entries that left the window by `now`. A neighbour that owes takes the room
    /// at the instant it frees up, ahead of any client that comes later.
    fn expire(&mut self, p: &Params, neighbour: &mut Neighbour, now: Instant) {
        while let Some(entry) = self.entries.front().copied() {
            if entry.expires > now {
                break;
            }
            self.entries.pop_front();
            self.used -= entry.amount;
            if entry.own {
                self.own -= entry.amount;
            }
            let freed_at = entry.expires;
            let more_at_once = self.entries.front().is_some_and(|e| e.expires == freed_at);
            if neighbour.owed > 0 && !more_at_once {
                // Everything in the log was logged before `freed_at` (or holds the log over
                // capacity, leaving no room), so this entry expires last: the log stays in
                // order of expiry.
                let taken = neighbour.draw(p, 0, p.capacity - self.used);
                if taken > 0 {
                    self.push(freed_at + nanos(p.window), taken, false);
                }
            }
        }
    }

    fn fits(&self, p: &Params, cost: i128) -> bool {
        window_fits(p, self.used, self.own, cost)
    }

    fn wait_for(&self, p: &Params, cost: i128, now: Instant) -> Duration {
        if self.fits(p, cost) {
            return Duration::ZERO;
        }
        let free_at = if p.oversized(cost) {
            self.entries.iter().rev().find(|e| e.own).map(|e| e.expires)
        } else {
            let mut left = self.used;
            self.entries
                .iter()
                .find(|e| {
                    left -= e.amount;
                    left + cost <= p.capacity
                })
                .map(|e| e.expires)
        };
        free_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now))
    }

    /// Logs an admitted cost. One above `C` stays for `W × cost / C`; nothing else fits while
    /// it is there (the log then holds more than `C`), so the log stays in order of expiry.
    fn take(&mut self, p: &Params, cost: i128) {
        let span = if p.oversized(cost) {
            ceil_div(cost.saturating_mul(p.window), p.capacity)
        } else {
            p.window
        };
        self.push(self.updated + nanos(span), cost, true);
    }

    /// Until the log is empty.
    fn reset(&self, now: Instant) -> Duration {
        self.entries
            .back()
            .map_or(Duration::ZERO, |e| e.expires.saturating_duration_since(now))
    }
}

/// Fixed windows `[origin + k·W, origin + (k+1)·W)`.
#[derive(Debug, Clone)]
struct Windows {
    origin: Instant,
    /// The current window's `k`.
    index: u64,
    /// What the current window holds, scaled; above `C` only after an oversized cost.
    used: i128,
    /// The key's own part of `used` (the rest is the neighbour's).
    own: i128,
    updated: Instant,
}

impl Windows {
    fn start(&self, p: &Params, index: u64) -> Instant {
        self.origin + nanos(i128::from(index).saturating_mul(p.window))
    }

    /// Rolls to the window of `now`, charging the neighbour for each window on the way.
    fn advance(&mut self, p: &Params, neighbour: &mut Neighbour, now: Instant) {
        if now <= self.updated {
            return;
        }
        let target = u64::try_from(nanos_between(self.origin, now) / p.window).unwrap_or(u64::MAX);
        let mut from = self.updated;
        self.updated = now;
        while self.index < target {
            self.neighbour_draws(p, neighbour, from, self.start(p, self.index + 1));
            // What went over capacity (only an oversized cost does) carries into the next
            // window, so that the per-minute rate holds.
            let carry = (self.used - p.capacity).max(0);
            self.index += 1;
            (self.used, self.own) = (carry, carry);
            if carry >= p.capacity {
                // Windows without room for the neighbour: skip them at once.
                let full = u64::try_from(carry / p.capacity).unwrap_or(u64::MAX);
                let skipped = full.min(target - self.index);
                neighbour.draw(p, i128::from(skipped) * p.neighbour_draw(p.window), 0);
                self.index += skipped;
                self.used -= i128::from(skipped) * p.capacity;
                self.own = self.used;
            } else if carry == 0 {
                // Empty windows up to the current one: the neighbour gets its share of each,
                // and what it owes as long as there is room (`C` per window).
                let empty = i128::from(target - self.index);
                neighbour.draw(
                    p,
                    empty * p.neighbour_draw(p.window),
                    empty.saturating_mul(p.capacity),
                );
                self.index = target;
            }
            from = self.start(p, self.index);
        }
        self.neighbour_draws(p, neighbour, from, now);
    }

    fn neighbour_draws(
        &mut self,
        p: &Params,
        neighbour: &mut Neighbour,
        from: Instant,
        to: Instant,
    ) {
        let wanted = p.neighbour_draw(nanos_between(from, to));
        self.used += neighbour.draw(p, wanted, p.capacity - self.used);
    }

    fn fits(&self, p: &Params, cost: i128) -> bool {
        window_fits(p, self.used, self.own, cost)
    }

    fn wait_for(&self, p: &Params, cost: i128, now: Instant) -> Duration {
        if self.fits(p, cost) {
            return Duration::ZERO;
        }
        // The first boundary where what carries over leaves room (an oversized cost needs an
        // empty window).
        let excess = if p.oversized(cost) {
            self.used
        } else {
            self.used + cost - p.capacity
        };
        self.boundary_after(p, excess, now)
    }

    fn take(&mut self, cost: i128) {
        self.used += cost;
        self.own += cost;
    }

    /// Until a window starts empty.
    fn reset(&self, p: &Params, now: Instant) -> Duration {
        if self.used <= 0 {
            return Duration::ZERO;
        }
        self.boundary_after(p, self.used, now)
    }

    /// Time to the first boundary by which `excess` has carried off (at least the next one).
    fn boundary_after(&self, p: &Params, excess: i128, now: Instant) -> Duration {
        let windows = u64::try_from(ceil_div(excess, p.capacity).max(1)).unwrap_or(u64::MAX);
        self.start(p, self.index.saturating_add(windows))
            .saturating_duration_since(now)
    }
}

/// The limits of one API key (or of one key and model with limits of its own): a meter per
/// limited dimension (none when unlimited).
#[derive(Debug, Clone)]
pub(crate) struct KeyLimiter {
    requests: Option<Meter>,
    tokens: Option<Meter>,
    advertise: bool,
}

/// Header values of both dimensions after a decision (`None` for an unlimited dimension, or
/// for both when the provider does not advertise its limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RateHeaders {
    pub(crate) requests: Option<LimitHeaders>,
    pub(crate) tokens: Option<LimitHeaders>,
}

impl KeyLimiter {
    /// One-second token buckets for `rpm` and `tpm`, full; `0` means unlimited.
    #[cfg(test)]
    pub(crate) fn new(rpm: u64, tpm: u64, now: Instant) -> Self {
        Self::with_policy(rpm, tpm, &Policy::default(), now)
    }

    /// Empty meters of the policy's shape for `rpm` and `tpm`; `0` means unlimited.
    pub(crate) fn with_policy(rpm: u64, tpm: u64, policy: &Policy, now: Instant) -> Self {
        let meter = |limit| (limit > 0).then(|| Meter::new(limit, policy, now));
        Self {
            requests: meter(rpm),
            tokens: meter(tpm),
            advertise: policy.headers,
        }
    }

    /// Charges `cost` to both dimensions if it fits in both, or charges nothing and says why.
    pub(crate) fn admit(&mut self, cost: Cost, now: Instant) -> (Result<(), Refusal>, RateHeaders) {
        self.advance(now);
        let outcome = self.check(cost, now);
        if outcome.is_ok() {
            if let Some(meter) = &mut self.requests {
                meter.take(cost.requests);
            }
            if let Some(meter) = &mut self.tokens {
                meter.take(cost.tokens);
            }
        }
        (outcome, self.headers(now))
    }

    /// The header values now, charging nothing (for requests refused before admission).
    pub(crate) fn snapshot(&mut self, now: Instant) -> RateHeaders {
        self.advance(now);
        self.headers(now)
    }

    /// What the neighbour drew so far, in whole requests and tokens (call `snapshot` first
    /// to bring it up to date).
    pub(crate) fn neighbour(&self) -> Cost {
        let units = |meter: &Option<Meter>| meter.as_ref().map_or(0, Meter::neighbour_units);
        Cost {
            requests: units(&self.requests),
            tokens: units(&self.tokens),
        }
    }

    fn advance(&mut self, now: Instant) {
        for meter in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            meter.advance(now);
        }
    }

    fn check(&self, cost: Cost, now: Instant) -> Result<(), Refusal> {
        if let Some(tokens) = &self.tokens {
            if cost.tokens > tokens.limit() {
                return Err(Refusal::TooLarge {
                    limit: tokens.limit(),
                    requested: cost.tokens,
                });
            }
        }
        let waits = [
            (Dimension::Requests, &self.requests, cost.requests),
            (Dimension::Tokens, &self.tokens, cost.tokens),
        ];
        let longest = waits
            .into_iter()
            .filter_map(|(dimension, meter, cost)| {
                meter
                    .as_ref()
                    .map(|m| (dimension, m.limit(), m.wait_for(cost, now)))
            })
            .filter(|(_, _, wait)| !wait.is_zero())
            .max_by_key(|(_, _, wait)| *wait);
        match longest {
            Some((dimension, limit, retry_after)) => Err(Refusal::Wait {
                dimension,
                limit,
                retry_after,
            }),
            None => Ok(()),
        }
    }

    fn headers(&self, now: Instant) -> RateHeaders {
        if !self.advertise {
            return RateHeaders::default();
        }
        let headers = |meter: &Option<Meter>| meter.as_ref().map(|m| m.headers(now));
        RateHeaders {
            requests: headers(&self.requests),
            tokens: headers(&self.tokens),
        }
    }
}

/// Formats a duration like OpenAI's `x-ratelimit-reset-*` headers (`6m0s`, `1s`, `1.5s`,
/// `250ms`), rounded up to the millisecond so that a non-zero wait never reads `0s`.
pub(crate) fn format_reset(duration: Duration) -> String {
    let total_ms = ceil_millis(duration);
    if total_ms == 0 {
        return "0s".to_owned();
    }
    if total_ms < 1000 {
        return format!("{total_ms}ms");
    }
    let hours = total_ms / 3_600_000;
    let minutes = total_ms / 60_000 % 60;
    let millis_in_minute = total_ms % 60_000;
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let seconds = millis_in_minute / 1000;
    let fraction = millis_in_minute % 1000;
    if fraction == 0 {
        let _ = write!(out, "{seconds}s");
    } else {
        let digits = format!("{fraction:03}");
        let _ = write!(out, "{seconds}.{}s", digits.trim_end_matches('0'));
    }
    out
}

/// Whole milliseconds, rounded up.
pub(crate) fn ceil_millis(duration: Duration) -> u64 {
    let millis = duration.as_millis();
    let rounded = if duration.subsec_nanos() % 1_000_000 == 0 {
        millis
    } else {
        millis + 1
    };
    u64::try_from(rounded).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up, at least 1 (the `retry-after` header).
pub(crate) fn ceil_secs(duration: Duration) -> u64 {
    ceil_millis(duration).div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn request(tokens: u64) -> Cost {
        Cost {
            requests: 1,
            tokens,
        }
    }

    #[test]
    fn rpm_is_quantized_to_the_second() {
        let t0 = Instant::now();
        // 600 RPM: 10 at once, then one every 100 ms.
        let mut limiter = KeyLimiter::new(600, 0, t0);
        for _ in 0..10 {
            assert!(limiter.admit(request(1), t0).0.is_ok());
        }
        let (refused, headers) = limiter.admit(request(1), t0);
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Requests,
                limit: 600,
                retry_after: ms(100)
            })
        );
        let requests = headers.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (600, 0));
        assert_eq!(requests.reset, Duration::from_secs(1));
        assert!(headers.tokens.is_none());

        assert!(limiter.admit(request(1), t0 + ms(50)).0.is_err());
        let (admitted, headers) = limiter.admit(request(1), t0 + ms(100));
        assert!(admitted.is_ok());
        assert_eq!(headers.requests.unwrap().remaining, 0);
    }

    #[test]
    fn small_limits_hold_one_request() {
        let t0 = Instant::now();
        // 3 RPM: capacity 1, one request every 20 s.
        let mut limiter = KeyLimiter::new(3, 0, t0);
        let (admitted, headers) = limiter.admit(request(1), t0);
        assert!(admitted.is_ok());
        assert_eq!(headers.requests.unwrap().reset, Duration::from_secs(20));
        let (refused, _) = limiter.admit(request(1), t0 + Duration::from_secs(5));
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Requests,
                limit: 3,
                retry_after: Duration::from_secs(15)
            })
        );
        assert!(
            limiter
                .admit(request(1), t0 + Duration::from_secs(20))
                .0
                .is_ok()
        );
    }

    #[test]
    fn tokens_are_charged_with_requests_or_not_at_all() {
        let t0 = Instant::now();
        // 6,000 TPM: 100 tokens per second.
        let mut limiter = KeyLimiter::new(600, 6_000, t0);
        assert!(limiter.admit(request(80), t0).0.is_ok());
        let (refused, headers) = limiter.admit(request(30), t0);
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Tokens,
                limit: 6_000,
                retry_after: ms(100)
            })
        );
        // The refused request took no request budget: 9 of 10 are left.
        assert_eq!(headers.requests.unwrap().remaining, 540);
        assert_eq!(headers.tokens.unwrap().remaining, 1_200);
        assert!(limiter.admit(request(30), t0 + ms(100)).0.is_ok());
    }

    #[test]
    fn oversized_costs_go_into_debt_or_are_too_large() {
        let t0 = Instant::now();
        let mut limiter = KeyLimiter::new(0, 6_000, t0);
        // 250 tokens > the 100-token bucket: admitted because the bucket is full.
        assert!(limiter.admit(request(250), t0).0.is_ok());
        // The debt of 150 plus a full bucket of 100 takes 2.5 s to refill.
        let (refused, headers) = limiter.admit(request(250), t0 + ms(500));
        assert_eq!(headers.tokens.unwrap().reset, ms(2_000));
        assert_eq!(
            refused,
            Err(Refusal::Wait {
                dimension: Dimension::Tokens,
                limit: 6_000,
                retry_after: ms(2_000)
            })
        );
        assert!(limiter.admit(request(250), t0 + ms(2_500)).0.is_ok());
        assert_eq!(
            limiter
                .admit(request(6_001), t0 + Duration::from_secs(60))
                .0,
            Err(Refusal::TooLarge {
                limit: 6_000,
                requested: 6_001
            })
        );
    }

    #[test]
    fn unlimited_admits_everything() {
        let t0 = Instant::now();
        let mut limiter = KeyLimiter::new(0, 0, t0);
        for _ in 0..1_000 {
            assert_eq!(
                limiter.admit(request(1_000_000), t0),
                (Ok(()), RateHeaders::default())
            );
        }
    }

    #[test]
    fn a_clock_going_backwards_does_not_refill() {
        let t0 = Instant::now();
        let mut limiter = KeyLimiter::new(60, 0, t0 + Duration::from_secs(10));
        assert!(
            limiter
                .admit(request(1), t0 + Duration::from_secs(10))
                .0
                .is_ok()
        );
        assert!(limiter.admit(request(1), t0).0.is_err());
    }

    #[test]
    fn reset_durations_read_like_openai() {
        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_micros(1)), "1ms");
        assert_eq!(format_reset(ms(250)), "250ms");
        assert_eq!(format_reset(ms(1_000)), "1s");
        assert_eq!(format_reset(ms(1_500)), "1.5s");
        assert_eq!(format_reset(ms(3_125)), "3.125s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(ms(61_020)), "1m1.02s");
        assert_eq!(format_reset(Duration::from_secs(3_600)), "1h0m0s");
        assert_eq!(ceil_secs(ms(100)), 1);
        assert_eq!(ceil_secs(ms(1_001)), 2);
        assert_eq!(ceil_millis(Duration::from_micros(100_001)), 101);
    }

    const SHAPES: [LimitShape; 3] = [
        LimitShape::TokenBucket,
        LimitShape::SlidingWindow,
        LimitShape::FixedWindow,
    ];

    /// A limiter of `shape` over one-second windows.
    fn shaped(shape: LimitShape, rpm: u64, tpm: u64, share: f64, now: Instant) -> KeyLimiter {
        let policy = Policy {
            shape,
            neighbour_share: share,
            ..Policy::default()
        };
        KeyLimiter::with_policy(rpm, tpm, &policy, now)
    }

    /// The `retry_after` of a refusal, or a panic naming what came instead.
    fn retry(outcome: Result<(), Refusal>) -> Duration {
        match outcome {
            Err(Refusal::Wait { retry_after, .. }) => retry_after,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn a_longer_window_holds_a_bigger_bucket() {
        let t0 = Instant::now();
        // 60 RPM over 10 s: 10 at once, then one per second.
        let policy = Policy {
            window: Duration::from_secs(10),
            ..Policy::default()
        };
        let mut limiter = KeyLimiter::with_policy(60, 0, &policy, t0);
        for _ in 0..10 {
            assert!(limiter.admit(request(1), t0).0.is_ok());
        }
        let (refused, headers) = limiter.admit(request(1), t0);
        assert_eq!(retry(refused), Duration::from_secs(1));
        assert_eq!(headers.requests.unwrap().reset, Duration::from_secs(10));
        assert!(
            limiter
                .admit(request(1), t0 + Duration::from_secs(1))
                .0
                .is_ok()
        );
    }

    #[test]
    fn sliding_window_refuses_the_next_request_in_any_window() {
        let t0 = Instant::now();
        let at = |n| t0 + ms(n);
        // 600 RPM over 1 s: at most 10 requests in any second.
        let mut limiter = shaped(LimitShape::SlidingWindow, 600, 0, 0.0, t0);
        for i in 0..10 {
            assert!(limiter.admit(request(1), at(i * 100)).0.is_ok());
        }
        let (refused, headers) = limiter.admit(request(1), at(950));
        // The request of 0 ms leaves the window at 1,000 ms; the last one at 1,900 ms.
        assert_eq!(retry(refused), ms(50));
        let requests = headers.requests.unwrap();
        assert_eq!((requests.remaining, requests.reset), (0, ms(950)));
        assert!(limiter.admit(request(1), at(1_000)).0.is_ok());
        assert_eq!(retry(limiter.admit(request(1), at(1_050)).0), ms(50));
        // Once all have aged out: 10 at once, not 11.
        for _ in 0..10 {
            assert!(limiter.admit(request(1), at(2_100)).0.is_ok());
        }
        let (refused, headers) = limiter.admit(request(1), at(2_100));
        assert_eq!(retry(refused), Duration::from_secs(1));
        assert_eq!(headers.requests.unwrap().reset, Duration::from_secs(1));
        assert_eq!(
            limiter.snapshot(at(2_600)).requests.unwrap().remaining,
            0,
            "a log does not refill as time passes, only as entries leave"
        );
        assert_eq!(limiter.snapshot(at(3_100)).requests.unwrap().remaining, 600);
    }

    #[test]
    fn sliding_window_admits_an_oversized_cost_alone_and_for_longer() {
        let t0 = Instant::now();
        let at = |n| t0 + ms(n);
        // 6,000 TPM over 1 s: 100 tokens in any second.
        let mut limiter = shaped(LimitShape::SlidingWindow, 0, 6_000, 0.0, t0);
        assert!(limiter.admit(request(30), t0).0.is_ok());
        // 250 > 100 waits until the window holds nothing else.
        assert_eq!(retry(limiter.admit(request(250), at(100)).0), ms(900));
        let (admitted, headers) = limiter.admit(request(250), at(1_000));
        assert!(admitted.is_ok());
        // It stays for 2.5 windows, so the key still gets 100 tokens per second.
        let tokens = headers.tokens.unwrap();
        assert_eq!((tokens.remaining, tokens.reset), (0, ms(2_500)));
        assert_eq!(retry(limiter.admit(request(10), at(2_000)).0), ms(1_500));
        assert!(limiter.admit(request(10), at(3_500)).0.is_ok());
    }

    #[test]
    fn fixed_window_resets_at_boundaries() {
        let t0 = Instant::now();
        let at = |n| t0 + ms(n);
        // 600 RPM in windows of 1 s: 10 per window.
        let mut limiter = shaped(LimitShape::FixedWindow, 600, 0, 0.0, t0);
        for _ in 0..10 {
            assert!(limiter.admit(request(1), at(900)).0.is_ok());
        }
        let (refused, headers) = limiter.admit(request(1), at(900));
        assert_eq!(retry(refused), ms(100));
        let requests = headers.requests.unwrap();
        assert_eq!((requests.remaining, requests.reset), (0, ms(100)));
        // Another 10 as the next window opens: twice the capacity within 100 ms.
        for _ in 0..10 {
            assert!(limiter.admit(request(1), at(1_000)).0.is_ok());
        }
        assert_eq!(retry(limiter.admit(request(1), at(1_999)).0), ms(1));
        let (admitted, headers) = limiter.admit(request(1), at(2_000));
        assert!(admitted.is_ok());
        let requests = headers.requests.unwrap();
        assert_eq!((requests.remaining, requests.reset), (540, ms(1_000)));
        assert_eq!(limiter.snapshot(at(3_000)).requests.unwrap().remaining, 600);
    }

    #[test]
    fn fixed_window_carries_an_oversized_cost_over() {
        let t0 = Instant::now();
        let at = |n| t0 + ms(n);
        // 6,000 TPM in windows of 1 s: 100 tokens per window.
        let mut limiter = shaped(LimitShape::FixedWindow, 0, 6_000, 0.0, t0);
        assert!(limiter.admit(request(30), at(0)).0.is_ok());
        // 250 > 100 waits for a window that holds nothing else: the next one.
        assert_eq!(retry(limiter.admit(request(250), at(500)).0), ms(500));
        let (admitted, headers) = limiter.admit(request(250), at(1_000));
        assert!(admitted.is_ok());
        // 150 carries into the window of 2 s and 50 into that of 3 s; the one of 4 s is empty.
        let tokens = headers.tokens.unwrap();
        assert_eq!((tokens.remaining, tokens.reset), (0, ms(3_000)));
        assert_eq!(retry(limiter.admit(request(10), at(1_500)).0), ms(1_500));
        assert!(limiter.admit(request(10), at(3_000)).0.is_ok());
        // Another oversized cost needs an empty window, later than the next boundary would be
        // for a small one.
        assert_eq!(retry(limiter.admit(request(250), at(3_000)).0), ms(1_000));
        assert!(limiter.admit(request(250), at(4_000)).0.is_ok());
    }

    #[test]
    fn too_large_in_every_shape() {
        for shape in SHAPES {
            let t0 = Instant::now();
            let mut limiter = shaped(shape, 0, 6_000, 0.0, t0);
            assert_eq!(
                limiter.admit(request(6_001), t0).0,
                Err(Refusal::TooLarge {
                    limit: 6_000,
                    requested: 6_001
                }),
                "{shape:?}"
            );
            // The whole minute's limit is not too large, and then holds the key for about a
            // minute in every shape.
            assert!(limiter.admit(request(6_000), t0).0.is_ok(), "{shape:?}");
            let wait = retry(limiter.admit(request(10), t0 + ms(10)).0);
            assert!(
                (Duration::from_secs(59)..=Duration::from_secs(60)).contains(&wait),
                "{shape:?}: {wait:?}"
            );
        }
    }

    #[test]
    fn a_provider_that_does_not_advertise_sends_no_headers() {
        for shape in SHAPES {
            let t0 = Instant::now();
            let policy = Policy {
                shape,
                headers: false,
                ..Policy::default()
            };
            // 60 RPM over 1 s: one request per second.
            let mut limiter = KeyLimiter::with_policy(60, 6_000, &policy, t0);
            assert_eq!(
                limiter.admit(request(10), t0),
                (Ok(()), RateHeaders::default())
            );
            let (refused, headers) = limiter.admit(request(10), t0);
            assert_eq!(headers, RateHeaders::default());
            assert_eq!(retry(refused), Duration::from_secs(1), "{shape:?}");
            assert_eq!(limiter.snapshot(t0 + ms(500)), RateHeaders::default());
        }
    }

    /// Tries one request every 10 ms for a minute; returns how many were admitted.
    fn saturate(limiter: &mut KeyLimiter, t0: Instant) -> u64 {
        let admitted = (1..=6_000)
            .filter(|i| limiter.admit(request(1), t0 + ms(i * 10)).0.is_ok())
            .count();
        u64::try_from(admitted).unwrap()
    }

    #[test]
    fn a_neighbour_takes_its_share_of_throughput_in_every_shape() {
        for shape in SHAPES {
            let t0 = Instant::now();
            // 600 RPM: 600 a minute alone (plus a first window's burst with a bucket).
            let mut alone = shaped(shape, 600, 0, 0.0, t0);
            let admitted_alone = saturate(&mut alone, t0);
            assert!(
                (595..=610).contains(&admitted_alone),
                "{shape:?}: {admitted_alone}"
            );
            assert_eq!(
                alone.neighbour(),
                Cost {
                    requests: 0,
                    tokens: 0
                }
            );

            // A neighbour with half of the key: about 300 each, never more than the key allows.
            let mut shared = shaped(shape, 600, 0, 0.5, t0);
            let admitted = saturate(&mut shared, t0);
            let _ = shared.snapshot(t0 + Duration::from_secs(60));
            let neighbour = shared.neighbour().requests;
            assert!((295..=315).contains(&admitted), "{shape:?}: {admitted}");
            assert!((290..=300).contains(&neighbour), "{shape:?}: {neighbour}");
            assert!(
                admitted + neighbour <= 611,
                "{shape:?}: {admitted} + {neighbour}"
            );
        }
    }

    #[test]
    fn a_neighbour_lowers_remaining() {
        // 600 RPM over 1 s, with and without a neighbour drawing half; the key drained its
        // capacity at 0 ms. The bucket refills faster than the neighbour draws, so an idle
        // bucket is full again; a window shows what the neighbour holds of it.
        let cases = [
            (LimitShape::TokenBucket, 500, 300, 150),
            (LimitShape::SlidingWindow, 10_500, 600, 300),
            (LimitShape::FixedWindow, 10_500, 600, 450),
        ];
        for (shape, after, alone, shared) in cases {
            let t0 = Instant::now();
            for (share, expected) in [(0.0, alone), (0.5, shared)] {
                let mut limiter = shaped(shape, 600, 0, share, t0);
                for _ in 0..10 {
                    assert!(limiter.admit(request(1), t0).0.is_ok());
                }
                let remaining = limiter.snapshot(t0 + ms(after)).requests.unwrap().remaining;
                assert_eq!(remaining, expected, "{shape:?}, share {share}");
            }
        }
    }

    #[test]
    fn a_neighbour_never_starves_an_oversized_cost() {
        for shape in SHAPES {
            let t0 = Instant::now();
            // 6,000 TPM over 1 s: 100 tokens per window, 90 of them wanted by the neighbour.
            let mut limiter = shaped(shape, 0, 6_000, 0.9, t0);
            let mut at = t0 + ms(5_000);
            assert!(limiter.admit(request(250), at).0.is_ok(), "{shape:?}");
            // The next one gets in by retrying, though the neighbour may take some of the
            // room a retry-after promised.
            let mut retries = 0;
            while let Err(refusal) = limiter.admit(request(250), at).0 {
                at += retry(Err(refusal));
                retries += 1;
                assert!(retries < 50, "{shape:?}");
            }
            assert!(
                at < t0 + Duration::from_secs(60),
                "{shape:?}: {:?}",
                at - t0
            );
        }
    }
}
