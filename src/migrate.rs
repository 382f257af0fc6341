//! `herald dlq migrate`: moves a DLQ declared by an earlier herald (without a
//! delivery limit, see [`DlqLayout::Legacy`]) or with other retention than
//! `[dlq]` configures ([`DlqLayout::OtherRetention`]) to the configured
//! declaration, without losing a dead job and with their order kept (a new,
//! smaller `max_jobs` drops the oldest as they move back; `max_age` counts
//! again from the move).
//!
//! A queue's arguments cannot change, so the DLQ is emptied into a holding
//! queue, deleted, declared again and refilled:
//!
//! 1. `{p}.dlq.migrating` is declared and bound to the dead exchange, and the
//!    old DLQ is unbound: jobs that die meanwhile land in the holding queue.
//! 2. Every dead job moves there (a confirmed copy, then an ack of the original).
//! 3. The empty old DLQ is deleted (only if empty) and declared anew.
//! 4. The holding queue is unbound, its jobs move back, and it is deleted.
//!
//! Each step is safe to repeat: a run that stops anywhere is finished by the
//! next one. Workers may keep running: a worker session never binds a DLQ
//! with the legacy declaration (its own binding is durable), and one that
//! starts after step 3 declares the new DLQ exactly as step 3 does. A job that
//! dies between steps 3 and 4 is copied into both queues, and so appears twice
//! in the DLQ; none is lost.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tracing::info;

use crate::broker::{Publisher, queue_depth};
use crate::config::Retention;
use crate::dlq::{READER_WAIT, ReaderLock};
use crate::envelope::copy_for_move;
use crate::topology::{DlqLayout, Names, bind, declare_dlq, declare_queue, dlq_args};

/// What a migration did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    /// The DLQ had the legacy declaration, or other retention, when the run started.
    pub was_legacy: bool,
    /// Dead jobs moved out of the old DLQ, and back into the new one.
    pub moved_out: usize,
    pub moved_back: usize,
}

/// Moves at most this many jobs per round of confirms.
const BATCH: u16 = 500;

pub async fn migrate(
    conn: &Connection,
    names: &Names,
    retention: Retention,
) -> anyhow::Result<Migrated> {
    // No `herald dlq` pass may hold dead jobs while the DLQ is emptied and deleted.
    let lock = ReaderLock::acquire(conn, names, READER_WAIT).await?;
    let publisher = Publisher::open(conn, Duration::from_secs(60)).await?;
    let channel = conn.create_channel().await?;
    let (dlq, hold, dead) = (names.dlq(), names.dlq_migrating(), names.dead());
    let mut migrated = Migrated::default();
    if declare_dlq(conn, names, retention).await? != DlqLayout::Current {
        migrated.was_legacy = true;
        declare_queue(&channel, &hold, dlq_args(Retention::default())).await?;
        bind(&channel, &hold, &dead, "", FieldTable::default()).await?;
        unbind(&channel, &dlq, &dead).await?;
        migrated.moved_out = move_all(conn, &publisher, &dlq, &hold).await?;
        if declare_dlq(conn, names, retention).await? != DlqLayout::Current {
            anyhow::bail!(
                "the DLQ `{dlq}` still has another declaration than configured after it was deleted"
            );
        }
    }
    if exists(conn, &hold).await? {
        unbind(&channel, &hold, &dead).await?;
        migrated.moved_back = move_all(conn, &publisher, &hold, &dlq).await?;
    }
    let _ = channel.close(200, "migrated".into()).await;
    publisher.close().await;
    lock.release().await;
    Ok(migrated)
}

/// Deletes `queue`, which nothing routes to any more, once it is empty
/// (quorum queues take no `if-empty` flag; nothing can arrive after the check).
async fn delete_empty(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    let left = queue_depth(channel, queue).await?;
    if left > 0 {
        anyhow::bail!(
            "`{queue}` still holds {left} message(s); nothing was deleted, run the migration again"
        );
    }
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}

async fn unbind(channel: &Channel, queue: &str, exchange: &str) -> anyhow::Result<()> {
    channel
        .queue_unbind(
            queue.into(),
            exchange.into(),
            "".into(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The queue exists (a passive declare on its own channel, which a 404 closes).
async fn exists(conn: &Connection, queue: &str) -> anyhow::Result<bool> {
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Moves every message of `from` (which nothing publishes to any more) to
/// `to`, in order: a batch is copied with confirms, then acked; then deletes
/// the empty `from`. Its consumer is exclusive and held through the delete:
/// a second migration, or a `dlq` reader, cannot hold messages the depth
/// check does not see (unacked ones) when the queue goes.
async fn move_all(
    conn: &Connection,
    publisher: &Publisher,
    from: &str,
    to: &str,
) -> anyhow::Result<usize> {
    let channel = conn.create_channel().await?;
    channel.basic_qos(BATCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            from.into(),
            "herald-dlq-migrate".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot be the only reader of `{from}` ({e}): another `herald dlq` command or migration is reading it; run this again when it is done"
            )
        })?;
    let mut moved = 0;
    loop {
        let mut batch = Vec::new();
        // Take what is ready now, waiting a little for the first of a batch.
        while batch.len() < usize::from(BATCH) {
            let wait = Duration::from_millis(if batch.is_empty() { 500 } else { 20 });
            match tokio::time::timeout(wait, consumer.next()).await {
                Ok(Some(delivery)) => batch.push(delivery?),
                Ok(None) => anyhow::bail!("the broker cancelled the consumer on `{from}`"),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if queue_depth(&channel, from).await? == 0 {
                break;
            }
            continue;
        }
        let copies = batch
            .iter()
            .map(|d| publisher.publish("", to, &d.data, copy_for_move(&d.properties)));
        for (result, delivery) in join_all(copies).await.into_iter().zip(&batch) {
            result.map_err(|e| anyhow::anyhow!("copying a dead job to `{to}`: {e}"))?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        moved += batch.len();
        info!(from, to, moved, "moving dead jobs");
    }
    delete_empty(&channel, from).await?;
    let _ = channel.close(200, "moved".into()).await;
    Ok(moved)
}
