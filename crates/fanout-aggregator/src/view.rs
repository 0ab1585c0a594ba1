//! What the API and the CLI show of a report: [`ReportView`], read in one round trip. The
//! types here are the API's JSON bodies as they are: their serde shape is the wire format and
//! their `ToSchema` derive (doc comments become descriptions) is their OpenAPI schema.

use std::collections::HashMap;

use fanout_core::{Lane, ReportStatus, SectionSpec, SectionState, Template};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::store::SectionResult;

/// A report as it stands (`GET /v1/reports/{id}`): status, every section (every persona of a
/// panel) with its state, text, tokens, cost and timings, and the totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportView {
    pub id: String,
    pub tenant: String,
    /// Template name.
    pub template: String,
    /// Template title: the report's heading.
    pub title: String,
    pub status: ReportStatus,
    pub lane: Lane,
    /// The sections run through the provider's Batch API (half the price, answers within
    /// 24 h); each section's `batch_api` says whether its answer came from a batch.
    #[serde(default)]
    pub batch_api: bool,
    /// When a `batch_api` report must be finished (milliseconds since the Unix epoch):
    /// sections a batch would not answer in time run as live calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<u64>,
    /// Milliseconds since the Unix epoch (Redis clock).
    pub created_at: u64,
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The webhook to `callback_url`, once the report finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookStatus>,
    /// In template order; items of a `for_each` section in input order.
    pub sections: Vec<SectionView>,
    pub totals: Totals,
}

/// Where a report's webhook stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookStatus {
    pub state: WebhookState,
    /// POSTs started so far.
    pub attempts: u32,
    /// When the next try is due (milliseconds since the Unix epoch), while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
    /// Why the last try failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `pending` (due now), `retrying` (a try failed, the next is scheduled), `delivered`, or
/// `dead` (given up on; an operator can redeliver it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookState {
    Pending,
    Retrying,
    Delivered,
    Dead,
}

impl WebhookState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Retrying => "retrying",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Retrying, Self::Delivered, Self::Dead]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// One job of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SectionView {
    /// `profile`, or `persona[3]` for an item of a `for_each` section.
    pub job_id: String,
    /// The section id.
    pub section: String,
    /// Item index, for `for_each` sections.
    pub index: Option<usize>,
    /// Heading of a `for_each` item: the item's `name` (or the item itself when it is a short
    /// string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    pub title: String,
    pub state: SectionState,
    /// The section did not have to succeed for the report to be completed.
    #[serde(default)]
    pub optional: bool,
    /// The generated text, once done.
    pub text: Option<String>,
    /// Why it failed (the error) or was skipped (which dependency).
    pub reason: Option<String>,
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    /// Provider latency of the successful call.
    pub latency_ms: Option<u64>,
    /// Attempts: the job's starts (deliveries), or the provider calls of the delivery that
    /// finished it when more.
    pub attempts: u32,
    pub cached: bool,
    /// Answered through the provider's Batch API, at its batch price.
    #[serde(default)]
    pub batch_api: bool,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

/// Sums over a report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Totals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost: f64,
    /// Created to finished, or to now while running.
    pub wall_ms: u64,
    pub sections: usize,
    pub done: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cancelled: usize,
    /// Pending, ready or running.
    pub in_progress: usize,
}

impl ReportView {
    /// The job with this id.
    pub fn section(&self, job_id: &str) -> Option<&SectionView> {
        self.sections.iter().find(|s| s.job_id == job_id)
    }
}

/// One job's static place in the report, written at create time (the `layout` field of the
/// record) so that a view needs neither the template nor the inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayoutEntry {
    pub(crate) id: String,
    pub(crate) section: String,
    pub(crate) index: Option<usize>,
    pub(crate) title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) item: Option<String>,
    #[serde(default)]
    pub(crate) optional: bool,
}

/// The heading of a `for_each` item: its `name` field, or the item itself when it is a short
/// string.
pub(crate) fn item_label(
    spec: &SectionSpec,
    inputs: &Value,
    index: Option<usize>,
) -> Option<String> {
    let list = inputs.get(spec.for_each.as_deref()?)?;
    let item = list.get(index?)?;
    match item {
        Value::Object(map) => map
            .get("name")
            .and_then(Value::as_str)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        Value::String(s) if !s.trim().is_empty() && s.chars().count() <= 80 => {
            Some(s.trim().to_owned())
        }
        _ => None,
    }
}

/// The record fields a view reads, in HMGET order.
pub(crate) const META_FIELDS: [&str; 16] = [
    "id",
    "tenant",
    "name",
    "title",
    "status",
    "lane",
    "created_at",
    "finished_at",
    "callback_url",
    "layout",
    "webhook_state",
    "webhook_attempts",
    "webhook_next_at",
    "webhook_error",
    "batch_api",
    "deadline_ms",
];

/// Raw Redis data of one report, as read by `Store::view`.
pub(crate) struct RawReport {
    pub(crate) meta: Vec<Option<String>>,
    pub(crate) state: HashMap<String, String>,
    pub(crate) results: HashMap<String, String>,
    pub(crate) info: HashMap<String, String>,
}

pub(crate) fn build(report: &str, raw: RawReport, now_ms: u64) -> Result<Option<ReportView>> {
    let field = |i: usize| raw.meta.get(i).cloned().flatten();
    // No status: the record does not exist (never created, or expired).
    let Some(status) = field(4) else {
        return Ok(None);
    };
    let status = ReportStatus::parse(&status)
        .ok_or_else(|| Error::corrupt(report, format!("status `{status}`")))?;
    let lane = field(5).and_then(|l| Lane::parse(&l)).unwrap_or_default();
    let created_at = field(6).and_then(|v| v.parse().ok()).unwrap_or(0);
    let finished_at = field(7).and_then(|v| v.parse().ok());
    let layout: Vec<LayoutEntry> = serde_json::from_str(&field(9).unwrap_or_default())
        .map_err(|e| Error::corrupt(report, format!("layout: {e}")))?;

    let mut totals = Totals {
        sections: layout.len(),
        ..Totals::default()
    };
    let info = |job: &str, name: &str| raw.info.get(&format!("{job}|{name}"));
    let mut sections = Vec::with_capacity(layout.len());
    for entry in layout {
        let state = raw
            .state
            .get(&entry.id)
            .and_then(|s| SectionState::parse(s))
            .unwrap_or(SectionState::Pending);
        let result: Option<SectionResult> = match raw.results.get(&entry.id) {
            Some(json) => Some(
                serde_json::from_str(json)
                    .map_err(|e| Error::corrupt(report, format!("result of {}: {e}", entry.id)))?,
            ),
            None => None,
        };
        let count = |field: &str| -> u32 {
            info(&entry.id, field)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let started = count("attempts").max(count("tries"));
        let mut s = SectionView {
            job_id: entry.id.clone(),
            section: entry.section,
            index: entry.index,
            item: entry.item,
            title: entry.title,
            state,
            optional: entry.optional,
            text: None,
            reason: info(&entry.id, "error").cloned(),
            model: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost: 0.0,
            latency_ms: None,
            attempts: started,
            cached: false,
            batch_api: false,
            started_at: info(&entry.id, "started").and_then(|v| v.parse().ok()),
            finished_at: info(&entry.id, "finished").and_then(|v| v.parse().ok()),
        };
        if let Some(r) = result {
            s.text = Some(r.text);
            s.model = Some(r.model);
            s.prompt_tokens = r.prompt_tokens;
            s.completion_tokens = r.completion_tokens;
            s.cost = r.cost;
            s.latency_ms = Some(r.latency_ms);
            s.attempts = s.attempts.max(r.attempts);
            s.cached = r.cached;
            s.batch_api = r.batch_api;
        }
        totals.prompt_tokens += s.prompt_tokens;
        totals.completion_tokens += s.completion_tokens;
        totals.cost += s.cost;
        match s.state {
            SectionState::Done => totals.done += 1,
            SectionState::Failed => totals.failed += 1,
            SectionState::Skipped => totals.skipped += 1,
            SectionState::Cancelled => totals.cancelled += 1,
            SectionState::Pending | SectionState::Ready | SectionState::Running => {
                totals.in_progress += 1
            }
        }
        sections.push(s);
    }
    totals.total_tokens = totals.prompt_tokens + totals.completion_tokens;
    totals.wall_ms = finished_at.unwrap_or(now_ms).saturating_sub(created_at);

    Ok(Some(ReportView {
        id: field(0).unwrap_or_else(|| report.to_owned()),
        tenant: field(1).unwrap_or_default(),
        template: field(2).unwrap_or_default(),
        title: field(3).unwrap_or_default(),
        status,
        lane,
        batch_api: field(14).is_some_and(|v| v == "1"),
        deadline_at: field(15).and_then(|v| v.parse().ok()),
        created_at,
        finished_at,
        callback_url: field(8),
        webhook: field(10)
            .and_then(|s| WebhookState::parse(&s))
            .map(|state| WebhookStatus {
                state,
                attempts: field(11).and_then(|v| v.parse().ok()).unwrap_or(0),
                next_attempt_at: field(12).and_then(|v| v.parse().ok()),
                last_error: field(13).filter(|e| !e.is_empty()),
            }),
        sections,
        totals,
    }))
}

/// The layout of a new report, in graph (template) order.
pub(crate) fn layout(
    template: &Template,
    inputs: &Value,
    graph: &fanout_core::JobGraph,
) -> Vec<LayoutEntry> {
    graph
        .jobs
        .iter()
        .map(|node| {
            let spec = template.section(&node.section);
            LayoutEntry {
                id: node.id.clone(),
                section: node.section.clone(),
                index: node.index,
                title: spec.map(|s| s.title.clone()).unwrap_or_default(),
                item: spec.and_then(|s| item_label(s, inputs, node.index)),
                optional: spec.is_some_and(|s| s.optional),
            }
        })
        .collect()
}
