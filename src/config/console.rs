//! `[console]`: where `herald console` listens and the tokens that open it.
//!
//! Every token is a [`Secret`] with a name; the name (never the token) is who
//! the audit trail records for actions taken with it. `herald console` refuses
//! to start without a token, so an unauthenticated console cannot exist.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::secret::Secret;

/// Shortest console token accepted.
pub const MIN_CONSOLE_TOKEN_LEN: usize = 16;
/// Longest token name: it is written into every audit record.
const MAX_TOKEN_NAME_LEN: usize = 64;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The console's own listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The token of the login form and of `Authorization: Bearer`; also `HERALD_CONSOLE_TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Who the audit records for `token`.
    #[serde(default = "default_token_name")]
    pub token_name: String,
    /// More tokens, each recorded under its own name (`[console.tokens]`, `alice = "…"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, Secret>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            token_name: default_token_name(),
            tokens: BTreeMap::new(),
        }
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8081".parse().expect("valid address")
}

fn default_token_name() -> String {
    "console".into()
}

impl ConsoleConfig {
    /// Checks what any config may hold: token lengths and names.
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        let main = self
            .token
            .iter()
            .map(|t| ("console.token".to_string(), self.token_name.as_str(), t));
        let more = self
            .tokens
            .iter()
            .map(|(n, t)| (format!("console.tokens.{n}"), n.as_str(), t));
        for (key, name, token) in main.chain(more) {
            if name.is_empty()
                || name.chars().count() > MAX_TOKEN_NAME_LEN
                || name.chars().any(char::is_control)
            {
                bail!(
                    "console token names must be 1 to {MAX_TOKEN_NAME_LEN} printable characters (the audit records them)"
                );
            }
            if token.expose().len() < MIN_CONSOLE_TOKEN_LEN {
                bail!(
                    "{key} must be at least {MIN_CONSOLE_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
                );
            }
        }
        if self.tokens.contains_key(&self.token_name) && self.token.is_some() {
            bail!(
                "console.tokens.{} has the name of console.token_name: give every token its own name, so the audit tells them apart",
                self.token_name
            );
        }
        Ok(())
    }

    /// Every token with the name the audit records for it.
    pub fn named_tokens(&self) -> Vec<(&str, &Secret)> {
        let main = self.token.iter().map(|t| (self.token_name.as_str(), t));
        main.chain(self.tokens.iter().map(|(n, t)| (n.as_str(), t)))
            .collect()
    }

    /// What `herald console` needs before it listens: at least one token.
    pub fn check_startable(&self) -> anyhow::Result<()> {
        if self.named_tokens().is_empty() {
            let exposure = if self.listen.ip().is_loopback() {
                "even on loopback"
            } else {
                "and it would listen on a non-loopback address"
            };
            bail!(
                "the console needs a token ({exposure}): set HERALD_CONSOLE_TOKEN (e.g. `export HERALD_CONSOLE_TOKEN=$(openssl rand -hex 32)`) or console.token in the config; nothing is served without one"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ConsoleConfig> {
        let config: ConsoleConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_listen_on_loopback_and_refuse_to_start_without_a_token() {
        let config = parse("").unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8081");
        let err = config.check_startable().unwrap_err().to_string();
        assert!(err.contains("HERALD_CONSOLE_TOKEN"), "{err}");
        let open = parse("listen = \"0.0.0.0:8081\"").unwrap();
        let err = open.check_startable().unwrap_err().to_string();
        assert!(err.contains("non-loopback"), "{err}");
    }

    #[test]
    fn tokens_are_long_named_and_never_printed() {
        let config =
            parse("token = \"0123456789abcdef-main\"\ntoken_name = \"oncall\"\n[tokens]\nalice = \"0123456789abcdef-alice\"\n")
                .unwrap();
        config.check_startable().unwrap();
        let names: Vec<&str> = config.named_tokens().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["oncall", "alice"]);
        let shown = format!("{config:?} {}", toml::to_string(&config).unwrap());
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        let err = parse("token = \"short\"").unwrap_err().to_string();
        assert!(err.contains("console.token must be at least 16"), "{err}");
        let err = parse("[tokens]\nbob = \"short\"").unwrap_err().to_string();
        assert!(err.contains("console.tokens.bob"), "{err}");
        let err = parse("token = \"0123456789abcdef\"\n[tokens]\nconsole = \"0123456789abcdefg\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("own name"), "{err}");
        assert!(parse("tokn = \"x\"").is_err(), "unknown keys are errors");
    }
}
