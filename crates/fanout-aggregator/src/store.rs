//! The report store: a report's record, its jobs' states and dependency counters, results and
//! events in Redis. Every transition is one idempotent script (see `lua/`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanout_core::redis::Pool;
use fanout_core::redis::SharedConnection;
use fanout_core::{
    Config, DepOutput, DependencyFailure, JobGraph, JobNode, Lane, ReportStatus, SectionState,
    Template,
};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{Script, ScriptInvocation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::assemble::{ReportDocument, render_json, render_markdown};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::scripts::Scripts;
use crate::view::{self, LayoutEntry, META_FIELDS, RawReport, ReportView};

/// Approximate cap of one report's event stream.
pub const EVENTS_MAXLEN: usize = 10_000;
/// Approximate cap of the notification stream (acknowledged entries are deleted anyway).
pub const NOTIFY_MAXLEN: usize = 100_000;

/// How long an index entry without its report is kept (ms): the index is written the step
/// before the report, so a young entry may name a report being created.
const YOUNG_MS: u64 = 60_000;

/// The least a running report lives (`RUNNING_TTL` in `lua/lib.lua`).
const RUNNING_TTL_SECS: u64 = 7 * 86_400;

/// A report to create.
#[derive(Debug, Clone)]
pub struct NewReport {
    pub tenant: String,
    /// Snapshot of the template: the report keeps running with it even if the file changes.
    pub template: Template,
    pub inputs: Value,
    /// `template.job_graph(&inputs)`.
    pub graph: JobGraph,
    /// `interactive` or `batch`.
    pub lane: String,
    /// A repeated create with the same tenant and key returns the first report (for the TTL
    /// of reports).
    pub idempotency_key: Option<String>,
    pub callback_url: Option<String>,
    /// Run the sections through the provider's Batch API.
    pub batch_api: Option<BatchApi>,
}

/// A report's request to run through the provider's Batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchApi {
    /// The report must be finished this long after it was submitted: sections a batch would
    /// not answer in time run as live calls.
    pub deadline_secs: Option<u64>,
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub report_id: String,
    /// The idempotency key was known: nothing was written, `report_id` is the first report.
    pub duplicate: bool,
    /// Jobs to enqueue: those without dependencies, or for a duplicate, the jobs that are
    /// ready and not started yet (enqueueing again is harmless: the queue deduplicates).
    pub ready: Vec<JobNode>,
}

/// The report fields a job's context is built from, in the order [`Store::build_context`]
/// reads them.
const CONTEXT_META: [&str; 7] = [
    "template",
    "inputs",
    "layout",
    "lane",
    "tenant",
    "batch_api",
    "deadline_ms",
];

/// Whether a worker should run the job it claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    Run,
    /// The job is terminal already (a redelivery after a crash): ack it, and enqueue what
    /// [`Store::released`] returns.
    AlreadyDone,
    /// The report was cancelled: ack and drop.
    Cancelled,
    /// The report is unknown or expired: ack and drop.
    Missing,
}

/// What [`Store::start_with_context`] found.
#[derive(Debug, Clone)]
pub enum Started {
    /// The job is marked running: run it with this context.
    Run(Box<JobContext>),
    /// Not to be run: why ([`StartOutcome::AlreadyDone`], `Cancelled` or `Missing`).
    Not(StartOutcome),
}

/// The outcome of one successful section call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SectionResult {
    pub text: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    pub latency_ms: u64,
    pub attempts: u32,
    pub cached: bool,
    /// Answered through the provider's Batch API (and priced at its batch price).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch_api: bool,
}

/// What a `complete` or `fail` released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Dependents that are ready now and not started yet. A repeated call returns them again,
    /// so a worker that crashed before enqueueing them can enqueue them (idempotently).
    pub ready: Vec<JobNode>,
    /// The report is finished (this call or an earlier one finished it).
    pub report_finished: bool,
}

/// What [`Store::reopen`] did with a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reopened {
    /// The failed job is `ready` again, with fresh attempts: enqueue `node` (a replay). The
    /// dependents it had skipped are pending again (unless another failed dependency keeps
    /// them skipped), released when it finishes.
    Reopened {
        node: JobNode,
        /// The report had finished (failed, completed_with_failures or completed) and is
        /// running again: its next finish is assembled, and its webhook sent, again.
        report_was_finished: bool,
    },
    /// The failed job is `pending` again: one of its dependencies was reopened too and has not
    /// finished. That dependency's `complete` or `fail` releases it (in [`Released::ready`])
    /// like any pending job; enqueueing it now would run it without that input.
    Waiting { node: JobNode },
    /// The job is not failed: nothing changed. A repeated reopen finds it `ready` (or further
    /// along), so replaying twice runs the section once more, not twice.
    NotFailed { state: SectionState },
    /// The report (or the job) was cancelled, which is final: nothing changed.
    Cancelled,
}

/// Everything a worker needs to render a job's prompt.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub template: Template,
    pub inputs: Value,
    pub node: JobNode,
    /// Output of each dependency section, by section id.
    pub deps: BTreeMap<String, DepOutput>,
    pub state: SectionState,
    pub lane: Lane,
    /// The tenant that submitted the report.
    pub tenant: String,
    /// The report runs through the provider's Batch API.
    pub batch_api: bool,
    /// When the report must be finished (unix ms), if it said.
    pub deadline_ms: Option<u64>,
}

/// One entry of a report's event stream; over the API, the `data` of an SSE event whose
/// `event` is the kind and whose `id` is the stream id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReportEvent {
    /// Stream id; pass it as `after` to read what came next (over the API: send it back as
    /// `Last-Event-ID` or `?after=`).
    #[schema(example = "1718000000000-0")]
    pub id: String,
    /// `report.created`, `section.ready`, `section.started`, `section.completed`,
    /// `section.failed`, `section.skipped`, `section.cancelled`, `report.finished`;
    /// `report.reopened` and `section.reopened` when an operator replays a failed section
    /// (after which the report finishes again).
    pub kind: String,
    pub job_id: Option<String>,
    /// The section state, or the report status for `report.*` events.
    pub state: Option<String>,
    pub message: String,
    /// Milliseconds since the Unix epoch (Redis clock).
    pub ts: u64,
}

/// An assembled report document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Json,
}

/// Handle on the report store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: SharedConnection,
    keys: Keys,
    ttl_secs: u64,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("namespace", &self.keys.namespace())
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// `ttl`: how long a report's keys live after it finished (`reports.ttl_secs` in the
    /// config); a running report lives at least a week.
    pub fn new(pool: Pool, namespace: &str, ttl: Duration) -> Self {
        Self {
            shared: SharedConnection::new(pool),
            keys: Keys::new(namespace),
            ttl_secs: ttl.as_secs().max(1),
            scripts: Arc::new(Scripts::load()),
        }
    }

    /// A store with the namespace and report TTL of `config`.
    pub fn from_config(pool: Pool, config: &Config) -> Self {
        Self::new(
            pool,
            &config.redis.namespace,
            Duration::from_secs(config.reports.ttl_secs),
        )
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }

    /// The Redis pool the store works on.
    pub fn pool(&self) -> &Pool {
        self.shared.pool()
    }

    async fn conn(&self) -> Result<fanout_core::redis::Connection> {
        Ok(self.shared.get().await?)
    }

    /// A connection-level error retires the shared connection (the next call opens a new one).
    fn broken(&self, e: redis::RedisError) -> Error {
        self.shared.check(&e);
        Error::Redis(e)
    }

    /// A script invocation with the standard KEYS and leading ARGV (see `lua/lib.lua`).
    fn invocation<'a>(&self, script: &'a Script, report_id: &str) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for key in self.keys.report(report_id).script_keys() {
            inv.key(key);
        }
        inv.arg(self.ttl_secs).arg(EVENTS_MAXLEN).arg(report_id);
        inv
    }

    /// Tell the aggregators that a report has finished: its entry in the notification stream.
    /// The stream lives in the namespace's slot, so this is the second step after the script
    /// that finished the report (another slot on a Redis Cluster). Every caller runs it before
    /// it acknowledges its work, and the scripts return the final status again on a repeat, so
    /// a crash in between notifies on the retry; a repeated notification assembles nothing
    /// twice (the assembly marker).
    async fn notify_finished(
        &self,
        conn: &mut fanout_core::redis::Connection,
        report_id: &str,
    ) -> Result<()> {
        redis::cmd("XADD")
            .arg(self.keys.notifications())
            .arg("MAXLEN")
            .arg("~")
            .arg(NOTIFY_MAXLEN)
            .arg("*")
            .arg("report_id")
            .arg(report_id)
            .arg("kind")
            .arg("report.finished")
            .query_async::<()>(conn)
            .await
            .map_err(|e| self.broken(e))
    }

    /// Create a report in two scripts, one per hash slot: the idempotency check and the tenant
    /// index (`index.lua`), then the record, job states, dependency counters, dependents index
    /// and the `report.created` event (`create.lua`). Returns the jobs to enqueue. A repeat with
    /// the same idempotency key returns the same report, creating it if the first try stopped
    /// between the two scripts.
    pub async fn create(&self, r: NewReport) -> Result<Created> {
        check_graph(&r)?;
        if Lane::parse(&r.lane).is_none() {
            return Err(Error::InvalidReport(format!(
                "lane `{}` is not one of: interactive, batch",
                r.lane
            )));
        }
        let template_json = to_json(&r.template);
        let inputs_json = to_json(&r.inputs);
        let layout = to_json(&view::layout(&r.template, &r.inputs, &r.graph));

        let mut meta: Vec<(&str, &str)> = vec![
            ("tenant", &r.tenant),
            ("name", &r.template.name),
            ("title", &r.template.title),
            ("template", &template_json),
            ("inputs", &inputs_json),
            ("lane", &r.lane),
            ("layout", &layout),
        ];
        if let Some(url) = &r.callback_url {
            meta.push(("callback_url", url));
        }
        if let Some(key) = &r.idempotency_key {
            meta.push(("idempotency_key", key));
        }
        if r.batch_api.is_some() {
            meta.push(("batch_api", "1"));
        }

        let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
        for node in &r.graph.jobs {
            for dep in unique(&node.depends_on) {
                dependents.entry(dep).or_default().push(&node.id);
            }
        }

        // Step one, in the namespace's slot: the idempotency key and the tenant's index.
        let mut report_id = uuid::Uuid::now_v7().to_string();
        let mut index = self.scripts.index.prepare_invoke();
        index
            .key(self.keys.tenant_reports(&r.tenant))
            .key(self.keys.report_indexes());
        if let Some(key) = &r.idempotency_key {
            index.key(self.keys.idempotency(&r.tenant, key));
        }
        index
            .arg(&report_id)
            .arg(if r.idempotency_key.is_some() {
                fingerprint(&r)
            } else {
                "0".to_owned()
            })
            .arg(self.ttl_secs)
            .arg(self.ttl_secs.max(RUNNING_TTL_SECS) + self.ttl_secs);
        // One connection for both steps and the barriers, so that each `WAIT` covers them.
        let mut conn = self.conn().await?;
        let reply: Vec<String> = index
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let created_at = reply.get(2).cloned().unwrap_or_default();
        let known = match (reply.first().map(String::as_str), reply.get(1)) {
            (Some("new"), Some(_)) => false,
            (Some("duplicate"), Some(id)) => {
                // The same request again: the report, unless the first try stopped between
                // the two steps, in which case it is created now under the id it was given.
                report_id = id.clone();
                true
            }
            (Some("conflict"), Some(id)) => {
                return Err(Error::IdempotencyConflict { report: id.clone() });
            }
            _ => {
                return Err(Error::corrupt(
                    &report_id,
                    format!("index replied {reply:?}"),
                ));
            }
        };

        // The key is on a replica before the report exists: a failover in between cannot
        // lose the key of a created report (a retry would make a second one).
        self.shared
            .replicated(&conn, &[&self.keys.notifications()])
            .await
            .map_err(Error::Redis)?;

        // Step two, in the report's slot. The deadline counts from the creation time the
        // index step gave (the same on a repeat).
        let deadline = r
            .batch_api
            .and_then(|b| b.deadline_secs)
            .zip(created_at.parse::<u64>().ok())
            .map(|(secs, created)| (created + secs.saturating_mul(1000)).to_string());
        let mut inv = self.invocation(&self.scripts.create, &report_id);
        let fields = meta.len() + usize::from(deadline.is_some());
        inv.arg(&created_at).arg(fields);
        for (k, v) in &meta {
            inv.arg(*k).arg(*v);
        }
        if let Some(deadline) = &deadline {
            inv.arg("deadline_ms").arg(deadline);
        }
        for node in &r.graph.jobs {
            let spec = r.template.section(&node.section);
            let mut flags = String::new();
            if spec.is_none_or(|s| s.on_dependency_failure == DependencyFailure::Skip) {
                flags.push('s');
            }
            if spec.is_some_and(|s| s.optional) {
                flags.push('o');
            }
            let deps_json = dependents
                .get(node.id.as_str())
                .map(to_json)
                .unwrap_or_default();
            inv.arg(&node.id)
                .arg(to_json(node))
                .arg(unique(&node.depends_on).len())
                .arg(deps_json)
                .arg(flags);
        }
        let reply: Vec<String> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let created = match reply.first().map(String::as_str) {
            Some("created") => Created {
                ready: parse_nodes(&reply[2..], &reply[1])?,
                report_id,
                duplicate: known,
            },
            Some("duplicate") => Created {
                ready: self.ready_jobs(&report_id).await?,
                report_id,
                duplicate: true,
            },
            _ => {
                return Err(Error::corrupt(
                    &report_id,
                    format!("create replied {reply:?}"),
                ));
            }
        };
        self.replicated(&conn, &created.report_id).await?;
        Ok(created)
    }

    /// Wait until `redis.wait_replicas` replicas hold what this store wrote on `conn` to the
    /// report's slot and the namespace's (see `SharedConnection::replicated`): before a caller
    /// builds on it in another slot, or answers a client.
    async fn replicated(
        &self,
        conn: &fanout_core::redis::Connection,
        report_id: &str,
    ) -> Result<()> {
        let report = self.keys.report(report_id).meta();
        let notifications = self.keys.notifications();
        self.shared
            .replicated(conn, &[&report, &notifications])
            .await
            .map_err(Error::Redis)
    }

    /// The jobs that are ready and not started yet.
    async fn ready_jobs(&self, report_id: &str) -> Result<Vec<JobNode>> {
        let keys = self.keys.report(report_id);
        let mut conn = self.conn().await?;
        let states: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys.state())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let ids: Vec<&String> = states
            .iter()
            .filter(|(_, s)| s.as_str() == "ready")
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let nodes: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.nodes())
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut nodes = parse_nodes(&nodes.into_iter().flatten().collect::<Vec<_>>(), report_id)?;
        nodes.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
        Ok(nodes)
    }

    /// Template, inputs, node and dependency outputs of a job: what rendering its prompt
    /// needs. `Err(ReportNotFound)` when the report is unknown or expired.
    pub async fn job_context(&self, report_id: &str, job_id: &str) -> Result<JobContext> {
        let keys = self.keys.report(report_id);
        let mut conn = self.conn().await?;
        let (meta, node, state): (Vec<Option<String>>, Option<String>, Option<String>) =
            redis::pipe()
                .cmd("HMGET")
                .arg(keys.meta())
                .arg(&CONTEXT_META)
                .cmd("HGET")
                .arg(keys.nodes())
                .arg(job_id)
                .cmd("HGET")
                .arg(keys.state())
                .arg(job_id)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
        self.build_context(&mut conn, report_id, job_id, meta, node, state)
            .await
    }

    /// [`Store::start`] and, when the job is to run, its [`Store::job_context`]: the script
    /// that marks it running returns the report's fields too, so a worker pays one round trip
    /// for both (two when the job has dependencies, whose outputs are read next).
    pub async fn start_with_context(
        &self,
        report_id: &str,
        job_id: &str,
        attempt: u32,
    ) -> Result<Started> {
        let mut inv = self.invocation(&self.scripts.start, report_id);
        inv.arg(job_id).arg(attempt).arg(&CONTEXT_META);
        let mut conn = self.conn().await?;
        let reply: Vec<Option<String>> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut reply = reply.into_iter();
        match reply.next().flatten().as_deref() {
            Some("run") => {}
            Some("already_done") => return Ok(Started::Not(StartOutcome::AlreadyDone)),
            Some("cancelled") => return Ok(Started::Not(StartOutcome::Cancelled)),
            Some("missing") => return Ok(Started::Not(StartOutcome::Missing)),
            other => {
                return Err(Error::corrupt(
                    report_id,
                    format!("start replied `{other:?}`"),
                ));
            }
        };
        let node = reply.next().flatten();
        let meta: Vec<Option<String>> = reply.collect();
        let ctx = self
            .build_context(
                &mut conn,
                report_id,
                job_id,
                meta,
                node,
                Some("running".to_owned()),
            )
            .await?;
        Ok(Started::Run(Box::new(ctx)))
    }

    /// A [`JobContext`] from the report's [`CONTEXT_META`] fields, the job's node and state, with
    /// its dependencies' outputs read on `conn`.
    async fn build_context(
        &self,
        conn: &mut fanout_core::redis::Connection,
        report_id: &str,
        job_id: &str,
        meta: Vec<Option<String>>,
        node: Option<String>,
        state: Option<String>,
    ) -> Result<JobContext> {
        let keys = self.keys.report(report_id);
        let mut meta = meta.into_iter();
        let (Some(Some(template)), Some(Some(inputs)), Some(Some(layout)), Some(lane), tenant) = (
            meta.next(),
            meta.next(),
            meta.next(),
            meta.next(),
            meta.next(),
        ) else {
            return Err(Error::ReportNotFound {
                report: report_id.to_owned(),
            });
        };
        let (Some(node), Some(state)) = (node, state) else {
            return Err(Error::UnknownJob {
                report: report_id.to_owned(),
                job: job_id.to_owned(),
            });
        };
        let corrupt =
            |what: &str, e: serde_json::Error| Error::corrupt(report_id, format!("{what}: {e}"));
        let template: Template =
            serde_json::from_str(&template).map_err(|e| corrupt("template", e))?;
        let inputs: Value = serde_json::from_str(&inputs).map_err(|e| corrupt("inputs", e))?;
        let layout: Vec<LayoutEntry> =
            serde_json::from_str(&layout).map_err(|e| corrupt("layout", e))?;
        let node: JobNode = serde_json::from_str(&node).map_err(|e| corrupt("node", e))?;
        let state = SectionState::parse(&state)
            .ok_or_else(|| Error::corrupt(report_id, format!("state `{state}`")))?;

        // Every job of every section this one depends on, in item order.
        let dep_sections: Vec<String> = match template.section(&node.section) {
            Some(spec) => spec.depends_on.clone(),
            None => {
                let mut seen = Vec::new();
                for d in &node.depends_on {
                    if let Some(e) = layout.iter().find(|e| &e.id == d)
                        && !seen.contains(&e.section)
                    {
                        seen.push(e.section.clone());
                    }
                }
                seen
            }
        };
        let mut dep_jobs: Vec<&LayoutEntry> = layout
            .iter()
            .filter(|e| dep_sections.contains(&e.section))
            .collect();
        dep_jobs.sort_by_key(|e| e.index);
        let texts: Vec<Option<String>> = if dep_jobs.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET")
                .arg(keys.results())
                .arg(dep_jobs.iter().map(|e| &e.id).collect::<Vec<_>>())
                .query_async(conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let mut by_job: HashMap<&str, Option<String>> = HashMap::new();
        for (e, raw) in dep_jobs.iter().zip(texts) {
            let text = match raw {
                Some(json) => Some(
                    serde_json::from_str::<SectionResult>(&json)
                        .map_err(|err| corrupt("result", err))?
                        .text,
                ),
                None => None,
            };
            by_job.insert(e.id.as_str(), text);
        }
        let mut deps = BTreeMap::new();
        for section in dep_sections {
            let is_list = template
                .section(&section)
                .map(|s| s.for_each.is_some())
                .unwrap_or_else(|| {
                    dep_jobs
                        .iter()
                        .any(|e| e.section == section && e.index.is_some())
                });
            let mut outputs = dep_jobs
                .iter()
                .filter(|e| e.section == section)
                .map(|e| by_job.get(e.id.as_str()).cloned().flatten());
            let out = if is_list {
                DepOutput::List(outputs.collect())
            } else {
                DepOutput::Text(outputs.next().flatten())
            };
            deps.insert(section, out);
        }
        let batch_api = meta.next().flatten().is_some_and(|v| v == "1");
        let deadline_ms = meta.next().flatten().and_then(|v| v.parse().ok());
        Ok(JobContext {
            template,
            inputs,
            node,
            deps,
            state,
            lane: lane.and_then(|l| Lane::parse(&l)).unwrap_or_default(),
            tenant: tenant.flatten().unwrap_or_default(),
            batch_api,
            deadline_ms,
        })
    }

    /// Mark a job running (first start time kept, starts counted), unless it is terminal, the
    /// report is cancelled, or the report is unknown or expired.
    pub async fn start(&self, report_id: &str, job_id: &str, attempt: u32) -> Result<StartOutcome> {
        let mut inv = self.invocation(&self.scripts.start, report_id);
        inv.arg(job_id).arg(attempt);
        let mut conn = self.conn().await?;
        let reply: String = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        match reply.as_str() {
            "run" => Ok(StartOutcome::Run),
            "already_done" => Ok(StartOutcome::AlreadyDone),
            "cancelled" => Ok(StartOutcome::Cancelled),
            "missing" => Ok(StartOutcome::Missing),
            other => Err(Error::corrupt(
                report_id,
                format!("start replied `{other}`"),
            )),
        }
    }

    /// Store a job's result and release its dependents. Idempotent: the first result wins, a
    /// repeated call writes nothing and returns the same ready dependents.
    pub async fn complete(
        &self,
        report_id: &str,
        job_id: &str,
        result: SectionResult,
    ) -> Result<Released> {
        let message = format!(
            "{} · {} tokens · {:.1} s{}",
            result.model,
            result.prompt_tokens + result.completion_tokens,
            result.latency_ms as f64 / 1000.0,
            if result.cached { " · cached" } else { "" }
        );
        let mut inv = self.invocation(&self.scripts.complete, report_id);
        inv.arg(job_id).arg(to_json(&result)).arg(message);
        self.released_reply(inv, report_id, job_id).await
    }

    /// Mark a job failed for good. Dependents with `on_dependency_failure = "skip"` are
    /// skipped (transitively); `continue` ones are released when ready. Idempotent like
    /// [`Store::complete`]; a job that is already terminal keeps its state.
    pub async fn fail(&self, report_id: &str, job_id: &str, reason: &str) -> Result<Released> {
        self.fail_after(report_id, job_id, reason, 0).await
    }

    /// [`Store::fail`] after `attempts` provider attempts in the last delivery: the section's
    /// `attempts` shows the larger of that and its starts, as a completed section's does.
    pub async fn fail_after(
        &self,
        report_id: &str,
        job_id: &str,
        reason: &str,
        attempts: u32,
    ) -> Result<Released> {
        let mut inv = self.invocation(&self.scripts.fail, report_id);
        inv.arg(job_id).arg(reason).arg(attempts);
        self.released_reply(inv, report_id, job_id).await
    }

    /// What a terminal job released (read-only): for a worker whose `start` said
    /// `AlreadyDone`, because it may have crashed before enqueueing them. A job that is not
    /// terminal released nothing.
    pub async fn released(&self, report_id: &str, job_id: &str) -> Result<Released> {
        let mut inv = self.invocation(&self.scripts.released, report_id);
        inv.arg(job_id);
        self.released_reply(inv, report_id, job_id).await
    }

    async fn released_reply(
        &self,
        inv: ScriptInvocation<'_>,
        report_id: &str,
        job_id: &str,
    ) -> Result<Released> {
        let mut conn = self.conn().await?;
        let reply: Vec<String> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let released = match reply.first().map(String::as_str) {
            Some("ok") => Released {
                report_finished: reply.get(1).is_some_and(|s| s != "running"),
                ready: parse_nodes(&reply[2..], report_id)?,
            },
            Some("not_terminal") => Released {
                ready: Vec::new(),
                report_finished: reply.get(1).is_some_and(|s| s != "running"),
            },
            Some("missing") => {
                return Err(Error::ReportNotFound {
                    report: report_id.to_owned(),
                });
            }
            Some("unknown_job") => {
                return Err(Error::UnknownJob {
                    report: report_id.to_owned(),
                    job: job_id.to_owned(),
                });
            }
            _ => {
                return Err(Error::corrupt(
                    report_id,
                    format!("script replied {reply:?}"),
                ));
            }
        };
        if released.report_finished {
            self.notify_finished(&mut conn, report_id).await?;
        }
        // The caller enqueues the dependents and acknowledges the job next (the queue's slot).
        self.replicated(&conn, report_id).await?;
        Ok(released)
    }

    /// Cancel a running report: every job that is not terminal is cancelled and the report's
    /// status becomes `cancelled`. Returns the job ids (not queue ids) the queue may still
    /// hold (ready or running when cancelled), to drop. Idempotent: a repeat returns the same
    /// ids; on a report that finished on its own it returns none.
    pub async fn cancel(&self, report_id: &str) -> Result<Vec<String>> {
        let mut inv = self.invocation(&self.scripts.cancel, report_id);
        inv.arg("cancelled by request");
        let mut conn = self.conn().await?;
        let reply: Vec<String> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let ids = match reply.first().map(String::as_str) {
            Some("cancelled") => reply.get(1),
            Some("finished") => reply.get(2),
            Some("missing") => {
                return Err(Error::ReportNotFound {
                    report: report_id.to_owned(),
                });
            }
            _ => None,
        }
        .ok_or_else(|| Error::corrupt(report_id, format!("cancel replied {reply:?}")))?;
        let ids = serde_json::from_str(ids)
            .map_err(|e| Error::corrupt(report_id, format!("cancelled ids: {e}")))?;
        self.notify_finished(&mut conn, report_id).await?;
        self.replicated(&conn, report_id).await?;
        Ok(ids)
    }

    /// Reopen a failed job so that it runs again: an operator replays its dead letter. The
    /// job becomes `ready` with fresh attempts (its error, times and attempt counts go; the
    /// failure stays in the events); the dependents skipped because of it, transitively, are
    /// pending again unless another failed or skipped dependency keeps them skipped; pending
    /// dependents wait for it again. Dependents that were released by the failure (ready,
    /// running, done) are left as they are. A finished report is running again: its status,
    /// documents, assembly marker and webhook state are reset and its webhook outbox entry is
    /// dropped, so that when it finishes again the aggregator assembles it and queues a fresh
    /// webhook (with the whole attempt budget).
    ///
    /// Returns the node to enqueue ([`Reopened::Reopened`]); the caller enqueues it. A job
    /// that is not failed changes nothing ([`Reopened::NotFailed`]), nor does a cancelled
    /// report ([`Reopened::Cancelled`]). `Err(ReportNotFound)` / `Err(UnknownJob)` for an
    /// unknown or expired report, or a job it does not have.
    pub async fn reopen(&self, report_id: &str, job_id: &str) -> Result<Reopened> {
        let keys = self.keys.report(report_id);
        let mut inv = self.invocation(&self.scripts.reopen, report_id);
        inv.key(keys.assembled())
            .key(keys.doc_markdown())
            .key(keys.doc_json());
        inv.arg(job_id).arg("replayed by an operator");
        let mut conn = self.conn().await?;
        let reply: Vec<String> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let reopened = match reply.first().map(String::as_str) {
            Some("reopened") if reply.len() == 4 => {
                let node = parse_nodes(&reply[3..], report_id)?
                    .pop()
                    .ok_or_else(|| Error::corrupt(report_id, "reopen replied no node"))?;
                match reply[1].as_str() {
                    "ready" => Reopened::Reopened {
                        node,
                        report_was_finished: reply[2] == "1",
                    },
                    "pending" => Reopened::Waiting { node },
                    other => {
                        return Err(Error::corrupt(
                            report_id,
                            format!("reopen left job `{job_id}` in state `{other}`"),
                        ));
                    }
                }
            }
            Some("not_failed") => {
                let state = reply
                    .get(1)
                    .and_then(|s| SectionState::parse(s))
                    .ok_or_else(|| {
                        Error::corrupt(report_id, format!("reopen replied {reply:?}"))
                    })?;
                return Ok(Reopened::NotFailed { state });
            }
            Some("cancelled") => return Ok(Reopened::Cancelled),
            Some("missing") => {
                return Err(Error::ReportNotFound {
                    report: report_id.to_owned(),
                });
            }
            Some("unknown_job") => {
                return Err(Error::UnknownJob {
                    report: report_id.to_owned(),
                    job: job_id.to_owned(),
                });
            }
            _ => {
                return Err(Error::corrupt(
                    report_id,
                    format!("reopen replied {reply:?}"),
                ));
            }
        };
        if matches!(
            reopened,
            Reopened::Reopened {
                report_was_finished: true,
                ..
            }
        ) {
            self.drop_webhook(&mut conn, report_id).await;
        }
        self.replicated(&conn, report_id).await?;
        Ok(reopened)
    }

    /// Drop the webhook outbox entry of a report that was reopened (the outbox has the
    /// namespace's slot, not the report's, hence outside the script). Its document is gone
    /// and the next finish queues a fresh entry; a stale one would be given up on as expired,
    /// or hand the new webhook its used-up attempts and backoff. Best effort: the reopen
    /// itself is done and the job must still be enqueued, so a failure here is logged, not
    /// returned.
    async fn drop_webhook(&self, conn: &mut fanout_core::redis::Connection, report_id: &str) {
        let k = &self.keys;
        let dropped: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .cmd("ZREM")
            .arg(k.webhooks_due())
            .arg(report_id)
            .ignore()
            .cmd("HDEL")
            .arg(k.webhooks_url())
            .arg(report_id)
            .ignore()
            .cmd("HDEL")
            .arg(k.webhooks_attempts())
            .arg(report_id)
            .ignore()
            .query_async(conn)
            .await;
        if let Err(e) = dropped {
            self.shared.check(&e);
            tracing::warn!(
                report = %report_id,
                error = %e,
                "reopened report: its old webhook outbox entry could not be dropped; remove it \
                 by hand: ZREM {} {report_id}, HDEL {} {report_id}, HDEL {} {report_id}",
                k.webhooks_due(),
                k.webhooks_url(),
                k.webhooks_attempts(),
            );
        }
    }

    /// The report as it stands, or `None` if it is unknown or expired. One round trip.
    pub async fn view(&self, report_id: &str) -> Result<Option<ReportView>> {
        let keys = self.keys.report(report_id);
        let mut conn = self.conn().await?;
        let (meta, state, results, info) = redis::pipe()
            .cmd("HMGET")
            .arg(keys.meta())
            .arg(&META_FIELDS)
            .cmd("HGETALL")
            .arg(keys.state())
            .cmd("HGETALL")
            .arg(keys.results())
            .cmd("HGETALL")
            .arg(keys.info())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        drop(conn);
        view::build(
            report_id,
            RawReport {
                meta,
                state,
                results,
                info,
            },
            now_ms(),
        )
    }

    /// The report's status, or `None` if it is unknown or expired.
    /// A tenant's reports, newest first, `query.limit` at most, with the cursor of the next
    /// page when there may be more. Reports that expired are dropped from the index as they are
    /// met. Reads at most a few thousand index entries per call (a filter that matches little
    /// returns a short page and a cursor).
    pub async fn list(&self, tenant: &str, query: &ListQuery) -> Result<ReportPage> {
        const BATCH: usize = 200;
        const SCAN_MAX: usize = 5_000;
        let index = self.keys.tenant_reports(tenant);
        let mut conn = self.conn().await?;
        let mut after = query.cursor.clone();
        let mut reports = Vec::new();
        let mut scanned = 0;
        let min = query.since.map_or("-inf".to_owned(), |s| s.to_string());
        loop {
            let max = after
                .as_ref()
                .map_or("+inf".to_owned(), |c| c.created_at.to_string());
            let batch: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&index)
                .arg(&max)
                .arg(&min)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(BATCH)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            let full = batch.len() == BATCH;
            // Equal scores come in descending id order: past the cursor means a smaller id.
            let batch: Vec<(String, u64)> = batch
                .into_iter()
                .map(|(id, score)| (id, score as u64))
                .filter(|(id, created)| {
                    after
                        .as_ref()
                        .is_none_or(|c| *created < c.created_at || id.as_str() < c.id.as_str())
                })
                .collect();
            if batch.is_empty() {
                return Ok(ReportPage {
                    reports,
                    next: None,
                });
            }
            scanned += batch.len();
            // One report per slot: sent together, not as a pipeline.
            let metas: Vec<Vec<Option<String>>> = conn
                .query_each(batch.iter().map(|(id, _)| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(self.keys.report(id).meta()).arg(&SUMMARY_FIELDS);
                    cmd
                }))
                .await
                .map_err(|e| self.broken(e))?;
            let mut gone = Vec::new();
            for ((id, created), meta) in batch.iter().zip(metas) {
                after = Some(Cursor {
                    created_at: *created,
                    id: id.clone(),
                });
                let Some(summary) = ReportSummary::from_meta(id, &meta) else {
                    // Not yet, if it is young: its creation may be between its two steps.
                    if *created < now_ms().saturating_sub(YOUNG_MS) {
                        gone.push(id.clone());
                    }
                    continue;
                };
                let wanted = query.status.is_none_or(|s| s == summary.status)
                    && query
                        .template
                        .as_deref()
                        .is_none_or(|t| t == summary.template);
                if wanted {
                    reports.push(summary);
                    if reports.len() == query.limit {
                        self.forget(&mut conn, &index, &gone).await?;
                        return Ok(ReportPage {
                            reports,
                            next: after,
                        });
                    }
                }
            }
            self.forget(&mut conn, &index, &gone).await?;
            if !full {
                return Ok(ReportPage {
                    reports,
                    next: None,
                });
            }
            if scanned >= SCAN_MAX {
                return Ok(ReportPage {
                    reports,
                    next: after,
                });
            }
        }
    }

    /// Forget the index entries of reports that expired (their keys are gone), looking at the
    /// oldest `max` entries of each tenant's index; returns how many. Listing forgets them too,
    /// as it meets them; this keeps the index of a tenant nobody lists from holding every
    /// deleted report's id until the prune at create. Reports expire in the order they finish,
    /// not the order they were created, so live entries are paged past, not stopped at. Any
    /// number of processes may run it at once.
    pub async fn forget_expired(&self, max: usize) -> Result<usize> {
        const BATCH: usize = 200;
        let mut conn = self.conn().await?;
        let indexes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.report_indexes())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut forgotten = 0;
        for index in indexes {
            let mut offset = 0;
            while offset < max {
                let entries: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg(offset)
                    .arg(offset + BATCH.min(max - offset) - 1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.broken(e))?;
                if entries.is_empty() {
                    break;
                }
                // An entry of the last minute may name a report being created right now (the
                // index is written the step before the report): it is not forgotten yet.
                let young = now_ms().saturating_sub(YOUNG_MS) as f64;
                let (ids, scores): (Vec<String>, Vec<f64>) = entries.into_iter().unzip();
                // One report per slot: sent together, not as a pipeline.
                let exists: Vec<bool> = conn
                    .query_each(ids.iter().map(|id| {
                        let mut cmd = redis::cmd("EXISTS");
                        cmd.arg(self.keys.report(id).meta());
                        cmd
                    }))
                    .await
                    .map_err(|e| self.broken(e))?;
                let gone: Vec<String> = ids
                    .iter()
                    .zip(&exists)
                    .zip(&scores)
                    .filter(|((_, e), created)| !**e && **created < young)
                    .map(|((id, _), _)| id.clone())
                    .collect();
                self.forget(&mut conn, &index, &gone).await?;
                forgotten += gone.len();
                // What was forgotten no longer takes a place in the index.
                offset += ids.len() - gone.len();
                if ids.len() < BATCH {
                    break;
                }
            }
        }
        Ok(forgotten)
    }

    async fn forget(
        &self,
        conn: &mut fanout_core::redis::Connection,
        index: &str,
        gone: &[String],
    ) -> Result<()> {
        if gone.is_empty() {
            return Ok(());
        }
        let _: i64 = redis::cmd("ZREM")
            .arg(index)
            .arg(gone)
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    pub async fn status(&self, report_id: &str) -> Result<Option<ReportStatus>> {
        let mut conn = self.conn().await?;
        let status: Option<String> = redis::cmd("HGET")
            .arg(self.keys.report(report_id).meta())
            .arg("status")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(status.and_then(|s| ReportStatus::parse(&s)))
    }

    /// Events after `after` (a stream id; `None` = from the start), at most `count`. With
    /// `block`, waits up to that long for the next event when there is none yet (on a
    /// connection of its own). `Err(ReportNotFound)` for an unknown or expired report.
    pub async fn events(
        &self,
        report_id: &str,
        after: Option<&str>,
        block: Option<Duration>,
        count: usize,
    ) -> Result<Vec<ReportEvent>> {
        let keys = self.keys.report(report_id);
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let count = count.max(1);
        let mut conn = self.conn().await?;
        let (range, exists): (StreamRangeReply, bool) = redis::pipe()
            .cmd("XRANGE")
            .arg(keys.events())
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .cmd("EXISTS")
            .arg(keys.meta())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        if !range.ids.is_empty() {
            return Ok(range.ids.iter().map(parse_event).collect());
        }
        if !exists {
            return Err(Error::ReportNotFound {
                report: report_id.to_owned(),
            });
        }
        let Some(block) = block.filter(|b| !b.is_zero()) else {
            return Ok(Vec::new());
        };
        // A blocking read gets a connection of its own, taken out of the pool (the pool's
        // response timeout would cut the block short, and nobody else may queue behind it).
        let mut slot = None;
        let own = self
            .pool()
            .blocking(&mut slot, block + Duration::from_secs(5))
            .await?;
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys.events())
            .arg(after.unwrap_or("0-0"))
            .query_async(own)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|id| parse_event(&id))
            .collect())
    }

    /// The assembled document: the one the aggregator stored for a finished report, or one
    /// assembled now (a running report, or no aggregator got to it yet). `None` for an
    /// unknown or expired report.
    pub async fn document(&self, report_id: &str, format: Format) -> Result<Option<String>> {
        let keys = self.keys.report(report_id);
        let key = match format {
            Format::Markdown => keys.doc_markdown(),
            Format::Json => keys.doc_json(),
        };
        let mut conn = self.conn().await?;
        let stored: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        drop(conn);
        // A JSON document stored before it had the view's names and formats (ISO timestamps,
        // `id` for the section) is assembled again, until such reports expire.
        let current = |doc: &str| {
            format == Format::Markdown || serde_json::from_str::<ReportDocument>(doc).is_ok()
        };
        if let Some(doc) = stored.filter(|d| current(d)) {
            return Ok(Some(doc));
        }
        Ok(self.view(report_id).await?.map(|v| match format {
            Format::Markdown => render_markdown(&v),
            Format::Json => render_json(&v).to_string(),
        }))
    }
}

fn check_graph(r: &NewReport) -> Result<()> {
    let invalid = |m: String| Err(Error::InvalidReport(m));
    if r.graph.jobs.is_empty() {
        return invalid("the job graph has no jobs".into());
    }
    let mut ids = HashSet::new();
    for node in &r.graph.jobs {
        if node.id.is_empty() || node.id.contains('|') {
            return invalid(format!("job id `{}` is empty or contains `|`", node.id));
        }
        if !ids.insert(node.id.as_str()) {
            return invalid(format!("job `{}` appears twice", node.id));
        }
    }
    for node in &r.graph.jobs {
        for dep in &node.depends_on {
            if dep == &node.id || !ids.contains(dep.as_str()) {
                return invalid(format!("job `{}` depends on unknown job `{dep}`", node.id));
            }
        }
    }
    Ok(())
}

fn unique(ids: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::with_capacity(ids.len());
    for id in ids {
        if !out.contains(&id.as_str()) {
            out.push(id);
        }
    }
    out
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn parse_nodes(raw: &[String], report_id: &str) -> Result<Vec<JobNode>> {
    raw.iter()
        .map(|s| {
            serde_json::from_str(s).map_err(|e| Error::corrupt(report_id, format!("node: {e}")))
        })
        .collect()
}

fn parse_event(entry: &StreamId) -> ReportEvent {
    let field = |name: &str| entry.get::<String>(name);
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    ReportEvent {
        id: entry.id.clone(),
        kind: field("kind").unwrap_or_default(),
        job_id: non_empty(field("job_id")),
        state: non_empty(field("state")),
        message: field("message").unwrap_or_default(),
        ts: field("ts").and_then(|v| v.parse().ok()).unwrap_or(0),
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
/// What [`Store::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    pub status: Option<ReportStatus>,
    pub template: Option<String>,
    /// Only reports created at or after this (ms since the epoch).
    pub since: Option<u64>,
    /// Reports per page.
    pub limit: usize,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
}

/// A position in a tenant's report index: the last report of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: u64,
    pub id: String,
}

impl Cursor {
    /// `<created ms>.<report id>`, as the API hands it out.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at, self.id)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (created, id) = s.split_once('.')?;
        (crate::is_report_id(id) && !created.is_empty() && created.len() <= 15)
            .then(|| created.parse().ok())
            .flatten()
            .map(|created_at| Self {
                created_at,
                id: id.to_owned(),
            })
    }
}

/// One page of a tenant's reports, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportPage {
    pub reports: Vec<ReportSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

const SUMMARY_FIELDS: [&str; 7] = [
    "status",
    "name",
    "title",
    "lane",
    "created_at",
    "finished_at",
    "job_count",
];

/// A report in a list: what it is and where it stands, without its sections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportSummary {
    pub id: String,
    /// Template name.
    pub template: String,
    pub title: String,
    pub status: ReportStatus,
    pub lane: Lane,
    /// Milliseconds since the Unix epoch (Redis clock).
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// Jobs (provider calls) in the report.
    pub jobs: usize,
}

impl ReportSummary {
    fn from_meta(id: &str, meta: &[Option<String>]) -> Option<Self> {
        let field = |i: usize| meta.get(i).cloned().flatten();
        let status = ReportStatus::parse(&field(0)?)?;
        Some(Self {
            id: id.to_owned(),
            template: field(1).unwrap_or_default(),
            title: field(2).unwrap_or_default(),
            status,
            lane: field(3).and_then(|l| Lane::parse(&l)).unwrap_or_default(),
            created_at: field(4).and_then(|v| v.parse().ok()).unwrap_or(0),
            finished_at: field(5).and_then(|v| v.parse().ok()),
            jobs: field(6).and_then(|v| v.parse().ok()).unwrap_or(0),
        })
    }
}

/// What an idempotency key stands for: the template, the inputs, the lane and the callback. A
/// second create with the key and another request is a conflict, not a duplicate. The inputs are
/// a `serde_json::Value`, whose objects keep their keys sorted, so key order does not matter.
fn fingerprint(r: &NewReport) -> String {
    use sha2::{Digest, Sha256};
    let mut request = serde_json::json!({
        "template": r.template.name,
        "inputs": r.inputs,
        "lane": r.lane,
        "callback_url": r.callback_url,
    });
    // Only when asked for: a key's fingerprint from before batch mode existed stays the same.
    if let Some(batch) = &r.batch_api {
        request["batch_api"] = serde_json::json!(batch);
    }
    hex::encode(Sha256::digest(request.to_string().as_bytes()))
}
