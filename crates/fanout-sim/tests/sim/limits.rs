use std::collections::BTreeMap;
use std::time::Duration;

use fanout_sim::{KeyLimits, LimitShape, SimConfig, spawn};

use crate::common::{KEY, api_error, chat, client, client_with, header, raw, raw_model};

const RATE_HEADERS: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// A reset duration as OpenAI formats it (`1s`, `250ms`, `6m0s`), in milliseconds.
fn reset_ms(value: &str) -> f64 {
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse().unwrap();
    }
    let (minutes, seconds) = value.split_once('m').unwrap_or(("0", value));
    let seconds: f64 = seconds.strip_suffix('s').unwrap().parse().unwrap();
    (minutes.parse::<f64>().unwrap() * 60.0 + seconds) * 1000.0
}

#[tokio::test]
async fn rpm_limit_answers_429_with_openai_headers_and_refills() {
    // 60 RPM: one request per second, a burst of one.
    let sim = spawn(SimConfig {
        rpm: 60,
        tpm: 600_000,
        ..SimConfig::instant()
    })
    .await
    .unwrap();

    let ok = raw(&sim, Some(KEY), "first", 100).await;
    assert_eq!(ok.status(), 200);
    for name in RATE_HEADERS {
        header(&ok, name);
    }
    assert_eq!(header(&ok, "x-ratelimit-limit-requests"), "60");
    assert_eq!(header(&ok, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&ok, "x-ratelimit-limit-tokens"), "600000");
    let reset = reset_ms(&header(&ok, "x-ratelimit-reset-requests"));
    assert!(reset > 0.0 && reset <= 1000.0, "{reset}");
    // The request charged prompt (2 + 4) + max_tokens (100) of a 10,000-token bucket: on the
    // per-minute scale, 600,000 × 9,894 / 10,000 remain (plus what refilled since).
    let remaining_tokens: u64 = header(&ok, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(
        (593_640..600_000).contains(&remaining_tokens),
        "{remaining_tokens}"
    );

    let refused = raw(&sim, Some(KEY), "second", 100).await;
    assert_eq!(refused.status(), 429);
    for name in RATE_HEADERS {
        header(&refused, name);
    }
    assert_eq!(header(&refused, "retry-after"), "1");
    let retry_ms: u64 = header(&refused, "retry-after-ms").parse().unwrap();
    assert!((1..=1000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Rate limit reached for requests")
    );

    // The bucket refills after the advertised wait.
    tokio::time::sleep(Duration::from_millis(retry_ms)).await;
    assert_eq!(raw(&sim, Some(KEY), "third", 100).await.status(), 200);

    let stats = sim.stats().totals;
    assert_eq!(
        (stats.requests, stats.admitted, stats.rate_limited),
        (3, 2, 1)
    );
    assert_eq!(stats.max_admitted_1s, 1);
    assert_eq!(stats.max_admitted_60s, 2);
}

#[tokio::test]
async fn tpm_limit_charges_max_tokens_up_front() {
    // 6,000 TPM: a bucket of 100 tokens, refilling 100 per second.
    let sim = spawn(SimConfig {
        tpm: 6_000,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let client = client(&sim);
    // "hi": 1 + 4 tokens, system message 4 + 4, max_tokens 80: 93 tokens.
    let response = client.chat().create(chat("hi", 80)).await.unwrap();
    assert!(response.usage.unwrap().completion_tokens < 93);
    let (status, error) = api_error(client.chat().create(chat("hi", 80)).await);
    assert_eq!(status, 429);
    assert_eq!(error.r#type.as_deref(), Some("tokens"));
    assert_eq!(error.code.as_deref(), Some("rate_limit_exceeded"));
    // Too large for the whole minute: refused for good.
    let (status, error) = api_error(client.chat().create(chat("hi", 7_000)).await);
    assert_eq!(status, 429);
    assert!(
        error.message.starts_with("Request too large"),
        "{}",
        error.message
    );

    let totals = sim.stats().totals;
    assert_eq!(totals.tokens_charged, 93);
    assert_eq!((totals.admitted, totals.rate_limited), (1, 2));
}

#[tokio::test]
async fn keys_have_their_own_buckets_and_overrides() {
    let sim = spawn(SimConfig {
        rpm: 60,
        keys: BTreeMap::from([(
            "sk-sim-test-key-big".to_owned(),
            KeyLimits {
                rpm: Some(6_000),
                tpm: None,
            },
        )]),
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let small = client(&sim);
    let big = client_with(&sim, "sk-sim-test-key-big", Duration::from_secs(30));
    small.chat().create(chat("a", 10)).await.unwrap();
    let (status, _) = api_error(small.chat().create(chat("a", 10)).await);
    assert_eq!(status, 429);
    for _ in 0..5 {
        big.chat().create(chat("a", 10)).await.unwrap();
    }
    let stats = sim.stats();
    let limits: Vec<_> = stats
        .keys
        .iter()
        .map(|k| (k.key.as_str(), k.rpm_limit, k.counters.admitted))
        .collect();
    assert_eq!(limits, [("sk-…-big", 6_000, 5), ("sk-…0001", 60, 1)]);
    assert_eq!(stats.totals.max_admitted_1s, 6);
}

#[tokio::test]
async fn models_with_limits_of_their_own_are_limited_apart() {
    let sim = spawn(SimConfig {
        rpm: 600,
        model_limits: BTreeMap::from([(
            "gpt-4o".to_owned(),
            KeyLimits {
                rpm: Some(60),
                tpm: None,
            },
        )]),
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let big = |key| raw_model(&sim, Some(key), "gpt-4o", "a", 10);
    let ok = big(KEY).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(header(&ok, "x-ratelimit-limit-requests"), "60");
    // 60 RPM over a second: the key's second gpt-4o request waits...
    let refused = big(KEY).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-limit-requests"), "60");
    // ...while its other models still have the key's 600 RPM, and other keys their own gpt-4o.
    let mini = raw(&sim, Some(KEY), "a", 10).await;
    assert_eq!(mini.status(), 200);
    assert_eq!(header(&mini, "x-ratelimit-limit-requests"), "600");
    assert_eq!(header(&mini, "x-ratelimit-remaining-requests"), "540");
    assert_eq!(big("sk-sim-test-key-0002").await.status(), 200);
}

#[tokio::test]
async fn a_provider_may_not_advertise_its_limits() {
    let sim = spawn(SimConfig {
        rpm: 60,
        tpm: 600_000,
        rate_headers: false,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let ok = raw(&sim, Some(KEY), "a", 10).await;
    assert_eq!(ok.status(), 200);
    let refused = raw(&sim, Some(KEY), "a", 10).await;
    assert_eq!(refused.status(), 429);
    for response in [&ok, &refused] {
        let advertised: Vec<_> = response
            .headers()
            .keys()
            .filter(|name| name.as_str().starts_with("x-ratelimit-"))
            .collect();
        assert!(advertised.is_empty(), "{advertised:?}");
    }
    assert_eq!(header(&refused, "retry-after"), "1");
    header(&refused, "retry-after-ms");
}

#[tokio::test]
async fn a_window_shape_is_chosen_per_run() {
    // 60 RPM in a sliding window of 10 s: 10 in any 10 seconds.
    let sim = spawn(SimConfig {
        rpm: 60,
        limit_shape: LimitShape::SlidingWindow,
        window_secs: 10.0,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    for _ in 0..10 {
        assert_eq!(raw(&sim, Some(KEY), "a", 10).await.status(), 200);
    }
    let refused = raw(&sim, Some(KEY), "a", 10).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), "10");
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    let reset = reset_ms(&header(&refused, "x-ratelimit-reset-requests"));
    assert!(reset > 9_000.0 && reset <= 10_000.0, "{reset}");
}

#[tokio::test]
async fn a_neighbour_is_counted_apart() {
    // 60,000 RPM, half of it drawn by a neighbour on the same key.
    let sim = spawn(SimConfig {
        rpm: 60_000,
        tpm: 6_000_000,
        neighbour_share: 0.5,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let ok = raw(&sim, Some(KEY), "a", 10).await;
    assert_eq!(ok.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = sim.stats();
    let totals = &stats.totals;
    // 500 requests a second wanted: about 100 in 200 ms, none of them the key's own.
    assert!(totals.neighbour_requests >= 90, "{totals:?}");
    assert!(totals.neighbour_tokens >= 9_000, "{totals:?}");
    assert_eq!((totals.requests, totals.admitted), (1, 1));
    assert_eq!(totals.tokens_charged, 15);
    let key = &stats.keys[0].counters;
    assert_eq!(key.admitted, 1);
    assert_eq!(key.neighbour_requests, totals.neighbour_requests);
}
