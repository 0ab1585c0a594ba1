//! A small client for the HTTP API, for backend services written in Rust.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fanout_producer::client::ClientError> {
//! use futures::StreamExt;
//! use fanout_producer::SubmitRequest;
//! use fanout_producer::client::FanoutClient;
//!
//! let client = FanoutClient::new("http://127.0.0.1:8080", Some("token-of-acme-0001".into()));
//! let accepted = client
//!     .submit(&SubmitRequest {
//!         template: "persona-panel".into(),
//!         inputs: serde_json::json!({"content": "…", "personas": [{"name": "Marta"}]}),
//!         lane: None,
//!         idempotency_key: Some("order-42".into()),
//!         callback_url: None,
//!         batch_api: None,
//!     })
//!     .await?;
//! let mut events = Box::pin(client.events(&accepted.id, None));
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("{} {}", event.event, event.data);
//! }
//! let markdown = client.report(&accepted.id, fanout_producer::api::DocFormat::Md).await?;
//! # let _ = markdown; Ok(()) }
//! ```

use std::collections::VecDeque;

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::SubmitRequest;
use crate::api::{
    Accepted, DocFormat, ERROR_EVENT, ErrorBody, ErrorDetail, REPORT_EVENT, ReportEvent, ReportRef,
    ReportView, TemplateInfo,
};

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{status} {code}: {message}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Api {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
        /// `retry-after` seconds, on 429 and 503.
        retry_after: Option<u64>,
    },
    /// An event stream ended with an `error` event.
    #[error("event stream failed: {}: {}", .0.code, .0.message)]
    Stream(ErrorDetail),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The answer did not have the expected shape.
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl ClientError {
    /// The API's error code (`invalid_input`, `not_found`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            Self::Stream(d) => Some(&d.code),
            _ => None,
        }
    }

    /// The request field the API named.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Api { field, .. } => field.as_deref(),
            Self::Stream(d) => d.field.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A client of one Fanout API. Cheap to clone.
#[derive(Clone)]
pub struct FanoutClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl std::fmt::Debug for FanoutClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl FanoutClient {
    /// `base_url` like `http://127.0.0.1:8080`; `token` is sent as `Authorization: Bearer`.
    pub fn new(base_url: impl Into<String>, token: Option<String>) -> Self {
        Self::with_http(reqwest::Client::new(), base_url, token)
    }

    /// With an HTTP client of your own (timeouts, proxies). Note that event streams run as
    /// long as the report: do not give this client a total request timeout.
    pub fn with_http(
        http: reqwest::Client,
        base_url: impl Into<String>,
        token: Option<String>,
    ) -> Self {
        Self {
            http,
            base: base_url.into().trim_end_matches('/').to_owned(),
            token,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Submit a report. A repeat with the same idempotency key answers with the first report
    /// (`duplicate: true`).
    pub async fn submit(&self, req: &SubmitRequest) -> Result<Accepted> {
        let resp = self
            .request(reqwest::Method::POST, "/v1/reports")
            .json(req)
            .send()
            .await?;
        json(check(resp).await?).await
    }

    /// The report as it stands.
    pub async fn get(&self, id: &str) -> Result<ReportView> {
        let resp = self
            .request(reqwest::Method::GET, &format!("/v1/reports/{}", encode(id)))
            .send()
            .await?;
        json(check(resp).await?).await
    }

    /// One page of the caller's reports, newest first: `query` is the query string of
    /// `GET /v1/reports` (`status=completed&limit=50&cursor=…`, or empty).
    pub async fn list(&self, query: &str) -> Result<crate::api::ReportList> {
        let path = if query.is_empty() {
            "/v1/reports".to_owned()
        } else {
            format!("/v1/reports?{query}")
        };
        let resp = self.request(reqwest::Method::GET, &path).send().await?;
        json(check(resp).await?).await
    }

    /// The assembled document, Markdown or JSON text.
    pub async fn report(&self, id: &str, format: DocFormat) -> Result<String> {
        let ext = match format {
            DocFormat::Md => "md",
            DocFormat::Json => "json",
        };
        let resp = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/reports/{}/report.{ext}", encode(id)),
            )
            .send()
            .await?;
        Ok(check(resp).await?.text().await?)
    }

    /// Cancel a report.
    pub async fn cancel(&self, id: &str) -> Result<ReportRef> {
        let resp = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v1/reports/{}", encode(id)),
            )
            .send()
            .await?;
        json(check(resp).await?).await
    }

    /// The templates the API knows.
    pub async fn templates(&self) -> Result<Vec<TemplateInfo>> {
        let resp = self
            .request(reqwest::Method::GET, "/v1/templates")
            .send()
            .await?;
        json(check(resp).await?).await
    }

    /// The system's status (admin token).
    pub async fn status(&self) -> Result<crate::ops::SystemStatus> {
        let resp = self
            .request(reqwest::Method::GET, "/v1/status")
            .send()
            .await?;
        json(check(resp).await?).await
    }

    /// The newest dead letters (admin token), optionally one report's.
    pub async fn dead_letters(
        &self,
        limit: usize,
        report_id: Option<&str>,
    ) -> Result<Vec<crate::ops::DeadLetterInfo>> {
        let mut path = format!("/v1/dead-letters?limit={limit}");
        if let Some(r) = report_id {
            path.push_str(&format!("&report_id={}", encode(r)));
        }
        let resp = self.request(reqwest::Method::GET, &path).send().await?;
        let list: crate::api::DeadLetterList = json(check(resp).await?).await?;
        Ok(list.dead_letters)
    }

    /// Run dead letters again (admin token).
    pub async fn replay(
        &self,
        sel: &crate::ops::DeadLetterSelection,
    ) -> Result<Vec<crate::ops::Resolution>> {
        self.post_resolutions("/v1/dead-letters/replay", sel).await
    }

    /// Delete dead letters (admin token).
    pub async fn drop_dead_letters(
        &self,
        sel: &crate::ops::DeadLetterSelection,
    ) -> Result<Vec<crate::ops::Resolution>> {
        self.post_resolutions("/v1/dead-letters/drop", sel).await
    }

    /// The newest dead webhooks (admin token).
    pub async fn dead_webhooks(&self, limit: usize) -> Result<Vec<crate::ops::DeadWebhookInfo>> {
        let resp = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/webhooks/dead?limit={limit}"),
            )
            .send()
            .await?;
        let list: crate::api::DeadWebhookList = json(check(resp).await?).await?;
        Ok(list.webhooks)
    }

    /// Send webhooks again from their first attempt (admin token).
    pub async fn redeliver_webhooks(
        &self,
        sel: &crate::api::WebhookSelection,
    ) -> Result<Vec<crate::ops::Resolution>> {
        self.post_resolutions("/v1/webhooks/redeliver", sel).await
    }

    /// Forget dead webhooks (admin token).
    pub async fn drop_webhooks(
        &self,
        sel: &crate::api::WebhookSelection,
    ) -> Result<Vec<crate::ops::Resolution>> {
        self.post_resolutions("/v1/webhooks/drop", sel).await
    }

    async fn post_resolutions<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Vec<crate::ops::Resolution>> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await?;
        let r: crate::api::Resolutions = json(check(resp).await?).await?;
        Ok(r.results)
    }

    /// The report's events (after `after`, a stream id), live, ending with the `report`
    /// event. A failed request is the stream's one item; an `error` event is an
    /// [`ClientError::Stream`] item that ends it.
    pub fn events(
        &self,
        id: &str,
        after: Option<&str>,
    ) -> impl Stream<Item = Result<ServerEvent>> + Send + 'static {
        let mut req = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/reports/{}/events", encode(id)),
            )
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(after) = after {
            req = req.header("last-event-id", after);
        }
        futures::stream::unfold(Events::Start(req), |state| async move {
            match state {
                Events::Start(req) => {
                    let resp = match req.send().await {
                        Ok(r) => r,
                        Err(e) => return Some((Err(e.into()), Events::Done)),
                    };
                    match check(resp).await {
                        Ok(resp) => {
                            let body = Box::pin(resp.bytes_stream());
                            next_event(body, SseParser::default()).await
                        }
                        Err(e) => Some((Err(e), Events::Done)),
                    }
                }
                Events::Reading(body, parser) => next_event(body, parser).await,
                Events::Done => None,
            }
        })
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEvent {
    /// The stream id (absent on the final `report` event).
    pub id: Option<String>,
    /// The kind: `section.completed`, …, or `report` for the final report.
    pub event: String,
    pub data: String,
}

impl ServerEvent {
    /// The final event: its data is the report JSON.
    pub fn is_report(&self) -> bool {
        self.event == REPORT_EVENT
    }

    /// A progress event's body (`None` for the `report` event).
    pub fn body(&self) -> Option<ReportEvent> {
        if self.is_report() {
            return None;
        }
        serde_json::from_str(&self.data).ok()
    }

    /// The data as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.data).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static>>;

enum Events {
    Start(reqwest::RequestBuilder),
    Reading(ByteStream, SseParser),
    Done,
}

async fn next_event(
    mut body: ByteStream,
    mut parser: SseParser,
) -> Option<(Result<ServerEvent>, Events)> {
    loop {
        if let Some(event) = parser.events.pop_front() {
            if event.event == ERROR_EVENT {
                let detail = serde_json::from_str::<ErrorBody>(&event.data)
                    .map(|b| b.error)
                    .unwrap_or(ErrorDetail {
                        code: "stream_error".into(),
                        message: event.data,
                        field: None,
                    });
                return Some((Err(ClientError::Stream(detail)), Events::Done));
            }
            return Some((Ok(event), Events::Reading(body, parser)));
        }
        match body.next().await {
            Some(Ok(chunk)) => parser.feed(&chunk),
            Some(Err(e)) => return Some((Err(e.into()), Events::Done)),
            None => return None,
        }
    }
}

/// A line parser of the `text/event-stream` format.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    events: VecDeque<ServerEvent>,
}

impl SseParser {
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            // A `\r` at the very end may be the first half of `\r\n`: wait for more.
            if self.buf[pos] == b'\r' && pos + 1 == self.buf.len() {
                break;
            }
            let line: Vec<u8> = self.buf.drain(..pos).collect();
            let first = self.buf.remove(0);
            if first == b'\r' && self.buf.first() == Some(&b'\n') {
                self.buf.remove(0);
            }
            self.line(&String::from_utf8_lossy(&line));
        }
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if let Some(mut data) = self.data.take() {
                if data.ends_with('\n') {
                    data.pop();
                }
                self.events.push_back(ServerEvent {
                    id: self.id.take(),
                    event: self.event.take().unwrap_or_else(|| "message".into()),
                    data,
                });
            }
            self.event = None;
            self.id = None;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                let d = self.data.get_or_insert_with(String::new);
                d.push_str(value);
                d.push('\n');
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let text = resp.text().await.unwrap_or_default();
    let (code, message, field) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => (b.error.code, b.error.message, b.error.field),
        Err(_) => ("http_error".to_owned(), text, None),
    };
    Err(ClientError::Api {
        status: status.as_u16(),
        code,
        message,
        field,
        retry_after,
    })
}

async fn json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
    let bytes = resp.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Report ids are plain (`[0-9A-Za-z-]`); anything else is percent-encoded so it stays one
/// path segment.
fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_fields_comments_split_chunks_and_crlf() {
        let mut p = SseParser::default();
        p.feed(b":keep-alive\n\nid: 1-0\nevent: section.started\ndata: {\"a\"");
        assert!(p.events.is_empty());
        p.feed(b":1}\n\r\nevent: report\r\ndata: line1\r\ndata: line2\r");
        p.feed(b"\n\r\n");
        let e1 = p.events.pop_front().unwrap();
        assert_eq!(e1.id.as_deref(), Some("1-0"));
        assert_eq!(e1.event, "section.started");
        assert_eq!(e1.data, "{\"a\":1}");
        let e2 = p.events.pop_front().unwrap();
        assert_eq!(
            (e2.id, e2.event.as_str(), e2.data.as_str()),
            (None, "report", "line1\nline2")
        );
        assert!(p.events.is_empty());
    }

    #[test]
    fn ids_are_encoded_into_one_segment() {
        assert_eq!(encode("abc-1"), "abc-1");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
