//! The HTTP API for backend services (axum): submit reports, follow them as Server-Sent
//! Events, read and cancel them; templates, health, readiness, metrics and the OpenAPI
//! document. See the crate README for the routes and the wiring.

mod admin;
mod auth;
mod dto;
mod error;
mod extract;
pub(crate) mod openapi;
mod ratelimit;
mod routes;
mod sse;
mod ui;
pub use fanout_aggregator::webhook;

pub use admin::{DeadLetterList, DeadWebhookList, Resolutions, WebhookSelection};
pub use auth::OPEN_TENANT;
pub use dto::{
    Accepted, Health, InputInfo, ItemInfo, Links, ReportList, ReportRef, SectionInfo, SubmitBody,
    TemplateInfo,
};
pub use error::{ApiError, ErrorBody, ErrorDetail};
/// The bodies of `GET /v1/reports/{id}`, of the event stream and of the JSON document, as the
/// aggregator defines them.
pub use fanout_aggregator::{
    DocumentSection, ForEachSection, JobSection, ReportDocument, ReportEvent, ReportView,
    SectionView, Totals,
};
pub use routes::DocFormat;
pub use sse::{ERROR_EVENT, REPORT_EVENT};

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use bytes::Bytes;
use fanout_aggregator::Store;
use fanout_core::Config;
use fanout_core::redis::Pool;
use fanout_core::template::TemplateError;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::{Producer, Templates};
use auth::{Tenant, Tokens};
use ratelimit::SubmitLimiter;

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    producer: Producer,
    ops: crate::ops::Operations,
    pool: Pool,
    tokens: Tokens,
    limiter: SubmitLimiter,
    max_body_bytes: usize,
    openapi: Bytes,
    /// Cancelled at shutdown: ends the event streams, which would hold a graceful shutdown.
    streams: CancellationToken,
    keep_alive: Duration,
    sse_block: Duration,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("producer", &self.inner.producer)
            .field("tokens", &self.inner.tokens)
            .field("limiter", &self.inner.limiter)
            .field("max_body_bytes", &self.inner.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// What can stop the API from starting.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("redis pool for {url}: {message}")]
    Pool { url: String, message: String },
    #[error(transparent)]
    Templates(#[from] TemplateError),
    #[error("config key `webhooks.allow_hosts`: {0}")]
    WebhookTargets(String),
    #[error("operator routes: {0}")]
    Operations(#[from] crate::ops::OpsError),
}

impl ApiState {
    /// The API over `producer`. `pool` serves readiness checks and the submission limit
    /// (pass the producer's own pool). Tokens, body limit and submission limit come from
    /// `config.api`.
    pub fn new(producer: Producer, pool: Pool, config: &Config) -> Result<Self, InitError> {
        let api = &config.api;
        if api.tokens.is_empty() {
            tracing::warn!(
                "no api tokens configured (FANOUT_API_TOKENS): the api is open and every request is tenant \"default\""
            );
        }
        let openapi = openapi::document(producer.templates(), !api.tokens.is_empty());
        let names = producer.templates().names();
        fanout_metrics::METRICS
            .zero_template_series(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let ops = crate::ops::Operations::new(
            producer.queue().clone(),
            producer.store().clone(),
            config,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                ops,
                tokens: Tokens::new(&api.tokens),
                limiter: SubmitLimiter::new(api.submissions_per_minute, &config.redis.namespace),
                max_body_bytes: api.max_body_bytes,
                openapi: Bytes::from(serde_json::to_vec(&openapi).expect("json serializes")),
                streams: CancellationToken::new(),
                keep_alive: Duration::from_secs(15),
                sse_block: Duration::from_secs(10),
                producer,
                pool,
            }),
        })
    }

    /// Everything from `config`: one Redis pool for the store, the queue and the API, and the
    /// templates of `reports.templates_dir` over the built-in ones.
    pub fn from_config(config: &Config) -> Result<Self, InitError> {
        let pool = redis_pool(config)?;
        let templates = Templates::load(&config.reports.templates_dir)?;
        let targets = crate::WebhookTargets::new(&config.webhooks.allow_hosts)
            .map_err(InitError::WebhookTargets)?;
        let producer = Producer::new(
            Store::from_config(pool.clone(), config),
            fanout_queue::Queue::from_config(pool.clone(), config),
            templates,
        )
        .with_webhook_targets(targets);
        Self::new(producer, pool, config)
    }

    /// The same state with other keep-alive and blocking-read intervals for event streams
    /// (defaults 15 s and 10 s); for tests.
    pub fn with_sse_intervals(self, keep_alive: Duration, block: Duration) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|arc| Inner {
            producer: arc.producer.clone(),
            ops: arc.ops.clone(),
            pool: arc.pool.clone(),
            tokens: arc.tokens.clone(),
            limiter: arc.limiter.clone(),
            max_body_bytes: arc.max_body_bytes,
            openapi: arc.openapi.clone(),
            streams: arc.streams.clone(),
            keep_alive: arc.keep_alive,
            sse_block: arc.sse_block,
        });
        Self {
            inner: Arc::new(Inner {
                keep_alive,
                sse_block: block,
                ..inner
            }),
        }
    }

    pub fn producer(&self) -> &Producer {
        &self.inner.producer
    }

    /// The OpenAPI document served at `/openapi.json`.
    pub fn openapi(&self) -> serde_json::Value {
        serde_json::from_slice(&self.inner.openapi).expect("stored as json")
    }

    /// The operator actions behind the admin routes.
    pub fn ops(&self) -> &crate::ops::Operations {
        &self.inner.ops
    }

    pub(crate) fn store(&self) -> &Store {
        self.inner.producer.store()
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub(crate) fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    pub(crate) fn limiter(&self) -> &SubmitLimiter {
        &self.inner.limiter
    }

    pub(crate) fn openapi_bytes(&self) -> Bytes {
        self.inner.openapi.clone()
    }

    pub(crate) fn streams_token(&self) -> CancellationToken {
        self.inner.streams.clone()
    }

    pub(crate) fn keep_alive(&self) -> Duration {
        self.inner.keep_alive
    }

    pub(crate) fn sse_block(&self) -> Duration {
        self.inner.sse_block
    }

    /// The report if it exists and `tenant` may see it (its own, or any for an admin); otherwise the same 404 either way.
    pub(crate) async fn view_for(&self, tenant: &Tenant, id: &str) -> Result<ReportView, ApiError> {
        match self.store().view(id).await? {
            Some(view) if tenant.may_see(&view.tenant) => Ok(view),
            _ => Err(ApiError::report_not_found(id)),
        }
    }
}

/// The API's routes, with JSON errors for unknown routes (404), wrong methods (405), and
/// bodies over `api.max_body_bytes` (413).
pub fn router(state: ApiState) -> Router {
    let max_body = state.inner.max_body_bytes;
    Router::new()
        .route(
            "/v1/reports",
            axum::routing::post(routes::submit).get(routes::list_reports),
        )
        .route(
            "/v1/reports/{id}",
            get(routes::get_report).delete(routes::cancel),
        )
        .route("/v1/reports/{id}/events", get(sse::events))
        .route("/v1/reports/{id}/report", get(routes::document))
        .route("/v1/reports/{id}/report.json", get(routes::document_json))
        .route("/v1/reports/{id}/report.md", get(routes::document_md))
        .route("/v1/templates", get(routes::templates))
        .route("/v1/status", get(admin::status))
        .route("/v1/dead-letters", get(admin::dead_letters))
        .route(
            "/v1/dead-letters/replay",
            axum::routing::post(admin::replay),
        )
        .route(
            "/v1/dead-letters/drop",
            axum::routing::post(admin::drop_dead_letters),
        )
        .route(
            "/v1/dead-letters/{id}",
            axum::routing::delete(admin::drop_dead_letter),
        )
        .route("/v1/webhooks/dead", get(admin::dead_webhooks))
        .route(
            "/v1/webhooks/redeliver",
            axum::routing::post(admin::redeliver_webhooks),
        )
        .route(
            "/v1/webhooks/drop",
            axum::routing::post(admin::drop_webhooks),
        )
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/app.css", get(ui::app_css))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi_json))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::map_response(close_if_body_unread))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A 413 or 415 is answered without reading the request body, and the server then closes the
/// connection; `Connection: close` says so, so a client does not put the connection back in its
/// pool and send its next request into a closed socket.
async fn close_if_body_unread(mut response: axum::response::Response) -> axum::response::Response {
    if matches!(
        response.status(),
        axum::http::StatusCode::PAYLOAD_TOO_LARGE | axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE
    ) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Serve the API on `listener` until `shutdown`; then stop accepting, end the event streams
/// and let in-flight requests finish.
pub async fn run(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, "api listening");
    let streams = state.streams_token();
    // Queue depth and workers alive, for the alert that fires when work waits and no worker
    // runs (the workers export queue depth too, but not when there are none).
    let ops = state.ops().clone();
    let gauges_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::ops::GAUGES_EVERY);
        loop {
            tokio::select! {
                _ = gauges_stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = ops.export_gauges().await {
                tracing::debug!(error = %e, "could not sample the queue for metrics");
            }
        }
    });
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            streams.cancel();
        })
        .await?;
    tracing::info!(addr = %addr, "api stopped");
    Ok(())
}

/// The Redis pool every process builds (`fanout_core::redis::pool`).
fn redis_pool(config: &Config) -> Result<Pool, InitError> {
    fanout_core::redis::pool(&config.redis).map_err(|message| InitError::Pool {
        url: fanout_core::config::redact_url(&config.redis.url),
        message,
    })
}
