//! Faults over real processes: workers SIGKILLed and restarted while reports run, Redis killed
//! and restarted from its append-only file, and secrets that must never leak. `make test` runs
//! these at a size that takes a few minutes at most; `make soak` runs the same code with bigger
//! numbers (`FANOUT_SOAK=1`). Every figure a run produces is printed as one `chaos:` line, which
//! `docs/reliability.md` quotes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fanout_system_tests::{Cluster, ClusterSpec};
use fanout_test_support::{FanoutProcess, free_port, run_fanout, wait_for_port, wait_until};
use serde_json::Value;

const STARTUP: &str = "config/examples/startup-report.json";
const ADMIN: &str = "chaos-admin-token-012345";

fn soak() -> bool {
    std::env::var("FANOUT_SOAK").is_ok_and(|v| v == "1")
}

/// Generous provider limits: these tests are about faults, not about the budget.
fn env() -> Vec<(String, String)> {
    [
        ("REQUESTS_PER_MINUTE", "1000000"),
        ("TOKENS_PER_MINUTE", "1000000000"),
        ("MAX_CONCURRENT_REQUESTS", "200"),
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "10"),
        ("FANOUT_API_TOKENS", "chaos-admin-token-012345=ops:admin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn sim_args() -> Vec<String> {
    ["--rpm", "1000000", "--tpm", "1000000000"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn api(cluster: &Cluster) -> (FanoutProcess, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let p = FanoutProcess::start("api", &["api", "--listen", &listen], &cluster.env);
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "api did not listen"
    );
    (p, format!("http://{listen}"))
}

fn submit(cluster: &Cluster, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let key = format!("chaos-{i}");
            let (code, out, err) = cluster.fanout(&[
                "submit",
                "--template",
                "startup-report",
                "--input",
                STARTUP,
                "--idempotency-key",
                &key,
            ]);
            assert_eq!(code, 0, "submit {i}: {err}");
            out.lines().next().unwrap().trim().to_owned()
        })
        .collect()
}

fn report(cluster: &Cluster, id: &str) -> Value {
    let (code, out, err) = cluster.fanout(&["report", id, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn status(api: &str) -> Value {
    let (code, out, err) = run_fanout(&["--api", api, "--token", ADMIN, "status", "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Wait until every report is final (bounded), then return their statuses.
fn wait_all(cluster: &Cluster, ids: &[String], timeout: Duration) -> HashMap<String, String> {
    let deadline = Instant::now() + timeout;
    let mut done = HashMap::new();
    while done.len() < ids.len() {
        for id in ids {
            if done.contains_key(id) {
                continue;
            }
            let status = report(cluster, id)["status"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if status != "running" {
                done.insert(id.clone(), status);
            }
        }
        if done.len() < ids.len() {
            assert!(
                Instant::now() < deadline,
                "{} of {} reports still running after {timeout:?}",
                ids.len() - done.len(),
                ids.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    done
}

#[test]
fn workers_killed_and_restarted_all_the_time_lose_nothing_and_run_nothing_twice_over() {
    let (reports, period) = if soak() {
        (500, Duration::from_secs(2))
    } else {
        (40, Duration::from_millis(1500))
    };
    // `queue.max_deliveries` dead-letters a job that keeps killing its worker. Here the test
    // kills workers whatever they run, so a job can be caught by five kills in a row (seen:
    // 2 of 400 in one run); the limit is raised so that what is measured is loss, not that
    // policy.
    let mut env = env();
    env.push(("FANOUT_QUEUE__MAX_DELIVERIES".into(), "50".into()));
    let mut cluster = {
        fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
        Cluster::start(ClusterSpec {
            workers: 3,
            concurrency: 8,
            // A provider call takes about a second: every kill lands on calls in flight.
            time_scale: 0.05,
            sim_args: sim_args(),
            env,
            ..ClusterSpec::default()
        })
    };
    let (_api, api) = api(&cluster);
    let started = Instant::now();
    let ids = submit(&cluster, reports);
    // Kill a worker, start it again, every `period` while anything runs.
    let mut kills = 0;
    let mut generation = 0;
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    let deadline = Instant::now() + Duration::from_secs(if soak() { 1800 } else { 150 });
    loop {
        let s = status(&api);
        if fanout_system_tests::queued(&s) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "work still queued: {s}");
        std::thread::sleep(period);
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let victim = (rng_state % 3) as usize;
        cluster.workers[victim].kill();
        kills += 1;
        generation += 1;
        cluster.restart_worker(victim, generation);
    }
    let statuses = wait_all(&cluster, &ids, Duration::from_secs(120));
    let wall = started.elapsed();
    let not_completed: Vec<_> = statuses.iter().filter(|(_, s)| *s != "completed").collect();
    assert!(not_completed.is_empty(), "{not_completed:?}");

    // Every section has its one result; the provider ran each at most once more per kill and
    // slot that kill interrupted (a call in flight when its worker died runs again).
    let sections: usize = ids
        .iter()
        .map(|id| {
            let r = report(&cluster, id);
            let ss = r["sections"].as_array().unwrap();
            assert!(ss.iter().all(|s| s["state"] == "done"), "{id}: {r}");
            ss.len()
        })
        .sum();
    let stats = cluster.sim_stats();
    let calls = stats["totals"]["completed"].as_u64().unwrap() as usize;
    let bound = sections + kills * cluster.concurrency;
    assert!(
        calls >= sections && calls <= bound,
        "{calls} provider calls for {sections} sections and {kills} kills"
    );
    // Nothing left behind: no job pending, delayed or dead, and exactly the three live
    // workers in the registry once the killed ones' TTLs lapsed.
    let s = status(&api);
    for l in s["lanes"].as_array().unwrap() {
        for field in ["ready", "in_flight", "delayed", "dead"] {
            assert_eq!(l[field], 0, "{field}: {s}");
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || status(&api)["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 3)),
        "{}",
        status(&api)["workers"]
    );
    eprintln!(
        "chaos: worker crashes: {reports} reports, {sections} sections, {kills} SIGKILLs + restarts, \
         {calls} provider calls (bound {bound}), 0 lost, 0 duplicated results, wall {wall:.1?}"
    );
}

#[test]
fn redis_killed_and_restarted_from_its_append_only_file_loses_no_accepted_report() {
    let reports = if soak() { 200 } else { 20 };
    let mut cluster = {
        fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
        Cluster::start(ClusterSpec {
            workers: 2,
            concurrency: 8,
            // Slow enough that the crash lands mid-run.
            time_scale: 0.01,
            sim_args: sim_args(),
            env: env(),
            redis_aof: true,
            ..ClusterSpec::default()
        })
    };
    let (mut api_process, api) = api(&cluster);
    let ids = submit(&cluster, reports);
    // Every report was accepted more than a second before the crash (appendfsync everysec).
    std::thread::sleep(Duration::from_millis(1500));
    let running = ids
        .iter()
        .filter(|id| report(&cluster, id)["status"] == "running")
        .count();
    cluster.redis.kill();
    std::thread::sleep(Duration::from_secs(2));
    cluster.redis.restart();
    // No process exited over it.
    for w in &mut cluster.workers {
        assert!(w.is_running(), "a worker exited when Redis crashed");
    }
    assert!(cluster.aggregator.is_running(), "the aggregator exited");
    assert!(api_process.is_running(), "the api exited");
    let statuses = wait_all(&cluster, &ids, Duration::from_secs(180));
    let not_completed: Vec<_> = statuses.iter().filter(|(_, s)| *s != "completed").collect();
    assert!(not_completed.is_empty(), "{not_completed:?}");
    let s = status(&api);
    for l in s["lanes"].as_array().unwrap() {
        assert_eq!(l["dead"], 0, "{s}");
    }
    eprintln!(
        "chaos: redis crash: {reports} reports accepted, {running} running at the SIGKILL, restarted from the AOF after 2 s, {} completed, 0 lost",
        statuses.len()
    );
}

#[test]
fn provider_faults_end_in_completed_or_marked_sections_within_the_attempt_bound() {
    let reports = if soak() { 100 } else { 10 };
    let max_attempts = 5;
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    // A real limit this time (600 RPM, enforced by the simulator), and 10% 500s, 5% hangs,
    // 5% truncated bodies: every fault the simulator can inject at once.
    let mut env: Vec<(String, String)> = env()
        .into_iter()
        .filter(|(k, _)| k != "REQUESTS_PER_MINUTE" && k != "TOKENS_PER_MINUTE")
        .collect();
    env.push(("FANOUT_PROVIDER__REQUEST_TIMEOUT_SECS".into(), "2".into()));
    env.push((
        "FANOUT_QUEUE__MAX_ATTEMPTS".into(),
        max_attempts.to_string(),
    ));
    let cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 8,
        time_scale: 0.01,
        sim_args: [
            "--rpm",
            "600",
            "--tpm",
            "100000000",
            "--fail-rate",
            "0.1",
            "--hang-rate",
            "0.05",
            "--truncate-rate",
            "0.05",
            "--seed",
            "7",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect(),
        env,
        ..ClusterSpec::default()
    });
    let ids = submit(&cluster, reports);
    let statuses = wait_all(&cluster, &ids, Duration::from_secs(240));
    let mut failed_sections = 0;
    let mut sections = 0;
    for id in &ids {
        let r = report(&cluster, id);
        let status = &statuses[id];
        assert!(
            status == "completed" || status == "completed_with_failures",
            "{id}: {status}"
        );
        for s in r["sections"].as_array().unwrap() {
            sections += 1;
            match s["state"].as_str().unwrap() {
                "done" => {}
                "failed" | "skipped" => {
                    failed_sections += 1;
                    assert!(!s["reason"].as_str().unwrap_or("").is_empty(), "{s}");
                }
                other => panic!("{id}: section in state {other}"),
            }
        }
    }
    let stats = cluster.sim_stats();
    let t = &stats["totals"];
    let requests = t["requests"].as_u64().unwrap();
    let rate_limited = t["rate_limited"].as_u64().unwrap();
    assert!(
        requests <= (sections * max_attempts) as u64,
        "{requests} provider requests for {sections} sections: {t}"
    );
    // The shared budget keeps to the provider's limit despite the retries.
    assert_eq!(rate_limited, 0, "{t}");
    eprintln!(
        "chaos: provider faults: {reports} reports, {sections} sections, {requests} provider requests \
         (500s {}, hangs {}, truncated {}), {failed_sections} sections failed with a reason, \
         0 rate-limited",
        t["server_errors"], t["hung"], t["truncated"]
    );
}

#[test]
fn a_provider_down_for_30_s_costs_calls_not_attempts_and_every_report_completes() {
    let reports = if soak() { 50 } else { 10 };
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    // The default retry policy (5 attempts, backoff from 500 ms to 60 s with full jitter), not
    // the quick one the other scenarios use.
    let mut env = env();
    env.push(("FANOUT_QUEUE__RETRY_BASE_MS".into(), "500".into()));
    env.push(("FANOUT_QUEUE__RETRY_MAX_MS".into(), "60000".into()));
    env.push(("FANOUT_PROVIDER__REQUEST_TIMEOUT_SECS".into(), "5".into()));
    let mut cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 8,
        // A provider call takes about a second: the outage starts with calls in flight.
        time_scale: 0.05,
        sim_args: sim_args(),
        env,
        ..ClusterSpec::default()
    });
    let ids = submit(&cluster, reports);
    let requests = |c: &Cluster| c.sim_stats()["totals"]["requests"].as_u64().unwrap();
    assert!(wait_until(Duration::from_secs(30), || requests(&cluster) >= 5));
    let before = requests(&cluster);
    cluster.sim.kill();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    let listen = format!("127.0.0.1:{}", cluster.sim_port);
    let mut args = vec!["sim", "--listen", &listen, "--time-scale", "0.05"];
    let extra = sim_args();
    args.extend(extra.iter().map(String::as_str));
    cluster.sim = FanoutProcess::start("sim", &args, &[]);
    assert!(
        wait_for_port(cluster.sim_port, Duration::from_secs(20)),
        "sim did not come back"
    );
    let outage = down.elapsed();
    let statuses = wait_all(&cluster, &ids, Duration::from_secs(240));
    let (mut done, mut failed, mut skipped) = (0, 0, 0);
    for id in &ids {
        let status = &statuses[id];
        assert!(
            ["completed", "completed_with_failures", "failed"].contains(&status.as_str()),
            "{id}: {status}"
        );
        for s in report(&cluster, id)["sections"].as_array().unwrap() {
            match s["state"].as_str().unwrap() {
                "done" => done += 1,
                state @ ("failed" | "skipped") => {
                    if state == "failed" {
                        failed += 1;
                    } else {
                        skipped += 1;
                    }
                    assert!(!s["reason"].as_str().unwrap_or("").is_empty(), "{s}");
                }
                other => panic!("{id}: section in state {other}"),
            }
        }
    }
    for (i, w) in cluster.workers.iter_mut().enumerate() {
        assert!(w.is_running(), "worker {i} exited");
    }
    assert!(cluster.aggregator.is_running(), "aggregator exited");
    // The outage cost calls, not attempts: every process paused the key while it lasted, and
    // every section completed once the provider was back.
    assert_eq!(
        (failed, skipped),
        (0, 0),
        "an outage of 30 s failed sections"
    );
    let unreached: f64 = cluster.metrics_ports[..2]
        .iter()
        .filter_map(|p| {
            fanout_system_tests::scrape(
                *p,
                "fanout_llm_responses_total",
                &["status=\"connection\""],
            )
        })
        .sum();
    let after = cluster.sim_stats()["totals"]["requests"].as_u64().unwrap();
    eprintln!(
        "chaos: provider down: {reports} reports, provider SIGKILLed {before} requests in and \
         back after {outage:.1?}; {unreached} calls could not connect or lost their connection; \
         sections: {done} done, \
         {failed} failed, {skipped} skipped; {after} requests after it came back; 0 processes exited"
    );
}

/// A webhook receiver on loopback: answers 200 to every POST and counts them per report.
fn receiver() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<HashMap<String, usize>>>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
    let counts = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let counts = counts.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut id, mut len) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end().to_ascii_lowercase();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.strip_prefix("x-fanout-report-id:") {
                        id = v.trim().to_owned();
                    }
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                *counts.lock().unwrap().entry(id).or_insert(0) += 1;
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    (port, seen)
}

#[test]
fn aggregator_and_api_killed_mid_run_lose_no_submit_report_or_webhook() {
    let reports = if soak() { 200 } else { 20 };
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let mut env = env();
    env.push(("FANOUT_WEBHOOKS__ALLOW_HOSTS".into(), "127.0.0.0/8".into()));
    let mut cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 8,
        time_scale: 0.02,
        sim_args: sim_args(),
        env,
        ..ClusterSpec::default()
    });
    let (hook_port, hooks) = receiver();
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let start_api = |env: &[(String, String)]| {
        let p = FanoutProcess::start("api", &["api", "--listen", &listen], env);
        assert!(
            wait_for_port(api_port, Duration::from_secs(20)),
            "api did not listen"
        );
        p
    };
    let mut api_process = start_api(&cluster.env);
    let api = format!("http://{listen}");
    let callback = format!("http://127.0.0.1:{hook_port}/hook");
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut retries = 0;
    let mut api_kills = 0;
    let mut aggregator_kills = 0;
    for i in 0..reports {
        // Every fifth submit, the API dies (and comes back); every seventh, the aggregator.
        if i % 5 == 2 {
            api_process.kill();
            api_kills += 1;
        }
        if i % 7 == 3 {
            cluster.aggregator.kill();
            aggregator_kills += 1;
            cluster.aggregator = FanoutProcess::start("aggregator", &["aggregator"], &cluster.env);
        }
        let key = format!("order-{i}");
        // The client retries with its idempotency key until it gets an answer.
        let (id, tries) = fanout_system_tests::submit_until_accepted(
            &api,
            ADMIN,
            &key,
            &["--callback-url", &callback],
            Duration::from_secs(30),
            || {
                if !api_process.is_running() {
                    api_process = start_api(&cluster.env);
                }
            },
        );
        retries += tries;
        ids.insert(key, id);
    }
    let list: Vec<String> = ids.values().cloned().collect();
    let statuses = wait_all(&cluster, &list, Duration::from_secs(180));
    assert!(statuses.values().all(|s| s == "completed"), "{statuses:?}");
    // No submit doubled: one report per key, and the tenant lists exactly those.
    let mut unique = list.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), reports);
    let (code, out, err) = run_fanout(
        &[
            "--api", &api, "--token", ADMIN, "reports", "--tenant", "ops", "-n", "100",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let listed = out
        .lines()
        .filter(|l| list.iter().any(|id| l.starts_with(id)))
        .count();
    assert_eq!(listed, reports.min(100), "{out}");
    // Every report assembled (its document is there) and its webhook delivered at least once.
    for id in &list {
        let (code, md, err) = cluster.fanout(&["report", id]);
        assert_eq!(code, 0, "{err}");
        assert!(md.contains("Startup idea report"), "{id}");
    }
    assert!(
        wait_until(Duration::from_secs(60), || {
            let seen = hooks.lock().unwrap();
            list.iter()
                .all(|id| seen.get(id).copied().unwrap_or(0) >= 1)
        }),
        "webhooks delivered: {} of {reports}",
        hooks.lock().unwrap().len()
    );
    let deliveries: usize = hooks.lock().unwrap().values().sum();
    eprintln!(
        "chaos: api and aggregator crashes: {reports} reports, {api_kills} API SIGKILLs, \
         {aggregator_kills} aggregator SIGKILLs, {retries} client retries, 0 lost, 0 doubled, \
         {deliveries} webhook deliveries for {reports} reports"
    );
}

#[test]
fn secrets_never_reach_logs_metrics_error_bodies_or_redis() {
    const KEY: &str = "sk-canary-provider-key-7f3a9c";
    const TOKEN: &str = "canary-api-token-51d0e2b7c4";
    const HOOK: &str = "canary-webhook-secret-9b8e1f";
    const REDIS_PW: &str = "canary-redis-password-4c6d2a";
    let logs = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("OPENAI_API_KEY".to_owned(), KEY.to_owned()),
        (
            "FANOUT_API_TOKENS".to_owned(),
            format!("{TOKEN}=acme:admin"),
        ),
        ("FANOUT_WEBHOOK_SECRET".to_owned(), HOOK.to_owned()),
        (
            "FANOUT_WEBHOOKS__ALLOW_HOSTS".to_owned(),
            "127.0.0.0/8".to_owned(),
        ),
        ("RUST_LOG".to_owned(), "trace".to_owned()),
    ];
    env.extend(env_without_tokens());
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let cluster = Cluster::start(ClusterSpec {
        workers: 1,
        concurrency: 8,
        time_scale: 0.002,
        sim_args: sim_args(),
        env,
        log_dir: Some(logs.path().to_owned()),
        redis_password: Some(REDIS_PW.to_owned()),
        ..ClusterSpec::default()
    });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _api = FanoutProcess::start_logged(
        "api",
        &["api", "--listen", &listen],
        &cluster.env,
        &logs.path().join("api.log"),
    );
    assert!(wait_for_port(port, Duration::from_secs(20)));
    let api = format!("http://{listen}");
    // A report with a webhook (its receiver refuses: the retries and the dead letter log too),
    // through the API, a wrong token, a bad request, and the operator routes.
    let (code, out, err) = run_fanout(
        &[
            "--api",
            &api,
            "--token",
            TOKEN,
            "submit",
            "--template",
            "startup-report",
            "--input",
            STARTUP,
            "--callback-url",
            &format!("http://127.0.0.1:{}/refuses", free_port()),
            "--wait",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let (_, out, err) = run_fanout(
        &[
            "--api",
            &api,
            "--token",
            "wrong-token-0000000000",
            "reports",
        ],
        &[],
    );
    let mut bodies = format!("{out}{err}");
    let (_, out, err) = run_fanout(
        &[
            "--api",
            &api,
            "--token",
            TOKEN,
            "submit",
            "--template",
            "nope",
            "--input",
            STARTUP,
        ],
        &[],
    );
    bodies.push_str(&out);
    bodies.push_str(&err);
    for cmd in [
        &["status", "--json"][..],
        &["dead", "list"][..],
        &["webhooks", "dead"][..],
    ] {
        let mut args = vec!["--api", api.as_str(), "--token", TOKEN];
        args.extend_from_slice(cmd);
        let (_, out, err) = run_fanout(&args, &[]);
        bodies.push_str(&out);
        bodies.push_str(&err);
    }
    let mut metrics = String::new();
    for p in cluster.metrics_ports.iter().chain([&port]) {
        metrics.push_str(&fanout_system_tests::http_get(*p, "/metrics").1);
    }
    // Every value in Redis, read by type.
    let client = redis::Client::open(format!(
        "redis://:{REDIS_PW}@127.0.0.1:{}",
        cluster.redis.port()
    ))
    .unwrap();
    let mut c = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    let mut stored = String::new();
    for k in &keys {
        let kind: String = redis::cmd("TYPE").arg(k).query(&mut c).unwrap();
        let v: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(k).query(&mut c).unwrap(),
            "hash" => redis::cmd("HGETALL").arg(k).query(&mut c).unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .query(&mut c)
                .unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(k).query(&mut c).unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .query(&mut c)
                .unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(k)
                .arg("-")
                .arg("+")
                .query(&mut c)
                .unwrap(),
            _ => redis::Value::Nil,
        };
        stored.push_str(k);
        stored.push_str(&format!("{v:?}"));
    }
    let mut log_text = String::new();
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        log_text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default());
    }
    assert!(
        log_text.len() > 10_000,
        "trace logs were written ({} bytes)",
        log_text.len()
    );
    assert!(keys.len() > 10, "{keys:?}");
    for secret in [KEY, TOKEN, HOOK, REDIS_PW] {
        assert!(!log_text.contains(secret), "a secret in the logs");
        assert!(!metrics.contains(secret), "a secret in /metrics");
        assert!(!bodies.contains(secret), "a secret in an answer");
        assert!(!stored.contains(secret), "a secret stored in Redis");
    }
    eprintln!(
        "chaos: secrets: 4 canaries absent from {} KB of trace logs, {} KB of metrics, {} keys in Redis, and the answers",
        log_text.len() / 1024,
        metrics.len() / 1024,
        keys.len()
    );
}

/// `env()` without its API tokens (the secrets test sets its own).
fn env_without_tokens() -> Vec<(String, String)> {
    env()
        .into_iter()
        .filter(|(k, _)| k != "FANOUT_API_TOKENS")
        .collect()
}

/// A template whose `note` section renders an empty prompt unless the optional `note` input is
/// given; `after` depends on it.
const POISON_TEMPLATE: &str = r#"
name = "poison"
title = "Poison"
description = "Its first section's prompt is empty unless `note` is given."
lane = "interactive"
model = "gpt-4o-mini"

[[inputs]]
name = "topic"
kind = "string"
required = true
max_chars = 200

[[inputs]]
name = "note"
kind = "text"
max_chars = 2000

[[sections]]
id = "note"
title = "Note"
prompt = "{% if inputs.note %}{{ inputs.note }}{% endif %}"

[[sections]]
id = "after"
title = "After the note"
depends_on = ["note"]
prompt = "Go on from this: {{ sections.note }}"

[[sections]]
id = "topic"
title = "Topic"
prompt = "Write about {{ inputs.topic }}."
"#;

#[test]
fn poison_and_bad_input_end_in_a_clear_error_or_a_dead_letter_and_no_process_exits() {
    use fanout_system_tests::{http_get_as, http_post_json_as};
    use serde_json::json;

    let templates = fanout_system_tests::tempfile::tempdir().unwrap();
    let root = fanout_test_support::workspace_root();
    for entry in std::fs::read_dir(root.join("config/templates")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, templates.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(templates.path().join("poison.toml"), POISON_TEMPLATE).unwrap();
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let mut env = env();
    env.push((
        "FANOUT_REPORTS__TEMPLATES_DIR".into(),
        templates.path().display().to_string(),
    ));
    let mut cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 8,
        time_scale: 0.01,
        sim_args: sim_args(),
        env,
        ..ClusterSpec::default()
    });
    let (mut api_process, api) = api(&cluster);
    let port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    let post = |body: &Value| {
        let (code, text) = http_post_json_as(port, "/v1/reports", body, ADMIN);
        (
            code,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let field = |answer: &Value| answer["error"]["field"].as_str().unwrap_or("").to_owned();
    let panel: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("config/examples/persona-panel.json")).unwrap(),
    )
    .unwrap();
    let with_personas = |personas: Value| {
        let mut inputs = panel.clone();
        inputs["personas"] = personas;
        json!({"template": "persona-panel", "inputs": inputs})
    };
    let mut cases = 0;

    // Bad input: refused at the door with the field named, nothing enqueued.
    // JSON nested 100,000 deep (200 KB): the parser's depth limit, not a stack overflow.
    let deep = format!(
        r#"{{"template": "persona-panel", "inputs": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (code, text) = raw_post(port, &deep);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("more than 128 deep"), "{text}");
    cases += 1;
    // Nested objects where text belongs.
    let mut nested = json!("leaf");
    for _ in 0..60 {
        nested = json!({ "a": nested });
    }
    let (code, answer) = post(&with_personas(
        json!([{"name": "Ann", "background": nested}]),
    ));
    assert_eq!(
        (code, field(&answer).as_str()),
        (422, "inputs.personas[0].background"),
        "{answer}"
    );
    // Too long for the input (a body over `api.max_body_bytes` is 413: `api.rs`).
    let mut long = panel.clone();
    long["content"] = json!("x".repeat(20_001));
    let (code, answer) = post(&json!({"template": "persona-panel", "inputs": long}));
    assert_eq!(
        (code, field(&answer).as_str()),
        (422, "inputs.content"),
        "{answer}"
    );
    // Control characters and bidirectional overrides.
    let (code, answer) = post(&with_personas(json!([{"name": "Ann\u{0}Bo"}])));
    assert_eq!(
        (code, field(&answer).as_str()),
        (422, "inputs.personas[0].name"),
        "{answer}"
    );
    let mut bidi = panel.clone();
    bidi["content"] = json!("Pay \u{202e}0001\u{202c} EUR");
    let (code, answer) = post(&json!({"template": "persona-panel", "inputs": bidi}));
    assert_eq!(
        (code, field(&answer).as_str()),
        (422, "inputs.content"),
        "{answer}"
    );
    // A template name that tries to leave the templates directory.
    for name in [
        "../../etc/passwd",
        "/etc/passwd",
        "persona-panel/../../x",
        "nul\u{0}",
    ] {
        let (code, answer) = post(&json!({"template": name, "inputs": {}}));
        assert!(
            (code == 404 || code == 422) && field(&answer) == "template",
            "{name}: {code} {answer}"
        );
    }
    cases += 8;

    // Unicode is content, not poison: names in any script, emoji, combining marks.
    let names = [
        "Zoë Ångström 🚀",
        "李小龍",
        "مريم الحسن",
        "Z\u{336}a\u{336}l\u{336}g\u{336}o\u{336}",
    ];
    let (code, answer) = post(&with_personas(
        names.iter().map(|n| json!({"name": n})).collect(),
    ));
    assert_eq!(code, 202, "{answer}");
    let unicode = answer["id"].as_str().unwrap().to_owned();

    // A template that renders an empty prompt: that section fails with the reason and no
    // provider call, its dependent is skipped, the rest of the report completes.
    let (code, answer) = post(&json!({"template": "poison", "inputs": {"topic": "tea"}}));
    assert_eq!(code, 202, "{answer}");
    let empty = answer["id"].as_str().unwrap().to_owned();

    // Poison in the queue: entries no worker can decode, written straight into the stream the
    // reports' jobs use, between real jobs.
    let mut conn = cluster.redis.conn();
    let streams: Vec<String> = redis::cmd("KEYS")
        .arg("{systest:queue}:stream:*")
        .query(&mut conn)
        .unwrap();
    assert!(!streams.is_empty());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    for stream in &streams {
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("garbage")
            .arg("1")
            .query(&mut conn)
            .unwrap();
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(&[("id", "not-json"), ("p", "{nope"), ("a", "1"), ("t", &now)])
            .query(&mut conn)
            .unwrap();
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(&[
                ("id", "not-a-section"),
                ("p", r#"{"x": 1}"#),
                ("a", "1"),
                ("t", &now),
            ])
            .query(&mut conn)
            .unwrap();
    }
    cases += 3 * streams.len();
    // Real work behind the poison wakes the claimers.
    let (code, answer) = post(&with_personas(json!([{"name": "Ann"}, {"name": "Bo"}])));
    assert_eq!(code, 202, "{answer}");
    let behind = answer["id"].as_str().unwrap().to_owned();

    let reports = [unicode.clone(), empty.clone(), behind.clone()];
    let statuses = wait_all(&cluster, &reports, Duration::from_secs(120));
    assert_eq!(statuses[&unicode], "completed");
    assert_eq!(statuses[&behind], "completed");
    let md = cluster.report_md(&unicode);
    for name in names {
        assert!(md.contains(name), "{name} missing from the report");
    }
    let r = report(&cluster, &empty);
    let state = |id: &str| {
        r["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["section"] == id)
            .unwrap_or_else(|| panic!("{id}: {r}"))
            .clone()
    };
    assert_eq!(state("note")["state"], "failed", "{r}");
    assert!(
        state("note")["reason"]
            .as_str()
            .is_some_and(|e| e.contains("prompt rendered empty")),
        "{r}"
    );
    assert_eq!(state("after")["state"], "skipped", "{r}");
    assert_eq!(state("topic")["state"], "done", "{r}");

    // No provider call for the empty prompt.
    assert_eq!(
        (&state("note")["model"], &state("note")["latency_ms"]),
        (&Value::Null, &Value::Null),
        "{r}"
    );

    // Every poisoned entry is a dead letter with its reason; none was dropped.
    let dead = wait_until(Duration::from_secs(30), || {
        let (_, text) = http_get_as(port, "/v1/dead-letters?limit=1000", ADMIN);
        serde_json::from_str::<Value>(&text)
            .is_ok_and(|v| v["dead_letters"].as_array().unwrap().len() == 3 * streams.len())
    });
    let (_, text) = http_get_as(port, "/v1/dead-letters?limit=1000", ADMIN);
    assert!(dead, "{text}");
    let letters: Value = serde_json::from_str(&text).unwrap();
    for l in letters["dead_letters"].as_array().unwrap() {
        assert!(
            l["reason"].as_str().unwrap().starts_with("decode error: "),
            "{l}"
        );
    }
    // No process exited.
    for (i, w) in cluster.workers.iter_mut().enumerate() {
        assert!(w.is_running(), "worker {i} exited");
    }
    assert!(cluster.aggregator.is_running(), "aggregator exited");
    assert!(cluster.sim.is_running(), "sim exited");
    assert!(api_process.is_running(), "api exited");
    eprintln!(
        "chaos: poison: {cases} poison inputs and queue entries, each refused with its field named or dead-lettered with its reason; \
         a prompt that rendered empty failed its section without a provider call; unicode names came through; 0 processes exited"
    );
}

/// `POST /v1/reports` with a raw body (which need not be JSON): (status, body).
fn raw_post(port: u16, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v1/reports HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}
