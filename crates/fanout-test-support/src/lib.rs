#![doc = include_str!("../README.md")]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fanout_core::Config;

mod cluster;
pub use cluster::RedisCluster;

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Whether this test run targets a Redis Cluster: `FANOUT_TEST_REDIS=cluster` (what
/// `make test-cluster` sets). [`RedisServer::start`] then starts a local 3-master cluster, and
/// every test built on it (its [`RedisServer::url`], [`RedisServer::conn`], the processes given
/// that URL) runs against the cluster instead of one server: one suite, two topologies.
pub fn cluster_mode() -> bool {
    static MODE: OnceLock<bool> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("FANOUT_TEST_REDIS").as_deref() {
        Ok("cluster") => true,
        Ok("" | "single") | Err(_) => false,
        Ok(other) => panic!("FANOUT_TEST_REDIS={other}: expected `single` or `cluster`"),
    })
}

/// For a test that needs one server (it kills or restarts it, or reads its `INFO`): in
/// [`cluster_mode`] it says so on stderr and returns true, and the test returns early. `why` names
/// what the cluster run covers instead.
pub fn skip_on_cluster(why: &str) -> bool {
    if cluster_mode() {
        eprintln!("not run on a cluster: {why}");
    }
    cluster_mode()
}

/// A private `redis-server` for one test (or, in [`cluster_mode`], a private local Redis
/// Cluster). Killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// Set in cluster mode: the cluster the test runs on (the fields below are then unused).
    cluster: Option<RedisCluster>,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Serve TLS only (a self-signed certificate made with the `openssl` command).
    tls: bool,
    /// Keep an append-only file (`appendfsync everysec`, as `deploy/` runs Redis), so a
    /// restart after [`RedisServer::kill`] loads what was written up to about a second before.
    aof: bool,
}

impl RedisServer {
    /// Start a fresh server on a free port and wait until it answers PING; in
    /// [`cluster_mode`], a fresh 3-master cluster whose every slot is served.
    pub fn start() -> Self {
        if cluster_mode() {
            return Self::on_cluster(RedisCluster::start());
        }
        Self::start_with(false)
    }

    /// Run on `cluster` (one the test started itself, e.g. with replicas), whatever the mode.
    pub fn on_cluster(cluster: RedisCluster) -> Self {
        Self {
            cluster: Some(cluster),
            port: 0,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
            tls: false,
            aof: false,
        }
    }

    /// The cluster this test runs on, in [`cluster_mode`] or [`RedisServer::on_cluster`], to
    /// kill its nodes.
    pub fn cluster_mut(&mut self) -> Option<&mut RedisCluster> {
        self.cluster.as_mut()
    }

    /// Start a server that persists to an append-only file (`appendfsync everysec`): after
    /// [`RedisServer::kill`] (a crash), [`RedisServer::restart`] loads it back.
    pub fn start_aof() -> Self {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Self {
        // A port can be taken between probing and binding; try a few.
        for _ in 0..5 {
            let mut server = Self {
                cluster: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis"),
                child: None,
                tls: false,
                aof,
            };
            if server.spawn().is_ok() {
                return server;
            }
        }
        panic!("could not start redis-server; is it installed? (scripts/install-deps.sh)");
    }

    /// Start a server that speaks TLS only, with a fresh self-signed certificate; connect with
    /// [`RedisServer::url`] (`rediss://…/#insecure`: the test trusts any certificate).
    pub fn start_tls() -> Self {
        let mut server = Self {
            cluster: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
            tls: true,
            aof: false,
        };
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ])
            .current_dir(server.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl (scripts/install-deps.sh installs it)");
        assert!(status.success(), "openssl could not make a certificate");
        server.spawn().expect("start redis-server with TLS");
        server
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let listen: &[&str] = if self.tls {
            &[
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                "cert.pem",
                "--tls-key-file",
                "key.pem",
                "--tls-ca-cert-file",
                "cert.pem",
                "--tls-auth-clients",
                "no",
            ]
        } else {
            &["--port", &port]
        };
        let child = Command::new(redis_server_path())
            .args(listen)
            .current_dir(self.dir.path())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.aof {
                ["--appendonly", "yes", "--appendfsync", "everysec"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(["--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() || (self.tls && TcpStream::connect(("127.0.0.1", self.port)).is_ok()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && child.try_wait()?.is_some()
            {
                self.child = None;
                anyhow::bail!("redis-server exited at start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        anyhow::bail!("redis-server did not answer PING in 10s")
    }

    /// The server's port (one server only: a cluster has several).
    pub fn port(&self) -> u16 {
        assert!(self.cluster.is_none(), "port() of a cluster; use url()");
        self.port
    }

    /// What `redis.url` should say to reach this server (or cluster).
    pub fn url(&self) -> String {
        if let Some(cluster) = &self.cluster {
            cluster.url()
        } else if self.tls {
            format!("rediss://127.0.0.1:{}/#insecure", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// A client of the one server (not in [`cluster_mode`]; see [`RedisServer::conn`]).
    pub fn client(&self) -> redis::Client {
        assert!(self.cluster.is_none(), "client() of a cluster; use conn()");
        redis::Client::open(self.url()).expect("redis url")
    }

    /// A synchronous connection for test assertions, to the server or, in [`cluster_mode`],
    /// to the cluster (each command goes to the master of its key's slot).
    pub fn conn(&self) -> TestConnection {
        match &self.cluster {
            Some(cluster) => TestConnection::Cluster(Box::new(
                cluster.client().get_connection().expect("cluster"),
            )),
            None => TestConnection::Single(self.client().get_connection().expect("redis")),
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGKILL the server: clients see connection resets, and all data is gone.
    pub fn kill(&mut self) {
        assert!(
            self.cluster.is_none(),
            "kill() of a cluster; see RedisCluster::kill_node"
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the server and wait until its port no longer answers.
    pub fn stop(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ping() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start the server again on the same port: with empty data, like a restarted cache, or
    /// with what its append-only file holds ([`RedisServer::start_aof`]).
    pub fn restart(&mut self) {
        assert!(self.cluster.is_none(), "restart() of a cluster");
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.cluster.is_none() {
            self.kill();
        }
    }
}

/// A synchronous connection to one server or to a cluster, for test assertions: anything that
/// takes a `redis::ConnectionLike` (`query`, `redis::Commands`) takes it.
#[allow(missing_debug_implementations)] // the cluster connection is not Debug
pub enum TestConnection {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl redis::ConnectionLike for TestConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self {
            Self::Single(c) => c.req_command(cmd),
            Self::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Self::Single(c) => c.supports_pipelining(),
            Self::Cluster(c) => c.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Self::Single(c) => c.check_connection(),
            Self::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Self::Single(c) => c.is_open(),
            Self::Cluster(c) => c.is_open(),
        }
    }
}

pub(crate) fn redis_server_path() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A validated config for tests: the defaults, then `overrides` as if they were environment
/// variables, with `REDIS_URL` set to `redis_url`. The process environment is never read.
pub fn test_config(redis_url: &str, overrides: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("REDIS_URL".into(), redis_url.into());
    for (k, v) in overrides {
        env.insert((*k).into(), (*v).into());
    }
    Config::load(None, &env).expect("test config is valid")
}

/// A pool on `url` built like every Fanout process builds its own (`fanout_core::redis::pool`,
/// with the default `[redis]` settings): tests exercise the same timeouts as production.
pub fn redis_pool(url: &str) -> fanout_core::redis::Pool {
    fanout_core::redis::pool(&test_config(url, &[]).redis).expect("redis pool")
}

static FANOUT_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Use this `fanout` binary: integration tests of `fanout-cli` pass
/// `env!("CARGO_BIN_EXE_fanout")`, the binary cargo built for this very test run.
pub fn use_fanout_bin(path: &str) {
    let _ = FANOUT_BIN.set(PathBuf::from(path));
}

/// The path to the `fanout` binary: the one given to [`use_fanout_bin`], or else built once per
/// test process with `cargo build -p fanout-cli`.
pub fn fanout_bin() -> PathBuf {
    FANOUT_BIN
        .get_or_init(|| {
            let root = workspace_root();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(&root)
                .args(["build", "--quiet", "-p", "fanout-cli", "--bin", "fanout"])
                .status()
                .expect("run cargo build for the fanout binary");
            assert!(status.success(), "cargo build -p fanout-cli failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("debug").join("fanout")
        })
        .clone()
}

/// The workspace root (the folder holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    let mut dir: &Path = Path::new(env!("CARGO_MANIFEST_DIR"));
    loop {
        if dir.join("Cargo.lock").exists() {
            return dir.to_owned();
        }
        dir = dir.parent().expect("workspace root above the crate");
    }
}

/// Poll `check` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    check()
}

/// A `fanout` subprocess (worker, aggregator, sim, api) killed when dropped.
#[derive(Debug)]
pub struct FanoutProcess {
    child: Option<Child>,
    name: String,
}

impl FanoutProcess {
    /// Start `fanout <args>` with exactly `env` added to a minimal environment (PATH, HOME), so
    /// the developer's variables never leak into a test. Output goes to the test's stderr.
    pub fn start(name: &str, args: &[&str], env: &[(String, String)]) -> Self {
        let child = fanout_command(args, env)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start fanout {name}: {e}"));
        Self {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    /// Like [`FanoutProcess::start`], with stderr (the logs) appended to `log`.
    pub fn start_logged(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        log: &std::path::Path,
    ) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("log file {}: {e}", log.display()));
        let child = fanout_command(args, env)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("start fanout {name}: {e}"));
        Self {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, as a crashed or OOM-killed process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the process to exit; returns its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        eprintln!(
            "fanout {} did not exit within {timeout:?} of SIGTERM",
            self.name
        );
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for FanoutProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `fanout` command with a minimal environment plus `env`.
pub fn fanout_command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(fanout_bin());
    cmd.args(args).env_clear();
    for var in ["PATH", "HOME", "TMPDIR"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("FANOUT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.current_dir(workspace_root());
    cmd
}

/// Run `fanout <args>` to completion: (exit code, stdout, stderr).
pub fn run_fanout(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let out = fanout_command(args, env)
        .output()
        .unwrap_or_else(|e| panic!("run fanout {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Wait until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    wait_until(timeout, || TcpStream::connect(("127.0.0.1", port)).is_ok())
}
