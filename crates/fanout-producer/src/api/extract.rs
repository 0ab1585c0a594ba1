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
    // Only an object is a request. serde would also take a struct from an array of its fields.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| malformed(&e))?;
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "the request body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.to_string().starts_with("recursion limit exceeded") {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "the JSON nests arrays and objects more than 128 deep",
            );
        }
        if inner.classify() != serde_json::error::Category::Data {
            // serde_json reports a value of the wrong kind for an enum ("lane": 7) as a syntax
            // error; the body is valid JSON, so it is the field's value that is wrong.
            if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() && path != "." {
                return ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    "has a value of the wrong kind",
                )
                .with_field(path);
            }
            return malformed(&inner);
        }
        let message = plain(&inner.to_string());
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

/// A serde message without the names of Rust types: "expected struct SubmitBody" says nothing
/// to a client; "expected an object" does. Position suffixes (" at line 1 column 5") go too: the
/// field is named.
fn plain(message: &str) -> String {
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(message)
        .to_owned();
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(at) = rest.find("struct ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "struct ".len()..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if name_len == 0 {
            out.push_str("struct ");
            rest = after;
            continue;
        }
        // "expected struct X" → "expected an object"; "struct X with 5 elements" → "an object".
        out.push_str("an object");
        rest = &after[name_len..];
        if let Some(tail) = rest.strip_prefix(" with ")
            && let Some(end) = tail.find(" elements").or_else(|| tail.find(" element"))
        {
            let n = &tail[..end];
            if n.bytes().all(|b| b.is_ascii_digit()) {
                rest = tail[end..]
                    .trim_start_matches(" elements")
                    .trim_start_matches(" element");
            }
        }
    }
    out.push_str(rest);
    out.replace("enum ", "")
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

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(ApiQuery)
    }
}

/// Parse a query string; an error names the parameter (`field`) and never shows Rust types.
pub(crate) fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = plain(&e.into_inner().to_string());
        let err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message.clone());
        match data_error_field(&path, &message) {
            Some(f) => err.with_field(f),
            None => err,
        }
    })
}

/// The `{id}` of a report route. An id that cannot be a report id is simply not found.
#[derive(Debug)]
pub(crate) struct ReportId(pub(crate) String);

pub(crate) use fanout_aggregator::is_report_id;

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
    fn only_an_object_is_a_request_and_no_rust_types_show() {
        for body in [&b"[\"x\", null]"[..], b"[]", b"5", b"\"text\"", b"null"] {
            let e = parse_json::<Body>(body).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
            );
            assert!(e.message.contains("JSON object"), "{}", e.message);
        }
        let e = parse_json::<Body>(b"{\"template\": \"x\", \"inner\": 5}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner"));
        assert!(!e.message.contains("Inner"), "{}", e.message);
        assert!(!e.message.contains("struct"), "{}", e.message);
        assert!(e.message.contains("an object"), "{}", e.message);
        assert_eq!(
            plain("invalid length 0, expected struct SubmitBody with 5 elements"),
            "invalid length 0, expected an object"
        );
        assert_eq!(
            plain("invalid type: map, expected struct A at line 1 column 2"),
            "invalid type: map, expected an object"
        );
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Query {
        format: Option<Format>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Format {
        Md,
        Json,
    }

    #[test]
    fn query_errors_name_the_parameter() {
        let e = parse_query::<Query>("format=pdf").unwrap_err();
        assert_eq!(
            (e.status, e.code, e.field.as_deref()),
            (StatusCode::BAD_REQUEST, "invalid_query", Some("format"))
        );
        assert!(e.message.contains("`md`"), "{}", e.message);
        assert!(
            parse_query::<Query>("format=json")
                .unwrap()
                .format
                .is_some()
        );
        assert!(parse_query::<Query>("").unwrap().format.is_none());
    }

    #[test]
    fn report_ids() {
        assert!(is_report_id("0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b"));
        assert!(!is_report_id(""));
        assert!(!is_report_id("a}b"));
        assert!(!is_report_id(&"a".repeat(65)));
    }
}
