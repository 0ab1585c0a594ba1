#![doc = include_str!("../README.md")]

mod aggregator;
mod assemble;
mod error;
mod keys;
mod scripts;
mod store;
pub mod target;
mod view;
pub mod webhook;

pub use aggregator::{AggregatorOptions, GROUP, OnFinished, run};
pub use assemble::{
    DocumentSection, ForEachSection, JobSection, ReportDocument, format_time, render_json,
    render_markdown, report_document,
};
pub use error::{Error, Result};
pub use keys::{Keys, ReportKeys, is_report_id};
pub use store::{
    BatchApi, Created, Cursor, EVENTS_MAXLEN, Format, JobContext, ListQuery, NOTIFY_MAXLEN,
    NewReport, Released, Reopened, ReportEvent, ReportPage, ReportSummary, SectionResult,
    StartOutcome, Started, Store,
};
pub use view::{ReportView, SectionView, Totals, WebhookState, WebhookStatus};
