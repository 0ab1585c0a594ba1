//! Submissions per minute per tenant (`api.submissions_per_minute`), counted in Redis so that
//! every API replica shares one limit: a fixed one-minute window per tenant (`lua/`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use fanout_core::redis::Pool;
use redis::Script;

use super::error::ApiError;

const WINDOW: Duration = Duration::from_secs(60);

/// The Redis keys of the API.
#[derive(Debug, Clone)]
pub(crate) struct ApiKeys {
    namespace: String,
}

impl ApiKeys {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }

    /// STRING: submissions of `tenant` in the current window; expires with the window. The
    /// hash tag keeps every window key in one slot with the other API keys.
    pub(crate) fn submit_window(&self, tenant: &str) -> String {
        format!("{{{}:api}}:submits:{tenant}", self.namespace)
    }
}

/// The per-tenant submission limit.
#[derive(Debug, Clone)]
pub(crate) struct SubmitLimiter {
    per_window: u32,
    keys: ApiKeys,
    script: Arc<Script>,
}

impl SubmitLimiter {
    /// `per_minute == 0` turns the limit off.
    pub(crate) fn new(per_minute: u32, namespace: &str) -> Self {
        Self {
            per_window: per_minute,
            keys: ApiKeys::new(namespace),
            script: Arc::new(Script::new(include_str!("lua/submit_window.lua"))),
        }
    }

    /// Count one submission; `Err` 429 with `retry-after` when the tenant is over its limit,
    /// 503 when Redis is unavailable.
    pub(crate) async fn check(&self, pool: &Pool, tenant: &str) -> Result<(), ApiError> {
        if self.per_window == 0 {
            return Ok(());
        }
        let mut conn = pool.get().await.map_err(ApiError::unavailable)?;
        let (allowed, _count, reset_ms): (u8, u64, u64) = self
            .script
            .key(self.keys.submit_window(tenant))
            .arg(self.per_window)
            .arg(WINDOW.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(ApiError::unavailable)?;
        if allowed == 1 {
            return Ok(());
        }
        tracing::info!(
            tenant,
            limit = self.per_window,
            "submission rate limit reached"
        );
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "more than {} submissions in a minute; retry after the delay in `retry-after`",
                self.per_window
            ),
        )
        .with_retry_after(reset_ms.div_ceil(1000)))
    }
}
