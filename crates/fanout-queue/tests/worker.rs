//! `run_worker` against a real redis-server: retries, poison entries, heartbeats, killed worker
//! processes, Redis restarts, graceful drain.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{eventually, job, pool, redis_conn, setup};
use fanout_queue::{Delivery, Handler, Lane, Outcome, Queue, WorkerOptions, run_worker};
use redis::AsyncCommands;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type BoxFut = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A handler from a closure.
struct FnHandler<F>(F);

impl<F> Handler for FnHandler<F>
where
    F: Fn(Delivery) -> BoxFut + Send + Sync + 'static,
{
    fn handle(&self, d: Delivery) -> impl Future<Output = Outcome> + Send {
        (self.0)(d)
    }
}

fn handler<F>(f: F) -> Arc<FnHandler<F>>
where
    F: Fn(Delivery) -> BoxFut + Send + Sync + 'static,
{
    Arc::new(FnHandler(f))
}

fn options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        grace: Duration::from_secs(5),
        job_timeout: Duration::from_secs(30),
        consumer_prefix: "test".into(),
        ..WorkerOptions::default()
    }
}

fn start<H: Handler>(
    queue: &Queue,
    h: Arc<H>,
    opts: WorkerOptions,
) -> (CancellationToken, JoinHandle<fanout_queue::Result<()>>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_worker(queue.clone(), h, opts, stop.clone()));
    (stop, task)
}

/// The idempotent effect of a job: only the first completion of a job id counts.
async fn effect(conn: &mut fanout_core::redis::PooledConnection, ns: &str, job_id: &str) {
    let won: bool = redis::cmd("SET")
        .arg(format!("{ns}:done:{job_id}"))
        .arg(1)
        .arg("NX")
        .query_async::<Option<String>>(conn)
        .await
        .unwrap()
        .is_some();
    if won {
        let _: i64 = conn.incr(format!("{{{ns}}}:effects"), 1).await.unwrap();
    }
}

async fn get_u64(conn: &mut fanout_core::redis::Connection, key: &str) -> u64 {
    let v: Option<u64> = conn.get(key).await.unwrap();
    v.unwrap_or(0)
}

/// A handler that sleeps `work`, then applies the effect; counts starts in `runs:<id>`.
fn effect_handler(url: &str, ns: &str, work: Duration) -> Arc<impl Handler> {
    let pool = pool(url);
    let ns = ns.to_owned();
    handler(move |d: Delivery| -> BoxFut {
        let pool = pool.clone();
        let ns = ns.clone();
        Box::pin(async move {
            let Ok(mut conn) = pool.get().await else {
                return Outcome::Retry {
                    error: "no redis".into(),
                    retry_after: None,
                };
            };
            let _: Result<i64, _> = conn.incr(format!("{{{ns}}}:runs:{}", d.job_id), 1).await;
            tokio::time::sleep(work).await;
            effect(&mut conn, &ns, &d.job_id).await;
            Outcome::Done
        })
    })
}

#[tokio::test]
async fn worker_runs_jobs_retries_and_dead_letters() {
    let s = setup(&[("FANOUT_QUEUE__MAX_ATTEMPTS", "3")]);
    let q = &s.queue;
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    let h = handler(move |d: Delivery| -> BoxFut {
        let seen = seen.clone();
        Box::pin(async move {
            seen.fetch_add(1, Ordering::SeqCst);
            match d.job_id.as_str() {
                "ok" => Outcome::Done,
                "flaky" if d.attempt < 3 => Outcome::Retry {
                    error: format!("flaky {}", d.attempt),
                    retry_after: Some(Duration::from_millis(150)),
                },
                "flaky" => Outcome::Done,
                "fatal" => Outcome::Fatal {
                    error: "unknown template".into(),
                },
                "panics" => panic!("handler bug"),
                _ => Outcome::Retry {
                    error: "always".into(),
                    retry_after: None,
                },
            }
        })
    });
    let (stop, task) = start(q, h, options(4));
    q.enqueue_many(vec![
        job("ok"),
        job("flaky"),
        job("fatal"),
        job("doomed"),
        job("panics"),
    ])
    .await
    .unwrap();
    let done = eventually(Duration::from_secs(10), || async {
        let d = q.depth().await.unwrap();
        d[0].dead == 3 && d[0].pending == 0 && d[0].ready == 0 && d[0].delayed == 0
    })
    .await;
    assert!(done, "{:?}", q.depth().await.unwrap());
    // ok 1 + flaky 3 + fatal 1 + doomed 3 + panics 3
    assert_eq!(attempts.load(Ordering::SeqCst), 11);
    let dead = q.dead_letters(10).await.unwrap();
    let find = |id: &str| dead.iter().find(|d| d.job_id == id).unwrap();
    assert_eq!(find("fatal").reason, "unknown template");
    assert_eq!(find("fatal").attempts, 1);
    assert_eq!(
        (find("doomed").attempts, find("doomed").last_error.as_str()),
        (3, "always")
    );
    assert!(
        find("panics")
            .last_error
            .contains("handler panicked: handler bug")
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_poison_entry_is_dead_lettered_and_the_worker_keeps_working() {
    let s = setup(&[]);
    let q = &s.queue;
    let h = effect_handler(&s.redis.url(), &s.ns, Duration::ZERO);
    let (stop, task) = start(q, h, options(2));
    q.enqueue(job("before")).await.unwrap();
    let mut conn = redis_conn(&s.redis.url()).await;
    let stream = q.stream_key(Lane::Interactive, 0);
    let _: String = conn.xadd(&stream, "*", &[("junk", "x")]).await.unwrap();
    let _: String = conn
        .xadd(
            &stream,
            "*",
            &[("id", "p2"), ("p", "not json"), ("a", "1"), ("t", "0")],
        )
        .await
        .unwrap();
    q.enqueue_many(vec![job("after-1"), job("after-2")])
        .await
        .unwrap();
    let ok = eventually(Duration::from_secs(5), || {
        let mut conn = conn.clone();
        let key = format!("{{{}}}:effects", s.ns);
        async move { get_u64(&mut conn, &key).await == 3 }
    })
    .await;
    assert!(ok, "good jobs done around the poison entries");
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.reason.starts_with("decode error: ")));
    assert!(!task.is_finished());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_blocked_past_the_visibility_timeout_is_not_run_twice() {
    // visibility 1 s; the handler blocks its thread for 2.5 s.
    let s = setup(&[]);
    let q = &s.queue;
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let make = || {
        let (running, max_running, runs) = (running.clone(), max_running.clone(), runs.clone());
        handler(move |_d: Delivery| -> BoxFut {
            let (running, max_running, runs) = (running.clone(), max_running.clone(), runs.clone());
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2500));
                running.fetch_sub(1, Ordering::SeqCst);
                Outcome::Done
            })
        })
    };
    // Two workers on the same queue: the idle one would reclaim the job if heartbeats stopped.
    let (stop_a, task_a) = start(q, make(), options(2));
    let q2 = Queue::new(pool(&s.redis.url()), &s.ns, s.config.queue.clone());
    let (stop_b, task_b) = start(&q2, make(), options(2));
    q.enqueue(job("slow")).await.unwrap();
    let done = eventually(Duration::from_secs(8), || async {
        let d = q.depth().await.unwrap();
        runs.load(Ordering::SeqCst) >= 1 && d[0].pending == 0 && d[0].ready == 0
    })
    .await;
    assert!(done);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran once");
    assert_eq!(max_running.load(Ordering::SeqCst), 1, "never concurrently");
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_idle_worker_starts_a_new_job_within_milliseconds() {
    // A long block: a polling worker would take up to seconds; XREAD BLOCK wakes at once.
    let s = setup(&[
        ("FANOUT_QUEUE__CLAIM_BLOCK_MS", "5000"),
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "30"),
    ]);
    let q = &s.queue;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let h = handler(move |_d: Delivery| -> BoxFut {
        let _ = tx.send(Instant::now());
        Box::pin(async { Outcome::Done })
    });
    let (stop, task) = start(q, h, options(2));
    q.enqueue(job("warm")).await.unwrap();
    rx.recv().await.unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        q.enqueue(job(&format!("j{i}")).lane(Lane::Batch).priority(i))
            .await
            .unwrap();
        let started = rx.recv().await.unwrap();
        worst = worst.max(started - t);
    }
    assert!(
        worst < Duration::from_millis(1000),
        "worst enqueue-to-start {worst:?}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn graceful_drain_finishes_in_flight_jobs() {
    let s = setup(&[]);
    let q = &s.queue;
    let h = effect_handler(&s.redis.url(), &s.ns, Duration::from_millis(400));
    let (stop, task) = start(q, h, options(3));
    q.enqueue_many(vec![job("a"), job("b"), job("c")])
        .await
        .unwrap();
    let mut conn = redis_conn(&s.redis.url()).await;
    let runs = |conn: &fanout_core::redis::Connection| {
        let mut conn = conn.clone();
        let ns = s.ns.clone();
        async move {
            let mut n = 0;
            for id in ["a", "b", "c"] {
                n += get_u64(&mut conn, &format!("{{{ns}}}:runs:{id}")).await;
            }
            n
        }
    };
    assert!(eventually(Duration::from_secs(5), || async { runs(&conn).await == 3 }).await);
    stop.cancel();
    // Jobs enqueued during the drain are not claimed.
    q.enqueue(job("late")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("drained within the grace")
        .unwrap()
        .unwrap();
    assert_eq!(
        get_u64(&mut conn, &format!("{{{}}}:effects", s.ns)).await,
        3
    );
    let d = q.depth().await.unwrap();
    assert_eq!(
        (d[0].pending, d[0].ready),
        (0, 1),
        "in-flight acked, the late job waits"
    );
}

#[tokio::test]
async fn after_the_grace_unfinished_jobs_stay_pending_for_reclaim() {
    let s = setup(&[]);
    let q = &s.queue;
    let h = effect_handler(&s.redis.url(), &s.ns, Duration::from_secs(30));
    let opts = WorkerOptions {
        grace: Duration::from_millis(300),
        ..options(2)
    };
    let (stop, task) = start(q, h, opts);
    q.enqueue(job("long")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            q.depth().await.unwrap()[0].pending == 1
        })
        .await
    );
    let t = Instant::now();
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "returned after the grace"
    );
    assert_eq!(
        q.depth().await.unwrap()[0].pending,
        1,
        "left for another worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_under_a_running_worker_is_survived() {
    if fanout_test_support::skip_on_cluster(
        "restarts the server (tests/failover.rs kills a master)",
    ) {
        return;
    }
    let mut s = setup(&[]);
    let q = s.queue.clone();
    let url = s.redis.url();
    let h = effect_handler(&url, &s.ns, Duration::from_millis(20));
    let (stop, task) = start(&q, h, options(2));
    q.enqueue_many(vec![job("before-1"), job("before-2")])
        .await
        .unwrap();
    let effects_key = format!("{{{}}}:effects", s.ns);
    let effects = |n: u64| {
        let url = url.clone();
        let key = effects_key.clone();
        async move {
            let Ok(client) = redis::Client::open(url) else {
                return false;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return false;
            };
            let v: Option<u64> = conn.get(&key).await.unwrap_or(None);
            v == Some(n)
        }
    };
    assert!(eventually(Duration::from_secs(5), || effects(2)).await);

    tokio::task::block_in_place(|| {
        s.redis.stop();
        std::thread::sleep(Duration::from_millis(1500));
        s.redis.restart(); // same port, empty data
    });
    assert!(!task.is_finished(), "the worker survives Redis going away");

    // Enqueue after the restart (the pool reconnects; the first tries may see dead connections).
    let t = Instant::now();
    loop {
        match q
            .enqueue_many(vec![job("after-1"), job("after-2"), job("after-3")])
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "cannot enqueue: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        eventually(Duration::from_secs(15), || effects(3)).await,
        "jobs enqueued after the restart are done"
    );
    assert!(!task.is_finished());
    stop.cancel();
    task.await.unwrap().unwrap();
}

// ---- a worker process killed mid-job ----

const CHILD_ENV: &str = "FANOUT_QUEUE_TEST_CHILD";

fn spawn_child_worker(url: &str, ns: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker_entry", "--nocapture", "--ignored"])
        .env(CHILD_ENV, format!("{url} {ns}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("re-exec the test binary as a worker")
}

/// Not a test: the worker process the kill test starts (re-executing this binary).
#[tokio::test]
#[ignore = "run by a_killed_worker_process_loses_nothing as a child process"]
async fn child_worker_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (url, ns) = spec.split_once(' ').unwrap();
    let config = common::config(url, &[]);
    let queue = Queue::new(pool(url), ns, config.queue.clone());
    let h = effect_handler(url, ns, Duration::from_millis(300));
    let stop = CancellationToken::new();
    // Bounded life in case the parent dies without killing us.
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        run_worker(queue, h, options(4), stop),
    )
    .await;
}

#[tokio::test]
async fn a_killed_worker_process_loses_nothing_and_effects_happen_once() {
    // visibility 1 s
    let s = setup(&[]);
    let q = &s.queue;
    let url = s.redis.url();
    let n = 16;
    let ids: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    q.enqueue_many(ids.iter().map(|id| job(id)).collect())
        .await
        .unwrap();
    let mut conn = redis_conn(&url).await;
    let effects_key = format!("{{{}}}:effects", s.ns);

    let runs_keys: Vec<String> = ids
        .iter()
        .map(|id| format!("{{{}}}:runs:{id}", s.ns))
        .collect();
    // Jobs started and jobs whose effect is done, read in one MULTI (the keys share a hash tag).
    let progress = |mut conn: fanout_core::redis::Connection| {
        let (runs_keys, effects_key) = (runs_keys.clone(), effects_key.clone());
        async move {
            let (runs, effects): (Vec<Option<u64>>, Option<u64>) = redis::pipe()
                .atomic()
                .mget(&runs_keys)
                .get(&effects_key)
                .query_async(&mut conn)
                .await
                .unwrap();
            (
                runs.into_iter().flatten().sum::<u64>(),
                effects.unwrap_or(0),
            )
        }
    };

    let mut first = spawn_child_worker(&url, &s.ns);
    // Kill it mid-job: some effects done, and some job started whose effect is not (a job
    // works 300 ms, so the kill lands inside it). Pending entries alone do not tell: a finished
    // job waits for its batched ack.
    let mid = eventually(Duration::from_secs(20), || {
        let p = progress(conn.clone());
        async move {
            let (runs, effects) = p.await;
            effects >= 2 && runs > effects
        }
    })
    .await;
    assert!(mid, "the first worker started jobs");
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let killed_at = Instant::now();
    let (runs_at_kill, effects_at_kill) = progress(conn.clone()).await;
    let cut_short = runs_at_kill - effects_at_kill;
    assert!(cut_short > 0, "killed mid-job");

    let mut second = spawn_child_worker(&url, &s.ns);
    let all_done = eventually(Duration::from_secs(20), || async {
        let d = q.depth().await.unwrap();
        d[0].pending == 0 && d[0].ready == 0
    })
    .await;
    let took = killed_at.elapsed();
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(all_done, "{:?}", q.depth().await.unwrap());
    // Reclaimed after the idle timeout (1 s) plus the second process's start and the work:
    // a generous bound that still proves it did not wait for a long fixed interval.
    assert!(took < Duration::from_secs(10), "took {took:?}");

    assert_eq!(
        get_u64(&mut conn, &effects_key).await,
        n as u64,
        "each effect once"
    );
    let mut starts = 0;
    for id in &ids {
        let done: bool = conn.exists(format!("{}:done:{id}", s.ns)).await.unwrap();
        assert!(done, "{id} done");
        starts += get_u64(&mut conn, &format!("{{{}}}:runs:{id}", s.ns)).await;
    }
    assert!(
        starts >= n as u64 + cut_short,
        "the {cut_short} jobs cut short ran again: {starts} starts"
    );
    assert_eq!(q.dead_letters(10).await.unwrap().len(), 0);
}
