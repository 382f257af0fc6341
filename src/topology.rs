//! The RabbitMQ topology: exchanges, lanes, retry tiers and the dead-letter queue.
//!
//! Declared idempotently at start-up and by `herald topology apply`. Every name
//! starts with the configured prefix, so several herald installations (and every
//! test) can share one broker.
//!
//! ```text
//! producers ─▶ {p}.jobs (topic, alternate exchange {p}.dead)
//!                 └─ vendor.account ─▶ {p}.lane.vendor.account (quorum) ─▶ worker
//! worker ─▶ {p}.retry (headers, herald-tier) ─▶ {p}.retry.<tier> (quorum, TTL)
//!                 └─ expires, dead-letters with its routing key ─▶ {p}.jobs
//! worker / delivery limit / unroutable ─▶ {p}.dead (fanout) ─▶ {p}.dlq (quorum)
//! worker ─▶ {p}.ban.vendor.account (quorum, one message: a vendor ban in force)
//! dlq replay / purge / edit / import, console ─▶ {p}.audit (stream, x-max-age)
//! ```

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use tracing::warn;

use crate::config::{Config, DlqConfig, Retention};

/// Header that selects a retry tier on the `{p}.retry` exchange.
///
/// Not `x-herald-tier`: a headers exchange ignores binding arguments that start
/// with `x-` when matching, so every tier would match every retry and the job
/// would be copied into all of them.
pub const TIER_HEADER: &str = "herald-tier";

/// Names derived from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where producers publish jobs.
    pub fn jobs(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// The DLQ's reader lock: whoever holds its one exclusive consumer reads the DLQ ([`crate::dlq`]).
    pub fn dlq_reader(&self) -> String {
        format!("{}.dlq.reader", self.prefix)
    }

    /// The audit stream ([`crate::audit`]).
    pub fn audit(&self) -> String {
        format!("{}.audit", self.prefix)
    }

    /// Holds the dead jobs while `herald dlq migrate` redeclares the DLQ.
    pub fn dlq_migrating(&self) -> String {
        format!("{}.dlq.migrating", self.prefix)
    }

    pub fn lane(&self, vendor: &str, account: &str) -> String {
        format!("{}.lane.{vendor}.{account}", self.prefix)
    }

    /// Where a rate-limited lane's active replica writes the end of a vendor ban ([`crate::ban`]).
    pub fn ban_board(&self, vendor: &str, account: &str) -> String {
        format!("{}.ban.{vendor}.{account}", self.prefix)
    }

    pub fn retry_queue(&self, tier: Duration) -> String {
        format!("{}.retry.{}", self.prefix, tier_name(tier))
    }
}

/// The value of the tier header for a delay: `1s`, `2m`, `250ms`.
pub fn tier_name(tier: Duration) -> String {
    humantime::format_duration(tier)
        .to_string()
        .replace(' ', "")
}

/// One lane to declare.
#[derive(Debug, Clone)]
pub struct LaneSpec {
    pub vendor: String,
    pub account: String,
    /// Rate-limited lanes let one consumer at a time receive (single active consumer).
    pub single_active: bool,
}

/// The DLQ's delivery limit: never reached, and stated, because RabbitMQ 4.x
/// gives a quorum queue without one a limit of 20. Every read of the DLQ
/// (`herald dlq stats`, `list`, `show`) holds its messages unacked and hands
/// them back, and 4.x counts each return as a delivery: without this, the
/// 21st read would drop every dead job. Not `-1`, which 4.x takes as
/// "unlimited" but RabbitMQ 3.x as a limit every message has already passed.
pub const DLQ_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// How the DLQ on the broker is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqLayout {
    /// With [`DLQ_DELIVERY_LIMIT`]: reading it never drops a job.
    Current,
    /// By an earlier herald, without a delivery limit: on RabbitMQ 4.x every
    /// read counts toward the default limit of 20. `herald dlq migrate` moves
    /// it to the current declaration.
    Legacy,
    /// With the delivery limit but other retention than `[dlq]` configures: it
    /// keeps its declared retention until `herald dlq migrate` redeclares it.
    OtherRetention,
}

/// What herald says of a DLQ whose retention is not the configured one.
pub fn other_retention_warning(names: &Names) -> String {
    format!(
        "the DLQ `{}` is declared with other retention than [dlq] max_age / max_jobs configure, \
         and keeps its declared retention: run `herald dlq migrate` to redeclare it as configured",
        names.dlq()
    )
}

/// What `herald dlq` commands say when the DLQ has the legacy declaration.
pub fn legacy_dlq_error(names: &Names) -> anyhow::Error {
    anyhow::anyhow!(
        "the DLQ `{}` was declared by an earlier herald without a delivery limit: on RabbitMQ 4.x \
         every read counts as a delivery, and the broker drops a dead job after its 20th read. \
         Nothing was read. Run `herald dlq migrate` once (it moves the dead jobs to a redeclared \
         DLQ and is safe to run again), then read it",
        names.dlq()
    )
}

/// The DLQ's arguments: the delivery limit and `retention`. A DLQ at
/// `max_jobs` drops its oldest job for a new one (`drop-head`): refusing the
/// new one would make the lane redeliver it and send it to the vendor again.
pub fn dlq_args(retention: Retention) -> FieldTable {
    let mut args = quorum();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DLQ_DELIVERY_LIMIT),
    );
    if let Some(ms) = retention.max_age_ms {
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
    }
    if let Some(n) = retention.max_jobs {
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(n as i64));
        args.insert("x-overflow".into(), long("drop-head"));
    }
    args
}

/// Declares the DLQ with `retention` and binds it to the dead exchange. A DLQ
/// declared otherwise is left as it is, bindings included (the herald that
/// declared it bound it; `herald dlq migrate` unbinds it on purpose), and
/// reported: [`DlqLayout::Legacy`] or [`DlqLayout::OtherRetention`].
pub async fn declare_dlq(
    conn: &Connection,
    names: &Names,
    retention: Retention,
) -> anyhow::Result<DlqLayout> {
    let channel = conn.create_channel().await?;
    let queue = names.dlq();
    match try_declare(conn, &queue, dlq_args(retention)).await? {
        true => note_not_legacy(&queue),
        false => return other_layout(conn, &queue).await,
    }
    bind(&channel, &queue, &names.dead(), "", FieldTable::default()).await?;
    let _ = channel.close(200, "dlq declared".into()).await;
    Ok(DlqLayout::Current)
}

/// How an existing DLQ is declared, against `retention`; creates and binds nothing.
pub async fn dlq_layout(
    conn: &Connection,
    names: &Names,
    retention: Retention,
) -> anyhow::Result<DlqLayout> {
    let queue = names.dlq();
    let channel = conn.create_channel().await?;
    crate::broker::queue_status(&channel, &queue)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the DLQ `{queue}` (run `herald topology apply` first?): {e}"
            )
        })?;
    let _ = channel.close(200, "dlq checked".into()).await;
    if try_declare(conn, &queue, dlq_args(retention)).await? {
        note_not_legacy(&queue);
        Ok(DlqLayout::Current)
    } else {
        other_layout(conn, &queue).await
    }
}

/// A DLQ that refused the configured declaration: the legacy one, or other retention.
async fn other_layout(conn: &Connection, queue: &str) -> anyhow::Result<DlqLayout> {
    Ok(if try_declare(conn, queue, quorum()).await? {
        DlqLayout::Legacy
    } else {
        note_not_legacy(queue);
        DlqLayout::OtherRetention
    })
}

/// DLQs this process found not to have the legacy declaration. A queue's
/// arguments cannot change while it exists, so a pass need not probe again:
/// each probe that a queue refuses closes a channel, which lapin logs as an error.
static NOT_LEGACY: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

pub(crate) fn note_not_legacy(queue: &str) {
    let mut known = NOT_LEGACY.lock().unwrap_or_else(|e| e.into_inner());
    known.insert(queue.to_string());
}

pub(crate) fn known_not_legacy(queue: &str) -> bool {
    let known = NOT_LEGACY.lock().unwrap_or_else(|e| e.into_inner());
    known.contains(queue)
}

/// Declares `queue` with `args` on a channel of its own (a refusal closes it):
/// false when the queue exists with other arguments.
pub(crate) async fn try_declare(
    conn: &Connection,
    queue: &str,
    args: FieldTable,
) -> anyhow::Result<bool> {
    let channel = conn.create_channel().await?;
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match channel.queue_declare(queue.into(), options, args).await {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(true)
        }
        Err(e) if is_precondition_failed(&e) => Ok(false),
        Err(e) => Err(mismatch_hint("queue", queue, e)),
    }
}

/// Declares the audit stream. One declared with another `x-max-age` keeps it
/// (a stream's retention can change by policy, not by redeclaring): reported, not fatal.
pub async fn declare_audit(
    conn: &Connection,
    names: &Names,
    max_age: Duration,
) -> anyhow::Result<()> {
    let stream = names.audit();
    if !try_declare(conn, &stream, crate::audit::stream_args(max_age)).await? {
        warn!(
            stream = %stream,
            "the audit stream is declared with another x-max-age than dlq.audit_max_age and keeps it; \
             change it with a policy (`max-age`) or delete the stream"
        );
    }
    Ok(())
}

/// The broker refused a declaration because the existing one differs.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("PRECONDITION_FAILED") || text.contains("inequivalent")
}

/// Everything `declare` creates.
#[derive(Debug, Clone)]
pub struct Topology {
    pub names: Names,
    pub lanes: Vec<LaneSpec>,
    pub tiers: Vec<Duration>,
    pub delivery_limit: u32,
    /// The DLQ's retention and the audit stream's.
    pub dlq: DlqConfig,
}

impl Topology {
    pub fn from_config(config: &Config) -> Self {
        Self {
            names: Names::new(&config.broker.prefix),
            lanes: config
                .accounts
                .iter()
                .map(|a| LaneSpec {
                    vendor: a.vendor.clone(),
                    account: a.name.clone(),
                    single_active: a.rate_limit.is_some(),
                })
                .collect(),
            tiers: config.all_tiers(),
            delivery_limit: config.worker.delivery_limit,
            dlq: config.dlq.clone(),
        }
    }

    /// Declares every exchange, queue and binding; safe to run any number of times.
    /// Says how the DLQ is declared ([`DlqLayout::Legacy`] needs `herald dlq migrate`).
    pub async fn declare(&self, conn: &Connection) -> anyhow::Result<DlqLayout> {
        let channel = conn.create_channel().await?;
        self.declare_exchanges(&channel).await?;
        let layout = declare_dlq(conn, &self.names, self.dlq.retention()).await?;
        if layout == DlqLayout::OtherRetention {
            warn!("{}", other_retention_warning(&self.names));
        }
        declare_audit(conn, &self.names, self.dlq.audit_max_age).await?;
        self.declare_lanes_and_tiers(&channel).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(layout)
    }

    async fn declare_exchanges(&self, channel: &Channel) -> anyhow::Result<()> {
        let n = &self.names;
        declare_exchange(
            channel,
            &n.dead(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        )
        .await?;
        let mut jobs_args = FieldTable::default();
        jobs_args.insert("alternate-exchange".into(), long(&n.dead()));
        declare_exchange(channel, &n.jobs(), ExchangeKind::Topic, jobs_args).await?;
        declare_exchange(
            channel,
            &n.retry_exchange(),
            ExchangeKind::Headers,
            FieldTable::default(),
        )
        .await?;

        Ok(())
    }

    async fn declare_lanes_and_tiers(&self, channel: &Channel) -> anyhow::Result<()> {
        let n = &self.names;
        for lane in &self.lanes {
            let mut args = quorum();
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(self.delivery_limit.into()),
            );
            args.insert("x-dead-letter-exchange".into(), long(&n.dead()));
            at_least_once(&mut args);
            if lane.single_active {
                args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            }
            let queue = n.lane(&lane.vendor, &lane.account);
            declare_queue(channel, &queue, args).await?;
            let key = format!("{}.{}", lane.vendor, lane.account);
            bind(channel, &queue, &n.jobs(), &key, FieldTable::default()).await?;
            if lane.single_active {
                let board = n.ban_board(&lane.vendor, &lane.account);
                declare_queue(channel, &board, crate::ban::board_arguments()).await?;
            }
        }

        for tier in &self.tiers {
            let mut args = quorum();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(tier.as_millis() as i64),
            );
            args.insert("x-dead-letter-exchange".into(), long(&n.jobs()));
            at_least_once(&mut args);
            let queue = n.retry_queue(*tier);
            declare_queue(channel, &queue, args).await?;
            let mut match_args = FieldTable::default();
            match_args.insert("x-match".into(), long("all"));
            match_args.insert(TIER_HEADER.into(), long(&tier_name(*tier)));
            bind(channel, &queue, &n.retry_exchange(), "", match_args).await?;
        }
        Ok(())
    }

    /// Deletes everything `declare` creates, messages included (tests, `topology delete`).
    pub async fn delete(&self, channel: &Channel) -> anyhow::Result<()> {
        let n = &self.names;
        let mut queues = vec![n.dlq(), n.dlq_migrating(), n.dlq_reader(), n.audit()];
        queues.extend(self.lanes.iter().map(|l| n.lane(&l.vendor, &l.account)));
        queues.extend(
            self.lanes
                .iter()
                .filter(|l| l.single_active)
                .map(|l| n.ban_board(&l.vendor, &l.account)),
        );
        queues.extend(self.tiers.iter().map(|t| n.retry_queue(*t)));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [n.jobs(), n.retry_exchange(), n.dead()] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub(crate) fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args
}

/// Dead-letter without losing messages: the broker keeps them until the target confirms.
fn at_least_once(args: &mut FieldTable) {
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
}

async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    args: FieldTable,
) -> anyhow::Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, args)
        .await
        .map_err(|e| mismatch_hint("exchange", name, e))
}

pub(crate) async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
) -> anyhow::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.into(), options, args)
        .await
        .map(|_| ())
        .map_err(|e| mismatch_hint("queue", name, e))
}

pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    args: FieldTable,
) -> anyhow::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            ShortString::from(key),
            QueueBindOptions::default(),
            args,
        )
        .await?;
    Ok(())
}

fn mismatch_hint(what: &str, name: &str, err: lapin::Error) -> anyhow::Error {
    let text = err.to_string();
    if is_precondition_failed(&err) {
        anyhow::anyhow!(
            "{what} `{name}` already exists with different arguments ({text}); \
             it was declared by another herald version or config (e.g. rate_limit added or removed). \
             Drain and delete it, or use another broker.prefix"
        )
    } else {
        anyhow::anyhow!("declaring {what} `{name}`: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("herald");
        assert_eq!(n.jobs(), "herald.jobs");
        assert_eq!(n.lane("netease", "default"), "herald.lane.netease.default");
        assert_eq!(n.retry_queue(Duration::from_secs(120)), "herald.retry.2m");
        assert_eq!(n.dlq(), "herald.dlq");
    }

    #[test]
    fn the_longest_names_herald_derives_fit_an_amqp_short_string() {
        use crate::config::{MAX_ACCOUNT_NAME_LEN, MAX_PREFIX_BYTES};
        let n = Names::new("p".repeat(MAX_PREFIX_BYTES));
        let vendor = crate::vendor::VENDORS
            .iter()
            .map(|s| s.id)
            .max_by_key(|id| id.len());
        let account = "a".repeat(MAX_ACCOUNT_NAME_LEN);
        let longest_tier = Duration::new(u64::MAX, 999_999_999);
        for name in [
            n.jobs(),
            n.retry_exchange(),
            n.dead(),
            n.dlq(),
            n.dlq_reader(),
            n.audit(),
            n.lane(vendor.unwrap(), &account),
            n.retry_queue(longest_tier),
        ] {
            assert!(name.len() <= 255, "{} bytes: {name}", name.len());
        }
    }

    #[test]
    fn tier_names_are_compact() {
        assert_eq!(tier_name(Duration::from_millis(250)), "250ms");
        assert_eq!(tier_name(Duration::from_secs(3600)), "1h");
        assert_eq!(tier_name(Duration::from_secs(90)), "1m30s");
    }
}
