//! The response cache against a private Redis and the simulated provider.

use std::time::Duration;

use deadpool_redis::redis::AsyncCommands as _;
use fanout_core::config::{ApiKey, ProviderConfig, Secret};
use fanout_llm::{CacheStats, ChatRequest, ChatResponse, LlmClient, ResponseCache};
use fanout_sim::SimConfig;
use fanout_test_support::RedisServer;

fn pool(redis: &RedisServer) -> fanout_core::redis::Pool {
    fanout_test_support::redis_pool(&redis.url())
}

fn request(user: &str) -> ChatRequest {
    ChatRequest {
        model: "gpt-4o-mini".into(),
        system: None,
        user: user.into(),
        max_tokens: 32,
        temperature: Some(0.0),
    }
}

/// The caller's side of the cache: look up, else call and store.
async fn cached_call(cache: &ResponseCache, client: &LlmClient, req: &ChatRequest) -> ChatResponse {
    if let Some(hit) = cache.get(req).await {
        return hit;
    }
    let response = client.call("main", req).await.unwrap();
    cache.put(req, &response).await;
    response
}

#[tokio::test]
async fn second_identical_call_is_served_from_the_cache() {
    let redis = RedisServer::start();
    let sim = fanout_sim::spawn(SimConfig::instant()).await.unwrap();
    let client = LlmClient::new(&ProviderConfig {
        base_url: sim.base_url(),
        default_model: "gpt-4o-mini".into(),
        request_timeout_secs: 10,
        keys: vec![ApiKey {
            name: "main".into(),
            secret: Secret::new("sk-test-cache-0001"),
        }],
    })
    .unwrap();
    let cache = ResponseCache::new(pool(&redis), "t1", Duration::from_secs(60));

    let first = cached_call(&cache, &client, &request("Critique this.")).await;
    let second = cached_call(&cache, &client, &request("Critique this.")).await;
    assert!(!first.cached);
    assert!(second.cached);
    assert_eq!(second.text, first.text);
    assert_eq!(
        (second.prompt_tokens, second.completion_tokens),
        (first.prompt_tokens, first.completion_tokens)
    );
    assert!(second.headers.is_empty());
    assert_eq!(
        sim.stats().totals.requests,
        1,
        "the second call reached the provider"
    );
    assert_eq!(
        cache.stats(),
        CacheStats {
            hits: 1,
            misses: 1,
            errors: 0
        }
    );

    // A different request is a different entry.
    cached_call(&cache, &client, &request("Critique that.")).await;
    assert_eq!(sim.stats().totals.requests, 2);

    // The entry lives under the namespace with the configured TTL.
    let key = cache.keys().entry(&request("Critique this."));
    assert!(key.starts_with("t1:cache:"));
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl_ms: i64 = conn.pttl(&key).await.unwrap();
    assert!(ttl_ms > 50_000 && ttl_ms <= 60_000, "{ttl_ms}");
}

#[tokio::test]
async fn redis_down_is_a_miss_not_an_error() {
    let mut redis = RedisServer::start();
    let cache = ResponseCache::new(pool(&redis), "t2", Duration::from_secs(60))
        .with_op_timeout(Duration::from_millis(500));
    let req = request("hello");
    let response = ChatResponse {
        text: "hi".into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 9,
        completion_tokens: 1,
        latency: Duration::from_millis(12),
        headers: Default::default(),
        finish_reason: Some("stop".into()),
        cached: false,
    };
    cache.put(&req, &response).await;
    assert_eq!(cache.get(&req).await.unwrap().text, "hi");

    redis.kill();
    assert!(cache.get(&req).await.is_none());
    cache.put(&req, &response).await;
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1));
    assert_eq!(stats.errors, 2);

    // Back on the same port (empty: no persistence): misses again, without errors.
    redis.restart();
    let mut recovered = false;
    for _ in 0..20 {
        let before = cache.stats().errors;
        if cache.get(&req).await.is_none() && cache.stats().errors == before {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "cache did not recover after redis came back");
}
