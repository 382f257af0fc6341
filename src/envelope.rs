//! herald's AMQP headers: what travels with a job between lane, retry tiers and the DLQ.
//!
//! The body is never rewritten; everything herald learns about a job (attempts,
//! first sight, last error, why it died) rides in `x-herald-…` headers.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};

use crate::broker::{header_str, header_u64, set_int, set_str};
use crate::outcome::Reason;
use crate::topology::TIER_HEADER;

pub const ATTEMPTS: &str = "x-herald-attempts";
pub const FIRST_SEEN: &str = "x-herald-first-seen";
pub const LAST_ATTEMPT: &str = "x-herald-last-attempt";
pub const REASON: &str = "x-herald-reason";
pub const VENDOR_CODE: &str = "x-herald-vendor-code";
pub const ERROR: &str = "x-herald-error";
pub const ROUTING_KEY: &str = "x-herald-routing-key";
pub const REPLAYED: &str = "x-herald-replayed";
/// The `herald dlq replay` run that republished a job; it follows the job back
/// to the DLQ, so that run can tell its own copies from the jobs it set out to replay.
pub const REPLAY_RUN: &str = "x-herald-replay-run";

/// Longest `x-herald-error` kept; vendor bodies can be large.
const MAX_ERROR_LEN: usize = 1000;

/// What herald knows about a delivery before processing it.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Attempts already made (0 for a fresh job).
    pub attempts: u32,
    pub first_seen: DateTime<Utc>,
    pub message_id: Option<String>,
}

impl Envelope {
    pub fn read(properties: &BasicProperties, now: DateTime<Utc>) -> Self {
        Self {
            attempts: header_u64(properties, ATTEMPTS).map_or(0, |n| n.min(u32::MAX.into()) as u32),
            first_seen: header_str(properties, FIRST_SEEN)
                .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                .map_or(now, |t| t.with_timezone(&Utc)),
            message_id: properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string()),
        }
    }

    /// The number of the attempt about to be made; a forged `x-herald-attempts`
    /// of u32::MAX or more stays there instead of overflowing.
    pub fn next_attempt(&self) -> u32 {
        self.attempts.saturating_add(1)
    }
}

/// The job's id: its AMQP `message_id`, or else the `id` in its body. Some
/// clients (Spring AMQP by default) publish without a `message_id`; such a
/// job is still logged, dead-lettered and found by `dlq show` under its id.
pub fn job_id(properties: &BasicProperties, body: &[u8]) -> Option<String> {
    if let Some(id) = properties
        .message_id()
        .as_ref()
        .filter(|m| !m.as_str().is_empty())
    {
        return Some(id.as_str().to_string());
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    let id = serde_json::from_slice::<IdOnly>(body).ok()?.id;
    // It becomes a message_id (a short string) and a log field: keep what the contract allows.
    let usable =
        !id.is_empty() && id.len() <= crate::job::MAX_ID_BYTES && !id.chars().any(char::is_control);
    usable.then_some(id)
}

/// Properties with `message_id` set to `id` when they have none (or an empty one).
pub fn with_job_id(properties: &BasicProperties, id: Option<&str>) -> BasicProperties {
    let has_id = properties
        .message_id()
        .as_ref()
        .is_some_and(|m| !m.as_str().is_empty());
    match id {
        Some(id) if !has_id => properties.clone().with_message_id(ShortString::from(id)),
        _ => properties.clone(),
    }
}

/// RFC 3339 in UTC with milliseconds, as every herald timestamp header is written.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Properties of a copy of `original` with herald's headers replaced by `set`.
pub fn copy_with(original: &BasicProperties, set: impl FnOnce(&mut FieldTable)) -> BasicProperties {
    // x-death grows with every tier pass; the tier header must not follow a job to the DLQ.
    copy_filtered(original, |key| key != "x-death" && key != TIER_HEADER, set)
}

/// Properties of a dead job republished to its lane by replay `run`: herald's
/// failure history is dropped (attempts start again), `x-herald-replayed`
/// counts the replays and `x-herald-replay-run` names the run.
pub fn copy_for_replay(original: &BasicProperties, run: &str) -> BasicProperties {
    // The header can be anything a publisher wrote: count up without overflowing.
    let replayed = header_u64(original, REPLAYED)
        .unwrap_or(0)
        .saturating_add(1);
    copy_filtered(
        original,
        |key| key != "x-death" && key != TIER_HEADER && !key.starts_with("x-herald-"),
        |headers| {
            set_int(headers, REPLAYED, replayed);
            set_str(headers, REPLAY_RUN, run);
        },
    )
}

/// Properties of a dead job moved to another queue as it is (`herald dlq
/// migrate`): everything but the delivery count the broker keeps.
pub fn copy_for_move(original: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(existing) = original.headers() {
        for (key, value) in existing.inner() {
            if key.as_str() != "x-delivery-count" {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    original.clone().with_headers(headers)
}

fn copy_filtered(
    original: &BasicProperties,
    keep: impl Fn(&str) -> bool,
    set: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(existing) = original.headers() {
        for (key, value) in existing.inner() {
            if keep(key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    set(&mut headers);
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_content_type(ShortString::from("application/json"));
    if let Some(id) = original.message_id() {
        props = props.with_message_id(id.clone());
    }
    if let Some(ts) = original.timestamp() {
        props = props.with_timestamp(*ts);
    }
    if let Some(app) = original.app_id() {
        props = props.with_app_id(app.clone());
    }
    if let Some(correlation) = original.correlation_id() {
        props = props.with_correlation_id(correlation.clone());
    }
    props
}

/// The failure that sent a job to a tier or the DLQ.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub attempts: u32,
    pub first_seen: DateTime<Utc>,
    pub code: Option<&'a str>,
    pub error: &'a str,
    pub now: DateTime<Utc>,
}

impl Failure<'_> {
    fn write(&self, headers: &mut FieldTable) {
        set_int(headers, ATTEMPTS, self.attempts.into());
        set_str(headers, FIRST_SEEN, &timestamp(self.first_seen));
        set_str(headers, LAST_ATTEMPT, &timestamp(self.now));
        set_str(headers, VENDOR_CODE, self.code.unwrap_or(""));
        let error: String = self.error.chars().take(MAX_ERROR_LEN).collect();
        set_str(headers, ERROR, &error);
    }

    /// Headers of the copy published to retry tier `tier_name`.
    pub fn retry_headers(&self, tier_name: &str) -> impl FnOnce(&mut FieldTable) + '_ {
        let tier_name = tier_name.to_string();
        move |headers| {
            self.write(headers);
            set_str(headers, TIER_HEADER, &tier_name);
        }
    }

    /// Headers of the copy published to the DLQ.
    pub fn dead_headers(
        &self,
        reason: Reason,
        routing_key: &str,
    ) -> impl FnOnce(&mut FieldTable) + '_ {
        let routing_key = routing_key.to_string();
        move |headers| {
            self.write(headers);
            set_str(headers, REASON, reason.as_str());
            set_str(headers, ROUTING_KEY, &routing_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;

    #[test]
    fn a_job_without_message_id_is_known_by_its_body_id() {
        let body = br#"{"id":"order-1","vendor":"netease"}"#;
        let bare = BasicProperties::default();
        assert_eq!(job_id(&bare, body).as_deref(), Some("order-1"));
        let tagged = bare.clone().with_message_id("amqp-id".into());
        assert_eq!(job_id(&tagged, body).as_deref(), Some("amqp-id"));
        assert_eq!(job_id(&bare, b"not json"), None);
        assert_eq!(job_id(&bare, br#"{"id":"a\nb"}"#), None, "no log injection");
        assert_eq!(
            job_id(
                &bare,
                format!(r#"{{"id":"{}"}}"#, "x".repeat(256)).as_bytes()
            ),
            None
        );
        let copy = with_job_id(&bare, Some("order-1"));
        assert_eq!(
            copy.message_id().as_ref().map(|m| m.as_str()),
            Some("order-1")
        );
        let empty = bare.clone().with_message_id("".into());
        let filled = with_job_id(&empty, job_id(&empty, body).as_deref());
        assert_eq!(
            filled.message_id().as_ref().map(|m| m.as_str()),
            Some("order-1")
        );
        let kept = with_job_id(&tagged, Some("order-1"));
        assert_eq!(
            kept.message_id().as_ref().map(|m| m.as_str()),
            Some("amqp-id")
        );
    }

    #[test]
    fn replay_copy_resets_history_and_counts_replays() {
        let mut headers = FieldTable::default();
        set_int(&mut headers, ATTEMPTS, 4);
        set_str(&mut headers, REASON, "exhausted");
        set_str(&mut headers, "x-custom", "kept");
        set_int(&mut headers, REPLAYED, 1);
        set_str(&mut headers, REPLAY_RUN, "run-1");
        let original = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("job-1".into());
        let copy = copy_for_replay(&original, "run-2");
        assert_eq!(header_u64(&copy, ATTEMPTS), None);
        assert_eq!(header_str(&copy, REPLAY_RUN).as_deref(), Some("run-2"));
        assert_eq!(header_str(&copy, REASON), None);
        assert_eq!(header_str(&copy, "x-custom").as_deref(), Some("kept"));
        assert_eq!(header_u64(&copy, REPLAYED), Some(2));
        assert_eq!(
            copy.message_id().as_ref().map(|m| m.as_str()),
            Some("job-1")
        );
    }

    fn with_header(key: &str, value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(key.into(), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_replay_count_of_u64_max_saturates_instead_of_overflowing() {
        let original = with_header(REPLAYED, AMQPValue::LongString(u64::MAX.to_string().into()));
        let copy = copy_for_replay(&original, "run-1");
        assert_eq!(header_u64(&copy, REPLAYED), Some(i64::MAX as u64));
        let original = with_header(REPLAYED, AMQPValue::Timestamp(u64::MAX));
        assert_eq!(
            header_u64(&copy_for_replay(&original, "run-1"), REPLAYED),
            Some(i64::MAX as u64)
        );
    }

    #[test]
    fn an_attempt_count_of_u64_max_reads_as_u32_max_and_the_next_attempt_saturates() {
        let now = Utc::now();
        for value in [
            AMQPValue::LongString(u64::MAX.to_string().into()),
            AMQPValue::LongLongInt(i64::MAX),
            AMQPValue::LongUInt(u32::MAX),
        ] {
            let envelope = Envelope::read(&with_header(ATTEMPTS, value), now);
            assert_eq!(envelope.attempts, u32::MAX);
            assert_eq!(envelope.next_attempt(), u32::MAX);
        }
        let fresh = Envelope::read(&BasicProperties::default(), now);
        assert_eq!(fresh.next_attempt(), 1);
    }
}
