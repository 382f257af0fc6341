//! Configuration: one TOML file plus `HERALD_…` environment overrides.
//!
//! Loading is strict: unknown keys, bad URLs, missing secrets and duplicate
//! accounts are errors that name the offending key. Secrets are wrapped in
//! [`Secret`] so that neither `Debug`, `Display` nor `config check` can print them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

use crate::outcome::Policy;
use crate::vendor::{self, KeyKind};

/// A value that must never reach a log line, an error or `config check`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// A secret written as a number or a boolean is taken as its text: serde's
/// "invalid type" error would quote the value. Anything else fails without it.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(i64),
            Bool(bool),
        }
        Ok(Secret(
            match Raw::deserialize(d).map_err(|_| {
                serde::de::Error::custom("a secret must be a string (its value is not shown)")
            })? {
                Raw::Text(s) => s,
                Raw::Int(i) => i.to_string(),
                Raw::Bool(b) => b.to_string(),
            },
        ))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that signs or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

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

impl TelemetryConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.otlp_endpoint {
            if !matches!(url.scheme(), "http" | "https") {
                bail!("telemetry.otlp_endpoint must use http:// or https:// (OTLP over HTTP)");
            }
            if !url.username().is_empty() || url.password().is_some() {
                bail!(
                    "telemetry.otlp_endpoint must carry no credentials; set OTEL_EXPORTER_OTLP_HEADERS instead"
                );
            }
        }
        Ok(())
    }
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

/// The broker URL, printed with its password redacted.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password masked, in every form the input may take.
    fn redacted(&self) -> String {
        crate::redact::url(&self.0)
    }

    fn validate(&self, key: &str) -> anyhow::Result<()> {
        if self.0.is_empty() {
            bail!(
                "{key} is empty: every node needs a URL like amqp://user:password@host:5672/vhost"
            );
        }
        match Url::parse(&self.0) {
            // `amqp:user:pass@host` parses, but as a path: the broker would see no host.
            Ok(u) if u.cannot_be_a_base() || !u.has_host() => {
                bail!("{key} has no host: it must look like amqp://user:password@host:5672/vhost")
            }
            Ok(u) if matches!(u.scheme(), "amqp" | "amqps") => Ok(()),
            Ok(u) => bail!("{key} must use amqp:// or amqps://, not {}://", u.scheme()),
            Err(e) => bail!(
                "{key} is not a valid URL: {e} (in HERALD_BROKER_URL, commas separate nodes: write a comma in a password as %2C)"
            ),
        }
    }

    /// The vhost the URL names, as lapin reads it: `/` without a path, empty for a bare `/`.
    fn vhost(&self) -> String {
        let Ok(url) = Url::parse(&self.0) else {
            return String::new();
        };
        let path = url.path().get(1..).unwrap_or("/");
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// `text` (a library's error, say) with this URL and its password masked.
    pub fn scrub(&self, text: &str) -> String {
        let redacted = self.redacted();
        let masked = if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(self.0.as_str(), &redacted)
        };
        let passwords = crate::redact::url_passwords(&self.0);
        let passwords: Vec<&str> = passwords.iter().map(String::as_str).collect();
        crate::redact::scrub(&masked, &passwords)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for BrokerUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// `broker.url`: one node's URL, or a cluster's nodes in the order herald
/// tries them; printed with every password redacted. In the file a string or
/// an array of strings; in `HERALD_BROKER_URL` a comma-separated list.
#[derive(Clone)]
pub struct BrokerUrls(Vec<BrokerUrl>);

impl BrokerUrls {
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self(urls.into_iter().map(BrokerUrl::new).collect())
    }

    /// `HERALD_BROKER_URL`'s form: URLs separated by commas, spaces around them
    /// ignored. A comma in a password must be written `%2C`.
    pub fn from_list(text: &str) -> Self {
        Self::new(list_items(text))
    }

    /// The nodes, in the order a connection tries them.
    pub fn nodes(&self) -> &[BrokerUrl] {
        &self.0
    }

    /// The list as a TOML value, for a config file built from `HERALD_BROKER_URL`
    /// or a command-line argument: one URL as a string, more as an array.
    pub fn to_toml(&self) -> String {
        let raw = |u: &BrokerUrl| toml::Value::String(u.0.clone());
        match self.0.as_slice() {
            [one] => raw(one).to_string(),
            many => toml::Value::Array(many.iter().map(raw).collect()).to_string(),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        let Some(first) = self.0.first() else {
            bail!(
                "broker.url lists no node: give one AMQP URL, or every node of a cluster, e.g. [\"amqp://user:password@rabbit-1:5672/%2f\", \"amqp://user:password@rabbit-2:5672/%2f\"]"
            );
        };
        let first_vhost = first.vhost();
        for (i, node) in self.0.iter().enumerate() {
            // One URL keeps the key's plain name; in a list, the index and the redacted node say which.
            let key = match self.0.len() {
                1 => "broker.url".to_string(),
                _ if node.0.is_empty() => format!("broker.url[{i}]"),
                _ => format!("broker.url[{i}] ({node})"),
            };
            node.validate(&key)?;
            if self.0[..i].iter().any(|other| other.0 == node.0) {
                bail!("{key} is listed twice; list each node once");
            }
            let vhost = node.vhost();
            if vhost != first_vhost {
                bail!(
                    "{key} names vhost `{vhost}` but broker.url[0] names `{first_vhost}`: every node of one cluster serves the same vhosts, so give every URL the same one"
                );
            }
        }
        Ok(())
    }
}

fn list_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim)
}

/// One URL is read as a string, more as an array; anything else fails
/// without quoting the value (it may hold a password).
impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d) {
            Ok(Raw::One(url)) => Ok(Self::new([url])),
            Ok(Raw::Many(urls)) => Ok(Self::new(urls)),
            Err(_) => Err(serde::de::Error::custom(
                "must be an AMQP URL or an array of them (strings; the value is not shown)",
            )),
        }
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, node) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{node}")?;
        }
        Ok(())
    }
}

/// One URL stays a string, so `config check` prints a single-node config as written.
impl Serialize for BrokerUrls {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Health, readiness and metrics listen here, and the Tencent callback
    /// unless `callback_listen` is set.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serves only the Tencent callback route, the one meant for the internet.
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

impl HttpConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.header_timeout.is_zero() || self.request_timeout.is_zero() {
            bail!("http.header_timeout and http.request_timeout must be longer than zero");
        }
        if self.max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        for (key, token) in [
            ("http.enqueue_token", &self.enqueue_token),
            ("http.enqueue_token_previous", &self.enqueue_token_previous),
        ] {
            // Whoever holds the token sends through every account: it must not be guessable.
            if token
                .as_ref()
                .is_some_and(|t| t.expose().len() < MIN_ENQUEUE_TOKEN_LEN)
            {
                bail!(
                    "{key} must be at least {MIN_ENQUEUE_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
                );
            }
        }
        if self.enqueue_token_previous.is_some() && self.enqueue_token.is_none() {
            bail!("http.enqueue_token_previous is set without http.enqueue_token");
        }
        if self.enqueue_max_bytes == 0 {
            bail!("http.enqueue_max_bytes must be at least 1");
        }
        // Port 0 asks for any free port, so two of them are different listeners.
        if self.callback_listen == Some(self.listen) && self.listen.port() != 0 {
            bail!(
                "http.callback_listen is http.listen ({}); use another address or leave it unset",
                self.listen
            );
        }
        Ok(())
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
    /// defaults: 8 with a rate limit, 1024 without (see [`crate::in_flight`]).
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
pub struct Credentials(BTreeMap<String, Credential>);

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

    fn env_prefix(&self) -> String {
        format!(
            "HERALD_ACCOUNT_{}_{}_",
            env_word(&self.vendor),
            env_word(&self.name)
        )
    }
}

fn env_word(s: &str) -> String {
    s.to_ascii_uppercase().replace('-', "_")
}

impl Config {
    /// Reads the file at `path`, applies the process environment and validates.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read config file {} (pass --config or set HERALD_CONFIG)",
                path.display()
            )
        })?;
        Self::parse(&text, std::env::vars())
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses TOML text, applies `HERALD_…` overrides from `env`, and validates.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        apply_env(&mut table, env)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("at `{}`: {}", e.path(), e.inner()))?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved configuration as TOML, every secret redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    fn validate(&mut self) -> anyhow::Result<()> {
        let prefix = &self.broker.prefix;
        if prefix.len() > MAX_PREFIX_BYTES {
            bail!(
                "broker.prefix is {} bytes, at most {MAX_PREFIX_BYTES} are allowed (queue names are AMQP short strings)",
                prefix.len()
            );
        }
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "broker.prefix `{prefix}` must be non-empty and use only letters, digits, `-`, `_`, `.`"
            );
        }
        self.broker.url.validate()?;
        let heartbeat = self.broker.heartbeat;
        if heartbeat < Duration::from_secs(2)
            || heartbeat.subsec_nanos() != 0
            || heartbeat.as_secs() > u64::from(u16::MAX)
        {
            bail!(
                "broker.heartbeat must be whole seconds from 2s to {}s (RabbitMQ's default is 60s)",
                u16::MAX
            );
        }
        if self.broker.consumer_timeout < Duration::from_secs(2) {
            bail!(
                "broker.consumer_timeout must be at least 2s: set it to the broker's consumer_timeout (default 30m)"
            );
        }
        if self.retry.tiers.is_empty() {
            bail!("retry.tiers must list at least one delay, e.g. [\"1s\", \"5s\", \"30s\"]");
        }
        if self.retry.tiers.iter().any(|d| d.is_zero()) {
            bail!("retry.tiers must be longer than zero");
        }
        if self.retry.max_attempts == 0 {
            bail!("retry.max_attempts must be at least 1");
        }
        if self.worker.delivery_limit == 0 {
            bail!("worker.delivery_limit must be at least 1");
        }
        self.http.validate()?;
        self.telemetry.validate()?;
        let mut seen = std::collections::BTreeSet::new();
        let mut apps = std::collections::BTreeMap::new();
        for (i, account) in self.accounts.iter_mut().enumerate() {
            validate_account(account).with_context(|| {
                format!(
                    "in [[account]] #{} ({}.{})",
                    i + 1,
                    account.vendor,
                    account.name
                )
            })?;
            if !seen.insert(account.routing_key()) {
                bail!(
                    "duplicate account: vendor `{}` name `{}` is configured twice",
                    account.vendor,
                    account.name
                );
            }
            let key = vendor::spec(&account.vendor)?.app_key;
            if let Some(value) = key.and_then(|k| account.credentials.get(k)) {
                // The vendor limits the app wherever it is reached: another
                // base_url (an API alias, a proxy) is the same app and limit.
                // HTTP drops the spaces around a header value, so they name the same app.
                let app = (account.vendor.clone(), value.trim().to_string());
                if let Some((other, other_url)) =
                    apps.insert(app, (account.name.clone(), account.base_url.clone()))
                {
                    let where_ = if other_url == account.base_url {
                        String::new()
                    } else {
                        format!(" (at {other_url} and {})", account.base_url)
                    };
                    bail!(
                        "accounts `{other}` and `{}` both use {} {} `{}`{where_}: one vendor app has one rate limit, so give it one account",
                        account.name,
                        account.vendor,
                        key.unwrap_or_default(),
                        value.trim()
                    );
                }
            }
        }
        Ok(())
    }

    /// The retry policy of an account: its own tiers and attempt limit, else the
    /// global ones, and its ban time, else the vendor's.
    pub fn policy_for(&self, account: &AccountConfig) -> Policy {
        let own = account.retry.as_ref();
        let tiers = own
            .map(|r| r.tiers.clone())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| self.retry.tiers.clone());
        let max_attempts = own
            .and_then(|r| r.max_attempts)
            .unwrap_or(self.retry.max_attempts);
        let default_ban =
            vendor::spec(&account.vendor).map_or(Duration::from_secs(1), |s| s.default_ban);
        Policy {
            tiers,
            max_attempts,
            ban: account.ban.unwrap_or(default_ban),
        }
    }

    /// Every tier delay any account uses, each once, shortest first: the tier queues to declare.
    pub fn all_tiers(&self) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = self
            .accounts
            .iter()
            .flat_map(|a| self.policy_for(a).tiers)
            .chain(self.retry.tiers.iter().copied())
            .collect();
        tiers.sort();
        tiers.dedup();
        tiers
    }

    pub fn account(&self, vendor: &str, name: &str) -> Option<&AccountConfig> {
        self.accounts
            .iter()
            .find(|a| a.vendor == vendor && a.name == name)
    }
}

/// Longest `broker.prefix`: with the longest suffix herald adds (`.lane.<vendor>.<account>`,
/// `.retry.<tier>`), every queue and exchange name stays within an AMQP short string's 255 bytes.
pub const MAX_PREFIX_BYTES: usize = 128;

/// Longest account name (ASCII, so also bytes); it is part of routing keys and lane names.
pub const MAX_ACCOUNT_NAME_LEN: usize = 64;

fn validate_account(account: &mut AccountConfig) -> anyhow::Result<()> {
    let spec = vendor::spec(&account.vendor)?;
    let name = &account.name;
    let name_ok = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !name_ok {
        bail!(
            "name `{name}` must be 1-{MAX_ACCOUNT_NAME_LEN} characters of a-z, 0-9, `-` or `_` (it is part of the routing key)"
        );
    }
    if !matches!(account.base_url.scheme(), "http" | "https") {
        bail!(
            "base_url must be http:// or https://, got `{}`",
            account.base_url
        );
    }
    if account.rate_limit == Some(0) {
        bail!("rate_limit must be at least 1 request per second (omit it for no limit)");
    }
    if !(0.0..0.5).contains(&account.rate_margin) {
        bail!(
            "rate_margin must be in [0, 0.5), got {}",
            account.rate_margin
        );
    }
    if account.concurrency == Some(0) {
        bail!("concurrency must be at least 1");
    }
    if account.timeout.is_zero() {
        bail!("timeout must be longer than zero");
    }
    if let Some(retry) = &account.retry {
        if retry.tiers.iter().any(|d| d.is_zero()) {
            bail!("retry.tiers must be longer than zero");
        }
        if retry.max_attempts == Some(0) {
            bail!("retry.max_attempts must be at least 1");
        }
    }
    if account.rate_limit.is_none() {
        account.rate_limit = spec.default_rate_limit;
    }
    if account.concurrency.is_none() {
        account.concurrency = Some(crate::in_flight::default_concurrency(
            account.rate_limit.is_some(),
        ));
    }
    let prefix = account.env_prefix();
    let mut creds = BTreeMap::new();
    for (key, value) in std::mem::take(&mut account.credentials.0) {
        let Some(kind) = spec.keys.iter().find(|k| k.name == key).map(|k| k.kind) else {
            let known: Vec<_> = spec.keys.iter().map(|k| k.name).collect();
            bail!(
                "unknown key `{key}` for vendor {}; known keys: {}",
                spec.id,
                known.join(", ")
            );
        };
        let value = match value {
            Credential::Secret(raw) if !kind.is_secret() => Credential::Plain(raw.0),
            other => other,
        };
        creds.insert(key, value);
    }
    for key in spec.keys.iter().filter(|k| k.kind.is_required()) {
        if !creds.contains_key(key.name) {
            bail!(
                "missing key `{}` (set it in the file or in {}{})",
                key.name,
                prefix,
                key.name.to_ascii_uppercase()
            );
        }
    }
    account.credentials = Credentials(creds);
    // Vendor-specific checks (e.g. a numeric SDKAppID) live in the vendor's own constructor.
    (spec.build)(account)?;
    Ok(())
}

/// A TOML syntax error by line and column only: toml's own text quotes the
/// line, and that line may be the one holding a password.
fn syntax_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else {
        return anyhow::anyhow!("TOML parse error: {}", e.message());
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    anyhow::anyhow!(
        "TOML parse error at line {line}, column {column}: {}",
        e.message()
    )
}

impl KeyKind {
    fn is_secret(self) -> bool {
        matches!(self, KeyKind::Secret | KeyKind::OptionalSecret)
    }

    fn is_required(self) -> bool {
        matches!(self, KeyKind::Plain | KeyKind::Secret)
    }
}

/// Applies `HERALD_BROKER_URL` (a comma-separated list of nodes), `HERALD_BROKER_PREFIX`, the `HERALD_HTTP_…` keys
/// below and `HERALD_ACCOUNT_<VENDOR>_<NAME>_<KEY>` to the parsed file.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    const DIRECT: &[(&str, &str, &str)] = &[
        ("HERALD_BROKER_URL", "broker", "url"),
        ("HERALD_BROKER_PREFIX", "broker", "prefix"),
        ("HERALD_HTTP_LISTEN", "http", "listen"),
        ("HERALD_HTTP_CALLBACK_LISTEN", "http", "callback_listen"),
        ("HERALD_HTTP_ENQUEUE_TOKEN", "http", "enqueue_token"),
        (
            "HERALD_HTTP_ENQUEUE_TOKEN_PREVIOUS",
            "http",
            "enqueue_token_previous",
        ),
        (
            "HERALD_TELEMETRY_OTLP_ENDPOINT",
            "telemetry",
            "otlp_endpoint",
        ),
    ];
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("HERALD_"))
        .collect();
    env.sort();
    for (var, value) in env {
        if let Some((_, section, key)) = DIRECT.iter().find(|(v, _, _)| *v == var) {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section_table) = entry else {
                bail!("`{section}` must be a table");
            };
            let value = if var == "HERALD_BROKER_URL" && value.contains(',') {
                toml::Value::Array(
                    list_items(&value)
                        .map(|url| toml::Value::String(url.to_string()))
                        .collect(),
                )
            } else {
                toml::Value::String(value)
            };
            section_table.insert(key.to_string(), value);
        } else if var.starts_with("HERALD_ACCOUNT_") {
            apply_account_env(table, &var, value)?;
        }
    }
    Ok(())
}

fn apply_account_env(table: &mut toml::Table, var: &str, value: String) -> anyhow::Result<()> {
    let Some(toml::Value::Array(accounts)) = table.get_mut("account") else {
        bail!("{var} is set but no [[account]] is configured");
    };
    for account in accounts.iter_mut() {
        let toml::Value::Table(account) = account else {
            continue;
        };
        let word = |k: &str| account.get(k).and_then(|v| v.as_str()).map(env_word);
        let (Some(vendor), Some(name)) = (word("vendor"), word("name")) else {
            continue;
        };
        let prefix = format!("HERALD_ACCOUNT_{vendor}_{name}_");
        if let Some(key) = var.strip_prefix(&prefix) {
            account.insert(key.to_ascii_lowercase(), toml::Value::String(value));
            return Ok(());
        }
    }
    bail!("{var} matches no configured account (expected HERALD_ACCOUNT_<VENDOR>_<NAME>_<KEY>)")
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[broker]
url = "amqp://guest:hunter2@127.0.0.1:5672/%2f"

[[account]]
vendor = "netease"
name = "default"
base_url = "https://api.netease.im/nimserver"
app_key = "key1"
app_secret = "s3cr3t-value"
rate_limit = 100
"#;

    fn parse(text: &str) -> anyhow::Result<Config> {
        Config::parse(text, Vec::new())
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.broker.prefix, "herald");
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.retry.tiers.len(), 6);
        assert_eq!(c.accounts[0].rate_limit, Some(100));
        assert_eq!(
            c.accounts[0].credentials.get("app_secret"),
            Some("s3cr3t-value")
        );
    }

    #[test]
    fn config_check_output_never_contains_secrets() {
        let c = parse(BASE).unwrap();
        let shown = format!("{}\n{:?}", c.redacted_toml(), c);
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("[redacted]") && shown.contains("guest:****@"),
            "{shown}"
        );
        assert!(
            shown.contains("key1"),
            "non-secret keys stay visible: {shown}"
        );
    }

    #[test]
    fn a_broker_url_without_a_host_is_refused_without_printing_it() {
        let err = parse(&BASE.replace(
            "amqp://guest:hunter2@127.0.0.1:5672/%2f",
            "amqp:guest:hunter2@127.0.0.1:5672",
        ))
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("no host") && !msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn broker_errors_are_scrubbed_of_the_url_and_its_password() {
        let url = BrokerUrl::new("amqp:guest:hun%40ter2@127.0.0.1:5672");
        let lapin = "Invalid URL: 'amqp:guest:hun%40ter2@127.0.0.1:5672' (login hun@ter2)";
        let shown = format!("{url} {url:?} {}", url.scrub(lapin));
        assert!(!shown.contains("hun"), "{shown}");
        assert!(shown.contains("amqp://<unparseable URL>"), "{shown}");
    }

    #[test]
    fn a_toml_syntax_error_names_the_place_without_quoting_the_line() {
        let err = parse(&BASE.replace("hunter2@", "hun\"ter2@")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("line 3, column"), "{msg}");
        assert!(!msg.contains("ter2"), "{msg}");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let err = parse(&format!("{BASE}\n[brokr]\nx = 1\n")).unwrap_err();
        assert!(format!("{err:#}").contains("brokr"), "{err:#}");
    }

    #[test]
    fn unknown_account_key_lists_the_known_ones() {
        let err = parse(&BASE.replace("rate_limit", "app_scret = \"x\"\nrate_limit")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("unknown key `app_scret`") && msg.contains("app_secret"),
            "{msg}"
        );
    }

    #[test]
    fn missing_secret_says_how_to_provide_it() {
        let err = parse(&BASE.replace("app_secret = \"s3cr3t-value\"\n", "")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("HERALD_ACCOUNT_NETEASE_DEFAULT_APP_SECRET"),
            "{msg}"
        );
    }

    #[test]
    fn environment_supplies_secret_and_broker_url() {
        let text = BASE.replace("app_secret = \"s3cr3t-value\"\n", "");
        let env = vec![
            (
                "HERALD_ACCOUNT_NETEASE_DEFAULT_APP_SECRET".to_string(),
                "from-env".to_string(),
            ),
            (
                "HERALD_BROKER_URL".to_string(),
                "amqp://u:p@10.0.0.1:5672/%2f".to_string(),
            ),
        ];
        let c = Config::parse(&text, env).unwrap();
        assert_eq!(
            c.accounts[0].credentials.get("app_secret"),
            Some("from-env")
        );
        assert_eq!(
            c.broker.url.nodes()[0].expose(),
            "amqp://u:p@10.0.0.1:5672/%2f"
        );
    }

    const CLUSTER: &str = r#"url = [
  "amqp://guest:pw-one@rabbit-1:5672/%2f",
  "amqp://guest:pw-two@rabbit-2:5672/%2f",
  "amqps://guest:pw-three@rabbit-3:5671/%2f",
]"#;

    fn with_url(url_line: &str) -> String {
        BASE.replace(
            "url = \"amqp://guest:hunter2@127.0.0.1:5672/%2f\"",
            url_line,
        )
    }

    fn error(text: &str, env: Vec<(String, String)>) -> String {
        format!("{:#}", Config::parse(text, env).unwrap_err())
    }

    #[test]
    fn a_broker_url_may_list_every_node_of_a_cluster_each_password_redacted() {
        let c = parse(&with_url(CLUSTER)).unwrap();
        let hosts: Vec<_> = c
            .broker
            .url
            .nodes()
            .iter()
            .map(|n| {
                Url::parse(n.expose())
                    .unwrap()
                    .host_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(hosts, ["rabbit-1", "rabbit-2", "rabbit-3"], "in order");
        let shown = format!("{}\n{:?}\n{}", c.redacted_toml(), c, c.broker.url);
        for pw in ["pw-one", "pw-two", "pw-three"] {
            assert!(!shown.contains(pw), "{shown}");
        }
        assert!(
            shown.contains("amqp://guest:****@rabbit-1:5672/%2f, amqp://guest:****@rabbit-2:5672/%2f, amqps://guest:****@rabbit-3:5671/%2f"),
            "{shown}"
        );
        // `config check` prints the list as a list, and it reads back as one.
        let printed: toml::Table = toml::from_str(&c.redacted_toml()).unwrap();
        assert_eq!(printed["broker"]["url"].as_array().map(Vec::len), Some(3));
        // One URL stays a string.
        let one: toml::Table = toml::from_str(&parse(BASE).unwrap().redacted_toml()).unwrap();
        assert_eq!(
            one["broker"]["url"].as_str(),
            Some("amqp://guest:****@127.0.0.1:5672/%2f")
        );
    }

    #[test]
    fn herald_broker_url_takes_a_comma_separated_list() {
        let env = |v: &str| vec![("HERALD_BROKER_URL".to_string(), v.to_string())];
        let c = Config::parse(
            BASE,
            env("amqp://u:p1@10.0.0.1:5672/%2f, amqp://u:p2@10.0.0.2:5672/%2f"),
        )
        .unwrap();
        let nodes: Vec<_> = c.broker.url.nodes().iter().map(|n| n.expose()).collect();
        assert_eq!(
            nodes,
            [
                "amqp://u:p1@10.0.0.1:5672/%2f",
                "amqp://u:p2@10.0.0.2:5672/%2f"
            ]
        );
        let c = Config::parse(BASE, env("amqp://u:p%2Cq@10.0.0.1:5672/%2f")).unwrap();
        assert_eq!(
            c.broker.url.nodes().len(),
            1,
            "an encoded comma is no separator"
        );
        // A raw comma in a password splits the URL: refused, without a piece of the password.
        let err = error(BASE, env("amqp://u:S3CRET,xq7z@10.0.0.1:5672/%2f"));
        assert!(
            err.contains("broker.url[0]") && err.contains("%2C"),
            "{err}"
        );
        assert!(!err.contains("S3CRET") && !err.contains("xq7z"), "{err}");
        let err = error(
            BASE,
            env("amqp://u:p@10.0.0.1:5672/%2f,,amqp://u:p@10.0.0.2/%2f"),
        );
        assert!(err.contains("broker.url[1] is empty"), "{err}");
    }

    #[test]
    fn a_bad_node_list_is_refused_naming_the_node_without_its_password() {
        let cases = [
            ("url = []", "broker.url lists no node"),
            ("url = 5672", "must be an AMQP URL or an array of them"),
            (
                "url = [\"amqp://u:pw-1@a/%2f\", 5]",
                "must be an AMQP URL or an array of them",
            ),
            (
                "url = [\"amqp://u:pw-1@a/%2f\", \"http://u:pw-2@b/%2f\"]",
                "broker.url[1] (http://u:****@b/%2f) must use amqp:// or amqps://, not http://",
            ),
            (
                "url = [\"amqp://u:pw-1@a/%2f\", \"amqp:u:pw-2@b\"]",
                "broker.url[1] (amqp://<unparseable URL>) has no host",
            ),
            (
                "url = [\"amqp://u:pw-1@a/%2f\", \"amqp://u:pw-1@a/%2f\"]",
                "broker.url[1] (amqp://u:****@a/%2f) is listed twice",
            ),
            (
                "url = [\"amqp://u:pw-1@a/%2f\", \"amqp://u:pw-2@b/orders\"]",
                "broker.url[1] (amqp://u:****@b/orders) names vhost `orders` but broker.url[0] names `/`",
            ),
        ];
        for (line, expected) in cases {
            let err = error(&with_url(line), Vec::new());
            assert!(err.contains(expected), "{line}: {err}");
            assert!(!err.contains("pw-"), "{line}: {err}");
        }
        // No path is the default vhost, as `%2f` is.
        assert!(parse(&with_url("url = [\"amqp://a\", \"amqp://c/%2f\"]")).is_ok());
    }

    #[test]
    fn environment_override_for_a_missing_account_is_an_error() {
        let env = vec![(
            "HERALD_ACCOUNT_NETEASE_OTHER_APP_SECRET".to_string(),
            "x".to_string(),
        )];
        let err = Config::parse(BASE, env).unwrap_err();
        assert!(format!("{err:#}").contains("matches no configured account"));
    }

    #[test]
    fn a_prefix_too_long_for_amqp_queue_names_is_rejected() {
        let long = BASE.replace(
            "[broker]",
            &format!("[broker]\nprefix = \"{}\"", "p".repeat(129)),
        );
        let err = parse(&long).unwrap_err();
        assert!(
            format!("{err:#}").contains("broker.prefix is 129 bytes, at most 128"),
            "{err:#}"
        );
        let fits = BASE.replace(
            "[broker]",
            &format!("[broker]\nprefix = \"{}\"", "p".repeat(128)),
        );
        assert!(parse(&fits).is_ok());
    }

    #[test]
    fn duplicate_account_is_rejected() {
        let dup = format!("{BASE}{}", &BASE[BASE.find("[[account]]").unwrap()..]);
        let err = parse(&dup).unwrap_err();
        assert!(format!("{err:#}").contains("duplicate account"), "{err:#}");
    }

    #[test]
    fn a_secret_written_as_a_number_is_never_quoted_in_an_error() {
        let numeric = BASE.replace("\"s3cr3t-value\"", "98765432123456789");
        let c = parse(&numeric).unwrap();
        assert_eq!(
            c.accounts[0].credentials.get("app_secret"),
            Some("98765432123456789")
        );
        let float = BASE.replace("\"s3cr3t-value\"", "98765.4321");
        let err = format!("{:#}", parse(&float).unwrap_err());
        assert!(!err.contains("98765"), "{err}");
        let token = BASE.replace("[broker]", "[http]\nenqueue_token = 98765.4321\n[broker]");
        let err = format!("{:#}", parse(&token).unwrap_err());
        assert!(!err.contains("98765"), "{err}");
    }

    #[test]
    fn two_accounts_of_one_vendor_app_are_rejected() {
        let second = BASE[BASE.find("[[account]]").unwrap()..].replace("\"default\"", "\"other\"");
        let err = parse(&format!("{BASE}{second}")).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("accounts `default` and `other` both use netease app_key"),
            "{err}"
        );
    }

    #[test]
    fn the_heartbeat_is_whole_seconds_and_the_consumer_timeout_at_least_two() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.broker.heartbeat, Duration::from_secs(60));
        assert_eq!(c.broker.consumer_timeout, Duration::from_secs(1800));
        for bad in [
            "heartbeat = \"0s\"",
            "heartbeat = \"1500ms\"",
            "heartbeat = \"20h\"",
        ] {
            let err = parse(&BASE.replace("[broker]", &format!("[broker]\n{bad}"))).unwrap_err();
            assert!(
                format!("{err:#}").contains("broker.heartbeat"),
                "{bad}: {err:#}"
            );
        }
        let err =
            parse(&BASE.replace("[broker]", "[broker]\nconsumer_timeout = \"1s\"")).unwrap_err();
        assert!(
            format!("{err:#}").contains("broker.consumer_timeout"),
            "{err:#}"
        );
        let c = parse(&BASE.replace("[broker]", "[broker]\nheartbeat = \"4s\"")).unwrap();
        assert_eq!(c.broker.heartbeat, Duration::from_secs(4));
    }

    #[test]
    fn one_app_key_is_one_account_whatever_url_reaches_it() {
        let second = BASE[BASE.find("[[account]]").unwrap()..]
            .replace("\"default\"", "\"other\"")
            .replace(
                "https://api.netease.im/nimserver",
                "https://api.yunxinapi.com/nimserver/",
            )
            .replace("\"key1\"", "\" key1 \"");
        let err = format!("{:#}", parse(&format!("{BASE}{second}")).unwrap_err());
        assert!(
            err.contains("accounts `default` and `other` both use netease app_key `key1`")
                && err.contains("api.yunxinapi.com"),
            "{err}"
        );
        // Through the environment too.
        let other = BASE[BASE.find("[[account]]").unwrap()..]
            .replace("\"default\"", "\"other\"")
            .replace("app_key = \"key1\"\n", "");
        let env = vec![(
            "HERALD_ACCOUNT_NETEASE_OTHER_APP_KEY".to_string(),
            "key1".to_string(),
        )];
        let err = format!(
            "{:#}",
            Config::parse(&format!("{BASE}{other}"), env).unwrap_err()
        );
        assert!(err.contains("both use netease app_key `key1`"), "{err}");
        // Two apps are two accounts.
        let distinct = BASE[BASE.find("[[account]]").unwrap()..]
            .replace("\"default\"", "\"other\"")
            .replace("\"key1\"", "\"key2\"");
        assert!(parse(&format!("{BASE}{distinct}")).is_ok());
    }

    #[test]
    fn bad_urls_are_rejected() {
        let err =
            parse(&BASE.replace("https://api.netease.im/nimserver", "not a url")).unwrap_err();
        assert!(format!("{err:#}").contains("base_url"), "{err:#}");
        let err = parse(&BASE.replace("amqp://guest", "http://guest")).unwrap_err();
        assert!(format!("{err:#}").contains("amqp://"), "{err:#}");
    }

    #[test]
    fn unknown_vendor_is_rejected_with_the_known_list() {
        let err =
            parse(&BASE.replace("vendor = \"netease\"", "vendor = \"netease2\"")).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown vendor `netease2`"),
            "{err:#}"
        );
    }

    #[test]
    fn an_account_may_have_its_own_retry_schedule_and_all_tiers_are_declared() {
        let text = format!("{BASE}\n[account.retry]\ntiers = [\"2s\", \"1s\"]\nmax_attempts = 3\n");
        let c = parse(&text).unwrap();
        let policy = c.policy_for(&c.accounts[0]);
        assert_eq!((policy.tiers.len(), policy.max_attempts), (2, 3));
        assert_eq!(policy.ban, Duration::from_secs(10), "NetEase's block time");
        assert_eq!(c.all_tiers().first(), Some(&Duration::from_secs(1)));
        assert_eq!(
            c.all_tiers().len(),
            7,
            "1s shared, 2s added to the 6 defaults"
        );
        let err = parse(&format!("{BASE}\n[account.retry]\ntiers = [\"0s\"]\n")).unwrap_err();
        assert!(format!("{err:#}").contains("longer than zero"), "{err:#}");
    }

    #[test]
    fn the_enqueue_token_comes_from_the_environment_and_is_never_shown() {
        let token = "enqueue-token-from-env-0123456789";
        let env = vec![("HERALD_HTTP_ENQUEUE_TOKEN".to_string(), token.to_string())];
        let c = Config::parse(BASE, env).unwrap();
        assert_eq!(
            c.http.enqueue_token.as_ref().map(Secret::expose),
            Some(token)
        );
        assert_eq!(c.http.enqueue_max_bytes, 1024 * 1024);
        let shown = format!("{}\n{:?}", c.redacted_toml(), c);
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains("enqueue_token = \"[redacted]\""), "{shown}");
    }

    #[test]
    fn a_short_or_orphaned_enqueue_token_is_refused() {
        let err = parse(&format!("{BASE}\n[http]\nenqueue_token = \"short\"\n")).unwrap_err();
        assert!(format!("{err:#}").contains("at least 16"), "{err:#}");
        assert!(!format!("{err:#}").contains("short"), "{err:#}");
        let err = parse(&format!(
            "{BASE}\n[http]\nenqueue_token_previous = \"old-token-0123456789\"\n"
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("without http.enqueue_token"),
            "{err:#}"
        );
    }

    #[test]
    fn account_name_with_a_dot_is_rejected() {
        let err = parse(&BASE.replace("name = \"default\"", "name = \"a.b\"")).unwrap_err();
        assert!(format!("{err:#}").contains("routing key"), "{err:#}");
    }
}
