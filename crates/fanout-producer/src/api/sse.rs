//! `GET /v1/reports/{id}/events`: a report's event stream as Server-Sent Events.
//!
//! Each event's `id:` is its Redis stream id and its `event:` the kind (`section.completed`,
//! …); `data:` is a [`ReportEvent`]. The stream replays from the start, or after the id in
//! `Last-Event-ID` (or `?after=`), then follows live. After `report.finished` it sends one
//! `report` event whose data is the final report JSON, and ends. Keep-alive comments go out
//! while nothing happens.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use fanout_aggregator::{Format, ReportEvent, Store};
use futures::Stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::ApiState;
use super::auth::Tenant;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, ReportId};

/// Events read from Redis at once.
const PAGE: usize = 200;

/// The SSE event that carries the final report JSON.
pub const REPORT_EVENT: &str = "report";
/// The SSE event sent when the stream cannot go on (its data is an [`ErrorBody`]).
pub const ERROR_EVENT: &str = "error";

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    after: Option<String>,
}

/// A Redis stream id, `<ms>-<seq>`.
fn is_stream_id(s: &str) -> bool {
    s.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            // Up to 19 digits: always a u64, as Redis requires.
            && ms.len() <= 19
            && seq.len() <= 19
            && ms.bytes().all(|b| b.is_ascii_digit())
            && seq.bytes().all(|b| b.is_ascii_digit())
    })
}

#[utoipa::path(
    get,
    path = "/v1/reports/{id}/events",
    tag = "reports",
    operation_id = "report_events",
    summary = "The report's progress as Server-Sent Events",
    description = "Every event of the report, from the start or after `Last-Event-ID` \
        (or `?after=`; the header wins), then live. Each SSE event has `id:` (the stream id), \
        `event:` (the kind: `report.created`, `section.started`, `section.completed`, \
        `section.failed`, `section.skipped`, `section.cancelled`, `report.finished`, …) and \
        `data:` (a `ReportEvent` as JSON). After `report.finished` one `report` event carries \
        the final report document (as `GET /v1/reports/{id}/report.json`) and the stream \
        ends: close the EventSource on it. An `error` event (data: `ErrorBody`) ends the \
        stream early when Redis fails; reconnect with `Last-Event-ID`. Comments keep the \
        connection alive.",
    params(
        ("id" = String, Path, description = "Report id", pattern = "^[0-9A-Za-z-]{1,64}$"),
        ("after" = Option<String>, Query, description = "Replay only events after this stream id (empty: from the start)", pattern = "^([0-9]{1,19}-[0-9]{1,19})?$"),
        ("Last-Event-ID" = Option<String>, Header, description = "Replay only events after this stream id (what EventSource sends on reconnect; empty: from the start)", pattern = "^([0-9]{1,19}-[0-9]{1,19})?$"),
    ),
    responses(
        (status = 200, description = "The event stream.", body = String, content_type = "text/event-stream"),
        (status = 400, description = "`after` or `Last-Event-ID` is not a stream id.", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 404, description = "Unknown, expired or another tenant's report.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn events(
    State(state): State<ApiState>,
    tenant: Tenant,
    ReportId(id): ReportId,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Both are checked when both are given; the header wins. Empty means "from the start".
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{fffd}").trim().to_owned());
    for (field, value) in [("Last-Event-ID", &header), ("after", &q.after)] {
        if let Some(value) = value
            && !value.is_empty()
            && !is_stream_id(value)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("`{value}` is not an event id (like `1718000000000-0`)"),
            )
            .with_field(field));
        }
    }
    let after = header
        .filter(|h| !h.is_empty())
        .or(q.after.filter(|a| !a.is_empty()));
    state.view_for(&tenant, &id).await?;
    let follow = Follow {
        store: state.store().clone(),
        id,
        after,
        phase: Phase::Live,
        pending: VecDeque::new(),
        block: state.sse_block(),
        shutdown: state.streams_token(),
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        f.next().await.map(|event| (Ok(event), f))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.keep_alive())))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and following events.
    Live,
    /// `report.finished` was sent: the report event is next.
    Finishing,
    Done,
}

/// The state of one event stream.
struct Follow {
    store: Store,
    id: String,
    after: Option<String>,
    phase: Phase,
    pending: VecDeque<Event>,
    block: Duration,
    shutdown: CancellationToken,
}

impl Follow {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Finishing => {
                    // An operator reopened the report after that `report.finished` (a replayed
                    // section): more events follow, and the report finishes again later.
                    match self.reopened().await {
                        Ok(true) => {
                            self.phase = Phase::Live;
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.phase = Phase::Done;
                            return Some(error_event(e));
                        }
                    }
                    self.phase = Phase::Done;
                    return Some(match self.store.document(&self.id, Format::Json).await {
                        Ok(Some(doc)) => Event::default().event(REPORT_EVENT).data(doc),
                        Ok(None) => error_event(ApiError::report_not_found(&self.id)),
                        Err(e) => error_event(e.into()),
                    });
                }
                Phase::Live => {
                    if let Err(e) = self.fill().await {
                        self.phase = Phase::Done;
                        return Some(error_event(e));
                    }
                }
            }
        }
    }

    /// Whether the report went on after the `report.finished` just sent: events follow it, or
    /// it is running again.
    async fn reopened(&self) -> Result<bool, ApiError> {
        let more = self
            .store
            .events(&self.id, self.after.as_deref(), None, 1)
            .await?;
        if !more.is_empty() {
            return Ok(true);
        }
        Ok(self
            .store
            .status(&self.id)
            .await?
            .is_some_and(|s| !s.is_terminal()))
    }

    /// Queue the next events, or move to the next phase.
    async fn fill(&mut self) -> Result<(), ApiError> {
        let events = self
            .store
            .events(&self.id, self.after.as_deref(), None, PAGE)
            .await?;
        if !events.is_empty() {
            self.push(events);
            return Ok(());
        }
        // Caught up. A finished report has nothing more to come (a client that reconnects
        // after `report.finished` still gets the report event).
        match self.store.status(&self.id).await? {
            None => return Err(ApiError::report_not_found(&self.id)),
            Some(s) if s.is_terminal() => {
                self.phase = Phase::Finishing;
                return Ok(());
            }
            Some(_) => {}
        }
        let read = self
            .store
            .events(&self.id, self.after.as_deref(), Some(self.block), PAGE);
        tokio::select! {
            _ = self.shutdown.cancelled() => {
                self.phase = Phase::Done;
                Ok(())
            }
            events = read => {
                self.push(events?);
                Ok(())
            }
        }
    }

    fn push(&mut self, events: Vec<ReportEvent>) {
        for e in events {
            self.after = Some(e.id.clone());
            let finished = e.kind == "report.finished";
            let data = serde_json::to_string(&e).expect("an event serializes");
            let kind: String = e.kind.chars().filter(|c| !c.is_control()).collect();
            self.pending
                .push_back(Event::default().id(e.id).event(kind).data(data));
            if finished {
                self.phase = Phase::Finishing;
                return;
            }
        }
    }
}

fn error_event(e: ApiError) -> Event {
    let body: ErrorBody = e.body();
    Event::default()
        .event(ERROR_EVENT)
        .data(serde_json::to_string(&body).expect("an error serializes"))
}

#[cfg(test)]
mod tests {
    use super::is_stream_id;

    #[test]
    fn stream_ids() {
        assert!(is_stream_id("1718000000000-0"));
        assert!(is_stream_id("0-1"));
        assert!(!is_stream_id("1718000000000"));
        assert!(!is_stream_id("-0"));
        assert!(!is_stream_id("a-b"));
        assert!(!is_stream_id("1-2-3"));
        assert!(is_stream_id("9999999999999999999-0"));
        assert!(!is_stream_id("99999999999999999999-0"));
    }
}
