//! The worker registry: each worker process beats every third of its liveness TTL; one that
//! stops (SIGKILL, lost host) is gone when the TTL lapses, and the claim script hands the jobs
//! it held to live workers at once instead of after the visibility timeout.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::queue::{Queue, array, string};

pub(crate) static BEAT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/beat.lua")));

static ALIVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local t = redis.call('TIME') \
         return redis.call('ZCOUNT', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), '+inf')",
    )
});

/// What a worker process says about itself, as `fanout status` and `GET /v1/status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    /// Its consumer name (`<prefix>-<host>-<pid>-<random>`).
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    /// Unix ms.
    pub started_at_ms: u64,
    /// Jobs it may run at once.
    pub concurrency: usize,
    /// Jobs it was running at its last beat.
    pub in_flight: usize,
    /// Its liveness TTL: it counts as gone this long after its last beat.
    pub ttl_ms: u64,
    /// Its last beat (Unix ms, Redis clock). Filled in on read.
    #[serde(default)]
    pub last_seen_ms: u64,
}

impl Queue {
    /// Say that `info.id` is alive for `info.ttl_ms` more. Returns how many other workers have
    /// gone silent (their jobs are being taken over by whoever claims next).
    pub async fn beat(&self, info: &WorkerInfo) -> Result<u64> {
        self.beat_with(info, info.ttl_ms.max(1)).await
    }

    /// A worker stops: it counts as gone now, so whatever it still holds is reclaimed by the
    /// next claim anywhere, and it leaves the registry once it holds nothing.
    pub async fn leave(&self, info: &WorkerInfo) -> Result<()> {
        self.beat_with(info, 0).await.map(|_| ())
    }

    async fn beat_with(&self, info: &WorkerInfo, ttl_ms: u64) -> Result<u64> {
        let keys = self.keys();
        let json = serde_json::to_string(info)
            .map_err(|e| Error::Protocol(format!("worker info: {e}")))?;
        let mut inv = BEAT.prepare_invoke();
        inv.key(keys.workers())
            .key(keys.worker_info())
            .key(keys.wake())
            .key(keys.last_beat())
            .arg(&info.id)
            .arg(ttl_ms)
            .arg(json);
        let mut conn = self.conn().await?;
        let lapsed: u64 = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(lapsed)
    }

    /// How many worker processes are alive now (one round trip; for every submit).
    pub async fn workers_alive(&self) -> Result<u64> {
        let mut conn = self.conn().await?;
        let n: u64 = ALIVE
            .key(self.keys().workers())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(n)
    }

    /// The worker processes alive now (beat within their TTL), oldest first.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let keys = self.keys();
        let mut conn = self.conn().await?;
        let (time, alive): (Vec<String>, Value) = redis::pipe()
            .cmd("TIME")
            .cmd("ZRANGE")
            .arg(keys.workers())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let now_ms = match time.as_slice() {
            [s, us, ..] => {
                s.parse::<u64>().unwrap_or(0) * 1000 + us.parse::<u64>().unwrap_or(0) / 1000
            }
            _ => return Err(Error::Protocol("TIME answered no time".into())),
        };
        let flat = array(alive, "workers")?;
        let mut ids = Vec::new();
        let mut expiries = Vec::new();
        let mut it = flat.into_iter();
        while let (Some(id), Some(score)) = (it.next(), it.next()) {
            let expires = string(&score)?.parse::<f64>().unwrap_or(0.0) as u64;
            if expires >= now_ms {
                ids.push(string(&id)?);
                expiries.push(expires);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.worker_info())
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut out: Vec<WorkerInfo> = ids
            .into_iter()
            .zip(expiries)
            .zip(raw)
            .filter_map(|((id, expires), json)| {
                let mut w: WorkerInfo = json.and_then(|j| serde_json::from_str(&j).ok())?;
                w.id = id;
                w.last_seen_ms = expires.saturating_sub(w.ttl_ms);
                Some(w)
            })
            .collect();
        out.sort_by_key(|w| (w.started_at_ms, w.id.clone()));
        Ok(out)
    }
}

/// The beat period for a liveness TTL: three beats per TTL, so one late beat is not a death.
pub(crate) fn beat_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(50))
}
