use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{ApiError, OpenAIError};
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
};
use fanout_sim::SimHandle;

pub(crate) const KEY: &str = "sk-sim-test-key-0001";

/// An async-openai client for the simulator with no retries of its own, so each call is one
/// request and its error is the simulator's.
pub(crate) fn client(sim: &SimHandle) -> Client<OpenAIConfig> {
    client_with(sim, KEY, Duration::from_secs(30))
}

pub(crate) fn client_with(sim: &SimHandle, key: &str, timeout: Duration) -> Client<OpenAIConfig> {
    let http = reqwest::Client::builder().timeout(timeout).build().unwrap();
    let config = OpenAIConfig::new()
        .with_api_base(sim.base_url())
        .with_api_key(key);
    Client::with_config(config).with_http_service(ReqwestService::new(http))
}

pub(crate) fn chat(prompt: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .max_completion_tokens(max_tokens)
        .messages([
            ChatCompletionRequestSystemMessage::from("You are a test.").into(),
            ChatCompletionRequestUserMessage::from(prompt).into(),
        ])
        .build()
        .unwrap()
}

/// The status and error body of an API error, or a panic naming what came instead.
pub(crate) fn api_error(result: Result<impl std::fmt::Debug, OpenAIError>) -> (u16, ApiError) {
    match result {
        Err(OpenAIError::ApiError(e)) => (e.status_code.as_u16(), e.api_error),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A raw chat completion request, for what async-openai hides (headers, auth).
pub(crate) async fn raw(
    sim: &SimHandle,
    key: Option<&str>,
    prompt: &str,
    max_tokens: u32,
) -> reqwest::Response {
    raw_model(sim, key, "gpt-4o-mini", prompt, max_tokens).await
}

/// [`raw`] for a given model.
pub(crate) async fn raw_model(
    sim: &SimHandle,
    key: Option<&str>,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/chat/completions", sim.base_url()))
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        }));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

pub(crate) fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}
