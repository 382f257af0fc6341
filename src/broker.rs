//! RabbitMQ plumbing: connecting, publishing with confirms, reading headers.
//!
//! Every publish herald makes on a job's behalf (retry copy, dead-letter copy,
//! enqueue, replay) goes through [`Publisher`], which waits for the broker's
//! confirm and treats an unroutable return as a failure. Only after that does
//! the lane ack the original delivery.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::config::BrokerUrl;

/// Opens a connection, with an error that says what to check.
pub async fn connect(url: &BrokerUrl, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url.expose(), properties),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        // lapin quotes the URL it could not use ("Invalid URL: '…'"), password and all.
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot connect to RabbitMQ at {url}: {} (is it running? `scripts/ensure-rabbitmq.sh` starts a local one)",
            url.scrub(&e.to_string())
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot connect to RabbitMQ at {url}: no answer within 10 s"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for exchange `{exchange}` with routing key `{routing_key}`")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{what} is {len} bytes; AMQP allows at most 255")]
    TooLong { what: &'static str, len: usize },
}

/// `value` as an AMQP short string, or an error instead of lapin's panic: a
/// routing key read back from a header (a DLQ replay) can be any length.
fn short_string(what: &'static str, value: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(value).map_err(|_| PublishError::TooLong {
        what,
        len: value.len(),
    })
}

/// A channel in confirm mode; cheap to share between tasks.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
}

impl Publisher {
    pub async fn open(conn: &Connection, confirm_timeout: Duration) -> anyhow::Result<Self> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            confirm_timeout,
        })
    }

    /// Closes the channel; call before closing the connection to avoid a close race.
    pub async fn close(self) {
        let _ = self.channel.close(200, "publisher done".into()).await;
    }

    /// Publishes one persistent message and waits until the broker has it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let exchange_name = short_string("exchange name", exchange)?;
        let routing_key_name = short_string("routing key", routing_key)?;
        let confirm = async {
            self.channel
                .basic_publish(
                    exchange_name,
                    routing_key_name,
                    options,
                    body,
                    properties.with_delivery_mode(2),
                )
                .await?
                .await
        };
        match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Err(_) => Err(PublishError::Timeout(self.confirm_timeout)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(PublishError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// The current session's publisher, for routes that outlive sessions (the
/// Tencent callback, HTTP enqueue): present while the worker is connected.
#[derive(Default)]
pub struct PublisherSlot(std::sync::RwLock<Option<Publisher>>);

impl PublisherSlot {
    pub fn set(&self, publisher: Option<Publisher>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = publisher;
    }

    pub fn get(&self) -> Option<Publisher> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Messages ready in `queue` now (a passive declare: it fails if the queue does not exist).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    Ok(queue_status(channel, queue).await?.0)
}

/// Messages ready in `queue` and consumers on it now. Messages other
/// consumers hold unacked are in neither count; AMQP does not report them.
pub async fn queue_status(channel: &Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok((declared.message_count(), declared.consumer_count()))
}

/// Typed access to AMQP headers.
pub fn header<'a>(properties: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(key)))
}

pub fn header_str(properties: &BasicProperties, key: &str) -> Option<String> {
    match header(properties, key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => value_u64(other).map(|n| n.to_string()),
    }
}

pub fn header_u64(properties: &BasicProperties, key: &str) -> Option<u64> {
    match header(properties, key)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
        other => value_u64(other),
    }
}

fn value_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// Sets a string header.
pub fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
}

/// Sets an integer header.
pub fn set_int(headers: &mut FieldTable, key: &str, value: u64) {
    headers.insert(
        key.into(),
        AMQPValue::LongLongInt(value.min(i64::MAX as u64) as i64),
    );
}

/// The `x-death` reason the broker gave when it dead-lettered this message, if any.
pub fn death_reason(properties: &BasicProperties) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = header(properties, "x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get(&ShortString::from("reason"))? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routing_key_over_255_bytes_is_a_publish_error_not_a_panic() {
        let err = short_string("routing key", &"k".repeat(256)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "routing key is 256 bytes; AMQP allows at most 255"
        );
        assert!(short_string("routing key", &"k".repeat(255)).is_ok());
    }
}
