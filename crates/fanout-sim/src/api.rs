//! The OpenAI wire format: the request fields the simulator reads, the bodies it sends, and the
//! errors it answers with.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::limits::{self, Dimension};

/// The parts of a chat completion request the simulator uses; every other field is ignored.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<Message>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Message {
    pub(crate) role: String,
    #[serde(default)]
    pub(crate) content: Option<Content>,
}

/// Message content: a string, or an array of parts of which the text parts count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Part {
    #[serde(default)]
    pub(crate) text: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: Option<bool>,
}

impl Message {
    /// The message's text; text parts are joined with newlines, other parts are ignored.
    pub(crate) fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl ChatRequest {
    /// The completion limit: `max_completion_tokens`, else `max_tokens`, else the default.
    pub(crate) fn max_tokens(&self, default: u32) -> u32 {
        self.max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default)
    }

    pub(crate) fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|options| options.include_usage)
            .unwrap_or(false)
    }
}

/// Every error the simulator answers with, rendered as OpenAI's
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    UnknownUrl(String),
    #[error(
        "This model's maximum context length is {window} tokens. However, you requested {requested} tokens. Please reduce the length of the messages or completion."
    )]
    ContextLength { window: u64, requested: u64 },
    #[error(
        "Rate limit reached for {} per min: Limit {limit}, Requested {requested}. Please try again in {}.",
        dimension.as_str(),
        limits::format_reset(*retry_after)
    )]
    RateLimited {
        dimension: Dimension,
        limit: u64,
        requested: u64,
        retry_after: Duration,
    },
    #[error(
        "Request too large for tokens per min (TPM): Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order to run successfully."
    )]
    TooLarge { limit: u64, requested: u64 },
    #[error("You exceeded your current quota, please check your plan and billing details.")]
    InsufficientQuota,
    #[error("The server had an error while processing your request. Sorry about that!")]
    Server,
    #[error("The simulator is shutting down.")]
    ShuttingDown,
    /// An error of the Files and Batch APIs, with its own status, `param` and `code`.
    #[error("{message}")]
    Rejected {
        status: StatusCode,
        message: String,
        param: Option<&'static str>,
        code: Option<&'static str>,
    },
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) | Self::ContextLength { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) | Self::UnknownUrl(_) => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } | Self::TooLarge { .. } | Self::InsufficientQuota => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Server => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Rejected { status, .. } => *status,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest(_) => ("invalid_request_error", None),
            Self::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            Self::NotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::UnknownUrl(_) => ("invalid_request_error", Some("unknown_url")),
            Self::ContextLength { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            Self::RateLimited { dimension, .. } => {
                (dimension.as_str(), Some("rate_limit_exceeded"))
            }
            Self::TooLarge { .. } => ("tokens", Some("rate_limit_exceeded")),
            Self::InsufficientQuota => ("insufficient_quota", Some("insufficient_quota")),
            Self::Server => ("server_error", None),
            Self::ShuttingDown => ("server_error", Some("service_unavailable")),
            Self::Rejected { code, .. } => ("invalid_request_error", *code),
        }
    }

    /// How long the client should wait, when the error says so (`retry-after` headers).
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    pub(crate) fn body(&self) -> Value {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            Self::ContextLength { .. } => Some("messages"),
            Self::Rejected { param, .. } => *param,
            _ => None,
        };
        json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": code,
            }
        })
    }
}

impl ApiError {
    /// A 400 about one parameter of a Files or Batch API request.
    pub(crate) fn invalid(
        param: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self::Rejected {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
            code,
        }
    }

    /// A 404 for an unknown (or another key's) file or batch.
    pub(crate) fn no_such(param: &'static str, message: impl Into<String>) -> Self {
        Self::Rejected {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }
}

/// Seconds since the Unix epoch, for `created`.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What every body of one completion shares.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) finish_reason: &'static str,
}

impl Completion {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    /// The `chat.completion` object of a non-streaming answer.
    pub(crate) fn object(&self, content: &str) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
            "system_fingerprint": "fp_fanout_sim",
        })
    }

    fn chunk(&self, choices: Value, usage: Option<Value>, include_usage: bool) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fanout_sim",
            "choices": choices,
        });
        // Like OpenAI: with include_usage every chunk carries `usage`, null but in the last.
        if include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk
    }

    /// A `chat.completion.chunk` carrying a delta (and, on the last one, the finish reason).
    pub(crate) fn delta_chunk(&self, delta: Value, finish: bool, include_usage: bool) -> Value {
        let finish_reason = if finish {
            Value::from(self.finish_reason)
        } else {
            Value::Null
        };
        let choices = json!([{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }]);
        self.chunk(choices, None, include_usage)
    }

    /// The final chunk of `stream_options.include_usage`: no choices, only usage.
    pub(crate) fn usage_chunk(&self) -> Value {
        self.chunk(json!([]), Some(self.usage()), true)
    }
}
