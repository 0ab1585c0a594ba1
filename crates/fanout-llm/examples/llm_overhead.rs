//! Measures what the client adds around a provider call (no pass/fail):
//! tokenizer warm-up, token estimation, and calls per second against an instant simulator.
//!
//! `cargo run --release -p fanout-llm --example llm_overhead`

use std::sync::Arc;
use std::time::Instant;

use fanout_core::config::{ApiKey, ProviderConfig, Secret};
use fanout_llm::{ChatRequest, LlmClient, estimate_tokens};
use fanout_sim::SimConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let t = Instant::now();
    fanout_llm::warm_up_tokenizers("gpt-4o");
    fanout_llm::warm_up_tokenizers("gpt-4");
    println!("tokenizer warm-up (both encodings): {:?}", t.elapsed());

    let long = "The founder has ten years in logistics and wants a B2B product. ".repeat(150);
    let req = ChatRequest {
        model: "gpt-4o-mini".into(),
        system: Some("You are a startup analyst.".into()),
        user: long,
        max_tokens: 800,
        temperature: None,
    };
    let n = 200;
    let t = Instant::now();
    let mut tokens = 0;
    for _ in 0..n {
        tokens = estimate_tokens(&req);
    }
    println!(
        "estimate_tokens on a {}-char prompt ({} tokens): {:?} each",
        req.user.len(),
        tokens,
        t.elapsed() / n
    );

    let sim = fanout_sim::spawn(SimConfig::instant()).await?;
    let client = Arc::new(LlmClient::new(&ProviderConfig {
        base_url: sim.base_url(),
        default_model: "gpt-4o-mini".into(),
        request_timeout_secs: 30,
        keys: vec![ApiKey {
            name: "main".into(),
            secret: Secret::new("sk-bench-0001"),
        }],
    })?);
    let small = ChatRequest {
        model: "gpt-4o-mini".into(),
        system: None,
        user: "Name one prime.".into(),
        max_tokens: 16,
        temperature: None,
    };
    for _ in 0..50 {
        client
            .call("main", &small)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let n = 2_000u32;
    let t = Instant::now();
    for _ in 0..n {
        client
            .call("main", &small)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let seq = t.elapsed();
    println!(
        "sequential calls: {:?} each ({:.0}/s)",
        seq / n,
        f64::from(n) / seq.as_secs_f64()
    );

    // Baseline: the same request as raw JSON over plain reqwest, no async-openai, no capture.
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", sim.base_url());
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Name one prime."}],
        "max_tokens": 16,
    });
    let t = Instant::now();
    for _ in 0..n {
        let r = http
            .post(&url)
            .bearer_auth("sk-bench-0001")
            .json(&body)
            .send()
            .await?;
        let _: serde_json::Value = r.json().await?;
    }
    let raw = t.elapsed();
    println!(
        "sequential raw reqwest (baseline): {:?} each; client overhead {:?} per call",
        raw / n,
        seq.saturating_sub(raw) / n
    );

    let concurrency = 64;
    let per_task = 100;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let small = small.clone();
        tasks.spawn(async move {
            for _ in 0..per_task {
                client
                    .call("main", &small)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?.map_err(anyhow::Error::msg)?;
    }
    let total = concurrency * per_task;
    let elapsed = t.elapsed();
    println!(
        "{concurrency} concurrent callers: {total} calls in {:?} ({:.0}/s)",
        elapsed,
        f64::from(total) / elapsed.as_secs_f64()
    );
    println!("sim saw {} requests", sim.stats().totals.requests);
    sim.shutdown().await?;
    Ok(())
}
