//! [`LlmClient`]: one async-openai client per named key, executing through our own tower service
//! so that nothing retries behind our back and the rate headers survive.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::error::{ApiError, ApiErrorResponse, OpenAIError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequest, CreateChatCompletionResponse, FinishReason,
};
use fanout_core::config::{ProviderConfig, Secret};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::error::{CallError, ErrorKind};
use crate::headers::RateHeaders;
use crate::{Error, Result};

/// One chat completion to ask for: an optional system message and one user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub system: Option<String>,
    pub user: String,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

/// A completed call: the text, the real usage, how long it took and what the provider said
/// about its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub text: String,
    /// The model that answered (the provider may name a dated snapshot).
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Request sent to body received (for a cached response: the original call's).
    pub latency: Duration,
    /// Rate headers of the response (empty for a cached response).
    pub headers: RateHeaders,
    /// `stop`, `length`, `content_filter`, …
    pub finish_reason: Option<String>,
    /// Served from the response cache, not the provider.
    #[serde(default)]
    pub cached: bool,
}

tokio::task_local! {
    /// Where the capture service leaves the status and rate headers of the response it saw.
    /// Scoped around each `call`; the service future is polled inside that scope because
    /// async-openai awaits it in place (`TowerExecutor::execute` → `oneshot`).
    static CAPTURE: Arc<Mutex<Captured>>;
}

#[derive(Debug, Default)]
struct Captured {
    status: Option<u16>,
    headers: RateHeaders,
    requests: u32,
}

/// Most bytes of a non-JSON error body kept as the message.
const MAX_ERROR_BODY: usize = 512;

/// The provider client. Cheap to share (`Arc`) across tasks; holds one connection pool.
pub struct LlmClient {
    base_url: String,
    timeout: Duration,
    keys: BTreeMap<String, KeyClient>,
}

pub(crate) struct KeyClient {
    pub(crate) secret: Secret,
    pub(crate) client: async_openai::Client<OpenAIConfig>,
}

impl fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmClient")
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl LlmClient {
    /// One async-openai client per key of `provider`, all on `provider.base_url`, sharing one
    /// HTTP connection pool, with async-openai's retries off and a per-call timeout of
    /// `provider.request_timeout_secs`.
    pub fn new(provider: &ProviderConfig) -> Result<Self> {
        if provider.keys.is_empty() {
            return Err(Error::NoKeys);
        }
        let timeout = Duration::from_secs(provider.request_timeout_secs);
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(Error::Http)?;
        let keys = provider
            .keys
            .iter()
            .map(|key| {
                let config = OpenAIConfig::new()
                    .with_api_base(provider.base_url.clone())
                    .with_api_key(key.secret.expose());
                // `build` installs async-openai's retrying executor; `with_http_service` then
                // replaces it with ours, which sends each request exactly once.
                let client = async_openai::Client::build(http.clone(), config)
                    .with_http_service(capture_service(http.clone()));
                let entry = KeyClient {
                    secret: key.secret.clone(),
                    client,
                };
                (key.name.clone(), entry)
            })
            .collect();
        Ok(Self {
            base_url: provider.base_url.clone(),
            timeout,
            keys,
        })
    }

    /// The same client with another per-call timeout (tests; sub-second timeouts).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn key(&self, name: &str) -> Option<&KeyClient> {
        self.keys.get(name)
    }

    /// The names of the keys this client can call with, sorted.
    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Sends `req` once with the key named `key_name`: no retry, whatever the outcome.
    ///
    /// Errors are classified ([`CallError::is_retryable`]); the rate headers are in the
    /// response or the error either way. An unknown key name is [`ErrorKind::Unauthorized`].
    pub async fn call(&self, key_name: &str, req: &ChatRequest) -> Result<ChatResponse, CallError> {
        let Some(key) = self.keys.get(key_name) else {
            return Err(CallError::new(
                ErrorKind::Unauthorized,
                format!("no api key named `{key_name}` is configured"),
            ));
        };
        let capture = Arc::new(Mutex::new(Captured::default()));
        let started = Instant::now();
        let result = CAPTURE
            .scope(
                capture.clone(),
                tokio::time::timeout(self.timeout, key.client.chat().create(req.to_openai())),
            )
            .await;
        let latency = started.elapsed();
        let Captured {
            status,
            headers,
            requests,
        } = std::mem::take(&mut *capture.lock().unwrap_or_else(PoisonError::into_inner));
        debug_assert!(requests <= 1, "one call sent {requests} requests");
        let outcome = match result {
            Err(_elapsed) => Err(CallError::timeout(self.timeout, status, headers)),
            Ok(Err(e)) => {
                Err(CallError::from_openai(e, status, headers).redact(key.secret.expose()))
            }
            Ok(Ok(response)) => ChatResponse::from_openai(response, req, latency, headers),
        };
        match &outcome {
            Ok(r) => debug!(
                key = key_name,
                model = %req.model,
                latency_ms = latency.as_millis() as u64,
                prompt_tokens = r.prompt_tokens,
                completion_tokens = r.completion_tokens,
                "llm call succeeded"
            ),
            Err(e) => debug!(
                key = key_name,
                model = %req.model,
                latency_ms = latency.as_millis() as u64,
                kind = %e.kind,
                status = e.status,
                retryable = e.is_retryable(),
                error = %e.message,
                "llm call failed"
            ),
        }
        outcome
    }
}

/// The HTTP service under async-openai: sends the request once, records status and rate headers
/// in the task-local capture, reads the body whole, and turns an error status into an
/// `ApiError` itself (so async-openai neither retries nor logs bodies).
fn capture_service(
    http: reqwest::Client,
) -> impl tower::Service<
    HttpRequestFactory,
    Response = reqwest::Response,
    Error = OpenAIError,
    Future = impl Future<Output = Result<reqwest::Response, OpenAIError>> + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |factory: HttpRequestFactory| {
        let http = http.clone();
        async move {
            let request = factory.build().await?;
            // A file's content (a batch's JSON lines) is not one JSON document.
            let raw = request.url().path().ends_with("/content");
            let response = http.execute(request).await?;
            let status = response.status();
            let headers = RateHeaders::from_headers(response.headers());
            // Outside a `call` scope (nobody asked) there is nothing to record.
            let _ = CAPTURE.try_with(|slot| {
                let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                slot.status = Some(status.as_u16());
                slot.headers = headers;
                slot.requests += 1;
            });
            let version = response.version();
            let header_map = response.headers().clone();
            if !status.is_success() {
                return Err(api_error(status, response.bytes().await));
            }
            let body = response.bytes().await?;
            // A truncated or non-JSON body fails here, quietly; async-openai would log it whole.
            if !raw && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                return Err(OpenAIError::JSONDeserialize(e, String::new()));
            }
            let mut rebuilt = http::Response::new(reqwest::Body::from(body));
            *rebuilt.status_mut() = status;
            *rebuilt.version_mut() = version;
            *rebuilt.headers_mut() = header_map;
            Ok(reqwest::Response::from(rebuilt))
        }
    })
}

/// An error response as OpenAI's `{"error": {"message", "type", "code"}}`, or its text.
fn api_error(status: reqwest::StatusCode, body: reqwest::Result<bytes::Bytes>) -> OpenAIError {
    #[derive(Deserialize)]
    struct Wrapped {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<serde_json::Value>,
        #[serde(default)]
        code: Option<serde_json::Value>,
    }
    let as_text = |v: serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    };
    let api_error = match body {
        Err(e) => ApiError {
            message: format!("could not read the error body: {}", e.without_url()),
            ..ApiError::default()
        },
        Ok(bytes) => match serde_json::from_slice::<Wrapped>(&bytes) {
            Ok(Wrapped { error }) => ApiError {
                message: error.message.unwrap_or_default(),
                r#type: error.kind.and_then(as_text),
                code: error.code.and_then(as_text),
                ..ApiError::default()
            },
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR_BODY)]);
                ApiError {
                    message: text.trim().to_owned(),
                    ..ApiError::default()
                }
            }
        },
    };
    OpenAIError::ApiError(ApiErrorResponse {
        status_code: status,
        api_error,
    })
}

impl ChatRequest {
    /// The wire request. Reasoning models (`o1`, `o3`, `o4`, `gpt-5` families) take
    /// `max_completion_tokens`; the rest get `max_tokens`, which every OpenAI-compatible server
    /// knows.
    #[allow(deprecated)] // `max_tokens`: deprecated by OpenAI, still the compatible choice.
    pub(crate) fn to_openai(&self) -> CreateChatCompletionRequest {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = &self.system {
            messages.push(ChatCompletionRequestSystemMessage::from(system.as_str()).into());
        }
        messages.push(ChatCompletionRequestUserMessage::from(self.user.as_str()).into());
        let (max_tokens, max_completion_tokens) = if is_reasoning_model(&self.model) {
            (None, Some(self.max_tokens))
        } else {
            (Some(self.max_tokens), None)
        };
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages,
            max_tokens,
            max_completion_tokens,
            temperature: self.temperature,
            ..CreateChatCompletionRequest::default()
        }
    }
}

fn is_reasoning_model(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model);
    let b = name.as_bytes();
    (b.len() >= 2 && b[0] == b'o' && b[1].is_ascii_digit()) || name.starts_with("gpt-5")
}

impl ChatResponse {
    pub(crate) fn from_openai(
        response: CreateChatCompletionResponse,
        req: &ChatRequest,
        latency: Duration,
        headers: RateHeaders,
    ) -> Result<Self, CallError> {
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(CallError {
                status: Some(200),
                headers,
                ..CallError::new(ErrorKind::Decode, "response has no choices")
            });
        };
        let text = choice
            .message
            .content
            .or(choice.message.refusal)
            .unwrap_or_default();
        // A provider that omits usage still gets charged: fall back to our own count.
        let (prompt_tokens, completion_tokens) = match response.usage {
            Some(u) => (u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
            None => (
                crate::tokens::estimate_prompt_tokens(&req.model, req.system.as_deref(), &req.user),
                crate::tokens::count_tokens(&req.model, &text),
            ),
        };
        Ok(Self {
            text,
            model: response.model,
            prompt_tokens,
            completion_tokens,
            latency,
            headers,
            finish_reason: choice.finish_reason.map(|r| finish_reason(r).to_owned()),
            cached: false,
        })
    }
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::FunctionCall => "function_call",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_models_get_max_completion_tokens() {
        for m in ["o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "openai/o3"] {
            assert!(is_reasoning_model(m), "{m}");
        }
        for m in ["gpt-4o", "gpt-4.1-mini", "omni", "llama-3"] {
            assert!(!is_reasoning_model(m), "{m}");
        }
        let req = ChatRequest {
            model: "gpt-4o-mini".into(),
            system: Some("be brief".into()),
            user: "hi".into(),
            max_tokens: 50,
            temperature: Some(0.2),
        };
        let wire = serde_json::to_value(req.to_openai()).unwrap();
        assert_eq!(wire["max_tokens"], 50);
        assert!(wire.get("max_completion_tokens").is_none());
        assert_eq!(wire["messages"][0]["role"], "system");
        assert_eq!(wire["messages"][1]["content"], "hi");
    }

    #[test]
    fn error_bodies_parse_leniently() {
        let e = api_error(
            reqwest::StatusCode::TOO_MANY_REQUESTS,
            Ok(bytes::Bytes::from_static(
                br#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
            )),
        );
        let OpenAIError::ApiError(r) = e else {
            panic!()
        };
        assert_eq!(r.api_error.message, "slow down");
        assert_eq!(r.api_error.code.as_deref(), Some("rate_limit_exceeded"));
        let e = api_error(
            reqwest::StatusCode::BAD_GATEWAY,
            Ok(bytes::Bytes::from_static(b"<html>bad gateway</html>")),
        );
        let OpenAIError::ApiError(r) = e else {
            panic!()
        };
        assert_eq!(r.api_error.message, "<html>bad gateway</html>");
        let e = api_error(
            reqwest::StatusCode::BAD_REQUEST,
            Ok(bytes::Bytes::from_static(
                br#"{"error":{"message":"x","code":400}}"#,
            )),
        );
        let OpenAIError::ApiError(r) = e else {
            panic!()
        };
        assert_eq!(r.api_error.code.as_deref(), Some("400"));
    }
}
