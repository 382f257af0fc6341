//! The seam between lanes and vendors.
//!
//! A vendor is one file here: its [`VendorSpec`] (id, account keys, defaults,
//! callback route, metrics of its own), a client implementing [`Vendor`], and
//! its code table. Adding one means adding the file and a line to [`VENDORS`].

pub mod netease;
pub mod openim;
pub mod tencent;
pub mod transport;
pub mod usersig;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use async_trait::async_trait;

use crate::callback::CallbackSpec;
use crate::config::AccountConfig;
use crate::job::Job;
use crate::metrics::Metric;
use crate::outcome::{Answer, Class};

pub use transport::Http;

/// Whether an account key is required and whether it is a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Plain,
    Secret,
    OptionalPlain,
    OptionalSecret,
}

impl KeyKind {
    pub fn is_secret(self) -> bool {
        matches!(self, KeyKind::Secret | KeyKind::OptionalSecret)
    }

    pub fn is_required(self) -> bool {
        matches!(self, KeyKind::Plain | KeyKind::Secret)
    }
}

#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    pub kind: KeyKind,
}

/// What the rest of herald needs to know about a vendor before talking to it.
pub struct VendorSpec {
    pub id: &'static str,
    /// The vendor's name as people know it, for help texts and reports.
    pub name: &'static str,
    /// Account keys beyond the common ones (credentials and the like).
    pub keys: &'static [Key],
    /// The key naming the app at the vendor (NetEase `app_key`, Tencent
    /// `sdk_app_id`). Two accounts with one app at one `base_url` would share
    /// the vendor's limit while each sent at the full rate: a config error.
    pub app_key: Option<&'static str>,
    /// Rate limit applied when the account sets none.
    pub default_rate_limit: Option<u32>,
    /// How long the vendor blocks an account that exceeded its limit.
    pub default_ban: Duration,
    /// Checks a job against the vendor's field limits and known options. An
    /// error here is final: the job is dead-lettered as `invalid`, never sent.
    pub check: fn(&Job) -> Result<(), String>,
    /// Checks an account's keys beyond presence (a numeric SDKAppID, say), for
    /// `config check` and start-up; an error names the key.
    pub validate: fn(&AccountConfig) -> anyhow::Result<()>,
    /// Builds the account's client; the worker does, once its config is valid.
    pub build: fn(&AccountConfig) -> anyhow::Result<Arc<dyn Vendor>>,
    /// The route the vendor posts to herald, when it has one (its own module holds it).
    pub callback: Option<&'static CallbackSpec>,
    /// Counters of the vendor's own, labelled `account`, exported at 0 for
    /// each of its accounts from start-up; `docs/metrics.md` lists them.
    pub account_counters: &'static [&'static Metric],
}

/// Every vendor herald can deliver through.
pub const VENDORS: &[&VendorSpec] = &[&netease::SPEC, &openim::SPEC, &tencent::SPEC];

pub fn spec(id: &str) -> anyhow::Result<&'static VendorSpec> {
    match VENDORS.iter().find(|s| s.id == id) {
        Some(spec) => Ok(spec),
        None => {
            let known: Vec<_> = VENDORS.iter().map(|s| s.id).collect();
            bail!("unknown vendor `{id}`; known vendors: {}", known.join(", "))
        }
    }
}

/// Every vendor's name, in a sentence: "A, B and C".
pub fn names() -> String {
    sentence(&VENDORS.iter().map(|s| s.name).collect::<Vec<_>>())
}

fn sentence(names: &[&str]) -> String {
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Builds the client for one configured account.
pub fn build(account: &AccountConfig) -> anyhow::Result<Arc<dyn Vendor>> {
    (spec(&account.vendor)?.build)(account)
}

/// Which request of one attempt a send is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    First,
    /// After an answer with [`Answer::renewed`]: the credentials are fresh now.
    Renewed,
}

/// A vendor client for one account.
///
/// Every request a client makes to send a job has passed the account's limiter:
/// a client never sends twice in one call. When stale credentials refuse a
/// request, it renews them and answers [`Answer::renewed`]; the lane then waits
/// for the limiter again and calls once more with [`Round::Renewed`].
#[async_trait]
pub trait Vendor: Send + Sync + 'static {
    /// Sends attempt `attempt` (1-based) of the job and classifies the answer.
    async fn send(&self, job: &Job, attempt: u32, round: Round) -> Answer;
}

/// `answer` with the request's secrets masked in its detail: a vendor or a proxy
/// may echo the request back (some error pages quote the URL, query and all).
pub fn without_secrets(mut answer: Answer, secrets: &[&str]) -> Answer {
    answer.detail = crate::redact::scrub(&answer.detail, secrets);
    answer
}

/// Classifies an HTTP status that carries no vendor body (proxies, outages, wrong base_url).
pub fn http_status_answer(status: http::StatusCode, body: &str) -> Answer {
    let class = if status == http::StatusCode::TOO_MANY_REQUESTS {
        Class::RateLimited
    } else {
        Class::Transient
    };
    Answer::new(
        class,
        Some(format!("http-{}", status.as_u16())),
        format!("HTTP {status}: {}", snippet(body)),
    )
}

/// The first 200 characters of a body, for error messages.
pub fn snippet(body: &str) -> String {
    let mut s: String = body.chars().take(200).collect();
    if body.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// Checks that a field holds at most `max` characters, as the vendors count them.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    let n = value.chars().count();
    if n > max {
        Err(format!(
            "{field} is {n} characters, the vendor allows at most {max}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendor_names_read_as_a_list() {
        assert_eq!(sentence(&["A"]), "A");
        assert_eq!(sentence(&["A", "B"]), "A and B");
        assert_eq!(sentence(&["A", "B", "C"]), "A, B and C");
    }

    #[test]
    fn an_echoed_secret_is_masked_in_the_detail() {
        let echoed = http_status_answer(
            http::StatusCode::BAD_GATEWAY,
            "ERROR: cannot retrieve /v4/openim/sendmsg?usersig=S3CRET-usersig&random=1",
        );
        let answer = without_secrets(echoed, &["S3CRET-usersig"]);
        assert!(!answer.detail.contains("S3CRET"), "{}", answer.detail);
        assert!(answer.detail.contains("usersig=****"), "{}", answer.detail);
    }
}
