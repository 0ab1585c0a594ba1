//! Several OS processes sharing one budget: this test binary re-executes itself as the children
//! (`child_entry`, ignored unless `FANOUT_RL_CHILD` names a role).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{MODEL, budget, config, unix_ms};
use fanout_ratelimit::{AcquireRequest, Error, ProviderSignal};
use fanout_test_support::RedisServer;
use serde::{Deserialize, Serialize};

const ROLE: &str = "FANOUT_RL_CHILD";
const PROMPT: &str = "say something short";

/// What a worker child reports on its last line.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    admitted_at_ms: Vec<u64>,
    ok: u64,
    rate_limited: u64,
    other_status: u64,
    wait_too_long: u64,
}

fn spawn_child(role: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--ignored",
        "--test-threads=1",
    ])
    .env(ROLE, role)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child test process")
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

#[test]
#[ignore = "run by the multi-process tests as a child process"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match role.as_str() {
        "worker" => rt.block_on(worker_child()),
        "holder" => rt.block_on(holder_child()),
        other => panic!("unknown child role {other}"),
    }
}

/// acquire → POST /v1/chat/completions → settle, from many tasks, until the deadline.
async fn worker_child() {
    let rpm: u64 = env("RL_RPM").parse().unwrap();
    let tpm: u64 = env("RL_TPM").parse().unwrap();
    let estimate: u64 = env("RL_ESTIMATE").parse().unwrap();
    let refund: bool = env("RL_REFUND").parse().unwrap();
    let tasks: usize = env("RL_TASKS").parse().unwrap();
    let deadline: u64 = env("RL_DEADLINE_MS").parse().unwrap();
    let sim = env("RL_SIM_URL");
    let keys: Vec<String> = env("RL_KEYS").split(',').map(str::to_owned).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    // The product's schedule: a burst of a few ms, paced a little inside the limit.
    let defaults = fanout_core::config::BudgetConfig::default();
    let mut cfg = config(rpm, tpm, defaults.burst_seconds, 1_000);
    // What the budget is told: the limits (the mechanism alone), three times too much (a cap
    // above the real limit), or nothing (the plan's numbers as a start); the last two learn.
    match env("RL_TOLD").as_str() {
        "right" => {}
        "3x" => {
            cfg = config(rpm * 3, tpm * 3, defaults.burst_seconds, 1_000);
            cfg.learn_limits = true;
        }
        "nothing" => {
            cfg.limits = defaults.limits;
            cfg.caps = defaults.caps;
            cfg.learn_limits = true;
        }
        other => panic!("RL_TOLD={other}"),
    }
    cfg.headroom = defaults.headroom;
    cfg.refund_unused_tokens = refund;
    let b = budget(&env("RL_REDIS_URL"), cfg, &key_refs);
    let http = reqwest::Client::new();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (b, http, sim) = (b.clone(), http.clone(), sim.clone());
        set.spawn(async move {
            let mut report = ChildReport {
                admitted_at_ms: Vec::new(),
                ok: 0,
                rate_limited: 0,
                other_status: 0,
                wait_too_long: 0,
            };
            while unix_ms() < deadline {
                // Wait no longer than the run lasts, so the children end with it.
                let now = unix_ms();
                let req = AcquireRequest {
                    model: MODEL.into(),
                    estimated_tokens: estimate,
                    priority: 0,
                    enqueued_at_ms: now,
                    max_wait: Duration::from_millis(deadline.saturating_sub(now) + 200),
                    tenant: None,
                };
                let adm = match b.acquire(req).await {
                    Ok(a) => a,
                    Err(Error::WaitTooLong { .. }) => {
                        report.wait_too_long += 1;
                        continue;
                    }
                    Err(e) => panic!("acquire: {e}"),
                };
                report.admitted_at_ms.push(adm.admitted_at_ms);
                let resp = http
                    .post(format!("{sim}/chat/completions"))
                    .bearer_auth(format!("sk-test-{}", adm.key))
                    .json(&serde_json::json!({
                        "model": MODEL,
                        "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": 20,
                    }))
                    .send()
                    .await
                    .expect("post to the simulator");
                let status = resp.status().as_u16();
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                };
                let signal = ProviderSignal {
                    limit_requests: header("x-ratelimit-limit-requests"),
                    limit_tokens: header("x-ratelimit-limit-tokens"),
                    ..ProviderSignal::for_admission(&adm, status)
                };
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                b.feedback(&adm.key, MODEL, signal).await.expect("feedback");
                match status {
                    200 => report.ok += 1,
                    429 => {
                        report.rate_limited += 1;
                        eprintln!(
                            "429 at admission {} +{} ms: {body}",
                            adm.admitted_at_ms,
                            unix_ms() - adm.admitted_at_ms
                        );
                    }
                    _ => report.other_status += 1,
                }
                let used = body["usage"]["total_tokens"].as_u64();
                b.settle(adm, used).await.expect("settle");
            }
            report
        });
    }
    let mut all = ChildReport {
        admitted_at_ms: Vec::new(),
        ok: 0,
        rate_limited: 0,
        other_status: 0,
        wait_too_long: 0,
    };
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        all.admitted_at_ms.extend(r.admitted_at_ms);
        all.ok += r.ok;
        all.rate_limited += r.rate_limited;
        all.other_status += r.other_status;
        all.wait_too_long += r.wait_too_long;
    }
    println!("REPORT {}", serde_json::to_string(&all).unwrap());
}

/// Takes every concurrency lease, says so, then holds them until killed.
async fn holder_child() {
    let leases: u32 = env("RL_LEASES").parse().unwrap();
    let mut cfg = config(60_000, 10_000_000, 1.0, leases);
    cfg.lease_secs = env("RL_LEASE_SECS").parse().unwrap();
    let b = budget(&env("RL_REDIS_URL"), cfg, &["k"]);
    let mut held = Vec::new();
    for _ in 0..leases {
        let req = b.request(MODEL, 1);
        held.push(b.acquire(req).await.expect("acquire a lease"));
    }
    println!("HELD {}", held.len());
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(held);
}

fn read_report(child: Child) -> ChildReport {
    let out = child.wait_with_output().expect("child output");
    assert!(out.status.success(), "child failed: {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("REPORT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no report in child output:\n{text}"));
    serde_json::from_str(line).unwrap()
}

/// What one shared-budget run measured.
#[derive(Debug)]
struct SharedRun {
    /// Admissions between the first one and the deadline.
    in_window: usize,
    /// Admission times in that window, sorted (ms, Redis clock).
    window: Vec<u64>,
    per_process: Vec<usize>,
    sim: fanout_sim::SimStats,
}

/// `processes` worker processes × `tasks` tasks against one simulated provider enforcing `rpm` and
/// `tpm` per key, for `run` after a one-second start-up allowance.
#[allow(clippy::too_many_arguments)]
async fn shared_run(
    told: &str,
    rpm: u64,
    tpm: u64,
    estimate: u64,
    refund: bool,
    processes: usize,
    tasks: usize,
    run: Duration,
) -> SharedRun {
    let redis = RedisServer::start();
    let sim = fanout_sim::spawn(fanout_sim::SimConfig {
        rpm,
        tpm,
        time_scale: 0.05,
        ..fanout_sim::SimConfig::default()
    })
    .await
    .unwrap();
    let deadline = unix_ms() + 1_000 + run.as_millis() as u64;
    let children: Vec<Child> = (0..processes)
        .map(|_| {
            spawn_child(
                "worker",
                &[
                    ("RL_REDIS_URL", redis.url()),
                    ("RL_SIM_URL", sim.base_url()),
                    ("RL_TOLD", told.to_owned()),
                    ("RL_RPM", rpm.to_string()),
                    ("RL_TPM", tpm.to_string()),
                    ("RL_ESTIMATE", estimate.to_string()),
                    ("RL_REFUND", refund.to_string()),
                    ("RL_TASKS", tasks.to_string()),
                    ("RL_KEYS", "a".into()),
                    ("RL_DEADLINE_MS", deadline.to_string()),
                ],
            )
        })
        .collect();
    let reports: Vec<ChildReport> =
        tokio::task::spawn_blocking(move || children.into_iter().map(read_report).collect())
            .await
            .unwrap();
    let stats = sim.stats();
    let rate_limited: u64 = reports.iter().map(|r| r.rate_limited).sum();
    let other: u64 = reports.iter().map(|r| r.other_status).sum();
    assert_eq!(
        stats.totals.rate_limited, 0,
        "the simulator sent 429s: {stats:?}"
    );
    assert_eq!(rate_limited, 0);
    assert_eq!(other, 0, "unexpected statuses");
    let mut times: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.admitted_at_ms.clone())
        .collect();
    times.sort_unstable();
    assert_eq!(
        stats.totals.admitted,
        times.len() as u64,
        "sim and budget disagree"
    );
    for r in &reports {
        assert!(!r.admitted_at_ms.is_empty(), "a process got nothing: {r:?}");
    }
    let window: Vec<u64> = times.into_iter().filter(|t| *t <= deadline).collect();
    SharedRun {
        in_window: window.len(),
        window,
        per_process: reports.iter().map(|r| r.admitted_at_ms.len()).collect(),
        sim: stats,
    }
}

/// Share of the budget used over the backlog window [first admission, last admission]: the
/// schedule's burst is a few ms, so the budget there is the limit's rate over the window; `cost`
/// is what one admission takes of the limit. The last admission is counted as taking only its
/// start.
fn used_share(run: &SharedRun, per_minute: u64, cost: f64) -> (f64, f64) {
    let first = run.window[0];
    let last = *run.window.last().unwrap();
    let window_s = (last - first) as f64 / 1000.0;
    let budget = per_minute as f64 / 60.0 * window_s;
    let used = (run.in_window as f64 - 1.0) * cost / budget;
    (used, window_s)
}

/// The reason the product exists: four processes, one budget, the provider enforcing the same
/// limit. Zero 429s, and at least 97% of the budget used while there is a backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_one_rpm_budget_with_zero_429s_and_full_use() {
    let rpm = 600;
    let run = shared_run(
        "right",
        rpm,
        60_000,
        60,
        true,
        4,
        12,
        Duration::from_secs(8),
    )
    .await;
    let (used, window_s) = used_share(&run, rpm, 1.0);
    eprintln!(
        "rpm budget: {} admitted in {window_s:.3} s of backlog, used {:.2}% of {rpm} RPM, \
         sim max in 1 s {}, per process {:?}",
        run.in_window,
        used * 100.0,
        run.sim.totals.max_admitted_1s,
        run.per_process
    );
    assert!(used >= 0.97, "used {:.2}% of the budget", used * 100.0);
    assert!(used <= 1.0 + 1e-9, "over budget: {used}");
}

/// The same with tokens binding: the estimate is exactly what the simulator charges (prompt by
/// its chars/4 + 4 rule, plus max_tokens), and no refunds, since the simulator does not refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_one_tpm_budget_with_zero_429s_and_full_use() {
    let tpm = 24_000;
    let estimate = PROMPT.chars().count().div_ceil(4) as u64 + 4 + 20;
    let run = shared_run(
        "right",
        6_000,
        tpm,
        estimate,
        false,
        4,
        8,
        Duration::from_secs(6),
    )
    .await;
    let (used, window_s) = used_share(&run, tpm, estimate as f64);
    eprintln!(
        "tpm budget: {} admitted ({} tokens each) in {window_s:.3} s of backlog, used {:.2}% of \
         {tpm} TPM, sim charged {} tokens, per process {:?}",
        run.in_window,
        estimate,
        used * 100.0,
        run.sim.totals.tokens_charged,
        run.per_process
    );
    assert_eq!(
        run.sim.totals.tokens_charged,
        run.sim.totals.admitted * estimate,
        "the simulator charges what we estimate"
    );
    assert!(used >= 0.97, "used {:.2}% of the budget", used * 100.0);
    assert!(used <= 1.0 + 1e-9, "over budget: {used}");
}

/// Two keys, one provider limit each: both carry traffic and neither sees a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_share_the_load_without_429s() {
    let redis = RedisServer::start();
    let rpm = 600;
    let sim = fanout_sim::spawn(fanout_sim::SimConfig {
        rpm,
        tpm: 60_000,
        time_scale: 0.05,
        ..fanout_sim::SimConfig::default()
    })
    .await
    .unwrap();
    let deadline = unix_ms() + 1_000 + 3_000;
    let children: Vec<Child> = (0..3)
        .map(|_| {
            spawn_child(
                "worker",
                &[
                    ("RL_REDIS_URL", redis.url()),
                    ("RL_SIM_URL", sim.base_url()),
                    ("RL_TOLD", "right".into()),
                    ("RL_RPM", rpm.to_string()),
                    ("RL_TPM", "60000".into()),
                    ("RL_ESTIMATE", "60".into()),
                    ("RL_REFUND", "true".into()),
                    ("RL_TASKS", "10".into()),
                    ("RL_KEYS", "a,b".into()),
                    ("RL_DEADLINE_MS", deadline.to_string()),
                ],
            )
        })
        .collect();
    let reports: Vec<ChildReport> =
        tokio::task::spawn_blocking(move || children.into_iter().map(read_report).collect())
            .await
            .unwrap();
    let stats = sim.stats();
    assert_eq!(stats.totals.rate_limited, 0, "{stats:?}");
    assert_eq!(stats.keys.len(), 2, "both keys used: {stats:?}");
    let admitted: Vec<u64> = stats.keys.iter().map(|k| k.counters.admitted).collect();
    let total: u64 = admitted.iter().sum();
    assert_eq!(total, reports.iter().map(|r| r.ok).sum::<u64>());
    for n in &admitted {
        assert!(n * 10 >= total * 4, "uneven split: {admitted:?}");
    }
}

/// A process holding every lease is SIGKILLed: the leases come back within `lease_secs`, and
/// until then they are kept alive by renewal (the child held them for longer than `lease_secs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_killed_process_come_back_within_lease_secs() {
    let redis = RedisServer::start();
    let lease_secs = 1;
    let leases = 3;
    let mut child = spawn_child(
        "holder",
        &[
            ("RL_REDIS_URL", redis.url()),
            ("RL_LEASES", leases.to_string()),
            ("RL_LEASE_SECS", lease_secs.to_string()),
        ],
    );
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.split_once("HELD ").map(|(_, n)| n.to_owned()))
            })
            .expect("child reports its leases")
    })
    .await
    .unwrap();
    assert_eq!(line.trim(), leases.to_string());

    let mut cfg = config(60_000, 10_000_000, 1.0, leases);
    cfg.lease_secs = lease_secs;
    let b = budget(&redis.url(), cfg, &["k"]);
    // Held past lease_secs: renewal keeps them.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(b.snapshot().await.unwrap().len(), 0, "no family used yet");
    match b
        .acquire(
            b.request(MODEL, 1)
                .with_max_wait(Duration::from_millis(200)),
        )
        .await
    {
        Err(Error::WaitTooLong { .. }) => {}
        other => panic!("leases should all be held, got {other:?}"),
    }
    assert_eq!(
        b.snapshot().await.unwrap()[0].leases_in_use,
        u64::from(leases)
    );

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    let adm = b
        .acquire(b.request(MODEL, 1).with_max_wait(Duration::from_secs(10)))
        .await
        .expect("a lease comes back");
    let back_after = killed.elapsed();
    assert!(
        back_after <= Duration::from_secs(2 * lease_secs),
        "leases came back after {back_after:?}"
    );
    b.settle(adm, None).await.unwrap();
}

/// Told nothing, or three times too much: the first answer teaches every process the provider's
/// limit, and the processes use it as if they had been told (zero 429s, at least 97% used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_were_told_wrong_learn_the_limit_with_zero_429s_and_full_use() {
    let rpm = 600;
    for told in ["nothing", "3x"] {
        let run = shared_run(told, rpm, 60_000, 60, true, 4, 12, Duration::from_secs(8)).await;
        let (used, window_s) = used_share(&run, rpm, 1.0);
        eprintln!(
            "told {told}: {} admitted in {window_s:.3} s of backlog, used {:.2}% of {rpm} RPM, \
             sim max in 1 s {}",
            run.in_window,
            used * 100.0,
            run.sim.totals.max_admitted_1s
        );
        assert!(used >= 0.97, "told {told}: used {:.2}%", used * 100.0);
        assert!(used <= 1.0 + 1e-9, "over budget: {used}");
    }
}
