//! Retry policies: what each account's tiers, attempt limit and ban time resolve to.

use std::time::Duration;

use super::schema::{AccountConfig, Config};
use crate::outcome::Policy;
use crate::vendor;

impl Config {
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
}
