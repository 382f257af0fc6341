//! The audit trail: every replay, purge, edit and import of dead jobs, from the
//! CLI or the console, recorded durably in the stream `{p}.audit`.
//!
//! An action writes a `started` record before it touches a job, `jobs` records
//! naming every job it acted on (in parts of [`JOBS_PER_RECORD`]) as it goes,
//! and a `finished` record with its result, all under one action id and each
//! confirmed by the broker: a crash mid-action still leaves its start and the
//! jobs recorded so far. An action whose start cannot be recorded does nothing.
//! Reading the stream ([`read`]) removes nothing; the stream's `x-max-age`
//! (`dlq.audit_max_age`) decides how long records stay.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};

use crate::broker::{PublishError, Publisher};
use crate::topology::Names;

/// Job references per `jobs` record, so that no record grows past ~60 KiB.
pub const JOBS_PER_RECORD: usize = 500;
/// How long an audit publish waits for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// A read of the stream ends after this long without a record.
const READ_IDLE: Duration = Duration::from_secs(1);
/// Longest record body read back; a larger one was not written by herald.
const MAX_RECORD_BYTES: usize = 256 * 1024;

/// Who acts, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The OS user for the CLI; the token's name for the console. Never a secret.
    pub who: String,
    pub source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cli,
    Console,
}

impl Actor {
    /// The user running this process: `$USER`, else `$LOGNAME`, else the name
    /// `/etc/passwd` gives the process's uid, else `uid N`.
    pub fn cli() -> Self {
        let from_env = ["USER", "LOGNAME"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .find(|name| !name.trim().is_empty());
        Self {
            who: bounded_name(from_env.unwrap_or_else(os_user)),
            source: Source::Cli,
        }
    }

    /// The console, acting for the user of the token named `token_name` in its config.
    pub fn console(token_name: &str) -> Self {
        Self {
            who: bounded_name(token_name.to_string()),
            source: Source::Console,
        }
    }
}

/// A name fit for a record and a log line: no control characters, at most 64 characters.
fn bounded_name(name: String) -> String {
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

#[cfg(unix)]
fn os_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".into();
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| passwd_name(&passwd, uid))
        .unwrap_or_else(|| format!("uid {uid}"))
}

#[cfg(not(unix))]
fn os_user() -> String {
    "unknown".into()
}

/// The name of `uid` in an `/etc/passwd` text.
fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// What was done to dead jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Replay,
    Purge,
    Edit,
    Import,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Purge => "purge",
            Self::Edit => "edit",
            Self::Import => "import",
        }
    }
}

/// Where in its action a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Started,
    Jobs,
    Finished,
}

/// One dead copy an action handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub id: Option<String>,
    pub fingerprint: String,
}

/// How an action ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Jobs replayed, removed, edited or imported.
    pub done: u64,
    /// Copies left in place (a replay's own copies, jobs it had sent already).
    #[serde(default)]
    pub skipped: u64,
    /// Planned copies that were not in the DLQ.
    #[serde(default)]
    pub unfound: u64,
    /// The incomplete-pass warning, when the pass could not see the whole DLQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Why the action stopped, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One record of the audit stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Shared by every record of one action.
    pub action_id: String,
    pub phase: Phase,
    pub at: DateTime<Utc>,
    pub who: String,
    pub source: Source,
    pub action: Action,
    /// The selection as an operator would write it (`--vendor netease --code 500`).
    pub filter: String,
    /// The same selection as JSON.
    #[serde(default)]
    pub filter_json: serde_json::Value,
    /// The jobs of a `jobs` record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobRef>,
    /// Which `jobs` record of the action this is, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<u32>,
    /// Set on the `finished` record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

/// An action being recorded: [`Trail::start`], [`Trail::took`] for each job, [`Trail::finish`].
pub struct Trail {
    publisher: Publisher,
    stream: String,
    record: Record,
    pending: Vec<JobRef>,
    parts: u32,
}

impl Trail {
    /// Records that `actor` starts `action` on the dead jobs `filter` selects.
    /// Fails, having done nothing, when the broker does not confirm the record.
    pub async fn start(
        conn: &Connection,
        names: &Names,
        actor: &Actor,
        action: Action,
        filter: String,
        filter_json: serde_json::Value,
    ) -> anyhow::Result<Self> {
        let publisher = Publisher::open(conn, CONFIRM_TIMEOUT).await?;
        let trail = Self {
            publisher,
            stream: names.audit(),
            record: Record {
                action_id: format!("{:016x}", rand::random::<u64>()),
                phase: Phase::Started,
                at: Utc::now(),
                who: actor.who.clone(),
                source: actor.source,
                action,
                filter,
                filter_json,
                jobs: Vec::new(),
                part: None,
                outcome: None,
            },
            pending: Vec::new(),
            parts: 0,
        };
        trail
            .write(trail.record.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}; nothing was done"))?;
        Ok(trail)
    }

    pub fn action_id(&self) -> &str {
        &self.record.action_id
    }

    /// Notes one job the action handled; every [`JOBS_PER_RECORD`] they are recorded.
    pub async fn took(&mut self, job: JobRef) -> anyhow::Result<()> {
        self.pending.push(job);
        if self.pending.len() >= JOBS_PER_RECORD {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.parts += 1;
        let record = Record {
            phase: Phase::Jobs,
            at: Utc::now(),
            jobs: std::mem::take(&mut self.pending),
            part: Some(self.parts),
            ..self.record.clone()
        };
        self.write(record).await
    }

    /// Records the jobs not recorded yet and how the action ended.
    pub async fn finish(mut self, outcome: Outcome) -> anyhow::Result<()> {
        let flushed = self.flush().await;
        let record = Record {
            phase: Phase::Finished,
            at: Utc::now(),
            outcome: Some(outcome),
            ..self.record.clone()
        };
        let written = self.write(record).await;
        self.publisher.close().await;
        flushed.and(written)
    }

    async fn write(&self, record: Record) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&record)?;
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_timestamp(record.at.timestamp().max(0) as u64)
            .with_app_id(ShortString::from("herald"));
        match self.publisher.publish("", &self.stream, &body, props).await {
            Ok(()) => Ok(()),
            Err(PublishError::Unroutable { .. }) => Err(anyhow::anyhow!(
                "cannot write the audit record: the audit stream `{}` does not exist (run `herald topology apply`)",
                self.stream
            )),
            Err(e) => Err(anyhow::anyhow!(
                "cannot write the audit record to `{}`: {e}",
                self.stream
            )),
        }
    }
}

/// The stream's arguments: `x-max-age` in whole seconds.
pub fn stream_args(max_age: Duration) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(format!("{}s", max_age.as_secs().max(1)).into()),
    );
    args
}

/// The newest `limit` records written at or after `since` (all of them without
/// it), oldest first. Reading removes nothing. A record herald cannot parse is skipped.
pub async fn read(
    conn: &Connection,
    names: &Names,
    since: Option<DateTime<Utc>>,
    limit: usize,
) -> anyhow::Result<Vec<Record>> {
    let stream = names.audit();
    let channel = conn.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    let offset = match since {
        Some(t) => AMQPValue::Timestamp(t.timestamp().max(0) as u64),
        None => AMQPValue::LongString("first".into()),
    };
    args.insert("x-stream-offset".into(), offset);
    let mut consumer = channel
        .basic_consume(
            stream.as_str().into(),
            "herald-audit-reader".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the audit stream `{stream}` (run `herald topology apply` first?): {e}"
            )
        })?;
    let mut records = VecDeque::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(READ_IDLE, consumer.next()).await {
        let delivery = delivery?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        if delivery.data.len() > MAX_RECORD_BYTES {
            continue;
        }
        let Ok(record) = serde_json::from_slice::<Record>(&delivery.data) else {
            continue;
        };
        // A timestamp offset starts at the chunk holding it: earlier records may come first.
        if since.is_some_and(|t| record.at < t) {
            continue;
        }
        records.push_back(record);
        if records.len() > limit {
            records.pop_front();
        }
    }
    let _ = channel.close(200, "audit read".into()).await;
    Ok(records.into())
}

/// The table `herald dlq audit` prints: one line per record.
pub fn table(records: &[Record]) -> String {
    let mut out = String::from(
        "AT (UTC)             ACTION   PHASE     WHO              SOURCE   ACTION ID         DETAIL\n",
    );
    for r in records {
        let detail = match (r.phase, &r.outcome) {
            (Phase::Started, _) => r.filter.clone(),
            (Phase::Jobs, _) => {
                let ids: Vec<&str> = r
                    .jobs
                    .iter()
                    .map(|j| j.id.as_deref().unwrap_or("-"))
                    .collect();
                format!("part {}: {}", r.part.unwrap_or(0), ids.join(" "))
            }
            (Phase::Finished, Some(o)) => {
                let mut text = format!("done {}", o.done);
                if o.skipped > 0 {
                    text.push_str(&format!(", skipped {}", o.skipped));
                }
                if o.unfound > 0 {
                    text.push_str(&format!(", unfound {}", o.unfound));
                }
                if o.warning.is_some() {
                    text.push_str(", incomplete pass");
                }
                if let Some(e) = &o.error {
                    text.push_str(&format!(", error: {e}"));
                }
                text
            }
            (Phase::Finished, None) => String::new(),
        };
        let source = match r.source {
            Source::Cli => "cli",
            Source::Console => "console",
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:<9} {:<16} {:<8} {:<17} {}\n",
            r.at.format("%Y-%m-%d %H:%M:%S"),
            r.action.as_str(),
            format!("{:?}", r.phase).to_lowercase(),
            r.who,
            source,
            r.action_id,
            detail
        ));
    }
    out.push_str(&format!("{} record(s)\n", records.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_user_is_named_by_passwd_when_the_environment_says_nothing() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\n# note\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(passwd_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(passwd_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(passwd_name(passwd, 7), None);
        assert_eq!(bounded_name("a\u{1b}[31mb".into()), "a[31mb");
        assert_eq!(bounded_name("x".repeat(100)).len(), 64);
        assert_eq!(Actor::console("oncall").source, Source::Console);
    }

    #[test]
    fn records_round_trip_and_the_table_shows_each_phase() {
        let base = Record {
            action_id: "a1".into(),
            phase: Phase::Started,
            at: Utc::now(),
            who: "alice".into(),
            source: Source::Cli,
            action: Action::Purge,
            filter: "--reason invalid".into(),
            filter_json: serde_json::json!({"reason": "invalid"}),
            jobs: Vec::new(),
            part: None,
            outcome: None,
        };
        let jobs = Record {
            phase: Phase::Jobs,
            part: Some(1),
            jobs: vec![JobRef {
                id: Some("o-1".into()),
                fingerprint: "f".repeat(64),
            }],
            ..base.clone()
        };
        let done = Record {
            phase: Phase::Finished,
            outcome: Some(Outcome {
                done: 1,
                unfound: 2,
                ..Outcome::default()
            }),
            ..base.clone()
        };
        for r in [&base, &jobs, &done] {
            let back: Record = serde_json::from_slice(&serde_json::to_vec(r).unwrap()).unwrap();
            assert_eq!(&back, r);
        }
        let table = table(&[base, jobs, done]);
        assert!(table.contains("--reason invalid"), "{table}");
        assert!(table.contains("part 1: o-1"), "{table}");
        assert!(table.contains("done 1, unfound 2"), "{table}");
        assert!(table.contains("3 record(s)"), "{table}");
    }
}
