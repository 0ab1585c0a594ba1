//! The one error shape of the API: `{"error": {"code", "message", "field"}}`, for our own
//! errors and for every rejection of a request (bad JSON, wrong content type, body too large,
//! unknown route, wrong method).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ResolveError, SubmitError};

/// Seconds a client should wait before retrying when Redis is unavailable.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code: `malformed_json`, `invalid_request`, `invalid_input`,
    /// `unknown_template`, `invalid_query`, `unauthorized`, `not_found`, `method_not_allowed`,
    /// `payload_too_large`, `unsupported_media_type`, `conflict`, `idempotency_key_reused`,
    /// `rate_limited`,
    /// `unavailable`, `internal`.
    #[schema(example = "invalid_input")]
    pub code: String,
    /// A sentence for a person.
    #[schema(example = "is required")]
    pub message: String,
    /// The request field the error is about (a JSON path into the body, or a query parameter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "inputs.personas[2].name")]
    pub field: Option<String>,
}

/// An error response of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Sent as `retry-after` (seconds).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// Unknown report, another tenant's report, or an expired one: the same answer for all.
    pub fn report_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("report `{id}` not found (unknown or expired)"),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// Redis (or the pool in front of it) failed: the same request may succeed shortly.
    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "redis unavailable, answering 503");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the report store is unavailable; retry after the delay in `retry-after`",
        )
        .with_retry_after(UNAVAILABLE_RETRY_AFTER_SECS)
    }

    /// Something that is not the client's fault and not transient. The detail is logged, not
    /// sent.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "api request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the details are in the server log",
        )
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )?;
        if let Some(field) = &self.field {
            write!(f, " (field `{field}`)")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fanout\""),
            );
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let field = e.field();
        let err = match &e {
            SubmitError::Template(ResolveError::Unknown { .. }) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_template",
                e.to_string(),
            ),
            SubmitError::Template(ResolveError::Invalid(_)) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_template",
                e.to_string(),
            ),
            SubmitError::Input(i) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                i.message.clone(),
            ),
            SubmitError::Field { message, .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                message.clone(),
            ),
            SubmitError::IdempotencyConflict { .. } => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                e.to_string(),
            ),
            SubmitError::Unavailable(detail) => return Self::unavailable(detail),
        };
        match field {
            Some(f) => err.with_field(f),
            None => err,
        }
    }
}

impl From<fanout_aggregator::Error> for ApiError {
    fn from(e: fanout_aggregator::Error) -> Self {
        use fanout_aggregator::Error as E;
        match &e {
            E::ReportNotFound { report } => Self::report_not_found(report),
            // Unreachable, refused, dropped, timed out, pool exhausted: worth a retry.
            E::Pool(_) => Self::unavailable(&e),
            E::Redis(r)
                if e.is_retryable()
                    || r.is_io_error()
                    || r.is_connection_refusal()
                    || r.is_connection_dropped()
                    || r.is_timeout() =>
            {
                Self::unavailable(&e)
            }
            _ => Self::internal(&e),
        }
    }
}

/// Unknown route.
pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for `{}`; see /openapi.json", uri.path()),
    )
}

/// Known route, wrong method (axum adds the `allow` header).
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed here; the `allow` header lists the ones that are"),
    )
}
