#![doc = include_str!("../README.md")]

pub mod api;
pub mod client;
pub mod ops;
mod templates;

pub use templates::{ResolveError, Templates};

use std::sync::Arc;

pub use fanout_aggregator::target;
use fanout_aggregator::{NewReport, Store};
use fanout_core::job::SectionJob;
use fanout_core::report::Lane;
use fanout_core::template::InputError;
use fanout_metrics::METRICS;
use fanout_queue::{NewJob, Queue};
use serde::{Deserialize, Serialize};
pub use target::{TargetError, WebhookTargets};

/// A request for a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// A template name (`startup-report`) or a path to a template file.
    pub template: String,
    /// The template's inputs.
    pub inputs: serde_json::Value,
    /// `interactive` (default) or `batch`.
    #[serde(default)]
    pub lane: Option<Lane>,
    /// A second submit with the same key (per tenant) returns the first report.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Run the sections through the provider's Batch API, or not (default: the template's
    /// `batch_api`).
    #[serde(default)]
    pub batch_api: Option<BatchApiChoice>,
}

/// A request's `batch_api`: `false` (live calls), `true` (the Batch API, with the template's
/// deadline if it has one), or `{"deadline_secs": N}` (the Batch API, finished within N
/// seconds of the submit: sections a batch would not answer in time run as live calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchApiChoice {
    Off,
    On { deadline_secs: Option<u64> },
}

impl Serialize for BatchApiChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        match self {
            Self::Off => s.serialize_bool(false),
            Self::On {
                deadline_secs: None,
            } => s.serialize_bool(true),
            Self::On {
                deadline_secs: Some(secs),
            } => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("deadline_secs", secs)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for BatchApiChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Choice;
        impl<'de> serde::de::Visitor<'de> for Choice {
            type Value = BatchApiChoice;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or an object such as {\"deadline_secs\": 3600}")
            }

            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
                Ok(if on {
                    BatchApiChoice::On {
                        deadline_secs: None,
                    }
                } else {
                    BatchApiChoice::Off
                })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut deadline_secs = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "deadline_secs" {
                        return Err(serde::de::Error::unknown_field(&key, &["deadline_secs"]));
                    }
                    deadline_secs = map.next_value::<Option<u64>>()?;
                }
                Ok(BatchApiChoice::On { deadline_secs })
            }
        }
        d.deserialize_any(Choice)
    }
}

/// What a submit did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Submitted {
    pub report_id: String,
    /// True when the idempotency key matched an earlier report (nothing new was enqueued).
    pub duplicate: bool,
    /// Jobs in the report.
    pub jobs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Template(#[from] ResolveError),
    #[error("{}: {}", .0.field, .0.message)]
    Input(InputError),
    #[error("field `{field}`: {message}")]
    Field { field: String, message: String },
    /// The idempotency key made report `report` from another request.
    #[error(
        "idempotency_key: this key was used for a different request (report `{report}`); a key stands for one request (template, inputs, lane, callback_url, batch_api): use a new key for a new request"
    )]
    IdempotencyConflict { report: String },
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
}

impl SubmitError {
    /// The request field the error is about, for API error bodies.
    pub fn field(&self) -> Option<String> {
        match self {
            Self::Template(_) => Some("template".into()),
            Self::Input(e) => Some(e.field.clone()),
            Self::Field { field, .. } => Some(field.clone()),
            Self::IdempotencyConflict { .. } => Some("idempotency_key".into()),
            Self::Unavailable(_) => None,
        }
    }
}

/// Turns requests into report records and queued jobs.
#[derive(Debug, Clone)]
pub struct Producer {
    store: Store,
    queue: Queue,
    templates: Arc<Templates>,
    targets: Arc<WebhookTargets>,
}

impl Producer {
    /// A producer whose webhooks may go to public addresses only.
    pub fn new(store: Store, queue: Queue, templates: Templates) -> Self {
        Self {
            store,
            queue,
            templates: Arc::new(templates),
            targets: Arc::default(),
        }
    }

    /// The same producer, checking `callback_url`s against `targets` (internal receivers the
    /// operator allows).
    pub fn with_webhook_targets(mut self, targets: WebhookTargets) -> Self {
        self.targets = Arc::new(targets);
        self
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Validate, store the report and enqueue its ready jobs. Nothing is written when the request
    /// is invalid. Safe to repeat with the same idempotency key: a repeat re-enqueues the first
    /// report's ready jobs (idempotent by job id), which also heals a crash between the two steps.
    pub async fn submit(&self, tenant: &str, req: SubmitRequest) -> Result<Submitted, SubmitError> {
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > 200)
        {
            return Err(SubmitError::Field {
                field: "idempotency_key".into(),
                message: "must be 1 to 200 characters".into(),
            });
        }
        let callback_url = match &req.callback_url {
            Some(raw) => Some(
                self.targets
                    .check(raw)
                    .await
                    .map_err(|e| SubmitError::Field {
                        field: "callback_url".into(),
                        message: e.to_string(),
                    })?
                    .to_string(),
            ),
            None => None,
        };
        let template = self.templates.resolve(&req.template)?;
        template
            .validate_inputs(&req.inputs)
            .map_err(SubmitError::Input)?;
        let graph = template
            .job_graph(&req.inputs)
            .map_err(SubmitError::Input)?;
        let lane = req.lane.unwrap_or_else(|| template.default_lane());
        let batch_api = batch_mode(&template, req.batch_api)?;
        let jobs = graph.jobs.len();
        let created = self
            .store
            .create(NewReport {
                tenant: tenant.to_owned(),
                template: (*template).clone(),
                inputs: req.inputs,
                graph,
                lane: lane.to_string(),
                idempotency_key: req.idempotency_key,
                callback_url,
                batch_api,
            })
            .await
            .map_err(|e| match e {
                fanout_aggregator::Error::IdempotencyConflict { report } => {
                    SubmitError::IdempotencyConflict { report }
                }
                e => SubmitError::Unavailable(e.to_string()),
            })?;
        let queue_lane = queue_lane(lane);
        let new_jobs: Vec<NewJob> = created
            .ready
            .iter()
            .map(|node| {
                METRICS
                    .jobs_enqueued
                    .with_label_values(&[lane.to_string().as_str(), node.section.as_str()])
                    .inc();
                let job = SectionJob::new(&created.report_id, &node.id);
                NewJob::new(
                    job.queue_id(),
                    serde_json::to_value(&job).expect("a job serializes"),
                )
                .lane(queue_lane)
                .priority(node.priority)
            })
            .collect();
        self.queue
            .enqueue_many(new_jobs)
            .await
            .map_err(|e| SubmitError::Unavailable(e.to_string()))?;
        if !created.duplicate {
            METRICS
                .reports_submitted
                .with_label_values(&[template.name.as_str()])
                .inc();
            tracing::info!(report = %created.report_id, template = %template.name, jobs, "report submitted");
        }
        Ok(Submitted {
            report_id: created.report_id,
            duplicate: created.duplicate,
            jobs,
        })
    }

    /// Cancel a report: queued jobs are dropped, running calls are not retried.
    pub async fn cancel(&self, report_id: &str) -> Result<bool, SubmitError> {
        let queued = self
            .store
            .cancel(report_id)
            .await
            .map_err(|e| SubmitError::Unavailable(e.to_string()))?;
        // A section of a batch report may also be queued as a live fallback.
        let ids: Vec<String> = queued
            .iter()
            .flat_map(|job| {
                let job = SectionJob::new(report_id, job);
                [job.queue_id(), job.live().queue_id()]
            })
            .collect();
        self.queue
            .remove(&ids)
            .await
            .map_err(|e| SubmitError::Unavailable(e.to_string()))?;
        Ok(true)
    }
}

/// Whether a report runs through the Batch API, and its deadline: the request's choice, else
/// the template's; `true` takes the template's deadline.
fn batch_mode(
    template: &fanout_core::Template,
    choice: Option<BatchApiChoice>,
) -> Result<Option<fanout_aggregator::BatchApi>, SubmitError> {
    let deadline_secs = match choice {
        Some(BatchApiChoice::Off) => return Ok(None),
        None if !template.batch_api => return Ok(None),
        None => None,
        Some(BatchApiChoice::On { deadline_secs }) => deadline_secs,
    };
    if let Some(secs) = deadline_secs {
        fanout_core::template::check_batch_deadline(secs).map_err(|message| {
            SubmitError::Field {
                field: "batch_api.deadline_secs".into(),
                message,
            }
        })?;
    }
    Ok(Some(fanout_aggregator::BatchApi {
        deadline_secs: deadline_secs.or(template.batch_deadline_secs),
    }))
}

fn queue_lane(lane: Lane) -> fanout_queue::Lane {
    match lane {
        Lane::Interactive => fanout_queue::Lane::Interactive,
        Lane::Batch => fanout_queue::Lane::Batch,
    }
}
