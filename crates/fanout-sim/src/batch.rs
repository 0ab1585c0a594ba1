//! The Batch API: chat requests run offline from an uploaded file, answered in an output file
//! and an error file, in a pool of their own (no RPM or TPM is charged; an enqueued-token limit
//! per model applies instead).
//!
//! A batch's life is a function of time, worked out whenever someone looks (no task runs it):
//! with `T = batch_turnaround_secs × time_scale`, it is `validating` for the first 5% of `T`,
//! `in_progress` until 95% (its requests finishing one after another, evenly spaced, in file
//! order), `finalizing` until `T`, then `completed`. Three things cut that short:
//!
//! - **Failure.** Decided at creation, shown when validation ends: the model's enqueued tokens
//!   (prompt + `max_tokens` of every line of the key's unfinished batches for that model) would
//!   exceed `batch_queue_tokens` (`token_limit_exceeded`, as OpenAI's "batch queue limit"), or the
//!   lines use more than one model. The batch is `failed`, with `errors`, and writes no file.
//! - **Expiry.** When `batch_turnaround_secs` exceeds `batch_window_secs` (OpenAI's 24 h
//!   window), the batch stops at the window's end: `expired`, its unfinished requests in the error
//!   file with `batch_expired`.
//! - **Cancellation.** `cancel` stops the requests at once; the batch is `cancelling`, then
//!   `cancelled` 10 s (scaled) later, its unfinished requests in the error file with
//!   `batch_cancelled`.
//!
//! What each request gets is decided at creation, by the live endpoint's own rules (see
//! [`crate::sim`]): a body the live endpoint would refuse (bad JSON, `[sim:error=N]`,
//! `[sim:context_length]`, `[sim:quota]`) is that error; `[sim:fail]`, `[sim:fail_first=N]` or a
//! `batch_line_error_rate` draw (from `seed` and the batch's rank since the start) is a 500;
//! otherwise the answer the live endpoint would give, with its `usage`. Latency and connection
//! faults (`[sim:hang]`, `[sim:truncate]`, the live fault rates) do not apply. When the batch ends,
//! its requests are written out: answered ones to the output file, failed ones (with their status
//! and OpenAI error body) and unfinished ones (`response: null`, an `error` code) to the error file.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{ApiError, Completion};
use crate::config::SimConfig;
use crate::files::{self, CHAT_ENDPOINT, MAX_FILE_BYTES, Purpose, StoredFile};
use crate::server;
use crate::sim::{Offline, Sim, prepare_offline};
use crate::stats::BatchStats;

/// Shares of the turnaround spent validating, and until finalizing starts.
const VALIDATED_AT: f64 = 0.05;
const FINALIZING_AT: f64 = 0.95;
/// Provider seconds between a cancel and the batch being cancelled (scaled by `time_scale`).
const CANCEL_SECS: f64 = 10.0;
/// The longest scaled time the simulator schedules, so that a wild config cannot overflow.
const MAX_SCHEDULE: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// The completion window OpenAI accepts, the only one.
const COMPLETION_WINDOW: &str = "24h";
/// Room for the multipart framing around a file of [`MAX_FILE_BYTES`].
const FORM_OVERHEAD: usize = 1 << 20;

/// The routes of the Files and Batch APIs. Every response carries an `x-request-id`.
pub(crate) fn routes(sim: &Sim) -> Router<Sim> {
    Router::new()
        .route(
            "/v1/files",
            get(files::list)
                .post(files::upload)
                .layer(DefaultBodyLimit::max(MAX_FILE_BYTES + FORM_OVERHEAD)),
        )
        .route(
            "/v1/files/{file_id}",
            get(files::retrieve).delete(files::delete),
        )
        .route("/v1/files/{file_id}/content", get(files::content))
        .route("/v1/batches", get(list).post(create))
        .route("/v1/batches/{batch_id}", get(retrieve))
        .route("/v1/batches/{batch_id}/cancel", post(cancel))
        .layer(axum::middleware::map_response_with_state(
            sim.clone(),
            request_id,
        ))
}

async fn request_id(State(sim): State<Sim>, response: Response) -> Response {
    server::with_request_id(response, sim.next_id())
}

/// The API key (bearer token) of a Files or Batch API request; a request without one gets the
/// chat endpoint's 401.
#[derive(Debug)]
pub(crate) struct ApiKey(pub(crate) String);

impl FromRequestParts<Sim> for ApiKey {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, sim: &Sim) -> Result<Self, Self::Rejection> {
        match server::bearer_token(&parts.headers) {
            Some(key) => Ok(Self(key.to_owned())),
            None => {
                sim.unauthenticated();
                Err(server::error_response(&server::missing_key()))
            }
        }
    }
}

/// Every file and batch, with the counters of what batches did. Reset with the simulator.
#[derive(Debug, Default)]
pub(crate) struct Store {
    files: Vec<StoredFile>,
    /// Oldest first.
    batches: Vec<Batch>,
    /// Batches created since the start (or the last reset): each one's rank seeds its draws.
    created: u64,
    stats: BatchStats,
}

/// A batch's status, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

/// When each phase of a batch starts, counted from its creation, already scaled.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    in_progress: Duration,
    finalizing: Duration,
    completed: Duration,
    /// The end of the completion window (`expires_at`).
    window: Duration,
    /// Whether the window ends before the batch would complete.
    expires: bool,
    cancel_delay: Duration,
}

impl Schedule {
    fn new(config: &SimConfig) -> Self {
        let scaled = |secs: f64| {
            Duration::try_from_secs_f64(secs * config.time_scale)
                .unwrap_or(MAX_SCHEDULE)
                .min(MAX_SCHEDULE)
        };
        let turnaround = config.batch_turnaround_secs;
        Self {
            in_progress: scaled(turnaround * VALIDATED_AT),
            finalizing: scaled(turnaround * FINALIZING_AT),
            completed: scaled(turnaround),
            window: scaled(config.batch_window_secs),
            // Compared unscaled, so that a time scale of 0 still expires what would expire.
            expires: turnaround > config.batch_window_secs,
            cancel_delay: scaled(CANCEL_SECS),
        }
    }
}

/// One request of a batch and what it gets.
#[derive(Debug)]
struct Line {
    custom_id: String,
    outcome: Result<Offline, ApiError>,
}

#[derive(Debug)]
struct Batch {
    id: String,
    owner: String,
    input_file_id: String,
    metadata: Option<Map<String, Value>>,
    model: Option<String>,
    created: Instant,
    created_unix: f64,
    lines: Vec<Line>,
    /// What it holds of its model's queue: prompt + `max_tokens` of every line.
    tokens: u64,
    schedule: Schedule,
    /// The errors it fails with when validation ends.
    errors: Option<Vec<Value>>,
    /// When a cancel arrived, counted from creation.
    cancel: Option<Duration>,
    /// The files it wrote, once it ended.
    settled: Option<Settled>,
}

#[derive(Debug)]
struct Settled {
    output_file_id: Option<String>,
    error_file_id: Option<String>,
}

/// How far a batch's requests got, at some time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Progress {
    total: usize,
    completed: usize,
    failed: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Batch {
    /// How the batch ends, and when.
    fn end(&self) -> (Status, Duration) {
        let schedule = &self.schedule;
        if let Some(cancel) = self.cancel {
            (
                Status::Cancelled,
                cancel.saturating_add(schedule.cancel_delay),
            )
        } else if self.errors.is_some() {
            (Status::Failed, schedule.in_progress)
        } else if schedule.expires {
            (Status::Expired, schedule.window)
        } else {
            (Status::Completed, schedule.completed)
        }
    }

    /// When the batch stopped (or will stop) running requests early: a cancel, or the window.
    fn interruption(&self) -> Option<Duration> {
        self.cancel
            .or(self.schedule.expires.then_some(self.schedule.window))
    }

    /// Whether a phase of the normal course starting at `phase` was entered by `at`.
    fn reached(&self, phase: Duration, at: Duration) -> bool {
        self.errors.is_none() && phase <= at && self.interruption().is_none_or(|i| phase < i)
    }

    fn status(&self, at: Duration) -> Status {
        let (status, end) = self.end();
        if at >= end {
            return status;
        }
        if self.cancel.is_some_and(|cancel| at >= cancel) {
            return Status::Cancelling;
        }
        let schedule = &self.schedule;
        if at < schedule.in_progress || self.errors.is_some() {
            Status::Validating
        } else if at < schedule.finalizing {
            Status::InProgress
        } else {
            Status::Finalizing
        }
    }

    /// How many requests (from the first) are done by `at`.
    fn done(&self, at: Duration) -> usize {
        if self.errors.is_some() {
            return 0;
        }
        let schedule = &self.schedule;
        let until = self.interruption().map_or(at, |i| at.min(i));
        if until < schedule.in_progress {
            return 0;
        }
        let n = self.lines.len();
        let run = schedule.finalizing.saturating_sub(schedule.in_progress);
        if run.is_zero() {
            return n;
        }
        let elapsed = (until - schedule.in_progress).as_nanos();
        let done = elapsed.saturating_mul(n as u128) / run.as_nanos();
        usize::try_from(done).unwrap_or(n).min(n)
    }

    /// When request `index` is done, counted from creation.
    fn done_at(&self, index: usize) -> Duration {
        let schedule = &self.schedule;
        let run = schedule.finalizing.saturating_sub(schedule.in_progress);
        let share = (index + 1) as f64 / self.lines.len().max(1) as f64;
        schedule.in_progress + run.mul_f64(share)
    }

    fn progress(&self, at: Duration) -> Progress {
        let (_, end) = self.end();
        let started = self.errors.is_none() && (at >= self.schedule.in_progress || at >= end);
        let mut progress = Progress {
            total: if started { self.lines.len() } else { 0 },
            ..Progress::default()
        };
        for line in &self.lines[..self.done(at)] {
            match &line.outcome {
                Ok(offline) => {
                    progress.completed += 1;
                    progress.prompt_tokens += offline.prompt_tokens;
                    progress.completion_tokens += offline.answer.completion_tokens;
                }
                Err(_) => progress.failed += 1,
            }
        }
        progress
    }

    /// Unix seconds of a time counted from creation.
    fn unix(&self, at: Duration) -> u64 {
        (self.created_unix + at.as_secs_f64()) as u64
    }

    /// The Batch object as it is at `now`.
    fn object(&self, now: Instant) -> Value {
        let at = now.saturating_duration_since(self.created);
        let status = self.status(at);
        let (end_status, end) = self.end();
        let ended = |s: Status| (end_status == s && at >= end).then(|| self.unix(end));
        let schedule = &self.schedule;
        let phase = |phase: Duration| self.reached(phase, at).then(|| self.unix(phase));
        let progress = self.progress(at);
        let settled = self.settled.as_ref();
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": CHAT_ENDPOINT,
            "model": self.model,
            "errors": (status == Status::Failed).then(|| json!({
                "object": "list",
                "data": self.errors,
            })),
            "input_file_id": self.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": status.as_str(),
            "output_file_id": settled.and_then(|s| s.output_file_id.as_deref()),
            "error_file_id": settled.and_then(|s| s.error_file_id.as_deref()),
            "created_at": self.unix(Duration::ZERO),
            "in_progress_at": phase(schedule.in_progress),
            "expires_at": self.unix(schedule.window),
            "finalizing_at": phase(schedule.finalizing),
            "completed_at": ended(Status::Completed),
            "failed_at": ended(Status::Failed),
            "expired_at": ended(Status::Expired),
            "cancelling_at": self.cancel.map(|cancel| self.unix(cancel)),
            "cancelled_at": ended(Status::Cancelled),
            "request_counts": {
                "total": progress.total,
                "completed": progress.completed,
                "failed": progress.failed,
            },
            "usage": {
                "input_tokens": progress.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": progress.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": progress.prompt_tokens + progress.completion_tokens,
            },
            "metadata": self.metadata,
        })
    }

    /// The output and error files of an ended batch (empty ones are not written).
    fn results(&self, sim: &Sim, status: Status, end: Duration) -> (Vec<u8>, Vec<u8>) {
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        if status == Status::Failed {
            return (output, errors);
        }
        let done = self.done(end);
        let (code, message) = match status {
            Status::Expired => (
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
            _ => (
                "batch_cancelled",
                "This request was not executed because the batch was cancelled.",
            ),
        };
        for (index, line) in self.lines.iter().enumerate() {
            let id = sim.next_id();
            let response = |status_code: u16, body: Value| {
                json!({
                    "status_code": status_code,
                    "request_id": format!("req_sim{id:010}"),
                    "body": body,
                })
            };
            let (file, response, error) = match &line.outcome {
                _ if index >= done => (
                    &mut errors,
                    Value::Null,
                    json!({"code": code, "message": message}),
                ),
                Ok(offline) => {
                    let completion = Completion {
                        id: format!("chatcmpl-sim{id:010}"),
                        created: self.unix(self.done_at(index)),
                        model: offline.model.clone(),
                        prompt_tokens: offline.prompt_tokens,
                        completion_tokens: offline.answer.completion_tokens,
                        finish_reason: offline.finish_reason(),
                    };
                    let body = completion.object(&offline.answer.content);
                    (&mut output, response(200, body), Value::Null)
                }
                Err(error) => (
                    &mut errors,
                    response(error.status().as_u16(), error.body()),
                    Value::Null,
                ),
            };
            let record = json!({
                "id": format!("batch_req_sim{id:010}"),
                "custom_id": line.custom_id,
                "response": response,
                "error": error,
            });
            // Writing JSON to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *file, &record);
            file.push(b'\n');
        }
        (output, errors)
    }
}

impl Store {
    pub(crate) fn add_file(&mut self, file: StoredFile) {
        if file.purpose == Purpose::Batch {
            self.stats.files_uploaded += 1;
        }
        self.files.push(file);
    }

    /// A file of `owner`'s.
    pub(crate) fn file(&self, owner: &str, id: &str) -> Option<&StoredFile> {
        self.files
            .iter()
            .find(|file| file.id == id && file.owner == owner)
    }

    /// `owner`'s files, newest first.
    pub(crate) fn files<'a>(&'a self, owner: &'a str) -> impl Iterator<Item = &'a StoredFile> {
        self.files
            .iter()
            .rev()
            .filter(move |file| file.owner == owner)
    }

    pub(crate) fn remove_file(&mut self, owner: &str, id: &str) -> bool {
        let before = self.files.len();
        self.files
            .retain(|file| !(file.id == id && file.owner == owner));
        self.files.len() < before
    }

    fn batch(&self, owner: &str, id: &str) -> Option<&Batch> {
        self.batches
            .iter()
            .find(|batch| batch.id == id && batch.owner == owner)
    }

    /// Brings every batch up to `now`: those whose end has come write their files and are
    /// counted.
    pub(crate) fn advance(&mut self, sim: &Sim, now: Instant) {
        for batch in &mut self.batches {
            if batch.settled.is_some() {
                continue;
            }
            let (status, end) = batch.end();
            if now.saturating_duration_since(batch.created) < end {
                continue;
            }
            let (output, errors) = batch.results(sim, status, end);
            let created_at = batch.unix(end);
            let mut write = |content: Vec<u8>, kind: &str| {
                if content.is_empty() {
                    return None;
                }
                let id = format!("file-sim{:010}", sim.next_id());
                self.files.push(StoredFile {
                    id: id.clone(),
                    owner: batch.owner.clone(),
                    filename: format!("{}_{kind}.jsonl", batch.id),
                    purpose: Purpose::BatchOutput,
                    created_at,
                    content: Bytes::from(content),
                });
                Some(id)
            };
            batch.settled = Some(Settled {
                output_file_id: write(output, "output"),
                error_file_id: write(errors, "error"),
            });

            let progress = batch.progress(end);
            let stats = &mut self.stats;
            let counter = match status {
                Status::Completed => &mut stats.completed,
                Status::Failed => &mut stats.failed,
                Status::Expired => &mut stats.expired,
                _ => &mut stats.cancelled,
            };
            *counter += 1;
            let unfinished = (progress.total - progress.completed - progress.failed) as u64;
            match status {
                Status::Expired => stats.requests_expired += unfinished,
                Status::Cancelled => stats.requests_cancelled += unfinished,
                _ => {}
            }
            stats.requests_completed += progress.completed as u64;
            stats.requests_failed += progress.failed as u64;
            stats.prompt_tokens += progress.prompt_tokens;
            stats.completion_tokens += progress.completion_tokens;
            tracing::debug!(batch = %batch.id, status = status.as_str(), "batch ended");
        }
    }

    /// Tokens that `owner`'s unfinished batches hold of `model`'s queue (as of the last
    /// [`Store::advance`]).
    fn enqueued(&self, owner: &str, model: &str) -> u64 {
        self.batches
            .iter()
            .filter(|batch| batch.owner == owner && batch.model.as_deref() == Some(model))
            .filter(|batch| batch.errors.is_none() && batch.settled.is_none())
            .map(|batch| batch.tokens)
            .sum()
    }

    /// The counters, with the tokens enqueued now (call [`Store::advance`] first).
    pub(crate) fn stats(&self) -> BatchStats {
        let enqueued_tokens = self
            .batches
            .iter()
            .filter(|batch| batch.errors.is_none() && batch.settled.is_none())
            .map(|batch| batch.tokens)
            .sum();
        BatchStats {
            enqueued_tokens,
            ..self.stats.clone()
        }
    }

    /// Adds a batch of `owner`'s, deciding whether it fails validation and which of its
    /// requests fail (see the module doc); returns its id.
    fn create(&mut self, sim: &Sim, owner: String, request: CreateBatch, plan: Plan) -> String {
        let config = sim.config();
        let rank = self.created;
        self.created += 1;
        self.stats.created += 1;

        let Plan {
            mut lines,
            tokens,
            model,
            mismatch,
        } = plan;
        let mut errors = mismatch.map(|error| vec![error]);
        if let (None, Some(model)) = (&errors, &model) {
            let limit = config.batch_queue_limit(model);
            let enqueued = self.enqueued(&owner, model);
            if limit > 0 && enqueued.saturating_add(tokens) > limit {
                errors = Some(vec![json!({
                    "code": "token_limit_exceeded",
                    "message": format!(
                        "Enqueued token limit reached for {model} in organization org-sim. Limit: {} enqueued tokens. Please try again once some in_progress batches have been completed.",
                        thousands(limit)
                    ),
                    "param": null,
                    "line": null,
                })]);
            }
        }
        if errors.is_none() {
            // One draw per line whatever its body, so that a line's fate depends only on the
            // seed, the batch's rank and its position.
            let mut rng =
                StdRng::seed_from_u64(config.seed ^ (rank + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for line in &mut lines {
                let draw: f64 = rng.random();
                if let Ok(offline) = &line.outcome {
                    let fail_first = offline
                        .fail_first
                        .as_ref()
                        .is_some_and(|(n, hash)| sim.fail_first(hash, *n));
                    if offline.fail || fail_first || draw < config.batch_line_error_rate {
                        line.outcome = Err(ApiError::Server);
                    }
                }
            }
        }

        let id = format!("batch_sim{:010}", sim.next_id());
        tracing::debug!(batch = %id, lines = lines.len(), tokens, failed = errors.is_some(), "batch created");
        self.batches.push(Batch {
            id: id.clone(),
            owner,
            input_file_id: request.input_file_id,
            metadata: request.metadata,
            model,
            created: Instant::now(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            lines,
            tokens,
            schedule: Schedule::new(config),
            errors,
            cancel: None,
            settled: None,
        });
        id
    }
}

/// `2000000` as `2,000,000`, the way OpenAI writes limits in messages.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A batch's requests, read and decided before the store is locked.
#[derive(Debug)]
struct Plan {
    lines: Vec<Line>,
    tokens: u64,
    model: Option<String>,
    /// The error of a second model in the same file.
    mismatch: Option<Value>,
}

/// Reads the input file and decides what each request gets by the live endpoint's rules.
fn plan(sim: &Sim, key: &str, content: &[u8]) -> Result<Plan, ApiError> {
    let mut plan = Plan {
        lines: Vec::new(),
        tokens: 0,
        model: None,
        mismatch: None,
    };
    files::read_input(content, |line| {
        let body = serde_json::to_vec(&line.body).unwrap_or_default();
        let outcome = prepare_offline(&body, key, sim.config());
        if let Ok(offline) = &outcome {
            plan.tokens = plan.tokens.saturating_add(offline.queue_tokens());
            match &plan.model {
                None => plan.model = Some(offline.model.clone()),
                Some(model) if *model != offline.model && plan.mismatch.is_none() => {
                    plan.mismatch = Some(json!({
                        "code": "model_mismatch",
                        "message": format!(
                            "Line {}: model '{}' differs from '{model}' of the lines before; a batch may use one model only.",
                            line.number, offline.model
                        ),
                        "param": "body.model",
                        "line": line.number,
                    }));
                }
                Some(_) => {}
            }
        }
        plan.lines.push(Line {
            custom_id: line.custom_id,
            outcome,
        });
    })?;
    Ok(plan)
}

/// The body of `POST /v1/batches`.
#[derive(Debug, Deserialize)]
struct CreateBody {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

/// A checked `POST /v1/batches`.
#[derive(Debug)]
struct CreateBatch {
    input_file_id: String,
    metadata: Option<Map<String, Value>>,
}

fn read_create(body: &[u8]) -> Result<CreateBatch, ApiError> {
    let body: CreateBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let required = |value: Option<String>, param: &'static str| {
        value.ok_or_else(|| {
            ApiError::invalid(
                param,
                Some("missing_required_parameter"),
                format!("Missing required parameter: '{param}'."),
            )
        })
    };
    let input_file_id = required(body.input_file_id, "input_file_id")?;
    let endpoint = required(body.endpoint, "endpoint")?;
    let window = required(body.completion_window, "completion_window")?;
    if endpoint != CHAT_ENDPOINT {
        return Err(ApiError::invalid(
            "endpoint",
            Some("invalid_value"),
            format!(
                "Invalid value for 'endpoint': {endpoint:?}. The simulator runs batches for '{CHAT_ENDPOINT}' only."
            ),
        ));
    }
    if window != COMPLETION_WINDOW {
        return Err(ApiError::invalid(
            "completion_window",
            Some("invalid_value"),
            format!(
                "Invalid value for 'completion_window': {window:?}. Supported values are: '{COMPLETION_WINDOW}'."
            ),
        ));
    }
    if let Some(metadata) = &body.metadata {
        let bad = metadata.len() > 16
            || metadata.iter().any(|(key, value)| {
                key.chars().count() > 64
                    || value
                        .as_str()
                        .is_none_or(|value| value.chars().count() > 512)
            });
        if bad {
            return Err(ApiError::invalid(
                "metadata",
                Some("invalid_value"),
                "Invalid 'metadata': at most 16 pairs, keys of at most 64 characters, string values of at most 512.",
            ));
        }
    }
    Ok(CreateBatch {
        input_file_id,
        metadata: body.metadata,
    })
}

/// `POST /v1/batches`: answers 200 with the batch in `validating`, even when it will fail.
async fn create(State(sim): State<Sim>, ApiKey(key): ApiKey, body: Bytes) -> Response {
    let request = match read_create(&body) {
        Ok(request) => request,
        Err(error) => return server::error_response(&error),
    };
    let content = {
        let mut store = sim.batches();
        store.advance(&sim, Instant::now());
        match store.file(&key, &request.input_file_id) {
            None => {
                return server::error_response(&ApiError::no_such(
                    "input_file_id",
                    format!("No such File object: {}", request.input_file_id),
                ));
            }
            Some(file) if file.purpose != Purpose::Batch => {
                return server::error_response(&ApiError::invalid(
                    "input_file_id",
                    Some("invalid_value"),
                    format!(
                        "File {} has purpose '{}'; a batch needs a file uploaded with purpose 'batch'.",
                        file.id,
                        file.purpose.as_str()
                    ),
                ));
            }
            Some(file) => file.content.clone(),
        }
    };
    // Answering up to 50,000 requests is blocking work.
    let planned = {
        let (sim, key) = (sim.clone(), key.clone());
        tokio::task::spawn_blocking(move || plan(&sim, &key, &content)).await
    };
    let plan = match planned {
        Ok(Ok(plan)) => plan,
        Ok(Err(error)) => return server::error_response(&error),
        Err(_) => return server::error_response(&ApiError::Server),
    };
    let mut store = sim.batches();
    store.advance(&sim, Instant::now());
    let id = store.create(&sim, key, request, plan);
    // At a time scale of 0 the batch is over as soon as it exists.
    let now = Instant::now();
    store.advance(&sim, now);
    match store.batches.iter().find(|batch| batch.id == id) {
        Some(batch) => Json(batch.object(now)).into_response(),
        None => server::error_response(&ApiError::Server),
    }
}

/// `GET /v1/batches/{batch_id}`.
async fn retrieve(State(sim): State<Sim>, ApiKey(key): ApiKey, Path(id): Path<String>) -> Response {
    let now = Instant::now();
    let mut store = sim.batches();
    store.advance(&sim, now);
    match store.batch(&key, &id) {
        Some(batch) => Json(batch.object(now)).into_response(),
        None => server::error_response(&no_such_batch(&id)),
    }
}

/// `POST /v1/batches/{batch_id}/cancel`: stops a running batch; a cancelling or cancelled one
/// is returned as it is, an ended one is a 409.
async fn cancel(State(sim): State<Sim>, ApiKey(key): ApiKey, Path(id): Path<String>) -> Response {
    let now = Instant::now();
    let mut store = sim.batches();
    store.advance(&sim, now);
    let Some(batch) = store
        .batches
        .iter_mut()
        .find(|batch| batch.id == id && batch.owner == key)
    else {
        return server::error_response(&no_such_batch(&id));
    };
    let at = now.saturating_duration_since(batch.created);
    match batch.status(at) {
        Status::Validating | Status::InProgress | Status::Finalizing => batch.cancel = Some(at),
        Status::Cancelling | Status::Cancelled => {}
        ended => {
            return server::error_response(&ApiError::Rejected {
                status: StatusCode::CONFLICT,
                message: format!("Cannot cancel a batch with status '{}'.", ended.as_str()),
                param: None,
                code: None,
            });
        }
    }
    // With no cancel delay (time scale 0) it is cancelled at once.
    store.advance(&sim, now);
    match store.batch(&key, &id) {
        Some(batch) => Json(batch.object(now)).into_response(),
        None => server::error_response(&no_such_batch(&id)),
    }
}

fn no_such_batch(id: &str) -> ApiError {
    ApiError::no_such("batch_id", format!("No batch found with id '{id}'."))
}

/// The paging query of a list: `limit` and `after` (an id; the page starts after it).
#[derive(Debug, Deserialize)]
pub(crate) struct Listing {
    // Read as text: a number inside a flattened query does not deserialize.
    limit: Option<String>,
    pub(crate) after: Option<String>,
}

impl Listing {
    /// The page size: `limit`, from 1 to `max`; `default` when absent.
    pub(crate) fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        let Some(limit) = &self.limit else {
            return Ok(default);
        };
        let invalid = |code, message: String| ApiError::invalid("limit", Some(code), message);
        let limit: i64 = limit.parse().map_err(|_| {
            invalid(
                "invalid_type",
                format!("Invalid 'limit': expected an integer, but got {limit:?} instead."),
            )
        })?;
        if limit < 1 {
            return Err(invalid(
                "integer_below_min_value",
                format!(
                    "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got {limit} instead."
                ),
            ));
        }
        if limit > max as i64 {
            return Err(invalid(
                "integer_above_max_value",
                format!(
                    "Invalid 'limit': integer above maximum value. Expected a value <= {max}, but got {limit} instead."
                ),
            ));
        }
        Ok(limit as usize)
    }
}

/// One page of a list, newest first: at most `limit` items after the one with id `after`
/// (nothing when there is no such item), and whether more follow.
pub(crate) fn page<'a, T>(
    items: impl Iterator<Item = (&'a str, T)>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<T>, bool) {
    let mut items = items.peekable();
    if let Some(after) = after {
        while items.next_if(|(id, _)| *id != after).is_some() {}
        items.next();
    }
    let page: Vec<T> = items.by_ref().take(limit).map(|(_, item)| item).collect();
    (page, items.peek().is_some())
}

/// OpenAI's list object around a page of objects.
pub(crate) fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    let first_id = data.first().map(|object| object["id"].clone());
    let last_id = data.last().map(|object| object["id"].clone());
    json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })
}

/// `GET /v1/batches?limit=&after=`: the key's batches, newest first.
async fn list(
    State(sim): State<Sim>,
    ApiKey(key): ApiKey,
    query: Result<Query<Listing>, QueryRejection>,
) -> Response {
    let listing = match query {
        Ok(Query(listing)) => listing,
        Err(e) => {
            return server::error_response(&ApiError::invalid("query", None, e.body_text()));
        }
    };
    let limit = match listing.limit(20, 100) {
        Ok(limit) => limit,
        Err(error) => return server::error_response(&error),
    };
    let now = Instant::now();
    let mut store = sim.batches();
    store.advance(&sim, now);
    let batches = store
        .batches
        .iter()
        .rev()
        .filter(|batch| batch.owner == key)
        .map(|batch| (batch.id.as_str(), batch));
    let (batches, has_more) = page(batches, listing.after.as_deref(), limit);
    let data = batches.iter().map(|batch| batch.object(now)).collect();
    Json(list_object(data, has_more)).into_response()
}
