//! Report assembly: a [`ReportView`] as a Markdown document and as a JSON document, in
//! template order, partial while the report runs.

use fanout_core::{Lane, ReportStatus, SectionState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::view::{ReportView, SectionView, Totals};

/// Consecutive jobs of one section: a plain section (one job) or a `for_each` section (one
/// job per item, in input order).
struct Group<'a> {
    section: &'a str,
    title: &'a str,
    jobs: Vec<&'a SectionView>,
    for_each: bool,
}

fn groups(view: &ReportView) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for s in &view.sections {
        match out.last_mut() {
            Some(g) if g.section == s.section => g.jobs.push(s),
            _ => out.push(Group {
                section: &s.section,
                title: &s.title,
                jobs: vec![s],
                for_each: s.index.is_some(),
            }),
        }
    }
    for g in &mut out {
        g.jobs.sort_by_key(|s| s.index);
    }
    out
}

/// The report as Markdown: a header with status and totals, then every section in template
/// order (`for_each` items as subsections), each with a footer of model, tokens, cost and
/// latency. Sections not finished yet are marked in progress, failed and skipped ones say why.
pub fn render_markdown(view: &ReportView) -> String {
    let mut md = String::new();
    let title = if view.title.trim().is_empty() {
        &view.template
    } else {
        &view.title
    };
    md.push_str(&format!("# {}\n\n", escape(&one_line(title))));
    md.push_str(&format!("> {}\n>\n", summary_line(view)));
    let mut meta = format!(
        "> Report `{}` · template `{}` · created {}",
        view.id,
        view.template,
        format_time(view.created_at)
    );
    if let Some(f) = view.finished_at {
        meta.push_str(&format!(" · finished {}", format_time(f)));
    }
    md.push_str(&meta);
    md.push_str("\n\n");

    for g in groups(view) {
        md.push_str(&format!(
            "## {}\n\n",
            escape(&one_line(heading(g.title, g.section)))
        ));
        if g.for_each {
            for (n, job) in g.jobs.iter().enumerate() {
                let label = job
                    .item
                    .clone()
                    .unwrap_or_else(|| format!("Item {}", job.index.unwrap_or(n) + 1));
                md.push_str(&format!("### {}\n\n", escape(&one_line(&label))));
                section_body(&mut md, job, 4);
            }
        } else {
            for job in g.jobs {
                section_body(&mut md, job, 3);
            }
        }
    }
    while md.ends_with("\n\n") {
        md.pop();
    }
    md
}

fn heading<'a>(title: &'a str, section: &'a str) -> &'a str {
    if title.trim().is_empty() {
        section
    } else {
        title.trim()
    }
}

/// `top`: the level the text's own headings start at, so that they nest under the report's.
fn section_body(md: &mut String, s: &SectionView, top: usize) {
    match s.state {
        SectionState::Done => {
            let text = s.text.as_deref().unwrap_or("").trim();
            if text.is_empty() {
                md.push_str("_(empty response)_\n\n");
            } else {
                md.push_str(&nest_headings(text, top));
                md.push_str("\n\n");
            }
            md.push_str(&format!("*{}*\n\n", section_footer(s)));
        }
        SectionState::Failed => md.push_str(&format!(
            "> ❌ failed: {}\n\n",
            escape(&one_line(s.reason.as_deref().unwrap_or("unknown error")))
        )),
        SectionState::Skipped => md.push_str(&format!(
            "> ⏭ skipped: {}\n\n",
            escape(&one_line(
                s.reason.as_deref().unwrap_or("a dependency failed")
            ))
        )),
        SectionState::Cancelled => md.push_str("> ⏹ cancelled\n\n"),
        SectionState::Pending | SectionState::Ready | SectionState::Running => {
            md.push_str("_⏳ in progress_\n\n")
        }
    }
}

fn section_footer(s: &SectionView) -> String {
    let mut parts = Vec::new();
    if let Some(model) = s.model.as_deref().filter(|m| !m.is_empty()) {
        parts.push(model.to_owned());
    }
    parts.push(format!(
        "{} tokens ({} in, {} out)",
        thousands(s.prompt_tokens + s.completion_tokens),
        thousands(s.prompt_tokens),
        thousands(s.completion_tokens)
    ));
    parts.push(format_cost(s.cost));
    if let Some(ms) = s.latency_ms {
        parts.push(format_duration(ms));
    }
    if s.attempts > 1 {
        parts.push(format!("{} attempts", s.attempts));
    }
    if s.cached {
        parts.push("cached".into());
    }
    if s.batch_api {
        parts.push("batch API".into());
    }
    parts.join(" · ")
}

fn summary_line(view: &ReportView) -> String {
    let t = &view.totals;
    let status = match view.status {
        ReportStatus::Running => "⏳ Running",
        ReportStatus::Completed => "✅ Completed",
        ReportStatus::CompletedWithFailures => "⚠️ Completed with failures",
        ReportStatus::Failed => "❌ Failed",
        ReportStatus::Cancelled => "⏹ Cancelled",
    };
    let mut parts = vec![
        format!("**{status}**"),
        format!("{} of {} sections done", t.done, t.sections),
    ];
    for (n, what) in [
        (t.failed, "failed"),
        (t.skipped, "skipped"),
        (t.cancelled, "cancelled"),
        (t.in_progress, "in progress"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if t.total_tokens > 0 {
        parts.push(format!(
            "{} tokens ({} in, {} out)",
            thousands(t.total_tokens),
            thousands(t.prompt_tokens),
            thousands(t.completion_tokens)
        ));
        parts.push(format_cost(t.cost));
    }
    parts.push(format_duration(t.wall_ms));
    parts.join(" · ")
}

/// The report as a JSON document (`GET /v1/reports/{id}/report.json`, the webhook body, the
/// event stream's `report` event): the fields of a `ReportView` with the same names
/// and formats (timestamps in milliseconds since the Unix epoch), except that the sections
/// are grouped the way the document reads: a plain section is its one job, a `for_each`
/// section holds its jobs in `items`, in input order. It has no `callback_url`: the document
/// goes to that URL and to readers who need not know it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportDocument {
    pub id: String,
    pub tenant: String,
    /// Template name.
    pub template: String,
    /// Template title: the report's heading.
    pub title: String,
    pub status: ReportStatus,
    pub lane: Lane,
    /// The sections ran through the provider's Batch API (each section's `batch_api` says
    /// whether its answer came from a batch).
    #[serde(default)]
    pub batch_api: bool,
    /// When a `batch_api` report had to be finished (milliseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<u64>,
    /// Milliseconds since the Unix epoch (Redis clock).
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub totals: Totals,
    /// In template order.
    pub sections: Vec<DocumentSection>,
}

/// One section of a `ReportDocument`: `for_each` tells which shape it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DocumentSection {
    Job(JobSection),
    ForEach(ForEachSection),
}

/// A plain section: its one job, as in a `ReportView`, and `for_each: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobSection {
    #[serde(flatten)]
    pub job: SectionView,
    /// Always `false`.
    pub for_each: bool,
}

/// A `for_each` section: one job per item of its list input, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ForEachSection {
    /// The section id.
    pub section: String,
    pub title: String,
    /// The section did not have to succeed for the report to be completed.
    pub optional: bool,
    /// Always `true`.
    pub for_each: bool,
    /// Items whose job is done.
    pub items_done: usize,
    pub items_total: usize,
    /// The jobs, as in a `ReportView` (`index` and `item` name the item).
    pub items: Vec<SectionView>,
}

impl DocumentSection {
    /// The section id.
    pub fn section(&self) -> &str {
        match self {
            Self::Job(s) => &s.job.section,
            Self::ForEach(s) => &s.section,
        }
    }
}

/// The report as a [`ReportDocument`].
pub fn report_document(view: &ReportView) -> ReportDocument {
    let sections = groups(view)
        .into_iter()
        .map(|g| {
            let title = heading(g.title, g.section).to_owned();
            if g.for_each {
                DocumentSection::ForEach(ForEachSection {
                    section: g.section.to_owned(),
                    title,
                    optional: g.jobs.iter().any(|s| s.optional),
                    for_each: true,
                    items_done: g
                        .jobs
                        .iter()
                        .filter(|s| s.state == SectionState::Done)
                        .count(),
                    items_total: g.jobs.len(),
                    items: g.jobs.into_iter().cloned().collect(),
                })
            } else {
                let mut job = g.jobs[0].clone();
                job.title = title;
                DocumentSection::Job(JobSection {
                    job,
                    for_each: false,
                })
            }
        })
        .collect();
    ReportDocument {
        id: view.id.clone(),
        tenant: view.tenant.clone(),
        template: view.template.clone(),
        title: view.title.clone(),
        status: view.status,
        lane: view.lane,
        batch_api: view.batch_api,
        deadline_at: view.deadline_at,
        created_at: view.created_at,
        finished_at: view.finished_at,
        totals: view.totals.clone(),
        sections,
    }
}

/// The report as a JSON document: a [`ReportDocument`].
pub fn render_json(view: &ReportView) -> Value {
    serde_json::to_value(report_document(view)).expect("a report document serializes")
}

/// The level of an ATX heading line (`## Title` → 2).
fn heading_level(line: &str) -> Option<usize> {
    let hashes = line.bytes().take_while(|b| *b == b'#').count();
    let rest = &line[hashes..];
    ((1..=6).contains(&hashes) && (rest.is_empty() || rest.starts_with([' ', '\t'])))
        .then_some(hashes)
}

/// Shift the headings of generated text so the highest one is at level `top` (at most 6),
/// leaving fenced code alone: a model's `## Overview` must not read as a report section.
pub(crate) fn nest_headings(text: &str, top: usize) -> String {
    let mut fenced = false;
    let mut lines: Vec<(bool, &str)> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fenced = !fenced;
            lines.push((false, line));
        } else {
            lines.push((!fenced && heading_level(line).is_some(), line));
        }
    }
    let Some(min) = lines
        .iter()
        .filter(|(h, _)| *h)
        .filter_map(|(_, l)| heading_level(l))
        .min()
    else {
        return text.to_owned();
    };
    let shift = top.saturating_sub(min);
    if shift == 0 {
        return text.to_owned();
    }
    lines
        .into_iter()
        .map(
            |(is_heading, line)| match heading_level(line).filter(|_| is_heading) {
                Some(level) => format!("{}{}", "#".repeat((level + shift).min(6)), &line[level..]),
                None => line.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// `s` as literal Markdown text inside a line (a heading, a quote): the characters that start
/// markup there are backslash-escaped (CommonMark renders `\\<` as `<`), so a name such as
/// `<script>…` or `*[x](javascript:…)*` shows as typed and is never HTML, emphasis, code or a
/// link. The rest (`-`, `.`, `(`, …) means something only at the start of a block or right after
/// a `]`, and stays as typed, so ordinary titles read as they are.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '~' | '&'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn format_cost(cost: f64) -> String {
    if cost >= 1.0 {
        format!("${cost:.2}")
    } else if cost >= 0.01 || cost == 0.0 {
        format!("${cost:.4}")
    } else {
        format!("${cost:.6}")
    }
}

/// `850 ms`, `3.2 s`, `1m 32s`, `1h 02m`.
pub(crate) fn format_duration(ms: u64) -> String {
    let secs = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if secs < 60 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if secs < 3600 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// (year, month, day, hour, minute, second, millisecond) in UTC.
fn civil(ms: u64) -> (i64, u32, u32, u64, u64, u64, u64) {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000,
    )
}

/// `2025-01-02 10:00:00 UTC`.
pub fn format_time(ms: u64) -> String {
    let (y, mo, d, h, mi, s, _) = civil(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_inputs_are_literal_markdown() {
        assert_eq!(
            escape("<script>alert(1)</script>"),
            "\\<script\\>alert(1)\\</script\\>"
        );
        assert_eq!(escape("*[x](javascript:y)*"), "\\*\\[x\\](javascript:y)\\*");
        assert_eq!(escape("Zoë, 49"), "Zoë, 49");
        // Every character is escaped on its own: nothing a name holds can close an escape.
        assert_eq!(escape("\\<"), "\\\\\\<");
    }

    #[test]
    fn generated_headings_nest_under_the_section() {
        let text = "## Overview\nbody\n```\n# not a heading\n```\n### Detail\n#hashtag";
        assert_eq!(
            nest_headings(text, 3),
            "### Overview\nbody\n```\n# not a heading\n```\n#### Detail\n#hashtag"
        );
        assert_eq!(nest_headings("plain", 3), "plain");
        assert_eq!(nest_headings("#### Deep", 3), "#### Deep");
        assert_eq!(nest_headings("# A\n###### F", 4), "#### A\n###### F");
    }

    fn job(section: &str, index: Option<usize>, item: Option<&str>) -> SectionView {
        SectionView {
            job_id: match index {
                Some(i) => format!("{section}[{i}]"),
                None => section.to_owned(),
            },
            section: section.to_owned(),
            index,
            item: item.map(str::to_owned),
            title: String::new(),
            state: SectionState::Done,
            optional: false,
            text: Some("text".into()),
            reason: None,
            model: Some("gpt-4o-mini".into()),
            prompt_tokens: 10,
            completion_tokens: 20,
            cost: 0.001,
            latency_ms: Some(5),
            attempts: 1,
            cached: false,
            batch_api: false,
            started_at: Some(1_000),
            finished_at: Some(2_000),
        }
    }

    #[test]
    fn names_from_inputs_are_text_in_the_markdown_and_as_given_in_the_json() {
        let name = "<img src=x onerror=alert(1)> *[a](javascript:b)*";
        let view = ReportView {
            id: "r1".into(),
            tenant: "t".into(),
            template: "persona-panel".into(),
            title: "Persona panel".into(),
            status: ReportStatus::Completed,
            lane: Lane::Interactive,
            batch_api: false,
            deadline_at: None,
            created_at: 0,
            finished_at: Some(1),
            callback_url: None,
            webhook: None,
            sections: vec![job("persona", Some(0), Some(name))],
            totals: Totals::default(),
        };
        let md = render_markdown(&view);
        assert!(
            md.contains(r"### \<img src=x onerror=alert(1)\> \*\[a\](javascript:b)\*"),
            "{md}"
        );
        // No `<` that Markdown would read as the start of HTML.
        assert!(
            md.match_indices('<').all(|(i, _)| md[..i].ends_with('\\')),
            "{md}"
        );
        let doc = render_json(&view);
        assert_eq!(doc["sections"][0]["items"][0]["item"], name);
    }

    #[test]
    fn the_json_document_has_the_views_names_and_formats() {
        let view = ReportView {
            id: "r1".into(),
            tenant: "t".into(),
            template: "persona-panel".into(),
            title: "Persona panel".into(),
            status: ReportStatus::Completed,
            lane: Lane::Interactive,
            batch_api: false,
            deadline_at: None,
            created_at: 1_709_210_096_789,
            finished_at: Some(1_709_210_099_000),
            callback_url: Some("https://example.com/hook".into()),
            webhook: None,
            // A for_each section's jobs out of order: the document puts them in input order.
            sections: vec![
                job("persona", Some(1), Some("Tom")),
                job("persona", Some(0), Some("Marta")),
                job("summary", None, None),
            ],
            totals: Totals::default(),
        };
        let doc = render_json(&view);
        assert_eq!(doc["created_at"], 1_709_210_096_789_u64);
        assert_eq!(doc["finished_at"], 1_709_210_099_000_u64);
        assert!(doc.get("callback_url").is_none());
        let persona = &doc["sections"][0];
        assert_eq!(persona["section"], "persona");
        assert_eq!(persona["for_each"], true);
        assert_eq!(persona["items_done"], 2);
        assert_eq!(persona["items"][0]["item"], "Marta");
        assert_eq!(persona["items"][0]["index"], 0);
        assert_eq!(persona["items"][1]["job_id"], "persona[1]");
        assert_eq!(persona["items"][1]["started_at"], 1_000);
        let summary = &doc["sections"][1];
        assert_eq!(summary["section"], "summary");
        assert_eq!(summary["for_each"], false);
        // An untitled section is headed by its id, as in the Markdown.
        assert_eq!(summary["title"], "summary");
        assert_eq!(summary["text"], "text");
        let back: ReportDocument = serde_json::from_value(doc).unwrap();
        assert_eq!(back, report_document(&view));
        assert_eq!(back.sections[1].section(), "summary");
    }

    #[test]
    fn numbers_and_times_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(format_cost(0.042), "$0.0420");
        assert_eq!(format_cost(0.000045), "$0.000045");
        assert_eq!(format_cost(12.5), "$12.50");
        assert_eq!(format_duration(850), "850 ms");
        assert_eq!(format_duration(3_240), "3.2 s");
        assert_eq!(format_duration(92_000), "1m 32s");
        assert_eq!(format_duration(3_720_000), "1h 02m");
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_709_210_096_789), "2024-02-29 12:34:56 UTC");
    }
}
