//! Measures the report store on a private redis-server: latency of `start` and `complete`
//! (one script each), Redis commands and Redis CPU per job, `view` + assembly of a large report.
//!
//! `cargo run --release -p fanout-aggregator --example store_bench -- [reports] [personas] [concurrency]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout_aggregator::{NewReport, SectionResult, Store, render_json, render_markdown};
use fanout_core::Template;
use fanout_test_support::RedisServer;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const PANEL: &str = r#"
name = "panel"
title = "Persona panel"
[[inputs]]
name = "personas"
kind = "list"
required = true
[inputs.items]
kind = "object"
[[inputs.items.fields]]
name = "name"
kind = "string"
required = true
[[sections]]
id = "persona"
title = "Persona critique"
for_each = "personas"
prompt = "{{ item.name }}"
[[sections]]
id = "summary"
title = "Panel summary"
prompt = "{{ sections.persona }}"
depends_on = ["persona"]
on_dependency_failure = "continue"
"#;

fn result(text: String) -> SectionResult {
    SectionResult {
        text,
        model: "gpt-4o-mini".into(),
        prompt_tokens: 900,
        completion_tokens: 600,
        cost: 0.0005,
        latency_ms: 2000,
        attempts: 1,
        cached: false,
        batch_api: false,
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn redis_stats(c: &mut redis::Connection) -> (u64, f64) {
    let info: String = redis::cmd("INFO").arg("all").query(c).unwrap();
    let mut calls = 0;
    let mut cpu = 0.0;
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_") {
            if let Some(n) = rest
                .split("calls=")
                .nth(1)
                .and_then(|s| s.split(',').next())
            {
                calls += n.parse::<u64>().unwrap_or(0);
            }
        }
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            cpu += v.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    (calls, cpu)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let reports = args.first().copied().unwrap_or(40);
    let personas = args.get(1).copied().unwrap_or(50);
    let concurrency = args.get(2).copied().unwrap_or(32);

    let redis = RedisServer::start();
    let pool = fanout_test_support::redis_pool(&redis.url());
    let store = Store::new(pool, "bench", Duration::from_secs(3600));
    let template = Template::from_toml("panel.toml", PANEL).unwrap();
    let people: Vec<Value> = (0..personas)
        .map(|i| json!({"name": format!("Persona {i}")}))
        .collect();
    let inputs = json!({"personas": people});
    let graph = template.job_graph(&inputs).unwrap();
    let mut admin = redis.client().get_connection().unwrap();

    let mut created = Vec::new();
    let mut create_lat = Vec::new();
    for _ in 0..reports {
        let t = Instant::now();
        let c = store
            .create(NewReport {
                tenant: "bench".into(),
                template: template.clone(),
                inputs: inputs.clone(),
                graph: graph.clone(),
                lane: "batch".into(),
                idempotency_key: None,
                callback_url: None,
                batch_api: None,
            })
            .await
            .unwrap();
        create_lat.push(t.elapsed());
        created.push(c);
    }

    let (calls0, cpu0) = redis_stats(&mut admin);
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for c in &created {
        for node in &c.ready {
            let (store, limit) = (store.clone(), limit.clone());
            let (report, job) = (c.report_id.clone(), node.id.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await.unwrap();
                let mut lat = Vec::new();
                let mut queue = vec![job];
                while let Some(job) = queue.pop() {
                    let t = Instant::now();
                    store.start(&report, &job, 1).await.unwrap();
                    let s = t.elapsed();
                    let t = Instant::now();
                    let rel = store
                        .complete(&report, &job, result(format!("text of {job} ").repeat(40)))
                        .await
                        .unwrap();
                    lat.push((s, t.elapsed()));
                    queue.extend(rel.ready.into_iter().map(|n| n.id));
                }
                lat
            });
        }
    }
    let mut start_lat = Vec::new();
    let mut complete_lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        for (s, c) in r.unwrap() {
            start_lat.push(s);
            complete_lat.push(c);
        }
    }
    let elapsed = started.elapsed();
    let (calls1, cpu1) = redis_stats(&mut admin);
    let jobs = start_lat.len();

    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut admin)
        .unwrap();
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            println!("{line}");
        }
    }
    let t = Instant::now();
    let view = store.view(&created[0].report_id).await.unwrap().unwrap();
    let view_lat = t.elapsed();
    let t = Instant::now();
    let md = render_markdown(&view);
    let js = render_json(&view).to_string();
    let render_lat = t.elapsed();

    println!(
        "reports {reports} × ({personas} personas + summary) = {jobs} jobs, concurrency {concurrency}"
    );
    println!(
        "create: p50 {:?} p99 {:?}",
        percentile(&mut create_lat, 0.5),
        percentile(&mut create_lat, 0.99)
    );
    println!(
        "start:    p50 {:?} p99 {:?}",
        percentile(&mut start_lat, 0.5),
        percentile(&mut start_lat, 0.99)
    );
    println!(
        "complete: p50 {:?} p99 {:?}",
        percentile(&mut complete_lat, 0.5),
        percentile(&mut complete_lat, 0.99)
    );
    println!(
        "jobs/s (start + complete): {:.0}",
        jobs as f64 / elapsed.as_secs_f64()
    );
    println!(
        "redis per job: {:.1} commands (incl. those inside scripts), {:.1} µs CPU",
        (calls1 - calls0) as f64 / jobs as f64,
        (cpu1 - cpu0) * 1e6 / jobs as f64
    );
    println!(
        "view of a {}-job report: {:?}; markdown + json render: {:?} ({} + {} bytes)",
        view.sections.len(),
        view_lat,
        render_lat,
        md.len(),
        js.len()
    );
}
