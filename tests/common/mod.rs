//! A Fanout cluster of real processes for whole-system scenarios: a private redis-server, the
//! simulated provider, N workers and an aggregator, each a `fanout` process.

use std::time::Duration;

use fanout_test_support::{FanoutProcess, RedisServer, free_port, run_fanout, wait_for_port};

pub use tempfile;

/// A running cluster. Everything is killed when it is dropped.
#[derive(Debug)]
pub struct Cluster {
    // Fields drop in order: the processes go before the Redis they use.
    pub workers: Vec<FanoutProcess>,
    pub aggregator: FanoutProcess,
    pub sim: FanoutProcess,
    pub redis: RedisServer,
    pub env: Vec<(String, String)>,
    pub sim_port: u16,
    /// `/metrics` ports of the workers, then of the aggregator.
    pub metrics_ports: Vec<u16>,
    pub concurrency: usize,
    pub log_dir: Option<std::path::PathBuf>,
    /// The `--config` file the workers and the aggregator load, if any.
    pub config: Option<std::path::PathBuf>,
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub workers: usize,
    pub concurrency: usize,
    /// Simulated provider time scale (0.002: a 25 s call takes 50 ms).
    pub time_scale: f64,
    /// Extra `fanout sim` flags.
    pub sim_args: Vec<String>,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
    /// Redis keeps an append-only file (`appendfsync everysec`): a crash and restart keeps
    /// what was written up to about a second before.
    pub redis_aof: bool,
    /// Each process's logs go to `<dir>/<name>.log` instead of the test's stderr.
    pub log_dir: Option<std::path::PathBuf>,
    /// A Redis password (every process gets it in `REDIS_URL`).
    pub redis_password: Option<String>,
    /// A config file (`--config`) for the workers and the aggregator: what environment
    /// variables cannot set, such as `[budget_tenants]`.
    pub config: Option<std::path::PathBuf>,
    /// Run on a local Redis Cluster of 3 masters with this many replicas each and this
    /// `cluster-node-timeout` (ms), whatever `FANOUT_TEST_REDIS` says.
    pub redis_cluster: Option<(usize, u64)>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            workers: 2,
            concurrency: 8,
            time_scale: 0.002,
            sim_args: Vec::new(),
            env: Vec::new(),
            redis_aof: false,
            log_dir: None,
            redis_password: None,
            config: None,
            redis_cluster: None,
        }
    }
}

impl Cluster {
    pub fn start(spec: ClusterSpec) -> Self {
        let redis = if let Some((replicas, node_timeout_ms)) = spec.redis_cluster {
            RedisServer::on_cluster(fanout_test_support::RedisCluster::start_with(
                3,
                replicas,
                node_timeout_ms,
            ))
        } else if spec.redis_aof {
            RedisServer::start_aof()
        } else {
            RedisServer::start()
        };
        if let Some(pw) = &spec.redis_password {
            let mut c = redis.conn();
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("requirepass")
                .arg(pw)
                .query(&mut c)
                .expect("set a redis password");
        }
        let redis_url = match &spec.redis_password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", redis.port()),
            None => redis.url(),
        };
        let sim_port = free_port();
        let listen = format!("127.0.0.1:{sim_port}");
        let scale = spec.time_scale.to_string();
        let mut sim_args = vec!["sim", "--listen", &listen, "--time-scale", &scale];
        sim_args.extend(spec.sim_args.iter().map(String::as_str));
        let start = |name: &str, args: &[&str], env: &[(String, String)]| match &spec.log_dir {
            Some(dir) => {
                FanoutProcess::start_logged(name, args, env, &dir.join(format!("{name}.log")))
            }
            None => FanoutProcess::start(name, args, env),
        };
        let sim = start("sim", &sim_args, &[]);
        let config = spec.config.as_ref().map(|p| p.display().to_string());
        let with_config = |args: &[&str]| -> Vec<String> {
            let mut all: Vec<String> = match &config {
                Some(path) => vec!["--config".into(), path.clone()],
                None => Vec::new(),
            };
            all.extend(args.iter().map(|a| (*a).to_owned()));
            all
        };
        assert!(
            wait_for_port(sim_port, Duration::from_secs(20)),
            "fanout sim did not listen"
        );
        let mut env: Vec<(String, String)> = [
            ("REDIS_URL", redis_url),
            ("OPENAI_BASE_URL", format!("http://127.0.0.1:{sim_port}/v1")),
            ("OPENAI_API_KEY", "sk-system-test-key-0001".to_owned()),
            ("FANOUT_REDIS__NAMESPACE", "systest".to_owned()),
            ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS", "2".to_owned()),
            ("FANOUT_QUEUE__RETRY_BASE_MS", "20".to_owned()),
            ("FANOUT_QUEUE__RETRY_MAX_MS", "200".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(spec.env.iter().cloned());
        let concurrency = spec.concurrency.to_string();
        let metrics_ports: Vec<u16> = (0..=spec.workers).map(|_| free_port()).collect();
        let addr = |i: usize| format!("127.0.0.1:{}", metrics_ports[i]);
        let workers = (0..spec.workers)
            .map(|i| {
                let metrics = addr(i);
                let args = with_config(&[
                    "worker",
                    "--concurrency",
                    &concurrency,
                    "--grace",
                    "5",
                    "--metrics-addr",
                    &metrics,
                ]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                start(&format!("worker-{i}"), &args, &env)
            })
            .collect();
        let metrics = addr(spec.workers);
        let args = with_config(&["aggregator", "--metrics-addr", &metrics]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let aggregator = start("aggregator", &args, &env);
        Self {
            redis,
            sim,
            workers,
            aggregator,
            env,
            sim_port,
            metrics_ports,
            concurrency: spec.concurrency,
            log_dir: spec.log_dir.clone(),
            config: spec.config.clone(),
        }
    }

    /// Start worker `i` again (after a kill), without a metrics port.
    pub fn restart_worker(&mut self, i: usize, generation: usize) {
        let concurrency = self.concurrency.to_string();
        let config = self.config.as_ref().map(|p| p.display().to_string());
        let mut args = Vec::new();
        if let Some(path) = &config {
            args.extend(["--config", path.as_str()]);
        }
        args.extend(["worker", "--concurrency", &concurrency, "--grace", "5"]);
        let name = format!("worker-{i}-{generation}");
        self.workers[i] = match &self.log_dir {
            Some(dir) => FanoutProcess::start_logged(
                &name,
                &args,
                &self.env,
                &dir.join(format!("{name}.log")),
            ),
            None => FanoutProcess::start(&name, &args, &self.env),
        };
    }

    /// Run `fanout <args>` with the cluster's environment: (exit code, stdout, stderr).
    pub fn fanout(&self, args: &[&str]) -> (i32, String, String) {
        run_fanout(args, &self.env)
    }

    /// `fanout submit … --wait`, returning (exit code, report id, stderr).
    pub fn submit_wait(
        &self,
        template: &str,
        input: &str,
        extra: &[&str],
    ) -> (i32, String, String) {
        let mut args = vec!["submit", "--template", template, "--input", input, "--wait"];
        args.extend_from_slice(extra);
        let (code, out, err) = self.fanout(&args);
        let id = out.lines().next().unwrap_or_default().trim().to_owned();
        (code, id, err)
    }

    /// The report's JSON document (`fanout report ID --format json`).
    pub fn report_json(&self, id: &str) -> serde_json::Value {
        let (code, out, err) = self.fanout(&["report", id, "--format", "json"]);
        assert_eq!(code, 0, "fanout report failed: {err}");
        serde_json::from_str(&out).expect("report json")
    }

    /// The report's Markdown document.
    pub fn report_md(&self, id: &str) -> String {
        let (code, out, err) = self.fanout(&["report", id]);
        assert_eq!(code, 0, "fanout report failed: {err}");
        out
    }

    /// Provider statistics from the simulator.
    pub fn sim_stats(&self) -> serde_json::Value {
        let (status, body) = http_get(self.sim_port, "/sim/stats");
        assert_eq!(status, 200, "sim stats: {body}");
        serde_json::from_str(&body).expect("stats json")
    }
}

/// Submit a startup report through the API (`fanout --api … submit`) with `key` as its
/// idempotency key and `extra` arguments, retrying a refused or failed submit with the same key,
/// as a client does, until it is accepted or `timeout` passes (a panic). `between` runs before
/// each retry (to restart a killed API, say). Returns the report id and the number of retries.
pub fn submit_until_accepted(
    api: &str,
    token: &str,
    key: &str,
    extra: &[&str],
    timeout: Duration,
    mut between: impl FnMut(),
) -> (String, usize) {
    let deadline = std::time::Instant::now() + timeout;
    let mut args = vec![
        "--api",
        api,
        "--token",
        token,
        "submit",
        "--template",
        "startup-report",
        "--input",
        "config/examples/startup-report.json",
        "--idempotency-key",
        key,
    ];
    args.extend_from_slice(extra);
    let mut retries = 0;
    loop {
        let (code, out, err) = run_fanout(&args, &[]);
        if code == 0 {
            return (out.lines().next().unwrap_or("").trim().to_owned(), retries);
        }
        retries += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "submit {key} never accepted: {err}"
        );
        between();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Jobs ready, in flight or delayed, over every lane of a `GET /v1/status` (or
/// `fanout status --json`) answer.
pub fn queued(status: &serde_json::Value) -> u64 {
    status["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .map(|l| {
            l["ready"].as_u64().unwrap_or(0)
                + l["in_flight"].as_u64().unwrap_or(0)
                + l["delayed"].as_u64().unwrap_or(0)
        })
        .sum()
}

/// The value of the first sample of `series` whose line contains every label in `labels`.
pub fn sample(text: &str, series: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(series) && l[series.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

/// The value of `series` (summed over the samples with every label in `labels`) on the
/// `/metrics` page served at `port`, if the page answers and has it.
pub fn scrape(port: u16, series: &str, labels: &[&str]) -> Option<f64> {
    let (status, text) = http_get(port, "/metrics");
    (status == 200)
        .then(|| sample(&text, series, labels))
        .flatten()
}

/// `GET path` on 127.0.0.1:`port`: (status, body). Plain HTTP/1.1 with `Connection: close`.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path, None, None)
}

/// `GET path` with `Authorization: Bearer <token>`: (status, body).
pub fn http_get_as(port: u16, path: &str, token: &str) -> (u16, String) {
    http(port, "GET", path, None, Some(token))
}

/// `POST path` with a JSON body: (status, body).
pub fn http_post_json(port: u16, path: &str, body: &serde_json::Value) -> (u16, String) {
    http(port, "POST", path, Some(&body.to_string()), None)
}

/// `POST path` with a JSON body and `Authorization: Bearer <token>`: (status, body).
pub fn http_post_json_as(
    port: u16,
    path: &str,
    body: &serde_json::Value,
    token: &str,
) -> (u16, String) {
    http(port, "POST", path, Some(&body.to_string()), Some(token))
}

fn http(
    port: u16,
    method: &str,
    path: &str,
    json: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let body = json.unwrap_or("");
    let mut content = if json.is_some() {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    } else {
        String::new()
    };
    if let Some(t) = token {
        content.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{content}\r\n{body}"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The `SIM-ANSWER` hash a simulated answer starts with.
pub fn answer_hash(text: &str) -> String {
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("SIM-ANSWER "))
        .expect("a simulated answer")
        .to_owned()
}

/// The answers a simulated answer was given in its prompt (its `refs:` line), in order.
pub fn refs(text: &str) -> Vec<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("refs:"))
        .map(|r| r.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A section of a report JSON document by its id (`section`).
pub fn section<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .find(|s| s["section"] == id)
        .unwrap_or_else(|| panic!("no section {id}"))
}
