//! Dead-letter review: reading `{p}.dlq` without removing or reordering anything.
//!
//! A scan consumes every message without acking it and aggregates as it goes
//! (no message is kept in memory); closing the channel hands them all back.
//! Jobs dead-lettered by the broker rather than by herald carry no
//! `x-herald-reason`: `x-death` says `delivery_limit` for `poison`, and a message
//! with neither came through the alternate exchange (`unroutable`).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt;
use governor::{Quota, RateLimiter};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use serde::Serialize;

use crate::broker::{Publisher, death_reason, header_str, header_u64, queue_depth};
use crate::envelope::{
    ATTEMPTS, ERROR, LAST_ATTEMPT, REASON, ROUTING_KEY, VENDOR_CODE, copy_for_replay,
};
use crate::outcome::Reason;
use crate::topology::Names;

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
    pub attempts: u64,
    pub died_at: Option<DateTime<Utc>>,
    pub routing_key: String,
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
        Self {
            id: p.message_id().as_ref().map(|m| m.as_str().to_string()),
            vendor,
            account,
            reason,
            code: header_str(p, VENDOR_CODE).filter(|c| !c.is_empty()),
            error,
            attempts: header_u64(p, ATTEMPTS).unwrap_or(0),
            died_at,
            routing_key,
        }
    }
}

/// Messages ready in the DLQ now (not counting those another reader holds).
pub async fn depth(conn: &Connection, names: &Names) -> anyhow::Result<u32> {
    let channel = conn.create_channel().await?;
    let queue = names.dlq();
    let depth = queue_depth(&channel, &queue).await.map_err(|e| {
        anyhow::anyhow!("cannot open the DLQ `{queue}` (run `herald topology apply` first?): {e}")
    })?;
    let _ = channel.close(200, "depth read".into()).await;
    Ok(depth)
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
    channel: Channel,
    /// A second channel, to watch the queue's depth while the first one closes.
    probe: Channel,
    /// Messages in the queue when the pass started.
    initial: usize,
    queue: String,
    consumer: Consumer,
    consumers: usize,
    taken_from_current: usize,
    remaining: usize,
}

/// The most unacked messages one quorum-queue consumer can hold.
const PER_CONSUMER: u16 = u16::MAX;

impl Reader {
    pub async fn open(conn: &Connection, names: &Names) -> anyhow::Result<Self> {
        let remaining = depth(conn, names).await? as usize;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(PER_CONSUMER, BasicQosOptions::default())
            .await?;
        let queue = names.dlq();
        let consumer = Self::consume(&channel, &queue, 0).await?;
        Ok(Self {
            channel,
            probe: conn.create_channel().await?,
            initial: remaining,
            queue,
            consumer,
            consumers: 1,
            taken_from_current: 0,
            remaining,
        })
    }

    async fn consume(channel: &Channel, queue: &str, n: usize) -> anyhow::Result<Consumer> {
        Ok(channel
            .basic_consume(
                queue.into(),
                format!("herald-dlq-reader-{n}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// The next dead job of this pass; `None` once every message present at the start was seen.
    pub async fn next(&mut self) -> anyhow::Result<Option<Delivery>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        if self.taken_from_current == usize::from(PER_CONSUMER) {
            self.consumer = Self::consume(&self.channel, &self.queue, self.consumers).await?;
            self.consumers += 1;
            self.taken_from_current = 0;
        }
        match tokio::time::timeout(IDLE, self.consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.remaining -= 1;
                self.taken_from_current += 1;
                Ok(Some(delivery))
            }
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// Ends the pass: every message not acked returns to the queue. A quorum
    /// queue takes them back asynchronously, so this waits (up to 10 s) until the
    /// queue holds what it held at the start less the `removed` messages; a read
    /// right after this one then sees the whole queue.
    pub async fn close(self, removed: usize) -> anyhow::Result<()> {
        self.channel.close(200, "dlq read".into()).await?;
        let target = self.initial.saturating_sub(removed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline
            && (queue_depth(&self.probe, &self.queue).await? as usize) < target
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.probe.close(200, "dlq read".into()).await;
        Ok(())
    }
}

/// Reads every message in the DLQ once, leaving the queue as it was.
pub async fn scan(
    conn: &Connection,
    names: &Names,
    mut visit: impl FnMut(&Delivery),
) -> anyhow::Result<usize> {
    let mut reader = Reader::open(conn, names).await?;
    let mut seen = 0;
    while let Some(delivery) = reader.next().await? {
        visit(&delivery);
        seen += 1;
    }
    reader.close(0).await?;
    Ok(seen)
}

/// Which dead jobs a command applies to; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub id: Option<String>,
    pub vendor: Option<String>,
    pub account: Option<String>,
    pub reason: Option<Reason>,
    pub code: Option<String>,
    /// Died at or after.
    pub since: Option<DateTime<Utc>>,
    /// Died before.
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn matches(&self, job: &DeadJob) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.id, job.id.as_deref())
            && eq(&self.vendor, Some(&job.vendor))
            && eq(&self.account, Some(&job.account))
            && self.reason.is_none_or(|r| r == job.reason)
            && eq(&self.code, job.code.as_deref())
            && self
                .since
                .is_none_or(|t| job.died_at.is_some_and(|d| d >= t))
            && self
                .until
                .is_none_or(|t| job.died_at.is_some_and(|d| d < t))
    }
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

/// What `replay` and `purge` did.
#[derive(Debug, Default)]
pub struct Swept {
    pub jobs: Vec<DeadJob>,
    pub stats: Stats,
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

/// One pass over the DLQ applying `action` to at most `limit` jobs matching `filter`.
pub async fn sweep(
    conn: &Connection,
    names: &Names,
    filter: &Filter,
    limit: Option<usize>,
    action: Action<'_>,
) -> anyhow::Result<Swept> {
    let limiter = match action {
        Action::Replay { rate: Some(r), .. } => NonZeroU32::new(r)
            .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN))),
        _ => None,
    };
    let mut reader = Reader::open(conn, names).await?;
    let mut swept = Swept::default();
    let mut removed = 0;
    while let Some(delivery) = reader.next().await? {
        if limit.is_some_and(|l| swept.jobs.len() >= l) {
            break;
        }
        let job = DeadJob::from_delivery(&delivery);
        if !filter.matches(&job) {
            continue;
        }
        match action {
            Action::DryRun => {}
            Action::Purge => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
                removed += 1;
            }
            Action::Replay { publisher, .. } => {
                if let Some(limiter) = &limiter {
                    limiter.until_ready().await;
                }
                let props = copy_for_replay(&delivery.properties);
                publisher
                    .publish(&names.jobs(), &job.routing_key, &delivery.data, props)
                    .await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
                removed += 1;
            }
        }
        swept.stats.add(&job);
        swept.jobs.push(job);
    }
    reader.close(removed).await?;
    Ok(swept)
}

/// One row of `dlq stats`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    pub vendor: String,
    pub account: String,
    pub reason: Reason,
    pub code: Option<String>,
    pub count: u64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Groups dead jobs by vendor, account, reason and vendor code.
#[derive(Debug, Default)]
pub struct Stats {
    groups: BTreeMap<(String, String, Reason, Option<String>), Group>,
}

impl Stats {
    pub fn add(&mut self, job: &DeadJob) {
        let key = (
            job.vendor.clone(),
            job.account.clone(),
            job.reason,
            job.code.clone(),
        );
        let group = self.groups.entry(key).or_insert_with(|| Group {
            vendor: job.vendor.clone(),
            account: job.account.clone(),
            reason: job.reason,
            code: job.code.clone(),
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
            ]);
        }
        let widths: Vec<usize> = (0..7)
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
            out.push_str(&format!("  {key}: {value}\n"));
        }
    }
    let body = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&delivery.data).into_owned());
    out.push_str(&format!("body:\n{body}\n\n"));
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

/// Reads the whole DLQ and groups it.
pub async fn stats(conn: &Connection, names: &Names) -> anyhow::Result<Stats> {
    let mut stats = Stats::default();
    scan(conn, names, |d| stats.add(&DeadJob::from_delivery(d))).await?;
    Ok(stats)
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
            attempts: 1,
            died_at: Utc.timestamp_opt(secs, 0).single(),
            routing_key: format!("{vendor}.default"),
        }
    }

    #[test]
    fn filters_combine_and_time_ranges_are_half_open() {
        let j = job("netease", Reason::Permanent, Some("414"), 100);
        let at = |s| Utc.timestamp_opt(s, 0).single();
        assert!(Filter::default().matches(&j));
        assert!(
            Filter {
                code: Some("414".into()),
                vendor: Some("netease".into()),
                ..Filter::default()
            }
            .matches(&j)
        );
        assert!(
            !Filter {
                code: Some("500".into()),
                ..Filter::default()
            }
            .matches(&j)
        );
        assert!(
            !Filter {
                reason: Some(Reason::Invalid),
                ..Filter::default()
            }
            .matches(&j)
        );
        assert!(
            Filter {
                since: at(100),
                until: at(101),
                ..Filter::default()
            }
            .matches(&j)
        );
        assert!(
            !Filter {
                until: at(100),
                ..Filter::default()
            }
            .matches(&j)
        );
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
