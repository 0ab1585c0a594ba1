//! The Grafana dashboard and the alert rules against a real Prometheus (Debian's `prometheus`
//! package, installed by scripts/install-deps.sh) scraping the API, two workers and the
//! aggregator every second. After a short mixed run — 429s, a retried 500, a failed section, a
//! dead letter, a cache hit, a webhook, a tenant held to its budget share — every query of
//! `deploy/grafana/fanout.json` returns data, each of those events shows in the series its
//! panels read, and every rule of `deploy/prometheus/rules` evaluates without error.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fanout_system_tests::{Cluster, ClusterSpec, http_get};
use fanout_test_support::{FanoutProcess, free_port, run_fanout, wait_for_port, wait_until};
use serde_json::Value;

const TOKEN: &str = "dashboard-acme-token-0123";

/// A template with a section for each outcome: answers, a 500 then an answer, a 400 (the
/// section fails), a call that never answers (the job times out until it is dead-lettered),
/// and a dated model name (budget metrics are per model family).
const MIX: &str = r#"name = "dash-mix"
title = "Dashboard mix"
description = "Test fixture: a section for each outcome a panel shows."

[[inputs]]
name = "topic"
kind = "string"
required = true

[[sections]]
id = "flaky"
title = "Flaky"
prompt = "One line on {{ inputs.topic }}. [sim:fail_first=1]"
max_tokens = 40

[[sections]]
id = "broken"
title = "Broken"
prompt = "One line on {{ inputs.topic }}. [sim:error=400]"
max_tokens = 40

[[sections]]
id = "hang"
title = "Hang"
prompt = "One line on {{ inputs.topic }}. [sim:hang]"
max_tokens = 40

[[sections]]
id = "dated"
title = "Dated model"
model = "gpt-4o-mini-2024-07-18"
prompt = "One line on {{ inputs.topic }}, from a dated model."
max_tokens = 40
"#;

/// A template whose answers are cached: the second identical report is served from the cache.
const CACHED: &str = r#"name = "dash-cached"
title = "Dashboard cached"
description = "Test fixture: one cached section."
cache = true

[[inputs]]
name = "topic"
kind = "string"
required = true

[[sections]]
id = "cached"
title = "Cached"
prompt = "One line on {{ inputs.topic }}."
max_tokens = 40
"#;

/// A `prometheus` server on a free loopback port, with its config, rules and data in a
/// temporary directory. Killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrape every `(job, port)` each second and evaluate `rules` each second.
    fn start(targets: &[(&str, Vec<u16>)], rules: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\nscrape_configs:\n",
        );
        for (job, ports) in targets {
            let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        // A port can be taken between probing and binding; try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(prometheus_path())
                .arg(format!(
                    "--config.file={}/prometheus.yml",
                    dir.path().display()
                ))
                .arg(format!("--storage.tsdb.path={}/data", dir.path().display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log.try_clone().unwrap())
                .spawn()
                .expect("run prometheus (scripts/install-deps.sh installs Debian's package)");
            let ready = wait_until(Duration::from_secs(20), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || (std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                        && http_get(port, "/-/ready").0 == 200)
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                return Self {
                    child,
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "prometheus did not start:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }

    /// `GET path` on the HTTP API, as JSON; panics unless the answer is `"status": "success"`.
    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, path);
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus {path}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "prometheus {path}: {body}");
        v["data"].clone()
    }

    /// An instant query, now.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// A range query from `start` to now, one point per `step_secs` (what a Grafana panel sends).
    fn query_range(&self, expr: &str, start: f64, step_secs: u32) -> Vec<Value> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={:.3}&step={step_secs}",
            encode(expr),
            unix_now()
        ));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of an instant query that returns one number (0 when it returns nothing).
    fn value(&self, expr: &str) -> f64 {
        self.query(expr)
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_path() -> PathBuf {
    std::env::var_os("PROMETHEUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("prometheus"))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Percent-encoding of a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Poll `check` every 200 ms (each poll queries Prometheus) until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a query result holds at least one number (a panel draws nothing for NaN).
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|series| {
        let values = match series.get("values") {
            Some(v) => v.as_array().cloned().unwrap_or_default(),
            None => vec![series["value"].clone()],
        };
        values
            .iter()
            .any(|v| v[1].as_str().is_some_and(|x| x != "NaN"))
    })
}

/// One query of the dashboard: where it is shown, its PromQL, and whether Grafana sends it as
/// an instant query.
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
    instant: bool,
}

/// Every query of every panel (rows included), and the template variables' queries.
fn dashboard() -> (Vec<PanelQuery>, Vec<(String, String)>, Value) {
    let path = fanout_test_support::workspace_root().join("deploy/grafana/fanout.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(expr) = t["expr"].as_str() else {
                    continue;
                };
                out.push(PanelQuery {
                    panel: p["title"].as_str().unwrap_or("?").to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: expr.to_owned(),
                    instant: t["instant"].as_bool().unwrap_or(false)
                        && !t["range"].as_bool().unwrap_or(false),
                });
            }
        }
    }
    let mut queries = Vec::new();
    walk(&d["panels"], &mut queries);
    let variables = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_default();
            (v["name"].as_str().unwrap().to_owned(), q.to_owned())
        })
        .collect();
    (queries, variables, d["templating"].clone())
}

/// `expr` as Grafana sends it: a 1 s data source interval and step, so `$__interval` is 1s
/// and `$__rate_interval` max(interval + scrape interval, 4 × scrape interval) = 4s; every
/// template variable at its default, "All", which the dashboard sends as its `allValue`.
fn grafana_expr(expr: &str, templating: &Value) -> String {
    let mut e = expr
        .replace("$__rate_interval", "4s")
        .replace("${__rate_interval}", "4s")
        .replace("$__interval", "1s")
        .replace("${__interval}", "1s")
        .replace("$__range", "5m")
        .replace("${__range}", "5m");
    for v in templating["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let all = v["allValue"].as_str().unwrap_or(".*");
        e = e
            .replace(&format!("${{{name}}}"), all)
            .replace(&format!("${name}"), all);
    }
    assert!(!e.contains('$'), "a variable this test does not know: {e}");
    e
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A webhook receiver on loopback: answers 200 to every POST; returns its port and the number
/// of deliveries so far.
fn receiver() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let l = line.trim_end().to_ascii_lowercase();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            count.fetch_add(1, Ordering::SeqCst);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

#[test]
fn every_dashboard_panel_and_alert_rule_has_data_after_a_mixed_run() {
    let started = Instant::now();
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates).unwrap();
    write(&templates, "dash-mix.toml", MIX);
    write(&templates, "dash-cached.toml", CACHED);
    let topic = write(dir.path(), "topic.json", r#"{"topic": "tide pools"}"#);
    // A capped tenant: its calls wait for its share first (the tenant-wait panel).
    let config = write(dir.path(), "fanout.toml", "[budget_tenants]\nacme = 0.5\n");
    let env: Vec<(String, String)> = [
        // Told ten times what the provider allows, and the provider advertises nothing: the
        // first burst earns 429s, which pause the budget and lower its rate.
        ("REQUESTS_PER_MINUTE", "2400"),
        ("TOKENS_PER_MINUTE", "100000000"),
        ("FANOUT_BUDGET__ADAPTIVE_QUIET_SECS", "1"),
        ("FANOUT_API_TOKENS", &format!("{TOKEN}=acme")),
        ("FANOUT_WEBHOOKS__ALLOW_HOSTS", "127.0.0.0/8"),
        ("FANOUT_REPORTS__TEMPLATES_DIR", templates.to_str().unwrap()),
        // The call that never answers holds its job until the job times out; two attempts,
        // then the job is dead-lettered. Budget waits give up well before that.
        ("FANOUT_WORKER__JOB_TIMEOUT_SECS", "3"),
        ("FANOUT_QUEUE__MAX_ATTEMPTS", "2"),
        ("FANOUT_BUDGET__MAX_WAIT_SECS", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 8,
        // A call takes about half a second: jobs are in flight while Prometheus scrapes.
        time_scale: 0.02,
        sim_args: ["--rpm", "120", "--tpm", "100000000", "--no-rate-headers"]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        env,
        config: Some(PathBuf::from(&config)),
        ..ClusterSpec::default()
    });
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let _api = FanoutProcess::start(
        "api",
        &["--config", &config, "api", "--listen", &listen],
        &cluster.env,
    );
    let api = format!("http://{listen}");
    for port in cluster.metrics_ports.iter().chain([&api_port]) {
        assert!(wait_for_port(*port, Duration::from_secs(20)), "port {port}");
    }
    let workers = cluster.workers.len();
    let rules = std::fs::read_to_string(
        fanout_test_support::workspace_root().join("deploy/prometheus/rules/fanout.rules.yml"),
    )
    .unwrap();
    // The recording rules run every 30 s in production; here every second, like the alerts.
    assert!(
        rules.contains("interval: 30s"),
        "the recording group's interval"
    );
    let prometheus = Prometheus::start(
        &[
            ("fanout-api", vec![api_port]),
            ("fanout-worker", cluster.metrics_ports[..workers].to_vec()),
            ("fanout-aggregator", vec![cluster.metrics_ports[workers]]),
        ],
        &rules.replace("interval: 30s", "interval: 1s"),
    );
    // Every process is scraped, and the workers are up (they warm their tokenizer first),
    // before anything happens: the series that exist at 0 are recorded at 0 first.
    assert!(
        eventually(Duration::from_secs(30), || {
            prometheus.value("count(up == 1)") == (workers + 2) as f64
                && prometheus.value("sum(fanout_worker_up)") == workers as f64
        }),
        "prometheus scrapes every process: {:?}",
        prometheus.query("up")
    );
    // A few samples at 0 first, as in a cluster that has been up a while.
    std::thread::sleep(Duration::from_secs(2));
    let run_start = unix_now() - 5.0;

    let (hook_port, hooks) = receiver();
    let remote = |args: &[&str]| -> String {
        let mut all = vec!["--api", api.as_str(), "--token", TOKEN];
        all.extend_from_slice(args);
        let (code, out, err) = run_fanout(&all, &[]);
        assert_eq!(code, 0, "fanout {args:?}: {out}\n{err}");
        out.lines().next().unwrap_or_default().trim().to_owned()
    };
    let submit = |template: &str, input: &str, extra: &[&str]| -> String {
        let mut args = vec!["submit", "--template", template, "--input", input];
        args.extend_from_slice(extra);
        remote(&args)
    };
    // A startup report first: its first call learns the budget, so the call that never
    // answers is not the one that does.
    let mut ids = vec![submit(
        "startup-report",
        "config/examples/startup-report.json",
        &[],
    )];
    assert!(
        wait_until(Duration::from_secs(30), || {
            let r = cluster.report_json(&ids[0]);
            r["sections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["state"] == "done")
        }),
        "the first section of the startup report"
    );
    let hook = format!("http://127.0.0.1:{hook_port}/hook");
    let mix = submit("dash-mix", &topic, &["--callback-url", &hook]);
    ids.push(mix.clone());
    ids.push(submit(
        "persona-panel",
        "config/examples/persona-panel.json",
        &[],
    ));
    let cached = submit("dash-cached", &topic, &["--wait"]);
    ids.push(cached);
    // The same request again: answered from the cache.
    ids.push(submit("dash-cached", &topic, &["--wait"]));

    // Every report ends; the mixed one with its failed and dead-lettered sections.
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        let mut status = String::new();
        while Instant::now() < deadline {
            status = cluster.report_json(id)["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if status != "running" {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_ne!(status, "running", "report {id} still running");
    }
    let report = cluster.report_json(&mix);
    assert_eq!(report["status"], "completed_with_failures", "{report}");
    let state = |id: &str| fanout_system_tests::section(&report, id)["state"].clone();
    assert_eq!(state("flaky"), "done", "{report}");
    assert_eq!(state("dated"), "done", "{report}");
    assert_eq!(state("broken"), "failed", "{report}");
    assert_eq!(state("hang"), "failed", "{report}");
    assert!(
        fanout_system_tests::section(&report, "hang")["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("dead-lettered"),
        "{report}"
    );
    let cached = cluster.report_json(ids.last().unwrap());
    assert_eq!(
        fanout_system_tests::section(&cached, "cached")["cached"],
        true,
        "{cached}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || hooks
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0),
        "the webhook was delivered"
    );
    let stats = cluster.sim_stats();
    assert!(
        stats["totals"]["rate_limited"].as_u64().unwrap() > 0,
        "the provider answered 429: {stats}"
    );

    // Each event shows in the series its panels read, as an increase `rate()` sees (the
    // queue gauges are exported every 5 s: give the last values time to be scraped).
    let window = "[5m]";
    let events = [
        (
            "429s",
            format!("sum(increase(fanout_budget_rate_limited_total{window}))"),
        ),
        (
            "shared pauses",
            format!("sum(increase(fanout_budget_pauses_total{window}))"),
        ),
        (
            "429 answers",
            format!("sum(increase(fanout_llm_responses_total{{status=\"429\"}}{window}))"),
        ),
        (
            "retries",
            format!("sum(increase(fanout_jobs_retried_total{window}))"),
        ),
        // Per section and reason, a series is born at its first failure (a worker does not
        // know the sections at start); the reports' series show the failure as an increase.
        (
            "failed sections",
            "sum(fanout_jobs_failed_total)".to_owned(),
        ),
        (
            "reports with failures",
            format!(
                "sum(increase(fanout_reports_finished_total{{status=\"completed_with_failures\"}}{window}))"
            ),
        ),
        (
            "dead letters",
            format!("sum(increase(fanout_jobs_dead_lettered_total{window}))"),
        ),
        (
            "dead letters waiting",
            "max(fanout_queue_depth{state=\"dead\"})".to_owned(),
        ),
        (
            "cache hits",
            format!("sum(increase(fanout_cache_requests_total{{result=\"hit\"}}{window}))"),
        ),
        (
            "webhooks delivered",
            format!("sum(increase(fanout_webhooks_total{{outcome=\"delivered\"}}{window}))"),
        ),
        (
            "tenant share waits",
            format!(
                "sum(increase(fanout_budget_tenant_wait_seconds_count{{tenant=\"acme\"}}{window}))"
            ),
        ),
    ];
    eventually(Duration::from_secs(15), || {
        events.iter().all(|(_, expr)| prometheus.value(expr) > 0.0)
    });
    let mut missing: Vec<String> = events
        .iter()
        .filter(|(_, expr)| prometheus.value(expr) <= 0.0)
        .map(|(what, expr)| format!("{what}: {expr} is 0 or empty"))
        .collect();
    // Budget counters and budget gauges name the same (key, model family), so the panels
    // that divide one by the other find every pair.
    let unmatched = prometheus.query(
        "sum by (key, model) (fanout_budget_admissions_total) > 0 \
         unless on (key, model) fanout_budget_limit_requests_per_minute",
    );
    if !unmatched.is_empty() {
        missing.push(format!(
            "budget counters without a limit gauge: {unmatched:?}"
        ));
    }
    // The dead letter fired its alert (`for: 0m`).
    let firing = |name: &str| {
        prometheus.api("/api/v1/alerts")["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
    };
    if !eventually(Duration::from_secs(10), || firing("FanoutJobsDeadLettered")) {
        missing.push("alert FanoutJobsDeadLettered is not firing".to_owned());
    }

    // Every panel query, as Grafana sends it over the run.
    let (queries, variables, templating) = dashboard();
    assert!(queries.len() > 50, "{} queries", queries.len());
    let mut empty = Vec::new();
    for q in &queries {
        let expr = grafana_expr(&q.expr, &templating);
        let result = if q.instant {
            prometheus.query(&expr)
        } else {
            prometheus.query_range(&expr, run_start, 1)
        };
        if !has_data(&result) {
            empty.push(format!("{} [{}]: {expr}", q.panel, q.ref_id));
        }
    }
    // And every template variable offers values.
    for (name, query) in &variables {
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .unwrap_or_else(|| panic!("variable {name}: {query}"));
        let values = prometheus.api(&format!(
            "/api/v1/label/{}/values?match[]={}&start={run_start:.3}",
            label.trim(),
            encode(selector.trim())
        ));
        if values.as_array().is_none_or(|v| v.is_empty()) {
            empty.push(format!("variable ${name}: {query}"));
        }
    }
    // Every recording rule has data and every rule evaluates without error.
    let groups = prometheus.api("/api/v1/rules")["groups"].clone();
    let mut seen = BTreeSet::new();
    for g in groups.as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap().to_owned();
            if r["health"] != "ok" {
                empty.push(format!(
                    "rule {name}: health {} {}",
                    r["health"], r["lastError"]
                ));
            }
            if r["type"] == "recording" && seen.insert(name.clone()) {
                let result = prometheus.query_range(&name, run_start, 1);
                if !has_data(&result) {
                    empty.push(format!("recording rule {name}"));
                }
            }
        }
    }
    assert!(!seen.is_empty(), "the recording rules were loaded");
    assert!(
        missing.is_empty() && empty.is_empty(),
        "events not in the metrics:\n{}\n\n{} of {} dashboard queries, variables and \
         recording rules without data after the mixed run:\n{}",
        missing.join("\n"),
        empty.len(),
        queries.len() + variables.len() + seen.len(),
        empty.join("\n")
    );
    eprintln!(
        "dashboard: {} panel queries, {} variables, {} recording rules with data; {:.0?} in all",
        queries.len(),
        variables.len(),
        seen.len(),
        started.elapsed()
    );
}
