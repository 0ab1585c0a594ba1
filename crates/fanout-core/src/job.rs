//! The payload of a section job on the queue: which report, which job. Everything else (template,
//! inputs, dependency results) is read from the report record when the job runs, so a retried or
//! reclaimed job always sees the current state.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionJob {
    pub report_id: String,
    pub job_id: String,
}

impl SectionJob {
    pub fn new(report_id: impl Into<String>, job_id: impl Into<String>) -> Self {
        Self {
            report_id: report_id.into(),
            job_id: job_id.into(),
        }
    }

    /// The id on the queue, which is also the enqueue idempotency key: a job enqueued twice (a
    /// retried completion, a repeated submit) runs once.
    pub fn queue_id(&self) -> String {
        format!("{}:{}", self.report_id, self.job_id)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
