//! The DLQ's reader lock: one pass over the DLQ at a time, across processes and nodes.
//!
//! A pass holds messages unacked, so two at once would each see part of the
//! DLQ. The lock is the one exclusive consumer of `{p}.dlq.reader` (a
//! transient, auto-delete classic queue): the broker grants it to one channel
//! at a time, on any connection, and drops it when that channel or connection
//! closes, so a reader that dies frees it. An exclusive *queue* would not do:
//! it belongs to a connection, and two passes sharing one connection (the
//! console) would both hold it.

use std::time::Duration;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use tokio::time::Instant;
use tracing::info;

use crate::topology::Names;

/// How long a pass waits for another reader to finish before it gives up.
pub const READER_WAIT: Duration = Duration::from_secs(60);
/// Longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Held while a pass reads the DLQ; dropping it (or its connection) releases it.
pub struct ReaderLock {
    channel: Channel,
    _consumer: Consumer,
}

impl ReaderLock {
    /// Takes the lock, waiting up to `wait` for another reader to release it.
    pub async fn acquire(conn: &Connection, names: &Names, wait: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(50);
        let mut said = false;
        loop {
            if let Some(lock) = Self::try_take(conn, names).await? {
                return Ok(lock);
            }
            if !said {
                info!(dlq = %names.dlq(), "another reader holds the DLQ; waiting for it");
                said = true;
            }
            let now = Instant::now();
            if now >= deadline {
                anyhow::bail!(
                    "another herald dlq command or console is reading the DLQ `{}`; waited {} s for it to finish. \
                     Nothing was read: run this again when it is done",
                    names.dlq(),
                    wait.as_secs()
                );
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// One try, on a channel of its own (a refusal closes it): `None` while another holds the lock.
    async fn try_take(conn: &Connection, names: &Names) -> anyhow::Result<Option<Self>> {
        let queue = names.dlq_reader();
        let channel = conn.create_channel().await?;
        let mut args = FieldTable::default();
        // Explicit: a vhost whose default queue type is quorum would refuse auto-delete.
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        let options = QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue.as_str().into(), options, args)
            .await
        {
            // Held: known without a refused consume, which lapin would log as an error.
            Ok(declared) if declared.consumer_count() > 0 => {
                let _ = channel.close(200, "dlq reader lock held".into()).await;
                return Ok(None);
            }
            Ok(_) => {}
            Err(e) if is_busy(&e) => return Ok(None),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot declare the DLQ reader lock `{queue}`: {e}"
                ));
            }
        }
        let exclusive = BasicConsumeOptions {
            exclusive: true,
            no_ack: true,
            ..Default::default()
        };
        match channel
            .basic_consume(
                queue.as_str().into(),
                "herald-dlq-reader".into(),
                exclusive,
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => Ok(Some(Self {
                channel,
                _consumer: consumer,
            })),
            Err(e) if is_busy(&e) => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "cannot take the DLQ reader lock `{queue}`: {e}"
            )),
        }
    }

    /// Releases the lock for the next reader.
    pub async fn release(self) {
        let _ = self.channel.close(200, "dlq read done".into()).await;
    }
}

/// Another reader holds the lock (403 exclusive use), or its queue was just
/// auto-deleted as the holder left (404): try again.
fn is_busy(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("ACCESS_REFUSED")
        || text.contains("NOT_FOUND")
        || text.contains("RESOURCE_LOCKED")
}
