//! The operations endpoint: `/metrics` (Prometheus text), `/healthz` (the relay
//! loop is alive) and `/readyz` (PostgreSQL answers and the broker circuit is closed),
//! and the dead-letter console under `/console` when it is enabled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::{RwLock, watch};

use super::metrics::{self, OutboxSample};
use crate::resilience::BreakerState;
use crate::stats::RelayStats;

/// How stale the relay loop's heartbeat may be before `/healthz` fails.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct OpsState {
    stats: Arc<RelayStats>,
    sample: Arc<RwLock<Option<OutboxSample>>>,
}

/// Serve `/metrics`, `/healthz` and `/readyz` (and `console`'s pages, if given) on
/// `listener` until `shutdown` turns true; samples the outbox gauges every
/// `sample_interval` (`ops.sample_interval_ms`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<RelayStats>,
    pool: sqlx::PgPool,
    schema: outbox_core::SchemaName,
    sample_interval: Duration,
    console: Option<super::console::Console>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "serving /metrics, /healthz and /readyz");
    let sample = Arc::new(RwLock::new(None));
    let sampler = {
        let sample = sample.clone();
        let stats = stats.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                match metrics::sample_outbox(&pool, &schema).await {
                    Ok(value) => {
                        *sample.write().await = Some(value);
                        stats
                            .database_reachable
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "sampling outbox metrics failed");
                        stats
                            .database_reachable
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(sample_interval) => {}
                    _ = shutdown.changed() => return,
                }
            }
        })
    };
    let mut app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(OpsState { stats, sample });
    if let Some(console) = console {
        tracing::info!(?addr, "serving the dead-letter console under /console");
        app = app.merge(console.routes());
    }
    // The console logs the remote address of every action.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    sampler.abort();
    result
}

async fn render_metrics(
    State(state): State<OpsState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let sample = *state.sample.read().await;
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        metrics::render(&state.stats, sample),
    )
}

async fn healthz(State(state): State<OpsState>) -> (StatusCode, &'static str) {
    if state.stats.heartbeat_age() <= LIVENESS_TIMEOUT {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "relay loop is stuck\n")
    }
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    if !state
        .stats
        .started
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting, waiting for PostgreSQL and the broker to answer\n".into(),
        );
    }
    if state
        .stats
        .paused
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: publishing paused by an operator (outbox-relay status shows who; outbox-relay resume continues)\n"
                .into(),
        );
    }
    let breaker = state.stats.breaker();
    let database = state
        .stats
        .database_reachable
        .load(std::sync::atomic::Ordering::Relaxed);
    if breaker == BreakerState::Closed && database {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: circuit breaker {breaker:?}, database reachable {database}\n"),
        )
    }
}
