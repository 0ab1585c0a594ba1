//! The Files API: JSONL files uploaded for batches, and the output and error files that batches
//! write. Files belong to the API key that uploaded them (or ran the batch); another key gets a
//! 404, as another organisation would.
//!
//! An upload is validated line by line when it arrives, and a bad file is refused with a 400
//! naming its first bad line. Each non-blank line must be
//! `{"custom_id": "…", "method": "POST", "url": "/v1/chat/completions", "body": {…}}` with a
//! `custom_id` unique in the file; the body itself is only read when a batch runs it, where an
//! invalid body is a failed request of that batch, not a bad file.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::ApiError;
use crate::batch::{self, ApiKey, Listing};
use crate::server;
use crate::sim::Sim;

/// The largest batch input file, in bytes (OpenAI's 200 MB).
pub(crate) const MAX_FILE_BYTES: usize = 200_000_000;
/// The most requests a batch input file may hold (OpenAI's 50,000).
pub(crate) const MAX_FILE_LINES: usize = 50_000;
/// The only endpoint the simulator runs batches for.
pub(crate) const CHAT_ENDPOINT: &str = "/v1/chat/completions";

/// What a file is for: uploaded batch input, or what a batch wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Batch,
    BatchOutput,
}

impl Purpose {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::BatchOutput => "batch_output",
        }
    }
}

/// One stored file.
#[derive(Debug)]
pub(crate) struct StoredFile {
    pub(crate) id: String,
    /// The API key it belongs to.
    pub(crate) owner: String,
    pub(crate) filename: String,
    pub(crate) purpose: Purpose,
    pub(crate) created_at: u64,
    pub(crate) content: Bytes,
}

impl StoredFile {
    /// The File object.
    pub(crate) fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.content.len(),
            "created_at": self.created_at,
            "expires_at": null,
            "filename": self.filename,
            "purpose": self.purpose.as_str(),
            "status": "processed",
            "status_details": null,
        })
    }
}

/// One request of a batch input file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InputLine {
    /// Its line number in the file, from 1.
    pub(crate) number: usize,
    pub(crate) custom_id: String,
    pub(crate) body: Value,
}

/// Why a file is not a valid batch input file; the 400 of the upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InputError {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl From<InputError> for ApiError {
    fn from(error: InputError) -> Self {
        ApiError::invalid("file", Some(error.code), error.message)
    }
}

/// The envelope of one input line; the body stays a JSON value until a batch runs it.
#[derive(Deserialize)]
struct Envelope {
    custom_id: Option<Value>,
    method: Option<Value>,
    url: Option<Value>,
    body: Option<Value>,
}

/// Reads a batch input file: every non-blank line a request for the chat endpoint, with a
/// unique `custom_id`; at least one, at most [`MAX_FILE_LINES`]. The error names the first bad
/// line.
#[cfg(test)]
pub(crate) fn parse_input(content: &[u8]) -> Result<Vec<InputLine>, InputError> {
    let mut lines = Vec::new();
    read_input(content, |line| lines.push(line))?;
    Ok(lines)
}

/// Reads a batch input file (see `parse_input`), handing each line to `each` as it goes, so
/// that a 200 MB file is never held parsed as a whole.
pub(crate) fn read_input(
    content: &[u8],
    mut each: impl FnMut(InputLine),
) -> Result<(), InputError> {
    if content.len() > MAX_FILE_BYTES {
        return Err(InputError {
            code: "file_too_large",
            message: format!(
                "File is {} bytes; a batch input file may have at most {MAX_FILE_BYTES} bytes (200 MB).",
                content.len()
            ),
        });
    }
    let mut count = 0;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, raw) in content.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if count == MAX_FILE_LINES {
            return Err(InputError {
                code: "too_many_requests",
                message: format!(
                    "Line {number}: a batch input file may hold at most {MAX_FILE_LINES} requests."
                ),
            });
        }
        let line = parse_line(number, raw)?;
        if let Some(first) = seen.insert(line.custom_id.clone(), number) {
            return Err(InputError {
                code: "duplicate_custom_id",
                message: format!(
                    "Line {number}: custom_id {:?} is already used on line {first}; each request in a batch needs a unique custom_id.",
                    line.custom_id
                ),
            });
        }
        count += 1;
        each(line);
    }
    if count == 0 {
        return Err(InputError {
            code: "empty_file",
            message: "The batch input file is empty: it needs at least one request.".to_owned(),
        });
    }
    Ok(())
}

fn parse_line(number: usize, raw: &[u8]) -> Result<InputLine, InputError> {
    let bad = |code, reason: String| InputError {
        code,
        message: format!("Line {number}: {reason}"),
    };
    let envelope: Envelope = serde_json::from_slice(raw).map_err(|e| {
        bad(
            "invalid_json_line",
            format!("not a valid JSON object ({e})."),
        )
    })?;
    let custom_id = match envelope.custom_id {
        Some(Value::String(id)) if !id.is_empty() => id,
        Some(_) => {
            return Err(bad(
                "invalid_custom_id",
                "custom_id must be a non-empty string.".to_owned(),
            ));
        }
        None => return Err(missing(number, "custom_id")),
    };
    match envelope.method {
        Some(Value::String(method)) if method == "POST" => {}
        Some(other) => {
            return Err(bad(
                "invalid_method",
                format!("method must be \"POST\", got {other}."),
            ));
        }
        None => return Err(missing(number, "method")),
    }
    match envelope.url {
        Some(Value::String(url)) if url == CHAT_ENDPOINT => {}
        Some(other) => {
            return Err(bad(
                "invalid_url",
                format!("url must be \"{CHAT_ENDPOINT}\", got {other}."),
            ));
        }
        None => return Err(missing(number, "url")),
    }
    let body = match envelope.body {
        Some(body @ Value::Object(_)) => body,
        Some(_) => {
            return Err(bad(
                "invalid_body",
                "body must be a JSON object (the chat completion request).".to_owned(),
            ));
        }
        None => return Err(missing(number, "body")),
    };
    Ok(InputLine {
        number,
        custom_id,
        body,
    })
}

fn missing(number: usize, field: &str) -> InputError {
    InputError {
        code: "missing_required_parameter",
        message: format!("Line {number}: missing required field '{field}'."),
    }
}

/// What `POST /v1/files` sent, before it is stored.
struct Upload {
    filename: String,
    content: Bytes,
}

/// `POST /v1/files`: a multipart form with `purpose` (`batch`) and `file` (JSONL).
pub(crate) async fn upload(
    State(sim): State<Sim>,
    ApiKey(key): ApiKey,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let upload = match read_form(form).await {
        Ok(upload) => upload,
        Err(error) => return server::error_response(&error),
    };
    // Reading 200 MB of JSON is blocking work.
    let content = upload.content.clone();
    let checked = tokio::task::spawn_blocking(move || read_input(&content, drop)).await;
    match checked {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return server::error_response(&error.into()),
        Err(_) => return server::error_response(&ApiError::Server),
    }
    let id = format!("file-sim{:010}", sim.next_id());
    tracing::debug!(file = %id, bytes = upload.content.len(), "batch input file uploaded");
    let file = StoredFile {
        id,
        owner: key,
        filename: upload.filename,
        purpose: Purpose::Batch,
        created_at: crate::api::unix_now(),
        content: upload.content,
    };
    let object = file.object();
    sim.batches().add_file(file);
    Json(object).into_response()
}

async fn read_form(form: Result<Multipart, MultipartRejection>) -> Result<Upload, ApiError> {
    let mut form = form.map_err(|e| {
        ApiError::invalid(
            "file",
            None,
            format!(
                "The request must be multipart/form-data with 'purpose' and 'file' fields ({e})."
            ),
        )
    })?;
    let mut purpose = None;
    let mut file = None;
    while let Some(mut field) = form.next_field().await.map_err(form_error)? {
        let name = field.name().map(str::to_owned);
        match name.as_deref() {
            Some("purpose") => purpose = Some(field.text().await.map_err(form_error)?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let mut content = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(form_error)? {
                    content.extend_from_slice(&chunk);
                    if content.len() > MAX_FILE_BYTES {
                        return Err(ApiError::invalid(
                            "file",
                            Some("file_too_large"),
                            format!(
                                "File is larger than {MAX_FILE_BYTES} bytes, the limit of a batch input file (200 MB)."
                            ),
                        ));
                    }
                }
                file = Some(Upload {
                    filename,
                    content: Bytes::from(content),
                });
            }
            // Other fields (such as `expires_after[…]`) are accepted and ignored.
            _ => {}
        }
    }
    match purpose.as_deref() {
        None => return Err(missing_parameter("purpose")),
        Some("batch") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "purpose",
                Some("invalid_value"),
                format!(
                    "Invalid value for 'purpose': {other:?}. The simulator stores only files with purpose 'batch'."
                ),
            ));
        }
    }
    file.ok_or_else(|| missing_parameter("file"))
}

fn missing_parameter(param: &'static str) -> ApiError {
    ApiError::invalid(
        param,
        Some("missing_required_parameter"),
        format!("Missing required parameter: '{param}'."),
    )
}

fn form_error(error: MultipartError) -> ApiError {
    let status = error.status();
    let message = format!("Could not read the multipart form: {}", error.body_text());
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::Rejected {
            status,
            message,
            param: Some("file"),
            code: Some("file_too_large"),
        }
    } else {
        ApiError::invalid("file", None, message)
    }
}

/// `GET /v1/files/{file_id}`.
pub(crate) async fn retrieve(
    State(sim): State<Sim>,
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
) -> Response {
    let mut store = sim.batches();
    store.advance(&sim, Instant::now());
    match store.file(&key, &id) {
        Some(file) => Json(file.object()).into_response(),
        None => server::error_response(&no_such_file(&id)),
    }
}

/// `GET /v1/files/{file_id}/content`: the bytes as uploaded or written.
pub(crate) async fn content(
    State(sim): State<Sim>,
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
) -> Response {
    let mut store = sim.batches();
    store.advance(&sim, Instant::now());
    match store.file(&key, &id) {
        Some(file) => (
            [(CONTENT_TYPE, "application/octet-stream")],
            file.content.clone(),
        )
            .into_response(),
        None => server::error_response(&no_such_file(&id)),
    }
}

/// `DELETE /v1/files/{file_id}`. A batch that already read the file is not affected.
pub(crate) async fn delete(
    State(sim): State<Sim>,
    ApiKey(key): ApiKey,
    Path(id): Path<String>,
) -> Response {
    if sim.batches().remove_file(&key, &id) {
        Json(json!({"id": id, "object": "file", "deleted": true})).into_response()
    } else {
        server::error_response(&no_such_file(&id))
    }
}

/// The query of `GET /v1/files`.
#[derive(Debug, Deserialize)]
pub(crate) struct FileQuery {
    purpose: Option<String>,
    #[serde(flatten)]
    listing: Listing,
}

/// `GET /v1/files`: the key's files, newest first, optionally of one purpose.
pub(crate) async fn list(
    State(sim): State<Sim>,
    ApiKey(key): ApiKey,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return server::error_response(&ApiError::invalid("query", None, e.body_text())),
    };
    let limit = match query.listing.limit(10_000, 10_000) {
        Ok(limit) => limit,
        Err(error) => return server::error_response(&error),
    };
    let mut store = sim.batches();
    store.advance(&sim, Instant::now());
    let files = store.files(&key).filter(|file| {
        query
            .purpose
            .as_deref()
            .is_none_or(|purpose| file.purpose.as_str() == purpose)
    });
    let (files, has_more) = batch::page(
        files.map(|file| (file.id.as_str(), file)),
        query.listing.after.as_deref(),
        limit,
    );
    let data = files.iter().map(|file| file.object()).collect();
    Json(batch::list_object(data, has_more)).into_response()
}

pub(crate) fn no_such_file(id: &str) -> ApiError {
    ApiError::no_such("file_id", format!("No such File object: {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str) -> String {
        json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": CHAT_ENDPOINT,
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        })
        .to_string()
    }

    #[test]
    fn good_files_give_their_lines() {
        let content = format!("{}\n\n{}\n", line("a"), line("b"));
        let lines = parse_input(content.as_bytes()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].number, lines[0].custom_id.as_str()), (1, "a"));
        // Blank lines are skipped but still counted.
        assert_eq!((lines[1].number, lines[1].custom_id.as_str()), (3, "b"));
        assert_eq!(lines[1].body["model"], "m");
    }

    #[test]
    fn bad_lines_are_named() {
        let refusal = |content: String| parse_input(content.as_bytes()).unwrap_err();
        let error = refusal(format!("{}\n{{not json\n", line("a")));
        assert_eq!(error.code, "invalid_json_line");
        assert!(error.message.starts_with("Line 2: "), "{}", error.message);

        let error = refusal(format!("{}\n{}\n{}", line("a"), line("b"), line("a")));
        assert_eq!(error.code, "duplicate_custom_id");
        assert!(
            error.message.starts_with("Line 3: ") && error.message.contains("line 1"),
            "{}",
            error.message
        );

        let wrong_url = line("a").replace(CHAT_ENDPOINT, "/v1/embeddings");
        assert_eq!(refusal(wrong_url).code, "invalid_url");
        let wrong_method = line("a").replace("POST", "GET");
        assert_eq!(refusal(wrong_method).code, "invalid_method");
        let no_body = json!({"custom_id": "a", "method": "POST", "url": CHAT_ENDPOINT});
        let error = refusal(no_body.to_string());
        assert_eq!(error.code, "missing_required_parameter");
        assert!(error.message.contains("'body'"), "{}", error.message);
        let numeric_id = line("a").replace("\"a\"", "7");
        assert_eq!(refusal(numeric_id).code, "invalid_custom_id");
        assert_eq!(refusal("\n \n".to_owned()).code, "empty_file");
    }

    #[test]
    fn files_hold_at_most_50_000_requests() {
        let mut content = String::new();
        for i in 0..MAX_FILE_LINES {
            content.push_str(&line(&i.to_string()));
            content.push('\n');
        }
        assert_eq!(
            parse_input(content.as_bytes()).unwrap().len(),
            MAX_FILE_LINES
        );
        content.push_str(&line("one too many"));
        let error = parse_input(content.as_bytes()).unwrap_err();
        assert_eq!(error.code, "too_many_requests");
        assert!(
            error.message.starts_with("Line 50001: "),
            "{}",
            error.message
        );
    }
}
