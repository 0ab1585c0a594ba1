//! Fanout on a Redis Cluster with replicas, and a master SIGKILLed mid-run: a replica takes
//! over, no process exits, and every report the API accepted completes. Two failovers per run:
//! the master of the queue's slot, then the master of the namespace's slot (the aggregators'
//! notifications, the idempotency keys, the tenant indexes). After each, the killed node comes
//! back empty and rejoins as a replica, as a restarted pod or a replaced managed node does.
//!
//! Every process runs with `redis.wait_replicas = 1`: the API answers 202, a section's result
//! counts and a job is enqueued only once a replica holds it, so the replica that takes over
//! has it. What a failover loses (asynchronous replication) is the rest: a claim, a start mark,
//! an acknowledgement, a budget admission of the last moment; each is repeated or reclaimed.
//! `make soak` runs it bigger (`FANOUT_SOAK=1`); the `failover:` line has the figures.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fanout_system_tests::{Cluster, ClusterSpec};
use fanout_test_support::{FanoutProcess, free_port, run_fanout, wait_for_port};
use serde_json::Value;

const ADMIN: &str = "failover-admin-token-0123";
const NAMESPACE: &str = "systest";

fn soak() -> bool {
    std::env::var("FANOUT_SOAK").is_ok_and(|v| v == "1")
}

fn env() -> Vec<(String, String)> {
    [
        ("REQUESTS_PER_MINUTE", "1000000"),
        ("TOKENS_PER_MINUTE", "1000000000"),
        ("MAX_CONCURRENT_REQUESTS", "200"),
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "10"),
        ("FANOUT_REDIS__WAIT_REPLICAS", "1"),
        ("FANOUT_API_TOKENS", "failover-admin-token-0123=ops:admin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The hash slot of `key` (CRC16 of its hash tag, as Redis Cluster computes it).
fn slot(cluster: &Cluster, key: &str) -> u16 {
    let mut c = cluster.redis.conn();
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut c)
        .expect("CLUSTER KEYSLOT")
}

/// SIGKILL the master serving `key`'s slot, wait for its replica to take over, then start the
/// killed node again (empty; it rejoins as a replica). Returns the seconds until every slot
/// was served again.
fn fail_over(cluster: &mut Cluster, key: &str) -> f64 {
    let slot = slot(cluster, key);
    let redis = cluster.redis.cluster_mut().expect("a cluster");
    let master = redis.master_of_slot(slot);
    let killed = Instant::now();
    redis.kill_node(master);
    assert!(
        redis.wait_ok(Duration::from_secs(30)),
        "no replica took over slot {slot} within 30 s"
    );
    let took = killed.elapsed().as_secs_f64();
    assert_ne!(redis.master_of_slot(slot), master, "slot {slot} moved");
    redis.restart_node(master);
    took
}

#[test]
fn a_master_killed_mid_run_fails_over_and_every_accepted_report_completes() {
    let per_phase = if soak() { 60 } else { 12 };
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let mut cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 8,
        time_scale: 0.02,
        sim_args: ["--rpm", "1000000", "--tpm", "1000000000"]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        env: env(),
        redis_cluster: Some((1, 1000)),
        ..ClusterSpec::default()
    });
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let mut api_process = FanoutProcess::start("api", &["api", "--listen", &listen], &cluster.env);
    assert!(
        wait_for_port(api_port, Duration::from_secs(20)),
        "api did not listen"
    );
    let api = format!("http://{listen}");

    // A client submits reports one after another, each with an idempotency key, and retries a
    // refused or failed submit with the same key until it is accepted.
    let ids: Mutex<HashMap<String, String>> = Mutex::new(HashMap::new());
    let retries = Mutex::new(0usize);
    let submit = |from: usize, to: usize| {
        for i in from..to {
            let key = format!("failover-{i}");
            let (id, tries) = fanout_system_tests::submit_until_accepted(
                &api,
                ADMIN,
                &key,
                &[],
                Duration::from_secs(60),
                || std::thread::sleep(Duration::from_millis(100)),
            );
            *retries.lock().unwrap() += tries;
            ids.lock().unwrap().insert(key, id);
        }
    };

    let queue_key = format!("{{{NAMESPACE}:queue}}");
    let namespace_key = format!("{{{NAMESPACE}}}");
    let mut failovers = Vec::new();
    for (phase, key) in [&queue_key, &namespace_key].into_iter().enumerate() {
        let from = phase * per_phase;
        std::thread::scope(|s| {
            let client = s.spawn(|| submit(from, from + per_phase));
            // Mid-run: a third of the phase's reports accepted, sections running.
            while ids.lock().unwrap().len() < from + per_phase / 3 && !client.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
            failovers.push(fail_over(&mut cluster, key));
            client.join().expect("client");
        });
    }

    let list: Vec<String> = ids.lock().unwrap().values().cloned().collect();
    let total = 2 * per_phase;
    let mut unique = list.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), total, "one report per idempotency key");

    // Every accepted report completes, every section done.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut pending: Vec<&String> = list.iter().collect();
    let mut reports: HashMap<&String, Value> = HashMap::new();
    while !pending.is_empty() {
        pending.retain(|id| {
            let (code, out, _) = cluster.fanout(&["report", id, "--format", "json"]);
            if code != 0 {
                return true;
            }
            let report: Value = serde_json::from_str(&out).unwrap();
            if report["status"] == "running" {
                return true;
            }
            reports.insert(id, report);
            false
        });
        if !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {total} reports still running or unreadable after 180 s",
                pending.len()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    for (id, report) in &reports {
        assert_eq!(report["status"], "completed", "{id}: {report}");
    }
    // Each was assembled: its document is there.
    for id in &list {
        let (code, md, err) = cluster.fanout(&["report", id]);
        assert_eq!(code, 0, "{err}");
        assert!(md.contains("Startup idea report"), "{id}: {md}");
    }
    // No process exited.
    assert!(api_process.is_running(), "the API exited");
    assert!(cluster.aggregator.is_running(), "the aggregator exited");
    for (i, w) in cluster.workers.iter_mut().enumerate() {
        assert!(w.is_running(), "worker {i} exited");
    }
    // Nothing left queued. A job whose completion was written but not yet confirmed
    // on a replica (TRYAGAIN from the barrier) was handed back for 1 s; it runs again,
    // finds its section done, and is acked. Give those a few seconds to drain.
    let drain = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, err) =
            run_fanout(&["--api", &api, "--token", ADMIN, "status", "--json"], &[]);
        assert_eq!(code, 0, "{err}");
        let status: Value = serde_json::from_str(&out).unwrap();
        if fanout_system_tests::queued(&status) == 0 {
            break;
        }
        assert!(Instant::now() < drain, "still queued after 30 s: {status}");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "failover: {total} reports over 2 master SIGKILLs (queue slot, namespace slot), \
         slots served again after {:.1} s and {:.1} s, {} client retries, 0 lost, \
         0 doubled, every report completed",
        failovers[0],
        failovers[1],
        retries.lock().unwrap()
    );
}
