//! The worker's HTTP surface: `/healthz`, `/readyz`, `/metrics` (Prometheus),
//! the vendors' callback routes (see [`crate::callback`]) and `POST /v1/jobs`
//! (see [`crate::http_enqueue`]), all listed in [`routes`].
//!
//! The callback routes are the ones meant for the internet; `http.callback_listen`
//! serves them apart from health and metrics. Every listener bounds what a slow
//! or hostile client can hold: header and request timeouts, body and header
//! sizes, and the number of connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, on};
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpConfig;
use crate::http_enqueue::{self, Intake};

/// One route herald serves, with every status it answers. `docs/openapi.yaml`
/// describes exactly [`routes`], and routers add routes only through them
/// (`tests/http_enqueue.rs` holds the two together).
#[derive(Debug)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub statuses: &'static [u16],
}

pub const HEALTHZ: Route = Route {
    method: Method::GET,
    path: "/healthz",
    statuses: &[200],
};
pub const READYZ: Route = Route {
    method: Method::GET,
    path: "/readyz",
    statuses: &[200, 503],
};
pub const METRICS: Route = Route {
    method: Method::GET,
    path: "/metrics",
    statuses: &[200],
};
pub const ENQUEUE_JOBS: Route = Route {
    method: Method::POST,
    path: http_enqueue::PATH,
    statuses: &[202, 400, 401, 408, 413, 415, 503],
};

/// Every route, whichever listener serves it: herald's own and each vendor's callback.
pub fn routes() -> Vec<&'static Route> {
    let callbacks = crate::vendor::VENDORS
        .iter()
        .filter_map(|v| v.callback)
        .map(|c| c.route);
    [&HEALTHZ, &READYZ, &METRICS]
        .into_iter()
        .chain(callbacks)
        .chain([&ENQUEUE_JOBS])
        .collect()
}

/// Adds `route` to `router`, served by `handler`.
pub fn serve<H, T, S>(router: Router<S>, route: &Route, handler: H) -> Router<S>
where
    H: Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    let filter = MethodFilter::try_from(route.method.clone()).expect("a standard method");
    router.route(route.path, on(filter, handler))
}

/// What `/readyz` reports: connected to the broker, every lane consuming.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicUsize,
    lanes: usize,
    /// Why the broker blocks herald's publishing connection (a memory or disk
    /// alarm), while it does.
    blocked: std::sync::Mutex<Option<String>>,
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

    /// The broker blocks (`Some(reason)`) or unblocks (`None`) publishing.
    pub fn set_blocked(&self, reason: Option<String>) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    pub fn blocked(&self) -> Option<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.load(Ordering::SeqCst) >= self.lanes
            && self.blocked().is_none()
    }
}

pub use crate::metrics::prometheus;

/// Asks a worker listening on `addr` for `route` (`/healthz` or `/readyz`):
/// its body when it answers 200. A wildcard address is asked on loopback.
pub async fn probe(addr: SocketAddr, route: &Route, timeout: Duration) -> anyhow::Result<String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}{}", route.path);
    let response = reqwest::Client::builder()
        .timeout(timeout)
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::Error::from(e.without_url()).context(url.clone()))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status != StatusCode::OK {
        anyhow::bail!("{url} answered {status}: {}", body.trim_end());
    }
    Ok(body)
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
}

/// `/healthz`, `/readyz` and `/metrics`: for the cluster, not for the internet.
pub fn health_router(health: Arc<Health>) -> Router {
    let router = Router::new();
    let router = serve(router, &HEALTHZ, || async { "ok\n" });
    let router = serve(router, &READYZ, readyz);
    prometheus();
    serve(router, &METRICS, render_metrics).with_state(AppState { health })
}

/// `POST /v1/jobs`, with its own body limit: for producers inside the cluster.
pub fn enqueue_router(intake: Arc<Intake>) -> Router {
    let limit = intake.max_body_bytes();
    serve(Router::new(), &ENQUEUE_JOBS, http_enqueue::handle)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(intake)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let h = &state.health;
    let body = Json(json!({
        "ready": h.is_ready(),
        "broker_connected": h.connected.load(Ordering::SeqCst),
        "lanes_consuming": h.consuming.load(Ordering::SeqCst),
        "lanes": h.lanes,
        "broker_blocking": h.blocked(),
    }));
    let status = if h.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn render_metrics() -> String {
    crate::metrics::render()
}

/// How one listener treats its clients; every bound is there for a slow or hostile one.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a request's headers, also between requests on a kept-alive connection.
    pub header_timeout: Duration,
    /// Longest time from a request's headers to its answer, reading the body included.
    pub request_timeout: Duration,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(http: &HttpConfig) -> Self {
        Self {
            header_timeout: http.header_timeout,
            request_timeout: http.request_timeout,
            max_connections: http.max_connections,
        }
    }
}

/// Binds `addr` and serves `router` under `limits` until `shutdown`; returns
/// the bound address. `what` names the config key in errors.
pub async fn spawn(
    addr: SocketAddr,
    what: &str,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))?;
    let bound = listener.local_addr()?;
    let timeout = limits.request_timeout;
    let router = router.layer(middleware::from_fn(move |request, next: Next| async move {
        match tokio::time::timeout(timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response(),
        }
    }));
    tokio::spawn(accept(listener, router, limits, shutdown));
    Ok(bound)
}

async fn accept(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!("herald_http_connections_refused_total").increment(1);
            tracing::debug!(%peer, "too many http connections; closing a new one");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_HEADER_BYTES);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Largest request head hyper buffers; far above any legitimate one here.
const MAX_HEADER_BYTES: usize = 16 * 1024;
