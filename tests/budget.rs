//! The shared budget against providers we do not configure right: worker processes learn the
//! limits a provider advertises and obey them together, an explicit number caps them, a provider
//! that advertises nothing is found by its 429s, and a request too large for any budget fails
//! alone without holding anything back.

use std::time::Duration;

use fanout_system_tests::{Cluster, ClusterSpec, scrape};
use fanout_test_support::{FanoutProcess, free_port, wait_for_port, wait_until};

fn cluster(spec: ClusterSpec) -> Cluster {
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    Cluster::start(spec)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A persona-panel input file with `n` personas.
fn panel(dir: &tempfile::TempDir, n: usize) -> String {
    let personas: Vec<_> = (0..n)
        .map(|i| serde_json::json!({"name": format!("Persona {i}"), "description": "A careful buyer."}))
        .collect();
    let inputs = serde_json::json!({
        "content": "A landing page for a kitchen stock tracker.",
        "personas": personas,
    });
    let path = dir.path().join(format!("panel-{n}.json"));
    std::fs::write(&path, inputs.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The effective requests-per-minute gauge of the default key, once a worker exports `want`.
fn wait_for_limit(port: u16, want: f64) -> Option<f64> {
    let series = "fanout_budget_limit_requests_per_minute";
    let mut seen = None;
    wait_until(Duration::from_secs(20), || {
        seen = scrape(port, series, &[r#"key="default""#]);
        seen == Some(want)
    });
    seen
}

fn rate_limited(cluster: &Cluster) -> u64 {
    cluster.sim_stats()["totals"]["rate_limited"]
        .as_u64()
        .unwrap()
}

#[test]
fn workers_learn_the_advertised_limits_obey_them_together_and_keep_them_across_restarts() {
    // Nothing configured: the plan's 3,500 RPM is only a start. The provider allows 300.
    let mut cluster = cluster(ClusterSpec {
        workers: 2,
        sim_args: vec!["--rpm".into(), "300".into()],
        ..ClusterSpec::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let input = panel(&dir, 24);
    let (code, id, err) = cluster.submit_wait("persona-panel", &input, &[]);
    assert_eq!(code, 0, "report {id} did not complete: {err}");
    assert_eq!(
        rate_limited(&cluster),
        0,
        "the first answer taught every worker the real limit"
    );
    for port in &cluster.metrics_ports[..2] {
        assert_eq!(wait_for_limit(*port, 300.0), Some(300.0), "worker :{port}");
        assert_eq!(
            scrape(
                *port,
                "fanout_budget_configured_requests_per_minute",
                &[r#"key="default""#]
            ),
            Some(3_500.0)
        );
    }

    // Every worker restarts: the learnt limit is in Redis, before any new job.
    for w in &mut cluster.workers {
        w.kill();
    }
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let _fresh = FanoutProcess::start(
        "worker-fresh",
        &["worker", "--concurrency", "8", "--metrics-addr", &metrics],
        &cluster.env,
    );
    assert!(wait_for_port(port, Duration::from_secs(20)));
    assert_eq!(wait_for_limit(port, 300.0), Some(300.0));
    let (code, id, err) = cluster.submit_wait("persona-panel", &input, &[]);
    assert_eq!(code, 0, "report {id} did not complete: {err}");
    assert_eq!(rate_limited(&cluster), 0);
}

#[test]
fn an_explicit_limit_caps_what_the_provider_advertises() {
    // The key is shared with another app: Fanout may use 240 of the provider's 1,200 RPM.
    let cluster = cluster(ClusterSpec {
        workers: 2,
        sim_args: vec!["--rpm".into(), "1200".into()],
        env: env(&[("REQUESTS_PER_MINUTE", "240")]),
        ..ClusterSpec::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (code, id, err) = cluster.submit_wait("persona-panel", &panel(&dir, 20), &[]);
    assert_eq!(code, 0, "report {id} did not complete: {err}");
    let stats = cluster.sim_stats();
    // 240 RPM is 4 a second; one more may start a few ms ahead of its schedule.
    let busiest = stats["totals"]["max_admitted_1s"].as_u64().unwrap();
    assert!(
        busiest <= 5,
        "{busiest} calls in one second under a 240 RPM cap"
    );
    assert_eq!(stats["totals"]["rate_limited"], 0);
    assert_eq!(wait_for_limit(cluster.metrics_ports[0], 240.0), Some(240.0));
}

#[test]
fn a_provider_that_advertises_nothing_is_found_by_its_429s() {
    // Told 4× the real limit, and the provider says nothing about its limits: the 429s lower the
    // shared rate for both workers, and the panel completes without a flood of them.
    let cluster = cluster(ClusterSpec {
        workers: 2,
        sim_args: vec!["--rpm".into(), "300".into(), "--no-rate-headers".into()],
        env: env(&[
            ("REQUESTS_PER_MINUTE", "1200"),
            ("TOKENS_PER_MINUTE", "100000000"),
            ("FANOUT_BUDGET__ADAPTIVE_QUIET_SECS", "1"),
            ("FANOUT_BUDGET__ADAPTIVE_RECOVERY_SECS", "30"),
        ]),
        ..ClusterSpec::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (code, id, err) = cluster.submit_wait("persona-panel", &panel(&dir, 40), &[]);
    assert_eq!(code, 0, "report {id} did not complete: {err}");
    let stats = cluster.sim_stats();
    let refused = stats["totals"]["rate_limited"].as_u64().unwrap();
    let served = stats["totals"]["completed"].as_u64().unwrap();
    assert_eq!(served, 41, "every call was served once");
    assert!(refused > 0, "the budget was told too much: {stats}");
    assert!(
        refused * 4 <= served,
        "{refused} 429s for {served} answers: the rate did not come down"
    );
    // The rate came down for every process, below what it was told.
    for port in &cluster.metrics_ports[..2] {
        let mut lowered = None;
        wait_until(Duration::from_secs(10), || {
            lowered = scrape(
                *port,
                "fanout_budget_limit_requests_per_minute",
                &[r#"key="default""#],
            );
            lowered.is_some_and(|v| v < 1_200.0)
        });
        assert!(lowered.is_some_and(|v| v < 1_200.0), "{lowered:?}");
    }
}

#[test]
fn a_request_too_large_for_the_provider_fails_alone_and_pauses_nothing() {
    // 6,000 tokens per minute: one section asks for more than that, the others fit.
    let cluster = cluster(ClusterSpec {
        workers: 1,
        sim_args: vec!["--tpm".into(), "6000".into()],
        ..ClusterSpec::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("too-large.toml");
    let mut text = String::from(
        r#"name = "too-large"
title = "Too large"
description = "Test fixture: one section no provider budget can take."

[[inputs]]
name = "topic"
kind = "string"
required = true

[[sections]]
id = "huge"
title = "Huge"
prompt = "Write at length about {{ inputs.topic }}."
max_tokens = 8000
"#,
    );
    for i in 0..6 {
        text.push_str(&format!(
            "\n[[sections]]\nid = \"small{i}\"\ntitle = \"Small {i}\"\nprompt = \"One line on {{{{ inputs.topic }}}} ({i}).\"\nmax_tokens = 40\n"
        ));
    }
    std::fs::write(&template, text).unwrap();
    let input = dir.path().join("inputs.json");
    std::fs::write(&input, r#"{"topic": "tide pools"}"#).unwrap();
    let (code, id, err) =
        cluster.submit_wait(template.to_str().unwrap(), input.to_str().unwrap(), &[]);
    assert_eq!(code, 2, "completed with one failed section: {err}");
    let report = cluster.report_json(&id);
    let huge = fanout_system_tests::section(&report, "huge");
    assert_eq!(huge["state"], "failed");
    let reason = huge["reason"].to_string().to_lowercase();
    assert!(reason.contains("too large"), "{huge}");
    for i in 0..6 {
        let small = fanout_system_tests::section(&report, &format!("small{i}"));
        assert_eq!(small["state"], "done", "{small}");
    }
    // Once the first answer taught the budget 6,000 TPM it fails such a request without a call;
    // sent before that (as the first call), the provider refuses it once. Never retried.
    assert!(rate_limited(&cluster) <= 1);
    let port = cluster.metrics_ports[0];
    assert!(wait_for_port(port, Duration::from_secs(5)));
    let pauses = scrape(port, "fanout_budget_pauses_total", &[]).unwrap_or(0.0);
    assert_eq!(pauses, 0.0, "a fatal 429 paused the budget");
}
