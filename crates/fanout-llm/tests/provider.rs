//! The client against the simulated provider: usage and headers, every fault classified, one
//! provider request per call, and the retry loop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanout_core::config::{ApiKey, Price, ProviderConfig, Secret};
use fanout_llm::{
    CallError, ChatRequest, CostTable, ErrorKind, LlmClient, RetryPolicy, cost, estimate_tokens,
};
use fanout_sim::{SimConfig, SimHandle};

const SECRET: &str = "sk-test-fanout-llm-0001";

fn provider(sim: &SimHandle, timeout_secs: u64) -> ProviderConfig {
    ProviderConfig {
        base_url: sim.base_url(),
        default_model: "gpt-4o-mini".into(),
        request_timeout_secs: timeout_secs,
        keys: vec![
            ApiKey {
                name: "main".into(),
                secret: Secret::new(SECRET),
            },
            ApiKey {
                name: "spare".into(),
                secret: Secret::new("sk-test-fanout-llm-0002"),
            },
        ],
    }
}

fn request(user: &str) -> ChatRequest {
    ChatRequest {
        model: "gpt-4o-mini".into(),
        system: Some("You are a terse analyst.".into()),
        user: user.into(),
        max_tokens: 64,
        temperature: Some(0.2),
    }
}

async fn sim(config: SimConfig) -> SimHandle {
    fanout_sim::spawn(config)
        .await
        .expect("start the simulator")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test]
async fn success_returns_text_usage_and_rate_headers() {
    let sim = sim(SimConfig {
        rpm: 600,
        tpm: 1_000_000,
        ..SimConfig::instant()
    })
    .await;
    let client = LlmClient::new(&provider(&sim, 10)).unwrap();
    let r = client
        .call("main", &request("Summarise the idea."))
        .await
        .unwrap();

    assert!(!r.text.is_empty());
    assert_eq!(r.model, "gpt-4o-mini");
    assert!(r.prompt_tokens > 0 && r.completion_tokens > 0 && r.completion_tokens <= 64);
    assert!(matches!(
        r.finish_reason.as_deref(),
        Some("stop" | "length")
    ));
    assert!(!r.cached);
    let h = &r.headers;
    assert_eq!(h.limit_requests, Some(600));
    assert_eq!(h.limit_tokens, Some(1_000_000));
    assert!(h.remaining_requests.unwrap() < 600);
    assert!(h.remaining_tokens.unwrap() < 1_000_000);
    assert!(h.reset_requests.is_some() && h.reset_tokens.is_some());
    assert_eq!(h.retry_after, None);

    let stats = sim.stats();
    assert_eq!(stats.totals.requests, 1);
    assert_eq!(stats.totals.prompt_tokens, r.prompt_tokens);
    assert_eq!(stats.totals.completion_tokens, r.completion_tokens);
    // Admission reserves at least what the provider charged up front (prompt + max_tokens),
    // give or take the tokenizer: the sim counts characters / 4.
    let charged = stats.totals.tokens_charged;
    let estimate = estimate_tokens(&request("Summarise the idea."));
    assert!(
        estimate.abs_diff(charged) <= 10,
        "estimate {estimate}, charged {charged}"
    );
}

/// (marker, kind, status) for every fault the simulator can inject.
const FAULTS: &[(&str, ErrorKind, Option<u16>)] = &[
    ("[sim:fail]", ErrorKind::Server, Some(500)),
    ("[sim:error=500]", ErrorKind::Server, Some(500)),
    ("[sim:truncate]", ErrorKind::Decode, Some(200)),
    ("[sim:hang]", ErrorKind::Timeout, None),
    ("[sim:quota]", ErrorKind::QuotaExceeded, Some(429)),
    ("[sim:error=400]", ErrorKind::BadRequest, Some(400)),
    ("[sim:error=401]", ErrorKind::Unauthorized, Some(401)),
    ("[sim:error=404]", ErrorKind::NotFound, Some(404)),
    ("[sim:context_length]", ErrorKind::ContextLength, Some(400)),
];

#[tokio::test]
async fn every_fault_is_classified_after_exactly_one_request() {
    let sim = sim(SimConfig::instant()).await;
    let client = LlmClient::new(&provider(&sim, 10))
        .unwrap()
        .with_request_timeout(ms(300));
    for (i, (marker, kind, status)) in FAULTS.iter().enumerate() {
        let e: CallError = client
            .call("main", &request(&format!("Analyse this. {marker}")))
            .await
            .expect_err(marker);
        assert_eq!(e.kind, *kind, "{marker}: {e}");
        assert_eq!(e.status, *status, "{marker}: {e}");
        assert_eq!(e.is_retryable(), kind.is_retryable(), "{marker}");
        assert!(!e.message.is_empty(), "{marker}");
        assert!(!e.message.contains(SECRET), "{marker}: {e}");
        // No hidden retries: one call, one request seen by the provider.
        assert_eq!(sim.stats().totals.requests, i as u64 + 1, "{marker}");
    }
    let stats = sim.stats().totals;
    assert_eq!(stats.server_errors, 2);
    assert_eq!(stats.truncated, 1);
    assert_eq!(stats.hung, 1);
    assert_eq!(stats.quota_exceeded, 1);
}

#[tokio::test]
async fn fatal_errors_carry_the_providers_message() {
    let sim = sim(SimConfig::instant()).await;
    let client = LlmClient::new(&provider(&sim, 10)).unwrap();
    let call = async |marker: &str| client.call("main", &request(marker)).await.unwrap_err();

    let e = call("[sim:error=400]").await;
    assert_eq!(e.message, "Invalid request (simulated by [sim:error=400]).");
    assert!(!e.is_retryable());
    let e = call("[sim:error=401]").await;
    assert!(e.message.starts_with("Incorrect API key provided"), "{e}");
    assert!(!e.is_retryable());
    let e = call("[sim:quota]").await;
    assert!(e.message.contains("exceeded your current quota"), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(e.retry_after(), None);
    let e = call("[sim:context_length]").await;
    assert!(e.message.contains("maximum context length"), "{e}");
    assert!(!e.is_retryable());

    // An unknown key name is fatal and sends nothing.
    let before = sim.stats().totals.requests;
    let e = client.call("nope", &request("hi")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized);
    assert_eq!(sim.stats().totals.requests, before);
    assert!(!format!("{client:?}").contains(SECRET));
}

#[tokio::test]
async fn rate_limit_is_retryable_with_the_providers_delay() {
    // 120 RPM: a bucket of 2 requests refilling one every 500 ms.
    let sim = sim(SimConfig {
        rpm: 120,
        ..SimConfig::instant()
    })
    .await;
    let client = LlmClient::new(&provider(&sim, 10)).unwrap();
    let policy = RetryPolicy::new(ms(1), ms(5), 5);
    let req = request("Rate me.");
    client.call("main", &req).await.unwrap();
    client.call("main", &req).await.unwrap();

    // The worker's loop: call, and on failure wait next_delay before the next attempt.
    let mut attempt = 1;
    let mut waited = Vec::new();
    let response = loop {
        match client.call("main", &req).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::RateLimited, "{e}");
                assert_eq!(e.status, Some(429));
                assert!(e.is_retryable());
                let retry_after = e.retry_after().expect("a 429 says how long to wait");
                assert!(
                    retry_after > ms(100) && retry_after <= ms(600),
                    "{retry_after:?}"
                );
                assert_eq!(e.headers.limit_requests, Some(120));
                assert_eq!(e.headers.remaining_requests, Some(0));
                let delay = policy.next_delay(attempt, &e).unwrap();
                assert!(delay >= retry_after, "{delay:?} < {retry_after:?}");
                let started = Instant::now();
                tokio::time::sleep(delay).await;
                waited.push((started.elapsed(), retry_after));
                attempt += 1;
            }
        }
    };
    assert!(!response.text.is_empty());
    // One 429, then waiting the provider's delay was enough.
    assert_eq!(attempt, 2);
    assert!(waited.iter().all(|(w, ra)| w >= ra));
    let stats = sim.stats().totals;
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.requests, 4);
}

#[tokio::test]
async fn retry_loop_succeeds_on_attempt_three_with_one_request_per_attempt() {
    let sim = sim(SimConfig::instant()).await;
    let client = LlmClient::new(&provider(&sim, 10)).unwrap();
    let policy = RetryPolicy::new(ms(5), ms(20), 5);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let retried = client
        .call_with_retries("main", &request("[sim:fail_first=2] Profile."), &policy, {
            let seen = seen.clone();
            move |attempt| {
                seen.lock().unwrap().push(attempt);
                async {}
            }
        })
        .await;
    let response = retried.result.expect("third attempt succeeds");
    assert!(!response.text.is_empty());
    assert_eq!(retried.attempts, 3);
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    let stats = sim.stats().totals;
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.server_errors, 2);
    assert_eq!(stats.completed, 1);

    // A fatal error stops at once; a retryable one stops at max_attempts.
    let retried = client
        .call_with_retries("main", &request("[sim:quota] x"), &policy, |_| async {})
        .await;
    assert_eq!(retried.attempts, 1);
    assert_eq!(retried.result.unwrap_err().kind, ErrorKind::QuotaExceeded);
    let retried = client
        .call_with_retries("main", &request("[sim:fail] x"), &policy, |_| async {})
        .await;
    assert_eq!(retried.attempts, 5);
    assert_eq!(retried.result.unwrap_err().kind, ErrorKind::Server);
    assert_eq!(sim.stats().totals.requests, 3 + 1 + 5);
}

#[tokio::test]
async fn keys_are_used_by_name() {
    let sim = sim(SimConfig::instant()).await;
    let client = LlmClient::new(&provider(&sim, 10)).unwrap();
    assert_eq!(client.key_names().collect::<Vec<_>>(), ["main", "spare"]);
    client.call("main", &request("a")).await.unwrap();
    client.call("spare", &request("b")).await.unwrap();
    client.call("spare", &request("c")).await.unwrap();
    let mut per_key: Vec<u64> = sim
        .stats()
        .keys
        .iter()
        .map(|k| k.counters.requests)
        .collect();
    per_key.sort();
    assert_eq!(per_key, [1, 2]);
    assert!(sim.stats().keys.iter().all(|k| !k.key.contains(SECRET)));
}

#[tokio::test]
async fn cost_is_usage_times_price() {
    let sim = sim(SimConfig::instant()).await;
    let client = LlmClient::new(&provider(&sim, 10)).unwrap();
    let price = Price::new(0.15, 0.60);
    let table = CostTable::new([("gpt-4o-mini".to_owned(), price)].into());
    let mut total = 0.0;
    for i in 0..3 {
        let r = client
            .call("main", &request(&format!("Idea {i}")))
            .await
            .unwrap();
        total += table.cost_of(&r);
    }
    let usage = sim.stats().totals;
    let expected =
        (usage.prompt_tokens as f64 * 0.15 + usage.completion_tokens as f64 * 0.60) / 1e6;
    assert!(expected > 0.0);
    assert!((total - expected).abs() < 1e-12, "{total} vs {expected}");
    assert_eq!(
        cost(Some(price), usage.prompt_tokens, usage.completion_tokens),
        expected
    );
}

#[test]
fn no_keys_is_a_clear_error() {
    let config = ProviderConfig {
        base_url: "http://127.0.0.1:9/v1".into(),
        default_model: "gpt-4o-mini".into(),
        request_timeout_secs: 1,
        keys: vec![],
    };
    let e = LlmClient::new(&config).unwrap_err();
    assert!(e.to_string().contains("OPENAI_API_KEY"), "{e}");
}

#[tokio::test]
async fn connection_refused_is_retryable_and_known_to_have_reached_nobody() {
    let port = fanout_test_support::free_port();
    let config = ProviderConfig {
        base_url: format!("http://127.0.0.1:{port}/v1"),
        default_model: "gpt-4o-mini".into(),
        request_timeout_secs: 5,
        keys: vec![ApiKey {
            name: "main".into(),
            secret: Secret::new(SECRET),
        }],
    };
    let client = LlmClient::new(&config).unwrap();
    let e = client.call("main", &request("hi")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Connection, "{e}");
    assert!(e.is_retryable());
    assert!(e.unreached, "nothing was sent: {e}");
    assert_eq!(e.status, None);
    assert!(!e.message.contains(SECRET));
}
