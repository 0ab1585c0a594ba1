use std::time::Duration;

use async_openai::error::OpenAIError;
use fanout_sim::{SimConfig, spawn};
use futures::StreamExt as _;

use crate::common::{KEY, api_error, chat, client, client_with, header, raw};

#[tokio::test]
async fn fail_marker_answers_500_after_admission() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let (status, _) = api_error(
        client(&sim)
            .chat()
            .create(chat("boom [sim:fail]", 10))
            .await,
    );
    assert_eq!(status, 500);
    let totals = sim.stats().totals;
    assert_eq!(
        (totals.admitted, totals.server_errors, totals.completed),
        (1, 1, 0)
    );
    assert!(totals.tokens_charged > 0);
}

#[tokio::test]
async fn hang_marker_never_answers() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client_with(&sim, KEY, Duration::from_millis(300));
    match client.chat().create(chat("[sim:hang]", 10)).await {
        Err(OpenAIError::Reqwest(e)) => assert!(e.is_timeout(), "{e}"),
        other => panic!("expected a client timeout, got {other:?}"),
    }
    assert_eq!(sim.stats().totals.hung, 1);
}

#[tokio::test]
async fn truncate_marker_cuts_the_body() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    match client.chat().create(chat("[sim:truncate]", 50)).await {
        Err(OpenAIError::JSONDeserialize(_, body)) => assert!(body.starts_with("{\"")),
        other => panic!("expected a decode error, got {other:?}"),
    }
    let results: Vec<_> = client
        .chat()
        .create_stream(chat("[sim:truncate]", 50))
        .await
        .unwrap()
        .collect()
        .await;
    let (last, rest) = results.split_last().unwrap();
    assert!(rest.iter().all(Result::is_ok));
    assert!(
        matches!(last, Err(OpenAIError::JSONDeserialize(..))),
        "{last:?}"
    );
    let totals = sim.stats().totals;
    assert_eq!((totals.truncated, totals.completed), (2, 0));
}

#[tokio::test]
async fn quota_marker_is_a_429_without_retry_after() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let (status, error) = api_error(client(&sim).chat().create(chat("[sim:quota]", 10)).await);
    assert_eq!(status, 429);
    assert_eq!(error.r#type.as_deref(), Some("insufficient_quota"));
    assert_eq!(error.code.as_deref(), Some("insufficient_quota"));
    let response = raw(&sim, Some(KEY), "[sim:quota]", 10).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_none());
    assert!(response.headers().get("retry-after-ms").is_none());
    let totals = sim.stats().totals;
    assert_eq!(
        (totals.quota_exceeded, totals.rate_limited, totals.admitted),
        (2, 0, 0)
    );
}

#[tokio::test]
async fn error_markers_answer_client_errors() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let (status, error) = api_error(client.chat().create(chat("[sim:error=400]", 10)).await);
    assert_eq!(status, 400);
    assert_eq!(error.r#type.as_deref(), Some("invalid_request_error"));
    let (status, error) = api_error(client.chat().create(chat("[sim:error=401]", 10)).await);
    assert_eq!(status, 401);
    assert_eq!(error.code.as_deref(), Some("invalid_api_key"));
    let (status, error) = api_error(client.chat().create(chat("[sim:context_length]", 10)).await);
    assert_eq!(status, 400);
    assert_eq!(error.code.as_deref(), Some("context_length_exceeded"));
    let (status, error) = api_error(client.chat().create(chat("[sim:bogus]", 10)).await);
    assert_eq!(status, 400);
    assert!(error.message.contains("[sim:bogus]"));
    let totals = sim.stats().totals;
    assert_eq!((totals.client_errors, totals.admitted), (4, 0));
}

#[tokio::test]
async fn fail_first_fails_the_first_n_of_a_prompt_then_answers() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let prompt = "flaky [sim:fail_first=2]";
    for _ in 0..2 {
        let (status, _) = api_error(client.chat().create(chat(prompt, 10)).await);
        assert_eq!(status, 500);
    }
    // Another prompt has its own count.
    let (status, _) = api_error(
        client
            .chat()
            .create(chat("other [sim:fail_first=1]", 10))
            .await,
    );
    assert_eq!(status, 500);
    client.chat().create(chat(prompt, 10)).await.unwrap();
    client.chat().create(chat(prompt, 10)).await.unwrap();
    let totals = sim.stats().totals;
    assert_eq!(
        (totals.server_errors, totals.completed, totals.admitted),
        (3, 2, 5)
    );
}

#[tokio::test]
async fn fault_rates_apply_to_every_request() {
    let sim = spawn(SimConfig {
        fail_rate: 1.0,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    for i in 0..3 {
        let (status, _) = api_error(client(&sim).chat().create(chat(&format!("{i}"), 10)).await);
        assert_eq!(status, 500);
    }
    let sim = spawn(SimConfig {
        quota_rate: 1.0,
        ..SimConfig::instant()
    })
    .await
    .unwrap();
    let (status, error) = api_error(client(&sim).chat().create(chat("q", 10)).await);
    assert_eq!(
        (status, error.code.as_deref()),
        (429, Some("insufficient_quota"))
    );
}

#[tokio::test]
async fn invalid_json_is_a_400() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(!header(&response, "x-request-id").is_empty());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}
