//! The provider's decisions: what each request gets, and the books kept about it.
//!
//! A chat request goes through these steps, in order; the first that refuses it answers:
//!
//! 1. no bearer token → 401 (counted as `unauthenticated`, outside any key);
//! 2. unparsable JSON, no messages, `max_tokens` 0, unknown marker → 400;
//! 3. `[sim:error=N]` → N; `[sim:context_length]` or prompt + `max_tokens` above
//!    `context_window` → 400 `context_length_exceeded`;
//! 4. `[sim:quota]` or a `quota_rate` draw → 429 `insufficient_quota`;
//! 5. the key's rate limits (its limits for the model, if the model has its own) → 429
//!    `rate_limit_exceeded`;
//! 6. admitted: the request and prompt + `max_tokens` tokens are charged, then `[sim:fail]`,
//!    `[sim:fail_first=N]` or a `fail_rate` draw → 500 after the time to first token;
//!    `[sim:hang]` or `hang_rate` → no answer; `[sim:truncate]` or `truncate_rate` → a cut body;
//!    otherwise the answer.
//!
//! Refusals before step 6 charge nothing, like a provider that validates and checks billing
//! before metering; everything admitted stays charged, even when it then fails, because a real
//! provider has spent the capacity by then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::api::{ApiError, ChatRequest, Completion};
use crate::batch;
use crate::config::SimConfig;
use crate::content::{self, Answer};
use crate::faults::{FailFirst, Markers, RandomFault};
use crate::latency::Timing;
use crate::limits::{Cost, Dimension, KeyLimiter, Policy, RateHeaders, Refusal};
use crate::stats::{self, KeyStats, Outcome, SimStats, Tally};

/// One simulated provider: its config and all its mutable state (limits, counters, random
/// draws). Cheap to clone; clones share the state. Serve it with [`crate::router`].
#[derive(Debug, Clone)]
pub struct Sim {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: SimConfig,
    policy: Policy,
    shutdown: CancellationToken,
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Files and batches. Locked before `state` when both are needed, never after.
    batches: Mutex<batch::Store>,
}

#[derive(Debug)]
struct State {
    rng: StdRng,
    keys: HashMap<String, KeyState>,
    totals: Tally,
    unauthenticated: u64,
    fail_first: FailFirst,
    timeline: Vec<RateEvent>,
}

/// One rate decision, for benchmarks that measure how a client used the limits over time
/// ([`Sim::timeline`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RateEvent {
    /// When, in ms since the Unix epoch.
    pub at_ms: f64,
    /// Admitted (`true`) or refused with a 429 `rate_limit_exceeded` (`false`).
    pub admitted: bool,
    /// Tokens it was charged (prompt + `max_tokens`), or would have been.
    pub tokens: u64,
}

/// Rate decisions kept for [`Sim::timeline`], at most (the oldest are kept).
const TIMELINE_MAX: usize = 1_000_000;

#[derive(Debug)]
struct KeyState {
    rpm: u64,
    tpm: u64,
    /// The limits of the models without limits of their own.
    limiter: KeyLimiter,
    /// The limits of each model with limits of its own (`model_limits`) this key has used.
    models: HashMap<String, KeyLimiter>,
    tally: Tally,
}

/// What to answer to one request, and the rate-limit headers to send with it.
#[derive(Debug)]
pub(crate) struct Decision {
    pub(crate) rate: RateHeaders,
    pub(crate) plan: Plan,
}

#[derive(Debug)]
pub(crate) enum Plan {
    /// Answer with this error at once.
    Error(ApiError),
    /// Answer 500 once the first token would have come.
    FailAfter(Timing),
    /// Never answer.
    Hang,
    Reply(Box<Reply>),
}

/// A successful (or truncated) completion to send.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) completion: Completion,
    pub(crate) content: String,
    pub(crate) timing: Timing,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) truncate: bool,
}

/// A parsed request with everything that does not need the lock worked out.
struct Prepared {
    request: ChatRequest,
    markers: Markers,
    prompt_tokens: u64,
    max_tokens: u32,
    answer: Answer,
}

impl Sim {
    /// A provider in its initial state. Hanging requests end when `shutdown` is cancelled.
    pub fn new(config: SimConfig, shutdown: CancellationToken) -> Result<Self> {
        config.validate()?;
        let state = State::new(config.seed);
        Ok(Self {
            shared: Arc::new(Shared {
                policy: config.limit_policy(),
                config,
                shutdown,
                next_id: AtomicU64::new(1),
                state: Mutex::new(state),
                batches: Mutex::new(batch::Store::default()),
            }),
        })
    }

    /// The config it runs with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// A snapshot of the counters, per key (by fingerprint) and in total.
    pub fn stats(&self) -> SimStats {
        let batches = {
            let mut store = self.batches();
            store.advance(self, Instant::now());
            store.stats()
        };
        let mut state = self.lock();
        let now = Instant::now();
        let mut totals = state.totals.counters.clone();
        let mut keys: Vec<KeyStats> = state
            .keys
            .iter_mut()
            .map(|(key, key_state)| {
                let mut counters = key_state.tally.counters.clone();
                // The neighbour is charged lazily: bring it up to now.
                for limiter in key_state.limiters() {
                    let _ = limiter.snapshot(now);
                    let drawn = limiter.neighbour();
                    counters.neighbour_requests += drawn.requests;
                    counters.neighbour_tokens += drawn.tokens;
                }
                totals.neighbour_requests += counters.neighbour_requests;
                totals.neighbour_tokens += counters.neighbour_tokens;
                KeyStats {
                    key: stats::fingerprint(key),
                    rpm_limit: key_state.rpm,
                    tpm_limit: key_state.tpm,
                    counters,
                }
            })
            .collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        SimStats {
            totals,
            keys,
            unauthenticated: state.unauthenticated,
            batches,
        }
    }

    /// Every rate decision so far (admitted or refused with a 429 for the rate), oldest first.
    pub fn timeline(&self) -> Vec<RateEvent> {
        self.lock().timeline.clone()
    }

    /// Back to the initial state: counters, rate-limit buckets, `fail_first` counts, the
    /// random generator (reseeded), files and batches, as if the simulator had just started.
    pub fn reset(&self) {
        *self.batches() = batch::Store::default();
        *self.lock() = State::new(self.shared.config.seed);
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn unauthenticated(&self) {
        self.lock().unauthenticated += 1;
    }

    /// Records one more run of a request with these messages for `[sim:fail_first=N]`; true
    /// while it is among the first `n`.
    pub(crate) fn fail_first(&self, messages_hash: &str, n: u32) -> bool {
        self.lock().fail_first.should_fail(messages_hash, n)
    }

    pub(crate) fn batches(&self) -> MutexGuard<'_, batch::Store> {
        // Like `state`: every update leaves the store consistent.
        self.shared
            .batches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a few counters.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides what a chat completion request with this API key and body gets, and books it.
    pub(crate) fn decide(&self, key: &str, body: &[u8], id: u64) -> Decision {
        let (config, policy) = (&self.shared.config, &self.shared.policy);
        let prepared = prepare(body, config.default_max_tokens);

        let mut guard = self.lock();
        let state = &mut *guard;
        let now = Instant::now();
        let key_state = state.keys.entry(key.to_owned()).or_insert_with(|| {
            let (rpm, tpm) = config.limits_for(key);
            KeyState {
                rpm,
                tpm,
                limiter: KeyLimiter::with_policy(rpm, tpm, policy, now),
                models: HashMap::new(),
                tally: Tally::default(),
            }
        });
        // A request that cannot be read has no model: it gets the key's headers.
        let model = prepared.as_ref().ok().map(|p| p.request.model.as_str());
        let model_limits = model.and_then(|m| Some((m, config.model_limits_for(key, m)?)));
        let limiter = match model_limits {
            Some((model, (rpm, tpm))) => key_state
                .models
                .entry(model.to_owned())
                .or_insert_with(|| KeyLimiter::with_policy(rpm, tpm, policy, now)),
            None => &mut key_state.limiter,
        };
        let mut books = Books {
            key: &mut key_state.tally,
            totals: &mut state.totals,
        };
        books.seen();

        let random = RandomFault::draw(config, &mut state.rng);
        let prepared = match prepared.and_then(|p| screen(p, key, config, random)) {
            Ok(prepared) => prepared,
            Err(error) => {
                books.finish(error_outcome(&error));
                return Decision {
                    rate: limiter.snapshot(now),
                    plan: Plan::Error(error),
                };
            }
        };

        let (admission, rate) = limiter.admit(prepared.cost(), now);
        if state.timeline.len() < TIMELINE_MAX {
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            state.timeline.push(RateEvent {
                at_ms,
                admitted: admission.is_ok(),
                tokens: prepared.cost().tokens,
            });
        }
        if let Err(refusal) = admission {
            books.finish(Outcome::RateLimited);
            return Decision {
                rate,
                plan: Plan::Error(rate_limit_error(refusal, prepared.cost())),
            };
        }
        books.admitted(now, prepared.cost().tokens);

        let Prepared {
            request,
            markers,
            prompt_tokens,
            answer,
            ..
        } = prepared;
        let timing = Timing::draw(
            &config.latency_for(&request.model),
            config.time_scale,
            &mut state.rng,
        );
        let hash = content::messages_hash(&request);
        let fail_first = markers
            .fail_first
            .is_some_and(|n| state.fail_first.should_fail(&hash, n));
        let plan = if markers.fail || fail_first || random == RandomFault::Fail {
            books.finish(Outcome::ServerError);
            Plan::FailAfter(timing)
        } else if markers.hang || random == RandomFault::Hang {
            books.finish(Outcome::Hung);
            Plan::Hang
        } else {
            let truncate = markers.truncate || random == RandomFault::Truncate;
            books.finish(if truncate {
                Outcome::Truncated
            } else {
                Outcome::Completed
            });
            books.usage(prompt_tokens, answer.completion_tokens);
            let completion = Completion {
                id: format!("chatcmpl-sim{id:010}"),
                created: crate::api::unix_now(),
                model: request.model.clone(),
                prompt_tokens,
                completion_tokens: answer.completion_tokens,
                finish_reason: if answer.hit_limit { "length" } else { "stop" },
            };
            Plan::Reply(Box::new(Reply {
                completion,
                content: answer.content,
                timing,
                stream: request.is_stream(),
                include_usage: request.include_usage(),
                truncate,
            }))
        };
        Decision { rate, plan }
    }
}

impl KeyState {
    fn limiters(&mut self) -> impl Iterator<Item = &mut KeyLimiter> {
        std::iter::once(&mut self.limiter).chain(self.models.values_mut())
    }
}

impl State {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            keys: HashMap::new(),
            totals: Tally::default(),
            unauthenticated: 0,
            fail_first: FailFirst::default(),
            timeline: Vec::new(),
        }
    }
}

/// The tallies one request is booked in: its key's and the totals.
struct Books<'a> {
    key: &'a mut Tally,
    totals: &'a mut Tally,
}

impl Books<'_> {
    fn seen(&mut self) {
        self.key.seen();
        self.totals.seen();
    }

    fn admitted(&mut self, now: Instant, tokens: u64) {
        self.key.admitted(now, tokens);
        self.totals.admitted(now, tokens);
    }

    fn finish(&mut self, outcome: Outcome) {
        self.key.finished(outcome);
        self.totals.finished(outcome);
    }

    fn usage(&mut self, prompt_tokens: u64, completion_tokens: u64) {
        self.key.usage(prompt_tokens, completion_tokens);
        self.totals.usage(prompt_tokens, completion_tokens);
    }
}

impl Prepared {
    /// What the rate limiter charges: one request, and the prompt plus all of `max_tokens`.
    fn cost(&self) -> Cost {
        Cost {
            requests: 1,
            tokens: self.prompt_tokens + u64::from(self.max_tokens),
        }
    }
}

/// Steps 3 and 4: refusals that come before metering and charge nothing.
fn screen(
    prepared: Prepared,
    key: &str,
    config: &SimConfig,
    random: RandomFault,
) -> Result<Prepared, ApiError> {
    let markers = &prepared.markers;
    if let Some(status) = markers.error {
        return Err(marker_error(status, key, &prepared.request.model));
    }
    let requested = prepared.cost().tokens;
    if markers.context_length || requested > config.context_window {
        return Err(ApiError::ContextLength {
            window: config.context_window,
            requested,
        });
    }
    if markers.quota || random == RandomFault::Quota {
        return Err(ApiError::InsufficientQuota);
    }
    Ok(prepared)
}

/// How a refusal before admission is counted.
fn error_outcome(error: &ApiError) -> Outcome {
    match error {
        ApiError::InsufficientQuota => Outcome::QuotaExceeded,
        ApiError::Server => Outcome::ServerError,
        _ => Outcome::ClientError,
    }
}

fn rate_limit_error(refusal: Refusal, cost: Cost) -> ApiError {
    match refusal {
        Refusal::Wait {
            dimension,
            limit,
            retry_after,
        } => ApiError::RateLimited {
            dimension,
            limit,
            requested: match dimension {
                Dimension::Requests => cost.requests,
                Dimension::Tokens => cost.tokens,
            },
            retry_after,
        },
        Refusal::TooLarge { limit, requested } => ApiError::TooLarge { limit, requested },
    }
}

/// A request of a batch, decided by the live endpoint's rules for everything but rate limits,
/// latency and connection faults.
#[derive(Debug)]
pub(crate) struct Offline {
    pub(crate) model: String,
    pub(crate) prompt_tokens: u64,
    pub(crate) max_tokens: u32,
    pub(crate) answer: Answer,
    /// `[sim:fail]`.
    pub(crate) fail: bool,
    /// `[sim:fail_first=N]`, with the messages hash it counts by.
    pub(crate) fail_first: Option<(u32, String)>,
}

impl Offline {
    /// What the request holds of its model's batch queue: the prompt and all of `max_tokens`,
    /// as the live rate limiter charges.
    pub(crate) fn queue_tokens(&self) -> u64 {
        self.prompt_tokens + u64::from(self.max_tokens)
    }

    pub(crate) fn finish_reason(&self) -> &'static str {
        if self.answer.hit_limit {
            "length"
        } else {
            "stop"
        }
    }
}

/// Steps 2 and 3 (and the `[sim:quota]` marker of step 4) for a batch request's body: what a
/// request gets before any metering.
pub(crate) fn prepare_offline(
    body: &[u8],
    key: &str,
    config: &SimConfig,
) -> Result<Offline, ApiError> {
    let prepared = prepare(body, config.default_max_tokens)?;
    let Prepared {
        request,
        markers,
        prompt_tokens,
        max_tokens,
        answer,
    } = screen(prepared, key, config, RandomFault::None)?;
    let fail_first = markers
        .fail_first
        .map(|n| (n, content::messages_hash(&request)));
    Ok(Offline {
        model: request.model,
        prompt_tokens,
        max_tokens,
        answer,
        fail: markers.fail,
        fail_first,
    })
}

fn prepare(body: &[u8], default_max_tokens: u32) -> Result<Prepared, ApiError> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    if request.messages.is_empty() {
        return Err(ApiError::InvalidRequest(
            "[] is too short - 'messages'".to_owned(),
        ));
    }
    let max_tokens = request.max_tokens(default_max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::InvalidRequest(
            "max_tokens must be at least 1".to_owned(),
        ));
    }
    let markers = Markers::parse(&request).map_err(ApiError::InvalidRequest)?;
    Ok(Prepared {
        prompt_tokens: content::prompt_tokens(&request),
        answer: content::answer(&request, max_tokens),
        request,
        markers,
        max_tokens,
    })
}

fn marker_error(status: u16, key: &str, model: &str) -> ApiError {
    match status {
        401 => ApiError::Unauthorized(format!(
            "Incorrect API key provided: {} (simulated by [sim:error=401]).",
            stats::fingerprint(key)
        )),
        404 => ApiError::NotFound(format!(
            "The model `{model}` does not exist or you do not have access to it (simulated by [sim:error=404])."
        )),
        500 => ApiError::Server,
        _ => ApiError::InvalidRequest(format!(
            "Invalid request (simulated by [sim:error={status}])."
        )),
    }
}
