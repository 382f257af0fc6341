//! herald's AMQP headers: what travels with a job between lane, retry tiers and the DLQ.
//!
//! The body is never rewritten; everything herald learns about a job (attempts,
//! first sight, last error, why it died) rides in `x-herald-…` headers.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};

use crate::outcome::Reason;
use crate::topology::TIER_HEADER;

pub mod frame;
mod headers;
pub use headers::{death_reason, header, header_str, header_u64, set_int, set_str};

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
/// The job's story: every retry, death, replay and edit, newest last (JSON, bounded: [`History`]).
pub const HISTORY: &str = "x-herald-history";
/// On an edited job's copy: the fingerprint of the dead copy it was edited from.
pub const EDITED_FROM: &str = "x-herald-edited-from";
/// The producer's headers (and maybe herald's history) a copy left out to
/// fit in one frame, with their sizes: [`frame::fit`].
pub const DROPPED_HEADERS: &str = "x-herald-dropped-headers";

/// Events a history keeps; older ones are counted in [`History::dropped`].
pub const MAX_HISTORY: usize = 20;
/// Longest error an event keeps.
const MAX_EVENT_ERROR: usize = 300;
/// Longest other text an event keeps (a tier, a reason, a code, who).
const MAX_EVENT_TEXT: usize = 128;
/// A history header longer than this was not written by herald: it is not parsed.
const MAX_HISTORY_BYTES: usize = 64 * 1024;

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

/// Properties of a dead job republished to its lane by replay `run`, which
/// `by` started: herald's failure headers are dropped (attempts start again)
/// but its [`History`] is kept with a replay event, `x-herald-replayed` counts
/// the replays and `x-herald-replay-run` names the run.
pub fn copy_for_replay(original: &BasicProperties, run: &str, by: &str) -> BasicProperties {
    // The header can be anything a publisher wrote: count up without overflowing.
    let replayed = header_u64(original, REPLAYED)
        .unwrap_or(0)
        .saturating_add(1);
    let history = history(original).with(Event::new(EventKind::Replay, Utc::now()).by(by));
    copy_filtered(
        original,
        |key| key != "x-death" && key != TIER_HEADER && !key.starts_with("x-herald-"),
        |headers| {
            set_int(headers, REPLAYED, replayed);
            set_str(headers, REPLAY_RUN, run);
            history.write(headers);
        },
    )
}

/// Properties of an edited copy of dead job `original` (fingerprint
/// `fingerprint`), sent to its lane as job `id` with attempts reset: its
/// history goes on with an edit event, and `x-herald-edited-from` links it to the original.
pub fn copy_for_edit(
    original: &BasicProperties,
    id: &str,
    fingerprint: &str,
    by: &str,
) -> BasicProperties {
    let history = history(original).with(Event::new(EventKind::Edit, Utc::now()).by(by));
    copy_filtered(
        original,
        |key| key != "x-death" && key != TIER_HEADER && !key.starts_with("x-herald-"),
        |headers| {
            history.write(headers);
            set_str(headers, EDITED_FROM, fingerprint);
        },
    )
    .with_message_id(ShortString::from(id))
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
    /// Writes the failure headers and appends `event`, filled in with this failure, to the history.
    fn write(&self, headers: &mut FieldTable, mut event: Event) {
        set_int(headers, ATTEMPTS, self.attempts.into());
        set_str(headers, FIRST_SEEN, &timestamp(self.first_seen));
        set_str(headers, LAST_ATTEMPT, &timestamp(self.now));
        set_str(headers, VENDOR_CODE, self.code.unwrap_or(""));
        let error: String = self.error.chars().take(MAX_ERROR_LEN).collect();
        set_str(headers, ERROR, &error);
        event.attempt = Some(self.attempts);
        event.code = self.code.filter(|c| !c.is_empty()).map(str::to_string);
        event.error = Some(self.error.to_string());
        read_history(headers.inner().get(&ShortString::from(HISTORY)))
            .with(event)
            .write(headers);
    }

    /// Headers of the copy published to retry tier `tier_name`.
    pub fn retry_headers(&self, tier_name: &str) -> impl FnOnce(&mut FieldTable) + '_ {
        let tier_name = tier_name.to_string();
        move |headers| {
            let mut event = Event::new(EventKind::Retry, self.now);
            event.tier = Some(tier_name.clone());
            self.write(headers, event);
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
            let mut event = Event::new(EventKind::Dead, self.now);
            event.reason = Some(reason.as_str().to_string());
            self.write(headers, event);
            set_str(headers, REASON, reason.as_str());
            set_str(headers, ROUTING_KEY, &routing_key);
        }
    }
}

/// A job's story, carried in [`HISTORY`]: its newest [`MAX_HISTORY`] events,
/// oldest first, and how many older ones were dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub events: Vec<Event>,
    #[serde(default)]
    pub dropped: u64,
    /// The header was there but not a history herald wrote (too long, or not its JSON).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unreadable: bool,
}

/// What happened to a job once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339.
    pub at: String,
    pub kind: EventKind,
    /// The retry tier it went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Why it died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Who replayed or edited it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A failed attempt sent it to a retry tier.
    Retry,
    /// It was dead-lettered.
    Dead,
    /// It was replayed from the DLQ.
    Replay,
    /// An edited copy was sent in its place.
    Edit,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Dead => "dead",
            Self::Replay => "replay",
            Self::Edit => "edit",
        }
    }
}

impl Event {
    pub fn new(kind: EventKind, at: DateTime<Utc>) -> Self {
        Self {
            at: timestamp(at),
            kind,
            tier: None,
            reason: None,
            code: None,
            error: None,
            attempt: None,
            by: None,
        }
    }

    fn by(mut self, who: &str) -> Self {
        self.by = Some(who.to_string());
        self
    }

    /// Every text within its bound.
    fn bounded(mut self) -> Self {
        let cut = |t: &mut Option<String>, n: usize| {
            if let Some(text) = t.as_mut()
                && text.chars().count() > n
            {
                *text = text.chars().take(n).collect();
            }
        };
        let mut at = Some(std::mem::take(&mut self.at));
        cut(&mut at, MAX_EVENT_TEXT);
        self.at = at.unwrap_or_default();
        cut(&mut self.tier, MAX_EVENT_TEXT);
        cut(&mut self.reason, MAX_EVENT_TEXT);
        cut(&mut self.code, MAX_EVENT_TEXT);
        cut(&mut self.by, MAX_EVENT_TEXT);
        cut(&mut self.error, MAX_EVENT_ERROR);
        self
    }
}

impl History {
    /// This history with `event` appended, the oldest events dropped past [`MAX_HISTORY`].
    pub fn with(mut self, event: Event) -> Self {
        self.events.push(event.bounded());
        self.bounded()
    }

    /// At most [`MAX_HISTORY`] events, each within its bounds.
    fn bounded(mut self) -> Self {
        if self.events.len() > MAX_HISTORY {
            let excess = self.events.len() - MAX_HISTORY;
            self.events.drain(..excess);
            self.dropped = self.dropped.saturating_add(excess as u64);
        }
        self.events = self.events.into_iter().map(Event::bounded).collect();
        self
    }

    fn write(&self, headers: &mut FieldTable) {
        let json = serde_json::to_string(&Self {
            unreadable: false,
            ..self.clone()
        })
        .expect("a history serializes");
        set_str(headers, HISTORY, &json);
    }
}

/// The history a message carries; empty when it has none. Any header a
/// publisher wrote gives a bounded history without panicking.
pub fn history(properties: &BasicProperties) -> History {
    read_history(header(properties, HISTORY))
}

fn read_history(value: Option<&AMQPValue>) -> History {
    let text = match value {
        None => return History::default(),
        Some(AMQPValue::LongString(s)) if s.as_bytes().len() <= MAX_HISTORY_BYTES => s.as_bytes(),
        Some(_) => {
            return History {
                unreadable: true,
                ..History::default()
            };
        }
    };
    match serde_json::from_slice::<History>(text) {
        Ok(history) => History {
            unreadable: false,
            ..history.bounded()
        },
        Err(_) => History {
            unreadable: true,
            ..History::default()
        },
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
        let copy = copy_for_replay(&original, "run-2", "alice");
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
        let copy = copy_for_replay(&original, "run-1", "alice");
        assert_eq!(header_u64(&copy, REPLAYED), Some(i64::MAX as u64));
        let original = with_header(REPLAYED, AMQPValue::Timestamp(u64::MAX));
        assert_eq!(
            header_u64(&copy_for_replay(&original, "run-1", "alice"), REPLAYED),
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

    fn failure(attempts: u32, code: Option<&'static str>, error: &'static str) -> Failure<'static> {
        let now = Utc::now();
        Failure {
            attempts,
            first_seen: now,
            code,
            error,
            now,
        }
    }

    #[test]
    fn every_retry_and_death_appends_to_a_history_that_replays_and_edits_keep() {
        let fresh = BasicProperties::default().with_message_id("job-1".into());
        let retried = copy_with(&fresh, failure(1, Some("500"), "busy").retry_headers("1s"));
        let dead = copy_with(
            &retried,
            failure(2, Some("414"), "to is empty")
                .dead_headers(Reason::Permanent, "netease.default"),
        );
        let replayed = copy_for_replay(&dead, "run-1", "alice");
        let edited = copy_for_edit(&replayed, "job-1b", &"f".repeat(64), "bob");
        let events = history(&edited).events;
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::Retry,
                EventKind::Dead,
                EventKind::Replay,
                EventKind::Edit
            ]
        );
        assert_eq!(events[0].tier.as_deref(), Some("1s"));
        assert_eq!(
            (events[0].attempt, events[0].code.as_deref()),
            (Some(1), Some("500"))
        );
        assert_eq!(events[1].reason.as_deref(), Some("permanent"));
        assert_eq!(events[1].error.as_deref(), Some("to is empty"));
        assert_eq!(events[2].by.as_deref(), Some("alice"));
        assert_eq!(events[3].by.as_deref(), Some("bob"));
        assert_eq!(
            header_str(&replayed, ERROR),
            None,
            "the failure headers are reset"
        );
        assert_eq!(header_str(&edited, EDITED_FROM), Some("f".repeat(64)));
        assert_eq!(
            edited.message_id().as_ref().map(|m| m.as_str()),
            Some("job-1b")
        );
    }

    #[test]
    fn a_history_keeps_the_newest_events_and_counts_the_dropped_ones() {
        let long_error: &'static str = Box::leak("e".repeat(5000).into_boxed_str());
        let mut props = BasicProperties::default();
        for attempt in 1..=(MAX_HISTORY as u32 + 5) {
            props = copy_with(
                &props,
                failure(attempt, None, long_error).retry_headers("1s"),
            );
        }
        let history = history(&props);
        assert_eq!(history.events.len(), MAX_HISTORY);
        assert_eq!(history.dropped, 5);
        assert_eq!(history.events[0].attempt, Some(6));
        assert!(
            history
                .events
                .iter()
                .all(|e| e.error.as_ref().unwrap().len() == MAX_EVENT_ERROR)
        );
        assert!(header_str(&props, HISTORY).unwrap().len() < MAX_HISTORY_BYTES / 4);
    }

    #[test]
    fn a_hostile_history_header_reads_as_unreadable_or_bounded_never_panics() {
        for value in [
            AMQPValue::LongString("not json".into()),
            AMQPValue::LongString("x".repeat(MAX_HISTORY_BYTES + 1).into()),
            AMQPValue::LongLongInt(7),
            AMQPValue::LongString(r#"{"events":[{"at":"t","kind":"nuke"}]}"#.into()),
        ] {
            let read = history(&with_header(HISTORY, value));
            assert!(read.unreadable && read.events.is_empty(), "{read:?}");
        }
        let many: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    r#"{{"at":"{}","kind":"dead","by":"{}"}}"#,
                    "t".repeat(500),
                    i
                )
            })
            .collect();
        let forged = format!(
            r#"{{"events":[{}],"dropped":18446744073709551615}}"#,
            many.join(",")
        );
        let read = history(&with_header(HISTORY, AMQPValue::LongString(forged.into())));
        assert_eq!(read.events.len(), MAX_HISTORY);
        assert_eq!(read.dropped, u64::MAX, "saturates");
        assert!(read.events.iter().all(|e| e.at.len() == MAX_EVENT_TEXT));
        // Appending to an unreadable history starts a readable one.
        let fixed = copy_with(
            &with_header(HISTORY, AMQPValue::LongString("junk".into())),
            failure(1, None, "x").retry_headers("1s"),
        );
        assert_eq!(history(&fixed).events.len(), 1);
    }
}
