//! herald's Prometheus metrics: every name, its HELP text and labels in one
//! table ([`all`]), the histogram buckets, the series registered at 0 when a
//! worker starts, and the gauges read from live state at each scrape.
//!
//! Counters exist from start-up for every configured account and outcome, so
//! `increase()` sees the first dead job after a restart. `docs/metrics.md`
//! lists exactly [`all`]; a test holds the two together, another holds
//! [`all`] to what `/metrics` exports.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::lane::Account;
use crate::outcome::Reason;
use crate::topology::Names;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric herald exports.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

pub const JOBS: Metric = metric(
    "herald_jobs_total",
    Kind::Counter,
    &["vendor", "account", "outcome", "reason"],
    "Jobs settled by a lane. outcome: delivered, retried, dead, requeued; reason: none, transient, shutdown, consumer_timeout, or the DLQ reason (invalid, permanent, exhausted, expired).",
);
pub const VENDOR_REQUEST_SECONDS: Metric = metric(
    "herald_vendor_request_seconds",
    Kind::Histogram,
    &["vendor", "account"],
    "Duration of one vendor request (immediate in-process retries included), whatever its answer.",
);
pub const LANE_PAUSES: Metric = metric(
    "herald_lane_pauses_total",
    Kind::Counter,
    &["vendor", "account"],
    "Lane pauses after a vendor rate-limit answer (NetEase 416, Tencent frequency codes, HTTP 429).",
);
pub const LANE_ACTIVE: Metric = metric(
    "herald_lane_active",
    Kind::Gauge,
    &["vendor", "account"],
    "1 once this replica receives the lane's jobs (for a rate-limited lane: the one consumer the broker lets consume), else 0.",
);
pub const LANE_PAUSED_SECONDS: Metric = metric(
    "herald_lane_paused_seconds",
    Kind::Gauge,
    &["vendor", "account"],
    "Seconds left of the lane's pause (rate-limit ban or takeover window) in this process; 0 when it may send.",
);
pub const BREAKER_STATE: Metric = metric(
    "herald_breaker_state",
    Kind::Gauge,
    &["vendor", "account"],
    "The account's circuit breaker in this process: 0 closed, 1 open, 2 probing (one request out to test the vendor).",
);
pub const IN_FLIGHT: Metric = metric(
    "herald_jobs_in_flight",
    Kind::Gauge,
    &["vendor", "account"],
    "Deliveries this process holds unsettled (waiting for the breaker or limiter, at the vendor, or being settled).",
);
pub const IN_FLIGHT_LIMIT: Metric = metric(
    "herald_in_flight_limit",
    Kind::Gauge,
    &["vendor", "account"],
    "Requests this process may have at the vendor at once: the adaptive in-flight limit, at most `concurrency` (equal to it with `adaptive_concurrency = false`).",
);
pub const LANE_MESSAGES: Metric = metric(
    "herald_lane_messages",
    Kind::Gauge,
    &["vendor", "account"],
    "Jobs ready in the lane queue, as the broker reports them (read every 10 s; every replica reports the same queue).",
);
pub const LANE_CONSUMERS: Metric = metric(
    "herald_lane_consumers",
    Kind::Gauge,
    &["vendor", "account"],
    "Consumers subscribed to the lane queue, all replicas together (with single active consumer, one of them receives).",
);
pub const DLQ_MESSAGES: Metric = metric(
    "herald_dlq_messages",
    Kind::Gauge,
    &[],
    "Dead jobs in the DLQ, all reasons together (read every 10 s). By reason: `herald dlq stats`.",
);
pub const BUILD_INFO: Metric = metric(
    "herald_build_info",
    Kind::Gauge,
    &["version"],
    "Always 1; the label says which herald this process runs.",
);
pub const CALLBACKS: Metric = metric(
    "herald_callbacks_total",
    Kind::Counter,
    &["account", "result", "reason"],
    "Tencent Group.CallbackSendMsgException callbacks. result: retried, dead (reason: permanent, exhausted, expired), duplicate, foreign, forged, unauthorized, rejected, busy, unavailable.",
);
pub const HTTP_ENQUEUE_JOBS: Metric = metric(
    "herald_http_enqueue_jobs_total",
    Kind::Counter,
    &["result"],
    "Jobs received on POST /v1/jobs. result: accepted, invalid, withheld (valid, in a refused batch), unavailable.",
);
pub const HTTP_ENQUEUE_REQUESTS: Metric = metric(
    "herald_http_enqueue_requests_total",
    Kind::Counter,
    &["status"],
    "Answers to POST /v1/jobs, by HTTP status.",
);
pub const HTTP_CONNECTIONS_REFUSED: Metric = metric(
    "herald_http_connections_refused_total",
    Kind::Counter,
    &[],
    "HTTP connections closed on accept because a listener already served http.max_connections.",
);

/// Every metric herald exports: [`CORE`] and each vendor's own
/// (`VendorSpec::account_counters`); `docs/metrics.md` lists exactly these.
pub fn all() -> Vec<&'static Metric> {
    let vendors = crate::vendor::VENDORS
        .iter()
        .flat_map(|v| v.account_counters.iter().copied());
    CORE.iter().copied().chain(vendors).collect()
}

/// The metrics of herald itself, whatever its vendors.
const CORE: &[&Metric] = &[
    &JOBS,
    &VENDOR_REQUEST_SECONDS,
    &LANE_PAUSES,
    &LANE_ACTIVE,
    &LANE_PAUSED_SECONDS,
    &BREAKER_STATE,
    &IN_FLIGHT,
    &IN_FLIGHT_LIMIT,
    &LANE_MESSAGES,
    &LANE_CONSUMERS,
    &DLQ_MESSAGES,
    &BUILD_INFO,
    &CALLBACKS,
    &HTTP_ENQUEUE_JOBS,
    &HTTP_ENQUEUE_REQUESTS,
    &HTTP_CONNECTIONS_REFUSED,
];

/// Vendor latency buckets, in seconds: vendors answer in tens of milliseconds
/// when healthy; the default request timeout is 5 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// The `outcome` and `reason` of every series of [`JOBS`] a lane can produce.
pub const JOB_OUTCOMES: &[(&str, &str)] = &[
    ("delivered", "none"),
    ("retried", "transient"),
    ("requeued", "shutdown"),
    ("requeued", "consumer_timeout"),
    ("dead", "invalid"),
    ("dead", "permanent"),
    ("dead", "exhausted"),
    ("dead", "expired"),
];

/// The `result` and `reason` of every series of [`CALLBACKS`] for one account.
const CALLBACK_RESULTS: &[(&str, &str)] = &[
    ("retried", "transient"),
    ("dead", "permanent"),
    ("dead", "exhausted"),
    ("dead", "expired"),
    ("duplicate", "none"),
    ("foreign", "none"),
    ("forged", "none"),
    ("rejected", "none"),
    ("busy", "none"),
    ("unavailable", "none"),
];

const HTTP_ENQUEUE_RESULTS: &[&str] = &["accepted", "invalid", "withheld", "unavailable"];

/// The process-wide Prometheus recorder, installed with every HELP text and
/// the latency buckets on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(VENDOR_REQUEST_SECONDS.name.into()),
                    LATENCY_BUCKETS,
                )
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            gauge!(BUILD_INFO.name, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            counter!(HTTP_CONNECTIONS_REFUSED.name).increment(0);
            for result in HTTP_ENQUEUE_RESULTS {
                counter!(HTTP_ENQUEUE_JOBS.name, "result" => *result).increment(0);
            }
            for status in crate::http::ENQUEUE_JOBS.statuses {
                counter!(HTTP_ENQUEUE_REQUESTS.name, "status" => status.to_string()).increment(0);
            }
            counter!(CALLBACKS.name, "account" => "-", "result" => "unauthorized", "reason" => "none")
                .increment(0);
            handle
        })
        .clone()
}

fn describe() {
    for m in all() {
        match m.kind {
            Kind::Counter => ::metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => ::metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => {
                ::metrics::describe_histogram!(m.name, ::metrics::Unit::Seconds, m.help)
            }
        }
    }
}

fn account_labels(account: &Account) -> [(&'static str, String); 2] {
    [
        ("vendor", account.vendor_id.clone()),
        ("account", account.name.clone()),
    ]
}

/// Registers every series of `accounts` at 0 and reads their breaker and
/// pause at each scrape from now on.
pub fn register(accounts: &[Arc<Account>], config: &Config) {
    prometheus();
    start_upkeep();
    for account in accounts {
        let labels = account_labels(account);
        for (outcome, reason) in JOB_OUTCOMES {
            let series = [
                &labels[..],
                &[
                    ("outcome", outcome.to_string()),
                    ("reason", reason.to_string()),
                ],
            ]
            .concat();
            counter!(JOBS.name, &series).increment(0);
        }
        counter!(LANE_PAUSES.name, &labels).increment(0);
        // A histogram with no observation yet still exports its zero buckets.
        let _ = histogram!(VENDOR_REQUEST_SECONDS.name, &labels);
        for m in [
            &LANE_ACTIVE,
            &LANE_PAUSED_SECONDS,
            &BREAKER_STATE,
            &IN_FLIGHT,
        ] {
            gauge!(m.name, &labels).set(0.0);
        }
        account.metrics.in_flight_limit(account.in_flight.limit());
        if let Ok(spec) = crate::vendor::spec(&account.vendor_id) {
            for m in spec.account_counters {
                counter!(m.name, "account" => account.name.clone()).increment(0);
            }
        }
        WATCHED
            .lock()
            .expect("watched lock")
            .push(Arc::downgrade(account));
    }
    let callback_accounts = config
        .accounts
        .iter()
        .filter(|a| crate::callback::takes_callbacks(a));
    for account in callback_accounts {
        for (result, reason) in CALLBACK_RESULTS {
            callback(&account.name, result, reason, 0);
        }
    }
}

/// How often histogram samples are folded into their buckets between scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds histogram samples into buckets every [`UPKEEP_INTERVAL`] on the
/// current runtime (once per process): the recorder otherwise keeps every
/// sample until the next scrape, memory that grows with the jobs delivered.
fn start_upkeep() {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if STARTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    runtime.spawn(async {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            every.tick().await;
            prometheus().run_upkeep();
        }
    });
}

/// Accounts whose breaker and pause are read at each scrape.
static WATCHED: Mutex<Vec<Weak<Account>>> = Mutex::new(Vec::new());

/// Sets the gauges read from live state (breaker, pause); called before each render.
pub fn refresh() {
    let mut watched = WATCHED.lock().expect("watched lock");
    watched.retain(|account| account.strong_count() > 0);
    for account in watched.iter().filter_map(Weak::upgrade) {
        let labels = account_labels(&account);
        let paused = account.limiter.paused_until().map_or(0.0, |until| {
            until
                .saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64()
        });
        gauge!(LANE_PAUSED_SECONDS.name, &labels).set(paused);
        gauge!(BREAKER_STATE.name, &labels).set(account.breaker.state().value());
    }
}

/// Renders every metric for `/metrics`.
pub fn render() -> String {
    refresh();
    prometheus().render()
}

/// Counts a job settled by `account`'s lane.
pub fn job_settled(account: &Account, outcome: &str, reason: &str) {
    account.metrics.job_settled(outcome, reason);
}

/// The series a lane touches for every job, looked up once per account: a
/// lookup by labels allocates the labels and hashes them, on every call.
pub struct AccountMetrics {
    labels: [(&'static str, String); 2],
    jobs: Vec<(&'static str, &'static str, Counter)>,
    vendor_request: Histogram,
    in_flight: Gauge,
    in_flight_limit: Gauge,
}

impl AccountMetrics {
    /// Installs the recorder first, so that the handles are live.
    pub fn new(vendor: &str, account: &str) -> Self {
        prometheus();
        let labels = [
            ("vendor", vendor.to_string()),
            ("account", account.to_string()),
        ];
        let jobs = JOB_OUTCOMES
            .iter()
            .map(|&(outcome, reason)| (outcome, reason, jobs_counter(&labels, outcome, reason)))
            .collect();
        Self {
            jobs,
            vendor_request: histogram!(VENDOR_REQUEST_SECONDS.name, &labels),
            in_flight: gauge!(IN_FLIGHT.name, &labels),
            in_flight_limit: gauge!(IN_FLIGHT_LIMIT.name, &labels),
            labels,
        }
    }

    pub fn job_settled(&self, outcome: &str, reason: &str) {
        match self
            .jobs
            .iter()
            .find(|(o, r, _)| *o == outcome && *r == reason)
        {
            Some((_, _, counter)) => counter.increment(1),
            None => jobs_counter(&self.labels, outcome, reason).increment(1),
        }
    }

    pub fn in_flight_limit(&self, limit: u32) {
        self.in_flight_limit.set(f64::from(limit));
    }
}

fn jobs_counter(labels: &[(&'static str, String); 2], outcome: &str, reason: &str) -> Counter {
    let series = [
        &labels[..],
        &[
            ("outcome", outcome.to_string()),
            ("reason", reason.to_string()),
        ],
    ]
    .concat();
    counter!(JOBS.name, &series)
}

/// The `outcome` and `reason` labels of a job dead-lettered for `reason`.
pub fn dead(reason: Reason) -> (&'static str, &'static str) {
    ("dead", reason.as_str())
}

/// Records one vendor request of `account`.
pub fn vendor_request(account: &Account, took: Duration) {
    account.metrics.vendor_request.record(took.as_secs_f64());
}

/// Counts a lane pause of `account`.
pub fn lane_paused(account: &Account) {
    counter!(LANE_PAUSES.name, &account_labels(account)).increment(1);
}

/// Sets whether this replica receives `account`'s lane.
pub fn lane_active(account: &Account, active: bool) {
    gauge!(LANE_ACTIVE.name, &account_labels(account)).set(if active { 1.0 } else { 0.0 });
}

/// Counts a vendor callback (`herald_callbacks_total`).
pub fn callback(account: &str, result: &str, reason: &str, n: u64) {
    counter!(
        CALLBACKS.name,
        "account" => account.to_string(),
        "result" => result.to_string(),
        "reason" => reason.to_string()
    )
    .increment(n);
}

/// One delivery held by this process; dropping it ends the hold.
pub struct InFlight(::metrics::Gauge);

impl InFlight {
    pub fn start(account: &Account) -> Self {
        let gauge = account.metrics.in_flight.clone();
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How often lane and DLQ depths are read from the broker.
pub const DEPTH_INTERVAL: Duration = Duration::from_secs(10);

/// A queue whose depth is exported: a lane (its vendor and account) or the DLQ.
#[derive(Debug, Clone)]
pub enum Watched {
    Lane {
        queue: String,
        vendor: String,
        account: String,
    },
    Dlq(String),
}

/// Every lane of `accounts` and the DLQ.
pub fn watched_queues(accounts: &[Arc<Account>], names: &Names) -> Vec<Watched> {
    accounts
        .iter()
        .map(|a| Watched::Lane {
            queue: names.lane(&a.vendor_id, &a.name),
            vendor: a.vendor_id.clone(),
            account: a.name.clone(),
        })
        .chain([Watched::Dlq(names.dlq())])
        .collect()
}

/// Reads the depth of `queues` every [`DEPTH_INTERVAL`] with a passive
/// declare (one round trip each; the DLQ's depth by reason would mean reading
/// every dead job, which `herald dlq stats` does on demand) until `stop`.
pub async fn watch_depths(channel: Channel, queues: Vec<Watched>, stop: CancellationToken) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    loop {
        for watched in &queues {
            let name = match watched {
                Watched::Lane { queue, .. } | Watched::Dlq(queue) => queue,
            };
            let Ok(queue) = channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
            else {
                // The channel is closed (the session ends, or the queue vanished): stop here.
                return;
            };
            match watched {
                Watched::Lane {
                    vendor, account, ..
                } => {
                    let labels = [("vendor", vendor.clone()), ("account", account.clone())];
                    gauge!(LANE_MESSAGES.name, &labels).set(f64::from(queue.message_count()));
                    gauge!(LANE_CONSUMERS.name, &labels).set(f64::from(queue.consumer_count()));
                }
                Watched::Dlq(_) => {
                    gauge!(DLQ_MESSAGES.name).set(f64::from(queue.message_count()));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(DEPTH_INTERVAL) => {}
        }
    }
    let _ = channel.close(200, "depth watch stopped".into()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names listed in the first column of docs/metrics.md's tables.
    fn documented() -> Vec<(String, String)> {
        let doc = include_str!("../docs/metrics.md");
        doc.lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                name.starts_with("herald_")
                    .then(|| (name.to_string(), cells.get(2).unwrap_or(&"").to_string()))
            })
            .collect()
    }

    #[test]
    fn docs_metrics_md_lists_exactly_every_metric_with_its_kind() {
        let documented = documented();
        let mut names: Vec<&str> = documented.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        let all = all();
        let mut exported: Vec<&str> = all.iter().map(|m| m.name).collect();
        exported.sort_unstable();
        assert_eq!(names, exported, "docs/metrics.md and metrics::all() differ");
        for (name, kind) in &documented {
            let m = all.iter().find(|m| m.name == name).unwrap();
            assert_eq!(kind, m.kind.as_str(), "kind of {name} in docs/metrics.md");
        }
    }

    #[test]
    fn every_metric_has_help_and_every_counter_ends_in_total() {
        for m in all() {
            assert!(m.help.len() > 20, "{} needs HELP text", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn a_vendor_s_own_counters_are_counters_labelled_by_account_alone() {
        for spec in crate::vendor::VENDORS {
            for m in spec.account_counters {
                assert_eq!(
                    (m.kind, m.labels),
                    (Kind::Counter, &["account"][..]),
                    "{}",
                    m.name
                );
            }
        }
    }

    #[test]
    fn every_dead_reason_a_lane_can_give_is_registered() {
        for reason in [
            Reason::Invalid,
            Reason::Permanent,
            Reason::Exhausted,
            Reason::Expired,
        ] {
            assert!(JOB_OUTCOMES.contains(&dead(reason)), "{reason}");
        }
    }
}
