//! Extractors whose rejections are [`ApiError`]s: a JSON body (content type, size, syntax
//! with line and column, data errors naming the field), a query string and a report id.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        check_json_content_type(req.headers())?;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than the limit (api.max_body_bytes)",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_body",
                    format!("the request body could not be read: {e}"),
                )
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn check_json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let unsupported = |got: &str| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected `content-type: application/json`, got {got}"),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("none"));
    };
    let Ok(value) = value.to_str() else {
        return Err(unsupported("a header that is not text"));
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json {
        Ok(())
    } else {
        Err(unsupported(&format!("`{value}`")))
    }
}

/// Parse a JSON body: syntax errors are 400 `malformed_json` with line and column; data errors
/// (missing field, wrong type, unknown field) are 422 `invalid_request` naming the field.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.classify() != serde_json::error::Category::Data {
            return malformed(&inner);
        }
        let message = inner.to_string();
        let field = data_error_field(&path, &message);
        let err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message);
        match field {
            Some(f) => err.with_field(f),
            None => err,
        }
    })?;
    // Trailing characters after the value are a syntax error too.
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_json",
        format!("the request body is not valid JSON: {e}"),
    )
}

/// The field a serde data error is about: the path, or for a missing field the path plus the
/// name in the message (serde reports it at the parent).
fn data_error_field(path: &str, message: &str) -> Option<String> {
    let parent = if path == "." { "" } else { path };
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(name) = rest.split('`').next()
    {
        return Some(if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}.{name}")
        });
    }
    if parent.is_empty() {
        None
    } else {
        Some(parent.to_owned())
    }
}

/// A query string of type `T`; a malformed one is 400 `invalid_query`.
#[derive(Debug)]
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
    }
}

/// The `{id}` of a report route. An id that cannot be a report id is simply not found.
#[derive(Debug)]
pub(crate) struct ReportId(pub(crate) String);

/// Report ids are UUIDs; this is looser (any id the store could hold), and keeps odd bytes
/// out of Redis key names.
pub(crate) fn is_report_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl<S: Send + Sync> FromRequestParts<S> for ReportId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::report_not_found(&e.body_text()))?;
        if is_report_id(&id) {
            Ok(ReportId(id))
        } else {
            Err(ApiError::report_not_found(&id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        template: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        list: Vec<u32>,
    }

    #[test]
    fn syntax_errors_are_400_with_line_and_column() {
        let e = parse_json::<Body>(b"{\n  \"template\": ,}").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, "malformed_json");
        assert!(e.message.contains("line 2 column"), "{}", e.message);
        let e = parse_json::<Body>(b"{\"template\": \"x\"} trailing").unwrap_err();
        assert_eq!(e.code, "malformed_json");
        let e = parse_json::<Body>(b"{\"template\": \"x\"").unwrap_err();
        assert_eq!(e.code, "malformed_json");
    }

    #[test]
    fn data_errors_name_the_field() {
        let e = parse_json::<Body>(b"{}").unwrap_err();
        assert_eq!(
            (e.status, e.field.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("template"))
        );
        let e = parse_json::<Body>(b"{\"template\": 5}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("template"));
        let e = parse_json::<Body>(b"{\"template\": \"x\", \"inner\": {\"list\": [1, \"a\"]}}")
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner.list[1]"));
        let e = parse_json::<Body>(b"{\"template\": \"x\", \"inner\": {}}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner.list"));
        let e = parse_json::<Body>(b"{\"template\": \"x\", \"extra\": 1}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("extra"), "{}", e.message);
        assert!(e.message.contains("unknown field `extra`"));
    }

    #[test]
    fn report_ids() {
        assert!(is_report_id("0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b"));
        assert!(!is_report_id(""));
        assert!(!is_report_id("a}b"));
        assert!(!is_report_id(&"a".repeat(65)));
    }
}
