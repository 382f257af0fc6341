//! Dead-letter review: reading `{p}.dlq` without removing or reordering anything,
//! and the replay and purge sweeps that act on exactly the jobs they select.
//!
//! A scan consumes every message without acking it and aggregates as it goes
//! (no message is kept in memory); closing the channel hands them all back.
//! Jobs dead-lettered by the broker rather than by herald carry no
//! `x-herald-reason`: `x-death` says `delivery_limit` for `poison`, and a message
//! with neither came through the alternate exchange (`unroutable`).
//!
//! Which message a sweep replays, removes or leaves is decided by [`Decider`],
//! a pure state machine; [`Reader`] and [`sweep`] only do the broker I/O. Every
//! pass reports its [`Coverage`]: how much of the DLQ it saw against what the
//! queue held when it started.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use governor::{Quota, RateLimiter};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::audit::{self, Actor, JobRef, Outcome, Trail};
use crate::broker::{Publisher, queue_depth, queue_status};
use crate::config::Retention;
use crate::envelope::{
    ATTEMPTS, ERROR, HISTORY, History, LAST_ATTEMPT, REASON, REPLAY_RUN, ROUTING_KEY, VENDOR_CODE,
    copy_for_replay, death_reason, header_str, header_u64, history, job_id,
};
use crate::outcome::Reason;
use crate::topology::{
    Names, dlq_args, known_not_legacy, legacy_dlq_error, note_not_legacy, quorum, try_declare,
};

mod archive;
mod edit;
mod lock;
mod shape;
pub use archive::{Archived, ArchivedProperties, Restored, export, import};
pub use edit::{Edited, edit_and_replay};
pub use lock::{READER_WAIT, ReaderLock};
pub use shape::error_shape;

/// How long a scan waits for the next message before deciding the queue is read.
const IDLE: Duration = Duration::from_secs(3);

/// One dead job as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadJob {
    pub id: Option<String>,
    pub vendor: String,
    pub account: String,
    pub reason: Reason,
    pub code: Option<String>,
    pub error: String,
    /// The error with ids, numbers, times, hex and quoted values normalised ([`error_shape`]).
    pub shape: String,
    /// `to.user` or `to.group` of the body, when it parses.
    pub recipient: Option<String>,
    /// The body's `key`, when it parses.
    pub key: Option<String>,
    pub attempts: u64,
    pub died_at: Option<DateTime<Utc>>,
    pub routing_key: String,
    /// Names this dead copy exactly (see [`fingerprint`]): what a purge plan lists.
    pub fingerprint: String,
    /// What one replay run sends at most once: the job id, or the body's hash for a job without one.
    #[serde(skip)]
    pub job_key: String,
    /// The replay run that republished this copy, if one did.
    #[serde(skip)]
    pub replay_run: Option<String>,
}

impl DeadJob {
    pub fn from_delivery(delivery: &Delivery) -> Self {
        let p = &delivery.properties;
        let routing_key =
            header_str(p, ROUTING_KEY).unwrap_or_else(|| delivery.routing_key.as_str().to_string());
        let (vendor, account) = routing_key
            .split_once('.')
            .map(|(v, a)| (v.to_string(), a.to_string()))
            .unwrap_or_else(|| (routing_key.clone(), String::new()));
        let death = death_reason(p);
        let reason = header_str(p, REASON)
            .and_then(|r| Reason::parse(&r))
            .unwrap_or(match death.as_deref() {
                Some("delivery_limit") => Reason::Poison,
                Some(_) => Reason::Exhausted,
                None => Reason::Unroutable,
            });
        let error = header_str(p, ERROR).unwrap_or_else(|| match reason {
            Reason::Poison => {
                "redelivered past the lane's delivery limit: it crashed or hung workers".into()
            }
            Reason::Unroutable => format!("routing key `{routing_key}` matches no lane"),
            _ => death
                .map(|d| format!("dead-lettered by the broker: {d}"))
                .unwrap_or_default(),
        });
        let died_at = header_str(p, LAST_ATTEMPT)
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                p.timestamp()
                    .and_then(|t| Utc.timestamp_opt(t as i64, 0).single())
            });
        let id = job_id(p, &delivery.data);
        let peek = BodyPeek::of(&delivery.data);
        Self {
            job_key: job_key(id.as_deref(), &delivery.data),
            fingerprint: fingerprint(p, delivery.routing_key.as_str(), &delivery.data),
            replay_run: header_str(p, REPLAY_RUN),
            id,
            vendor,
            account,
            reason,
            code: header_str(p, VENDOR_CODE).filter(|c| !c.is_empty()),
            shape: error_shape(&error),
            error,
            recipient: peek.recipient,
            key: peek.key,
            attempts: header_u64(p, ATTEMPTS).unwrap_or(0),
            died_at,
            routing_key,
        }
    }
}

/// What a dead job's body says of its recipient and key, when it is a job at all.
#[derive(Debug, Default)]
struct BodyPeek {
    recipient: Option<String>,
    key: Option<String>,
}

impl BodyPeek {
    fn of(body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct To {
            user: Option<serde_json::Value>,
            group: Option<serde_json::Value>,
        }
        #[derive(serde::Deserialize)]
        struct Peek {
            to: Option<To>,
            key: Option<serde_json::Value>,
        }
        let Ok(peek) = serde_json::from_slice::<Peek>(body) else {
            return Self::default();
        };
        // Only strings are names; a bounded copy, as a hostile body may be anything.
        let text = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => Some(s.chars().take(MAX_FIELD_CHARS).collect()),
            _ => None,
        };
        let recipient = peek.to.and_then(|to| text(to.user).or(text(to.group)));
        Self {
            recipient,
            key: text(peek.key),
        }
    }
}

/// Longest recipient or key kept from a body.
const MAX_FIELD_CHARS: usize = 256;

/// Hex SHA-256 over the message id, timestamp, routing key, every `x-herald-…`
/// header and the body, each length-prefixed. Herald writes new headers each
/// time a job dies, so a job that died again after it was listed gets a new
/// fingerprint; the broker's `x-delivery-count`, which every read bumps, is left out.
pub fn fingerprint(properties: &BasicProperties, routing_key: &str, body: &[u8]) -> String {
    let herald: BTreeMap<String, String> = properties
        .headers()
        .as_ref()
        .map(|headers| {
            headers
                .inner()
                .keys()
                .filter(|k| k.as_str().starts_with("x-herald-"))
                .map(|k| {
                    let value = header_str(properties, k.as_str()).unwrap_or_default();
                    (k.as_str().to_string(), value)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut sha = Sha256::new();
    let mut field = |bytes: &[u8]| {
        sha.update((bytes.len() as u64).to_be_bytes());
        sha.update(bytes);
    };
    field(
        properties
            .message_id()
            .as_ref()
            .map_or("", |m| m.as_str())
            .as_bytes(),
    );
    field(&properties.timestamp().unwrap_or(0).to_be_bytes());
    field(routing_key.as_bytes());
    for (key, value) in &herald {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    field(body);
    hex::encode(sha.finalize())
}

/// The job a dead copy carries: its id, or for a job without one its body,
/// which herald never rewrites, so every copy of one job shares the key.
fn job_key(id: Option<&str>, body: &[u8]) -> String {
    match id {
        Some(id) => format!("id:{id}"),
        None => format!("body:{}", hex::encode(Sha256::digest(body))),
    }
}

/// Messages ready in the DLQ now (not counting those another reader holds).
pub async fn depth(conn: &Connection, names: &Names) -> anyhow::Result<u32> {
    Ok(status(conn, names).await?.0)
}

/// Messages ready in the DLQ and consumers reading it.
async fn status(conn: &Connection, names: &Names) -> anyhow::Result<(u32, u32)> {
    let channel = conn.create_channel().await?;
    let queue = names.dlq();
    let status = queue_status(&channel, &queue).await.map_err(|e| {
        anyhow::anyhow!("cannot open the DLQ `{queue}` (run `herald topology apply` first?): {e}")
    })?;
    let _ = channel.close(200, "depth read".into()).await;
    Ok(status)
}

/// Fails, having read nothing, when the DLQ has the legacy declaration
/// (without a delivery limit: on RabbitMQ 4.x a read could drop its jobs).
/// Any retention it was declared with is no matter for reading it: a DLQ
/// that takes neither the declaration without retention nor the legacy one
/// has the delivery limit and retention.
async fn refuse_legacy(conn: &Connection, names: &Names) -> anyhow::Result<()> {
    let queue = names.dlq();
    if known_not_legacy(&queue) {
        return Ok(());
    }
    if try_declare(conn, &queue, dlq_args(Retention::default())).await? {
        note_not_legacy(&queue);
        return Ok(());
    }
    if try_declare(conn, &queue, quorum()).await? {
        Err(legacy_dlq_error(names))
    } else {
        note_not_legacy(&queue);
        Ok(())
    }
}

/// How much of the DLQ one pass saw, against what it held when the pass started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Messages ready when the pass started.
    pub expected: usize,
    /// Messages the pass saw that were there at its start (its own replayed copies are not counted).
    pub seen: usize,
    /// Consumers already reading the DLQ at the start: the messages they hold
    /// unacked are in no count AMQP reports, and this pass could not see them.
    pub other_consumers: u32,
    /// Why the pass stopped before it had seen `expected` messages.
    pub stopped: Option<String>,
}

impl Coverage {
    pub fn is_complete(&self) -> bool {
        self.seen >= self.expected && self.other_consumers == 0
    }

    /// What an operator must be told about a pass that did not see the whole DLQ.
    pub fn warning(&self) -> Option<String> {
        if self.is_complete() {
            return None;
        }
        let mut text = format!(
            "warning: incomplete pass: saw {} of the {} dead job(s) ready in the DLQ when it started",
            self.seen, self.expected
        );
        if let Some(why) = &self.stopped {
            text.push_str(&format!(" (stopped: {why})"));
        }
        if self.other_consumers > 0 {
            text.push_str(&format!(
                "; {} other consumer(s) were reading the DLQ and may hold dead jobs this pass never saw",
                self.other_consumers
            ));
        }
        text.push_str(
            ". The numbers above are partial: run it again once no other `herald dlq` command or consumer reads the DLQ.",
        );
        Some(text)
    }
}

/// Walks the DLQ once: every message is delivered to this reader and held
/// unacked, so nothing is removed or reordered unless the caller acks it.
/// Closing (or dropping) the reader hands every unacked message back.
///
/// A quorum queue caps a consumer at 65,535 unacked messages (and treats
/// prefetch 0 as 2,000: rabbitmq-server#14485), so the reader opens consumers
/// one after another, each drained to its cap before the next starts; each
/// holds one contiguous run of the queue, and they return in order.
pub struct Reader {
    /// Held for the whole pass: no other herald reader holds DLQ messages meanwhile.
    lock: ReaderLock,
    channel: Channel,
    /// A second channel, to watch the queue's depth while the first one closes.
    probe: Channel,
    /// Messages ready in the queue when the pass started.
    initial: usize,
    /// Consumers already on the queue when the pass started.
    others: u32,
    queue: String,
    consumer: Consumer,
    consumers: usize,
    taken_from_current: usize,
    /// Deliveries handed to the caller; every one not acked returns on close.
    delivered: usize,
    /// Of those, the ones that count toward `initial`.
    seen: usize,
    stopped: Option<String>,
}

/// How long [`Reader::close`] waits for the handed-back messages when the
/// queue's depth stops growing (another reader or a purge took some).
const STALLED: Duration = Duration::from_secs(5);

/// The most unacked messages one quorum-queue consumer can hold.
const PER_CONSUMER: u16 = u16::MAX;

impl Reader {
    /// Opens a pass, waiting up to [`READER_WAIT`] for another herald reader to finish.
    pub async fn open(conn: &Connection, names: &Names) -> anyhow::Result<Self> {
        Self::open_within(conn, names, READER_WAIT).await
    }

    /// Opens a pass, waiting up to `wait` for the reader lock.
    pub async fn open_within(
        conn: &Connection,
        names: &Names,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let lock = ReaderLock::acquire(conn, names, wait).await?;
        let (ready, others) = status(conn, names).await?;
        refuse_legacy(conn, names).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(PER_CONSUMER, BasicQosOptions::default())
            .await?;
        let queue = names.dlq();
        let consumer = Self::consume(&channel, &queue, 0).await?;
        Ok(Self {
            lock,
            channel,
            probe: conn.create_channel().await?,
            initial: ready as usize,
            others,
            queue,
            consumer,
            consumers: 1,
            taken_from_current: 0,
            delivered: 0,
            seen: 0,
            stopped: None,
        })
    }

    async fn consume(channel: &Channel, queue: &str, n: usize) -> Result<Consumer, lapin::Error> {
        channel
            .basic_consume(
                queue.into(),
                format!("herald-dlq-reader-{n}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// The next dead job of this pass; `None` once every message present at
    /// the start was seen, or when the pass cannot go on ([`Reader::coverage`] says why).
    pub async fn next(&mut self) -> Option<Delivery> {
        if self.seen >= self.initial || self.stopped.is_some() {
            return None;
        }
        if self.taken_from_current == usize::from(PER_CONSUMER) {
            match Self::consume(&self.channel, &self.queue, self.consumers).await {
                Ok(consumer) => self.consumer = consumer,
                Err(e) => return self.stop(format!("broker error: {e}")),
            }
            self.consumers += 1;
            self.taken_from_current = 0;
        }
        match tokio::time::timeout(IDLE, self.consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.delivered += 1;
                self.seen += 1;
                self.taken_from_current += 1;
                Some(delivery)
            }
            Ok(Some(Err(e))) => self.stop(format!("broker error: {e}")),
            Ok(None) => self.stop("the broker cancelled the consumer".into()),
            Err(_) => self.stop(format!(
                "no message for {} s: another consumer holds the rest",
                IDLE.as_secs()
            )),
        }
    }

    fn stop(&mut self, why: String) -> Option<Delivery> {
        self.stopped = Some(why);
        None
    }

    /// The last delivery was not in the queue when the pass started (a copy
    /// this replay run made): it does not count toward what the pass must see.
    pub fn arrived_later(&mut self) {
        self.seen = self.seen.saturating_sub(1);
    }

    pub fn coverage(&self) -> Coverage {
        Coverage {
            expected: self.initial,
            seen: self.seen,
            other_consumers: self.others,
            stopped: self.stopped.clone(),
        }
    }

    /// Ends the pass: every message not acked returns to the queue. A quorum
    /// queue takes them back asynchronously, so this waits (while they keep coming back) until the
    /// queue holds what it held at the start (or, after a pass another reader
    /// cut short, what this one took) less the `removed` messages; a read right
    /// after this one then sees them. Best effort: after a channel error the
    /// broker has already taken them back.
    pub async fn close(self, removed: usize) {
        let _ = self.channel.close(200, "dlq read".into()).await;
        let held = match self.stopped {
            Some(_) => self.delivered,
            None => self.initial.max(self.delivered),
        };
        let target = held.saturating_sub(removed);
        // 100,000 messages handed back to a quorum queue on a loaded machine
        // took over 10 s: a fixed deadline let the next pass start while they
        // were still on their way and see none of them. So wait while they
        // keep coming back, and give up only when the depth stalls.
        let mut last: Option<u32> = None;
        let mut progressed = tokio::time::Instant::now();
        loop {
            match queue_depth(&self.probe, &self.queue).await {
                Ok(depth) if (depth as usize) < target => {
                    if last.is_none_or(|l| depth > l) {
                        last = Some(depth);
                        progressed = tokio::time::Instant::now();
                    } else if progressed.elapsed() >= STALLED {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => break,
            }
        }
        let _ = self.probe.close(200, "dlq read".into()).await;
        self.lock.release().await;
    }
}

/// Reads every message in the DLQ once, leaving the queue as it was.
pub async fn scan(
    conn: &Connection,
    names: &Names,
    mut visit: impl FnMut(&Delivery),
) -> anyhow::Result<Coverage> {
    let mut reader = Reader::open(conn, names).await?;
    while let Some(delivery) = reader.next().await {
        visit(&delivery);
    }
    let coverage = reader.coverage();
    reader.close(0).await;
    Ok(coverage)
}

/// Which dead jobs a command applies to; every set field must match.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Filter {
    pub id: Option<String>,
    pub vendor: Option<String>,
    pub account: Option<String>,
    pub reason: Option<Reason>,
    pub code: Option<String>,
    /// The error's shape, exactly ([`error_shape`]).
    pub shape: Option<String>,
    /// `to.user` or `to.group`, exactly.
    pub recipient: Option<String>,
    /// The job's `key`, exactly.
    pub key: Option<String>,
    /// A substring of the id, the error or the body, ignoring ASCII case.
    pub text: Option<String>,
    /// Died at or after.
    pub since: Option<DateTime<Utc>>,
    /// Died before.
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    /// The filter as command-line flags (`--vendor netease --code 500`); empty when it matches everything.
    pub fn to_args(&self) -> String {
        let mut args = Vec::new();
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                let quoted = if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '\'')
                {
                    format!("'{}'", v.replace('\'', "'\\''"))
                } else {
                    v
                };
                args.push(format!("--{name} {quoted}"));
            }
        };
        flag("id", self.id.clone());
        flag("vendor", self.vendor.clone());
        flag("account", self.account.clone());
        flag("reason", self.reason.map(|r| r.as_str().to_string()));
        flag("code", self.code.clone());
        flag("shape", self.shape.clone());
        flag("recipient", self.recipient.clone());
        flag("key", self.key.clone());
        flag("text", self.text.clone());
        flag("since", self.since.map(|t| t.to_rfc3339()));
        flag("until", self.until.map(|t| t.to_rfc3339()));
        args.join(" ")
    }

    /// Every set field matches `job`, whose body is `body`.
    pub fn matches(&self, job: &DeadJob, body: &[u8]) -> bool {
        self.matches_headers(job)
            && self
                .text
                .as_deref()
                .is_none_or(|t| contains_text(job, body, t))
    }

    /// Every set field but `text` matches.
    fn matches_headers(&self, job: &DeadJob) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.id, job.id.as_deref())
            && eq(&self.vendor, Some(&job.vendor))
            && eq(&self.account, Some(&job.account))
            && self.reason.is_none_or(|r| r == job.reason)
            && eq(&self.code, job.code.as_deref())
            && eq(&self.shape, Some(&job.shape))
            && eq(&self.recipient, job.recipient.as_deref())
            && eq(&self.key, job.key.as_deref())
            && self
                .since
                .is_none_or(|t| job.died_at.is_some_and(|d| d >= t))
            && self
                .until
                .is_none_or(|t| job.died_at.is_some_and(|d| d < t))
    }
}

/// `needle` occurs in the job's id, error or body, ignoring ASCII case.
fn contains_text(job: &DeadJob, body: &[u8], needle: &str) -> bool {
    let needle = needle.to_ascii_lowercase();
    let has = |hay: &[u8]| {
        !needle.is_empty()
            && hay
                .windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    needle.is_empty()
        || job.id.as_deref().is_some_and(|id| has(id.as_bytes()))
        || has(job.error.as_bytes())
        || has(body)
}

/// Parses `--since` / `--until`: an RFC 3339 instant, or a duration ago (`1h`, `30m`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!("`{text}` is neither an RFC 3339 time nor a duration like 1h or 30m")
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| format!("`{text}` reaches too far back"))
}

/// The exact dead copies a purge removes, by fingerprint, each with how many
/// identical copies were listed. The preview writes it; `purge --yes --plan` reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    wanted: BTreeMap<String, usize>,
}

impl Plan {
    pub fn of(jobs: &[DeadJob]) -> Self {
        let mut plan = Self::default();
        for job in jobs {
            *plan.wanted.entry(job.fingerprint.clone()).or_insert(0) += 1;
        }
        plan
    }

    /// Listed copies not taken yet.
    pub fn len(&self) -> usize {
        self.wanted.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
    }

    fn contains(&self, fingerprint: &str) -> bool {
        self.wanted.contains_key(fingerprint)
    }

    /// Takes one listed copy of `fingerprint`, so each listed copy is removed at most once.
    fn take(&mut self, fingerprint: &str) {
        if let Some(n) = self.wanted.get_mut(fingerprint) {
            *n -= 1;
            if *n == 0 {
                self.wanted.remove(fingerprint);
            }
        }
    }

    /// The plan file: one line per job, fingerprint first; lines starting with `#` are notes.
    pub fn render(jobs: &[DeadJob], queue: &str, at: DateTime<Utc>) -> String {
        let mut out = format!(
            "# herald dlq purge plan: {} dead job(s) listed from {queue} at {}\n\
             # `herald dlq purge --yes --plan FILE` removes exactly these copies and nothing else.\n\
             # Deleting a line keeps that job. Columns: fingerprint, id, lane, reason.\n",
            jobs.len(),
            at.to_rfc3339()
        );
        for j in jobs {
            out.push_str(&format!(
                "{} {} {} {}\n",
                j.fingerprint,
                j.id.as_deref().unwrap_or("-"),
                j.routing_key,
                j.reason
            ));
        }
        out
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut plan = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fingerprint = line.split_whitespace().next().unwrap_or_default();
            if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "line {}: `{fingerprint}` is not a fingerprint (64 hex digits); write plans with `herald dlq purge --save-plan FILE`",
                    n + 1
                ));
            }
            *plan
                .wanted
                .entry(fingerprint.to_ascii_lowercase())
                .or_insert(0) += 1;
        }
        Ok(plan)
    }
}

/// Which dead jobs a sweep acts on.
// One per command: its size does not matter, boxing the filter would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every job the filter matches, at most `limit`.
    Matching {
        filter: Filter,
        limit: Option<usize>,
    },
    /// Exactly the copies a purge preview listed.
    Planned(Plan),
}

impl Selection {
    /// The selection as an operator would write it, and as JSON: what the audit records.
    pub fn describe(&self) -> (String, serde_json::Value) {
        match self {
            Selection::Matching { filter, limit } => {
                let mut text = filter.to_args();
                if let Some(n) = limit {
                    text = format!("{text} --limit {n}").trim().to_string();
                }
                let mut json = serde_json::to_value(filter).unwrap_or_default();
                json["limit"] = serde_json::json!(limit);
                (text, json)
            }
            Selection::Planned(plan) => (
                format!("--plan ({} listed copies)", plan.len()),
                serde_json::json!({ "plan": plan.wanted }),
            ),
        }
    }
}

/// What a sweep does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Replay or remove it (in a dry run: report it).
    Take,
    /// Not selected: it stays in place.
    Leave,
    /// The same job as one this run replayed already: it stays, never sent twice in one run.
    AlreadyReplayed,
    /// A copy this run replayed that died again: it stays, and it was not in the DLQ when the pass began.
    OwnCopy,
    /// The selection is satisfied: the pass ends.
    Stop,
}

/// Decides, message by message, what one sweep does. Pure, so every rule is
/// tested without a broker.
#[derive(Debug)]
pub struct Decider {
    selection: Selection,
    /// Set for a replay: the tag its copies carry.
    run: Option<String>,
    /// Job keys this run has replayed.
    replayed: HashSet<String>,
    taken: usize,
}

impl Decider {
    pub fn new(selection: Selection) -> Self {
        Self {
            selection,
            run: None,
            replayed: HashSet::new(),
            taken: 0,
        }
    }

    /// A decider for replay run `run`, which sends each job at most once.
    pub fn replaying(selection: Selection, run: &str) -> Self {
        Self {
            run: Some(run.to_string()),
            ..Self::new(selection)
        }
    }

    /// Nothing more to take: the limit is reached, or every planned copy was found.
    pub fn is_satisfied(&self) -> bool {
        match &self.selection {
            Selection::Matching { limit, .. } => limit.is_some_and(|l| self.taken >= l),
            Selection::Planned(plan) => plan.is_empty(),
        }
    }

    /// Planned copies not found so far.
    pub fn unfound(&self) -> usize {
        match &self.selection {
            Selection::Planned(plan) => plan.len(),
            Selection::Matching { .. } => 0,
        }
    }

    pub fn decide(&mut self, job: &DeadJob, body: &[u8]) -> Verdict {
        if self.is_satisfied() {
            return Verdict::Stop;
        }
        if self.run.is_some() && job.replay_run == self.run {
            return Verdict::OwnCopy;
        }
        let selected = match &self.selection {
            Selection::Matching { filter, .. } => filter.matches(job, body),
            Selection::Planned(plan) => plan.contains(&job.fingerprint),
        };
        if !selected {
            return Verdict::Leave;
        }
        if self.run.is_some() && !self.replayed.insert(job.job_key.clone()) {
            return Verdict::AlreadyReplayed;
        }
        if let Selection::Planned(plan) = &mut self.selection {
            plan.take(&job.fingerprint);
        }
        self.taken += 1;
        Verdict::Take
    }
}

/// What `list`, `replay` and `purge` did.
#[derive(Debug, Default)]
pub struct Swept {
    pub jobs: Vec<DeadJob>,
    pub stats: Stats,
    /// Messages left in place because this run had replayed their job already.
    pub skipped: usize,
    /// Planned copies that were not in the DLQ: removed, replayed or dead again since they were listed.
    pub unfound: usize,
    /// How much of the DLQ the pass saw; `None` when it ended because its selection was satisfied.
    pub coverage: Option<Coverage>,
}

impl Swept {
    pub fn warning(&self) -> Option<String> {
        self.coverage.as_ref().and_then(Coverage::warning)
    }
}

/// What a sweep does with each matching dead job.
pub enum Action<'a> {
    /// Republish to its lane, attempts reset, confirmed by the broker before the
    /// DLQ copy is acked: a crash in between replays that job twice, loses none.
    Replay {
        publisher: &'a Publisher,
        /// Jobs per second at most.
        rate: Option<u32>,
    },
    /// Remove it.
    Purge,
    /// Only report what would happen.
    DryRun,
}

/// One pass over the DLQ applying `action` to the jobs `selection` picks, for
/// `actor`. A replay or purge is recorded in the audit stream (its start
/// before any job is touched, every job it handled, its end); a dry run is a read.
pub async fn sweep(
    conn: &Connection,
    names: &Names,
    selection: Selection,
    action: Action<'_>,
    actor: &Actor,
) -> anyhow::Result<Swept> {
    let kind = match action {
        Action::DryRun => return pass(conn, names, selection, action, actor, None).await,
        Action::Replay { .. } => audit::Action::Replay,
        Action::Purge => audit::Action::Purge,
    };
    let (text, json) = selection.describe();
    let mut trail = Trail::start(conn, names, actor, kind, text, json).await?;
    let swept = pass(conn, names, selection, action, actor, Some(&mut trail)).await;
    let outcome = match &swept {
        Ok(s) => Outcome {
            done: s.jobs.len() as u64,
            skipped: s.skipped as u64,
            unfound: s.unfound as u64,
            warning: s.warning(),
            error: None,
        },
        Err(e) => Outcome {
            error: Some(format!("{e:#}")),
            ..Outcome::default()
        },
    };
    let recorded = trail.finish(outcome).await;
    let swept = swept?;
    recorded.map_err(|e| {
        anyhow::anyhow!(
            "{} dead job(s) were handled, but the end of the action was not recorded: {e:#}",
            swept.jobs.len()
        )
    })?;
    Ok(swept)
}

/// The pass of [`sweep`]; each job it acts on goes to `trail` once the broker has the result.
/// Replays in flight at once: each confirmed, then its DLQ copy removed. A
/// replay killed mid-way sends again at most these (confirmed, not yet removed).
const REPLAY_WINDOW: usize = 64;

/// A job the pass took: in the audit trail and the pass's figures.
async fn record(swept: &mut Swept, trail: Option<&mut Trail>, job: DeadJob) -> anyhow::Result<()> {
    if let Some(trail) = trail {
        trail
            .took(JobRef {
                id: job.id.clone(),
                fingerprint: job.fingerprint.clone(),
            })
            .await?;
    }
    swept.stats.add(&job);
    swept.jobs.push(job);
    Ok(())
}

async fn pass(
    conn: &Connection,
    names: &Names,
    selection: Selection,
    action: Action<'_>,
    actor: &Actor,
    mut trail: Option<&mut Trail>,
) -> anyhow::Result<Swept> {
    let limiter = match action {
        Action::Replay { rate: Some(r), .. } => NonZeroU32::new(r)
            .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN))),
        _ => None,
    };
    let run = format!("{:016x}", rand::random::<u64>());
    let mut decider = match action {
        Action::Replay { .. } => Decider::replaying(selection, &run),
        _ => Decider::new(selection),
    };
    let mut reader = Reader::open(conn, names).await?;
    let mut swept = Swept::default();
    let mut removed = 0;
    // Replays confirmed by the broker, then removed from the DLQ, up to
    // REPLAY_WINDOW at once: one confirm round trip per job capped a replay
    // at ~200 jobs/s on a loaded machine. Settled in the DLQ's order, so the
    // audit lists the jobs as the queue held them (confirms and acks can end
    // out of order).
    let mut replaying = FuturesOrdered::new();
    let mut failed: Option<anyhow::Error> = None;
    while !decider.is_satisfied() && failed.is_none() {
        let Some(delivery) = reader.next().await else {
            break;
        };
        let job = DeadJob::from_delivery(&delivery);
        match decider.decide(&job, &delivery.data) {
            Verdict::Stop => break,
            Verdict::Leave => continue,
            Verdict::OwnCopy => {
                reader.arrived_later();
                swept.skipped += 1;
                continue;
            }
            Verdict::AlreadyReplayed => {
                swept.skipped += 1;
                continue;
            }
            Verdict::Take => {}
        }
        match action {
            Action::DryRun => {
                failed = record(&mut swept, trail.as_deref_mut(), job).await.err();
            }
            Action::Purge => {
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    failed = Some(e.into());
                    break;
                }
                removed += 1;
                failed = record(&mut swept, trail.as_deref_mut(), job).await.err();
            }
            Action::Replay { publisher, .. } => {
                if let Some(limiter) = &limiter {
                    limiter.until_ready().await;
                }
                let props = copy_for_replay(&delivery.properties, &run, &actor.who);
                let jobs = names.jobs();
                replaying.push_back(async move {
                    publisher
                        .publish(&jobs, &job.routing_key, &delivery.data, props)
                        .await?;
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    anyhow::Ok(job)
                });
                // Starts the new publish and settles every one already done;
                // waits only while the window is full.
                loop {
                    let done = if replaying.len() >= REPLAY_WINDOW {
                        replaying.next().await
                    } else {
                        match replaying.next().now_or_never() {
                            Some(done) => done,
                            None => break,
                        }
                    };
                    match done {
                        Some(Ok(job)) => {
                            removed += 1;
                            if let Err(e) = record(&mut swept, trail.as_deref_mut(), job).await {
                                failed = Some(e);
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            failed = Some(e);
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
    }
    // Every publish already sent is seen to its end, so a failure (a publish,
    // an ack or the audit) leaves no confirmed copy unremoved (which the next
    // run would replay a second time), and the reader closes as usual.
    while let Some(done) = replaying.next().await {
        match done {
            Ok(job) => {
                removed += 1;
                if let Err(e) = record(&mut swept, trail.as_deref_mut(), job).await {
                    failed = failed.or(Some(e));
                }
            }
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        reader.close(removed).await;
        return Err(e);
    }
    swept.unfound = decider.unfound();
    swept.coverage = (!decider.is_satisfied()).then(|| reader.coverage());
    reader.close(removed).await;
    Ok(swept)
}

/// One row of `dlq stats`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    pub vendor: String,
    pub account: String,
    pub reason: Reason,
    pub code: Option<String>,
    pub shape: String,
    pub count: u64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What one group of dead jobs shares.
type GroupKey = (String, String, Reason, Option<String>, String);

/// Groups dead jobs by vendor, account, reason, vendor code and error shape.
#[derive(Debug, Default)]
pub struct Stats {
    groups: BTreeMap<GroupKey, Group>,
}

impl Stats {
    pub fn add(&mut self, job: &DeadJob) {
        let key = (
            job.vendor.clone(),
            job.account.clone(),
            job.reason,
            job.code.clone(),
            job.shape.clone(),
        );
        let group = self.groups.entry(key).or_insert_with(|| Group {
            vendor: job.vendor.clone(),
            account: job.account.clone(),
            reason: job.reason,
            code: job.code.clone(),
            shape: job.shape.clone(),
            count: 0,
            oldest: None,
            newest: None,
        });
        group.count += 1;
        if let Some(t) = job.died_at {
            group.oldest = Some(group.oldest.map_or(t, |o| o.min(t)));
            group.newest = Some(group.newest.map_or(t, |n| n.max(t)));
        }
    }

    pub fn groups(&self) -> Vec<Group> {
        self.groups.values().cloned().collect()
    }

    pub fn total(&self) -> u64 {
        self.groups.values().map(|g| g.count).sum()
    }

    /// The table `herald dlq stats` prints.
    pub fn table(&self) -> String {
        let fmt_time = |t: Option<DateTime<Utc>>| {
            t.map_or("-".to_string(), |t| {
                t.format("%Y-%m-%d %H:%M:%S").to_string()
            })
        };
        let mut rows = vec![[
            "VENDOR".to_string(),
            "ACCOUNT".into(),
            "REASON".into(),
            "CODE".into(),
            "COUNT".into(),
            "OLDEST (UTC)".into(),
            "NEWEST (UTC)".into(),
            "SHAPE".into(),
        ]];
        for g in self.groups.values() {
            rows.push([
                g.vendor.clone(),
                g.account.clone(),
                g.reason.to_string(),
                g.code.clone().unwrap_or_else(|| "-".into()),
                g.count.to_string(),
                fmt_time(g.oldest),
                fmt_time(g.newest),
                g.shape.chars().take(SHAPE_COLUMN).collect(),
            ]);
        }
        let widths: Vec<usize> = (0..8)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.push_str(&format!("{} dead job(s)\n", self.total()));
        out
    }
}

/// Characters of a shape the stats table shows (`--json` has all of it).
const SHAPE_COLUMN: usize = 60;

/// Everything about one dead message, as `herald dlq show` prints it.
pub fn describe(delivery: &Delivery) -> String {
    let job = DeadJob::from_delivery(delivery);
    let mut out = format!(
        "id:          {}\nlane:        {}\nreason:      {}\ncode:        {}\nattempts:    {}\ndied at:     {}\nerror:       {}\nheaders:\n",
        job.id.as_deref().unwrap_or("-"),
        job.routing_key,
        job.reason,
        job.code.as_deref().unwrap_or("-"),
        job.attempts,
        job.died_at.map_or("-".into(), |t| t.to_rfc3339()),
        job.error
    );
    if let Some(headers) = delivery.properties.headers() {
        for key in headers.inner().keys() {
            let value = header_str(&delivery.properties, key.as_str())
                .unwrap_or_else(|| "(structured)".into());
            // The history has its own section below; one JSON line says little.
            if key.as_str() != HISTORY {
                out.push_str(&format!("  {key}: {value}\n"));
            }
        }
    }
    out.push_str(&history_text(&history(&delivery.properties)));
    let body = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&delivery.data).into_owned());
    out.push_str(&format!("body:\n{body}\n\n"));
    out
}

/// The `history:` section of `dlq show`: one line per event, oldest first.
fn history_text(history: &History) -> String {
    let mut out = String::from("history:\n");
    if history.unreadable {
        out.push_str("  (the x-herald-history header is not one herald wrote)\n");
    }
    if history.dropped > 0 {
        out.push_str(&format!("  ({} older event(s) dropped)\n", history.dropped));
    }
    if history.events.is_empty() && !history.unreadable {
        out.push_str("  (none recorded)\n");
    }
    for e in &history.events {
        let mut line = format!("  {}  {:<6}", e.at, e.kind.as_str());
        let mut part = |label: &str, value: &Option<String>| {
            if let Some(v) = value {
                line.push_str(&format!("  {label} {v}"));
            }
        };
        part("tier", &e.tier);
        part("reason", &e.reason);
        part("attempt", &e.attempt.map(|a| a.to_string()));
        part("code", &e.code);
        part("by", &e.by);
        part("error", &e.error);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The table `herald dlq list` prints.
pub fn list_table(jobs: &[DeadJob]) -> String {
    let mut out = String::from(
        "ID                         LANE                REASON      CODE      ATTEMPTS  DIED (UTC)           ERROR\n",
    );
    for j in jobs {
        let died = j.died_at.map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        });
        let error: String = j.error.chars().take(80).collect();
        out.push_str(&format!(
            "{:<26} {:<19} {:<11} {:<9} {:<9} {:<20} {}\n",
            j.id.as_deref().unwrap_or("-"),
            j.routing_key,
            j.reason.as_str(),
            j.code.as_deref().unwrap_or("-"),
            j.attempts,
            died,
            error
        ));
    }
    out.push_str(&format!("{} dead job(s)\n", jobs.len()));
    out
}

/// Reads the whole DLQ and groups it; the coverage says whether it saw all of it.
pub async fn stats(conn: &Connection, names: &Names) -> anyhow::Result<(Stats, Coverage)> {
    let mut stats = Stats::default();
    let coverage = scan(conn, names, |d| stats.add(&DeadJob::from_delivery(d))).await?;
    Ok((stats, coverage))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(vendor: &str, reason: Reason, code: Option<&str>, secs: i64) -> DeadJob {
        DeadJob {
            id: Some("j".into()),
            vendor: vendor.into(),
            account: "default".into(),
            reason,
            code: code.map(Into::into),
            error: String::new(),
            shape: String::new(),
            recipient: None,
            key: None,
            attempts: 1,
            died_at: Utc.timestamp_opt(secs, 0).single(),
            routing_key: format!("{vendor}.default"),
            fingerprint: hex::encode(Sha256::digest(secs.to_be_bytes())),
            job_key: "id:j".into(),
            replay_run: None,
        }
    }

    /// A dead copy of job `id`; `copy` tells apart copies of one job that died at different times.
    fn copy(id: &str, reason: Reason, copy: i64, run: Option<&str>) -> DeadJob {
        DeadJob {
            id: Some(id.into()),
            fingerprint: hex::encode(Sha256::digest(format!("{id}/{copy}"))),
            job_key: format!("id:{id}"),
            replay_run: run.map(Into::into),
            ..job("netease", reason, None, copy)
        }
    }

    fn all() -> Selection {
        Selection::Matching {
            filter: Filter::default(),
            limit: None,
        }
    }

    #[test]
    fn a_purge_plan_takes_exactly_the_listed_copies_once_each() {
        let listed = [
            copy("a", Reason::Invalid, 1, None),
            copy("b", Reason::Invalid, 1, None),
        ];
        let mut decider = Decider::new(Selection::Planned(Plan::of(&listed)));
        // Arrived after the listing with the same filters: not in the plan.
        assert_eq!(
            decider.decide(&copy("c", Reason::Invalid, 1, None), b"{}"),
            Verdict::Leave
        );
        // Job `a` died again after it was listed: same id, another copy.
        assert_eq!(
            decider.decide(&copy("a", Reason::Invalid, 2, None), b"{}"),
            Verdict::Leave
        );
        assert_eq!(decider.decide(&listed[0], b"{}"), Verdict::Take);
        assert_eq!(decider.unfound(), 1);
        assert!(!decider.is_satisfied());
        assert_eq!(decider.decide(&listed[1], b"{}"), Verdict::Take);
        assert!(decider.is_satisfied());
        assert_eq!(decider.decide(&listed[0], b"{}"), Verdict::Stop);
    }

    #[test]
    fn identical_listed_copies_are_each_taken_once() {
        let twin = copy("a", Reason::Invalid, 1, None);
        let mut decider = Decider::new(Selection::Planned(Plan::of(&[twin.clone(), twin.clone()])));
        assert_eq!(decider.decide(&twin, b"{}"), Verdict::Take);
        assert_eq!(decider.decide(&twin, b"{}"), Verdict::Take);
        assert_eq!(decider.decide(&twin, b"{}"), Verdict::Stop);
    }

    #[test]
    fn plan_files_round_trip_and_reject_what_is_not_a_fingerprint() {
        let jobs = [
            copy("a", Reason::Invalid, 1, None),
            copy("b", Reason::Permanent, 1, None),
        ];
        let text = Plan::render(&jobs, "herald.dlq", Utc.timestamp_opt(0, 0).unwrap());
        assert!(text.contains("2 dead job(s)"), "{text}");
        let plan = Plan::parse(&text).unwrap();
        assert_eq!(plan, Plan::of(&jobs));
        assert_eq!(plan.len(), 2);
        let kept_one: String = text
            .lines()
            .filter(|l| !l.contains(" b "))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(Plan::parse(&kept_one).unwrap().len(), 1);
        let err = Plan::parse("# note\n\norder-1 netease.default invalid\n").unwrap_err();
        assert!(
            err.starts_with("line 3:") && err.contains("--save-plan"),
            "{err}"
        );
    }

    #[test]
    fn a_replay_sends_each_job_once_and_knows_its_own_copies() {
        let mut decider = Decider::replaying(all(), "run-1");
        assert_eq!(
            decider.decide(&copy("a", Reason::Exhausted, 1, None), b"{}"),
            Verdict::Take
        );
        // Died again at once and came back while this run still sweeps.
        assert_eq!(
            decider.decide(&copy("a", Reason::Exhausted, 2, Some("run-1")), b"{}"),
            Verdict::OwnCopy
        );
        // A second dead copy of the same job that was there before the run.
        assert_eq!(
            decider.decide(&copy("a", Reason::Exhausted, 3, None), b"{}"),
            Verdict::AlreadyReplayed
        );
        // Replayed by an earlier run: this run replays it.
        assert_eq!(
            decider.decide(&copy("b", Reason::Exhausted, 1, Some("run-0")), b"{}"),
            Verdict::Take
        );
    }

    #[test]
    fn a_replay_limit_counts_jobs_sent_not_copies_skipped() {
        let mut decider = Decider::replaying(
            Selection::Matching {
                filter: Filter::default(),
                limit: Some(2),
            },
            "run-1",
        );
        assert_eq!(
            decider.decide(&copy("a", Reason::Invalid, 1, None), b"{}"),
            Verdict::Take
        );
        assert_eq!(
            decider.decide(&copy("a", Reason::Invalid, 2, Some("run-1")), b"{}"),
            Verdict::OwnCopy
        );
        assert_eq!(
            decider.decide(&copy("b", Reason::Invalid, 1, None), b"{}"),
            Verdict::Take
        );
        assert_eq!(
            decider.decide(&copy("c", Reason::Invalid, 1, None), b"{}"),
            Verdict::Stop
        );
    }

    #[test]
    fn a_dry_run_or_purge_never_skips_as_replayed() {
        let mut decider = Decider::new(all());
        let a = copy("a", Reason::Invalid, 1, Some("run-1"));
        assert_eq!(decider.decide(&a, b"{}"), Verdict::Take);
        assert_eq!(
            decider.decide(&copy("a", Reason::Invalid, 2, None), b"{}"),
            Verdict::Take
        );
    }

    #[test]
    fn a_pass_that_missed_messages_or_shared_the_queue_says_so() {
        let whole = Coverage {
            expected: 10,
            seen: 10,
            ..Coverage::default()
        };
        assert!(whole.is_complete() && whole.warning().is_none());
        let short = Coverage {
            expected: 10,
            seen: 6,
            stopped: Some("no message for 3 s".into()),
            ..Coverage::default()
        };
        let warning = short.warning().unwrap();
        assert!(
            warning.contains("saw 6 of the 10") && warning.contains("no message for 3 s"),
            "{warning}"
        );
        let shared = Coverage {
            expected: 6,
            seen: 6,
            other_consumers: 1,
            stopped: None,
        };
        let warning = shared.warning().unwrap();
        assert!(
            warning.contains("saw 6 of the 6") && warning.contains("1 other consumer(s)"),
            "{warning}"
        );
    }

    #[test]
    fn a_fingerprint_changes_with_herald_headers_but_not_with_the_broker_delivery_count() {
        use crate::envelope::{set_int, set_str};
        let props = |attempts: u64, delivery_count: u64| {
            let mut headers = FieldTable::default();
            set_int(&mut headers, ATTEMPTS, attempts);
            set_str(&mut headers, REASON, "exhausted");
            set_int(&mut headers, "x-delivery-count", delivery_count);
            BasicProperties::default()
                .with_headers(headers)
                .with_message_id("job-1".into())
        };
        let at = |p: &BasicProperties| fingerprint(p, "netease.default", b"{}");
        assert_eq!(at(&props(4, 1)), at(&props(4, 7)));
        assert_ne!(at(&props(4, 1)), at(&props(5, 1)));
        assert_ne!(
            at(&props(4, 1)),
            fingerprint(&props(4, 1), "netease.default", b"{ }")
        );
        assert_eq!(at(&props(4, 1)).len(), 64);
        assert_eq!(job_key(Some("job-1"), b"x"), job_key(Some("job-1"), b"y"));
        assert_ne!(job_key(None, b"x"), job_key(None, b"y"));
    }

    #[test]
    fn filters_combine_and_time_ranges_are_half_open() {
        let j = job("netease", Reason::Permanent, Some("414"), 100);
        let at = |s| Utc.timestamp_opt(s, 0).single();
        assert!(Filter::default().matches(&j, b"{}"));
        assert!(
            Filter {
                code: Some("414".into()),
                vendor: Some("netease".into()),
                ..Filter::default()
            }
            .matches(&j, b"{}")
        );
        assert!(
            !Filter {
                code: Some("500".into()),
                ..Filter::default()
            }
            .matches(&j, b"{}")
        );
        assert!(
            !Filter {
                reason: Some(Reason::Invalid),
                ..Filter::default()
            }
            .matches(&j, b"{}")
        );
        assert!(
            Filter {
                since: at(100),
                until: at(101),
                ..Filter::default()
            }
            .matches(&j, b"{}")
        );
        assert!(
            !Filter {
                until: at(100),
                ..Filter::default()
            }
            .matches(&j, b"{}")
        );
    }

    #[test]
    fn shape_recipient_key_and_text_filters_select_a_group_and_a_search() {
        let mut delivery = Delivery::mock(
            1,
            "t.dead".into(),
            "netease.default".into(),
            false,
            br#"{"id":"o-1","to":{"group":"g-7"},"key":"order.shipped","data":"Parcel ABC"}"#
                .to_vec(),
        );
        let mut headers = FieldTable::default();
        crate::envelope::set_str(&mut headers, ERROR, "pushcontent is 612 characters");
        crate::envelope::set_str(&mut headers, REASON, "invalid");
        delivery.properties = BasicProperties::default().with_headers(headers);
        let job = DeadJob::from_delivery(&delivery);
        let body = delivery.data.as_slice();
        assert_eq!(job.recipient.as_deref(), Some("g-7"));
        assert_eq!(job.key.as_deref(), Some("order.shipped"));
        assert_eq!(job.shape, "pushcontent is <n> characters");
        let only = |f: Filter| f.matches(&job, body);
        assert!(only(Filter {
            shape: Some(error_shape("pushcontent is 700 characters")),
            recipient: Some("g-7".into()),
            key: Some("order.shipped".into()),
            ..Filter::default()
        }));
        assert!(!only(Filter {
            recipient: Some("g".into()),
            ..Filter::default()
        }));
        for found in ["parcel abc", "612", "O-1"] {
            assert!(
                only(Filter {
                    text: Some(found.into()),
                    ..Filter::default()
                }),
                "{found}"
            );
        }
        assert!(!only(Filter {
            text: Some("parcel xyz".into()),
            ..Filter::default()
        }));
        let mut stats = Stats::default();
        stats.add(&job);
        let mut other = job.clone();
        other.shape = error_shape("to is empty");
        stats.add(&other);
        assert_eq!(stats.groups().len(), 2, "one group per shape");
        assert!(stats.table().contains("pushcontent is <n> characters"));
        let bare = DeadJob::from_delivery(&Delivery::mock(
            2,
            "t.dead".into(),
            "netease.default".into(),
            false,
            br#"{"to":{"user":7},"key":["x"]}"#.to_vec(),
        ));
        assert_eq!(
            (bare.recipient, bare.key),
            (None, None),
            "only strings are names"
        );
    }

    #[test]
    fn a_selection_reads_back_as_the_flags_that_make_it_for_the_audit() {
        let at = Utc.timestamp_opt(0, 0).single();
        let selection = Selection::Matching {
            filter: Filter {
                vendor: Some("netease".into()),
                reason: Some(Reason::Permanent),
                shape: Some("to is <n> characters".into()),
                since: at,
                ..Filter::default()
            },
            limit: Some(5),
        };
        let (text, json) = selection.describe();
        assert_eq!(
            text,
            "--vendor netease --reason permanent --shape 'to is <n> characters' --since 1970-01-01T00:00:00+00:00 --limit 5"
        );
        assert_eq!(json["vendor"], "netease");
        assert_eq!(json["limit"], 5);
        assert_eq!(Filter::default().to_args(), "");
        let plan = Selection::Planned(Plan::of(&[copy("a", Reason::Invalid, 1, None)]));
        assert_eq!(plan.describe().0, "--plan (1 listed copies)");
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = Utc.timestamp_opt(10_000, 0).single().unwrap();
        assert_eq!(parse_time("1h", now).unwrap().timestamp(), 10_000 - 3600);
        assert_eq!(
            parse_time("1970-01-01T00:00:05Z", now).unwrap().timestamp(),
            5
        );
        assert!(
            parse_time("yesterday", now)
                .unwrap_err()
                .contains("RFC 3339")
        );
    }

    #[test]
    fn stats_group_by_vendor_account_reason_code_with_oldest_and_newest() {
        let mut stats = Stats::default();
        stats.add(&job("netease", Reason::Permanent, Some("414"), 100));
        stats.add(&job("netease", Reason::Permanent, Some("414"), 50));
        stats.add(&job("netease", Reason::Permanent, Some("403"), 70));
        stats.add(&job("netease", Reason::Invalid, None, 60));
        let groups = stats.groups();
        assert_eq!(groups.len(), 3);
        let g414 = groups
            .iter()
            .find(|g| g.code.as_deref() == Some("414"))
            .unwrap();
        assert_eq!(g414.count, 2);
        assert_eq!(g414.oldest.unwrap().timestamp(), 50);
        assert_eq!(g414.newest.unwrap().timestamp(), 100);
        assert_eq!(stats.total(), 4);
        let table = stats.table();
        assert!(table.starts_with("VENDOR"), "{table}");
        assert!(table.contains("4 dead job(s)"), "{table}");
    }
}
