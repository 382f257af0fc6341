//! Validation of a parsed configuration: every rule names the key it refuses.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};

use super::schema::{
    AccountConfig, Config, Credential, Credentials, HttpConfig, MIN_ENQUEUE_TOKEN_LEN,
    TelemetryConfig,
};
use crate::vendor;

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

impl Config {
    pub(super) fn validate(&mut self) -> anyhow::Result<()> {
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
        self.console.validate()?;
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
    if !account.base_url.username().is_empty() || account.base_url.password().is_some() {
        // reqwest sent them as `Authorization: Basic`; herald's vendor client
        // does not, and no vendor API takes them. Not quoted: the URL holds a password.
        bail!(
            "base_url must not hold credentials (`user:password@`); the vendor's own go in the account's keys"
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
    // Vendor-specific checks (e.g. a numeric SDKAppID) belong to the vendor.
    (spec.validate)(account)?;
    Ok(())
}
