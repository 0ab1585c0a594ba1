//! The payload of a section job on the queue: which report, which job. Everything else (template,
//! inputs, dependency results) is read from the report record when the job runs, so a retried or
//! reclaimed job always sees the current state.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionJob {
    pub report_id: String,
    pub job_id: String,
    /// Run as a live call even though the report runs through the provider's Batch API: its
    /// batch would not answer before the report's deadline, or no batch can take it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

impl SectionJob {
    pub fn new(report_id: impl Into<String>, job_id: impl Into<String>) -> Self {
        Self {
            report_id: report_id.into(),
            job_id: job_id.into(),
            live: false,
        }
    }

    /// The same section, to run as a live call (see [`SectionJob::live`]).
    pub fn live(mut self) -> Self {
        self.live = true;
        self
    }

    /// The id on the queue, which is also the enqueue idempotency key: a job enqueued twice (a
    /// retried completion, a repeated submit) runs once. A live fallback job has an id of its
    /// own: the job that parked the section in the batch lane was enqueued under the first.
    pub fn queue_id(&self) -> String {
        if self.live {
            format!("{}:{}:live", self.report_id, self.job_id)
        } else {
            format!("{}:{}", self.report_id, self.job_id)
        }
    }

    /// The section's id in the Batch API lane (and a batch line's `custom_id`).
    pub fn member(&self) -> String {
        format!("{}:{}", self.report_id, self.job_id)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
