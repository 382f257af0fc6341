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

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::vendor::VendorSpec;

/// One vendor's fake, as the sandbox serves it: a vendor is faked by one
/// module here, listed once in [`Settings::default`].
pub trait FakeVendor: Send + Sync + 'static {
    /// The vendor it fakes.
    fn vendor(&self) -> &'static VendorSpec;
    /// Its API's place below the sandbox's address: an account's `base_url`
    /// is `http://<sandbox><base_path>`.
    fn base_path(&self) -> &'static str;
    /// The vendor's API and the fake's own `/_sandbox/<vendor>/…` routes.
    fn routes(&self) -> Router<Sandbox>;
    /// One line about a message it accepted, in the vendor's own fields, for the demo.
    fn describe(&self, message: &Delivered) -> String;
    /// What `herald demo` sends through this fake.
    fn demo(&self) -> crate::demo::Sample;
    /// Stages the demo's faults; `callbacks` is where the worker serves vendor callbacks.
    fn stage_demo(&self, _sandbox: &Sandbox, _callbacks: Option<SocketAddr>) {}
}

/// A fake's settings: its `herald sandbox` flags (clap derives them, with a
/// value parser for each), and the fake they start.
pub trait FakeSettings: clap::Args + Clone + fmt::Debug + Send + Sync + 'static {
    type Fake: FakeVendor;
    fn start(&self) -> Self::Fake;
}

/// A caller a fake accepts: its id (a NetEase AppKey, the OpenIM admin's
/// userID) and its secret, written `ID:SECRET` in a flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub id: String,
    pub secret: String,
}

impl Caller {
    pub fn new(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: secret.into(),
        }
    }

    /// `ID:SECRET`; `form` names the parts in the error (`KEY:SECRET`).
    pub fn parse(text: &str, form: &str) -> Result<Self, String> {
        let (id, secret) = text
            .split_once(':')
            .ok_or_else(|| format!("must be {form}"))?;
        Ok(Self::new(id, secret))
    }
}

/// A started fake, as the router uses it and as its own controls find it.
#[derive(Clone)]
struct Started {
    fake: Arc<dyn FakeVendor>,
    any: Arc<dyn Any + Send + Sync>,
}

/// Settings as `herald sandbox` without flags has them: the flags' defaults are the only ones.
pub fn flag_defaults<S: clap::Args>() -> S {
    let command = S::augment_args(clap::Command::new("sandbox"));
    command
        .try_get_matches_from(["sandbox"])
        .and_then(|matches| S::from_arg_matches(&matches))
        .expect("every sandbox flag has a default")
}

/// [`FakeSettings`] of any fake, so that [`Settings`] can list them all.
trait AnySettings: fmt::Debug + Send + Sync {
    fn start(&self) -> Started;
    fn flags(&self, command: clap::Command) -> clap::Command;
    fn read_flags(&self, matches: &clap::ArgMatches) -> Result<Arc<dyn AnySettings>, clap::Error>;
    fn as_any(&self) -> &dyn Any;
}

impl<S: FakeSettings> AnySettings for S {
    fn start(&self) -> Started {
        let fake = Arc::new(FakeSettings::start(self));
        Started {
            fake: fake.clone(),
            any: fake,
        }
    }

    fn flags(&self, command: clap::Command) -> clap::Command {
        S::augment_args(command)
    }

    fn read_flags(&self, matches: &clap::ArgMatches) -> Result<Arc<dyn AnySettings>, clap::Error> {
        Ok(Arc::new(S::from_arg_matches(matches)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Every fake's settings: its apps and limits.
#[derive(Debug, Clone)]
pub struct Settings {
    fakes: Vec<Arc<dyn AnySettings>>,
}

impl Default for Settings {
    /// Every fake the sandbox serves, with its defaults.
    fn default() -> Self {
        Self {
            fakes: vec![
                Arc::new(netease::Settings::default()),
                Arc::new(openim::Settings::default()),
                Arc::new(tencent::Settings::default()),
            ],
        }
    }
}

impl Settings {
    /// These settings with one fake's replaced.
    pub fn with<S: FakeSettings>(mut self, settings: S) -> Self {
        let settings: Arc<dyn AnySettings> = Arc::new(settings);
        match self.fakes.iter().position(|f| f.as_any().is::<S>()) {
            Some(i) => self.fakes[i] = settings,
            None => self.fakes.push(settings),
        }
        self
    }

    /// One fake's settings.
    pub fn get<S: FakeSettings>(&self) -> &S {
        self.fakes
            .iter()
            .find_map(|f| f.as_any().downcast_ref::<S>())
            .expect("every fake has settings")
    }
}

/// `herald sandbox`'s flags are every fake's own.
impl clap::Args for Settings {
    fn augment_args(command: clap::Command) -> clap::Command {
        Self::default()
            .fakes
            .iter()
            .fold(command, |command, fake| fake.flags(command))
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

impl clap::FromArgMatches for Settings {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let fakes = Self::default()
            .fakes
            .iter()
            .map(|fake| fake.read_flags(matches))
            .collect::<Result<_, _>>()?;
        Ok(Self { fakes })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// A message a fake accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Delivered {
    pub vendor: String,
    /// The app it was sent with, as the vendor names it (an AppKey, an SDKAppID, an admin).
    pub app: String,
    /// Milliseconds since the sandbox started.
    pub received_ms: u64,
    /// The request's fields as the vendor received them.
    pub fields: BTreeMap<String, String>,
    /// Which of several base URLs of one app it came through, for fakes that serve them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl Delivered {
    /// A field as the vendor received it; empty when it was not sent.
    pub fn field(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }
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
    /// Only requests of this app (as [`Delivered::app`] names it); any when unset.
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
    fakes: Vec<Started>,
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
        let fakes = settings.fakes.iter().map(|f| f.start()).collect();
        Self {
            inner: Arc::new(Inner {
                settings,
                started: Instant::now(),
                delivered: Mutex::default(),
                faults: Mutex::default(),
                latency: Mutex::default(),
                hung: Default::default(),
                arrivals: Mutex::default(),
                fakes,
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Every fake it serves, in the order [`Settings::default`] lists them.
    pub fn fakes(&self) -> impl Iterator<Item = &dyn FakeVendor> {
        self.inner.fakes.iter().map(|f| f.fake.as_ref())
    }

    /// One fake, for the controls it has beyond the common ones.
    pub fn fake<F: FakeVendor>(&self) -> &F {
        self.inner
            .fakes
            .iter()
            .find_map(|f| f.any.downcast_ref::<F>())
            .expect("the sandbox serves every fake")
    }

    /// Where each fake is served, for the start-up line.
    pub fn served_at(&self) -> String {
        let fakes: Vec<String> = self
            .fakes()
            .map(|f| format!("{} at {}", f.vendor().name, f.base_path()))
            .collect();
        fakes.join(", ")
    }

    pub fn router(&self) -> Router {
        let router = Router::new()
            // For health checks (`herald health --live --addr …` in deploy/compose.yaml).
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/_sandbox/messages", get(messages_route))
            .route("/_sandbox/stats", get(stats_route))
            .route(
                "/_sandbox/faults",
                post(fault_route).delete(clear_faults_route),
            )
            .route("/_sandbox/latency", post(latency_route));
        self.fakes()
            .fold(router, |router, fake| router.merge(fake.routes()))
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

    /// How many requests were left hanging by a `Hang` fault.
    pub fn hung(&self) -> usize {
        self.inner.hung.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn hang(&self) {
        self.inner
            .hung
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
