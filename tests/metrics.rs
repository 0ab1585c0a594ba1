//! Operators' view: every process serves Prometheus metrics that move with real work, health
//! and readiness probes, and `promtool check metrics` accepts the output.

use std::time::Duration;

use fanout_system_tests::{Cluster, ClusterSpec, http_get, http_post_json, sample};
use fanout_test_support::{FanoutProcess, wait_for_port, wait_until};

/// A cluster of real processes running the `fanout` binary cargo built for this test run.
fn cluster(spec: ClusterSpec) -> Cluster {
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    Cluster::start(spec)
}

#[test]
fn api_worker_and_aggregator_metrics_exist_move_and_pass_promtool() {
    let cluster = cluster(ClusterSpec::default());
    for port in &cluster.metrics_ports {
        assert!(
            wait_for_port(*port, Duration::from_secs(20)),
            "metrics port {port}"
        );
        assert_eq!(http_get(*port, "/healthz").0, 200);
        assert_eq!(http_get(*port, "/readyz").0, 200);
    }
    // Before any work, the series an alert or a panel needs already exist at 0 (once the
    // worker is up: it warms its tokenizer first).
    assert!(
        fanout_test_support::wait_until(Duration::from_secs(20), || {
            sample(
                &http_get(cluster.metrics_ports[0], "/metrics").1,
                "fanout_worker_up",
                &[],
            ) == Some(1.0)
        }),
        "worker up"
    );
    let worker = http_get(cluster.metrics_ports[0], "/metrics").1;
    for (series, labels) in [
        (
            "fanout_budget_rate_limited_total",
            &["key=\"default\"", "model=\"gpt-4o-mini\""][..],
        ),
        (
            "fanout_budget_pauses_total",
            &["key=\"default\"", "model=\"gpt-4o-mini\""][..],
        ),
        ("fanout_jobs_dead_lettered_total", &["lane=\"batch\""][..]),
        ("fanout_cache_requests_total", &["result=\"hit\""][..]),
    ] {
        assert_eq!(sample(&worker, series, labels), Some(0.0), "{series}");
    }
    let aggregator = http_get(*cluster.metrics_ports.last().unwrap(), "/metrics").1;
    assert_eq!(
        sample(&aggregator, "fanout_webhooks_total", &["outcome=\"dead\""]),
        Some(0.0)
    );
    // A backend service submits over HTTP; the CLI follows the report to the end.
    let api_port = fanout_test_support::free_port();
    let _api = FanoutProcess::start(
        "api",
        &["api", "--listen", &format!("127.0.0.1:{api_port}")],
        &cluster.env,
    );
    assert!(wait_for_port(api_port, Duration::from_secs(20)), "api port");
    let inputs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fanout_test_support::workspace_root().join("config/examples/startup-report.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (status, body) = http_post_json(
        api_port,
        "/v1/reports",
        &serde_json::json!({"template": "startup-report", "inputs": inputs}),
    );
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _, err) = cluster.fanout(&["watch", &id]);
    assert_eq!(code, 0, "{err}");
    let api_metrics = http_get(api_port, "/metrics").1;
    assert_eq!(
        sample(
            &api_metrics,
            "fanout_reports_submitted_total",
            &["template=\"startup-report\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &api_metrics,
            "fanout_jobs_enqueued_total",
            &["section=\"profile\""]
        ),
        Some(1.0)
    );

    let workers: Vec<String> = cluster.metrics_ports[..cluster.workers.len()]
        .iter()
        .map(|p| http_get(*p, "/metrics").1)
        .collect();
    let total = |series: &str, labels: &[&str]| -> f64 {
        workers
            .iter()
            .filter_map(|t| sample(t, series, labels))
            .sum()
    };
    // Ten sections, each started, called once and completed somewhere in the pool.
    assert_eq!(total("fanout_jobs_completed_total", &[]), 10.0);
    assert_eq!(
        total("fanout_jobs_completed_total", &["section=\"profile\""]),
        1.0
    );
    assert_eq!(
        total("fanout_llm_responses_total", &["status=\"200\""]),
        10.0
    );
    assert_eq!(
        total("fanout_budget_admissions_total", &["key=\"default\""]),
        10.0
    );
    assert!(total("fanout_llm_tokens_total", &["direction=\"out\""]) > 0.0);
    assert!(total("fanout_llm_cost_dollars_total", &["model=\"gpt-4o-mini\""]) > 0.0);
    assert_eq!(
        total("fanout_llm_request_duration_seconds_count", &[]),
        10.0
    );
    assert_eq!(
        total("fanout_job_duration_seconds_count", &["outcome=\"done\""]),
        10.0
    );
    assert_eq!(total("fanout_worker_up", &[]), 2.0);
    assert!(
        workers
            .iter()
            .all(|t| t.contains("process_resident_memory_bytes"))
    );
    // Gauges exported every few seconds: queue depth and the budget's limits.
    // Every worker exports them, also one that has not served a job yet (the pool of two
    // may have left all ten to the other).
    for &port in &cluster.metrics_ports[..cluster.workers.len()] {
        let mut text = String::new();
        assert!(
            wait_until(Duration::from_secs(15), || {
                text = http_get(port, "/metrics").1;
                sample(
                    &text,
                    "fanout_budget_limit_requests_per_minute",
                    &["key=\"default\""],
                ) == Some(3500.0)
                    && sample(
                        &text,
                        "fanout_queue_depth",
                        &["lane=\"interactive\"", "state=\"ready\""],
                    ) == Some(0.0)
            }),
            "budget and queue gauges exported; the worker's metrics:\n{text}"
        );
    }
    // The aggregator counts the finished report.
    let aggregator_port = *cluster.metrics_ports.last().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        let text = http_get(aggregator_port, "/metrics").1;
        sample(
            &text,
            "fanout_reports_finished_total",
            &["template=\"startup-report\"", "status=\"completed\""],
        ) == Some(1.0)
            && sample(&text, "fanout_report_duration_seconds_count", &[]) == Some(1.0)
    }));

    // promtool (from Debian's `prometheus` package, installed by scripts/install-deps.sh).
    let aggregator_metrics = http_get(aggregator_port, "/metrics").1;
    for text in workers.iter().chain([&aggregator_metrics, &api_metrics]) {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool on PATH (run scripts/install-deps.sh)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_bad_config_value_stops_a_process_at_start_with_the_key_named() {
    let cluster = cluster(ClusterSpec {
        workers: 0,
        ..ClusterSpec::default()
    });
    let mut env = cluster.env.clone();
    env.push(("FANOUT_BUDGET__PLAN".into(), "gold".into()));
    let (code, _, err) = fanout_test_support::run_fanout(&["worker"], &env);
    assert_ne!(code, 0);
    assert!(
        err.contains("budget.plan") && err.contains("gold") && err.contains("tier1"),
        "{err}"
    );
    let mut env = cluster.env.clone();
    env.retain(|(k, _)| k != "OPENAI_API_KEY");
    let (code, _, err) = fanout_test_support::run_fanout(&["worker"], &env);
    assert_ne!(code, 0);
    assert!(err.contains("OPENAI_API_KEY"), "{err}");
}
