//! `[dlq]`: how long the dead-letter queue and the audit stream keep what they hold.
//!
//! Unset, the DLQ keeps every dead job. `max_jobs` drops the oldest dead job
//! when a new one arrives at the cap (never refuses the new one: a refused
//! dead-letter copy would make the lane redeliver and resend the job to the
//! vendor); `max_age` drops dead jobs older than it. See docs/operations.md.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest `max_age` taken: ten years, which RabbitMQ 3.10 and 4.0 both accept
/// as a quorum queue's `x-message-ttl` (a hundred they refuse as too large).
const MAX_TTL_MS: u128 = 3650 * 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawDlqConfig")]
pub struct DlqConfig {
    /// Dead jobs older than this (since they reached the DLQ) are dropped; unset keeps them.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// At most this many dead jobs; a new one past it drops the oldest. Unset: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_jobs: Option<u64>,
    /// How long the audit stream `<prefix>.audit` keeps its records.
    #[serde(with = "humantime_serde")]
    pub audit_max_age: Duration,
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            max_age: None,
            max_jobs: None,
            audit_max_age: default_audit_max_age(),
        }
    }
}

fn default_audit_max_age() -> Duration {
    Duration::from_secs(400 * 24 * 3600)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDlqConfig {
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
    #[serde(default)]
    max_jobs: Option<u64>,
    #[serde(default = "default_audit_max_age", with = "humantime_serde")]
    audit_max_age: Duration,
}

impl TryFrom<RawDlqConfig> for DlqConfig {
    type Error = String;

    fn try_from(raw: RawDlqConfig) -> Result<Self, String> {
        if let Some(age) = raw.max_age
            && (age < Duration::from_secs(1) || age.as_millis() > MAX_TTL_MS)
        {
            return Err(
                "max_age must be from 1s to 3650d; leave it unset to keep dead jobs".into(),
            );
        }
        if raw.max_jobs == Some(0) || raw.max_jobs.is_some_and(|n| n > i64::MAX as u64) {
            return Err("max_jobs must be at least 1; leave it unset for no cap".into());
        }
        if raw.audit_max_age < Duration::from_secs(3600) {
            return Err("audit_max_age must be at least 1h".into());
        }
        Ok(Self {
            max_age: raw.max_age,
            max_jobs: raw.max_jobs,
            audit_max_age: raw.audit_max_age,
        })
    }
}

impl DlqConfig {
    /// The DLQ's retention as queue arguments: `x-message-ttl` (ms) and
    /// `x-max-length` with `x-overflow = drop-head`.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age_ms: self.max_age.map(|d| d.as_millis() as u64),
            max_jobs: self.max_jobs,
        }
    }
}

/// What the DLQ's declaration says about retention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age_ms: Option<u64>,
    pub max_jobs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DlqConfig, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn unset_keeps_everything_and_the_audit_a_year_and_more() {
        let config = parse("").unwrap();
        assert_eq!(config, DlqConfig::default());
        assert_eq!(config.retention(), Retention::default());
        assert!(config.audit_max_age >= Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn retention_becomes_a_ttl_in_milliseconds_and_a_cap() {
        let config = parse("max_age = \"14d\"\nmax_jobs = 100000").unwrap();
        assert_eq!(
            config.retention(),
            Retention {
                max_age_ms: Some(14 * 24 * 3600 * 1000),
                max_jobs: Some(100_000)
            }
        );
    }

    #[test]
    fn out_of_range_retention_is_refused_with_what_is_allowed() {
        assert!(parse("max_age = \"3651d\"").unwrap_err().contains("3650d"));
        assert!(parse("max_age = \"400d\"").is_ok());
        assert!(parse("max_age = \"10ms\"").unwrap_err().contains("1s"));
        assert!(parse("max_jobs = 0").unwrap_err().contains("at least 1"));
        assert!(parse("audit_max_age = \"5m\"").unwrap_err().contains("1h"));
        assert!(parse("max_size = 3").unwrap_err().contains("unknown field"));
    }
}
