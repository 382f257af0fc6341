//! Configuration: one TOML file plus `HERALD_…` environment overrides.
//!
//! Loading is strict: unknown keys, bad URLs, missing secrets and duplicate
//! accounts are errors that name the offending key. Secrets are wrapped in
//! [`Secret`] so that neither `Debug`, `Display` nor `config check` can print them.

mod console;
mod dlq;
mod env;
mod policy;
mod review;
mod schema;
mod secret;
mod validate;

use std::path::Path;

use anyhow::Context;

pub use console::{ConsoleConfig, MIN_CONSOLE_TOKEN_LEN};
pub use dlq::{DlqConfig, Retention};
pub use review::ReviewConfig;
pub use schema::{
    AccountConfig, AccountRetry, BrokerConfig, Config, Credential, Credentials, HttpConfig,
    MIN_ENQUEUE_TOKEN_LEN, RetryConfig, TelemetryConfig, WorkerConfig,
};
pub use secret::{BrokerUrl, BrokerUrls, Secret};
pub use validate::{MAX_ACCOUNT_NAME_LEN, MAX_PREFIX_BYTES};

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
        env::apply_env(&mut table, env)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("at `{}`: {}", e.path(), e.inner()))?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved configuration as TOML, every secret redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
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

#[cfg(test)]
mod tests;
