//! Script calls over the budget's [`SharedConnection`] (one multiplexed connection, no pool
//! checkout per call).

use std::sync::LazyLock;

use fanout_core::redis::Connection as RedisConnection;
use fanout_core::redis::Pool;
use fanout_core::redis::SharedConnection;
use redis::{RedisError, Script, ScriptInvocation, Value};

use crate::error::{Error, Result};

/// The budget's Lua scripts, hashed once per process.
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) settle: Script,
    pub(crate) feedback: Script,
    pub(crate) renew: Script,
    pub(crate) leave: Script,
    pub(crate) snapshot: Script,
    pub(crate) tenant: Script,
}

pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    acquire: Script::new(concat!(
        include_str!("../lua/limits.lua"),
        include_str!("../lua/acquire.lua")
    )),
    settle: Script::new(concat!(
        include_str!("../lua/limits.lua"),
        include_str!("../lua/settle.lua")
    )),
    feedback: Script::new(concat!(
        include_str!("../lua/limits.lua"),
        include_str!("../lua/feedback.lua")
    )),
    renew: Script::new(include_str!("../lua/renew.lua")),
    leave: Script::new(include_str!("../lua/leave.lua")),
    snapshot: Script::new(concat!(
        include_str!("../lua/limits.lua"),
        include_str!("../lua/snapshot.lua")
    )),
    tenant: Script::new(include_str!("../lua/tenant.lua")),
});

pub(crate) struct Redis {
    shared: SharedConnection,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt(f)
    }
}

impl Redis {
    pub(crate) fn new(pool: Pool) -> Self {
        Self {
            shared: SharedConnection::new(pool),
        }
    }

    async fn conn(&self) -> Result<RedisConnection> {
        Ok(self.shared.get().await?)
    }

    fn forget_on(&self, e: &RedisError) {
        self.shared.check(e);
    }

    /// Every key matching `pattern` (SCAN; on a cluster, on the node of the pattern's hash
    /// tag): for operator reads, never a hot path.
    pub(crate) async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        let conn = self.conn().await?;
        conn.scan_matching(pattern).await.map_err(|e| {
            self.forget_on(&e);
            Error::Redis(e)
        })
    }

    /// EVALSHA the invocation (loading the script on NOSCRIPT).
    pub(crate) async fn run(&self, invocation: &ScriptInvocation<'_>) -> Result<Value> {
        let mut conn = self.conn().await?;
        match invocation.invoke_async::<Value>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.forget_on(&e);
                Err(Error::Redis(e))
            }
        }
    }
}

/// Reading script replies.
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(crate) fn float(v: &Value) -> Option<f64> {
    match v {
        Value::Int(n) => Some(*n as f64),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        Value::Double(d) => Some(*d),
        _ => None,
    }
}

pub(crate) fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(items) => Some(items),
        _ => None,
    }
}
