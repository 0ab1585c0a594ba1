//! The budget finds the provider's real limits: advertised limits are learnt for every instance
//! (and outlive them), an explicit configuration caps them, unexpected 429s lower the rate and
//! quiet brings it back, and a refused call gives back what it took.

mod common;

use std::time::Duration;

use common::{MODEL, budget, config, unix_ms};
use fanout_core::config::{Adaptive, BudgetConfig, LimitCaps};
use fanout_ratelimit::{Budget, Dimension, ProviderSignal};
use fanout_test_support::RedisServer;

/// A budget that starts from `rpm`/`tpm` (as the plan's numbers: no cap) and learns.
fn learning(rpm: u64, tpm: u64) -> BudgetConfig {
    BudgetConfig {
        caps: LimitCaps::default(),
        learn_limits: true,
        ..config(rpm, tpm, 0.0, 100)
    }
}

/// The effective (requests, tokens) per minute the instance sees now.
async fn effective(b: &Budget) -> (f64, f64) {
    let s = &b.snapshot().await.unwrap()[0];
    (s.requests_per_minute, s.tokens_per_minute)
}

fn advertised(rpm: u64, tpm: u64) -> ProviderSignal {
    ProviderSignal {
        status: 200,
        limit_requests: Some(rpm),
        limit_tokens: Some(tpm),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_learns_the_limits_and_every_instance_adopts_them() {
    let redis = RedisServer::start();
    let a = budget(&redis.url(), learning(3_500, 200_000), &["k"]);
    let b = budget(&redis.url(), learning(3_500, 200_000), &["k"]);
    b.track(MODEL);

    // Nothing is known: the first call goes alone, the others wait for its answer.
    let probe = a
        .acquire(a.request(MODEL, 10).with_max_wait(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(probe.probe, "the first call is the probe");
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move {
            b.acquire(b.request(MODEL, 10).with_max_wait(Duration::from_secs(5)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a second call waits for the probe");

    // Its answer advertises 120 RPM and 30,000 TPM: both instances pace to those.
    let signal = ProviderSignal {
        admitted_at_ms: Some(probe.admitted_at_ms),
        probe: true,
        ..advertised(120, 30_000)
    };
    a.feedback(&probe.key, MODEL, signal).await.unwrap();
    a.settle(probe, Some(10)).await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert!(!second.probe);
    b.settle(second, Some(10)).await.unwrap();
    assert_eq!(effective(&a).await, (120.0, 30_000.0));
    assert_eq!(effective(&b).await, (120.0, 30_000.0));
    let snap = &b.snapshot().await.unwrap()[0];
    assert_eq!(snap.learnt_requests_per_minute, Some(120));
    assert_eq!(snap.configured_requests_per_minute, 3_500);

    // 120 RPM: one call every 500 ms (less the 2% headroom), whichever instance asks.
    let started = std::time::Instant::now();
    for i in 0..4 {
        let who = if i % 2 == 0 { &a } else { &b };
        let adm = who
            .acquire(who.request(MODEL, 10).with_max_wait(Duration::from_secs(5)))
            .await
            .unwrap();
        who.settle(adm, Some(10)).await.unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "paced to the learnt 120 RPM: {:?}",
        started.elapsed()
    );

    // A new instance (a restarted worker) knows them at once, without a probe.
    let c = budget(&redis.url(), learning(3_500, 200_000), &["k"]);
    c.track(MODEL);
    assert_eq!(effective(&c).await, (120.0, 30_000.0));
    let adm = c
        .acquire(c.request(MODEL, 10).with_max_wait(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        !adm.probe,
        "learnt limits outlive the instance that learnt them"
    );
    c.settle(adm, Some(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_configuration_caps_what_the_provider_advertises() {
    let redis = RedisServer::start();
    // Told 300 RPM explicitly: a share of a key that other apps use too.
    let capped = BudgetConfig {
        caps: LimitCaps {
            requests_per_minute: Some(300),
            tokens_per_minute: None,
        },
        ..learning(300, 200_000)
    };
    let a = budget(&redis.url(), capped, &["k"]);
    a.track(MODEL);
    a.feedback("k", MODEL, advertised(1_000, 400_000))
        .await
        .unwrap();
    // Requests stay at the cap; tokens, not capped, follow the provider.
    assert_eq!(effective(&a).await, (300.0, 400_000.0));
    // An advertised limit below the cap wins.
    a.feedback("k", MODEL, advertised(200, 400_000))
        .await
        .unwrap();
    assert_eq!(effective(&a).await, (200.0, 400_000.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_429_lowers_the_rate_once_per_decrease_and_quiet_brings_it_back() {
    let redis = RedisServer::start();
    let cfg = BudgetConfig {
        learn_limits: false,
        adaptive: Adaptive {
            enabled: true,
            decrease: 0.5,
            quiet_secs: 0.5,
            recovery_secs: 2.0,
        },
        ..learning(1_200, 1_000_000)
    };
    let a = budget(&redis.url(), cfg.clone(), &["k"]);
    let b = budget(&redis.url(), cfg, &["k"]);
    b.track(MODEL);
    let in_flight = unix_ms();
    let refused = |admitted: u64, limited| ProviderSignal {
        status: 429,
        retry_after: Some(Duration::from_millis(10)),
        limited,
        admitted_at_ms: Some(admitted),
        ..Default::default()
    };
    a.feedback("k", MODEL, refused(in_flight, Some(Dimension::Requests)))
        .await
        .unwrap();
    let (rpm, tpm) = effective(&b).await;
    assert!(
        (rpm - 600.0).abs() < 1.0,
        "halved for every instance: {rpm}"
    );
    assert_eq!(tpm, 1_000_000.0, "only the dimension the 429 named");
    // More 429s for calls admitted before the decrease (in flight then) change nothing.
    b.feedback("k", MODEL, refused(in_flight, Some(Dimension::Requests)))
        .await
        .unwrap();
    assert!((effective(&a).await.0 - 600.0).abs() < 1.0);
    // One admitted after it lowers again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.feedback("k", MODEL, refused(unix_ms(), None))
        .await
        .unwrap();
    let (rpm, tpm) = effective(&a).await;
    assert!((rpm - 300.0).abs() < 1.0, "{rpm}");
    assert!(
        (tpm - 500_000.0).abs() < 1.0,
        "an unknown dimension lowers both"
    );
    assert_eq!(
        a.stats()
            .decreases
            .load(std::sync::atomic::Ordering::Relaxed)
            + b.stats()
                .decreases
                .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // Quiet: after 0.5 s it climbs 1,200 RPM per 2 s, back to the limit, and stays there.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (climbing, _) = effective(&a).await;
    assert!(climbing > 350.0 && climbing < 1_200.0, "{climbing}");
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(effective(&a).await, (1_200.0, 1_000_000.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_call_gives_back_what_it_took_and_too_large_fails_at_once() {
    let redis = RedisServer::start();
    // 60 RPM, 6,000 TPM, no refunds of unused tokens.
    let a = budget(&redis.url(), config(60, 6_000, 0.0, 100), &["k"]);
    // More than a whole minute of tokens: no wait makes it fit; it is refused without a call.
    match a
        .acquire(
            a.request(MODEL, 12_000)
                .with_max_wait(Duration::from_secs(1)),
        )
        .await
    {
        Err(fanout_ratelimit::Error::TooLarge {
            tokens: 12_000,
            tokens_per_minute: 6_000,
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A big call that fits the minute, but the provider refuses it (a 429: over its rate, or
    // "request too large" for a lower limit of its own). The worker passes "request too large"
    // as an answer, not as a rate limit: no pause.
    let big = a
        .acquire(
            a.request(MODEL, 5_000)
                .with_max_wait(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    a.feedback("k", MODEL, ProviderSignal::for_admission(&big, 200))
        .await
        .unwrap();
    a.settle_refused(big).await.unwrap();
    let snap = &a.snapshot().await.unwrap()[0];
    assert_eq!(snap.paused_for, None, "too large never pauses the budget");
    // Nothing was charged: the next call goes at once instead of after 50 s of token debt and a
    // second of request spacing.
    let next = a
        .acquire(
            a.request(MODEL, 100)
                .with_max_wait(Duration::from_millis(200)),
        )
        .await
        .expect("the refused call left no debt");
    a.settle(next, Some(100)).await.unwrap();
}
