//! Measures the claims of docs/decisions.md ("Queue: apalis backend contract") against
//! apalis-core 1.0 itself: apalis's own `WorkerBuilder`, `Worker::run`/`run_until` and `Monitor`
//! over a minimal in-memory `Backend` (poll_ready/poll_next/poll_close as in the trait docs) that
//! can fail on demand, as a Redis connection reset would.
//!
//! ```text
//! cargo run -p fanout-queue --example apalis_contract
//! ```
//!
//! No Redis is involved. It measures and prints a table; it does not pass or fail. Runs on a
//! multi-thread tokio runtime with 2 worker threads and takes about 20 s.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::error::WorkerError;
use apalis_core::layers::Identity;
use apalis_core::monitor::Monitor;
use apalis_core::task::Task;
use apalis_core::task::task_id::RandomId;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::context::WorkerContext;

/// How long we wait for something apalis should have done before calling it "never".
const PATIENCE: Duration = Duration::from_secs(5);

// ---- a minimal in-memory backend that can fail like Redis ----

#[derive(Debug, thiserror::Error)]
#[error("connection reset by peer (simulated redis blip)")]
struct Blip;

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<u32>,
    waker: Option<Waker>,
    /// `poll_next` calls so far.
    polls: usize,
    /// The `poll_next` call (1-based) that starts an outage.
    fail_at_poll: Option<usize>,
    /// How long the outage lasts once started; zero means exactly one failed poll.
    outage: Duration,
    outage_until: Option<Instant>,
    /// `poll_next` calls answered with `Err`.
    errors: usize,
    /// `poll_close` calls (the backend's chance to flush acks and release leases on shutdown).
    closes: usize,
}

#[derive(Debug, Clone, Default)]
struct MemBackend(Arc<Mutex<State>>);

impl MemBackend {
    fn with_jobs(jobs: impl IntoIterator<Item = u32>) -> Self {
        let b = Self::default();
        b.state().queue.extend(jobs);
        b
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// Fail `poll_next` call number `at_poll`, and every call for `outage` after it.
    fn fail(&self, at_poll: usize, outage: Duration) {
        let mut s = self.state();
        s.fail_at_poll = Some(at_poll);
        s.outage = outage;
    }

    fn left(&self) -> usize {
        self.state().queue.len()
    }
}

impl Backend for MemBackend {
    type Task = Task<u32>;
    type Error = Blip;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Blip>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<u32>, Blip>>> {
        let mut s = self.state();
        s.polls += 1;
        if s.fail_at_poll == Some(s.polls) {
            s.outage_until = Some(Instant::now() + s.outage);
            s.errors += 1;
            return Poll::Ready(Some(Err(Blip)));
        }
        if s.outage_until.is_some_and(|t| Instant::now() < t) {
            s.errors += 1;
            return Poll::Ready(Some(Err(Blip)));
        }
        match s.queue.pop_front() {
            Some(job) => Poll::Ready(Some(Ok(Task::new(job)))),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn poll_close(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Blip>> {
        self.state().closes += 1;
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for MemBackend {
    type Args = u32;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;

    fn config(&self) -> &() {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}

// ---- what the handlers did ----

#[derive(Debug, Default)]
struct Counts {
    started: AtomicUsize,
    finished: AtomicUsize,
    /// Handler futures dropped before they finished (cancelled mid-job).
    dropped: AtomicUsize,
}

#[derive(Debug, Clone, Default)]
struct Probe(Arc<Counts>);

impl Probe {
    fn started(&self) -> usize {
        self.0.started.load(Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.0.finished.load(Ordering::SeqCst)
    }
    fn dropped(&self) -> usize {
        self.0.dropped.load(Ordering::SeqCst)
    }
}

/// Counts a handler as dropped unless it reached the end.
#[derive(Debug)]
struct Running {
    probe: Probe,
    done: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        let c = &self.probe.0;
        if self.done {
            c.finished.fetch_add(1, Ordering::SeqCst);
        } else {
            c.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type JobFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An apalis task function (`FnMut(Args) -> Future`) that runs `body` and records the outcome.
fn handler<F, Fut>(
    probe: &Probe,
    body: F,
) -> impl FnMut(u32) -> JobFuture + Clone + Send + Sync + 'static
where
    F: Fn(u32) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let probe = probe.clone();
    move |job| {
        let (probe, body) = (probe.clone(), body.clone());
        Box::pin(async move {
            probe.0.started.fetch_add(1, Ordering::SeqCst);
            let mut running = Running { probe, done: false };
            body(job).await;
            running.done = true;
        })
    }
}

async fn eventually(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// A run future's result on one line ("still running" if it did not return in time).
fn outcome<E: std::fmt::Display>(
    res: Result<Result<(), E>, tokio::time::error::Elapsed>,
) -> String {
    match res {
        Ok(Ok(())) => "Ok(())".to_owned(),
        Ok(Err(e)) => format!(
            "Err({})",
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(_) => "still running".to_owned(),
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[derive(Debug)]
struct Row {
    claim: &'static str,
    setup: &'static str,
    observed: String,
}

// ---- claim 1: a backend error ends the worker ----

/// 10 jobs of 300 ms; the 4th `poll_next` returns one `Err`.
async fn blip_ends_worker_run() -> Row {
    let backend = MemBackend::with_jobs(0..10);
    backend.fail(4, Duration::ZERO);
    let probe = Probe::default();
    let worker = WorkerBuilder::new("blip")
        .backend(backend.clone())
        .build(handler(&probe, |_| {
            tokio::time::sleep(Duration::from_millis(300))
        }));
    let t = Instant::now();
    let res = tokio::time::timeout(PATIENCE, worker.run()).await;
    let ended = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let res = outcome(res);
    Row {
        claim: "1 backend error ends the worker",
        setup: "Worker::run, 1 Err from poll_next",
        observed: format!(
            "run() -> {res} after {}; {} in flight dropped unfinished, {} done, \
             {} left in backend, 1 s later: {} done",
            ms(ended),
            probe.dropped(),
            probe.started() - probe.dropped(),
            backend.left(),
            probe.finished()
        ),
    }
}

/// Same, under a `Monitor` with its default restart policy.
async fn blip_ends_monitor() -> Row {
    let backend = MemBackend::with_jobs(0..10);
    backend.fail(4, Duration::ZERO);
    let probe = Probe::default();
    let h = handler(&probe, |_| tokio::time::sleep(Duration::from_millis(300)));
    let b = backend.clone();
    let monitor = Monitor::new().register(move |_| {
        WorkerBuilder::new("blip-monitored")
            .backend(b.clone())
            .build(h.clone())
    });
    let t = Instant::now();
    let res = tokio::time::timeout(PATIENCE, monitor.run()).await;
    let res = outcome(res);
    Row {
        claim: "1 backend error ends the worker",
        setup: "Monitor::run, default policy",
        observed: format!(
            "run() -> {res} after {}; {} dropped unfinished, {} left in backend",
            ms(t.elapsed()),
            probe.dropped(),
            backend.left()
        ),
    }
}

/// `Monitor::should_restart(|_, _| true)` through a 300 ms outage starting at the 4th poll.
async fn outage_with_restarts() -> Row {
    let backend = MemBackend::with_jobs(0..10);
    backend.fail(4, Duration::from_millis(300));
    let probe = Probe::default();
    let h = handler(&probe, |_| tokio::time::sleep(Duration::from_millis(300)));
    let b = backend.clone();
    let builds = Arc::new(AtomicUsize::new(0));
    let builds_in = builds.clone();
    let monitor = Monitor::new()
        .should_restart(|_, _| true)
        .register(move |_| {
            builds_in.fetch_add(1, Ordering::SeqCst);
            WorkerBuilder::new("restarting")
                .backend(b.clone())
                .build(h.clone())
        });
    let p = probe.clone();
    let signal = async move {
        eventually(Duration::from_secs(10), || p.finished() + p.dropped() == 10).await;
        Ok(())
    };
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(15), monitor.run_with_signal(signal)).await;
    let errors = backend.state().errors;
    Row {
        claim: "1 (restart policy)",
        setup: "Monitor::should_restart(true), 300 ms outage",
        observed: format!(
            "{} restarts for {errors} failed polls in the 300 ms (no backoff); {} jobs dropped \
             mid-run (never re-run here; Redis would reclaim them), the other {} done; \
             monitor {} after {}",
            builds.load(Ordering::SeqCst) - 1,
            probe.dropped(),
            probe.finished(),
            if res.is_ok() {
                "returned"
            } else {
                "still running"
            },
            ms(t.elapsed())
        ),
    }
}

// ---- claim 2: shutdown has no grace bound when a handler hangs ----

fn hanging(probe: &Probe) -> impl FnMut(u32) -> JobFuture + Clone + Send + Sync + 'static {
    handler(probe, |_| std::future::pending::<()>())
}

async fn hang_worker_run_until() -> Row {
    let probe = Probe::default();
    let worker = WorkerBuilder::new("hang")
        .backend(MemBackend::with_jobs([0]))
        .build(hanging(&probe));
    let p = probe.clone();
    let stop = async move {
        eventually(PATIENCE, || p.started() == 1).await;
        Ok::<(), WorkerError>(())
    };
    let res = tokio::time::timeout(PATIENCE, worker.run_until(stop)).await;
    Row {
        claim: "2 no grace bound on shutdown",
        setup: "Worker::run_until(stop), handler hangs",
        observed: match res {
            Ok(r) => format!("returned {r:?}"),
            Err(_) => format!("not returned {} s after the stop", PATIENCE.as_secs()),
        },
    }
}

async fn hang_monitor(timeout: Option<Duration>) -> Row {
    let probe = Probe::default();
    let backend = MemBackend::with_jobs([0]);
    let (b, h) = (backend.clone(), hanging(&probe));
    let mut monitor = Monitor::new().register(move |_| {
        WorkerBuilder::new("hang-monitored")
            .backend(b.clone())
            .build(h.clone())
    });
    if let Some(grace) = timeout {
        monitor = monitor.shutdown_timeout(grace);
    }
    let p = probe.clone();
    let signal = async move {
        eventually(PATIENCE, || p.started() == 1).await;
        Ok(())
    };
    let t = Instant::now();
    let res = tokio::time::timeout(PATIENCE, monitor.run_with_signal(signal)).await;
    let closes = backend.state().closes;
    Row {
        claim: "2 no grace bound on shutdown",
        setup: if timeout.is_some() {
            "Monitor + shutdown_timeout(2 s), hangs"
        } else {
            "Monitor::run_with_signal, handler hangs"
        },
        observed: match res {
            Ok(r) => format!(
                "returned {r:?} after {}; handler dropped: {}, backend poll_close calls: {closes}",
                ms(t.elapsed()),
                probe.dropped()
            ),
            Err(_) => format!("not returned {} s after the signal", PATIENCE.as_secs()),
        },
    }
}

/// Control: a 300 ms handler under the same shutdown drains and closes the backend.
async fn drain_control() -> Row {
    let probe = Probe::default();
    let backend = MemBackend::with_jobs([0]);
    let b = backend.clone();
    let h = handler(&probe, |_| tokio::time::sleep(Duration::from_millis(300)));
    let monitor = Monitor::new().register(move |_| {
        WorkerBuilder::new("drain")
            .backend(b.clone())
            .build(h.clone())
    });
    let p = probe.clone();
    let signal = async move {
        eventually(PATIENCE, || p.started() == 1).await;
        Ok(())
    };
    let t = Instant::now();
    let res = tokio::time::timeout(PATIENCE, monitor.run_with_signal(signal)).await;
    let closes = backend.state().closes;
    Row {
        claim: "2 (control)",
        setup: "Monitor::run_with_signal, 300 ms handler",
        observed: format!(
            "{} after {}; handler finished: {}, poll_close calls: {closes}",
            if res.is_ok() {
                "returned"
            } else {
                "still running"
            },
            ms(t.elapsed()),
            probe.finished()
        ),
    }
}

// ---- claim 3: a handler that blocks its thread stops the worker's other jobs ----

async fn blocking_handler() -> Row {
    let probe = Probe::default();
    let worker_gap = Arc::new(AtomicU64::new(0));
    let gap = worker_gap.clone();
    // Job 0 ticks every 50 ms for 2 s (a heartbeat driven from the worker's future);
    // job 1 blocks its thread for 1.5 s.
    let h = handler(&probe, move |job| {
        let gap = gap.clone();
        async move {
            if job == 0 {
                let mut last = Instant::now();
                for _ in 0..40 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let g = last.elapsed().as_millis() as u64;
                    gap.fetch_max(g, Ordering::SeqCst);
                    last = Instant::now();
                }
            } else {
                std::thread::sleep(Duration::from_millis(1500));
            }
        }
    });
    // The same ticker on its own tokio task (what `run_worker`'s heartbeat task is).
    let task_gap = Arc::new(AtomicU64::new(0));
    let tg = task_gap.clone();
    let ticker = tokio::spawn(async move {
        let mut last = Instant::now();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tg.fetch_max(last.elapsed().as_millis() as u64, Ordering::SeqCst);
            last = Instant::now();
        }
    });
    let worker = WorkerBuilder::new("blocking")
        .backend(MemBackend::with_jobs([0, 1]))
        .build(h);
    let p = probe.clone();
    let stop = async move {
        eventually(Duration::from_secs(10), || p.finished() == 2).await;
        Ok::<(), WorkerError>(())
    };
    let res = tokio::time::timeout(Duration::from_secs(10), worker.run_until(stop)).await;
    ticker.await.unwrap();
    Row {
        claim: "3 blocking handler stalls the worker",
        setup: "2 jobs, multi-thread rt (2 threads)",
        observed: format!(
            "50 ms ticker inside job 0: longest gap {} ms; same ticker on its own task: {} ms{}",
            worker_gap.load(Ordering::SeqCst),
            task_gap.load(Ordering::SeqCst),
            if res.is_ok() {
                ""
            } else {
                " (worker did not stop)"
            }
        ),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("apalis-core 1.0 worker contract, measured (in-memory backend, no Redis)\n");
    let mut rows = Vec::new();
    for row in [
        blip_ends_worker_run().await,
        blip_ends_monitor().await,
        outage_with_restarts().await,
        hang_worker_run_until().await,
        hang_monitor(None).await,
        hang_monitor(Some(Duration::from_secs(2))).await,
        drain_control().await,
        blocking_handler().await,
    ] {
        println!("- {} | {} | {}", row.claim, row.setup, row.observed);
        rows.push(row);
    }
    println!("\n| claim | setup | observed |\n| --- | --- | --- |");
    for r in &rows {
        println!("| {} | {} | {} |", r.claim, r.setup, r.observed);
    }
}
