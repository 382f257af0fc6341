//! The configuration's types as the TOML file spells them, with their defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use url::Url;

use super::secret::{BrokerUrls, Secret};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub dlq: super::DlqConfig,
    #[serde(default)]
    pub console: super::ConsoleConfig,
}

/// `[telemetry]`: where spans go. Trace ids and `traceparent` work without it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector (`http://otel-collector:4318`); unset, no span leaves the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<Url>,
    /// The `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
        }
    }
}

fn default_service_name() -> String {
    "herald".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URL of the broker, or of every node of a cluster in the order they
    /// are tried; their passwords are secrets.
    pub url: BrokerUrls,
    /// Every exchange and queue name starts with this.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long a publish may wait for the broker's confirm.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Longest pause between two reconnection attempts.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// AMQP heartbeat timeout asked of the broker (whole seconds). A limited
    /// lane sends only while a round trip to the broker answered within half
    /// of it, and the session ends when none answered within all of it.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The broker's `consumer_timeout` (or the lane's `consumer-timeout`
    /// policy): a job that waited half of it unsent goes back to its lane as a
    /// fresh copy, before the broker would close the channel over it.
    #[serde(default = "default_consumer_timeout", with = "humantime_serde")]
    pub consumer_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Health, readiness and metrics listen here, and the vendors' callback
    /// routes unless `callback_listen` is set.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serves only the vendors' callback routes (Tencent's), the ones meant for the internet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_listen: Option<SocketAddr>,
    /// Longest wait for a request's headers (and between requests on one connection).
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest time from a request's headers to its answer, body included.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once per listener.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Bearer token of `POST /v1/jobs`; the route is served only when it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueue_token: Option<Secret>,
    /// The token before a rotation, still accepted until it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueue_token_previous: Option<Secret>,
    /// Largest `POST /v1/jobs` body, in bytes (413 above it).
    #[serde(default = "default_enqueue_max_bytes")]
    pub enqueue_max_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            callback_listen: None,
            header_timeout: default_http_timeout(),
            request_timeout: default_http_timeout(),
            max_connections: default_max_connections(),
            enqueue_token: None,
            enqueue_token_previous: None,
            enqueue_max_bytes: default_enqueue_max_bytes(),
        }
    }
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_connections() -> usize {
    1024
}

fn default_enqueue_max_bytes() -> usize {
    1024 * 1024
}

/// Shortest `http.enqueue_token` accepted.
pub const MIN_ENQUEUE_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// On SIGTERM, how long in-flight jobs may take before they are handed back to the broker.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A job redelivered more often than this (worker crashes) is dead-lettered as `poison`.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Largest job body accepted, in bytes.
    #[serde(default = "default_max_job_bytes")]
    pub max_job_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            drain_timeout: default_drain_timeout(),
            delivery_limit: default_delivery_limit(),
            max_job_bytes: default_max_job_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Delays of the retry tiers, in order; the last one repeats.
    #[serde(default = "default_tiers", with = "humantime_serde_vec")]
    pub tiers: Vec<Duration>,
    /// Sending attempts before a job is dead-lettered as `exhausted`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Immediate in-process retries of a request that never reached the vendor.
    #[serde(default = "default_immediate")]
    pub immediate: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            tiers: default_tiers(),
            max_attempts: default_max_attempts(),
            immediate: default_immediate(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AccountConfig {
    pub vendor: String,
    pub name: String,
    pub base_url: Url,
    /// Requests per second for the whole account, across every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Fraction of `rate_limit` kept free as a safety margin.
    #[serde(default = "default_rate_margin")]
    pub rate_margin: f64,
    /// How long the lane pauses after the vendor's rate-limit answer (vendor default if unset).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ban: Option<Duration>,
    /// Most jobs of this account in flight at once in one worker: the lane's
    /// prefetch and the in-flight limit's ceiling. Unset, the in-flight
    /// defaults: 8 with a rate limit, 2048 without (see [`crate::in_flight`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u16>,
    /// Whether the in-flight limit adapts to the vendor's latency and errors
    /// (up to `concurrency`); `false` keeps it at `concurrency`.
    #[serde(default = "default_adaptive_concurrency")]
    pub adaptive_concurrency: bool,
    /// Timeout of one vendor request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive retryable failures that open the account's circuit (0: never).
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// While the circuit is open, one probe request per this interval.
    #[serde(default = "default_breaker_probe", with = "humantime_serde")]
    pub breaker_probe: Duration,
    /// This account's own retry schedule (`[account.retry]`); the global one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<AccountRetry>,
    /// Vendor-specific keys (credentials and the like), checked against the vendor's own list.
    #[serde(flatten)]
    pub credentials: Credentials,
}

/// `[account.retry]`: either key may be left out to keep the global value.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountRetry {
    #[serde(
        default,
        with = "humantime_serde_vec",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tiers: Vec<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// The vendor-specific keys of an account, secrets redacted when printed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Credentials(pub(super) BTreeMap<String, Credential>);

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Credential {
    Secret(Secret),
    Plain(String),
}

/// Every credential arrives as a secret; validation unwraps those the vendor declares plain.
impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Secret::deserialize(d).map(Credential::Secret)
    }
}

impl Credentials {
    /// A required key; config validation guarantees required keys are present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|c| match c {
            Credential::Secret(s) => s.expose(),
            Credential::Plain(p) => p.as_str(),
        })
    }

    pub fn require(&self, key: &str) -> anyhow::Result<&str> {
        self.get(key)
            .with_context(|| format!("missing account key `{key}`"))
    }

    /// Builds credentials from plain pairs (tests, the demo); secrecy follows the vendor's key list.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), Credential::Secret(Secret::new(v))))
                .collect(),
        )
    }
}

impl AccountConfig {
    /// `vendor.name`: the lane's routing key.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.vendor, self.name)
    }

    /// The keys every `[[account]]` may have whatever its vendor, as serde
    /// spells them: those of an account with every key set.
    pub fn common_keys() -> Vec<String> {
        let table = toml::Table::try_from(Self::with_every_key()).expect("an account serializes");
        table.keys().cloned().collect()
    }

    /// An account with every optional key set, so that each one serializes,
    /// and no vendor key. Every field is named (no `..`): a new one must be set here.
    fn with_every_key() -> Self {
        Self {
            vendor: String::new(),
            name: String::new(),
            base_url: Url::parse("http://vendor.invalid/").expect("a valid URL"),
            rate_limit: Some(1),
            rate_margin: default_rate_margin(),
            ban: Some(Duration::from_secs(1)),
            concurrency: Some(1),
            adaptive_concurrency: default_adaptive_concurrency(),
            timeout: default_timeout(),
            breaker_threshold: default_breaker_threshold(),
            breaker_probe: default_breaker_probe(),
            retry: Some(AccountRetry {
                tiers: Vec::new(),
                max_attempts: None,
            }),
            credentials: Credentials::default(),
        }
    }
}

impl Config {
    pub fn account(&self, vendor: &str, name: &str) -> Option<&AccountConfig> {
        self.accounts
            .iter()
            .find(|a| a.vendor == vendor && a.name == name)
    }
}

fn default_prefix() -> String {
    "herald".into()
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(60)
}
fn default_consumer_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid address")
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_delivery_limit() -> u32 {
    5
}
fn default_max_job_bytes() -> usize {
    64 * 1024
}
fn default_tiers() -> Vec<Duration> {
    [1, 5, 30, 120, 600, 3600].map(Duration::from_secs).to_vec()
}
fn default_max_attempts() -> u32 {
    7
}
fn default_immediate() -> u32 {
    2
}
fn default_rate_margin() -> f64 {
    crate::limit::DEFAULT_MARGIN
}
fn default_adaptive_concurrency() -> bool {
    true
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_breaker_threshold() -> u32 {
    5
}
fn default_breaker_probe() -> Duration {
    Duration::from_secs(5)
}

mod humantime_serde_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(value: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(value.len()))?;
        for d in value {
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| {
                humantime::parse_duration(s)
                    .map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}")))
            })
            .collect()
    }
}
