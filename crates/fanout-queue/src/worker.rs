//! The worker runtime: claim loop, per-job tasks, heartbeats, batched acks, graceful drain.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Reconnect;
use crate::error::{Error, Result};
use crate::job::{ConsumerId, Delivery, Lane, RetryOutcome};
use crate::queue::Queue;
use crate::registry::{WorkerInfo, beat_every};

/// Runs one job. Called on its own tokio task; may take as long as it needs (heartbeats keep
/// the job claimed) up to `WorkerOptions::job_timeout`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, d: Delivery) -> impl Future<Output = Outcome> + Send;

    /// The queue dead-lettered a job of `lane`: its attempts ran out, it failed fatally, it
    /// kept killing its worker (then no handler ever settled it), or its entry could not be
    /// decoded (then `payload` is `null`). The place to record the failure where users look;
    /// called once by the process that moved the job, so a crash can skip it: what it records
    /// must also be found by other means (the dead-letter stream keeps the reason).
    fn dead_lettered(
        &self,
        lane: Lane,
        payload: serde_json::Value,
        reason: String,
    ) -> impl Future<Output = ()> + Send {
        let _ = (lane, payload, reason);
        async {}
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acked and deleted.
    Done,
    /// Retried after backoff (never sooner than `retry_after`) until `max_attempts`, then
    /// dead-lettered with `error`.
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Dead-lettered at once with `error` as the reason.
    Fatal { error: String },
    /// Handed back without counting an attempt, ready again after `delay`.
    Release { delay: Duration },
}

/// Options of [`run_worker`].
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs in flight at once (claims never exceed the free slots).
    pub concurrency: usize,
    /// On shutdown, in-flight jobs get this long to finish; the rest stay pending and are
    /// reclaimed by other workers after the visibility timeout.
    pub grace: Duration,
    /// A handler running longer is stopped and the job retried.
    pub job_timeout: Duration,
    /// Consumer names are `<prefix>-<host>-<pid>-<random>`.
    pub consumer_prefix: String,
    /// Longest single blocking wait for new work (default: `queue.claim_block_ms`).
    pub claim_block: Option<Duration>,
    /// Heartbeat period (default: a third of `queue.visibility_timeout_secs`).
    pub heartbeat_every: Option<Duration>,
    /// The process counts as gone this long after its last liveness beat (it beats three
    /// times per TTL); its jobs then run again elsewhere at once. At least 300 ms, at most
    /// half the visibility timeout.
    pub liveness_ttl: Duration,
    /// Shown in the worker registry.
    pub version: String,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 10,
            grace: Duration::from_secs(30),
            job_timeout: Duration::from_secs(300),
            consumer_prefix: "fanout".into(),
            claim_block: None,
            heartbeat_every: None,
            liveness_ttl: Duration::from_secs(3),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

impl WorkerOptions {
    /// From the `[worker]` section.
    pub fn from_config(worker: &fanout_core::config::WorkerConfig) -> Self {
        Self {
            concurrency: worker.concurrency.max(1),
            grace: Duration::from_secs(worker.grace_secs),
            job_timeout: Duration::from_secs(worker.job_timeout_secs),
            liveness_ttl: Duration::from_millis(worker.liveness_ttl_ms),
            ..Self::default()
        }
    }
}

/// Acks are retried this many times before the job is left to be reclaimed and run again.
const SETTLE_TRIES: u32 = 8;

/// Run jobs from `queue` with `handler` until `shutdown` is cancelled, then drain.
///
/// Never returns because of Redis: errors are logged and retried with capped, jittered backoff;
/// connections come back through the pool; a missing consumer group is recreated by the claim
/// script. Returns `Err` only for options that cannot work.
pub async fn run_worker<H: Handler>(
    queue: Queue,
    handler: Arc<H>,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    if options.concurrency == 0 {
        return Err(Error::Options("concurrency must be at least 1".into()));
    }
    if options.job_timeout.is_zero() {
        return Err(Error::Options("job_timeout must be above 0".into()));
    }
    let visibility = Duration::from_secs(queue.config().visibility_timeout_secs);
    let heartbeat_every = options
        .heartbeat_every
        .unwrap_or(visibility / 3)
        .max(Duration::from_millis(50));
    // A TTL beyond the visibility timeout would be moot: reclaim happens then anyway.
    let mut options = options;
    options.liveness_ttl = options
        .liveness_ttl
        .min(visibility / 2)
        .max(Duration::from_millis(300));
    if heartbeat_every >= visibility {
        return Err(Error::Options(format!(
            "heartbeat_every ({heartbeat_every:?}) must be shorter than the visibility timeout ({visibility:?})"
        )));
    }
    let consumer = ConsumerId::unique(&options.consumer_prefix);
    let shared = Arc::new(Shared {
        queue,
        consumer,
        started_at_ms: now_ms(),
        inflight: Mutex::new(HashMap::new()),
        options,
    });
    tracing::info!(
        consumer = %shared.consumer,
        concurrency = shared.options.concurrency,
        "worker started"
    );

    let stop_background = CancellationToken::new();
    let registry = tokio::spawn(
        liveness_loop(shared.clone(), stop_background.clone())
            .instrument(tracing::info_span!("liveness", consumer = %shared.consumer)),
    );
    let heartbeat = tokio::spawn(
        heartbeat_loop(shared.clone(), heartbeat_every, stop_background.clone())
            .instrument(tracing::info_span!("heartbeat", consumer = %shared.consumer)),
    );
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(
        ack_loop(shared.clone(), ack_rx)
            .instrument(tracing::info_span!("acker", consumer = %shared.consumer)),
    );

    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    claim_loop(&shared, &handler, &tracker, &ack_tx, &abort, &shutdown).await;

    // Drain: no more claims; in-flight jobs get `grace`, then they are stopped and left pending.
    tracker.close();
    let in_flight = tracker.len();
    tracing::info!(in_flight, grace = ?shared.options.grace, "worker draining");
    if tokio::time::timeout(shared.options.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "grace period over; leaving jobs to be reclaimed"
        );
        abort.cancel();
        tracker.wait().await;
    }
    drop(ack_tx);
    if let Err(e) = acker.await {
        tracing::error!(error = %e, "acker task failed");
    }
    stop_background.cancel();
    if let Err(e) = heartbeat.await {
        tracing::error!(error = %e, "heartbeat task failed");
    }
    if let Err(e) = registry.await {
        tracing::error!(error = %e, "liveness task failed");
    }
    // Gone now: whatever the grace period left unfinished runs elsewhere at once.
    if let Err(e) = shared.queue.leave(&shared.info()).await {
        tracing::warn!(error = %e, "could not leave the worker registry; it lapses by itself");
    }
    tracing::info!(consumer = %shared.consumer, "worker stopped");
    Ok(())
}

struct Shared {
    queue: Queue,
    consumer: ConsumerId,
    started_at_ms: u64,
    /// Jobs this process holds, by stream entry; what the heartbeat extends.
    inflight: Mutex<HashMap<(String, String), InFlight>>,
    options: WorkerOptions,
}

struct InFlight {
    /// The delivery without its payload (all the heartbeat needs).
    beat: Delivery,
    lost: bool,
}

fn entry_key(d: &Delivery) -> (String, String) {
    (d.stream().to_owned(), d.entry_id().to_owned())
}

impl Shared {
    /// What the registry shows about this process.
    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            id: self.consumer.as_str().to_owned(),
            host: crate::job::hostname(),
            pid: std::process::id(),
            version: self.options.version.clone(),
            started_at_ms: self.started_at_ms,
            concurrency: self.options.concurrency,
            in_flight: self.inflight.lock().unwrap().len(),
            ttl_ms: self.options.liveness_ttl.as_millis() as u64,
            last_seen_ms: 0,
        }
    }

    fn forget(&self, d: &Delivery) {
        self.inflight.lock().unwrap().remove(&entry_key(d));
    }
}

async fn claim_loop<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    tracker: &TaskTracker,
    ack_tx: &mpsc::UnboundedSender<(Delivery, OwnedSemaphorePermit)>,
    abort: &CancellationToken,
    shutdown: &CancellationToken,
) {
    let queue = &shared.queue;
    let block = shared
        .options
        .claim_block
        .unwrap_or(Duration::from_millis(queue.config().claim_block_ms))
        .max(Duration::from_millis(1));
    let slots = Arc::new(Semaphore::new(shared.options.concurrency));
    let mut waiter = None;
    let mut backoff = Reconnect::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut force_promote = false;
    loop {
        let mut permits = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
        };
        let free = slots.available_permits();
        if free > 0
            && let Ok(more) = slots.clone().try_acquire_many_owned(free as u32)
        {
            permits.merge(more);
        }
        // Not raced against shutdown: a claim interrupted after Redis ran it would strand its
        // jobs until they are reclaimed. It is short (bounded by the response timeout).
        let claimed = queue
            .claim_once(&shared.consumer, permits.num_permits(), true, force_promote)
            .await;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                drop(permits);
                if !pause_after_error(&mut backoff, &e, "claim failed", shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        force_promote = false;
        for (lane, payload, reason) in claimed.dead {
            let handler = handler.clone();
            tracker.spawn(async move { handler.dead_lettered(lane, payload, reason).await });
        }
        if !claimed.deliveries.is_empty() {
            for d in claimed.deliveries {
                {
                    let mut held = shared.inflight.lock().unwrap();
                    let key = entry_key(&d);
                    if held.contains_key(&key) {
                        // Our own job came back through a reclaim (a heartbeat was late): it is
                        // still running here, so do not start it twice.
                        continue;
                    }
                    let beat = Delivery {
                        payload: serde_json::Value::Null,
                        ..d.clone()
                    };
                    held.insert(key, InFlight { beat, lost: false });
                }
                let permit = permits
                    .split(1)
                    .expect("the claim returned no more jobs than free slots");
                let span = tracing::info_span!(
                    "job",
                    job = %d.job_id,
                    lane = %d.lane,
                    attempt = d.attempt,
                    deliveries = d.deliveries
                );
                tracker.spawn(
                    run_job(
                        shared.clone(),
                        handler.clone(),
                        d,
                        permit,
                        ack_tx.clone(),
                        abort.clone(),
                    )
                    .instrument(span),
                );
            }
            continue;
        }
        drop(permits);
        let Some(block_on) = claimed.block else {
            continue;
        };
        let timeout = queue.block_timeout(block);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = queue.wait_for_work(&mut waiter, &block_on, timeout) => match r {
                Ok(recheck_delayed) => force_promote = recheck_delayed,
                Err(e) => {
                    if !pause_after_error(&mut backoff, &e, "waiting for work failed", shutdown).await {
                        break;
                    }
                }
            },
        }
    }
}

/// Log and sleep a backoff step; `false` if shutdown came first.
async fn pause_after_error(
    backoff: &mut Reconnect,
    e: &Error,
    what: &'static str,
    shutdown: &CancellationToken,
) -> bool {
    let delay = backoff.next_delay();
    tracing::warn!(error = %e, failures = backoff.failures(), retry_in = ?delay, "{what}, will retry");
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

async fn run_job<H: Handler>(
    shared: Arc<Shared>,
    handler: Arc<H>,
    d: Delivery,
    permit: OwnedSemaphorePermit,
    ack_tx: mpsc::UnboundedSender<(Delivery, OwnedSemaphorePermit)>,
    abort: CancellationToken,
) {
    let job_timeout = shared.options.job_timeout;
    let input = d.clone();
    let on_dead = handler.clone();
    // The handler gets its own task: a panic is a failed job, and a handler that blocks its
    // thread does not stop this task's timeout or the heartbeat task.
    let mut task = tokio::spawn(
        async move { handler.handle(input).await }.instrument(tracing::Span::current()),
    );
    let outcome = tokio::select! {
        r = &mut task => outcome_of(r),
        _ = tokio::time::sleep(job_timeout) => {
            task.abort();
            // Wait until it really stopped, so a retry never runs beside it.
            tokio::select! {
                _ = &mut task => {}
                _ = abort.cancelled() => {
                    shared.forget(&d);
                    return;
                }
            }
            Outcome::Retry {
                error: format!("job timed out after {}s", job_timeout.as_secs_f64()),
                retry_after: None,
            }
        }
        _ = abort.cancelled() => {
            task.abort();
            shared.forget(&d);
            return;
        }
    };
    match outcome {
        Outcome::Done => {
            tracing::debug!("job done");
            // The acker acks in batches, then frees the slot and stops the heartbeat.
            if let Err(mpsc::error::SendError((d, _permit))) = ack_tx.send((d, permit)) {
                shared.forget(&d);
            }
        }
        other => {
            if let Some(reason) = settle(&shared, &d, other).await {
                on_dead
                    .dead_lettered(d.lane, d.payload.clone(), reason)
                    .await;
            }
            shared.forget(&d);
            drop(permit);
        }
    }
}

fn outcome_of(r: std::result::Result<Outcome, JoinError>) -> Outcome {
    match r {
        Ok(o) => o,
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Outcome::Retry {
                error: format!("handler panicked: {msg}"),
                retry_after: None,
            }
        }
        Err(e) => Outcome::Retry {
            error: format!("handler task ended: {e}"),
            retry_after: None,
        },
    }
}

/// Settle a finished job; returns the reason when it was dead-lettered.
async fn settle(shared: &Shared, d: &Delivery, outcome: Outcome) -> Option<String> {
    let queue = &shared.queue;
    let mut backoff = Reconnect::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let mut dead = None;
        let result = match &outcome {
            Outcome::Done => queue.ack(d).await,
            Outcome::Retry { error, retry_after } => {
                queue
                    .retry(d, error, *retry_after)
                    .await
                    .map(|r| match r {
                        RetryOutcome::Scheduled { at } => {
                            let wait = at
                                .duration_since(std::time::SystemTime::now())
                                .unwrap_or_default();
                            tracing::info!(error = %error, retry_in = ?wait, "job failed, will retry");
                        }
                        RetryOutcome::DeadLettered => {
                            tracing::warn!(error = %error, "job failed, attempts exhausted, dead-lettered");
                            dead = Some(format!("attempts exhausted: {error}"));
                        }
                    })
            }
            Outcome::Fatal { error } => queue.dead_letter(d, error).await.map(|()| {
                tracing::warn!(error = %error, "job failed fatally, dead-lettered");
                dead = Some(error.clone());
            }),
            Outcome::Release { delay } => queue.release(d, *delay).await.map(|()| {
                tracing::info!(delay = ?delay, "job released");
            }),
        };
        match result {
            Ok(()) => return dead,
            Err(Error::Lost { .. }) => {
                tracing::warn!(
                    "job was reclaimed by another worker before it settled; leaving it to that worker"
                );
                return None;
            }
            Err(e) if backoff.failures() + 1 >= SETTLE_TRIES => {
                tracing::warn!(error = %e, "could not settle job; it will be reclaimed and run again");
                return None;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "settling job failed, will retry");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn ack_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(Delivery, OwnedSemaphorePermit)>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let (deliveries, permits): (Vec<Delivery>, Vec<OwnedSemaphorePermit>) =
            batch.drain(..).unzip();
        let mut backoff = Reconnect::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match shared.queue.ack_many(&deliveries).await {
                Ok(()) => break,
                Err(e) if backoff.failures() + 1 >= SETTLE_TRIES => {
                    tracing::warn!(error = %e, jobs = deliveries.len(), "could not ack jobs; they will be reclaimed and run again");
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "ack failed, will retry");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        {
            let mut held = shared.inflight.lock().unwrap();
            for d in &deliveries {
                held.remove(&entry_key(d));
            }
        }
        drop(permits);
    }
}

/// Beat in the worker registry three times per liveness TTL, until `stop`.
async fn liveness_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(beat_every(shared.options.liveness_ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.queue.beat(&shared.info()).await {
            Ok(0) => {}
            Ok(lapsed) => tracing::debug!(lapsed, "workers gone silent; their jobs are taken over"),
            Err(e) => tracing::warn!(error = %e, "liveness beat failed, will retry"),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn heartbeat_loop(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beats: Vec<Delivery> = shared
            .inflight
            .lock()
            .unwrap()
            .values()
            .filter(|f| !f.lost)
            .map(|f| f.beat.clone())
            .collect();
        if beats.is_empty() {
            continue;
        }
        match shared.queue.extend_many(&beats).await {
            Ok(flags) => {
                let mut held = shared.inflight.lock().unwrap();
                for (d, ok) in beats.iter().zip(flags) {
                    if !ok && let Some(f) = held.get_mut(&entry_key(d)) {
                        f.lost = true;
                        tracing::warn!(job = %d.job_id, "job no longer held by this worker (reclaimed or removed)");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = beats.len(), "heartbeat failed, will retry")
            }
        }
    }
}
