//! Admission, settlement, feedback, fairness and concurrency against a real Redis, in one process
//! with several `Budget` instances (each with its own pool, as separate processes would have).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LATENESS_SECS, MODEL, budget, config, unix_ms, worst_excess};
use fanout_ratelimit::{AcquireRequest, Error, ProviderSignal};
use fanout_test_support::RedisServer;

fn request(tokens: u64, max_wait: Duration) -> AcquireRequest {
    AcquireRequest {
        model: MODEL.into(),
        estimated_tokens: tokens,
        priority: 0,
        enqueued_at_ms: unix_ms(),
        max_wait,
        tenant: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_are_both_used_and_neither_exceeds_its_limit() {
    let redis = RedisServer::start();
    let rpm = 1_200; // 20 per second per key
    let burst = 0.5; // 10 requests
    let instances: Vec<_> = (0..2)
        .map(|_| {
            budget(
                &redis.url(),
                config(rpm, 10_000_000, burst, 1_000),
                &["a", "b"],
            )
        })
        .collect();
    let times: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let b = instances[i % 2].clone();
        let times = times.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let a = b
                    .acquire(request(10, Duration::from_secs(5)))
                    .await
                    .unwrap();
                times
                    .lock()
                    .unwrap()
                    .entry(a.key.clone())
                    .or_default()
                    .push(a.admitted_at_ms);
                b.settle(a, Some(10)).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let times = times.lock().unwrap().clone();
    // The bucket, plus the few ms an admission may run ahead of its schedule.
    let capacity = (burst + 2.0 * LATENESS_SECS) * rpm as f64 / 60.0;
    let mut counts = Vec::new();
    for key in ["a", "b"] {
        let mut t = times.get(key).cloned().unwrap_or_default();
        t.sort_unstable();
        counts.push(t.len());
        let excess = worst_excess(&t, rpm, capacity);
        assert!(
            excess <= 0.05,
            "key {key} over its limit by {excess} requests"
        );
    }
    let total: usize = counts.iter().sum();
    for (key, n) in ["a", "b"].iter().zip(&counts) {
        assert!(
            *n * 10 >= total * 4,
            "key {key} got {n} of {total}: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_from_feedback_holds_every_instance() {
    let redis = RedisServer::start();
    let cfg = config(6_000, 10_000_000, 1.0, 100);
    let a = budget(&redis.url(), cfg.clone(), &["k"]);
    let b = budget(&redis.url(), cfg, &["k"]);
    // Both work before the pause.
    let adm = b
        .acquire(request(10, Duration::from_secs(1)))
        .await
        .unwrap();
    b.settle(adm, Some(10)).await.unwrap();

    let pause = Duration::from_millis(1_500);
    a.feedback(
        "k",
        "gpt-4o-mini-2024-07-18",
        ProviderSignal {
            status: 429,
            retry_after: Some(pause),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        a.stats()
            .feedback_429
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        a.stats()
            .pauses_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let snap = b.snapshot().await.unwrap();
    let paused = snap[0].paused_for.expect("b sees the pause");
    // b's one admission is counted where every instance sees it (all of it, unless a clock
    // minute turned since: then the part of it still inside the last 60 s).
    let used = a.snapshot().await.unwrap()[0].clone();
    assert!(
        used.requests_last_minute > 0.0 && used.requests_last_minute <= 1.0,
        "{used:?}"
    );
    assert!(used.tokens_last_minute > 0.0, "{used:?}");
    assert!(
        paused > Duration::from_millis(1_000) && paused <= pause,
        "{paused:?}"
    );

    match b.acquire(request(10, Duration::from_millis(100))).await {
        Err(Error::WaitTooLong { retry_after }) => {
            assert!(
                retry_after > Duration::from_millis(1_000),
                "{retry_after:?}"
            )
        }
        other => panic!("expected WaitTooLong, got {other:?}"),
    }
    let adm = b
        .acquire(request(10, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        adm.waited >= Duration::from_millis(1_000),
        "{:?}",
        adm.waited
    );
    b.settle(adm, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_below_our_view_lowers_availability_everywhere() {
    let redis = RedisServer::start();
    let cfg = config(600, 60_000, 1.0, 100);
    let a = budget(&redis.url(), cfg.clone(), &["k"]);
    let b = budget(&redis.url(), cfg, &["k"]);
    let adm = b
        .acquire(request(10, Duration::from_secs(1)))
        .await
        .unwrap();
    b.settle(adm, Some(10)).await.unwrap();
    let before = b.snapshot().await.unwrap()[0].requests_available;
    assert!(before > 8.0, "{before}");

    // Someone else is using the key: the provider has 60 of 600 left (a tenth of the burst).
    a.feedback(
        "k",
        MODEL,
        ProviderSignal {
            status: 200,
            remaining_requests: Some(60),
            reset_requests: Some(Duration::from_millis(900)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let after = b.snapshot().await.unwrap()[0].requests_available;
    assert!(after < 1.5, "availability not lowered: {before} -> {after}");

    // A reading close to our own view is not news (it is as old as the call).
    let c = budget(&redis.url(), config(600, 60_000, 1.0, 100), &["k2"]);
    c.feedback(
        "k2",
        MODEL,
        ProviderSignal {
            status: 200,
            remaining_requests: Some(500),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        c.stats()
            .pauses_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_is_admitted_before_an_older_lower_priority_waiter() {
    let redis = RedisServer::start();
    // 120 RPM with a one-request bucket: one admission every ~500 ms.
    let cfg = config(120, 10_000_000, 0.5, 100);
    let low_budget = budget(&redis.url(), cfg.clone(), &["k"]);
    let high_budget = budget(&redis.url(), cfg, &["k"]);
    let drain = low_budget
        .acquire(request(1, Duration::from_secs(1)))
        .await
        .unwrap();
    low_budget.settle(drain, None).await.unwrap();

    let low = {
        let b = low_budget.clone();
        tokio::spawn(async move {
            let mut r = request(1, Duration::from_secs(10));
            r.priority = 0;
            r.enqueued_at_ms = unix_ms() - 60_000; // much older
            b.acquire(r).await.unwrap().admitted_at_ms
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let high = {
        let b = high_budget.clone();
        tokio::spawn(async move {
            let mut r = request(1, Duration::from_secs(10));
            r.priority = 9;
            b.acquire(r).await.unwrap().admitted_at_ms
        })
    };
    let (low, high) = (low.await.unwrap(), high.await.unwrap());
    assert!(high < low, "high admitted at {high}, low at {low}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_priority_waiters_are_served_in_enqueue_order() {
    let redis = RedisServer::start();
    // 600 RPM with a one-request bucket.
    let cfg = config(600, 10_000_000, 0.1, 100);
    let instances: Vec<_> = (0..3)
        .map(|_| budget(&redis.url(), cfg.clone(), &["k"]))
        .collect();
    let drain = instances[0]
        .acquire(request(1, Duration::from_secs(1)))
        .await
        .unwrap();
    instances[0].settle(drain, None).await.unwrap();
    let base = unix_ms() - 10_000;
    let mut handles = Vec::new();
    // Arrive in reverse order of enqueue time.
    for i in (0..8u64).rev() {
        let b = instances[i as usize % 3].clone();
        handles.push((
            i,
            tokio::spawn(async move {
                let mut r = request(1, Duration::from_secs(10));
                r.enqueued_at_ms = base + i;
                b.acquire(r).await.unwrap().admitted_at_ms
            }),
        ));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut admitted = Vec::new();
    for (i, h) in handles {
        admitted.push((h.await.unwrap(), i));
    }
    admitted.sort_unstable();
    let order: Vec<u64> = admitted.iter().map(|(_, i)| *i).collect();
    assert_eq!(
        order,
        (0..8).collect::<Vec<_>>(),
        "admissions: {admitted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_starves_under_contention() {
    let redis = RedisServer::start();
    let cfg = config(1_200, 10_000_000, 0.5, 1_000);
    let instances: Vec<_> = (0..3)
        .map(|_| budget(&redis.url(), cfg.clone(), &["k"]))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = tokio::task::JoinSet::new();
    // Uneven: instance 0 runs 10 waiters, the others 3 each; every waiter is served in turn.
    for (i, n) in [(0usize, 10), (1, 3), (2, 3)] {
        for _ in 0..n {
            let b = instances[i].clone();
            tasks.spawn(async move {
                let (mut count, mut worst) = (0u32, Duration::ZERO);
                while Instant::now() < deadline {
                    let a = b
                        .acquire(request(1, Duration::from_secs(10)))
                        .await
                        .unwrap();
                    worst = worst.max(a.waited);
                    count += 1;
                    b.settle(a, None).await.unwrap();
                }
                (i, count, worst)
            });
        }
    }
    let mut per_waiter = Vec::new();
    while let Some(r) = tasks.join_next().await {
        per_waiter.push(r.unwrap());
    }
    // 16 waiters at 20 per second: each is served about once every 0.8 s.
    for (i, count, worst) in &per_waiter {
        assert!(
            *count >= 1,
            "a waiter of instance {i} starved: {per_waiter:?}"
        );
        assert!(
            *worst < Duration::from_secs(3),
            "instance {i} waited {worst:?}"
        );
    }
    let counts: Vec<u32> = per_waiter.iter().map(|(_, c, _)| *c).collect();
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 2, "unfair shares per waiter: {per_waiter:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_bigger_than_the_bucket_wait_for_their_own_weight() {
    let redis = RedisServer::start();
    // 6,000 TPM with a one-second bucket: 100 tokens. A call of 250 weighs 2.5 s.
    let b = budget(&redis.url(), config(6_000, 6_000, 1.0, 100), &["k"]);
    // After a quiet spell it goes at once: the quiet paid for it.
    let first = b
        .acquire(request(250, Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(first.waited < Duration::from_millis(500), "{first:?}");
    let snap = b.snapshot().await.unwrap();
    assert!(
        snap[0].tokens_available < 1.0,
        "the bucket is empty: {snap:?}"
    );
    b.settle(first, Some(250)).await.unwrap();
    // The next one is paid for before it goes: it waits its own 2.5 s (less the bucket's 1 s
    // refilled meanwhile), so no window of the provider's sees both in less than their weight.
    let second = b
        .acquire(request(250, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        second.waited > Duration::from_millis(2_400),
        "{:?}",
        second.waited
    );
    b.settle(second, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_refunds_unused_tokens_or_charges_extra() {
    let redis = RedisServer::start();
    // 6,000 TPM: 100 tokens per second; a one-second bucket holds 100.
    let mut cfg = config(6_000, 6_000, 1.0, 100);
    let b = budget(&redis.url(), cfg.clone(), &["k"]);
    let a = b
        .acquire(request(90, Duration::from_secs(1)))
        .await
        .unwrap();
    let tokens = |s: Vec<fanout_ratelimit::BudgetSnapshot>| s[0].tokens_available;
    let before = tokens(b.snapshot().await.unwrap());
    assert!(before < 20.0, "{before}");
    b.settle(a, Some(30)).await.unwrap();
    let after = tokens(b.snapshot().await.unwrap());
    assert!(after >= before + 59.0, "refund of 60: {before} -> {after}");
    assert!(after <= 100.0, "never above capacity: {after}");

    // An under-estimate is charged after the fact.
    let a = b
        .acquire(request(10, Duration::from_secs(5)))
        .await
        .unwrap();
    b.settle(a, Some(210)).await.unwrap();
    assert!(tokens(b.snapshot().await.unwrap()) < -50.0);

    // Without refunds, the estimate stays charged.
    cfg.refund_unused_tokens = false;
    let c = budget(&redis.url(), cfg, &["other"]);
    let a = c
        .acquire(request(90, Duration::from_secs(1)))
        .await
        .unwrap();
    c.settle(a, Some(10)).await.unwrap();
    assert!(tokens(c.snapshot().await.unwrap()) < 30.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_limited_cluster_wide_and_dropped_admissions_release() {
    let redis = RedisServer::start();
    let cfg = config(60_000, 10_000_000, 1.0, 2);
    let a = budget(&redis.url(), cfg.clone(), &["k"]);
    let b = budget(&redis.url(), cfg, &["k"]);
    let first = a.acquire(request(1, Duration::from_secs(1))).await.unwrap();
    let second = b.acquire(request(1, Duration::from_secs(1))).await.unwrap();
    assert_eq!(b.snapshot().await.unwrap()[0].leases_in_use, 2);
    match b.acquire(request(1, Duration::from_millis(50))).await {
        Err(Error::WaitTooLong { .. }) => {}
        other => panic!("expected WaitTooLong, got {other:?}"),
    }
    // A settle frees a lease for a waiter in another instance.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire(request(1, Duration::from_secs(5))).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.settle(first, None).await.unwrap();
    let third = waiter.await.unwrap().unwrap();
    // Dropping an admission without settle releases its lease (well before lease_secs).
    drop(second);
    let started = Instant::now();
    let fourth = a.acquire(request(1, Duration::from_secs(5))).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    b.settle(third, None).await.unwrap();
    a.settle(fourth, None).await.unwrap();
    assert_eq!(a.snapshot().await.unwrap()[0].leases_in_use, 0);
    let stats = a.stats();
    assert_eq!(
        stats.admissions.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_keys_and_unknown_keys_are_errors() {
    let redis = RedisServer::start();
    let none = budget(&redis.url(), config(60, 6_000, 1.0, 2), &[]);
    assert!(matches!(
        none.acquire(request(1, Duration::from_secs(1))).await,
        Err(Error::NoKeys)
    ));
    let b = budget(&redis.url(), config(60, 6_000, 1.0, 2), &["k"]);
    let err = b
        .feedback("nope", MODEL, ProviderSignal::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownKey(_)) && !err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_a_share_stays_within_it_and_others_take_the_rest() {
    let redis = RedisServer::start();
    let rpm = 1_200; // 20 per second
    let burst = 0.5;
    let mut c = config(rpm, 10_000_000, burst, 1_000);
    c.tenant_shares.insert("acme".into(), 0.25); // 5 per second
    let instances: Vec<_> = (0..2)
        .map(|_| budget(&redis.url(), c.clone(), &["a"]))
        .collect();
    let times: Arc<Mutex<HashMap<&str, Vec<u64>>>> = Arc::default();
    let waited = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = tokio::task::JoinSet::new();
    // Both tenants keep a backlog: as many callers each, from both instances.
    for i in 0..24 {
        let b = instances[i % 2].clone();
        let tenant = if i % 4 < 2 { "acme" } else { "globex" };
        let (times, acme_waited) = (times.clone(), waited.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let a = b
                    .acquire(request(10, Duration::from_secs(5)).with_tenant(tenant))
                    .await
                    .unwrap();
                if tenant == "globex" {
                    assert_eq!(a.tenant_waited, Duration::ZERO, "globex has no share");
                } else if !a.tenant_waited.is_zero() {
                    acme_waited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                times
                    .lock()
                    .unwrap()
                    .entry(tenant)
                    .or_default()
                    .push(a.admitted_at_ms);
                b.settle(a, Some(10)).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let times = times.lock().unwrap().clone();
    let sorted = |tenant: &str| {
        let mut t = times.get(tenant).cloned().unwrap_or_default();
        t.sort_unstable();
        t
    };
    let (acme, globex) = (sorted("acme"), sorted("globex"));
    assert!(
        waited.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "acme's calls waited for its share"
    );
    // acme never runs ahead of its quarter (300 RPM, a bucket of 2.5 requests). Its times are
    // those of the shared admission, a moment after its share was taken: one request of slack.
    let excess = worst_excess(&acme, rpm / 4, burst * rpm as f64 / 4.0 / 60.0);
    assert!(excess <= 1.0, "acme over its share by {excess} requests");
    // The rest of the budget goes to the tenant without a cap, and the whole stays in bounds.
    assert!(
        globex.len() >= 2 * acme.len(),
        "globex {} vs acme {}",
        globex.len(),
        acme.len()
    );
    let mut all = [acme, globex].concat();
    all.sort_unstable();
    let excess = worst_excess(&all, rpm, (burst + 2.0 * LATENESS_SECS) * rpm as f64 / 60.0);
    assert!(excess <= 0.05, "over the budget by {excess} requests");
}

/// A request far above the typical one (a panel's summary after its personas) pays its excess
/// again after it goes: nothing can share a short window with it. Typical ones pay only their
/// own weight, before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outlier_holds_the_budget_after_it_too() {
    let redis = RedisServer::start();
    // 600,000 TPM: 10 tokens a millisecond. Requests do not bind.
    let b = budget(&redis.url(), config(1_000_000, 600_000, 0.0, 100), &["k"]);
    let wait = Duration::from_secs(10);
    let mut last = None;
    for _ in 0..5 {
        let a = b
            .acquire(b.request(MODEL, 100).with_max_wait(wait))
            .await
            .unwrap();
        last = Some(a.admitted_at_ms);
        b.settle(a, Some(100)).await.unwrap();
    }
    // 20,000 tokens: 2 s of budget, paid before it goes.
    let big = b
        .acquire(b.request(MODEL, 20_000).with_max_wait(wait))
        .await
        .unwrap();
    assert!(big.admitted_at_ms >= last.unwrap() + 1_900, "paid before");
    let at = big.admitted_at_ms;
    b.settle(big, Some(20_000)).await.unwrap();
    // The next typical one waits out most of it again (all but twice the typical cost).
    let next = b
        .acquire(b.request(MODEL, 100).with_max_wait(wait))
        .await
        .unwrap();
    let after = next.admitted_at_ms - at;
    assert!(after >= 1_500, "went {after} ms after the outlier");
    let next_at = next.admitted_at_ms;
    b.settle(next, Some(100)).await.unwrap();
    // Typical ones follow each other at their own weight.
    let again = b
        .acquire(b.request(MODEL, 100).with_max_wait(wait))
        .await
        .unwrap();
    let gap = again.admitted_at_ms - next_at;
    assert!(gap < 200, "{gap} ms");
    b.settle(again, Some(100)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_budget_in_use_is_listed_whatever_node_holds_it() {
    // On a cluster (make test-cluster) the budget's keys sit on one of three masters, and a
    // SCAN cursor belongs to one node: the listing must scan that node, every time.
    let redis = RedisServer::start();
    let b = budget(
        &redis.url(),
        config(6_000, 10_000_000, 1.0, 100),
        &["a", "b"],
    );
    for model in [MODEL, "gpt-4o"] {
        for _ in 0..4 {
            let mut req = request(10, Duration::from_secs(5));
            req.model = model.into();
            drop(b.acquire(req).await.unwrap());
        }
    }
    for _ in 0..5 {
        let listed = b.in_use().await.unwrap();
        assert_eq!(
            listed,
            [
                ("a".to_owned(), "gpt-4o".to_owned()),
                ("a".to_owned(), "gpt-4o-mini".to_owned()),
                ("b".to_owned(), "gpt-4o".to_owned()),
                ("b".to_owned(), "gpt-4o-mini".to_owned()),
            ]
        );
    }
}
