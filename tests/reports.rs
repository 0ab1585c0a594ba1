//! Whole-system report scenarios: `fanout sim`, two `fanout worker` processes and a
//! `fanout aggregator`, driven through the `fanout` CLI like a user would.

use fanout_system_tests::{Cluster, ClusterSpec, answer_hash, refs, section};

/// A cluster of real processes running the `fanout` binary cargo built for this test run.
fn cluster(spec: ClusterSpec) -> Cluster {
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    Cluster::start(spec)
}

const STARTUP: &str = "config/examples/startup-report.json";
const PANEL: &str = "config/examples/persona-panel.json";

#[test]
fn startup_report_completes_in_template_order_with_dependencies_respected() {
    let cluster = cluster(ClusterSpec::default());
    let (code, id, err) = cluster.submit_wait("startup-report", STARTUP, &[]);
    assert_eq!(code, 0, "submit --wait: {err}");
    let report = cluster.report_json(&id);
    assert_eq!(report["status"], "completed");
    let ids: Vec<&str> = report["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["section"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "profile",
            "research",
            "recommendations",
            "financial",
            "risk",
            "competitive",
            "market",
            "metrics",
            "validation",
            "risk_priority"
        ]
    );
    let text = |id: &str| section(&report, id)["text"].as_str().unwrap().to_owned();
    for id in &ids {
        assert_eq!(section(&report, id)["state"], "done", "{id}");
    }
    // Each dependent was given the text of its inputs (the simulator lists the answers quoted in
    // a prompt); independent sections were given none.
    let profile = answer_hash(&text("profile"));
    let research = answer_hash(&text("research"));
    assert_eq!(refs(&text("research")), std::slice::from_ref(&profile));
    let rec = refs(&text("recommendations"));
    assert!(rec.contains(&profile) && rec.contains(&research), "{rec:?}");
    assert_eq!(refs(&text("risk_priority")), [answer_hash(&text("risk"))]);
    assert!(refs(&text("financial")).is_empty());
    // Each dependent started after its inputs finished.
    let at = |id: &str, field: &str| section(&report, id)[field].as_u64().unwrap();
    assert!(at("research", "started_at") >= at("profile", "finished_at"));
    assert!(at("recommendations", "started_at") >= at("research", "finished_at"));
    // Sections in template order in the Markdown too.
    let md = cluster.report_md(&id);
    let pos = |needle: &str| {
        md.find(needle)
            .unwrap_or_else(|| panic!("{needle} in report"))
    };
    assert!(pos(&profile) < pos(&research));
    let totals = &report["totals"];
    assert!(totals["total_tokens"].as_u64().unwrap() > 0);
    assert!(totals["cost"].as_f64().unwrap() > 0.0);
}

#[test]
fn persona_panel_keeps_input_order_and_the_summary_sees_every_critique() {
    let cluster = cluster(ClusterSpec::default());
    let (code, id, err) = cluster.submit_wait("persona-panel", PANEL, &[]);
    assert_eq!(code, 0, "submit --wait: {err}");
    let report = cluster.report_json(&id);
    let inputs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fanout_test_support::workspace_root().join(PANEL)).unwrap(),
    )
    .unwrap();
    let personas = inputs["personas"].as_array().unwrap();
    let items = section(&report, "persona")["items"].as_array().unwrap();
    assert_eq!(items.len(), personas.len());
    let mut hashes = Vec::new();
    for (i, (item, persona)) in items.iter().zip(personas).enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["item"], persona["name"], "item {i} in input order");
        assert_eq!(item["state"], "done");
        hashes.push(answer_hash(item["text"].as_str().unwrap()));
    }
    // The summary quoted every critique, in input order.
    let summary = section(&report, "summary")["text"].as_str().unwrap();
    assert_eq!(refs(summary), hashes);
}

#[test]
fn a_permanently_failing_section_leaves_the_rest_complete_and_marked() {
    let cluster = cluster(ClusterSpec::default());
    let (code, id, err) = cluster.submit_wait(
        "tests/fixtures/flaky-report.toml",
        "tests/fixtures/flaky-inputs.json",
        &[],
    );
    assert_eq!(code, 2, "completed with failures exits 2: {err}");
    let report = cluster.report_json(&id);
    assert_eq!(report["status"], "completed_with_failures");
    assert_eq!(section(&report, "intro")["state"], "done");
    let broken = section(&report, "broken");
    assert_eq!(broken["state"], "failed");
    let reason = broken["reason"].as_str().unwrap();
    assert!(
        reason.contains("400"),
        "the provider's status in the reason: {reason}"
    );
    // A fatal error is not retried.
    assert_eq!(broken["attempts"], 1);
    let after = section(&report, "after_broken");
    assert_eq!(after["state"], "skipped");
    assert!(after["reason"].as_str().unwrap().contains("broken"));
    assert_eq!(section(&report, "tolerant")["state"], "done");
    let md = cluster.report_md(&id);
    assert!(md.contains(reason) || md.contains("failed"), "{md}");
    let stats = cluster.sim_stats();
    assert_eq!(
        stats["totals"]["client_errors"], 1,
        "one provider call for the fatal section"
    );
}

#[test]
fn a_repeated_submit_with_the_same_idempotency_key_returns_the_same_report() {
    let cluster = cluster(ClusterSpec::default());
    let (code, first, err) = cluster.submit_wait(
        "startup-report",
        STARTUP,
        &["--idempotency-key", "order-42"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, second, err) = cluster.submit_wait(
        "startup-report",
        STARTUP,
        &["--idempotency-key", "order-42"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(first, second);
    let stats = cluster.sim_stats();
    assert_eq!(stats["totals"]["completed"], 10, "the report ran once");
    // One report, listed once.
    let (code, out, err) = cluster.fanout(&["ls", "--status", "completed"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with(&first)).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(rows[0].contains("startup-report"), "{out}");
    let (code, _, err) = cluster.fanout(&["ls", "--status", "lost"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a status"), "{err}");
    // The operator's view: lanes (nothing left), the budget that ran it, the webhook outbox.
    let (code, out, err) = cluster.fanout(&["status"]);
    assert_eq!(code, 0, "{err}");
    let lane = out
        .lines()
        .find(|l| l.starts_with("interactive"))
        .unwrap_or_else(|| panic!("{out}"));
    let numbers: Vec<&str> = lane.split_whitespace().skip(1).take(4).collect();
    assert_eq!(numbers, ["0", "0", "0", "0"], "{out}");
    assert!(out.lines().any(|l| l.starts_with("default/")), "{out}");
    assert!(out.contains("webhooks: 0 in the outbox, 0 dead"), "{out}");
}

#[test]
fn invalid_templates_and_inputs_are_rejected_with_the_problem_named_and_nothing_written() {
    let cluster = cluster(ClusterSpec {
        workers: 0,
        ..ClusterSpec::default()
    });
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "submit",
                "--template",
                "no-such-template",
                "--input",
                STARTUP,
            ],
            "unknown template `no-such-template`",
        ),
        (
            &[
                "submit",
                "--template",
                "startup-report",
                "--input",
                "tests/fixtures/startup-missing-idea.json",
            ],
            "inputs.idea",
        ),
        (
            &[
                "submit",
                "--template",
                "startup-report",
                "--input",
                "tests/fixtures/startup-unknown-field.json",
            ],
            "inputs.founder: is not an input of this template",
        ),
        (
            &[
                "submit",
                "--template",
                "tests/fixtures/cyclic.toml",
                "--input",
                "tests/fixtures/flaky-inputs.json",
            ],
            "cycle",
        ),
        (
            &[
                "submit",
                "--template",
                "startup-report",
                "--input",
                "tests/fixtures/nope.json",
            ],
            "cannot read --input",
        ),
        (
            &[
                "submit",
                "--template",
                "startup-report",
                "--input",
                "tests/fixtures/cyclic.toml",
            ],
            "not valid JSON",
        ),
        (
            &[
                "submit",
                "--template",
                "startup-report",
                "--input",
                STARTUP,
                "--callback-url",
                "http://127.0.0.1:9/hook",
            ],
            "field `callback_url`",
        ),
    ];
    for (args, expected) in cases {
        let (code, out, err) = cluster.fanout(args);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(out.is_empty(), "no report id printed for {args:?}: {out}");
        assert!(
            err.contains(expected),
            "{args:?}: expected `{expected}` in: {err}"
        );
    }
    let mut conn = cluster.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    // The aggregator's (empty) notification stream exists from its start; nothing else may.
    let written: Vec<&String> = keys.iter().filter(|k| *k != "{systest}:events").collect();
    assert!(written.is_empty(), "nothing written: {written:?}");
}

#[test]
fn a_worker_killed_mid_report_loses_nothing() {
    // Slow enough that the kill lands while calls are in flight.
    let mut cluster = cluster(ClusterSpec {
        time_scale: 0.02,
        ..ClusterSpec::default()
    });
    let (code, out, err) =
        cluster.fanout(&["submit", "--template", "persona-panel", "--input", PANEL]);
    assert_eq!(code, 0, "{err}");
    let id = out.lines().next().unwrap().trim().to_owned();
    std::thread::sleep(std::time::Duration::from_millis(300));
    cluster.workers[0].kill();
    let (code, out, err) = cluster.fanout(&["watch", &id]);
    assert_eq!(
        code, 0,
        "the report completes on the surviving worker: {err}"
    );
    // Piped, `watch` still ends with the final lines: one per persona and the summary.
    assert!(
        out.lines().any(|l| l.starts_with("persona[0] done")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{id} completed"))),
        "{out}"
    );
    let report = cluster.report_json(&id);
    assert_eq!(report["status"], "completed");
    let items = section(&report, "persona")["items"].as_array().unwrap();
    assert!(items.iter().all(|i| i["state"] == "done"));
}
