//! A vendor ban that outlives the replica that met it.
//!
//! The vendor bans the account, not the process: when the active replica of a
//! rate-limited lane is paused by a ban and then stops (SIGTERM, `kill -9`, a
//! lost connection), the standby that takes the lane over must not send into
//! the rest of that ban. So the replica that meets a ban writes its end on the
//! lane's ban board, `{prefix}.ban.<vendor>.<account>`: a quorum queue (so it
//! survives a cluster node, as the lane does) holding at most one message (the
//! newest), which the broker drops when the ban is over (per-message TTL). A
//! replica that becomes active reads the board and pauses until the ban's end.
//! The end is wall-clock time, so replicas' clocks must agree (NTP); the ban's
//! jitter (up to 10%) covers small skew.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};

use crate::broker::{PublishError, Publisher};
use crate::envelope;

/// Header carrying the ban's end, in Unix milliseconds.
pub const UNTIL_HEADER: &str = "x-herald-ban-until";

/// Arguments of a ban board: one message at most, the newest kept. Each read
/// returns the message (a delivery RabbitMQ 4.x counts, 20 by default before
/// it drops it); a ban lasts seconds and a takeover reads twice.
pub fn board_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1000));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("drop-head")),
    );
    args
}

/// How long a replica that reads `until_ms` at `now_ms` still has to wait; `None` when it is over.
pub fn remaining(until_ms: u64, now_ms: u64) -> Option<Duration> {
    (until_ms > now_ms).then(|| Duration::from_millis(until_ms - now_ms))
}

pub fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

/// Writes a ban lasting `duration` from now on `board` (confirmed).
pub async fn announce(
    publisher: &Publisher,
    board: &str,
    duration: Duration,
) -> Result<(), PublishError> {
    let until = now_ms() + duration.as_millis() as u64;
    let mut headers = FieldTable::default();
    envelope::set_int(&mut headers, UNTIL_HEADER, until);
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_expiration(ShortString::from(duration.as_millis().max(1).to_string()));
    publisher.publish("", board, b"", properties).await
}

/// The end of the ban on `board`, if one is in force (the message stays for the next reader).
pub async fn read(channel: &Channel, board: &str) -> Result<Option<u64>, lapin::Error> {
    let Some(message) = channel
        .basic_get(board.into(), BasicGetOptions { no_ack: false })
        .await?
    else {
        return Ok(None);
    };
    let delivery = message.delivery;
    let until = envelope::header_u64(&delivery.properties, UNTIL_HEADER);
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await?;
    Ok(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_read_after_its_end_is_over() {
        assert_eq!(remaining(10_000, 7_500), Some(Duration::from_millis(2_500)));
        assert_eq!(remaining(10_000, 10_000), None);
        assert_eq!(remaining(10_000, 12_000), None);
    }
}
