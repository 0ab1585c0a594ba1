//! The response cache: identical requests (model, messages, `max_tokens`, temperature) answered
//! from Redis for a TTL. Best effort: when Redis fails, the call goes to the provider.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncCommands as _};
use fanout_core::redis::Connection as RedisConnection;
use fanout_core::redis::Pool;
use fanout_core::redis::SharedConnection;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::debug;

use crate::client::{ChatRequest, ChatResponse};

/// Bumped when the cached value or the hashed fields change, so old entries are never misread.
const FORMAT: &str = "v1";

/// Key schema of the cache.
#[derive(Debug, Clone)]
pub struct CacheKeys {
    namespace: String,
}

impl CacheKeys {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }

    /// `{ns}:cache:<sha256 hex>` — a string holding the JSON of a [`ChatResponse`], with a TTL.
    /// Single-key commands only, so the namespace is not a hash tag and entries spread over
    /// cluster slots.
    pub fn entry(&self, req: &ChatRequest) -> String {
        format!("{}:cache:{}", self.namespace, request_hash(req))
    }
}

/// SHA-256 (hex) of the request fields that determine the answer.
pub fn request_hash(req: &ChatRequest) -> String {
    #[derive(Serialize)]
    struct Hashed<'a> {
        format: &'static str,
        model: &'a str,
        system: Option<&'a str>,
        user: &'a str,
        max_tokens: u32,
        temperature: Option<f32>,
    }
    let hashed = Hashed {
        format: FORMAT,
        model: &req.model,
        system: req.system.as_deref(),
        user: &req.user,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
    };
    let bytes = serde_json::to_vec(&hashed).expect("plain fields always serialize");
    hex::encode(Sha256::digest(bytes))
}

/// Hit, miss and error counts of a [`ResponseCache`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Redis failures and unreadable entries (each also counted as a miss on `get`).
    pub errors: u64,
}

/// Responses by request, in Redis. Failures are logged at DEBUG, counted, and read as a miss.
#[derive(Debug)]
pub struct ResponseCache {
    shared: SharedConnection,
    keys: CacheKeys,
    ttl: Duration,
    op_timeout: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
}

impl ResponseCache {
    /// A cache in `namespace` whose entries live `ttl`; each Redis operation gets 1 s.
    pub fn new(pool: Pool, namespace: &str, ttl: Duration) -> Self {
        Self {
            shared: SharedConnection::new(pool),
            keys: CacheKeys::new(namespace),
            ttl: ttl.max(Duration::from_millis(1)),
            op_timeout: Duration::from_secs(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// How long one cache read or write may take before it counts as a miss.
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    pub fn keys(&self) -> &CacheKeys {
        &self.keys
    }

    /// The cached response to `req`, marked `cached`; `None` on a miss or any failure.
    pub async fn get(&self, req: &ChatRequest) -> Option<ChatResponse> {
        let key = self.keys.entry(req);
        let read = self
            .with_conn(async |mut conn: RedisConnection| conn.get::<_, Option<Vec<u8>>>(&key).await)
            .await;
        let found = match read {
            Ok(Some(bytes)) => match serde_json::from_slice::<ChatResponse>(&bytes) {
                Ok(mut response) => {
                    response.cached = true;
                    response.headers = Default::default();
                    Some(response)
                }
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    debug!(key, error = %e, "cache entry unreadable, treated as a miss");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "cache read failed, treated as a miss");
                None
            }
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores `resp` as the answer to `req` for the TTL. Never fails; a failure is counted.
    pub async fn put(&self, req: &ChatRequest, resp: &ChatResponse) {
        let key = self.keys.entry(req);
        let value = match serde_json::to_vec(&ChatResponse {
            cached: false,
            headers: Default::default(),
            ..resp.clone()
        }) {
            Ok(v) => v,
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "cache entry not serializable");
                return;
            }
        };
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let written = self
            .with_conn(async |mut conn: RedisConnection| {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = written {
            self.errors.fetch_add(1, Ordering::Relaxed);
            debug!(error = %e, "cache write failed");
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// Runs `op` on the shared connection within the operation timeout; any failure is a
    /// string.
    async fn with_conn<T>(
        &self,
        op: impl AsyncFnOnce(RedisConnection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let work = async {
            let conn = self.shared.get().await.map_err(|e| e.to_string())?;
            op(conn).await.map_err(|e| {
                self.shared.check(&e);
                e.to_string()
            })
        };
        match tokio::time::timeout(self.op_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {:?}", self.op_timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_covers_every_field() {
        let base = ChatRequest {
            model: "gpt-4o-mini".into(),
            system: None,
            user: "hi".into(),
            max_tokens: 10,
            temperature: None,
        };
        let variants = [
            ChatRequest {
                model: "gpt-4o".into(),
                ..base.clone()
            },
            ChatRequest {
                system: Some(String::new()),
                ..base.clone()
            },
            ChatRequest {
                user: "hi ".into(),
                ..base.clone()
            },
            ChatRequest {
                max_tokens: 11,
                ..base.clone()
            },
            ChatRequest {
                temperature: Some(0.0),
                ..base.clone()
            },
        ];
        let h = request_hash(&base);
        assert_eq!(h.len(), 64);
        assert_eq!(h, request_hash(&base.clone()));
        for v in &variants {
            assert_ne!(request_hash(v), h, "{v:?}");
        }
        assert!(CacheKeys::new("ns").entry(&base).starts_with("ns:cache:"));
    }
}
