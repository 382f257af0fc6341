//! The worker's HTTP surface: `/healthz`, `/readyz`, `/metrics` (Prometheus)
//! and `/callbacks/tencent` (see [`crate::callback`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::callback::{self, Callbacks};

/// What `/readyz` reports: connected to the broker, every lane consuming.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicUsize,
    lanes: usize,
}

impl Health {
    pub fn new(lanes: usize) -> Self {
        Self {
            lanes,
            ..Self::default()
        }
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        if !connected {
            self.consuming.store(0, Ordering::SeqCst);
        }
    }

    pub fn lane_consuming(&self) {
        self.consuming.fetch_add(1, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst) && self.consuming.load(Ordering::SeqCst) >= self.lanes
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Health, readiness, metrics, and the Tencent callback when a Tencent account is configured.
pub fn router(health: Arc<Health>, callbacks: Option<Arc<Callbacks>>) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            health,
            metrics: prometheus(),
        });
    match callbacks {
        Some(callbacks) => router.merge(
            Router::new()
                .route(callback::PATH, post(callback::handle))
                .with_state(callbacks),
        ),
        None => router,
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let h = &state.health;
    let body = Json(json!({
        "ready": h.is_ready(),
        "broker_connected": h.connected.load(Ordering::SeqCst),
        "lanes_consuming": h.consuming.load(Ordering::SeqCst),
        "lanes": h.lanes,
    }));
    let status = if h.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Binds `addr` and serves `router` until `shutdown`; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (http.listen): {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(bound)
}
