//! The low-level queue API against a real redis-server.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{command_calls, job, redis_conn, setup};
use fanout_queue::{
    ConsumerId, DeadLetter, Enqueued, Error, Lane, NewJob, Queue, RetryOutcome, WorkerInfo,
};
use redis::AsyncCommands;

const NO_BLOCK: Duration = Duration::ZERO;

#[tokio::test]
async fn enqueue_claim_ack_roundtrip() {
    let s = setup(&[]);
    let q = &s.queue;
    let payload = serde_json::json!({"section": "risk", "n": [1, 2, 3]});
    let e = q
        .enqueue(
            NewJob::new("job-1", payload.clone())
                .lane(Lane::Batch)
                .priority(3),
        )
        .await
        .unwrap();
    assert_eq!(e, Enqueued::New("job-1".into()));

    let c = ConsumerId::unique("test");
    let got = q.claim(&c, 10, NO_BLOCK).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.job_id, "job-1");
    assert_eq!(d.lane, Lane::Batch);
    assert_eq!(d.priority, 3);
    assert_eq!(d.payload, payload);
    assert_eq!((d.attempt, d.deliveries), (1, 1));
    assert!(d.enqueued_at_ms > 0);
    assert!(d.last_error.is_none());
    assert_eq!(d.stream(), q.stream_key(Lane::Batch, 3));

    // In flight: pending, not ready, not claimable again.
    let depth = q.depth().await.unwrap();
    let batch = &depth[1];
    assert_eq!((batch.ready, batch.pending), (0, 1));
    assert!(q.claim(&c, 10, NO_BLOCK).await.unwrap().is_empty());

    q.ack(d).await.unwrap();
    q.ack(d).await.unwrap(); // idempotent
    let mut conn = redis_conn(&s.redis.url()).await;
    let len: u64 = conn.xlen(d.stream()).await.unwrap();
    assert_eq!(len, 0, "acked entries are deleted from the stream");
    for l in q.depth().await.unwrap() {
        assert_eq!(
            (l.ready, l.pending, l.delayed, l.dead),
            (0, 0, 0, 0),
            "{l:?}"
        );
        assert_eq!(l.lag, Some(0));
    }
}

#[tokio::test]
async fn enqueue_is_idempotent_by_job_id_with_a_ttl() {
    let s = setup(&[]);
    let q = &s.queue;
    assert!(q.enqueue(job("a")).await.unwrap().is_new());
    assert_eq!(
        q.enqueue(job("a")).await.unwrap(),
        Enqueued::Duplicate("a".into())
    );
    let many = q
        .enqueue_many(vec![job("b"), job("a"), job("b")])
        .await
        .unwrap();
    assert_eq!(
        many,
        vec![
            Enqueued::New("b".into()),
            Enqueued::Duplicate("a".into()),
            Enqueued::Duplicate("b".into())
        ]
    );
    let got = q
        .claim(&ConsumerId::unique("t"), 10, NO_BLOCK)
        .await
        .unwrap();
    let mut ids: Vec<_> = got.iter().map(|d| d.job_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);

    let mut conn = redis_conn(&s.redis.url()).await;
    let ttl: i64 = conn.ttl(format!("{{{}:queue}}:job:a", s.ns)).await.unwrap();
    assert!(ttl > 23 * 3600 && ttl <= 24 * 3600, "ttl {ttl}");
    assert!(matches!(
        q.enqueue(job("")).await,
        Err(Error::InvalidJobId(_))
    ));
}

#[tokio::test]
async fn enqueue_many_is_one_script_call() {
    let s = setup(&[]);
    let q = &s.queue;
    q.load_scripts().await.unwrap();
    let mut conn = redis_conn(&s.redis.url()).await;
    let calls = |per: &[(String, u64)], name: &str| {
        per.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c)
    };
    let (_, before) = command_calls(&mut conn).await;
    let jobs: Vec<NewJob> = (0..500)
        .map(|i| {
            job(&format!("bulk-{i}")).lane(if i % 2 == 0 {
                Lane::Batch
            } else {
                Lane::Interactive
            })
        })
        .collect();
    let out = q.enqueue_many(jobs).await.unwrap();
    assert!(out.iter().all(Enqueued::is_new));
    let (_, after) = command_calls(&mut conn).await;
    let scripts = calls(&after, "evalsha") + calls(&after, "eval")
        - calls(&before, "evalsha")
        - calls(&before, "eval");
    assert_eq!(scripts, 1, "one round trip for the whole batch");
    // + one poke of the wake stream for the whole call
    assert_eq!(calls(&after, "xadd") - calls(&before, "xadd"), 500 + 1);

    let depth = q.depth().await.unwrap();
    assert_eq!(depth.iter().map(|l| l.ready).sum::<u64>(), 500);
    assert_eq!(depth.iter().map(|l| l.lag.unwrap()).sum::<u64>(), 500);
    let c = ConsumerId::unique("t");
    let mut seen = 0;
    loop {
        let got = q.claim(&c, 64, NO_BLOCK).await.unwrap();
        assert!(got.len() <= 64);
        if got.is_empty() {
            break;
        }
        seen += got.len();
        q.ack_many(&got).await.unwrap();
    }
    assert_eq!(seen, 500);
}

#[tokio::test]
async fn interactive_before_batch_and_higher_priority_first() {
    let s = setup(&[]);
    let q = &s.queue;
    q.enqueue_many(vec![
        job("batch-9").lane(Lane::Batch).priority(9),
        job("inter-1a").priority(1),
        job("batch-200").lane(Lane::Batch).priority(200),
        job("inter-5").priority(5),
        job("inter-1b").priority(1),
        job("batch-0").lane(Lane::Batch).priority(0),
    ])
    .await
    .unwrap();
    let c = ConsumerId::unique("t");
    let mut order = Vec::new();
    for _ in 0..6 {
        let got = q.claim(&c, 1, NO_BLOCK).await.unwrap();
        assert_eq!(got.len(), 1, "never more than max");
        order.push(got[0].job_id.clone());
    }
    assert_eq!(
        order,
        [
            "inter-5",
            "inter-1a",
            "inter-1b",
            "batch-200",
            "batch-9",
            "batch-0"
        ]
    );
    // A claim of several takes them in the same order.
    q.enqueue_many(vec![
        job("x-low").priority(0),
        job("x-batch").lane(Lane::Batch).priority(255),
        job("x-high").priority(7),
    ])
    .await
    .unwrap();
    let got = q.claim(&c, 2, NO_BLOCK).await.unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.job_id.as_str()).collect();
    assert_eq!(ids, ["x-high", "x-low"]);
}

#[tokio::test]
async fn a_blocking_claim_returns_a_job_enqueued_meanwhile() {
    let s = setup(&[]);
    let q = s.queue.clone();
    let c = ConsumerId::unique("t");
    // Make sure a stream exists first, then is drained.
    q.enqueue(job("first")).await.unwrap();
    let first = q.claim(&c, 1, NO_BLOCK).await.unwrap();
    q.ack(&first[0]).await.unwrap();

    let waiter = tokio::spawn({
        let q = q.clone();
        let c = c.clone();
        async move {
            let t = Instant::now();
            let got = q.claim(&c, 5, Duration::from_secs(10)).await.unwrap();
            (got, t.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A brand-new stream (other lane and priority) must wake the blocked claim too.
    q.enqueue(job("second").lane(Lane::Batch).priority(42))
        .await
        .unwrap();
    let (got, waited) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job_id, "second");
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
}

#[tokio::test]
async fn not_before_waits_in_the_delayed_set() {
    let s = setup(&[]);
    let q = &s.queue;
    let at = SystemTime::now() + Duration::from_millis(400);
    q.enqueue(job("later").not_before(at)).await.unwrap();
    let c = ConsumerId::unique("t");
    assert!(q.claim(&c, 1, NO_BLOCK).await.unwrap().is_empty());
    assert_eq!(q.depth().await.unwrap()[0].delayed, 1);
    let got = q.claim(&c, 1, Duration::from_secs(3)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(SystemTime::now() >= at - Duration::from_millis(5));
    assert_eq!(q.depth().await.unwrap()[0].delayed, 0);
}

#[tokio::test]
async fn retry_backs_off_honours_retry_after_and_dead_letters_at_max_attempts() {
    let s = setup(&[("FANOUT_QUEUE__MAX_ATTEMPTS", "3")]);
    let q = &s.queue;
    q.enqueue(job("flaky").lane(Lane::Batch)).await.unwrap();
    let c = ConsumerId::unique("t");
    let mut d = q.claim(&c, 1, NO_BLOCK).await.unwrap().remove(0);
    for attempt in 1..=2u32 {
        assert_eq!(d.attempt, attempt);
        let asked = Duration::from_millis(300);
        let before = SystemTime::now();
        let out = q
            .retry(&d, &format!("boom {attempt}"), Some(asked))
            .await
            .unwrap();
        let RetryOutcome::Scheduled { at } = out else {
            panic!("expected a retry, got {out:?}");
        };
        assert!(at.duration_since(before).unwrap() >= asked - Duration::from_millis(5));
        assert!(
            q.claim(&c, 1, NO_BLOCK).await.unwrap().is_empty(),
            "not before retry_after"
        );
        let t = Instant::now();
        d = q
            .claim(&c, 1, Duration::from_secs(3))
            .await
            .unwrap()
            .remove(0);
        assert!(SystemTime::now() >= at - Duration::from_millis(5));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(
            d.last_error.as_deref(),
            Some(format!("boom {attempt}").as_str())
        );
    }
    assert_eq!(d.attempt, 3);
    assert_eq!(
        q.retry(&d, "boom 3", None).await.unwrap(),
        RetryOutcome::DeadLettered
    );
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let dl = &dead[0];
    assert_eq!(dl.job_id, "flaky");
    assert_eq!(dl.lane, Lane::Batch);
    assert_eq!(dl.attempts, 3);
    assert_eq!(dl.last_error, "boom 3");
    assert!(dl.reason.contains("attempts exhausted"), "{}", dl.reason);
    assert_eq!(dl.payload, Some(serde_json::json!({"job": "flaky"})));
    let depth = q.depth().await.unwrap();
    assert_eq!(
        (
            depth[1].dead,
            depth[1].pending,
            depth[1].ready,
            depth[1].delayed
        ),
        (1, 0, 0, 0)
    );
}

#[tokio::test]
async fn release_does_not_count_an_attempt_and_fatal_dead_letters() {
    let s = setup(&[]);
    let q = &s.queue;
    q.enqueue_many(vec![job("r"), job("f")]).await.unwrap();
    let c = ConsumerId::unique("t");
    let got = q.claim(&c, 2, NO_BLOCK).await.unwrap();
    let (r, f) = (&got[0], &got[1]);
    q.release(r, Duration::ZERO).await.unwrap();
    q.dead_letter(f, "bad template").await.unwrap();
    let again = q.claim(&c, 2, Duration::from_secs(2)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].job_id.as_str(), again[0].attempt), ("r", 1));
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(
        (dead[0].job_id.as_str(), dead[0].reason.as_str()),
        ("f", "bad template")
    );
    // Settling something no longer held is refused, not applied twice.
    assert!(matches!(
        q.release(r, Duration::ZERO).await,
        Err(Error::Lost { .. })
    ));
}

#[tokio::test]
async fn idle_jobs_are_reclaimed_and_the_old_holder_loses_them() {
    // visibility 1 s
    let s = setup(&[("FANOUT_QUEUE__MAX_DELIVERIES", "2")]);
    let url = s.redis.url();
    let a = Queue::new(common::pool(&url), &s.ns, s.config.queue.clone());
    let b = Queue::new(common::pool(&url), &s.ns, s.config.queue.clone());
    a.enqueue(job("j")).await.unwrap();
    let (ca, cb) = (ConsumerId::unique("a"), ConsumerId::unique("b"));
    let da = a.claim(&ca, 1, NO_BLOCK).await.unwrap().remove(0);

    // Heartbeats keep it: b cannot take it even after the visibility timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(a.extend(&da).await.unwrap());
        assert!(b.claim(&cb, 1, NO_BLOCK).await.unwrap().is_empty());
    }
    // a stops heartbeating: b reclaims within about the visibility timeout.
    let t = Instant::now();
    let db = loop {
        let got = b.claim(&cb, 1, Duration::from_millis(200)).await.unwrap();
        if let Some(d) = got.into_iter().next() {
            break d;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "not reclaimed");
    };
    assert_eq!((db.job_id.as_str(), db.attempt, db.deliveries), ("j", 1, 2));
    assert!(!a.extend(&da).await.unwrap(), "the old holder lost it");
    assert!(matches!(
        a.retry(&da, "late", None).await,
        Err(Error::Lost { .. })
    ));

    // b dies too: a third delivery exceeds max_deliveries (2) and goes to the dead letter.
    let t = Instant::now();
    loop {
        let got = a.claim(&ca, 1, Duration::from_millis(200)).await.unwrap();
        assert!(got.is_empty(), "a delivery beyond the limit must not run");
        if a.depth().await.unwrap()[0].dead == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(4), "not dead-lettered");
    }
    let dead = a.dead_letters(1).await.unwrap();
    assert_eq!(dead[0].reason, "delivery limit: worker died 2 times");
    assert_eq!(dead[0].job_id, "j");
}

#[tokio::test]
async fn undecodable_entries_are_dead_lettered_by_claim() {
    let s = setup(&[]);
    let q = &s.queue;
    q.enqueue(job("good-1")).await.unwrap();
    let stream = q.stream_key(Lane::Interactive, 0);
    let mut conn = redis_conn(&s.redis.url()).await;
    let _: String = conn.xadd(&stream, "*", &[("garbage", "1")]).await.unwrap();
    let _: String = conn
        .xadd(
            &stream,
            "*",
            &[("id", "bad-json"), ("p", "{nope"), ("a", "1"), ("t", "1")],
        )
        .await
        .unwrap();
    q.enqueue(job("good-2")).await.unwrap();
    let got = q
        .claim(&ConsumerId::unique("t"), 10, NO_BLOCK)
        .await
        .unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.job_id.as_str()).collect();
    assert_eq!(ids, ["good-1", "good-2"]);
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter().all(|d| d.reason.starts_with("decode error: ")),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|d| d.job_id == "bad-json" && d.raw_payload == "{nope")
    );
}

#[tokio::test]
async fn remove_drops_ready_and_delayed_jobs() {
    let s = setup(&[]);
    let q = &s.queue;
    q.enqueue_many(vec![
        job("keep"),
        job("drop-ready"),
        job("drop-delayed").not_before(SystemTime::now() + Duration::from_secs(60)),
        job("inflight").lane(Lane::Batch),
    ])
    .await
    .unwrap();
    let c = ConsumerId::unique("t");
    let held = q.claim(&c, 1, NO_BLOCK).await.unwrap(); // "keep"
    assert_eq!(held[0].job_id, "keep");
    let n = q
        .remove(&["drop-ready".into(), "drop-delayed".into(), "missing".into()])
        .await
        .unwrap();
    assert_eq!(n, 2);
    let rest = q.claim(&c, 10, NO_BLOCK).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|d| d.job_id.as_str()).collect();
    assert_eq!(ids, ["inflight"]);
    let depth = q.depth().await.unwrap();
    assert_eq!(depth[0].delayed, 0);
    // A removed job id stays taken for the idempotency TTL.
    assert!(!q.enqueue(job("drop-ready")).await.unwrap().is_new());
}

#[tokio::test]
async fn depth_reports_lag_and_oldest_ready_age() {
    let s = setup(&[]);
    let q = &s.queue;
    q.enqueue_many(
        (0..5)
            .map(|i| job(&format!("d{i}")).lane(Lane::Batch).priority(i))
            .collect(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = ConsumerId::unique("t");
    q.claim(&c, 2, NO_BLOCK).await.unwrap();
    let depth = q.depth().await.unwrap();
    let b = &depth[1];
    assert_eq!((b.ready, b.pending, b.lag), (3, 2, Some(3)));
    assert!(b.oldest_ready_age.unwrap() >= Duration::from_millis(40));
    assert_eq!(b.by_priority.len(), 5);
    assert_eq!(depth[0].oldest_ready_age, None);
    let streams = q.streams().await.unwrap();
    assert_eq!(streams.len(), 5);
    assert_eq!(streams[0], q.stream_key(Lane::Batch, 4));
}

#[tokio::test]
async fn a_claimer_blocked_elsewhere_wakes_for_a_delayed_job_when_it_is_due() {
    // visibility 30 s: no reclaim timer shortens the wait, only the wake stream can.
    let s = setup(&[("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "30")]);
    let producer = &s.queue;
    let worker = Queue::new(common::pool(&s.redis.url()), &s.ns, s.config.queue.clone());
    producer.enqueue(job("warm")).await.unwrap();
    let c = ConsumerId::unique("t");
    let warm = worker.claim(&c, 1, NO_BLOCK).await.unwrap();
    worker.ack(&warm[0]).await.unwrap();

    let blocked = tokio::spawn({
        let worker = worker.clone();
        async move {
            let got = worker.claim(&c, 1, Duration::from_secs(10)).await.unwrap();
            (got, SystemTime::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let due = SystemTime::now() + Duration::from_millis(500);
    producer
        .enqueue(job("delayed").not_before(due))
        .await
        .unwrap();
    let (got, at) = blocked.await.unwrap();
    assert_eq!(got[0].job_id, "delayed");
    assert!(
        at >= due - Duration::from_millis(5),
        "not before it was due"
    );
    assert!(
        at < due + Duration::from_secs(2),
        "woke {:?} late",
        at.duration_since(due)
    );
}

#[tokio::test]
async fn a_worker_that_stops_beating_loses_its_jobs_when_its_ttl_lapses() {
    // Visibility 30 s: only the registry can hand the job over this quickly.
    let s = setup(&[("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "30")]);
    let q = &s.queue;
    q.enqueue(job("j")).await.unwrap();
    let (ca, cb) = (ConsumerId::unique("a"), ConsumerId::unique("b"));
    let info = |c: &ConsumerId, ttl_ms: u64| WorkerInfo {
        id: c.as_str().to_owned(),
        host: "h".into(),
        pid: 1,
        version: "v".into(),
        started_at_ms: 1,
        concurrency: 4,
        in_flight: 1,
        ttl_ms,
        last_seen_ms: 0,
    };
    q.beat(&info(&ca, 400)).await.unwrap();
    q.beat(&info(&cb, 10_000)).await.unwrap();
    let da = q.claim(&ca, 1, NO_BLOCK).await.unwrap().remove(0);
    let alive: Vec<String> = q
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(alive.len(), 2);
    assert!(q.claim(&cb, 1, NO_BLOCK).await.unwrap().is_empty());

    // a goes silent (killed): once its TTL lapses it is no longer listed, and b's next claim
    // takes its job, long before the visibility timeout.
    let t = Instant::now();
    let db = loop {
        // b keeps beating: a worker counts as gone once another has beaten past its deadline.
        q.beat(&info(&cb, 10_000)).await.unwrap();
        let got = q.claim(&cb, 1, Duration::from_millis(100)).await.unwrap();
        if let Some(d) = got.into_iter().next() {
            break d;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "not taken over");
    };
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((db.job_id.as_str(), db.deliveries), ("j", 2));
    let alive: Vec<String> = q
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(alive, vec![cb.as_str().to_owned()]);
    assert!(!q.extend(&da).await.unwrap(), "the silent worker lost it");

    // Holding nothing any more, a is forgotten (by the next claim); b leaves with its job unfinished, so the next
    // claimer anywhere takes it at once.
    assert!(q.claim(&cb, 1, NO_BLOCK).await.unwrap().is_empty());
    let mut conn = redis_conn(&s.redis.url()).await;
    let registered: Vec<String> = conn
        .zrange(format!("{{{}:queue}}:workers", s.ns), 0, -1)
        .await
        .unwrap();
    assert_eq!(registered, vec![cb.as_str().to_owned()]);
    q.leave(&info(&cb, 10_000)).await.unwrap();
    assert!(q.workers().await.unwrap().is_empty());
    // (A claimer looks for lapsed workers every 500 ms, or at once when a wake entry says one
    // lapsed, as `leave` adds.)
    let cc = ConsumerId::unique("c");
    let dc = q
        .claim(&cc, 1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((dc.job_id.as_str(), dc.deliveries), ("j", 3));
}

#[tokio::test]
async fn dead_letters_replay_once_with_fresh_attempts_or_drop() {
    let s = setup(&[]);
    let q = &s.queue;
    q.enqueue(job("a").priority(7)).await.unwrap();
    q.enqueue(job("b").lane(Lane::Batch)).await.unwrap();
    let c = ConsumerId::unique("c");
    for d in q.claim(&c, 2, NO_BLOCK).await.unwrap() {
        q.dead_letter(&d, "poison").await.unwrap();
    }
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2);
    let a = dead.iter().find(|d| d.job_id == "a").unwrap().clone();
    let b = dead.iter().find(|d| d.job_id == "b").unwrap().clone();
    assert_eq!(
        q.dead_letter_by_id(&a.id()).await.unwrap().as_ref(),
        Some(&a)
    );
    assert_eq!(DeadLetter::parse_id("interactive:../x"), None);

    // Replayed twice (two operators at once, or a retried request): one job.
    assert_eq!(
        q.replay_dead(std::slice::from_ref(&a)).await.unwrap(),
        vec![true]
    );
    assert_eq!(
        q.replay_dead(std::slice::from_ref(&a)).await.unwrap(),
        vec![false]
    );
    let again = q.claim(&c, 10, NO_BLOCK).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (
            again[0].job_id.as_str(),
            again[0].attempt,
            again[0].priority
        ),
        ("a", 1, 7)
    );
    q.ack(&again[0]).await.unwrap();

    assert_eq!(
        q.drop_dead(std::slice::from_ref(&b)).await.unwrap(),
        vec![true]
    );
    assert_eq!(q.replay_dead(&[b]).await.unwrap(), vec![false]);
    assert!(q.claim(&c, 10, NO_BLOCK).await.unwrap().is_empty());
    assert!(q.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_silent_workers_jobs_past_their_delivery_limit_are_dead_lettered_without_a_free_slot() {
    let s = setup(&[
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "30"),
        ("FANOUT_QUEUE__MAX_DELIVERIES", "1"),
    ]);
    let q = &s.queue;
    for id in ["a", "b", "c"] {
        q.enqueue(job(id)).await.unwrap();
    }
    let (ca, cb) = (ConsumerId::unique("a"), ConsumerId::unique("b"));
    let info = WorkerInfo {
        id: ca.as_str().to_owned(),
        host: "h".into(),
        pid: 1,
        version: "v".into(),
        started_at_ms: 1,
        concurrency: 3,
        in_flight: 3,
        ttl_ms: 300,
        last_seen_ms: 0,
    };
    q.beat(&info).await.unwrap();
    assert_eq!(q.claim(&ca, 3, NO_BLOCK).await.unwrap().len(), 3);
    // Past the TTL, and past the 500 ms between two looks for lapsed workers; b beats.
    tokio::time::sleep(Duration::from_millis(600)).await;
    q.beat(&WorkerInfo {
        id: cb.as_str().to_owned(),
        ttl_ms: 10_000,
        ..info.clone()
    })
    .await
    .unwrap();
    // One free slot, three jobs that killed their worker once: all three go to the dead letter
    // in this one claim, none runs.
    assert!(q.claim(&cb, 1, NO_BLOCK).await.unwrap().is_empty());
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.reason == "delivery limit: worker died 1 times")
    );
}

#[tokio::test]
async fn after_redis_was_away_longer_than_a_ttl_no_live_worker_loses_its_jobs() {
    let s = setup(&[("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "30")]);
    let q = &s.queue;
    q.enqueue(job("j")).await.unwrap();
    let (ca, cb) = (ConsumerId::unique("a"), ConsumerId::unique("b"));
    let info = |c: &ConsumerId| WorkerInfo {
        id: c.as_str().to_owned(),
        host: "h".into(),
        pid: 1,
        version: "v".into(),
        started_at_ms: 1,
        concurrency: 1,
        in_flight: 0,
        ttl_ms: 400,
        last_seen_ms: 0,
    };
    q.beat(&info(&ca)).await.unwrap();
    q.beat(&info(&cb)).await.unwrap();
    let da = q.claim(&ca, 1, NO_BLOCK).await.unwrap().remove(0);
    // Nobody can beat for longer than the TTL (as when Redis is down or restarting).
    tokio::time::sleep(Duration::from_millis(700)).await;
    // b comes back first and claims: a has not beaten yet, but it is not gone.
    assert!(q.claim(&cb, 1, NO_BLOCK).await.unwrap().is_empty());
    q.beat(&info(&cb)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(550)).await;
    q.beat(&info(&ca)).await.unwrap();
    assert!(q.claim(&cb, 1, NO_BLOCK).await.unwrap().is_empty());
    assert!(q.extend(&da).await.unwrap(), "a still holds its job");
}

mod batch_api_lane {
    use std::time::Duration;

    use fanout_queue::batch_api::{BatchApiStore, Settle, Where};

    use crate::common::{namespace, pool};

    fn store() -> (fanout_test_support::RedisServer, BatchApiStore) {
        let redis = fanout_test_support::RedisServer::start();
        let store = BatchApiStore::new(pool(&redis.url()), &namespace());
        (redis, store)
    }

    #[tokio::test]
    async fn a_line_is_parked_once_and_says_where_it_is() {
        let (_redis, s) = store();
        assert_eq!(s.park("r:a", "line-a", None).await.unwrap(), Where::Waiting);
        // A second delivery of the same job parks nothing new.
        assert_eq!(
            s.park("r:a", "line-a2", None).await.unwrap(),
            Where::Waiting
        );
        let waiting = s.waiting(10).await.unwrap();
        assert_eq!(waiting.len(), 1);
        assert_eq!(
            (waiting[0].0.as_str(), waiting[0].1.as_str()),
            ("r:a", "line-a2")
        );
        // Once in a batch, a repeated park leaves it there.
        let claimed = s
            .claim("b1", "default", "m", &[("r:a".into(), 10)])
            .await
            .unwrap();
        assert_eq!(claimed, ["r:a"]);
        assert_eq!(
            s.park("r:a", "line-a3", None).await.unwrap(),
            Where::Batch("b1".into())
        );
        assert_eq!(
            s.lines(&["r:a".into()]).await.unwrap(),
            [Some("line-a2".into())]
        );
        assert!(s.waiting(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_claim_takes_only_waiting_lines_and_records_its_batch() {
        let (_redis, s) = store();
        for m in ["r:a", "r:b", "r:c"] {
            s.park(m, m, None).await.unwrap();
        }
        let first = s
            .claim(
                "b1",
                "k1",
                "gpt-4o-mini",
                &[("r:a".into(), 100), ("r:b".into(), 50)],
            )
            .await
            .unwrap();
        assert_eq!(first, ["r:a", "r:b"]);
        // A second former (a process that lost its lease) gets only what is still waiting.
        let second = s
            .claim(
                "b2",
                "k1",
                "gpt-4o-mini",
                &[("r:b".into(), 50), ("r:c".into(), 7)],
            )
            .await
            .unwrap();
        assert_eq!(second, ["r:c"]);
        assert!(
            s.claim("b3", "k1", "m", &[("r:a".into(), 1)])
                .await
                .unwrap()
                .is_empty()
        );
        let open = s.open().await.unwrap();
        assert_eq!(open.len(), 2, "{open:?}");
        let b1 = open.iter().find(|b| b.id == "b1").unwrap();
        assert_eq!(
            (b1.key.as_str(), b1.model.as_str(), b1.tokens),
            ("k1", "gpt-4o-mini", 150)
        );
        assert_eq!(b1.count, 2);
        assert_eq!(s.members("b1").await.unwrap(), ["r:a", "r:b"]);
        assert_eq!(b1.state, "formed");
        s.record(
            "b1",
            &[("file_id", "file-1".into()), ("state", "uploaded".into())],
        )
        .await
        .unwrap();
        let b1 = s
            .open()
            .await
            .unwrap()
            .into_iter()
            .find(|b| b.id == "b1")
            .unwrap();
        assert_eq!(
            (b1.file_id.as_deref(), b1.state.as_str()),
            (Some("file-1"), "uploaded")
        );
        let summary = s.summary().await.unwrap();
        assert_eq!(
            (summary.open, summary.in_batches, summary.enqueued_tokens),
            (2, 3, 157)
        );
        s.finish("b1").await.unwrap();
        assert_eq!(s.open().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_outcome_applies_once_from_where_the_line_was() {
        let (_redis, s) = store();
        s.park("r:a", "v1", None).await.unwrap();
        s.claim("b1", "k", "m", &[("r:a".into(), 1)]).await.unwrap();
        let in_b1 = Where::Batch("b1".into());
        // The batch's error: the line waits for the next batch, once.
        assert!(
            s.settle("r:a", &in_b1, Settle::Retry("v2".into()))
                .await
                .unwrap()
        );
        assert!(
            !s.settle("r:a", &in_b1, Settle::Retry("v3".into()))
                .await
                .unwrap()
        );
        assert_eq!(
            s.locate(&["r:a".into()]).await.unwrap(),
            [Some(Where::Waiting)]
        );
        assert_eq!(s.waiting(10).await.unwrap()[0].1, "v2");
        // Moved to a live call: no longer waiting, still known until the call forgets it.
        assert!(
            s.settle("r:a", &Where::Waiting, Settle::Live)
                .await
                .unwrap()
        );
        assert!(s.waiting(10).await.unwrap().is_empty());
        assert_eq!(s.park("r:a", "v4", None).await.unwrap(), Where::Live);
        assert!(s.settle("r:a", &Where::Live, Settle::Done).await.unwrap());
        assert_eq!(s.locate(&["r:a".into()]).await.unwrap(), [None]);
        assert_eq!(s.lines(&["r:a".into()]).await.unwrap(), [None]);
    }

    #[tokio::test]
    async fn lines_are_found_by_their_reports_deadline_until_they_leave_the_lane() {
        let (_redis, s) = store();
        s.park("r1:a", "a", Some(1_000)).await.unwrap();
        s.park("r1:b", "b", Some(1_000)).await.unwrap();
        s.park("r2:a", "c", Some(5_000)).await.unwrap();
        s.park("r3:a", "d", None).await.unwrap();
        assert_eq!(s.waiting_since().await.unwrap().0, 4);
        assert_eq!(s.due(999, 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(s.due(1_000, 10).await.unwrap(), ["r1:a", "r1:b"]);
        assert_eq!(s.due(10_000, 1).await.unwrap(), ["r1:a"]);
        let members: Vec<String> = ["r1:a", "r2:a", "r3:a"].map(String::from).into();
        assert_eq!(
            s.deadlines(&members).await.unwrap(),
            [Some(1_000), Some(5_000), None]
        );
        // In a batch it still has its deadline; live or done, it has none.
        s.claim("b", "k", "m", &[("r1:a".into(), 1), ("r1:b".into(), 1)])
            .await
            .unwrap();
        assert_eq!(s.due(1_000, 10).await.unwrap(), ["r1:a", "r1:b"]);
        let in_b = Where::Batch("b".into());
        assert!(s.settle("r1:a", &in_b, Settle::Live).await.unwrap());
        assert!(s.settle("r1:b", &in_b, Settle::Done).await.unwrap());
        assert!(s.due(1_000, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_process_at_a_time_holds_the_submitters_lease() {
        let (_redis, s) = store();
        let lease = Duration::from_millis(300);
        assert!(s.lease("one", lease).await.unwrap());
        assert!(s.lease("one", lease).await.unwrap(), "renewed");
        assert!(!s.lease("two", lease).await.unwrap());
        s.release_lease("two").await.unwrap();
        assert!(
            !s.lease("two", lease).await.unwrap(),
            "only its holder gives it up"
        );
        s.release_lease("one").await.unwrap();
        assert!(s.lease("two", lease).await.unwrap());
        // A holder that stops renewing loses it when it lapses.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(s.lease("one", lease).await.unwrap());
    }

    #[tokio::test]
    async fn a_learnt_limit_lasts_its_ttl() {
        let (_redis, s) = store();
        assert_eq!(s.learnt("k", "m").await.unwrap(), None);
        s.learn("k", "m", 5_000, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(s.learnt("k", "m").await.unwrap(), Some(5_000));
        assert_eq!(s.learnt("k", "other").await.unwrap(), None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.learnt("k", "m").await.unwrap(), None);
    }
}
