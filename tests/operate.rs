//! Operating a running system without redis-cli: the workers alive and what a killed one
//! held, dead letters replayed to completion, and the remote CLI with tokens and roles.

use std::time::{Duration, Instant};

use fanout_system_tests::{Cluster, ClusterSpec, http_get_as, section};
use fanout_test_support::{FanoutProcess, free_port, run_fanout, wait_for_port, wait_until};

const PANEL: &str = "config/examples/persona-panel.json";
const ADMIN: &str = "admin-token-0123456789";
const ACME: &str = "acme-token-0123456789ab";

/// A cluster with an API process; the visibility timeout is 30 s, so anything faster than that
/// is the worker registry's doing.
fn cluster(workers: usize, extra_env: &[(&str, &str)]) -> (Cluster, FanoutProcess, String) {
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let mut env: Vec<(String, String)> = vec![
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS".into(), "30".into()),
        (
            "FANOUT_API_TOKENS".into(),
            format!("{ADMIN}=ops:admin,{ACME}=acme"),
        ),
    ];
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let cluster = Cluster::start(ClusterSpec {
        workers,
        // Room for the whole panel on either worker: a job taken over from a killed worker
        // starts at once, so its start time measures the takeover, not a wait for a slot.
        concurrency: 24,
        // A persona critique takes about 0.5 s: long enough to kill a worker mid-call.
        time_scale: 0.02,
        env,
        ..ClusterSpec::default()
    });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // The API holds no provider key: what it shows of the budget comes from Redis.
    let api_env: Vec<(String, String)> = cluster
        .env
        .iter()
        .filter(|(k, _)| k != "OPENAI_API_KEY")
        .cloned()
        .collect();
    let api = FanoutProcess::start("api", &["api", "--listen", &listen], &api_env);
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "fanout api did not listen"
    );
    (cluster, api, format!("http://{listen}"))
}

/// `fanout --api URL [--token T] <args>` from a machine without Redis access.
fn remote(api: &str, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--api", api];
    if let Some(t) = token {
        all.extend(["--token", t]);
    }
    all.extend_from_slice(args);
    // No REDIS_URL: everything goes through the API.
    run_fanout(&all, &[])
}

fn status(api: &str) -> serde_json::Value {
    let (code, out, err) = remote(api, Some(ADMIN), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("status json")
}

fn worker_pids(api: &str) -> Vec<u64> {
    status(api)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect()
}

fn submit_panel(api: &str) -> String {
    let (code, out, err) = remote(
        api,
        Some(ACME),
        &["submit", "--template", "persona-panel", "--input", PANEL],
    );
    assert_eq!(code, 0, "{err}");
    out.lines().next().unwrap().trim().to_owned()
}

/// Wait until a worker holds jobs, by the registry's count; its index in `cluster.workers`.
fn busy_worker(api: &str, cluster: &Cluster) -> usize {
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = status(api);
            found = s["workers"].as_array().unwrap().iter().find_map(|w| {
                let pid = w["pid"].as_u64()?;
                (w["in_flight"].as_u64() > Some(0)).then_some(pid)
            });
            found.is_some()
        }),
        "no worker ran a job"
    );
    let pid = found.unwrap();
    cluster
        .workers
        .iter()
        .position(|w| u64::from(w.pid()) == pid)
        .expect("a worker of this cluster")
}

#[test]
fn a_killed_worker_leaves_status_within_its_ttl_and_its_jobs_run_elsewhere_at_once() {
    let (mut cluster, _api, api) = cluster(2, &[]);
    let pids: Vec<u64> = cluster.workers.iter().map(|w| u64::from(w.pid())).collect();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut seen = worker_pids(&api);
            seen.sort_unstable();
            let mut want = pids.clone();
            want.sort_unstable();
            seen == want
        }),
        "both workers registered: {:?}",
        status(&api)["workers"]
    );
    let id = submit_panel(&api);
    let victim = busy_worker(&api, &cluster);
    cluster.workers[victim].kill();
    let killed = Instant::now();
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        wait_until(Duration::from_secs(5), || !worker_pids(&api)
            .contains(&pids[victim])),
        "the killed worker is still listed after 5 s"
    );
    let gone_after = killed.elapsed();
    let (code, out, err) = remote(&api, Some(ACME), &["watch", &id]);
    let finished_after = killed.elapsed();
    assert_eq!(code, 0, "{out}\n{err}");
    let report: serde_json::Value = {
        let (code, out, err) = remote(&api, Some(ACME), &["report", &id, "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    assert_eq!(report["status"], "completed");
    // The killed worker's calls ran again on the other one well before the 30 s visibility
    // timeout (the whole rest of the panel included).
    assert!(
        finished_after < Duration::from_secs(20),
        "finished {finished_after:?} after the kill (gone from status after {gone_after:?})"
    );
    let items = section(&report, "persona")["items"].as_array().unwrap();
    assert!(
        items.iter().any(|i| i["attempts"].as_u64() >= Some(2)),
        "{items:?}"
    );
    // Every section the killed worker held started again on the other one within 5 s of the
    // kill: the second `section.started` of a job, from the report's event stream.
    let port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    let (code, events) = http_get_as(port, &format!("/v1/reports/{id}/events"), ACME);
    assert_eq!(code, 200, "{events}");
    let mut starts: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for line in events.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let Ok(e) = serde_json::from_str::<serde_json::Value>(data.trim()) else {
            continue;
        };
        if e["kind"] == "section.started" {
            starts
                .entry(e["job_id"].as_str().unwrap_or("").to_owned())
                .or_default()
                .push(e["ts"].as_u64().unwrap_or(0));
        }
    }
    let restarts: Vec<u64> = starts
        .values()
        .filter(|ts| ts.len() >= 2)
        .map(|ts| ts[1].saturating_sub(killed_ms))
        .collect();
    assert!(
        !restarts.is_empty(),
        "no job of the killed worker ran again: {starts:?}"
    );
    let slowest = restarts.iter().max().copied().unwrap_or(0);
    assert!(
        slowest <= 5_000,
        "the killed worker's jobs started again {restarts:?} ms after the kill"
    );
    // The budget the workers used, as the API (which has no provider key) sees it.
    let budget = status(&api)["budget"].clone();
    assert!(
        budget
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["key"] == "default" && b["requests_last_minute"].as_f64() > Some(0.0)),
        "{budget}"
    );
    eprintln!(
        "killed worker: gone from status after {gone_after:?}; its {} jobs started again {restarts:?} ms after the kill; report completed {finished_after:?} after it",
        restarts.len()
    );
}

#[test]
fn a_dead_letter_is_listed_replayed_to_completion_and_a_second_replay_does_nothing() {
    // One delivery allowed: the jobs a killed worker held are dead-lettered, not retried.
    let (mut cluster, _api, api) = cluster(2, &[("FANOUT_QUEUE__MAX_DELIVERIES", "1")]);
    assert!(wait_until(Duration::from_secs(10), || worker_pids(&api)
        .len()
        == 2));
    let id = submit_panel(&api);
    let victim = busy_worker(&api, &cluster);
    cluster.workers[victim].kill();

    // The report finishes without the killed worker's sections.
    let (code, _, _) = remote(&api, Some(ACME), &["watch", &id]);
    assert_ne!(code, 0, "sections were lost to the kill");
    let (code, out, err) = remote(&api, Some(ADMIN), &["dead", "list", "--report", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("delivery limit: worker died 1 times"), "{out}");
    assert!(out.contains(&format!("report {id}")), "{out}");
    let ids: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("interactive:"))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert!(!ids.is_empty(), "{out}");

    // Only an admin sees or replays dead letters; a tenant's token is refused.
    let (code, _, err) = remote(&api, Some(ACME), &["dead", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("admin token"), "{err}");
    let (code, _, err) = remote(&api, None, &["reports"]);
    assert_ne!(code, 0);
    assert!(err.contains("--token"), "{err}");

    let (code, out, err) = remote(&api, Some(ADMIN), &["dead", "replay", "--report", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches(": replayed").count(), ids.len(), "{out}");
    let (code, _, err) = remote(&api, Some(ACME), &["watch", &id]);
    assert_eq!(code, 0, "the replayed sections completed the report: {err}");
    let (code, out, _) = remote(&api, Some(ACME), &["report", &id, "--format", "json"]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["status"], "completed");

    // Replaying the same letters again finds nothing: each ran once more, not twice.
    let mut args = vec!["dead", "replay"];
    args.extend(ids.iter().map(String::as_str));
    let (code, out, _) = remote(&api, Some(ADMIN), &args);
    assert_ne!(code, 0);
    assert_eq!(out.matches("not found").count(), ids.len(), "{out}");
    let (code, out, _) = remote(&api, Some(ADMIN), &["dead", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("no dead letters"), "{out}");
    // The admin sees acme's reports; acme does not see another tenant's.
    let (code, out, err) = remote(&api, Some(ADMIN), &["reports", "--tenant", "acme"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");
    let (code, _, err) = remote(&api, Some(ACME), &["reports", "--tenant", "ops"]);
    assert_ne!(code, 0);
    assert!(err.contains("admin"), "{err}");
}

#[test]
fn with_no_worker_alive_submit_and_status_warn_and_the_work_waits() {
    let (_cluster, _api, api) = cluster(0, &[]);
    let (code, out, err) = remote(
        &api,
        Some(ACME),
        &["submit", "--template", "persona-panel", "--input", PANEL],
    );
    assert_eq!(code, 0, "accepted anyway: {err}");
    assert!(!out.trim().is_empty());
    assert!(err.contains("warning: no worker is alive"), "{err}");
    let s = status(&api);
    assert!(
        s["warnings"][0]
            .as_str()
            .unwrap()
            .contains("no worker is alive"),
        "{s}"
    );
    assert!(s["workers"].as_array().unwrap().is_empty());
}
