//! A private `redis-server` for `fanout demo` and `fanout bench` when no REDIS_URL is given.

use std::time::Duration;

use anyhow::Context;

/// A redis-server child on a free port; killed when dropped.
#[derive(Debug)]
pub(crate) struct LocalRedis {
    port: u16,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl LocalRedis {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (run `make deps`, or set REDIS_URL)")?;
        let redis = Self {
            port,
            _dir: dir,
            _child: child,
        };
        let client = redis::Client::open(redis.url())?;
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(redis);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("redis-server on port {port} did not answer within 5s")
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
