//! What the worker does when the provider misbehaves: one worker in-process on a private
//! redis-server, the simulated provider behind a request log, reports submitted with the
//! producer from small templates whose prompts carry the simulator's fault markers.
//!
//! Every section prompt starts with `probe-<section id>`, so the request log can tell which
//! section each provider request belonged to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use fanout_aggregator::{ReportView, SectionView, Store};
use fanout_core::redis::Pool;
use fanout_core::{Config, ReportStatus, SectionState};
use fanout_producer::{Producer, SubmitRequest, Templates};
use fanout_queue::Queue;
use fanout_ratelimit::Budget;
use fanout_sim::{Sim, SimConfig, SimStats};
use fanout_test_support::{RedisServer, test_config};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "sk-test-worker-faults-0001";
/// How long any report of these tests may take before the test gives up.
const FINISH_WITHIN: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The stack under test
// ---------------------------------------------------------------------------------------------

struct Spec {
    sim: SimConfig,
    /// Config overrides on top of the defaults of [`Stack::start`] (later wins).
    env: Vec<(&'static str, String)>,
    concurrency: usize,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            sim: SimConfig::instant(),
            env: Vec::new(),
            concurrency: 8,
        }
    }
}

/// Redis, the simulator (with its request log), one worker, and a producer and store to drive
/// and read reports.
struct Stack {
    _redis: RedisServer,
    config: Arc<Config>,
    pool: Pool,
    producer: Producer,
    store: Store,
    sim: Sim,
    log: RequestLog,
    templates: tempfile::TempDir,
    stop: CancellationToken,
    sim_stop: CancellationToken,
    tasks: JoinSet<Result<()>>,
}

impl Stack {
    async fn start(spec: Spec) -> Result<Self> {
        let redis = tokio::task::spawn_blocking(RedisServer::start).await?;

        let sim_stop = CancellationToken::new();
        let sim = Sim::new(spec.sim, sim_stop.clone())?;
        let log = RequestLog::default();
        let app = fanout_sim::router(sim.clone())
            .layer(axum::middleware::from_fn_with_state(log.clone(), record));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}/v1", listener.local_addr()?);
        let mut tasks = JoinSet::new();
        let serve_stop = sim_stop.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(serve_stop.cancelled_owned())
                .await
                .context("sim server")
        });

        let mut env: Vec<(&str, String)> = vec![
            ("OPENAI_BASE_URL", base_url),
            ("OPENAI_API_KEY", API_KEY.into()),
            ("FANOUT_QUEUE__RETRY_BASE_MS", "20".into()),
            ("FANOUT_QUEUE__RETRY_MAX_MS", "200".into()),
            ("FANOUT_QUEUE__MAX_ATTEMPTS", "3".into()),
            ("FANOUT_QUEUE__CLAIM_BLOCK_MS", "200".into()),
            // Long enough that a busy machine never turns an answer into a timeout.
            ("FANOUT_PROVIDER__REQUEST_TIMEOUT_SECS", "10".into()),
        ];
        env.extend(spec.env);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = Arc::new(test_config(&redis.url(), &pairs));

        // A pool of our own, built like every component's: what a producer or an observer
        // process would have.
        let pool = fanout_core::redis::pool(&config.redis).map_err(anyhow::Error::msg)?;
        let store = Store::from_config(pool.clone(), &config);
        let queue = Queue::new(pool.clone(), &config.redis.namespace, config.queue.clone());
        let producer = Producer::new(store.clone(), queue, Templates::builtin());

        let stop = CancellationToken::new();
        let options = fanout_worker::WorkerOptions {
            concurrency: spec.concurrency,
            grace: Duration::from_secs(1),
        };
        let (c, s) = (config.clone(), stop.clone());
        tasks.spawn(async move { fanout_worker::run(c, options, s).await });

        Ok(Self {
            _redis: redis,
            config,
            pool,
            producer,
            store,
            sim,
            log,
            templates: tempfile::tempdir()?,
            stop,
            sim_stop,
            tasks,
        })
    }

    /// Writes a template with these sections (TOML `[[sections]]` tables) and returns its path.
    fn template(&self, name: &str, model: &str, cache: bool, sections: &[String]) -> String {
        let text = format!(
            "name = \"{name}\"\ntitle = \"{name}\"\nmodel = \"{model}\"\ncache = {cache}\n\n\
             [[inputs]]\nname = \"topic\"\nkind = \"string\"\nrequired = true\n\n{}",
            sections.join("\n")
        );
        let path = self.templates.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write template");
        path.display().to_string()
    }

    async fn submit(&self, template: &str, idempotency_key: Option<&str>) -> Result<String> {
        let submitted = self
            .producer
            .submit(
                "tests",
                SubmitRequest {
                    template: template.to_owned(),
                    inputs: json!({"topic": "tide-pool robotics"}),
                    lane: None,
                    idempotency_key: idempotency_key.map(str::to_owned),
                    callback_url: None,
                    batch_api: None,
                },
            )
            .await?;
        Ok(submitted.report_id)
    }

    async fn view(&self, id: &str) -> Result<ReportView> {
        self.store.view(id).await?.context("report not found")
    }

    /// Polls the report until its status is no longer `running`.
    async fn finished(&self, id: &str) -> Result<ReportView> {
        let deadline = Instant::now() + FINISH_WITHIN;
        loop {
            let view = self.view(id).await?;
            if view.status != ReportStatus::Running {
                return Ok(view);
            }
            if Instant::now() > deadline {
                bail!("report {id} still running after {FINISH_WITHIN:?}: {view:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn submit_and_wait(&self, template: &str) -> Result<ReportView> {
        let id = self.submit(template, None).await?;
        self.finished(&id).await
    }

    fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// The raw budget bucket of our key for a model family (`rtat`, `ttat`, `paused`): the
    /// shared state every worker process admits against (see fanout-ratelimit's `keys.rs`).
    async fn bucket(&self, family: &str) -> Result<BTreeMap<String, String>> {
        let key = format!(
            "{{{}:budget}}:bucket:default:{family}",
            self.config.redis.namespace
        );
        let mut conn = self.pool.get().await?;
        Ok(deadpool_redis::redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await?)
    }

    async fn shutdown(mut self) -> Result<()> {
        self.stop.cancel();
        self.sim_stop.cancel();
        let joined = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(r) = self.tasks.join_next().await {
                r??;
            }
            anyhow::Ok(())
        })
        .await;
        joined.context("worker and sim did not stop within 10 s")?
    }
}

/// A section table: its prompt starts with `probe-<id>` and carries `marker`.
fn section(id: &str, marker: &str) -> String {
    format!(
        "[[sections]]\nid = \"{id}\"\ntitle = \"{id}\"\nmax_tokens = 32\n\
         prompt = \"probe-{id} {marker} Write about {{{{ inputs.topic }}}}.\"\n"
    )
}

/// A section that depends on `dep` (skipped when `dep` fails).
fn dependent(id: &str, dep: &str) -> String {
    format!(
        "[[sections]]\nid = \"{id}\"\ntitle = \"{id}\"\nmax_tokens = 32\n\
         depends_on = [\"{dep}\"]\nprompt = \"probe-{id} Extend: {{{{ sections.{dep} }}}}\"\n"
    )
}

fn sec<'a>(view: &'a ReportView, id: &str) -> &'a SectionView {
    view.section(id)
        .unwrap_or_else(|| panic!("no section {id} in {view:#?}"))
}

// ---------------------------------------------------------------------------------------------
// The request log: every chat request the simulator saw, which section sent it, what it got
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Entry {
    /// The section id of the `probe-<id>` tag in the prompt.
    tag: String,
    arrived: Instant,
    /// When the response headers left (none yet for a hanging request).
    answered: Option<Instant>,
    status: Option<u16>,
    /// `retry-after-ms` (or `retry-after`) of the response.
    retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
struct RequestLog(Arc<Mutex<Vec<Entry>>>);

impl RequestLog {
    fn entries(&self) -> Vec<Entry> {
        self.0.lock().expect("log").clone()
    }

    fn count(&self, tag: &str) -> usize {
        self.entries().iter().filter(|e| e.tag == tag).count()
    }
}

async fn record(State(log): State<RequestLog>, req: Request, next: Next) -> Response {
    if req.uri().path() != "/v1/chat/completions" {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let tag = probe_tag(&String::from_utf8_lossy(&bytes));
    let index = {
        let mut entries = log.0.lock().expect("log");
        entries.push(Entry {
            tag,
            arrived: Instant::now(),
            answered: None,
            status: None,
            retry_after: None,
        });
        entries.len() - 1
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let retry_after = header("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| header("retry-after").map(Duration::from_secs_f64));
    let mut entries = log.0.lock().expect("log");
    let entry = &mut entries[index];
    entry.answered = Some(Instant::now());
    entry.status = Some(response.status().as_u16());
    entry.retry_after = retry_after;
    drop(entries);
    response
}

fn probe_tag(body: &str) -> String {
    body.find("probe-")
        .map(|at| {
            body[at + "probe-".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Retryable faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_section_that_fails_twice_then_answers_is_done_on_the_third_attempt() -> Result<()> {
    let stack = Stack::start(Spec::default()).await?;
    let t = stack.template(
        "flaky",
        "gpt-4o-mini",
        false,
        &[section("flaky", "[sim:fail_first=2]")],
    );
    let view = stack.submit_and_wait(&t).await?;

    assert_eq!(view.status, ReportStatus::Completed, "{view:#?}");
    let s = sec(&view, "flaky");
    assert_eq!(s.state, SectionState::Done);
    assert_eq!(s.attempts, 3);
    assert!(
        s.text
            .as_deref()
            .is_some_and(|t| t.starts_with("SIM-ANSWER"))
    );
    let stats = stack.stats().totals;
    assert_eq!(
        (stats.requests, stats.server_errors, stats.completed),
        (3, 2, 1)
    );
    assert_eq!(stack.log.count("flaky"), 3);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_section_the_provider_always_fails_gives_up_after_max_attempts() -> Result<()> {
    let stack = Stack::start(Spec::default()).await?;
    let t = stack.template(
        "broken",
        "gpt-4o-mini",
        false,
        &[
            section("broken", "[sim:fail]"),
            dependent("after", "broken"),
        ],
    );
    let view = stack.submit_and_wait(&t).await?;

    assert_eq!(view.status, ReportStatus::Failed, "{view:#?}");
    let s = sec(&view, "broken");
    assert_eq!(s.state, SectionState::Failed);
    let reason = s.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    assert!(reason.contains("500"), "{reason}");
    assert_eq!(s.attempts, 3, "the provider attempts, in one delivery");
    assert_eq!(sec(&view, "after").state, SectionState::Skipped);
    // Bounded by max_attempts: exactly three provider requests, none for the dependent.
    let stats = stack.stats().totals;
    assert_eq!((stats.requests, stats.server_errors), (3, 3));
    assert_eq!(stack.log.count("broken"), 3);
    assert_eq!(stack.log.count("after"), 0);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_is_a_decode_error_retried_until_max_attempts() -> Result<()> {
    let stack = Stack::start(Spec::default()).await?;
    let t = stack.template(
        "cut",
        "gpt-4o-mini",
        false,
        &[section("cut", "[sim:truncate]")],
    );
    let view = stack.submit_and_wait(&t).await?;

    let s = sec(&view, "cut");
    assert_eq!(s.state, SectionState::Failed, "{view:#?}");
    let reason = s.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("gave up after 3 attempts: Decode"),
        "{reason}"
    );
    let stats = stack.stats().totals;
    assert_eq!((stats.requests, stats.truncated), (3, 3));
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_request_times_out_and_is_retried_until_max_attempts() -> Result<()> {
    let stack = Stack::start(Spec {
        env: vec![
            ("FANOUT_QUEUE__MAX_ATTEMPTS", "2".into()),
            ("FANOUT_PROVIDER__REQUEST_TIMEOUT_SECS", "1".into()),
        ],
        ..Spec::default()
    })
    .await?;
    let t = stack.template(
        "stuck",
        "gpt-4o-mini",
        false,
        &[section("stuck", "[sim:hang]")],
    );
    let started = Instant::now();
    let view = stack.submit_and_wait(&t).await?;

    let s = sec(&view, "stuck");
    assert_eq!(s.state, SectionState::Failed, "{view:#?}");
    let reason = s.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("gave up after 2 attempts: Timeout"),
        "{reason}"
    );
    let stats = stack.stats().totals;
    assert_eq!((stats.requests, stats.hung), (2, 2));
    // Each attempt waited for the 1 s request timeout, no more (generous bound).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    stack.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Fatal faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_provider_errors_fail_the_section_at_once_with_the_providers_message() -> Result<()> {
    let stack = Stack::start(Spec::default()).await?;
    let t = stack.template(
        "fatal",
        "gpt-4o-mini",
        false,
        &[
            section("quota", "[sim:quota]"),
            dependent("after_quota", "quota"),
            section("denied", "[sim:error=401]"),
            dependent("after_denied", "denied"),
            section("huge", "[sim:context_length]"),
            dependent("after_huge", "huge"),
            section("fine", ""),
        ],
    );
    let view = stack.submit_and_wait(&t).await?;

    assert_eq!(
        view.status,
        ReportStatus::CompletedWithFailures,
        "{view:#?}"
    );
    assert_eq!(sec(&view, "fine").state, SectionState::Done);
    for (id, status, message) in [
        ("quota", "429", "You exceeded your current quota"),
        ("denied", "401", "Incorrect API key provided"),
        ("huge", "400", "maximum context length"),
    ] {
        let s = sec(&view, id);
        assert_eq!(s.state, SectionState::Failed, "{id}");
        let reason = s.reason.as_deref().unwrap_or_default();
        assert!(reason.contains(status), "{id}: {reason}");
        assert!(reason.contains(message), "{id}: {reason}");
        assert!(
            !reason.contains("gave up"),
            "{id} was not retried: {reason}"
        );
        assert!(
            !reason.contains(API_KEY),
            "{id}: the secret leaked: {reason}"
        );
        assert_eq!(stack.log.count(id), 1, "{id}: one provider request");
        let after = sec(&view, &format!("after_{id}"));
        assert_eq!(after.state, SectionState::Skipped, "after_{id}");
        assert!(
            after.reason.as_deref().unwrap_or_default().contains(id),
            "after_{id}: {:?}",
            after.reason
        );
    }
    let stats = stack.stats().totals;
    assert_eq!(
        stats.requests, 4,
        "one request per fatal section, one for `fine`"
    );
    assert_eq!((stats.quota_exceeded, stats.client_errors), (1, 2));
    // Out of quota is not "slow down": no wait fixes it, so the shared budget is not paused.
    let bucket = stack.bucket("gpt-4o-mini").await?;
    assert!(!bucket.contains_key("paused"), "budget paused: {bucket:?}");
    stack.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_ridden_out_honouring_retry_after_with_a_shared_pause() -> Result<()> {
    // The provider lets 1 request a second through (60 RPM, a bucket of 1) and does not say so
    // (no rate headers to learn from); we believe 6000 RPM. Attempts stay at the harness's 3: a
    // 429 is the budget's problem, not the section's.
    let stack = Stack::start(Spec {
        sim: SimConfig {
            rpm: 60,
            rate_headers: false,
            ..SimConfig::instant()
        },
        env: vec![("REQUESTS_PER_MINUTE", "6000".into())],
        concurrency: 8,
    })
    .await?;
    let ids: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let sections: Vec<String> = ids.iter().map(|id| section(id, "")).collect();
    let t = stack.template("storm", "gpt-4o", false, &sections);

    // Another process's view of the same budget, polled while the storm lasts.
    let mut observed = stack.config.budget.clone();
    observed
        .models
        .insert("gpt-4o".into(), observed.limits_for("gpt-4o"));
    let observer = Budget::new(
        stack.pool.clone(),
        &stack.config.redis.namespace,
        observed,
        vec!["default".into()],
    );
    let id = stack.submit(&t, None).await?;
    let mut saw_pause = false;
    let deadline = Instant::now() + FINISH_WITHIN;
    let view = loop {
        let snapshot = observer.snapshot().await?;
        saw_pause |= snapshot
            .iter()
            .any(|b| b.family == "gpt-4o" && b.paused_for.is_some());
        let view = stack.view(&id).await?;
        if view.status != ReportStatus::Running {
            break view;
        }
        ensure!(Instant::now() < deadline, "storm not over: {view:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Every retry after a 429 came no sooner than the provider asked.
    let stats = stack.stats().totals;
    let log = stack.log.entries();
    let mut checked = 0;
    for (i, e) in log.iter().enumerate() {
        if e.status != Some(429) {
            continue;
        }
        let (Some(answered), Some(wait)) = (e.answered, e.retry_after) else {
            bail!("a 429 without retry-after: {e:?}");
        };
        let next = log[i + 1..]
            .iter()
            .find(|n| n.tag == e.tag)
            .with_context(|| format!("{} never retried after its 429", e.tag))?;
        let gap = next.arrived.duration_since(answered);
        // 1 ms: the header is rounded to the millisecond.
        assert!(
            gap + Duration::from_millis(1) >= wait,
            "{} retried {gap:?} after a 429 asking for {wait:?}",
            e.tag
        );
        checked += 1;
    }
    assert!(
        stats.rate_limited > 0,
        "the provider pushed back: {stats:?}"
    );
    assert_eq!(checked as u64, stats.rate_limited);
    // All done, and 429s cost no attempt.
    assert_eq!(view.status, ReportStatus::Completed, "{view:#?}");
    assert_eq!(stats.completed, 6);
    for s in &view.sections {
        assert_eq!(
            s.attempts,
            1,
            "{}: {} requests",
            s.job_id,
            stack.log.count(&s.job_id)
        );
    }
    // The pause went to Redis, where every worker process admits: another process saw it.
    assert!(
        saw_pause,
        "no process-wide pause was visible during the storm"
    );
    assert!(stack.bucket("gpt-4o").await?.contains_key("paused"));
    assert!(
        fanout_metrics::METRICS
            .budget_pauses
            .with_label_values(&["default", "gpt-4o"])
            .get()
            > 0
    );
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_asking_for_longer_than_max_wait_hands_the_job_back_instead_of_failing_it()
-> Result<()> {
    // 1 RPM at the provider, which does not advertise it: after one request, the next 429 asks
    // for ~60 s.
    let stack = Stack::start(Spec {
        sim: SimConfig {
            rpm: 1,
            rate_headers: false,
            ..SimConfig::instant()
        },
        env: vec![
            ("REQUESTS_PER_MINUTE", "6000".into()),
            ("FANOUT_BUDGET__MAX_WAIT_SECS", "2".into()),
        ],
        ..Spec::default()
    })
    .await?;
    let t = stack.template(
        "slow",
        "gpt-4.1",
        false,
        &[section("a", ""), section("b", "")],
    );
    let id = stack.submit(&t, None).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let delayed = loop {
        let depth = stack.producer.queue().depth().await?;
        let delayed: u64 = depth.iter().map(|l| l.delayed).sum();
        if delayed > 0 {
            break delayed;
        }
        ensure!(Instant::now() < deadline, "no job handed back: {depth:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(delayed, 1);
    let stats = stack.stats().totals;
    assert_eq!((stats.requests, stats.rate_limited), (2, 1), "{stats:?}");
    let limited = stack
        .log
        .entries()
        .into_iter()
        .find(|e| e.status == Some(429))
        .context("a 429")?;
    assert!(
        limited
            .retry_after
            .is_some_and(|r| r > Duration::from_secs(30))
    );
    let view = stack.view(&id).await?;
    assert_eq!(view.status, ReportStatus::Running);
    let waiting = sec(&view, &limited.tag);
    assert_ne!(waiting.state, SectionState::Failed, "{waiting:#?}");
    assert_eq!(view.totals.done, 1);
    stack.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Cache, cost, cancel
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_report_costs_no_provider_request_and_no_budget() -> Result<()> {
    // The only test on gpt-4.1-mini, so the process-wide admission counter for it is ours.
    const MODEL: &str = "gpt-4.1-mini";
    let admissions = || {
        fanout_metrics::METRICS
            .budget_admissions
            .with_label_values(&["default", MODEL])
            .get()
    };
    let stack = Stack::start(Spec::default()).await?;
    let t = stack.template(
        "cached",
        MODEL,
        true,
        &[section("a", ""), section("b", ""), dependent("c", "a")],
    );
    let first = stack.submit(&t, Some("first")).await?;
    let first = stack.finished(&first).await?;
    assert_eq!(first.status, ReportStatus::Completed, "{first:#?}");
    assert!(first.sections.iter().all(|s| !s.cached));
    let requests = stack.stats().totals.requests;
    assert_eq!(requests, 3);
    let admitted = admissions();
    assert!(admitted >= 3);
    let bucket = stack.bucket(MODEL).await?;

    let second = stack.submit(&t, Some("second")).await?;
    let second = stack.finished(&second).await?;
    assert_ne!(first.id, second.id);
    assert_eq!(second.status, ReportStatus::Completed, "{second:#?}");
    for (a, b) in first.sections.iter().zip(&second.sections) {
        assert!(b.cached, "{} from the cache", b.job_id);
        assert_eq!(b.text, a.text, "{}", b.job_id);
        assert_eq!(b.cost, 0.0, "{}", b.job_id);
    }
    assert_eq!(second.totals.cost, 0.0);
    assert_eq!(
        stack.stats().totals.requests,
        requests,
        "no provider request"
    );
    assert_eq!(admissions(), admitted, "no budget admission");
    assert_eq!(
        stack.bucket(MODEL).await?,
        bucket,
        "the shared bucket untouched"
    );
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn section_costs_are_usage_times_price_and_the_report_total_is_their_sum() -> Result<()> {
    let stack = Stack::start(Spec::default()).await?;
    let t = stack.template(
        "priced",
        "gpt-4o-mini",
        false,
        &[
            section("a", ""),
            section("b", "[sim:fail_first=1]"),
            dependent("c", "a"),
        ],
    );
    let view = stack.submit_and_wait(&t).await?;
    assert_eq!(view.status, ReportStatus::Completed, "{view:#?}");

    let price = stack.config.price("gpt-4o-mini").context("a price")?;
    let mut sum = 0.0;
    for s in &view.sections {
        assert!(s.prompt_tokens > 0 && s.completion_tokens > 0, "{s:#?}");
        let expected = (s.prompt_tokens as f64 * price.input
            + s.completion_tokens as f64 * price.output)
            / 1e6;
        assert!(
            (s.cost - expected).abs() < 1e-12,
            "{}: {} vs {expected}",
            s.job_id,
            s.cost
        );
        sum += s.cost;
    }
    assert!((view.totals.cost - sum).abs() < 1e-12);
    // Tokens are the provider's own usage (a failed attempt reports none).
    let stats = stack.stats().totals;
    assert_eq!(view.totals.prompt_tokens, stats.prompt_tokens);
    assert_eq!(view.totals.completion_tokens, stats.completion_tokens);
    assert_eq!(
        view.totals.total_tokens,
        stats.prompt_tokens + stats.completion_tokens
    );
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_report_stops_the_retries_of_its_sections() -> Result<()> {
    // One job slot, so the next report can only run once the cancelled job let go of it. The
    // backoff between attempts (60 s) is longer than the test may take: the job notices the
    // cancel while backing off.
    let stack = Stack::start(Spec {
        env: vec![
            ("FANOUT_QUEUE__MAX_ATTEMPTS", "100".into()),
            ("FANOUT_QUEUE__RETRY_BASE_MS", "60000".into()),
            ("FANOUT_QUEUE__RETRY_MAX_MS", "60000".into()),
        ],
        concurrency: 1,
        ..Spec::default()
    })
    .await?;
    let t = stack.template(
        "doomed",
        "gpt-4o-mini",
        false,
        &[
            section("doomed", "[sim:fail_first=100]"),
            dependent("after", "doomed"),
        ],
    );
    let id = stack.submit(&t, None).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while stack.log.count("doomed") < 1 {
        ensure!(Instant::now() < deadline, "no provider request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.producer.cancel(&id).await?;
    // A request already past its budget check when the cancel landed may still arrive.
    let at_cancel = stack.log.count("doomed");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let after = stack.log.count("doomed");
    assert!(
        after <= at_cancel + 1,
        "{after} requests after cancel, {at_cancel} at cancel"
    );

    let view = stack.view(&id).await?;
    assert_eq!(view.status, ReportStatus::Cancelled);
    assert_eq!(sec(&view, "doomed").state, SectionState::Cancelled);
    assert_eq!(sec(&view, "after").state, SectionState::Cancelled);
    // The slot is free again: another report runs (within FINISH_WITHIN, not after the
    // 60 s backoff).
    let t = stack.template("next", "gpt-4o-mini", false, &[section("next", "")]);
    let next = stack.submit_and_wait(&t).await?;
    assert_eq!(next.status, ReportStatus::Completed, "{next:#?}");
    stack.shutdown().await
}

/// A job whose worker dies mid-call more often than `queue.max_deliveries` allows is
/// dead-lettered by the queue; its section fails with that reason, so the report still ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_losing_its_worker_fails_its_section_and_the_report_finishes() -> Result<()>
{
    let mut stack = Stack::start(Spec {
        env: vec![
            ("FANOUT_QUEUE__MAX_DELIVERIES", "1".into()),
            ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "1".into()),
        ],
        ..Spec::default()
    })
    .await?;
    let template = stack.template(
        "dies",
        "gpt-4o-mini",
        false,
        &[section("doomed", "[sim:hang]"), section("fine", "")],
    );
    let id = stack.submit(&template, None).await?;
    // Wait until the doomed call is in flight and `fine` is done (if the hung call was the first
    // to this budget, `fine` waited for its answer for a few seconds, then went), then take the
    // worker away mid-call: the drain gives up after its 1 s grace and leaves the job pending, as
    // a crash would.
    let deadline = Instant::now() + FINISH_WITHIN;
    loop {
        let view = stack.view(&id).await?;
        if sec(&view, "doomed").state == SectionState::Running
            && sec(&view, "fine").state == SectionState::Done
        {
            break;
        }
        ensure!(Instant::now() < deadline, "doomed never started: {view:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.stop.cancel();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A new worker reclaims it after the visibility timeout: one delivery too many.
    stack.stop = CancellationToken::new();
    let options = fanout_worker::WorkerOptions {
        concurrency: 4,
        grace: Duration::from_secs(1),
    };
    let (c, s) = (stack.config.clone(), stack.stop.clone());
    stack
        .tasks
        .spawn(async move { fanout_worker::run(c, options, s).await });
    let view = stack.finished(&id).await?;
    let doomed = sec(&view, "doomed");
    assert_eq!(doomed.state, SectionState::Failed, "{view:#?}");
    let reason = doomed.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("delivery limit"), "{reason}");
    assert_eq!(sec(&view, "fine").state, SectionState::Done);
    assert_eq!(view.status, ReportStatus::CompletedWithFailures);
    stack.shutdown().await
}

/// When the budget binds, the job with the longest remaining chain goes first: four ready
/// sections whose priorities come from their output budgets reach the provider in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_scarce_budget_the_longest_remaining_chain_is_admitted_first() -> Result<()> {
    let stack = Stack::start(Spec {
        // One request a second, a burst of one: everything after the first call waits.
        env: vec![("REQUESTS_PER_MINUTE", "60".into())],
        ..Spec::default()
    })
    .await?;
    // Spend the burst, so every section below waits in the budget's waiting room.
    let blocker = stack.template("blocker", "gpt-4o-mini", false, &[section("blocker", "")]);
    stack.submit_and_wait(&blocker).await?;

    let sized = |id: &str, max_tokens: u32| {
        format!(
            "[[sections]]\nid = \"{id}\"\ntitle = \"{id}\"\nmax_tokens = {max_tokens}\n\
             prompt = \"probe-{id} Write about {{{{ inputs.topic }}}}.\"\n"
        )
    };
    // Template order deliberately differs from the expected admission order.
    let t = stack.template(
        "ranked",
        "gpt-4o-mini",
        false,
        &[
            sized("tiny", 40),
            sized("long", 800),
            sized("short", 100),
            sized("mid", 400),
        ],
    );
    let view = stack.submit_and_wait(&t).await?;
    assert_eq!(view.status, ReportStatus::Completed, "{view:#?}");
    let order: Vec<String> = stack
        .log
        .entries()
        .into_iter()
        .map(|e| e.tag)
        .filter(|t| t != "blocker")
        .collect();
    assert_eq!(order, ["long", "mid", "short", "tiny"]);
    stack.shutdown().await
}
