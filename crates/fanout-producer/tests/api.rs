//! The HTTP API over real HTTP: a private redis-server per test, the API on 127.0.0.1:0, and
//! for the flows a worker and an aggregator in-process against the simulated provider.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::http::{HeaderMap, StatusCode};
use fanout_aggregator::{AggregatorOptions, NewReport, OnFinished};
use fanout_core::{Config, Secret};
use fanout_producer::api::webhook::{self, WebhookOptions, Webhooks};
use fanout_producer::api::{self, ApiState, DocFormat};
use fanout_producer::client::{FanoutClient, ServerEvent};
use fanout_producer::{SubmitRequest, WebhookTargets};
use fanout_sim::{SimConfig, SimHandle};
use fanout_test_support::{RedisServer, test_config};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const ACME: &str = "token-acme-0000000001";
const GLOBEX: &str = "token-globex-00000001";
const TOKENS: &str = "token-acme-0000000001=acme,token-globex-00000001=globex";
/// An admin token (add `{OPS}=ops:admin` to TOKENS where a test needs one).
const OPS: &str = "token-ops-00000000001";

/// What a test runs.
struct Options {
    /// Run a worker and an aggregator on this simulator config.
    pipeline: Option<SimConfig>,
    concurrency: usize,
    env: Vec<(&'static str, String)>,
    on_finished: Option<OnFinished>,
    sse: Option<(Duration, Duration)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pipeline: None,
            concurrency: 8,
            env: Vec::new(),
            on_finished: None,
            sse: None,
        }
    }
}

/// Redis, the API, and maybe a worker, an aggregator and the simulator.
struct Stack {
    redis: RedisServer,
    config: Arc<Config>,
    state: ApiState,
    base: String,
    http: reqwest::Client,
    sim: Option<SimHandle>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Stack {
    async fn start(options: Options) -> Result<Self> {
        let redis = tokio::task::spawn_blocking(RedisServer::start).await?;
        let sim = match options.pipeline {
            Some(sim) => Some(fanout_sim::spawn(sim).await?),
            None => None,
        };
        let mut env: Vec<(&str, String)> = vec![
            ("FANOUT_QUEUE__MAX_ATTEMPTS", "2".into()),
            ("FANOUT_QUEUE__RETRY_BASE_MS", "50".into()),
            ("FANOUT_REDIS__COMMAND_TIMEOUT_MS", "2000".into()),
            ("MAX_CONCURRENT_REQUESTS", "50".into()),
        ];
        if let Some(sim) = &sim {
            env.push(("OPENAI_BASE_URL", sim.base_url()));
            env.push(("OPENAI_API_KEY", "sk-test-000000000000".into()));
        }
        env.extend(options.env);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = Arc::new(test_config(&redis.url(), &pairs));
        let mut state = ApiState::from_config(&config)?;
        if let Some((keep_alive, block)) = options.sse {
            state = state.with_sse_intervals(keep_alive, block);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(api::run(state.clone(), listener, stop.clone()));
        if sim.is_some() {
            let (c, s) = (config.clone(), stop.clone());
            let worker = fanout_worker::WorkerOptions {
                concurrency: options.concurrency,
                grace: Duration::from_secs(1),
            };
            tasks.spawn(async move { fanout_worker::run(c, worker, s).await });
            let store =
                fanout_aggregator::Store::from_config(fanout_worker::redis_pool(&config)?, &config);
            let aggregator = AggregatorOptions {
                on_finished: options.on_finished,
                block: Duration::from_millis(500),
                ..AggregatorOptions::default()
            };
            tasks.spawn(fanout_aggregator::run(store, aggregator, stop.clone()));
        }
        Ok(Self {
            redis,
            config,
            state,
            base,
            http: reqwest::Client::new(),
            sim,
            stop,
            tasks,
        })
    }

    /// A webhook deliverer on this stack's Redis, with its `webhooks.allow_hosts` (what
    /// `fanout aggregator` runs).
    fn webhooks(&self, options: WebhookOptions) -> Result<Webhooks> {
        let store = fanout_aggregator::Store::from_config(
            fanout_worker::redis_pool(&self.config)?,
            &self.config,
        );
        let targets = WebhookTargets::new(&self.config.webhooks.allow_hosts)
            .map_err(|e| anyhow::anyhow!(e))?;
        let options = WebhookOptions {
            targets: Arc::new(targets),
            ..options
        };
        Ok(Webhooks::new(options, &store)?)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with a JSON body (or none) and an optional token; the answer's status,
    /// headers and body (JSON when it parses, else a string).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, HeaderMap, Value)> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = StatusCode::from_u16(resp.status().as_u16())?;
        let headers = convert_headers(resp.headers());
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, headers, body))
    }

    async fn raw(&self, req: reqwest::RequestBuilder) -> Result<(StatusCode, HeaderMap, Value)> {
        let resp = req.send().await?;
        let status = StatusCode::from_u16(resp.status().as_u16())?;
        let headers = convert_headers(resp.headers());
        let text = resp.text().await?;
        Ok((
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Poll the report until its status is terminal.
    async fn wait_finished(
        &self,
        id: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, _, body) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/reports/{id}"),
                    token,
                    None,
                )
                .await?;
            if status == StatusCode::OK && body["status"] != "running" {
                return Ok(body);
            }
            if Instant::now() > deadline {
                bail!("report {id} not finished within {timeout:?}: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
    }
}

fn convert_headers(h: &reqwest::header::HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in h {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_str().as_bytes()),
            axum::http::HeaderValue::from_bytes(v.as_bytes()),
        ) {
            out.append(k, v);
        }
    }
    out
}

fn panel_inputs(personas: usize) -> Value {
    let list: Vec<Value> = (0..personas)
        .map(|i| json!({"name": format!("Persona {i}"), "description": "a careful buyer"}))
        .collect();
    json!({"content": "# Kitchenly\nStop throwing your margin in the bin.", "personas": list})
}

fn panel(personas: usize, key: Option<&str>) -> Value {
    let mut body = json!({"template": "persona-panel", "inputs": panel_inputs(personas)});
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    body
}

fn error_of(body: &Value) -> (&str, Option<&str>, &str) {
    (
        body["error"]["code"].as_str().unwrap_or("<no code>"),
        body["error"]["field"].as_str(),
        body["error"]["message"].as_str().unwrap_or(""),
    )
}

/// Every event of a report's stream until it ends.
async fn collect_events(
    client: &FanoutClient,
    id: &str,
    after: Option<&str>,
) -> Result<Vec<ServerEvent>> {
    let stream = client.events(id, after);
    let all = tokio::time::timeout(Duration::from_secs(60), stream.collect::<Vec<_>>())
        .await
        .context("event stream did not end within 60 s")?;
    all.into_iter().map(|e| e.map_err(Into::into)).collect()
}

fn pipeline() -> Option<SimConfig> {
    Some(SimConfig::instant())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_flows_from_submit_through_live_events_to_its_documents() -> Result<()> {
    let s = Stack::start(Options {
        pipeline: pipeline(),
        env: vec![("FANOUT_API_TOKENS", TOKENS.into())],
        ..Options::default()
    })
    .await?;
    let post = reqwest::Method::POST;

    let body = panel(3, Some("flow-1"));
    let (status, headers, first) = s
        .call(post.clone(), "/v1/reports", Some(ACME), Some(&body))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let id = first["id"].as_str().context("id")?.to_owned();
    assert_eq!(first["status"], "running");
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["jobs"], 4, "3 personas and the summary");
    assert_eq!(first["links"]["self"], format!("/v1/reports/{id}"));
    assert_eq!(first["links"]["events"], format!("/v1/reports/{id}/events"));
    assert_eq!(
        first["links"]["report"],
        format!("/v1/reports/{id}/report.json")
    );
    assert_eq!(
        first["links"]["markdown"],
        format!("/v1/reports/{id}/report.md")
    );
    assert_eq!(headers["location"], format!("/v1/reports/{id}").as_str());

    // The same idempotency key: 200, the same report.
    let (status, _, again) = s
        .call(post.clone(), "/v1/reports", Some(ACME), Some(&body))
        .await?;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["id"].as_str(), again["duplicate"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    // The same key for another request: 409 naming the key, and nothing new.
    let mut other_inputs = body.clone();
    other_inputs["inputs"]["content"] = json!("another text");
    let mut other_lane = body.clone();
    other_lane["lane"] = json!("batch");
    let mut other_template = json!({
        "template": "startup-report",
        "inputs": {"idea": "A bakery"},
    });
    other_template["idempotency_key"] = body["idempotency_key"].clone();
    for other in [other_inputs, other_lane, other_template] {
        let (status, _, err) = s
            .call(post.clone(), "/v1/reports", Some(ACME), Some(&other))
            .await?;
        assert_eq!(status, StatusCode::CONFLICT, "{other} → {err}");
        let (code, field, message) = error_of(&err);
        assert_eq!(
            (code, field),
            ("idempotency_key_reused", Some("idempotency_key"))
        );
        assert!(message.contains(&id), "{message}");
    }

    // Live events until the end, through the client.
    let client = FanoutClient::new(&s.base, Some(ACME.into()));
    let events = collect_events(&client, &id, None).await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"report.created"), "{kinds:?}");
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["report.finished", "report"],
        "{kinds:?}"
    );
    for job in ["persona[0]", "persona[1]", "persona[2]", "summary"] {
        assert!(
            events
                .iter()
                .filter_map(ServerEvent::body)
                .any(|b| b.kind == "section.completed" && b.job_id.as_deref() == Some(job)),
            "no section.completed for {job}: {kinds:?}"
        );
    }
    let ids: Vec<&str> = events.iter().filter_map(|e| e.id.as_deref()).collect();
    assert_eq!(
        ids.len(),
        events.len() - 1,
        "every event but the report has an id"
    );
    for (e, id) in events.iter().zip(&ids) {
        assert_eq!(
            e.body().map(|b| b.id),
            Some((*id).to_owned()),
            "the SSE id is the stream id"
        );
    }
    let finished = events[events.len() - 2].body().context("finished body")?;
    assert_eq!(finished.state.as_deref(), Some("completed"));
    let final_json: Value = events.last().context("report event")?.json()?;
    assert_eq!(final_json["status"], "completed");

    // The view and the documents.
    let view = client.get(&id).await?;
    assert_eq!(view.status, fanout_core::ReportStatus::Completed);
    assert_eq!(view.tenant, "acme");
    assert_eq!(view.sections.len(), 4);
    assert_eq!(view.totals.done, 4);
    assert!(view.totals.total_tokens > 0);
    for sec in &view.sections {
        assert!(
            sec.text.as_deref().is_some_and(|t| !t.is_empty()),
            "{sec:?}"
        );
        assert!(sec.prompt_tokens > 0 && sec.completion_tokens > 0 && sec.finished_at.is_some());
    }
    let md = client.report(&id, DocFormat::Md).await?;
    assert!(md.starts_with("# Persona panel"), "{md}");
    assert!(md.contains("Persona 2"));
    let (status, headers, doc) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/report.json")))
                .bearer_auth(ACME),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        doc, final_json,
        "the report event carries the final JSON document"
    );
    let (_, _, md_doc) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/report.md")))
                .bearer_auth(ACME),
        )
        .await?;
    assert_eq!(md_doc, md);
    // The route before report.json and report.md still answers: Markdown by default.
    let (_, headers, legacy_md) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/report")))
                .bearer_auth(ACME),
        )
        .await?;
    assert!(
        headers["content-type"]
            .to_str()?
            .starts_with("text/markdown")
    );
    assert_eq!(legacy_md, md);
    let (_, _, legacy_json) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/report?format=json")))
                .bearer_auth(ACME),
        )
        .await?;
    assert_eq!(legacy_json, doc);

    // Templates, and the routes that need no token.
    let templates = client.templates().await?;
    let names: Vec<&str> = templates.iter().map(|t| t.name.as_str()).collect();
    assert!(
        names.contains(&"persona-panel") && names.contains(&"startup-report"),
        "{names:?}"
    );
    let get = reqwest::Method::GET;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (status, _, body) = s.call(get.clone(), path, None, None).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let (_, _, metrics) = s.call(get.clone(), "/metrics", None, None).await?;
    assert!(
        metrics
            .as_str()
            .unwrap_or("")
            .contains("fanout_reports_submitted_total")
    );
    let (_, _, doc) = s.call(get, "/openapi.json", None, None).await?;
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/reports/{id}/events"]["get"].is_object());
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_streams_replay_after_last_event_id() -> Result<()> {
    let s = Stack::start(Options {
        pipeline: pipeline(),
        ..Options::default()
    })
    .await?;
    let client = FanoutClient::new(&s.base, None);
    let mut req: SubmitRequest = serde_json::from_value(panel(4, None))?;
    req.lane = Some(fanout_core::Lane::Batch);
    let id = client.submit(&req).await?.id;
    let all = collect_events(&client, &id, None).await?;
    assert!(all.len() > 6, "{all:?}");
    let ids: Vec<String> = all.iter().filter_map(|e| e.id.clone()).collect();

    // Last-Event-ID: only what came after it.
    let k = 3;
    let later = collect_events(&client, &id, Some(&ids[k])).await?;
    let later_ids: Vec<String> = later.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(later_ids, ids[k + 1..].to_vec());
    assert!(later.last().is_some_and(ServerEvent::is_report));

    // `?after=` does the same; the header wins over it.
    let text = |body: Value| body.as_str().unwrap_or("").to_owned();
    let stream_ids = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(str::to_owned)
            .collect()
    };
    let (status, headers, body) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/events?after={}", ids[k]))),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(stream_ids(&text(body)), ids[k + 1..].to_vec());
    let (_, _, body) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/events?after=0-0")))
                .header("last-event-id", &ids[k + 1]),
        )
        .await?;
    assert_eq!(stream_ids(&text(body)), ids[k + 2..].to_vec());

    // A reconnect after report.finished gets only the report event.
    let last = collect_events(&client, &id, ids.last().map(String::as_str)).await?;
    assert_eq!(last.len(), 1);
    assert!(last[0].is_report());

    // Not an event id.
    let (status, _, body) = s
        .raw(
            s.http
                .get(s.url(&format!("/v1/reports/{id}/events")))
                .header("last-event-id", "yesterday"),
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body).1, Some("Last-Event-ID"));
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_event_stream_sends_keep_alive_comments() -> Result<()> {
    // No worker: the report stays queued, the stream waits.
    let s = Stack::start(Options {
        sse: Some((Duration::from_millis(100), Duration::from_millis(300))),
        ..Options::default()
    })
    .await?;
    let client = FanoutClient::new(&s.base, None);
    let id = client
        .submit(&serde_json::from_value(panel(1, None))?)
        .await?
        .id;
    let mut resp = s
        .http
        .get(s.url(&format!("/v1/reports/{id}/events")))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(seen.contains("event: report.created") && seen.contains("\n:")) {
        ensure!(Instant::now() < deadline, "no keep-alive comment: {seen:?}");
        match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await?? {
            Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            None => bail!("the stream ended: {seen:?}"),
        }
    }
    drop(resp);
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_authenticate_and_tenants_see_only_their_reports() -> Result<()> {
    let s = Stack::start(Options {
        env: vec![("FANOUT_API_TOKENS", TOKENS.into())],
        ..Options::default()
    })
    .await?;
    let (get, post, delete) = (
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
    );
    let body = panel(2, None);

    for token in [None, Some("token-nobody-00000000")] {
        let (status, headers, err) = s
            .call(post.clone(), "/v1/reports", token, Some(&body))
            .await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
        assert!(headers["www-authenticate"].to_str()?.starts_with("Bearer"));
        assert_eq!(error_of(&err).0, "unauthorized");
    }
    let (status, _, _) = s
        .raw(
            s.http
                .get(s.url("/v1/templates"))
                .header("authorization", format!("Basic {ACME}")),
        )
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _, created) = s.call(post, "/v1/reports", Some(ACME), Some(&body)).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().context("id")?;
    let (status, _, view) = s
        .call(get.clone(), &format!("/v1/reports/{id}"), Some(ACME), None)
        .await?;
    assert_eq!(
        (status, view["tenant"].as_str()),
        (StatusCode::OK, Some("acme"))
    );

    // Another tenant gets exactly what an unknown id gets.
    let unknown = "0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b";
    let (status, _, missing) = s
        .call(
            get.clone(),
            &format!("/v1/reports/{unknown}"),
            Some(GLOBEX),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let expected = |id: &str| json!({"error": {"code": "not_found", "message": format!("report `{id}` not found (unknown or expired)")}});
    assert_eq!(missing, expected(unknown));
    for (method, path) in [
        (get.clone(), format!("/v1/reports/{id}")),
        (get.clone(), format!("/v1/reports/{id}/events")),
        (get.clone(), format!("/v1/reports/{id}/report.json")),
        (get.clone(), format!("/v1/reports/{id}/report.md")),
        (get.clone(), format!("/v1/reports/{id}/report?format=json")),
        (delete, format!("/v1/reports/{id}")),
    ] {
        let (status, _, body) = s.call(method.clone(), &path, Some(GLOBEX), None).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body, expected(id), "{method} {path}");
        let (status, _, _) = s.call(method.clone(), &path, None, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // Still running for its owner: the other tenant's DELETE did nothing.
    let (_, _, view) = s
        .call(get.clone(), &format!("/v1/reports/{id}"), Some(ACME), None)
        .await?;
    assert_eq!(view["status"], "running");

    // The operations routes need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (status, _, _) = s.call(get.clone(), path, None, None).await?;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (_, _, doc) = s.call(get, "/openapi.json", None, None).await?;
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_is_json_naming_the_problem() -> Result<()> {
    let s = Stack::start(Options {
        env: vec![("FANOUT_API__MAX_BODY_BYTES", "4096".into())],
        ..Options::default()
    })
    .await?;
    let post_json = |body: &str| {
        s.http
            .post(s.url("/v1/reports"))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };

    // Malformed JSON: 400 with line and column.
    let (status, _, err) = s
        .raw(post_json(
            "{\n  \"template\": \"persona-panel\",\n  \"inputs\": {,}\n}",
        ))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (code, _, message) = error_of(&err);
    assert_eq!(code, "malformed_json");
    assert!(message.contains("line 3 column"), "{message}");

    // 422s naming the field: (body, code, field, words in the message).
    let mut nested = panel_inputs(3);
    nested["personas"][2] = json!({"description": "no name"});
    let cases = [
        (
            json!({"inputs": {}}),
            "invalid_request",
            "template",
            "missing field `template`",
        ),
        (
            json!({"template": "persona-panel"}),
            "invalid_request",
            "inputs",
            "missing field `inputs`",
        ),
        (
            json!({"template": 7, "inputs": {}}),
            "invalid_request",
            "template",
            "invalid type",
        ),
        (
            json!({"template": "persona-panel", "inputs": {}, "colour": "red"}),
            "invalid_request",
            "colour",
            "unknown field `colour`",
        ),
        (
            json!({"template": "persona-panel", "inputs": {}, "lane": "urgent"}),
            "invalid_request",
            "lane",
            "unknown variant",
        ),
        (
            json!({"template": "no-such-template", "inputs": {}}),
            "unknown_template",
            "template",
            "persona-panel",
        ),
        (
            json!({"template": "/etc/passwd", "inputs": {}}),
            "unknown_template",
            "template",
            "unknown template",
        ),
        (
            json!({"template": "persona-panel", "inputs": {"personas": [{"name": "A"}]}}),
            "invalid_input",
            "inputs.content",
            "is required",
        ),
        (
            json!({"template": "persona-panel", "inputs": {"content": "x", "personas": "everyone"}}),
            "invalid_input",
            "inputs.personas",
            "expected a list",
        ),
        (
            json!({"template": "persona-panel", "inputs": nested}),
            "invalid_input",
            "inputs.personas[2].name",
            "is required",
        ),
        (
            json!({"template": "persona-panel", "inputs": [1, 2]}),
            "invalid_input",
            "inputs",
            "expected an object",
        ),
        (
            json!({"template": "persona-panel", "inputs": panel_inputs(1), "idempotency_key": "has space"}),
            "invalid_request",
            "idempotency_key",
            "printable",
        ),
        (
            json!({"template": "persona-panel", "inputs": panel_inputs(1), "callback_url": "ftp://x"}),
            "invalid_request",
            "callback_url",
            "http",
        ),
        (
            json!({"template": "persona-panel", "inputs": panel_inputs(1), "batch_api": {"deadline_secs": 0}}),
            "invalid_request",
            "batch_api.deadline_secs",
            "1 to 2592000",
        ),
        (
            json!({"template": "persona-panel", "inputs": panel_inputs(1), "batch_api": "yes"}),
            "invalid_request",
            "batch_api",
            "true, false, or an object",
        ),
        (
            json!({"template": "persona-panel", "inputs": panel_inputs(1), "batch_api": {"deadline": 60}}),
            "invalid_request",
            "batch_api",
            "deadline_secs",
        ),
    ];
    for (body, code, field, words) in cases {
        let (status, _, err) = s
            .call(reqwest::Method::POST, "/v1/reports", None, Some(&body))
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {err}");
        let (c, f, m) = error_of(&err);
        assert_eq!((c, f), (code, Some(field)), "{body} → {err}");
        assert!(m.contains(words), "{body} → {m}");
    }

    // Body over api.max_body_bytes (with and without a content-length).
    // The server answers 413 from the headers and closes; the client may still be writing the
    // body (a transport error on its side, a race in HTTP itself). A few tries see the answer.
    let big = json!({"template": "persona-panel", "inputs": {"content": "x".repeat(5000), "personas": [{"name": "A"}]}});
    let mut answered = None;
    for _ in 0..5 {
        if let Ok(reply) = s
            .call(reqwest::Method::POST, "/v1/reports", None, Some(&big))
            .await
        {
            answered = Some(reply);
            break;
        }
    }
    let (status, headers, err) = answered.expect("a 413 answer to a body over the limit");
    assert_eq!(
        (status, error_of(&err).0),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "{err}"
    );
    assert_eq!(
        headers["connection"], "close",
        "the client must not reuse it"
    );
    // Without a content-length the server only knows after reading past the limit; same race.
    let mut answered = None;
    for _ in 0..5 {
        let chunks =
            futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1000])));
        let request = s
            .http
            .post(s.url("/v1/reports"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks));
        if let Ok(reply) = s.raw(request).await {
            answered = Some(reply);
            break;
        }
    }
    let (status, _, err) = answered.expect("a 413 answer to a chunked body over the limit");
    assert_eq!(
        (status, error_of(&err).0),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "{err}"
    );

    // Only an object is a request (serde would make a struct of an array of its fields), and no
    // message names a Rust type.
    for body in [
        r#"["persona-panel", {"content": "x", "personas": []}]"#,
        "[]",
        "42",
    ] {
        let (status, _, err) = s.raw(post_json(body)).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {err}");
        let (code, _, message) = error_of(&err);
        assert_eq!(code, "invalid_request");
        assert!(message.contains("JSON object"), "{message}");
    }
    let (_, _, err) = s
        .raw(post_json(
            r#"{"template": "persona-panel", "inputs": {}, "lane": 7}"#,
        ))
        .await?;
    assert!(!err.to_string().contains("struct"), "{err}");
    assert_eq!(error_of(&err).1, Some("lane"), "{err}");

    // Not JSON.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = s
            .http
            .post(s.url("/v1/reports"))
            .body("template=persona-panel");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let (status, _, err) = s.raw(req).await?;
        assert_eq!(
            (status, error_of(&err).0),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            "{content_type:?}"
        );
    }
    let (status, _, _) = s
        .raw(post_json("{}").header("content-type", "application/merge-patch+json"))
        .await?;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "+json types are JSON"
    );

    // Unknown route, wrong method, bad query.
    let (status, _, err) = s
        .call(reqwest::Method::GET, "/v2/nothing", None, None)
        .await?;
    assert_eq!(
        (status, error_of(&err).0),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, headers, err) = s
        .call(reqwest::Method::PUT, "/v1/reports", None, None)
        .await?;
    assert_eq!(
        (status, error_of(&err).0),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    assert!(headers["allow"].to_str()?.contains("POST"));
    let id = FanoutClient::new(&s.base, None)
        .submit(&serde_json::from_value(panel(1, None))?)
        .await?
        .id;
    let (status, _, err) = s
        .call(
            reqwest::Method::GET,
            &format!("/v1/reports/{id}/report?format=pdf"),
            None,
            None,
        )
        .await?;
    assert_eq!(
        (status, error_of(&err).0, error_of(&err).1),
        (StatusCode::BAD_REQUEST, "invalid_query", Some("format")),
        "{err}"
    );
    let (status, _, err) = s
        .call(
            reqwest::Method::GET,
            &format!("/v1/reports/{id}/events?after=soon"),
            None,
            None,
        )
        .await?;
    assert_eq!(
        (status, error_of(&err).1),
        (StatusCode::BAD_REQUEST, Some("after")),
        "{err}"
    );
    let (status, _, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/reports/not%7Ban%7Did",
            None,
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The client carries the API's code, message and field.
    let client = FanoutClient::new(&s.base, None);
    let mut bad: SubmitRequest = serde_json::from_value(panel(1, None))?;
    bad.inputs["personas"][0] = json!({"name": 5});
    let err = client.submit(&bad).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert_eq!(err.code(), Some("invalid_input"));
    assert_eq!(err.field(), Some("inputs.personas[0].name"));
    let err = client
        .get("0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b")
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(404), Some("not_found")));
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_submission_limit_gets_429_with_retry_after() -> Result<()> {
    let s = Stack::start(Options {
        env: vec![
            ("FANOUT_API_TOKENS", TOKENS.into()),
            ("FANOUT_API__SUBMISSIONS_PER_MINUTE", "2".into()),
        ],
        ..Options::default()
    })
    .await?;
    let body = panel(1, None);
    for _ in 0..2 {
        let (status, _, b) = s
            .call(
                reqwest::Method::POST,
                "/v1/reports",
                Some(ACME),
                Some(&body),
            )
            .await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    }
    let (status, headers, err) = s
        .call(
            reqwest::Method::POST,
            "/v1/reports",
            Some(ACME),
            Some(&body),
        )
        .await?;
    assert_eq!(
        (status, error_of(&err).0),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{err}"
    );
    let retry: u64 = headers["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&retry), "{retry}");
    // The limit is per tenant.
    let (status, _, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/reports",
            Some(GLOBEX),
            Some(&body),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_mid_run_drops_queued_jobs_and_starts_no_more_calls() -> Result<()> {
    // Calls take seconds; two run at once, the rest wait in the queue.
    let s = Stack::start(Options {
        pipeline: Some(SimConfig {
            time_scale: 0.25,
            ..SimConfig::default()
        }),
        concurrency: 2,
        ..Options::default()
    })
    .await?;
    let sim = s.sim.as_ref().context("sim")?;
    let client = FanoutClient::new(&s.base, None);
    let id = client
        .submit(&serde_json::from_value(panel(6, None))?)
        .await?
        .id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.stats().totals.requests < 2 {
        ensure!(Instant::now() < deadline, "calls did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = client.cancel(&id).await?;
    assert_eq!(cancelled.status, fanout_core::ReportStatus::Cancelled);
    // Repeating it is harmless.
    assert_eq!(
        client.cancel(&id).await?.status,
        fanout_core::ReportStatus::Cancelled
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_cancel = sim.stats().totals.requests;

    // The calls in flight finish; no new call starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = sim.stats().totals;
        if t.completed + t.server_errors + t.rate_limited >= t.requests {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "in-flight calls did not finish: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = sim.stats().totals.requests;
    eprintln!(
        "provider calls: {at_cancel} at the cancel, {after} after the in-flight ones finished"
    );
    assert_eq!(after, at_cancel, "a provider call started after the cancel");
    assert!(after < 7, "queued jobs ran: {after} calls for 7 jobs");

    let view = client.get(&id).await?;
    assert_eq!(view.status, fanout_core::ReportStatus::Cancelled);
    assert!(view.totals.cancelled >= 4, "{:?}", view.totals);
    // The event stream ends: report.finished (cancelled), then the report.
    let events = collect_events(&client, &id, None).await?;
    let finished = events
        .iter()
        .filter_map(ServerEvent::body)
        .find(|b| b.kind == "report.finished")
        .context("no report.finished")?;
    assert_eq!(finished.state.as_deref(), Some("cancelled"));
    let last: Value = events.last().context("events")?.json()?;
    assert_eq!(last["status"], "cancelled");
    // Cancelling a finished report of its own is a conflict; this one stays cancelled.
    assert_eq!(
        client.cancel(&id).await?.status,
        fanout_core::ReportStatus::Cancelled
    );
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_report_is_not_cancelled() -> Result<()> {
    let s = Stack::start(Options {
        pipeline: pipeline(),
        ..Options::default()
    })
    .await?;
    let client = FanoutClient::new(&s.base, None);
    let id = client
        .submit(&serde_json::from_value(panel(1, None))?)
        .await?
        .id;
    s.wait_finished(&id, None, Duration::from_secs(30)).await?;
    let err = client.cancel(&id).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("conflict")));
    assert_eq!(
        client.get(&id).await?.status,
        fanout_core::ReportStatus::Completed
    );
    s.shutdown().await;
    Ok(())
}

/// A webhook receiver: `router` served on 127.0.0.1:0 until [`Receiver::stop`].
struct Receiver {
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    async fn start(router: axum::Router) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone().cancelled_owned();
            async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
            }
        });
        Ok(Self { base, stop, task })
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        Ok(self.task.await??)
    }
}

/// [`Webhooks::run`] on its own task, as `fanout aggregator` runs it, until [`Deliverer::stop`]
/// (then `grace` for POSTs in flight).
struct Deliverer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Deliverer {
    fn start(webhooks: &Webhooks, grace: Duration) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (webhooks, stop) = (webhooks.clone(), stop.clone());
            async move { webhooks.run(stop, grace).await }
        });
        Self { stop, task }
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

/// What the webhook receiver saw.
#[derive(Debug)]
struct Delivery {
    headers: HeaderMap,
    body: bytes::Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_report_is_posted_to_its_callback_signed_and_retried() -> Result<()> {
    const SECRET: &str = "whsec-test-0123456789";
    // A receiver that fails the first delivery.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
    let calls = Arc::new(AtomicUsize::new(0));
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let calls = calls.clone();
            move |headers: HeaderMap, body: bytes::Bytes| {
                let (tx, calls) = (tx.clone(), calls.clone());
                async move {
                    let _ = tx.send(Delivery { headers, body });
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }
        }),
    );
    let receiver = Receiver::start(receiver).await?;
    let hook_url = format!("{}/hook", receiver.base);

    // The receiver is on loopback: an internal address the operator allows.
    let s = Stack::start(Options {
        pipeline: pipeline(),
        env: vec![("FANOUT_WEBHOOKS__ALLOW_HOSTS", "127.0.0.1".into())],
        ..Options::default()
    })
    .await?;
    let webhooks = s.webhooks(WebhookOptions {
        secret: Some(Secret::new(SECRET)),
        base_delay: Duration::from_millis(50),
        ..WebhookOptions::default()
    })?;
    let delivering = Deliverer::start(&webhooks, Duration::from_secs(1));
    let mut body = panel(2, None);
    body["callback_url"] = json!(hook_url);
    let (status, _, created) = s
        .call(reqwest::Method::POST, "/v1/reports", None, Some(&body))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().context("id")?;

    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("webhook not delivered within 30 s")?
                .context("receiver closed")?,
        );
    }
    let (_, _, doc) = s
        .call(
            reqwest::Method::GET,
            &format!("/v1/reports/{id}/report.json"),
            None,
            None,
        )
        .await?;
    for (n, d) in got.iter().enumerate() {
        let h = |name: &str| {
            d.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(h(webhook::REPORT_ID_HEADER), id);
        assert_eq!(h(webhook::EVENT_HEADER), "report.finished");
        assert_eq!(h(webhook::ATTEMPT_HEADER), (n + 1).to_string());
        assert_eq!(h("content-type"), "application/json");
        let (ts, sig) = (h(webhook::TIMESTAMP_HEADER), h(webhook::SIGNATURE_HEADER));
        assert!(
            webhook::verify(SECRET, &ts, &d.body, &sig),
            "signature does not verify"
        );
        assert!(!webhook::verify("another-secret", &ts, &d.body, &sig));
        assert!(!webhook::verify(SECRET, "1", &d.body, &sig));
        let posted: Value = serde_json::from_slice(&d.body)?;
        assert_eq!(posted, doc, "the webhook carries the final report JSON");
        assert_eq!(posted["status"], "completed");
    }
    // Delivered: nothing pending, no third call.
    let deadline = Instant::now() + Duration::from_secs(5);
    while webhooks.pending().await? > 0 {
        ensure!(Instant::now() < deadline, "delivery still pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(webhooks.dead(10).await?.is_empty());
    delivering.stop().await?;
    s.shutdown().await;
    receiver.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_outlives_its_deliverer_and_a_refused_one_is_kept_with_its_reason() -> Result<()>
{
    // `/slow` never answers its first POST; `/gone` refuses every POST until it is `back`.
    let back = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow_calls = Arc::new(AtomicUsize::new(0));
    let attempts_seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let receiver = axum::Router::new()
        .route(
            "/slow",
            axum::routing::post({
                let (calls, seen) = (slow_calls.clone(), attempts_seen.clone());
                move |headers: HeaderMap| {
                    let (calls, seen) = (calls.clone(), seen.clone());
                    async move {
                        let attempt = headers
                            .get(webhook::ATTEMPT_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        seen.lock().unwrap().push(attempt);
                        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                            tokio::time::sleep(Duration::from_secs(600)).await;
                        }
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        )
        .route(
            "/gone",
            axum::routing::post({
                let back = back.clone();
                move || {
                    let back = back.clone();
                    async move {
                        if back.load(Ordering::SeqCst) {
                            StatusCode::OK
                        } else {
                            StatusCode::GONE
                        }
                    }
                }
            }),
        );
    let receiver = Receiver::start(receiver).await?;
    let base = receiver.base.clone();

    let s = Stack::start(Options {
        pipeline: pipeline(),
        env: vec![
            ("FANOUT_WEBHOOKS__ALLOW_HOSTS", "127.0.0.0/8".into()),
            ("FANOUT_API_TOKENS", format!("{TOKENS},{OPS}=ops:admin")),
        ],
        ..Options::default()
    })
    .await?;
    let options = WebhookOptions {
        base_delay: Duration::from_millis(50),
        lease: Duration::from_secs(1),
        poll: Duration::from_millis(50),
        ..WebhookOptions::default()
    };
    let submit = |path: &str| {
        let mut body = panel(1, None);
        body["callback_url"] = json!(format!("{base}{path}"));
        body
    };
    let (_, _, slow) = s
        .call(
            reqwest::Method::POST,
            "/v1/reports",
            Some(OPS),
            Some(&submit("/slow")),
        )
        .await?;
    let (_, _, gone) = s
        .call(
            reqwest::Method::POST,
            "/v1/reports",
            Some(OPS),
            Some(&submit("/gone")),
        )
        .await?;
    let (slow, gone) = (
        slow["id"].as_str().context("id")?,
        gone["id"].as_str().context("id")?,
    );

    // The first deliverer stops (no grace) while its POST to /slow hangs.
    let first = s.webhooks(options.clone())?;
    let first_run = Deliverer::start(&first, Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow_calls.load(Ordering::SeqCst) == 0 {
        ensure!(Instant::now() < deadline, "no delivery to /slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first_run.stop().await?;
    assert!(
        first.pending().await? >= 1,
        "the abandoned webhook stays in the outbox"
    );

    // A second deliverer (another aggregator, or the same one restarted) takes it over once
    // the lease runs out.
    let second = s.webhooks(options)?;
    let second_run = Deliverer::start(&second, Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.pending().await? > 0 {
        ensure!(Instant::now() < deadline, "webhooks still pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*attempts_seen.lock().unwrap(), ["1", "2"]);
    let dead = second.dead(10).await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].report_id, gone);
    assert_eq!(dead[0].url, format!("{base}/gone"));
    assert_eq!(dead[0].attempts, 1);
    assert!(dead[0].reason.contains("410"), "{}", dead[0].reason);
    assert!(dead.iter().all(|d| d.report_id != slow));

    // Each report shows where its webhook stands.
    let stack = &s;
    let view = |id: &str| {
        let path = format!("/v1/reports/{id}");
        async move {
            let (_, _, v) = stack
                .call(reqwest::Method::GET, &path, Some(OPS), None)
                .await?;
            anyhow::Ok(v)
        }
    };
    let slow_view = view(slow).await?;
    assert_eq!(slow_view["webhook"]["state"], "delivered", "{slow_view}");
    assert_eq!(slow_view["webhook"]["attempts"], 2);
    let gone_view = view(gone).await?;
    assert_eq!(gone_view["webhook"]["state"], "dead", "{gone_view}");
    assert_eq!(gone_view["webhook"]["attempts"], 1);
    let error = gone_view["webhook"]["last_error"].as_str().unwrap_or("");
    assert!(error.contains("410"), "{gone_view}");

    // An operator sees it over HTTP too.
    let (status, _, listed) = s
        .call(reqwest::Method::GET, "/v1/webhooks/dead", Some(OPS), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["webhooks"][0]["report_id"], gone, "{listed}");

    // The receiver is back: the dead webhook is sent again, from its first attempt.
    back.store(true, Ordering::SeqCst);
    let (status, _, done) = s
        .call(
            reqwest::Method::POST,
            "/v1/webhooks/redeliver",
            Some(OPS),
            Some(&json!({"report_ids": [gone, "no-such-report"]})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["results"][0]["outcome"], "redelivered", "{done}");
    assert_eq!(done["results"][1]["outcome"], "not_found", "{done}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = view(gone).await?;
        if v["webhook"]["state"] == "delivered" {
            assert_eq!(v["webhook"]["attempts"], 1, "{v}");
            break;
        }
        ensure!(Instant::now() < deadline, "not redelivered: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(second.dead(10).await?.is_empty(), "its dead entry went");

    second_run.stop().await?;
    s.shutdown().await;
    receiver.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_is_503_with_retry_after_and_submits_work_again_after_it_returns() -> Result<()>
{
    if fanout_test_support::skip_on_cluster("stops the server (tests/failover.rs kills a master)") {
        return Ok(());
    }
    let mut s = Stack::start(Options {
        pipeline: pipeline(),
        ..Options::default()
    })
    .await?;
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let body = panel(2, Some("outage-1"));
    tokio::task::block_in_place(|| s.redis.stop());

    let (status, headers, err) = s
        .call(post.clone(), "/v1/reports", None, Some(&body))
        .await?;
    assert_eq!(
        (status, error_of(&err).0),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{err}"
    );
    assert!(headers["retry-after"].to_str()?.parse::<u64>()? >= 1);
    let (status, headers, err) = s.call(get.clone(), "/readyz", None, None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert!(headers.contains_key("retry-after"));
    let (status, _, _) = s
        .call(
            get.clone(),
            "/v1/reports/0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b",
            None,
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = s.call(get.clone(), "/healthz", None, None).await?;
    assert_eq!(status, StatusCode::OK, "the process itself is fine");

    // A fresh, empty Redis on the same port.
    tokio::task::block_in_place(|| s.redis.restart());
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (status, _, b) = s
            .call(post.clone(), "/v1/reports", None, Some(&body))
            .await?;
        // 202, or 200 when an earlier try was stored and then answered 503 (Redis came back
        // mid-request): the idempotency key makes the retry return that report.
        if status == StatusCode::ACCEPTED || (status == StatusCode::OK && b["duplicate"] == true) {
            break b["id"].as_str().context("id")?.to_owned();
        }
        ensure!(status == StatusCode::SERVICE_UNAVAILABLE, "{status} {b}");
        ensure!(
            Instant::now() < deadline,
            "submits still fail after the restart: {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (status, _, _) = s.call(get, "/readyz", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    let view = s.wait_finished(&id, None, Duration::from_secs(60)).await?;
    assert_eq!(view["status"], "completed", "{view}");
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_the_same_idempotency_key_heals_a_half_done_submit() -> Result<()> {
    let s = Stack::start(Options {
        pipeline: pipeline(),
        ..Options::default()
    })
    .await?;
    // What a submit that failed after writing the record leaves: a report, no queued jobs.
    let producer = s.state.producer();
    let template = producer.templates().resolve("persona-panel")?;
    let inputs = panel_inputs(2);
    let graph = template.job_graph(&inputs)?;
    let created = producer
        .store()
        .create(NewReport {
            tenant: api::OPEN_TENANT.into(),
            template: (*template).clone(),
            inputs: inputs.clone(),
            graph,
            lane: "interactive".into(),
            idempotency_key: Some("heal-1".into()),
            callback_url: None,
            batch_api: None,
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, view) = s
        .call(
            reqwest::Method::GET,
            &format!("/v1/reports/{}", created.report_id),
            None,
            None,
        )
        .await?;
    assert_eq!(view["totals"]["done"], 0, "nothing was queued: {view}");

    let mut body = panel(2, Some("heal-1"));
    body["inputs"] = inputs;
    let (status, _, again) = s
        .call(reqwest::Method::POST, "/v1/reports", None, Some(&body))
        .await?;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"].as_str(), Some(created.report_id.as_str()));
    let view = s
        .wait_finished(&created.report_id, None, Duration::from_secs(30))
        .await?;
    assert_eq!(view["status"], "completed");
    let _ = &s.config;
    s.shutdown().await;
    Ok(())
}

/// A `callback_url` aimed inside is refused at submit, whatever its spelling, and a webhook whose
/// target is no longer allowed when it is due is not sent: no request reaches the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_cannot_be_aimed_at_internal_addresses() -> Result<()> {
    let calls = Arc::new(AtomicUsize::new(0));
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let calls = calls.clone();
            move || {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let receiver = Receiver::start(receiver).await?;
    let port = receiver.base.rsplit(':').next().context("port")?.to_owned();

    // The default policy: every spelling of this loopback receiver is refused, naming the field.
    let strict = Stack::start(Options {
        pipeline: pipeline(),
        ..Options::default()
    })
    .await?;
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
        format!("http://0x7f.0.0.1:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://0.0.0.0:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://user:pass@127.0.0.1:{port}/hook"),
        "http://exa mple.com/".to_owned(),
    ] {
        let mut body = panel(1, None);
        body["callback_url"] = json!(url);
        let (status, _, err) = strict
            .call(reqwest::Method::POST, "/v1/reports", None, Some(&body))
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url} → {err}");
        let (code, field, _) = error_of(&err);
        assert_eq!(
            (code, field),
            ("invalid_request", Some("callback_url")),
            "{url} → {err}"
        );
    }

    // Allowed by the operator, it is accepted and delivered.
    let allowed = Stack::start(Options {
        pipeline: pipeline(),
        env: vec![("FANOUT_WEBHOOKS__ALLOW_HOSTS", "127.0.0.1".into())],
        ..Options::default()
    })
    .await?;
    let mut body = panel(1, None);
    body["callback_url"] = json!(format!("http://127.0.0.1:{port}/hook"));
    let (status, _, created) = allowed
        .call(reqwest::Method::POST, "/v1/reports", None, Some(&body))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().context("id")?.to_owned();

    // A deliverer whose policy does not allow it (the operator took it off the list) sends
    // nothing and keeps the webhook, dead, with the reason.
    let store = fanout_aggregator::Store::from_config(
        fanout_worker::redis_pool(&allowed.config)?,
        &allowed.config,
    );
    let strict_deliverer = Webhooks::new(
        WebhookOptions {
            poll: Duration::from_millis(50),
            ..WebhookOptions::default()
        },
        &store,
    )?;
    let delivering = Deliverer::start(&strict_deliverer, Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = strict_deliverer.dead(10).await?;
        if !dead.is_empty() {
            break dead;
        }
        ensure!(Instant::now() < deadline, "the webhook was not given up on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    delivering.stop().await?;
    assert_eq!(dead[0].report_id, id);
    assert!(dead[0].reason.contains("not allowed"), "{}", dead[0].reason);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a request reached the receiver"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_are_listed_per_tenant_newest_first_with_filters_and_pages() -> Result<()> {
    // No worker: reports stay running unless cancelled.
    let s = Stack::start(Options {
        env: vec![("FANOUT_API_TOKENS", TOKENS.into())],
        ..Options::default()
    })
    .await?;
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let mut acme = Vec::new();
    for n in 0..4 {
        let body = if n == 2 {
            json!({"template": "startup-report", "inputs": {"idea": "A bakery"}})
        } else {
            panel(1, None)
        };
        let (status, _, r) = s
            .call(post.clone(), "/v1/reports", Some(ACME), Some(&body))
            .await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{r}");
        acme.push(r["id"].as_str().context("id")?.to_owned());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, _, other) = s
        .call(
            post.clone(),
            "/v1/reports",
            Some(GLOBEX),
            Some(&panel(1, None)),
        )
        .await?;
    let other = other["id"].as_str().context("id")?.to_owned();
    let (status, _, _) = s
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/reports/{}", acme[0]),
            Some(ACME),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);

    let ids = |page: &Value| -> Vec<String> {
        page["reports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let list = |token: &'static str, query: &str| {
        let path = format!("/v1/reports?{query}");
        let (s, get) = (&s, get.clone());
        async move {
            let (status, _, body) = s.call(get, &path, Some(token), None).await?;
            anyhow::Ok((status, body))
        }
    };

    // Newest first, only the caller's.
    let (status, all) = list(ACME, "").await?;
    assert_eq!(status, StatusCode::OK, "{all}");
    let newest_first: Vec<String> = acme.iter().rev().cloned().collect();
    assert_eq!(ids(&all), newest_first);
    assert!(all.get("next_cursor").is_none(), "{all}");
    assert_eq!(all["reports"][0]["template"], "persona-panel");
    assert_eq!(all["reports"][1]["template"], "startup-report");
    assert_eq!(
        all["reports"][1]["jobs"].as_u64().map(|j| j > 1),
        Some(true)
    );
    let (_, theirs) = list(GLOBEX, "").await?;
    assert_eq!(ids(&theirs), [other]);

    // Filters.
    let (_, panels) = list(ACME, "template=persona-panel").await?;
    assert_eq!(
        ids(&panels),
        [acme[3].clone(), acme[1].clone(), acme[0].clone()]
    );
    let (_, cancelled) = list(ACME, "status=cancelled").await?;
    assert_eq!(ids(&cancelled), [acme[0].clone()]);
    let created = all["reports"][1]["created_at"]
        .as_u64()
        .context("created_at")?;
    let (_, recent) = list(ACME, &format!("since={created}")).await?;
    assert_eq!(ids(&recent), [acme[3].clone(), acme[2].clone()]);

    // Pages of two: every report once, in order.
    let (_, first) = list(ACME, "limit=2").await?;
    assert_eq!(ids(&first), newest_first[..2]);
    let cursor = first["next_cursor"].as_str().context("next_cursor")?;
    let (_, second) = list(ACME, &format!("limit=2&cursor={cursor}")).await?;
    assert_eq!(ids(&second), newest_first[2..]);

    // Bad parameters name themselves.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=yesterday", "cursor"),
        ("status=lost", "status"),
        ("since=-1", "since"),
    ] {
        let (status, err) = list(ACME, query).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {err}");
        assert_eq!(error_of(&err).1, Some(field), "{query}: {err}");
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_routes_need_an_admin_token_and_name_what_is_wrong() -> Result<()> {
    let s = Stack::start(Options {
        env: vec![("FANOUT_API_TOKENS", format!("{TOKENS},{OPS}=ops:admin"))],
        ..Options::default()
    })
    .await?;
    for path in ["/v1/status", "/v1/dead-letters", "/v1/webhooks/dead"] {
        let (status, _, body) = s.call(reqwest::Method::GET, path, Some(ACME), None).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("admin token")
        );
        let (status, _, _) = s.call(reqwest::Method::GET, path, None, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _, body) = s.call(reqwest::Method::GET, path, Some(OPS), None).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // A report submitted with no worker alive is accepted, with a warning saying so.
    let (status, _, accepted) = s
        .call(
            reqwest::Method::POST,
            "/v1/reports",
            Some(ACME),
            Some(&panel(2, None)),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert!(
        accepted["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("no worker is alive"),
        "{accepted}"
    );
    let (_, _, st) = s
        .call(reqwest::Method::GET, "/v1/status", Some(OPS), None)
        .await?;
    assert_eq!(st["lanes"][0]["lane"], "interactive", "{st}");
    assert!(st["lanes"][0]["ready"].as_u64() >= Some(2), "{st}");
    assert_eq!(st["workers"], json!([]), "{st}");
    assert!(
        st["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("no worker"),
        "{st}"
    );
    // The admin lists another tenant's reports; a tenant may not.
    let (status, _, list) = s
        .call(
            reqwest::Method::GET,
            "/v1/reports?tenant=acme",
            Some(OPS),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["reports"][0]["id"], accepted["id"], "{list}");
    let (status, _, body) = s
        .call(
            reqwest::Method::GET,
            "/v1/reports?tenant=acme",
            Some(GLOBEX),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["field"], "tenant");
    // The admin may read any report; the other tenant still may not.
    let path = format!("/v1/reports/{}", accepted["id"].as_str().context("id")?);
    let (status, _, _) = s.call(reqwest::Method::GET, &path, Some(OPS), None).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = s
        .call(reqwest::Method::GET, &path, Some(GLOBEX), None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Selections that select nothing, or ids that are not ids, are named.
    let cases = [
        (json!({}), "ids"),
        (json!({"ids": ["../../etc"]}), "ids"),
        (json!({"ids": "interactive:1-0"}), "ids"),
        (json!({"all": "yes"}), "all"),
        (json!({"everything": true}), "everything"),
    ];
    for (body, field) in cases {
        let (status, _, err) = s
            .call(
                reqwest::Method::POST,
                "/v1/dead-letters/replay",
                Some(OPS),
                Some(&body),
            )
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let (status, _, gone) = s
        .call(
            reqwest::Method::DELETE,
            "/v1/dead-letters/interactive:1-0",
            Some(OPS),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(gone["results"][0]["outcome"], "not_found");
    let (status, _, err) = s
        .call(
            reqwest::Method::POST,
            "/v1/webhooks/redeliver",
            Some(OPS),
            Some(&json!({"report_ids": ["a/b"]})),
        )
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["field"], "report_ids");
    s.shutdown().await;
    Ok(())
}
