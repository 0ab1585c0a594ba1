//! Every way a provider call can fail, classified in one place: retryable or fatal, with the
//! provider's own message and its `retry-after`.

use std::fmt;
use std::time::Duration;

use async_openai::error::{ApiErrorResponse, OpenAIError};
use serde::{Deserialize, Serialize};

use crate::headers::RateHeaders;

/// What went wrong with one provider call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 429 `rate_limit_exceeded`: retry after the provider's delay.
    RateLimited,
    /// 429 `insufficient_quota`: the account is out of credit; fatal.
    QuotaExceeded,
    /// 400 and other 4xx the request itself caused (also a request larger than the TPM limit).
    BadRequest,
    /// 401: the key is wrong or unknown.
    Unauthorized,
    /// 403: the key may not use this model or region.
    Forbidden,
    /// 404: unknown model or endpoint.
    NotFound,
    /// 400 `context_length_exceeded`: prompt plus `max_tokens` exceeds the model's window.
    ContextLength,
    /// 5xx (and 408/409, which OpenAI documents as retryable).
    Server,
    /// No complete answer within the request timeout.
    Timeout,
    /// Connecting, sending or receiving failed (refused, reset, DNS).
    Connection,
    /// A 2xx whose body was truncated or is not the expected JSON.
    Decode,
}

impl ErrorKind {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::Server | Self::Timeout | Self::Connection | Self::Decode
        )
    }

    /// A stable lowercase name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::ContextLength => "context_length",
            Self::Server => "server",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Decode => "decode",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed provider call: its kind, the provider's message (never the key), the HTTP status when
/// there was a response, and the rate headers of that response.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub struct CallError {
    pub kind: ErrorKind,
    pub message: String,
    pub status: Option<u16>,
    pub headers: RateHeaders,
    /// The request never reached the provider (connecting failed: refused, DNS, connect
    /// timeout), so it cannot have been served or billed.
    #[serde(default)]
    pub unreached: bool,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} ({status}): {}", self.kind, self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

/// Longest provider message kept; error bodies of proxies can be whole HTML pages.
const MAX_MESSAGE: usize = 1_000;

impl CallError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate(&mut message, MAX_MESSAGE);
        Self {
            kind,
            message,
            status: None,
            headers: RateHeaders::default(),
            unreached: false,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// The delay the provider asked for (`retry-after-ms` / `retry-after`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers.retry_after
    }

    /// Classifies an HTTP error response from its status and OpenAI's error `type` and `code`.
    pub fn from_status(
        status: u16,
        error_type: Option<&str>,
        code: Option<&str>,
        message: &str,
        headers: RateHeaders,
    ) -> Self {
        let is = |want: &str| code == Some(want) || error_type == Some(want);
        let kind = match status {
            429 if is("insufficient_quota") => ErrorKind::QuotaExceeded,
            // "Request too large for tokens per min": no wait makes it fit.
            429 if message.starts_with("Request too large") => ErrorKind::BadRequest,
            429 => ErrorKind::RateLimited,
            400 | 413 | 422
                if is("context_length_exceeded") || message.contains("maximum context length") =>
            {
                ErrorKind::ContextLength
            }
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Forbidden,
            404 => ErrorKind::NotFound,
            408 => ErrorKind::Timeout,
            409 => ErrorKind::Server,
            500..=599 => ErrorKind::Server,
            _ => ErrorKind::BadRequest,
        };
        Self {
            status: Some(status),
            headers,
            ..Self::new(kind, message)
        }
    }

    /// Classifies whatever async-openai (and our capture service beneath it) returned.
    pub(crate) fn from_openai(
        error: OpenAIError,
        status: Option<u16>,
        headers: RateHeaders,
    ) -> Self {
        let mut e = match error {
            OpenAIError::ApiError(ApiErrorResponse {
                status_code,
                api_error,
            }) => Self::from_status(
                status_code.as_u16(),
                api_error.r#type.as_deref(),
                api_error.code.as_deref(),
                &api_error.message,
                headers,
            ),
            OpenAIError::Reqwest(e) => Self {
                headers,
                ..Self::from_reqwest(e)
            },
            OpenAIError::JSONDeserialize(e, _) => Self {
                headers,
                ..Self::new(
                    ErrorKind::Decode,
                    format!("response body is not a completion: {e}"),
                )
            },
            OpenAIError::StreamError(e) => Self {
                headers,
                ..Self::new(ErrorKind::Decode, format!("stream failed: {e}"))
            },
            OpenAIError::InvalidArgument(message) => Self {
                headers,
                ..Self::new(ErrorKind::BadRequest, message)
            },
            OpenAIError::Boxed(e) => match e.downcast::<reqwest::Error>() {
                Ok(e) => Self {
                    headers,
                    ..Self::from_reqwest(*e)
                },
                Err(e) => Self {
                    headers,
                    ..Self::new(ErrorKind::Connection, e.to_string())
                },
            },
            other => Self {
                headers,
                ..Self::new(ErrorKind::Connection, other.to_string())
            },
        };
        if e.status.is_none() {
            e.status = status;
        }
        e
    }

    pub(crate) fn from_reqwest(e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_body() || e.is_decode() {
            ErrorKind::Decode
        } else {
            ErrorKind::Connection
        };
        let status = e.status().map(|s| s.as_u16());
        let unreached = e.is_connect();
        // The URL carries no secret, but keep messages to what went wrong.
        let message = error_chain(&e.without_url());
        Self {
            status,
            unreached,
            ..Self::new(kind, message)
        }
    }

    pub(crate) fn timeout(after: Duration, status: Option<u16>, headers: RateHeaders) -> Self {
        Self {
            status,
            headers,
            ..Self::new(
                ErrorKind::Timeout,
                format!("no complete answer within {:.1}s", after.as_secs_f64()),
            )
        }
    }

    /// Removes `secret` from the message, should a provider or proxy echo it back.
    pub(crate) fn redact(mut self, secret: &str) -> Self {
        if secret.len() >= 4 && self.message.contains(secret) {
            self.message = self.message.replace(secret, "***");
        }
        self
    }
}

/// `outer: inner: innermost`, so that "error sending request" says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorKind::*;

    fn kind(status: u16, t: Option<&str>, code: Option<&str>, msg: &str) -> ErrorKind {
        CallError::from_status(status, t, code, msg, RateHeaders::default()).kind
    }

    #[test]
    fn statuses_classify() {
        assert_eq!(
            kind(
                429,
                Some("requests"),
                Some("rate_limit_exceeded"),
                "Rate limit reached"
            ),
            RateLimited
        );
        assert_eq!(
            kind(
                429,
                Some("insufficient_quota"),
                Some("insufficient_quota"),
                "quota"
            ),
            QuotaExceeded
        );
        assert_eq!(
            kind(
                429,
                Some("tokens"),
                Some("rate_limit_exceeded"),
                "Request too large for tokens per min (TPM)"
            ),
            BadRequest
        );
        assert_eq!(
            kind(400, Some("invalid_request_error"), None, "bad"),
            BadRequest
        );
        assert_eq!(
            kind(
                400,
                Some("invalid_request_error"),
                Some("context_length_exceeded"),
                "x"
            ),
            ContextLength
        );
        assert_eq!(
            kind(
                400,
                None,
                None,
                "This model's maximum context length is 8192 tokens"
            ),
            ContextLength
        );
        assert_eq!(kind(401, None, Some("invalid_api_key"), "x"), Unauthorized);
        assert_eq!(kind(403, None, None, "x"), Forbidden);
        assert_eq!(kind(404, None, Some("model_not_found"), "x"), NotFound);
        assert_eq!(kind(408, None, None, "x"), Timeout);
        assert_eq!(kind(500, None, None, "x"), Server);
        assert_eq!(kind(503, None, None, "x"), Server);
        assert_eq!(kind(418, None, None, "x"), BadRequest);
    }

    #[test]
    fn retryable_kinds() {
        for k in [RateLimited, Server, Timeout, Connection, Decode] {
            assert!(k.is_retryable(), "{k}");
        }
        for k in [
            QuotaExceeded,
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            ContextLength,
        ] {
            assert!(!k.is_retryable(), "{k}");
        }
    }

    #[test]
    fn messages_are_bounded_and_redacted() {
        let e = CallError::new(BadRequest, "é".repeat(2_000));
        assert!(e.message.len() <= MAX_MESSAGE + '…'.len_utf8());
        let e = CallError::new(Unauthorized, "Incorrect API key provided: sk-secret-123")
            .redact("sk-secret-123");
        assert_eq!(e.message, "Incorrect API key provided: ***");
        assert_eq!(
            e.to_string(),
            "unauthorized: Incorrect API key provided: ***"
        );
    }
}
