//! The operations endpoint of worker and aggregator processes: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// Serve `/metrics`, `/healthz` (the process runs) and `/readyz` (Redis answers) on `addr`.
pub(crate) async fn serve(
    addr: SocketAddr,
    pool: fanout_core::redis::Pool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics and health endpoint listening");
    let app = fanout_metrics::router()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let pool = pool.clone();
                async move {
                    if redis_ready(&pool).await {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "redis unavailable")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

pub(crate) async fn redis_ready(pool: &fanout_core::redis::Pool) -> bool {
    let Ok(mut conn) = pool.get().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}
