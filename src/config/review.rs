//! The configuration `herald dlq …` and `herald console` load: `[broker]` and
//! `[dlq]`, nothing secret beyond the broker's own password.
//!
//! Reviewing dead jobs builds no vendor client, so `[[account]]` tables may
//! leave out every credential (or be absent altogether). Unknown keys are still
//! errors, as they are for the worker; the worker's own sections (`[http]`,
//! `[retry]` …) are checked as the worker checks them, so one file serves both.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};

use super::{AccountConfig, BrokerConfig, Config, ConsoleConfig, DlqConfig};
use crate::enqueue::Rules;

/// What reviewing the DLQ needs; a worker cannot be started from it.
#[derive(Debug, Clone)]
pub struct ReviewConfig {
    pub broker: BrokerConfig,
    pub dlq: DlqConfig,
    /// `[console]`: its listener and tokens (`herald console` only).
    pub console: ConsoleConfig,
    /// `(vendor, name)` of every configured account.
    pub accounts: Vec<(String, String)>,
    /// What an edited job is checked against before it is replayed.
    pub rules: Rules,
}

impl ReviewConfig {
    /// Reads the file at `path` and applies the `HERALD_…` environment, as [`Config::load`] does.
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

    /// Parses TOML text: every section but `[[account]]` as the worker does;
    /// accounts by vendor, name and key names only. Account credentials from
    /// the environment are not read.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let Ok(mut table) = toml::from_str::<toml::Table>(text) else {
            // The worker's parser words a syntax error without quoting the line (it may hold a secret).
            return Err(Config::parse(text, Vec::new())
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the config file is not valid TOML")));
        };
        let accounts = match table.remove("account") {
            None => Vec::new(),
            Some(toml::Value::Array(tables)) => review_accounts(&tables)?,
            Some(_) => bail!("`account` must be an array of tables: write each as [[account]]"),
        };
        let rest = toml::to_string(&table).context("the config does not serialize")?;
        let env = env
            .into_iter()
            .filter(|(k, _)| !k.starts_with("HERALD_ACCOUNT_"));
        let config = Config::parse(&rest, env)?;
        let rules = Rules {
            max_job_bytes: config.worker.max_job_bytes,
            accounts: Some(accounts.clone()),
        };
        Ok(Self {
            broker: config.broker,
            dlq: config.dlq,
            console: config.console,
            accounts,
            rules,
        })
    }
}

impl From<&Config> for ReviewConfig {
    fn from(config: &Config) -> Self {
        let rules = Rules::from_config(config);
        Self {
            broker: config.broker.clone(),
            dlq: config.dlq.clone(),
            console: config.console.clone(),
            accounts: rules.accounts.clone().unwrap_or_default(),
            rules,
        }
    }
}

/// Each account's `(vendor, name)`, its keys checked against the common ones and its vendor's.
fn review_accounts(tables: &[toml::Value]) -> anyhow::Result<Vec<(String, String)>> {
    let common = AccountConfig::common_keys();
    let mut accounts = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, table) in tables.iter().enumerate() {
        let n = i + 1;
        let Some(table) = table.as_table() else {
            bail!("[[account]] #{n} must be a table");
        };
        let text = |key: &str| table.get(key).and_then(toml::Value::as_str);
        let (Some(vendor), Some(name)) = (text("vendor"), text("name")) else {
            bail!("[[account]] #{n} needs `vendor` and `name` (strings)");
        };
        let spec = crate::vendor::spec(vendor).with_context(|| format!("in [[account]] #{n}"))?;
        for key in table.keys() {
            let known = common.contains(key) || spec.keys.iter().any(|k| k.name == key);
            if !known {
                let vendor_keys: Vec<_> = spec.keys.iter().map(|k| k.name).collect();
                bail!(
                    "in [[account]] #{n} ({vendor}.{name}): unknown key `{key}`; known keys: {}, {}",
                    common.join(", "),
                    vendor_keys.join(", ")
                );
            }
        }
        if !seen.insert((vendor, name)) {
            bail!("duplicate account: vendor `{vendor}` name `{name}` is configured twice");
        }
        accounts.push((vendor.to_string(), name.to_string()));
    }
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: &str = "[broker]\nurl = \"amqp://u:broker-pw@rabbit:5672/%2f\"\n";

    #[test]
    fn accounts_without_any_secret_are_enough_to_review() {
        let text = format!(
            "{BROKER}[dlq]\nmax_jobs = 10\n[[account]]\nvendor = \"netease\"\nname = \"default\"\n\
             [[account]]\nvendor = \"tencent\"\nname = \"cn\"\nsdk_app_id = 1400000000\n"
        );
        let review = ReviewConfig::parse(&text, Vec::new()).unwrap();
        assert_eq!(
            review.accounts,
            [
                ("netease".into(), "default".into()),
                ("tencent".into(), "cn".into())
            ]
        );
        assert_eq!(review.dlq.max_jobs, Some(10));
        assert_eq!(review.rules.accounts.as_ref().unwrap().len(), 2);
        // The worker refuses the same file: its accounts lack their secrets.
        assert!(Config::parse(&text, Vec::new()).is_err());
        assert!(
            ReviewConfig::parse(BROKER, Vec::new())
                .unwrap()
                .accounts
                .is_empty()
        );
    }

    /// The `pub` fields of `AccountConfig` as its source declares them.
    fn account_fields() -> Vec<String> {
        let source = include_str!("schema.rs");
        let start = source
            .find("pub struct AccountConfig {")
            .expect("AccountConfig is declared in schema.rs");
        let body = &source[start..];
        let body = &body[..body.find("\n}").expect("its declaration ends")];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':'))
            .map(|(name, _)| name.to_string())
            .collect()
    }

    #[test]
    fn every_common_account_key_is_one_review_accepts() {
        let mut fields = account_fields();
        assert!(fields.len() > 10, "{fields:?}");
        // The vendor's own keys, flattened into the account, are checked by the vendor's list.
        fields.retain(|f| f != "credentials");
        let mut keys = AccountConfig::common_keys();
        fields.sort();
        keys.sort();
        assert_eq!(
            keys, fields,
            "AccountConfig::with_every_key leaves a key unset"
        );
        let all: String = keys
            .iter()
            .filter(|k| !matches!(k.as_str(), "vendor" | "name" | "retry"))
            .map(|k| format!("{k} = 1\n"))
            .collect();
        let text = format!(
            "{BROKER}[[account]]\nvendor = \"netease\"\nname = \"d\"\n{all}[account.retry]\n"
        );
        let review = ReviewConfig::parse(&text, Vec::new()).unwrap();
        assert_eq!(review.accounts, [("netease".into(), "d".into())]);
    }

    #[test]
    fn unknown_keys_are_still_errors_and_account_secrets_from_the_environment_are_ignored() {
        let typo = format!(
            "{BROKER}[[account]]\nvendor = \"netease\"\nname = \"d\"\napp_sekret = \"x\"\n"
        );
        let err = format!("{:#}", ReviewConfig::parse(&typo, Vec::new()).unwrap_err());
        assert!(
            err.contains("unknown key `app_sekret`") && err.contains("app_secret"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            ReviewConfig::parse(&format!("{BROKER}[dlq]\nmax_age = 5\n[wat]\n"), Vec::new())
                .unwrap_err()
        );
        assert!(err.contains("wat") || err.contains("max_age"), "{err}");
        let env = vec![(
            "HERALD_ACCOUNT_NETEASE_GONE_APP_SECRET".to_string(),
            "s".to_string(),
        )];
        assert!(ReviewConfig::parse(BROKER, env).is_ok());
    }

    #[test]
    fn the_broker_password_comes_from_the_environment_and_never_shows_in_an_error() {
        let env = vec![(
            "HERALD_BROKER_URL".to_string(),
            "amqp://u:env-pw@rabbit:5672/%2f".to_string(),
        )];
        let review = ReviewConfig::parse(BROKER, env).unwrap();
        assert_eq!(
            review.broker.url.nodes()[0].expose(),
            "amqp://u:env-pw@rabbit:5672/%2f"
        );
        let broken = "[broker]\nurl = \"amqp://u:line-pw@rabbit:5672/%2f\nprefix = 1\n";
        let err = format!("{:#}", ReviewConfig::parse(broken, Vec::new()).unwrap_err());
        assert!(!err.contains("line-pw") && err.contains("line"), "{err}");
    }
}
