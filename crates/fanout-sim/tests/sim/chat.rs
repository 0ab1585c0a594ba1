use std::time::{Duration, Instant};

use async_openai::types::chat::{ChatCompletionStreamOptions, FinishReason, Role};
use fanout_sim::{ModelSpec, SimConfig, spawn};
use futures::StreamExt as _;

use crate::common::{KEY, api_error, chat, client, client_with, raw};

#[tokio::test]
async fn answers_are_deterministic_and_echo_the_prompt() {
    let a = spawn(SimConfig::instant()).await.unwrap();
    let b = spawn(SimConfig {
        seed: 42,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let prompt = "Profile: a bakery in Lyon.\nFind three ideas.";

    let first = client(&a).chat().create(chat(prompt, 200)).await.unwrap();
    let again = client(&b).chat().create(chat(prompt, 200)).await.unwrap();
    let content = first.choices[0].message.content.clone().unwrap();
    assert_eq!(Some(&content), again.choices[0].message.content.as_ref());
    assert_eq!(first.object, "chat.completion");
    assert_eq!(first.model, "gpt-4o-mini");
    assert_eq!(first.choices[0].message.role, Role::Assistant);

    let mut lines = content.lines();
    let hash = lines.next().unwrap().strip_prefix("SIM-ANSWER ").unwrap();
    assert_eq!(hash.len(), 16);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        lines.next().unwrap(),
        "echo: Profile: a bakery in Lyon. Find three ideas."
    );

    let other = client(&a)
        .chat()
        .create(chat("another prompt", 200))
        .await
        .unwrap();
    let other = other.choices[0].message.content.clone().unwrap();
    assert!(!other.starts_with(&format!("SIM-ANSWER {hash}")));
}

#[tokio::test]
async fn usage_is_consistent_with_the_text_and_the_stats() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let mut prompt_total = 0;
    let mut completion_total = 0;
    for (i, max_tokens) in [50u32, 100, 300].into_iter().enumerate() {
        let prompt = format!("question number {i}");
        let response = client
            .chat()
            .create(chat(&prompt, max_tokens))
            .await
            .unwrap();
        let usage = response.usage.unwrap();
        // "You are a test." is 15 chars (4 tokens); 4 more tokens per message.
        let expected_prompt = 4 + 4 + prompt.len().div_ceil(4) as u32 + 4;
        assert_eq!(usage.prompt_tokens, expected_prompt);
        assert!(usage.completion_tokens * 5 >= max_tokens * 3);
        assert!(usage.completion_tokens <= max_tokens);
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );
        let content = response.choices[0].message.content.clone().unwrap();
        assert_eq!(
            content.chars().count().div_ceil(4) as u32,
            usage.completion_tokens
        );
        let expected_finish = if usage.completion_tokens == max_tokens {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        assert_eq!(response.choices[0].finish_reason, Some(expected_finish));
        prompt_total += u64::from(usage.prompt_tokens);
        completion_total += u64::from(usage.completion_tokens);
    }

    let stats = sim.stats();
    assert_eq!(stats.keys.len(), 1);
    let key = &stats.keys[0];
    assert_eq!(key.key, "sk-…0001");
    let c = &key.counters;
    assert_eq!((c.requests, c.admitted, c.completed), (3, 3, 3));
    assert_eq!(
        (c.prompt_tokens, c.completion_tokens),
        (prompt_total, completion_total)
    );
    assert_eq!(c.tokens_charged, prompt_total + 450);
    assert_eq!((c.max_admitted_1s, c.max_admitted_60s), (3, 3));
    assert_eq!(&stats.totals, c);

    // The same numbers over HTTP, then a reset.
    let http = reqwest::Client::new();
    let root = format!("http://{}", sim.addr);
    let over_http: fanout_sim::SimStats = http
        .get(format!("{root}/sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, stats);
    let reset = http.post(format!("{root}/sim/reset")).send().await.unwrap();
    assert_eq!(reset.status(), 204);
    assert_eq!(sim.stats(), fanout_sim::SimStats::default());
}

#[tokio::test]
async fn streaming_sends_deltas_then_the_usage_chunk() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let whole = client.chat().create(chat("stream me", 120)).await.unwrap();

    let mut request = chat("stream me", 120);
    request.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let chunks: Vec<_> = client
        .chat()
        .create_stream(request)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert!(chunks.len() > 4, "{} chunks", chunks.len());
    assert!(
        chunks
            .iter()
            .all(|c| c.object == "chat.completion.chunk" && c.id == chunks[0].id)
    );
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    let text: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|choice| choice.delta.content.clone())
        .collect();
    assert_eq!(Some(text), whole.choices[0].message.content);
    let finishes: Vec<_> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|choice| choice.finish_reason)
        .collect();
    assert_eq!(finishes, [whole.choices[0].finish_reason.unwrap()]);
    let (last, rest) = chunks.split_last().unwrap();
    assert!(last.choices.is_empty());
    assert_eq!(last.usage, whole.usage);
    assert!(rest.iter().all(|c| c.usage.is_none()));

    // Without include_usage there is no usage chunk.
    let chunks: Vec<_> = client
        .chat()
        .create_stream(chat("stream me", 120))
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert!(
        chunks
            .iter()
            .all(|c| c.usage.is_none() && !c.choices.is_empty())
    );
    assert_eq!(
        sim.stats().totals.completion_tokens,
        3 * u64::from(whole.usage.unwrap().completion_tokens)
    );
}

#[tokio::test]
async fn latency_follows_the_model_and_time_scale() {
    let sim = spawn(SimConfig {
        time_scale: 0.01,
        models: vec![ModelSpec {
            name: "gpt-4o-mini".into(),
            ttft_ms: 2_000.0,
            ms_per_output_token: 20.0,
            spread: 0.0,
        }],
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let response = client(&sim).chat().create(chat("slow", 100)).await.unwrap();
    let tokens = u64::from(response.usage.unwrap().completion_tokens);
    // (2000 ms + tokens × 20 ms) × 0.01
    let expected = Duration::from_micros(20_000 + tokens * 200);
    assert!(
        started.elapsed() >= expected,
        "{:?} < {expected:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn models_are_listed() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let models = client(&sim).models().list().await.unwrap();
    let ids: Vec<_> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["gpt-4o-mini", "gpt-4o"]);
    let model = client(&sim).models().retrieve("gpt-4o").await.unwrap();
    assert_eq!(model.id, "gpt-4o");
    let (status, _) = api_error(client(&sim).models().retrieve("nope").await);
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_missing_key_is_refused_with_401() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let response = raw(&sim, None, "hello", 10).await;
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _) = api_error(
        client_with(&sim, "", Duration::from_secs(5))
            .chat()
            .create(chat("hi", 5))
            .await,
    );
    assert_eq!(status, 401);
    let stats = sim.stats();
    assert_eq!(stats.unauthenticated, 2);
    assert_eq!(stats.totals.requests, 0);
    assert_eq!(raw(&sim, Some(KEY), "hello", 10).await.status(), 200);
}

#[tokio::test]
async fn shutdown_ends_hanging_requests() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let hanging = tokio::spawn(async move { client.chat().create(chat("[sim:hang]", 10)).await });
    while sim.stats().totals.hung == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), sim.shutdown())
        .await
        .expect("shutdown waits for nothing but the hanging request")
        .unwrap();
    let (status, _) = api_error(hanging.await.unwrap());
    assert_eq!(status, 503);
}
