//! The `HERALD_…` environment overlay, applied to the parsed file before it is read.

use anyhow::bail;

use super::schema::AccountConfig;
use super::secret::list_items;

impl AccountConfig {
    /// `HERALD_ACCOUNT_<VENDOR>_<NAME>_`: where this account's keys come from in the environment.
    pub(super) fn env_prefix(&self) -> String {
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

/// Applies `HERALD_BROKER_URL` (a comma-separated list of nodes), `HERALD_BROKER_PREFIX`, the `HERALD_HTTP_…` and `HERALD_CONSOLE_…` keys
/// below and `HERALD_ACCOUNT_<VENDOR>_<NAME>_<KEY>` to the parsed file.
pub(super) fn apply_env(
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
        ("HERALD_CONSOLE_LISTEN", "console", "listen"),
        ("HERALD_CONSOLE_TOKEN", "console", "token"),
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
