//! The Redis connections every component shares: a pool built from `[redis]`, and a
//! [`SharedConnection`] per component for scripts and other non-blocking commands.
//!
//! Every `Pool::get` of a recycled deadpool-redis connection costs a PING round trip (its
//! health check). A multiplexed connection serves any number of concurrent callers, so the hot
//! paths (enqueue, claim, budget, completion) keep one, taken out of the pool, and go back to the
//! pool only after a connection-level error. Blocking reads (`XREADGROUP BLOCK`, `XREAD BLOCK`)
//! take their own connection from the pool: nothing may queue behind a blocked command.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::{Pool, PoolError};
use redis::RedisError;
use redis::aio::MultiplexedConnection;

use crate::config::{RedisConfig, redact_url};

/// A connection pool sized and timed from the config. `redis.command_timeout_ms` bounds
/// connecting, waiting for a pooled connection and each response (the client's own default is
/// 500 ms, which a busy machine exceeds at start-up under a burst of jobs).
pub fn pool(config: &RedisConfig) -> Result<Pool, String> {
    let timeout = Duration::from_millis(config.command_timeout_ms);
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
        .map_err(|e| format!("redis url {}: {e}", redact_url(&config.url)))?;
    Pool::builder(manager)
        .max_size(config.pool_size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(|e| format!("redis pool for {}: {e}", redact_url(&config.url)))
}

/// One multiplexed connection shared by every non-blocking call of a component; cheap to clone.
#[derive(Clone)]
pub struct SharedConnection {
    pool: Pool,
    slot: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl SharedConnection {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            slot: Arc::new(Mutex::new(None)),
        }
    }

    /// The pool, for blocking reads that need a connection of their own.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The shared connection, opened (taken out of the pool) on first use or after a failure.
    pub async fn get(&self) -> Result<MultiplexedConnection, PoolError> {
        if let Some(c) = self.slot.lock().expect("connection slot").as_ref() {
            return Ok(c.clone());
        }
        let c = deadpool_redis::Connection::take(self.pool.get().await?);
        let mut slot = self.slot.lock().expect("connection slot");
        Ok(slot.get_or_insert(c).clone())
    }

    /// Retire the shared connection after a connection-level error, so the next call opens a
    /// fresh one (a restarted Redis, a dropped socket). Other errors leave it alone.
    pub fn check(&self, e: &RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.slot.lock().expect("connection slot").take();
        }
    }
}
