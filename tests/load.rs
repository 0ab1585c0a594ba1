//! Load over real processes: bursts of reports submitted through the HTTP API at once, under a
//! real per-minute budget. Every report completes, the provider never answers 429, the memory of
//! every process stops growing once the work is drained, and Redis gives back what the reports
//! used once their TTL has passed. `make test` runs one burst of 1,000 reports; `make soak` runs
//! ten (`FANOUT_SOAK=1`). Figures are printed as `load:` lines, which `docs/reliability.md`
//! quotes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanout_system_tests::{Cluster, ClusterSpec, http_get_as, http_post_json_as};
use fanout_test_support::{FanoutProcess, free_port, wait_for_port, wait_until};
use serde_json::{Value, json};

const TOKEN: &str = "load-admin-token-0123456789";
/// The largest plan's limits, told to the budget and enforced by the simulated provider.
const RPM: &str = "30000";
const TPM: &str = "150000000";
/// Reports (and everything kept with them) are deleted this long after they finish.
const TTL_SECS: u64 = 30;

fn soak() -> bool {
    std::env::var("FANOUT_SOAK").is_ok_and(|v| v == "1")
}

/// The resident set of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Redis' `used_memory` in bytes and its number of keys.
fn redis_memory(conn: &mut redis::Connection) -> (u64, u64) {
    let info: String = redis::cmd("INFO").arg("memory").query(conn).unwrap();
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let keys: u64 = redis::cmd("DBSIZE").query(conn).unwrap();
    (used, keys)
}

fn all_keys(conn: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(conn).unwrap();
    keys.sort();
    keys
}

/// Samples every process's RSS (and Redis' memory) every 200 ms, keeping the peaks.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<BTreeMap<String, u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pids: Vec<(String, u32)>, redis: redis::Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(BTreeMap::new()));
        let thread = {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            std::thread::spawn(move || {
                let mut conn = redis.get_connection().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let mut p = peaks.lock().unwrap();
                    for (name, pid) in &pids {
                        if let Some(kib) = rss_kib(*pid) {
                            let e = p.entry(name.clone()).or_insert(0);
                            *e = (*e).max(kib);
                        }
                    }
                    let (used, _) = redis_memory(&mut conn);
                    let e = p.entry("redis".into()).or_insert(0);
                    *e = (*e).max(used / 1024);
                    drop(p);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Self {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peaks.lock().unwrap().clone()
    }
}

fn snapshot(pids: &[(String, u32)], conn: &mut redis::Connection) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = pids
        .iter()
        .map(|(name, pid)| (name.clone(), rss_kib(*pid).unwrap_or(0)))
        .collect();
    out.insert("redis".into(), redis_memory(conn).0 / 1024);
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The request of report `i` of a burst: startup reports and persona panels of 2 to 5 personas,
/// each with its own inputs.
fn request(i: usize, personas: &[Value], startup: &Value) -> Value {
    if i.is_multiple_of(2) {
        let mut inputs = startup.clone();
        inputs["idea"] = json!(format!(
            "{} (variant {i})",
            inputs["idea"].as_str().unwrap()
        ));
        json!({"template": "startup-report", "inputs": inputs})
    } else {
        let n = 2 + i % 4;
        json!({
            "template": "persona-panel",
            "inputs": {
                "content": format!("Landing page number {i}: a tool that turns receipts into a budget."),
                "question": "Would you sign up?",
                "personas": personas[..n],
            }
        })
    }
}

/// Submit `n` reports from 16 client threads at once; every submit must be accepted.
fn burst(port: u16, n: usize, offset: usize) -> Vec<String> {
    let root = fanout_test_support::workspace_root();
    let read = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).unwrap()).unwrap()
    };
    let startup = read("config/examples/startup-report.json");
    let panel = read("config/examples/persona-panel.json");
    let personas: Vec<Value> = panel["personas"].as_array().unwrap()[..5].to_vec();
    let next = Arc::new(Mutex::new(0usize));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(n)));
    std::thread::scope(|s| {
        for _ in 0..16 {
            let (next, ids, personas, startup) = (&next, &ids, &personas, &startup);
            s.spawn(move || {
                loop {
                    let i = {
                        let mut next = next.lock().unwrap();
                        if *next == n {
                            return;
                        }
                        *next += 1;
                        *next - 1
                    };
                    let body = request(offset + i, personas, startup);
                    let (code, answer) = http_post_json_as(port, "/v1/reports", &body, TOKEN);
                    assert_eq!(code, 202, "submit {i}: {answer}");
                    let v: Value = serde_json::from_str(&answer).unwrap();
                    ids.lock()
                        .unwrap()
                        .push(v["id"].as_str().unwrap().to_owned());
                }
            });
        }
    });
    Arc::try_unwrap(ids).unwrap().into_inner().unwrap()
}

/// Work queued, running or delayed in every lane, from `GET /v1/status`.
fn waiting(port: u16) -> u64 {
    let (code, body) = http_get_as(port, "/v1/status", TOKEN);
    assert_eq!(code, 200, "{body}");
    fanout_system_tests::queued(&serde_json::from_str(&body).unwrap())
}

/// Wait (bounded) until every report is final, looking at each (as a client would) until it
/// is, well within the TTL; return how many ended in each status.
fn wait_final(port: u16, ids: &[String], timeout: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&String> = ids.iter().collect();
    let mut statuses = HashMap::new();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {} reports not final after {timeout:?}",
            pending.len(),
            ids.len()
        );
        pending.retain(|id| {
            let (code, body) = http_get_as(port, &format!("/v1/reports/{id}"), TOKEN);
            assert_eq!(code, 200, "{id}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            match v["status"].as_str().unwrap() {
                "running" => true,
                s => {
                    *statuses.entry(s.to_owned()).or_insert(0) += 1;
                    false
                }
            }
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    statuses
}

#[test]
fn bursts_of_reports_through_the_api_complete_and_leave_no_memory_behind() {
    let (rounds, per_round) = if soak() { (10, 1_000) } else { (1, 1_000) };
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let env: Vec<(String, String)> = [
        ("REQUESTS_PER_MINUTE", RPM),
        ("TOKENS_PER_MINUTE", TPM),
        ("MAX_CONCURRENT_REQUESTS", "200"),
        ("FANOUT_API_TOKENS", &format!("{TOKEN}=load:admin")),
        ("FANOUT_API__SUBMISSIONS_PER_MINUTE", "0"),
        ("FANOUT_REPORTS__TTL_SECS", &TTL_SECS.to_string()),
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "30"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let cluster = Cluster::start(ClusterSpec {
        workers: 2,
        concurrency: 64,
        time_scale: 0.01,
        sim_args: ["--rpm", RPM, "--tpm", TPM]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        env,
        ..ClusterSpec::default()
    });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = FanoutProcess::start("api", &["api", "--listen", &listen], &cluster.env);
    assert!(wait_for_port(port, Duration::from_secs(20)), "api");
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (_, body) = http_get_as(port, "/v1/status", TOKEN);
            serde_json::from_str::<Value>(&body)
                .is_ok_and(|s| s["workers"].as_array().is_some_and(|w| w.len() == 2))
        }),
        "workers did not register"
    );
    let pids: Vec<(String, u32)> = vec![
        ("api".into(), api.pid()),
        ("worker-0".into(), cluster.workers[0].pid()),
        ("worker-1".into(), cluster.workers[1].pid()),
        ("aggregator".into(), cluster.aggregator.pid()),
    ];
    let mut conn = cluster.redis.client().get_connection().unwrap();
    let before_keys = all_keys(&mut conn);
    let before = snapshot(&pids, &mut conn);
    let (before_used, _) = redis_memory(&mut conn);

    let mut drained = Vec::new();
    let mut peaks = BTreeMap::new();
    let mut total = 0usize;
    let mut sections = 0u64;
    let mut wall = Duration::ZERO;
    for round in 0..rounds {
        let sampler = Sampler::start(pids.clone(), cluster.redis.client());
        let started = Instant::now();
        let ids = burst(port, per_round, round * per_round);
        let submitted = started.elapsed();
        let statuses = wait_final(port, &ids, Duration::from_secs(600));
        let took = started.elapsed();
        wall += took;
        for (name, kib) in sampler.finish() {
            let e = peaks.entry(name).or_insert(0);
            *e = (*e).max(kib);
        }
        assert_eq!(statuses.get("completed"), Some(&per_round), "{statuses:?}");
        assert!(
            wait_until(Duration::from_secs(10), || waiting(port) == 0),
            "work left in the queue"
        );
        total += per_round;
        let after = snapshot(&pids, &mut conn);
        eprintln!(
            "load: round {}: {per_round} reports submitted in {submitted:.1?}, all completed in {took:.1?}; RSS MiB {}",
            round + 1,
            after
                .iter()
                .map(|(k, v)| format!("{k} {}", mib(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        drained.push(after);
    }
    let stats = cluster.sim_stats();
    let totals = &stats["totals"];
    assert_eq!(
        totals["rate_limited"], 0,
        "the budget let a 429 through: {stats}"
    );
    sections += totals["completed"].as_u64().unwrap();
    let rpm: u64 = RPM.parse().unwrap();
    assert!(
        totals["max_admitted_60s"].as_u64().unwrap() <= rpm,
        "{stats}"
    );

    // Once drained, an idle process does not grow: wait out the reports' TTL and look again.
    std::thread::sleep(Duration::from_secs(TTL_SECS + 2));
    let idle = snapshot(&pids, &mut conn);
    let first = &drained[0];
    let last = drained.last().unwrap();
    for (name, _) in &pids {
        // Allocators keep some of what they freed; growth past a quarter (or 16 MiB) is a leak.
        let allowed = |base: u64| base + (base / 4).max(16 * 1024);
        assert!(
            idle[name] <= allowed(last[name]),
            "{name} grew while idle: {} KiB drained, {} KiB later",
            last[name],
            idle[name]
        );
        assert!(
            last[name] <= allowed(first[name]),
            "{name} grew round after round: {} KiB after the first, {} KiB after the last",
            first[name],
            last[name]
        );
    }

    // Redis: every key a report made goes with it (its own keys, its entry in the tenant's
    // index); what is left is what was there before, the few fixed keys a run creates (the
    // lanes' streams, the budget's learned limits), and the queue's memory of job ids, which
    // lasts 24 h whatever the report TTL (counted apart below).
    let of_reports = |keys: &[String]| -> Vec<String> {
        keys.iter()
            .filter(|k| k.contains("{r:") || k.contains(":reports:"))
            .cloned()
            .collect()
    };
    let gone = wait_until(Duration::from_secs(60), || {
        of_reports(&all_keys(&mut conn)).is_empty()
    });
    let keys = all_keys(&mut conn);
    let left = of_reports(&keys);
    assert!(
        gone,
        "{} keys of reports left after the TTL, such as {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
    let left: Vec<&String> = keys
        .iter()
        .filter(|k| !before_keys.contains(k) && !k.contains(":job:"))
        .collect();
    // Redis deletes an expired key when it is touched, or when its sampling of keys with a TTL
    // finds it; that sampling slows down once fewer than a tenth of those keys have expired,
    // and the job ids (24 h) are most of them. What Redis holds then is measured as it is, and
    // again after one SCAN of the keyspace (what any key listing does), which deletes every
    // expired key it passes.
    let (stale_used, stale_keys) = redis_memory(&mut conn);
    let mut cursor = 0u64;
    loop {
        let (next, _): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query(&mut conn)
            .unwrap();
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let (after_used, after_keys) = redis_memory(&mut conn);
    eprintln!(
        "load: redis: after the TTL {stale_keys} keys and {} MiB before expired keys were swept, \
         {after_keys} keys and {} MiB after one SCAN",
        mib(stale_used / 1024),
        mib(after_used / 1024)
    );
    let job_ids: Vec<&String> = keys.iter().filter(|k| k.contains(":job:")).collect();
    let mut pipe = redis::pipe();
    for k in &job_ids {
        pipe.cmd("MEMORY").arg("USAGE").arg(*k);
    }
    let job_id_bytes: u64 = pipe
        .query::<Vec<Option<u64>>>(&mut conn)
        .unwrap()
        .into_iter()
        .flatten()
        .sum();
    eprintln!(
        "load: redis: {} keys and {} MiB before, peak {} MiB, {after_keys} keys and {} MiB after the TTL; {} new keys besides the job ids, such as {:?}",
        before_keys.len(),
        mib(before_used / 1024),
        mib(peaks["redis"]),
        mib(after_used / 1024),
        left.len(),
        &left[..left.len().min(20)],
    );
    eprintln!(
        "load: redis: the queue remembers {} job ids for 24 h: {} MiB",
        job_ids.len(),
        mib(job_id_bytes / 1024)
    );
    assert!(
        after_used.saturating_sub(job_id_bytes) <= before_used + 4 * 1024 * 1024,
        "redis holds {} MiB more than before the run, besides the job ids",
        mib(after_used.saturating_sub(job_id_bytes + before_used) / 1024)
    );
    eprintln!(
        "load: {total} reports in {rounds} burst(s) of {per_round}, {sections} provider calls, 0 × 429, all completed in {wall:.1?}; RSS MiB before / peak / drained / idle: {}",
        pids.iter()
            .map(|(name, _)| format!(
                "{name} {} / {} / {} / {}",
                mib(before[name]),
                mib(peaks[name]),
                mib(last[name]),
                mib(idle[name])
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
