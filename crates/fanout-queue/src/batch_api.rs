//! The Redis state of the lane on the provider's Batch API: sections waiting for a batch
//! ("lines"), the batches formed from them (which lines, which API key and model, the
//! provider's file and batch ids once known), and where each line is. Any worker process can
//! pick a batch up from here after another stopped; every change is a script that applies
//! once, so a repeated step (after a crash, or by a second process) changes nothing.
//!
//! A line is opaque here (the worker's JSON); this module only moves it between *waiting*
//! (`p`), *in batch* `<id>` and *moved to a live call* (`live`), and forgets it when its
//! section is settled. All keys share the hash tag `{<namespace>:batchapi}`: one cluster slot.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use fanout_core::redis::{Pool, SharedConnection};

use crate::error::{Error, Result};
use crate::job::system_time_ms;

static PARK: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/batch_park.lua")));
static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/batch_claim.lua")));
static SETTLE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/batch_settle.lua")));
static LOCK: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/batch_lock.lua")));

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Where {
    /// Waiting for the next batch.
    Waiting,
    /// In the batch with this (our) id.
    Batch(String),
    /// Moved to a live call.
    Live,
}

impl Where {
    fn encode(&self) -> String {
        match self {
            Self::Waiting => "p".to_owned(),
            Self::Batch(id) => format!("b:{id}"),
            Self::Live => "live".to_owned(),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        match s {
            "p" => Some(Self::Waiting),
            "live" => Some(Self::Live),
            _ => s.strip_prefix("b:").map(|id| Self::Batch(id.to_owned())),
        }
    }
}

/// What becomes of a line (see [`BatchApiStore::settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Its section is settled (completed, failed, cancelled): forget it.
    Done,
    /// Wait for the next batch again, as this line.
    Retry(String),
    /// Moved to a live call.
    Live,
}

/// One batch we formed, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBatch {
    /// Our id: the input file is named after it, and the provider batch carries it in its
    /// metadata, so both can be found again after a crash.
    pub id: String,
    /// The API key name it is submitted with.
    pub key: String,
    pub model: String,
    /// Enqueued tokens its lines count for (prompt + `max_tokens` estimates).
    pub tokens: u64,
    pub created_ms: u64,
    /// `formed` (lines chosen), `uploaded` (`file_id` known), `submitted` (`provider_id`
    /// known).
    pub state: String,
    pub file_id: Option<String>,
    pub provider_id: Option<String>,
    /// How many lines it was formed with ([`BatchApiStore::members`] lists them).
    pub count: u64,
    /// When it was last looked at (ms).
    pub polled_ms: u64,
    /// A cancel was sent to the provider.
    pub cancel_sent: bool,
    /// An upload was started (it may have reached the provider without being recorded).
    pub upload_started: bool,
    /// A batch creation was started (likewise).
    pub create_started: bool,
    /// When it was submitted (ms).
    pub submitted_ms: Option<u64>,
}

/// Counts for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchApiSummary {
    /// Lines waiting for a batch.
    pub waiting: u64,
    /// Batches formed and not finished.
    pub open: u64,
    /// Lines the open batches were formed with.
    pub in_batches: u64,
    /// Enqueued tokens of the open batches.
    pub enqueued_tokens: u64,
}

/// The Batch API lane's state for one namespace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BatchApiStore {
    shared: SharedConnection,
    prefix: String,
}

impl BatchApiStore {
    pub fn new(pool: Pool, namespace: &str) -> Self {
        Self {
            shared: SharedConnection::new(pool),
            prefix: format!("{{{namespace}:batchapi}}"),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    fn batch_key(&self, id: &str) -> String {
        format!("{}:batch:{id}", self.prefix)
    }

    fn members_key(&self, id: &str) -> String {
        format!("{}:batch:{id}:members", self.prefix)
    }

    fn learnt_key(&self, key: &str, model: &str) -> String {
        format!("{}:learnt:{key}|{model}", self.prefix)
    }

    async fn conn(&self) -> Result<fanout_core::redis::Connection> {
        Ok(self.shared.get().await?)
    }

    fn broken(&self, e: redis::RedisError) -> Error {
        self.shared.check(&e);
        Error::Redis(e)
    }

    /// Runs a script of the lane and waits until `redis.wait_replicas` replicas hold what it
    /// wrote, before the caller builds on it (an ack, an upload).
    async fn write<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.conn().await?;
        let reply: T = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        self.shared
            .replicated(&conn, &[&self.key("where")])
            .await
            .map_err(|e| self.broken(e))?;
        Ok(reply)
    }

    /// A line waits for a batch (idempotent); `deadline_ms` is its report's deadline, if any.
    /// Returns where it is: [`Where::Waiting`] when parked now or before, else where an
    /// earlier delivery of the same job put it.
    pub async fn park(&self, member: &str, line: &str, deadline_ms: Option<u64>) -> Result<Where> {
        let mut inv = PARK.prepare_invoke();
        inv.key(self.key("lines"))
            .key(self.key("where"))
            .key(self.key("pending"))
            .key(self.key("deadlines"))
            .arg(member)
            .arg(line)
            .arg(now_ms())
            .arg(deadline_ms.map(|d| d.to_string()).unwrap_or_default());
        let w: String = self.write(&inv).await?;
        Where::decode(&w).ok_or_else(|| Error::Protocol(format!("park answered `{w}`")))
    }

    /// How many lines wait, and when the oldest was parked (ms).
    pub async fn waiting_since(&self) -> Result<(u64, Option<u64>)> {
        let mut conn = self.conn().await?;
        let (count, oldest): (u64, Vec<(String, u64)>) = redis::pipe()
            .cmd("ZCARD")
            .arg(self.key("pending"))
            .cmd("ZRANGE")
            .arg(self.key("pending"))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok((count, oldest.first().map(|(_, at)| *at)))
    }

    /// Lines (waiting or in a batch) whose report's deadline is at or before `until_ms`, at
    /// most `limit`.
    pub async fn due(&self, until_ms: u64, limit: usize) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        redis::cmd("ZRANGE")
            .arg(self.key("deadlines"))
            .arg("-inf")
            .arg(until_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))
    }

    /// The deadline of each of `members` (`None`: none, or forgotten).
    pub async fn deadlines(&self, members: &[String]) -> Result<Vec<Option<u64>>> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(self.key("deadlines"))
            .arg(members)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(scores.into_iter().map(|s| s.map(|s| s as u64)).collect())
    }

    /// The oldest `limit` waiting lines: (member, line, parked at ms).
    pub async fn waiting(&self, limit: usize) -> Result<Vec<(String, String, u64)>> {
        let mut conn = self.conn().await?;
        let members: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(self.key("pending"))
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let lines = self
            .lines(&members.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>())
            .await?;
        Ok(members
            .into_iter()
            .zip(lines)
            .filter_map(|((m, at), line)| line.map(|l| (m, l, at)))
            .collect())
    }

    /// The fields `members` of hash `name`.
    async fn hmget(&self, name: &str, members: &[String]) -> Result<Vec<Option<String>>> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        redis::cmd("HMGET")
            .arg(self.key(name))
            .arg(members)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))
    }

    /// The lines of `members` (`None`: forgotten).
    pub async fn lines(&self, members: &[String]) -> Result<Vec<Option<String>>> {
        self.hmget("lines", members).await
    }

    /// Where each of `members` is (`None`: forgotten).
    pub async fn locate(&self, members: &[String]) -> Result<Vec<Option<Where>>> {
        let raw = self.hmget("where", members).await?;
        Ok(raw
            .into_iter()
            .map(|w| w.and_then(|w| Where::decode(&w)))
            .collect())
    }

    /// Forms batch `id` (API key `key`, `model`) of those `lines` (member, enqueued tokens)
    /// still waiting. Returns the members it took, in the order given.
    pub async fn claim(
        &self,
        id: &str,
        key: &str,
        model: &str,
        lines: &[(String, u64)],
    ) -> Result<Vec<String>> {
        let mut inv = CLAIM.prepare_invoke();
        inv.key(self.key("where"))
            .key(self.key("pending"))
            .key(self.key("open"))
            .key(self.batch_key(id))
            .key(self.members_key(id))
            .arg(id)
            .arg(key)
            .arg(model)
            .arg(now_ms());
        for (member, tokens) in lines {
            inv.arg(member).arg(tokens);
        }
        let claimed: Vec<String> = self.write(&inv).await?;
        Ok(claimed)
    }

    /// Applies `action` to `member` if it is still `at`: true when applied, false when it was
    /// elsewhere (settled by someone else; nothing changed).
    pub async fn settle(&self, member: &str, at: &Where, action: Settle) -> Result<bool> {
        let (name, line) = match &action {
            Settle::Done => ("done", ""),
            Settle::Retry(line) => ("retry", line.as_str()),
            Settle::Live => ("live", ""),
        };
        let mut inv = SETTLE.prepare_invoke();
        inv.key(self.key("lines"))
            .key(self.key("where"))
            .key(self.key("pending"))
            .key(self.key("deadlines"))
            .arg(member)
            .arg(at.encode())
            .arg(name)
            .arg(line)
            .arg(now_ms());
        let applied: i64 = self.write(&inv).await?;
        Ok(applied == 1)
    }

    /// Every batch formed and not finished, oldest first.
    pub async fn open(&self) -> Result<Vec<OpenBatch>> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.key("open"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.batch_key(&id))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            if fields.is_empty() {
                // Finished between the two reads.
                continue;
            }
            let num = |f: &str| fields.get(f).and_then(|v| v.parse().ok()).unwrap_or(0);
            let text = |f: &str| fields.get(f).filter(|v| !v.is_empty()).cloned();
            out.push(OpenBatch {
                key: text("key").unwrap_or_default(),
                model: text("model").unwrap_or_default(),
                tokens: num("tokens"),
                created_ms: num("created_ms"),
                state: text("state").unwrap_or_default(),
                file_id: text("file_id"),
                provider_id: text("provider_id"),
                count: num("count"),
                polled_ms: num("polled_ms"),
                cancel_sent: fields.contains_key("cancel_sent"),
                upload_started: fields.contains_key("upload_started"),
                create_started: fields.contains_key("create_started"),
                submitted_ms: text("submitted_ms").and_then(|v| v.parse().ok()),
                id,
            });
        }
        Ok(out)
    }

    /// The lines batch `id` was formed with, in file order.
    pub async fn members(&self, id: &str) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.members_key(id))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        match raw {
            None => Ok(Vec::new()),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| Error::Protocol(format!("members of batch {id}: {e}"))),
        }
    }

    /// Records fields of batch `id` (its file id, provider id, state, when polled).
    pub async fn record(&self, id: &str, fields: &[(&str, String)]) -> Result<()> {
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.batch_key(id));
        for (k, v) in fields {
            cmd.arg(*k).arg(v);
        }
        let _: () = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        self.shared
            .replicated(&conn, &[&self.batch_key(id)])
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// Batch `id` is finished: every line of it was settled. Kept once replicas have it, as
    /// the provider's files are deleted next.
    pub async fn finish(&self, id: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: () = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.batch_key(id))
            .arg(self.members_key(id))
            .cmd("ZREM")
            .arg(self.key("open"))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        self.shared
            .replicated(&conn, &[&self.key("open")])
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// Takes or keeps the submitter's lease for `owner` for at least `lease` (a renewal never
    /// shortens it): true while `owner` holds it.
    pub async fn lease(&self, owner: &str, lease: Duration) -> Result<bool> {
        self.lock(owner, lease, false).await
    }

    /// [`BatchApiStore::lease`], set to exactly `lease` from now (to shorten it again after a
    /// long request).
    pub async fn lease_exactly(&self, owner: &str, lease: Duration) -> Result<bool> {
        self.lock(owner, lease, true).await
    }

    async fn lock(&self, owner: &str, lease: Duration, exact: bool) -> Result<bool> {
        let mut inv = LOCK.prepare_invoke();
        inv.key(self.key("lock"))
            .arg(owner)
            .arg(lease.as_millis().max(1) as u64)
            .arg(if exact { "exact" } else { "" });
        let mut conn = self.conn().await?;
        let held: i64 = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(held == 1)
    }

    /// Gives the lease up if `owner` holds it (a process shutting down).
    pub async fn release_lease(&self, owner: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(self.key("lock"))
        .arg(owner)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// A lower enqueued-token limit learnt for (`key`, `model`), while it lasts.
    pub async fn learnt(&self, key: &str, model: &str) -> Result<Option<u64>> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.learnt_key(key, model))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))
    }

    /// Remembers a lower enqueued-token limit for (`key`, `model`) for `ttl`.
    pub async fn learn(&self, key: &str, model: &str, tokens: u64, ttl: Duration) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: () = redis::cmd("SET")
            .arg(self.learnt_key(key, model))
            .arg(tokens)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// Lines waiting, batches open, lines in them and their enqueued tokens.
    pub async fn summary(&self) -> Result<BatchApiSummary> {
        let waiting: u64 = {
            let mut conn = self.conn().await?;
            redis::cmd("ZCARD")
                .arg(self.key("pending"))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let open = self.open().await?;
        Ok(BatchApiSummary {
            waiting,
            open: open.len() as u64,
            in_batches: open.iter().map(|b| b.count).sum(),
            enqueued_tokens: open.iter().map(|b| b.tokens).sum(),
        })
    }
}

fn now_ms() -> u64 {
    system_time_ms(SystemTime::now())
}
