//! `herald sandbox`: faithful fakes of the vendors on one port.
//!
//! Used by the demo, the tests and the benchmarks. Each fake checks what the real
//! API checks (signatures, field limits, rate limits) and answers with the
//! vendor's own codes. Around them, a control API records accepted messages and
//! injects latency and faults:
//!
//! - `GET /_sandbox/messages`: every accepted message, in arrival order;
//! - `GET /_sandbox/stats`: per app: requests, accepted, blocked, the largest
//!   number of requests seen in any sliding one-second window and where it began;
//! - `POST /_sandbox/faults`: `{"vendor":"netease","to":"u1","times":1,"answer":{"code":500}}`;
//!   answers are `{"code": N}` (vendor code), `{"http_status": N}` (non-vendor
//!   HTTP error) or `"garbage"` (HTTP 200, not JSON);
//! - `POST /_sandbox/latency`: `{"ms": 20}` added to every vendor call.

pub mod netease;
pub mod openim;
pub mod tencent;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Apps the fakes accept, and their limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NetEase `(AppKey, AppSecret)` pairs.
    pub netease_apps: Vec<(String, String)>,
    /// Requests per any one-second window per NetEase app (seed 001: 100).
    pub netease_rate_limit: usize,
    /// How long an app that exceeded its limit is blocked (seed 001: 10 s).
    pub netease_block: Duration,
    /// OpenIM admin `(userID, secret)`.
    pub openim_admin: (String, String),
    /// Lifetime of the OpenIM admin tokens the fake issues.
    pub openim_token_ttl: Duration,
    /// Tencent apps the fake accepts.
    pub tencent_apps: Vec<TencentApp>,
    /// Requests per any one-second window per Tencent app (REST default: 200).
    pub tencent_rate_limit: usize,
}

/// A Tencent Cloud IM app: SDKAppID, its secret key, and its admin identifier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TencentApp {
    pub sdk_app_id: u64,
    pub key: String,
    pub admin: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            netease_apps: vec![("demo-app".into(), "demo-secret".into())],
            netease_rate_limit: 100,
            netease_block: Duration::from_secs(10),
            openim_admin: ("imAdmin".into(), "openIM123".into()),
            openim_token_ttl: Duration::from_secs(3600),
            tencent_apps: vec![TencentApp {
                sdk_app_id: 1_400_000_000,
                key: "tencent-demo-key".into(),
                admin: "administrator".into(),
            }],
            tencent_rate_limit: 200,
        }
    }
}

/// A message a fake accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Delivered {
    pub vendor: String,
    /// The app (NetEase AppKey) it was sent with.
    pub app: String,
    /// Milliseconds since the sandbox started.
    pub received_ms: u64,
    /// The request's fields as the vendor received them.
    pub fields: BTreeMap<String, String>,
    /// The `<via>` of a NetEase request sent to `/netease/<via>/nimserver`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// What the fake answers instead of processing the request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum FaultAnswer {
    /// The vendor's own error body with this code.
    Code(i64),
    /// An HTTP error with a non-vendor body, as a proxy or outage would give.
    HttpStatus(u16),
    /// HTTP 200 with a body that is not the vendor's JSON.
    Garbage,
    /// Never answers (for an hour): the caller times out, or is killed while waiting.
    Hang,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub vendor: String,
    /// Only requests of this app (NetEase AppKey); any when unset.
    #[serde(default)]
    pub app: Option<String>,
    /// Only requests to this recipient (any when unset).
    #[serde(default)]
    pub to: Option<String>,
    /// How many matching requests get the fault.
    #[serde(default = "one")]
    pub times: u32,
    pub answer: FaultAnswer,
}

fn one() -> u32 {
    1
}

/// Per-app request accounting, as the vendor would see it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AppStats {
    pub requests: usize,
    pub accepted: usize,
    /// Requests answered with the vendor's rate-limit code.
    pub blocked: usize,
    /// The most requests that arrived within any sliding one-second window.
    pub max_in_any_second: usize,
    /// Arrival of the first request of that busiest window, in ms since the sandbox started.
    pub busiest_second_ms: Option<u64>,
    /// Arrival of the first and last request, in ms since the sandbox started.
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
}

#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    started: Instant,
    /// Shared, so that reading them holds the lock for pointer copies only:
    /// a handler waiting on it would skew the arrival times being measured.
    delivered: Mutex<Vec<Arc<Delivered>>>,
    faults: Mutex<Vec<Fault>>,
    latency: Mutex<Duration>,
    /// Requests that got a `Hang` fault.
    hung: std::sync::atomic::AtomicUsize,
    /// Arrival times of every request per (vendor, app).
    arrivals: Mutex<BTreeMap<(String, String), Arrivals>>,
    netease: netease::Fake,
    openim: openim::Fake,
    tencent: tencent::Fake,
}

#[derive(Default)]
struct Arrivals {
    times: Vec<Instant>,
    /// Arrivals of the last second, oldest first.
    window: VecDeque<Instant>,
    accepted: usize,
    blocked: usize,
}

impl Sandbox {
    pub fn new(settings: Settings) -> Self {
        let netease = netease::Fake::new(&settings);
        let openim = openim::Fake::new(&settings);
        let tencent = tencent::Fake::new(&settings);
        Self {
            inner: Arc::new(Inner {
                settings,
                started: Instant::now(),
                delivered: Mutex::default(),
                faults: Mutex::default(),
                latency: Mutex::default(),
                hung: Default::default(),
                openim,
                tencent,
                arrivals: Mutex::default(),
                netease,
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn router(&self) -> Router {
        Router::new()
            // For health checks (`herald health --live --addr …` in deploy/compose.yaml).
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/_sandbox/messages", get(messages_route))
            .route("/_sandbox/stats", get(stats_route))
            .route(
                "/_sandbox/faults",
                post(fault_route).delete(clear_faults_route),
            )
            .route("/_sandbox/latency", post(latency_route))
            .merge(netease::routes())
            .merge(openim::routes())
            .merge(tencent::routes())
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener, shutdown).await {
                tracing::error!(error = %e, "sandbox server failed");
            }
        });
        Ok(bound)
    }

    pub fn messages(&self) -> Vec<Delivered> {
        let shared = self.inner.delivered.lock().expect("sandbox lock").clone();
        shared.iter().map(|m| Delivered::clone(m)).collect()
    }

    /// How many accepted messages match `filter`, without copying them.
    pub fn count_messages(&self, filter: impl Fn(&Delivered) -> bool) -> usize {
        let delivered = self.inner.delivered.lock().expect("sandbox lock");
        delivered.iter().filter(|m| filter(m)).count()
    }

    /// How many messages were accepted, without copying them.
    pub fn delivered_count(&self) -> usize {
        self.inner.delivered.lock().expect("sandbox lock").len()
    }

    pub fn add_fault(&self, fault: Fault) {
        self.inner.faults.lock().expect("sandbox lock").push(fault);
    }

    /// Admin tokens the OpenIM fake has issued.
    pub fn openim_tokens_issued(&self) -> usize {
        self.inner.openim.issued()
    }

    /// The OpenIM admin tokens the fake has issued (tests search output for them).
    pub fn openim_tokens(&self) -> Vec<String> {
        self.inner.openim.tokens()
    }

    /// Expires every OpenIM admin token now, as a revocation would.
    pub fn openim_expire_tokens(&self) {
        self.inner.openim.expire_all();
    }

    /// Makes the next group messages fail after acceptance, with a callback.
    pub fn tencent_reject_group(&self, reject: tencent::RejectGroup) {
        self.inner.tencent.reject_group(reject);
    }

    /// What herald answered to the callbacks the Tencent fake posted.
    pub fn tencent_callback_answers(&self) -> Vec<tencent::CallbackAnswer> {
        self.inner.tencent.callback_answers()
    }

    /// How many requests were left hanging by a `Hang` fault.
    pub fn hung(&self) -> usize {
        self.inner.hung.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn hang(&self) {
        self.inner
            .hung
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Blocks a NetEase app for `netease_block` from now, as if another client had overshot its limit.
    pub fn netease_block(&self, app: &str) {
        self.inner.netease.block(app);
    }

    pub fn clear_faults(&self) {
        self.inner.faults.lock().expect("sandbox lock").clear();
    }

    /// Milliseconds since the sandbox started, the clock of `received_ms` and the stats.
    pub fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.inner.latency.lock().expect("sandbox lock") = latency;
    }

    /// Per vendor, per app.
    pub fn stats(&self) -> BTreeMap<String, BTreeMap<String, AppStats>> {
        // Copy under the lock, compute outside it: handlers take it on every arrival.
        let copied: Vec<_> = {
            let arrivals = self.inner.arrivals.lock().expect("sandbox lock");
            arrivals
                .iter()
                .map(|(key, a)| (key.clone(), a.times.clone(), a.accepted, a.blocked))
                .collect()
        };
        let mut out: BTreeMap<String, BTreeMap<String, AppStats>> = BTreeMap::new();
        for ((vendor, app), mut times, accepted, blocked) in copied {
            let ms = |t: &Instant| t.duration_since(self.inner.started).as_millis() as u64;
            // Handlers take their timestamp before the lock, so arrivals may be recorded out of order.
            times.sort_unstable();
            let busiest = busiest_window(&times, Duration::from_secs(1));
            out.entry(vendor).or_default().insert(
                app,
                AppStats {
                    requests: times.len(),
                    accepted,
                    blocked,
                    max_in_any_second: busiest.map_or(0, |(_, n)| n),
                    busiest_second_ms: busiest.map(|(start, _)| ms(&times[start])),
                    first_ms: times.first().map(ms),
                    last_ms: times.last().map(ms),
                },
            );
        }
        out
    }

    /// Waits for the configured latency; called first by every fake.
    async fn delay(&self) {
        let latency = *self.inner.latency.lock().expect("sandbox lock");
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Records an arrival; returns the number of requests in the last second, this one included.
    fn arrive(&self, vendor: &str, app: &str, now: Instant) -> usize {
        let mut arrivals = self.inner.arrivals.lock().expect("sandbox lock");
        let entry = arrivals
            .entry((vendor.to_string(), app.to_string()))
            .or_default();
        entry.times.push(now);
        entry.window.push_back(now);
        while entry
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            entry.window.pop_front();
        }
        entry.window.len()
    }

    fn count_blocked(&self, vendor: &str, app: &str) {
        let mut arrivals = self.inner.arrivals.lock().expect("sandbox lock");
        arrivals
            .entry((vendor.to_string(), app.to_string()))
            .or_default()
            .blocked += 1;
    }

    /// Takes the first fault matching this request, if any.
    fn take_fault(&self, vendor: &str, app: &str, to: Option<&str>) -> Option<FaultAnswer> {
        let mut faults = self.inner.faults.lock().expect("sandbox lock");
        let index = faults.iter().position(|f| {
            f.vendor == vendor
                && f.times > 0
                && f.app.as_deref().is_none_or(|want| want == app)
                && f.to.as_deref().is_none_or(|want| Some(want) == to)
        })?;
        faults[index].times -= 1;
        let answer = faults[index].answer.clone();
        if faults[index].times == 0 {
            faults.remove(index);
        }
        Some(answer)
    }

    fn record(&self, vendor: &str, app: &str, fields: BTreeMap<String, String>) {
        self.record_via(vendor, app, None, fields);
    }

    fn record_via(
        &self,
        vendor: &str,
        app: &str,
        via: Option<String>,
        fields: BTreeMap<String, String>,
    ) {
        let received_ms = self.inner.started.elapsed().as_millis() as u64;
        let mut arrivals = self.inner.arrivals.lock().expect("sandbox lock");
        arrivals
            .entry((vendor.to_string(), app.to_string()))
            .or_default()
            .accepted += 1;
        drop(arrivals);
        self.inner
            .delivered
            .lock()
            .expect("sandbox lock")
            .push(Arc::new(Delivered {
                vendor: vendor.to_string(),
                app: app.to_string(),
                received_ms,
                fields,
                via,
            }));
    }
}

impl Sandbox {
    /// The answer of a fault that is not a vendor code (shared by every fake;
    /// each fake answers `Code` faults in its own format).
    pub(crate) async fn fault_response(&self, fault: FaultAnswer) -> axum::response::Response {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        match fault {
            FaultAnswer::Code(code) => {
                (StatusCode::OK, format!("{{\"code\":{code}}}")).into_response()
            }
            FaultAnswer::HttpStatus(status) => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                "<html><body>upstream error</body></html>",
            )
                .into_response(),
            FaultAnswer::Garbage => (StatusCode::OK, "<html>maintenance</html>").into_response(),
            FaultAnswer::Hang => {
                self.hang();
                tokio::time::sleep(Duration::from_secs(3600)).await;
                (StatusCode::INTERNAL_SERVER_ERROR, "hung").into_response()
            }
        }
    }
}

/// The busiest window `(t - width, t]` over sorted instants: the index of its
/// first instant and how many it holds (the earliest such window on a tie).
pub fn busiest_window(times: &[Instant], width: Duration) -> Option<(usize, usize)> {
    let mut lo = 0;
    let mut best: Option<(usize, usize)> = None;
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= width {
            lo += 1;
        }
        let n = hi - lo + 1;
        if best.is_none_or(|(_, b)| n > b) {
            best = Some((lo, n));
        }
    }
    best
}

/// Seconds since the Unix epoch, as vendors put them in signatures.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

async fn messages_route(State(sandbox): State<Sandbox>) -> Json<Vec<Delivered>> {
    Json(sandbox.messages())
}

async fn stats_route(
    State(sandbox): State<Sandbox>,
) -> Json<BTreeMap<String, BTreeMap<String, AppStats>>> {
    Json(sandbox.stats())
}

async fn fault_route(State(sandbox): State<Sandbox>, Json(fault): Json<Fault>) -> &'static str {
    sandbox.add_fault(fault);
    "ok\n"
}

async fn clear_faults_route(State(sandbox): State<Sandbox>) -> &'static str {
    sandbox.clear_faults();
    "ok\n"
}

#[derive(Deserialize)]
struct Latency {
    ms: u64,
}

async fn latency_route(
    State(sandbox): State<Sandbox>,
    Json(latency): Json<Latency>,
) -> &'static str {
    sandbox.set_latency(Duration::from_millis(latency.ms));
    "ok\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_are_half_open() {
        let t0 = Instant::now();
        let times: Vec<_> = [0, 500, 999, 1000, 1001]
            .iter()
            .map(|ms| t0 + Duration::from_millis(*ms))
            .collect();
        // (t-1s, t]: at 1000 ms the window drops 0 (500, 999, 1000);
        // at 1001 ms it holds 500, 999, 1000, 1001.
        assert_eq!(busiest_window(&times, Duration::from_secs(1)), Some((1, 4)));
        // Two windows of 3; the earliest is reported.
        assert_eq!(
            busiest_window(&times[..4], Duration::from_secs(1)),
            Some((0, 3))
        );
        assert_eq!(busiest_window(&[], Duration::from_secs(1)), None);
    }

    #[test]
    fn faults_match_recipient_and_run_out() {
        let sandbox = Sandbox::new(Settings::default());
        sandbox.add_fault(Fault {
            vendor: "netease".into(),
            app: None,
            to: Some("u1".into()),
            times: 2,
            answer: FaultAnswer::Code(500),
        });
        assert_eq!(sandbox.take_fault("netease", "a", Some("u2")), None);
        let hit = Some(FaultAnswer::Code(500));
        assert_eq!(sandbox.take_fault("netease", "a", Some("u1")), hit);
        assert_eq!(sandbox.take_fault("netease", "b", Some("u1")), hit);
        assert_eq!(sandbox.take_fault("netease", "a", Some("u1")), None);
        sandbox.add_fault(Fault {
            vendor: "netease".into(),
            app: Some("b".into()),
            to: None,
            times: 1,
            answer: FaultAnswer::Garbage,
        });
        assert_eq!(sandbox.take_fault("netease", "a", Some("u1")), None);
        assert_eq!(
            sandbox.take_fault("netease", "b", Some("u9")),
            Some(FaultAnswer::Garbage)
        );
    }
}
