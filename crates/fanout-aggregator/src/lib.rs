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
    DocumentSection, ForEachSection, JobSection, ReportDocument, render_json, render_markdown,
    report_document,
};
pub use error::{Error, Result};
pub use keys::{Keys, ReportKeys};
pub use store::{
    Created, EVENTS_MAXLEN, Format, JobContext, NOTIFY_MAXLEN, NewReport, Released, ReportEvent,
    SectionResult, StartOutcome, Started, Store,
};
pub use view::{ReportView, SectionView, Totals, WebhookState, WebhookStatus};
