//! The lane on the provider's Batch API, with real processes: `fanout sim` (whose Files and
//! Batch APIs run a batch in `batch_turnaround_secs` × time scale), `fanout worker`s and a
//! `fanout aggregator`, driven through the `fanout` CLI.

use std::time::{Duration, Instant};

use fanout_system_tests::{Cluster, ClusterSpec, section};
use serde_json::Value;

fn cluster(spec: ClusterSpec) -> Cluster {
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    Cluster::start(spec)
}

const PANEL: &str = "config/examples/persona-panel.json";

/// The simulator's time scale: a live call of a few provider seconds takes a few ms.
const SCALE: f64 = 0.004;

/// A cluster whose batches take `turnaround` of real time, gathered for 300 ms and polled
/// every 200 ms, with `env` on top.
fn spec(turnaround: Duration, workers: usize, env: &[(&str, &str)]) -> ClusterSpec {
    let provider_secs = turnaround.as_secs_f64() / SCALE;
    let mut all: Vec<(String, String)> = [
        ("FANOUT_BATCH_API__COLLECT_MS", "300"),
        ("FANOUT_BATCH_API__POLL_MS", "200"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    ClusterSpec {
        workers,
        time_scale: SCALE,
        sim_args: vec!["--batch-turnaround-secs".into(), provider_secs.to_string()],
        env: all,
        ..ClusterSpec::default()
    }
}

/// A panel's inputs with `n` personas (the example's, repeated with numbered names), written to
/// a file in `dir`; `mark` is added to one persona's description.
fn panel_file(dir: &std::path::Path, n: usize, mark: Option<(usize, &str)>) -> String {
    let mut inputs: Value = serde_json::from_str(
        &std::fs::read_to_string(fanout_test_support::workspace_root().join(PANEL)).unwrap(),
    )
    .unwrap();
    let base = inputs["personas"].as_array().unwrap().clone();
    let personas: Vec<Value> = (0..n)
        .map(|i| {
            let mut p = base[i % base.len()].clone();
            p["name"] = Value::from(format!("{} #{i}", p["name"].as_str().unwrap()));
            if let Some((at, text)) = mark
                && at == i
            {
                let d = p["description"].as_str().unwrap_or_default();
                p["description"] = Value::from(format!("{d} {text}"));
            }
            p
        })
        .collect();
    inputs["personas"] = Value::from(personas);
    let path = dir.join(format!("panel-{n}-{}.json", uuid_like()));
    std::fs::write(&path, inputs.to_string()).unwrap();
    path.display().to_string()
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Every job of a report document: plain sections and `for_each` items.
fn jobs(report: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for s in report["sections"].as_array().unwrap() {
        match s["items"].as_array() {
            Some(items) => out.extend(items),
            None => out.push(s),
        }
    }
    out
}

fn batches(cluster: &Cluster) -> Value {
    cluster.sim_stats()["batches"].clone()
}

fn count(stats: &Value, field: &str) -> u64 {
    stats[field].as_u64().unwrap_or(0)
}

/// Waits until the simulator's batch stats satisfy `done` (panics after `timeout`).
fn wait_batches(cluster: &Cluster, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + timeout;
    loop {
        let b = batches(cluster);
        if done(&b) {
            return b;
        }
        assert!(Instant::now() < until, "batches never got there: {b}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the lane has an open batch and every one is recorded as submitted.
fn submitted(cluster: &Cluster) -> bool {
    let mut conn = cluster.redis.conn();
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg("{systest:batchapi}:open")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    !ids.is_empty()
        && ids.iter().all(|id| {
            let state: Option<String> = redis::cmd("HGET")
                .arg(format!("{{systest:batchapi}}:batch:{id}"))
                .arg("state")
                .query(&mut conn)
                .unwrap();
            state.as_deref() == Some("submitted")
        })
}

fn status_json(cluster: &Cluster) -> Value {
    let (code, out, err) = cluster.fanout(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits until report `id` is final, and returns its document.
fn wait_final(cluster: &Cluster, id: &str, timeout: Duration) -> Value {
    let until = Instant::now() + timeout;
    loop {
        let report = cluster.report_json(id);
        if report["status"] != "running" {
            return report;
        }
        assert!(
            Instant::now() < until,
            "report {id} still running: {report}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn submit(cluster: &Cluster, input: &str, extra: &[&str]) -> String {
    let mut args = vec!["submit", "--template", "persona-panel", "--input", input];
    args.extend_from_slice(extra);
    let (code, out, err) = cluster.fanout(&args);
    assert_eq!(code, 0, "submit: {err}");
    out.lines().next().unwrap().trim().to_owned()
}

#[test]
fn a_panel_in_batch_mode_completes_in_input_order_at_half_the_price() {
    let cluster = cluster(spec(Duration::from_secs(2), 2, &[]));
    let dir = fanout_system_tests::tempfile::tempdir().unwrap();
    let input = panel_file(dir.path(), 12, None);

    let (code, live_id, err) = cluster.submit_wait("persona-panel", &input, &["--live"]);
    assert_eq!(code, 0, "live panel: {err}");
    let live_calls = cluster.sim_stats()["totals"]["requests"].as_u64();
    let started = Instant::now();
    let (code, batch_id, err) = cluster.submit_wait("persona-panel", &input, &["--batch-api"]);
    assert_eq!(code, 0, "batch panel: {err}");
    let batch_wall = started.elapsed();

    let live = cluster.report_json(&live_id);
    let batch = cluster.report_json(&batch_id);
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["batch_api"], true);
    assert_eq!(live["batch_api"], false);
    // Every section ran in a batch: the personas in one, the summary (which reads them) in
    // the next; no live call was made for it.
    for job in jobs(&batch) {
        assert_eq!(job["batch_api"], true, "{job}");
        assert_eq!(job["state"], "done", "{job}");
    }
    assert_eq!(
        cluster.sim_stats()["totals"]["requests"].as_u64(),
        live_calls,
        "the batch report made no live call"
    );
    let stats = batches(&cluster);
    assert_eq!(count(&stats, "created"), 2, "{stats}");
    assert_eq!(count(&stats, "completed"), 2, "{stats}");
    // In input order, with the same answers as live (the simulator answers a prompt the same
    // way on both endpoints), and the summary saw every critique.
    let items = |r: &Value| section(r, "persona")["items"].as_array().unwrap().clone();
    let (live_items, batch_items) = (items(&live), items(&batch));
    assert_eq!(batch_items.len(), 12);
    for (i, (l, b)) in live_items.iter().zip(&batch_items).enumerate() {
        assert_eq!(b["index"], i);
        assert_eq!(b["item"], l["item"], "item {i} in input order");
        assert_eq!(b["text"], l["text"], "item {i}");
        assert_eq!(b["prompt_tokens"], l["prompt_tokens"]);
    }
    assert_eq!(
        section(&batch, "summary")["text"],
        section(&live, "summary")["text"]
    );
    // Half the price for the same tokens.
    let cost = |r: &Value| r["totals"]["cost"].as_f64().unwrap();
    assert_eq!(
        live["totals"]["total_tokens"],
        batch["totals"]["total_tokens"]
    );
    let ratio = cost(&batch) / cost(&live);
    assert!((ratio - 0.5).abs() < 1e-9, "batch / live cost = {ratio}");
    // The Markdown says which sections ran in a batch.
    assert!(cluster.report_md(&batch_id).contains("batch API"));
    eprintln!(
        "12-persona panel: batch cost {:.6} vs live {:.6}, batch wall {:.1} s (2 batches of 2 s)",
        cost(&batch),
        cost(&live),
        batch_wall.as_secs_f64()
    );
    // Nothing is left in the lane.
    let lane = &status_json(&cluster)["batch_api"];
    assert_eq!(lane["waiting"], 0, "{lane}");
    assert_eq!(lane["open_batches"], 0, "{lane}");
}

#[test]
fn a_worker_killed_while_its_batch_is_in_flight_neither_loses_nor_resubmits_it() {
    let mut cluster = cluster(spec(Duration::from_secs(3), 1, &[]));
    let dir = fanout_system_tests::tempfile::tempdir().unwrap();
    let input = panel_file(dir.path(), 8, None);
    let id = submit(&cluster, &input, &["--batch-api"]);
    // The personas' batch is submitted and running: the only worker dies.
    wait_batches(&cluster, Duration::from_secs(30), |b| {
        count(b, "created") == 1
    });
    // Killed once the worker has recorded the batch as submitted (while a creation is in
    // flight the lane's lease is held for the request's whole timeout, and a takeover would
    // wait that long).
    let until = Instant::now() + Duration::from_secs(30);
    while !submitted(&cluster) {
        assert!(
            Instant::now() < until,
            "the batch was never recorded as submitted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.workers[0].kill();
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart_worker(0, 1);
    let report = wait_final(&cluster, &id, Duration::from_secs(90));
    assert_eq!(report["status"], "completed", "{report}");
    for job in jobs(&report) {
        assert_eq!(job["batch_api"], true, "{job}");
    }
    // The new process picked the batch up where the dead one left it: one file and one batch
    // for the personas, one of each for the summary.
    let stats = batches(&cluster);
    assert_eq!(count(&stats, "files_uploaded"), 2, "{stats}");
    assert_eq!(count(&stats, "created"), 2, "{stats}");
    assert_eq!(count(&stats, "requests_completed"), 9, "{stats}");
}

#[test]
fn a_line_the_batch_failed_is_retried_in_the_next_batch() {
    let cluster = cluster(spec(Duration::from_secs(1), 2, &[]));
    let dir = fanout_system_tests::tempfile::tempdir().unwrap();
    // Persona 3's request fails (500) the first time it is run, and so does the summary's,
    // which quotes persona 3's description.
    let input = panel_file(dir.path(), 6, Some((3, "[sim:fail_first=1]")));
    let (code, id, err) = cluster.submit_wait("persona-panel", &input, &["--batch-api"]);
    assert_eq!(code, 0, "{err}");
    let report = cluster.report_json(&id);
    assert_eq!(report["status"], "completed", "{report}");
    let items = section(&report, "persona")["items"].as_array().unwrap();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["state"], "done", "{item}");
        assert_eq!(item["batch_api"], true, "{item}");
        let attempts = item["attempts"].as_u64().unwrap();
        if i == 3 {
            assert_eq!(attempts, 2, "the failed line ran again: {item}");
        }
    }
    let summary = section(&report, "summary");
    assert_eq!(summary["state"], "done", "{summary}");
    assert_eq!(summary["attempts"], 2, "{summary}");
    // The personas' batch, persona 3's retry, the summary's batch and its retry.
    let stats = batches(&cluster);
    assert_eq!(count(&stats, "created"), 4, "{stats}");
    assert_eq!(count(&stats, "requests_failed"), 2, "{stats}");
}

#[test]
fn a_deadline_a_batch_cannot_meet_falls_back_to_live_calls() {
    // Batches take 60 s; the report must be done 10 s after its submit, and a batch line goes
    // live when its deadline is 5 s away.
    let cluster = cluster(spec(
        Duration::from_secs(60),
        2,
        &[("FANOUT_BATCH_API__LIVE_MARGIN_SECS", "5")],
    ));
    let dir = fanout_system_tests::tempfile::tempdir().unwrap();
    let input = panel_file(dir.path(), 6, None);
    let started = Instant::now();
    let (code, id, err) = cluster.submit_wait(
        "persona-panel",
        &input,
        &["--batch-api", "--deadline-secs", "10"],
    );
    let wall = started.elapsed();
    assert_eq!(code, 0, "{err}");
    let report = cluster.report_json(&id);
    assert_eq!(report["status"], "completed", "{report}");
    assert!(report["deadline_at"].as_u64().is_some(), "{report}");
    for job in jobs(&report) {
        assert_eq!(job["batch_api"], false, "ran live: {job}");
    }
    assert!(
        wall < Duration::from_secs(30),
        "finished without waiting for the batch: {wall:?}"
    );
    // The personas were in a batch first; nothing needed it any more, so it was cancelled.
    let stats = wait_batches(&cluster, Duration::from_secs(20), |b| {
        count(b, "cancelled") == 1
    });
    assert_eq!(count(&stats, "created"), 1, "{stats}");
}

#[test]
fn cancel_drops_a_reports_lines_and_cancels_a_batch_no_other_report_shares() {
    // Lines are gathered for 1.5 s: two reports submitted one after the other share a batch.
    let cluster = cluster(spec(
        Duration::from_secs(20),
        2,
        &[("FANOUT_BATCH_API__COLLECT_MS", "1500")],
    ));
    let dir = fanout_system_tests::tempfile::tempdir().unwrap();
    let input = panel_file(dir.path(), 4, None);

    // Two reports gathered into one batch: cancelling one leaves the batch to the other.
    let first = submit(&cluster, &input, &["--batch-api"]);
    let second = submit(&cluster, &input, &["--batch-api"]);
    wait_batches(&cluster, Duration::from_secs(30), |b| {
        count(b, "created") == 1
    });
    let (code, _, err) = cluster.fanout(&["cancel", &first]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(&batches(&cluster), "cancelled"),
        0,
        "shared batch kept"
    );

    // A report alone in its batch: cancelling it cancels the batch.
    let third = submit(&cluster, &input, &["--batch-api"]);
    wait_batches(&cluster, Duration::from_secs(30), |b| {
        count(b, "created") == 2
    });
    let (code, _, err) = cluster.fanout(&["cancel", &third]);
    assert_eq!(code, 0, "{err}");
    wait_batches(&cluster, Duration::from_secs(30), |b| {
        count(b, "cancelled") == 1
    });

    // The second report completes from the shared batch; the cancelled ones stay cancelled,
    // with nothing of theirs completed.
    let report = wait_final(&cluster, &second, Duration::from_secs(90));
    assert_eq!(report["status"], "completed", "{report}");
    for id in [&first, &third] {
        let report = cluster.report_json(id);
        assert_eq!(report["status"], "cancelled", "{report}");
        assert_eq!(report["totals"]["done"], 0, "{report}");
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let lane = status_json(&cluster)["batch_api"].clone();
        if lane["waiting"] == 0 && lane["open_batches"] == 0 {
            break;
        }
        assert!(Instant::now() < until, "lane not emptied: {lane}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_provider_queue_limit_below_the_configured_one_is_learnt_and_the_report_completes() {
    // The configuration says 2,000,000 enqueued tokens (the default); the provider allows
    // 10,000: about seven personas' requests (prompt + max_tokens), or the summary's. Its
    // refusal lowers the limit; lines wait for room.
    let mut spec = spec(Duration::from_secs(1), 2, &[]);
    spec.sim_args
        .extend(["--batch-queue-tokens".to_owned(), "10000".to_owned()]);
    let cluster = cluster(spec);
    let dir = fanout_system_tests::tempfile::tempdir().unwrap();
    let input = panel_file(dir.path(), 10, None);
    let (code, id, err) = cluster.submit_wait("persona-panel", &input, &["--batch-api"]);
    assert_eq!(code, 0, "{err}");
    let report = cluster.report_json(&id);
    assert_eq!(report["status"], "completed", "{report}");
    for job in jobs(&report) {
        assert_eq!(job["batch_api"], true, "{job}");
        assert_eq!(
            job["attempts"], 1,
            "a refused batch spends no attempt: {job}"
        );
    }
    let stats = batches(&cluster);
    assert!(count(&stats, "failed") >= 1, "{stats}");
    assert!(count(&stats, "completed") >= 3, "{stats}");
}
