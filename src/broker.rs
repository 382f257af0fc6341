//! RabbitMQ plumbing: connecting, publishing with confirms, reading queue depths.
//!
//! Every publish herald makes on a job's behalf (retry copy, dead-letter copy,
//! enqueue, replay) goes through [`Publisher`], which waits for the broker's
//! confirm and treats an unroutable return as a failure. Only after that does
//! the lane ack the original delivery.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tracing::{debug, info, warn};

use crate::config::{BrokerUrl, BrokerUrls};

/// Longest wait for one node to accept a connection before the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection to the first node of `urls` that answers, in their order.
pub async fn connect(urls: &BrokerUrls, name: &str) -> anyhow::Result<Connection> {
    Ok(Nodes::new(urls.clone()).connect(name).await?.0)
}

/// The nodes of `broker.url` and where the next connection attempt starts: after
/// the node tried last. A worker connects again only when it lost its
/// connection, so the node it lost is tried last, not first.
pub struct Nodes {
    urls: BrokerUrls,
    next: AtomicUsize,
    heartbeat: Option<Duration>,
}

impl Nodes {
    pub fn new(urls: BrokerUrls) -> Self {
        Self {
            urls,
            next: AtomicUsize::new(0),
            heartbeat: None,
        }
    }

    /// Asks for this heartbeat timeout (whole seconds) instead of the broker's;
    /// a connection's `configuration().heartbeat()` is the one agreed.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// Connects to the first node that answers, each given [`CONNECT_TIMEOUT`]:
    /// the connection and the node, or an error naming every node and what it said.
    pub async fn connect(&self, name: &str) -> anyhow::Result<(Connection, BrokerUrl)> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        self.first_answer(|url| connect_node(url, properties.clone(), self.heartbeat))
            .await
    }

    /// One round over the nodes with `attempt`, starting at `next`.
    async fn first_answer<T, F, Fut>(&self, mut attempt: F) -> anyhow::Result<(T, BrokerUrl)>
    where
        F: FnMut(BrokerUrl) -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let nodes = self.urls.nodes();
        let several = nodes.len() > 1;
        let mut failures = Vec::new();
        for i in round(nodes.len(), self.next.load(Ordering::Relaxed)) {
            let node = &nodes[i];
            self.next.store((i + 1) % nodes.len(), Ordering::Relaxed);
            match attempt(node.clone()).await {
                Ok(answer) => {
                    // With one node there is nothing to choose, nothing worth a line.
                    if several {
                        info!(node = %node, "connected to RabbitMQ");
                    } else {
                        debug!(node = %node, "connected to RabbitMQ");
                    }
                    return Ok((answer, node.clone()));
                }
                Err(e) if !several => return Err(e),
                Err(e) => {
                    warn!(node = %node, error = format!("{e:#}"), "cannot connect to RabbitMQ node");
                    failures.push(format!("{e:#}"));
                }
            }
        }
        anyhow::bail!(
            "cannot connect to any of the {} nodes of broker.url: {}",
            nodes.len(),
            failures.join("; ")
        )
    }
}

/// Opens a second connection to `node`, the node a session is on (its
/// publishing connection), with the same errors as the first.
pub async fn connect_to(node: &BrokerUrl, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    connect_node(node.clone(), properties, None).await
}

/// The order of one connection round over `len` nodes: from `next`, wrapping around.
fn round(len: usize, next: usize) -> impl Iterator<Item = usize> {
    (0..len).map(move |i| (next + i) % len)
}

/// Opens a connection to one node, with an error that says what to check.
async fn connect_node(
    url: BrokerUrl,
    properties: ConnectionProperties,
    heartbeat: Option<Duration>,
) -> anyhow::Result<Connection> {
    let connecting: std::pin::Pin<Box<dyn Future<Output = lapin::Result<Connection>> + Send>> =
        match (heartbeat, url.expose().parse::<lapin::uri::AMQPUri>()) {
            (Some(heartbeat), Ok(mut uri)) => {
                uri.query.heartbeat =
                    Some(u16::try_from(heartbeat.as_secs().max(1)).unwrap_or(u16::MAX));
                Box::pin(Connection::connect_uri(uri, properties))
            }
            // lapin's own error for a URL it cannot parse (scrubbed below).
            _ => Box::pin(Connection::connect(url.expose(), properties)),
        };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        // lapin quotes the URL it could not use ("Invalid URL: '…'"), password and all.
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot connect to RabbitMQ at {url}: {} (is it running? `scripts/ensure-rabbitmq.sh` starts a local one)",
            url.scrub(&e.to_string())
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot connect to RabbitMQ at {url}: no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
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
    /// Sent, it would have closed the connection (and failed every publish on it).
    #[error(
        "the message's headers need a frame of {size} bytes; the broker's frame_max is {frame_max}"
    )]
    HeadersTooLarge { size: usize, frame_max: u32 },
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
///
/// While the broker blocks the connection (a memory or disk alarm:
/// `connection.blocked`), a confirm can take as long as the alarm lasts, and
/// the message it confirms may still land: [`Publisher::publish`] keeps
/// waiting then, and `confirm_timeout` counts only while the connection is
/// not blocked. The worker publishes on a connection of its own, so that its
/// consumers' acks still reach a broker that blocks publishers.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
    status: lapin::ConnectionStatus,
    /// The connection's, as negotiated with the broker (0: none).
    frame_max: u32,
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
            status: conn.status().clone(),
            frame_max: conn.configuration().frame_max(),
        })
    }

    /// The largest frame the broker takes on this connection (0: no limit):
    /// a message's headers must fit in one ([`crate::envelope::frame`]).
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The broker blocks this publisher's connection now (an alarm).
    pub fn is_blocked(&self) -> bool {
        self.status.blocked()
    }

    /// Closes the channel; call before closing the connection to avoid a close
    /// race. Bounded: a broker that blocks the connection reads no close.
    pub async fn close(self) {
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            self.channel.close(200, "publisher done".into()),
        )
        .await;
    }

    /// Publishes one persistent message and waits until the broker has it.
    /// Headers too big for one frame are refused here: the broker would close
    /// the connection for them.
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
        let properties = properties.with_delivery_mode(2);
        let size = crate::envelope::frame::header_frame_size(&properties);
        if self.frame_max != 0 && size > self.frame_max as usize {
            return Err(PublishError::HeadersTooLarge {
                size,
                frame_max: self.frame_max,
            });
        }
        let confirm = async {
            self.channel
                .basic_publish(exchange_name, routing_key_name, options, body, properties)
                .await?
                .await
        };
        let mut confirm = std::pin::pin!(confirm);
        let confirmation = loop {
            match tokio::time::timeout(self.confirm_timeout, &mut confirm).await {
                Ok(confirmation) => break confirmation,
                // The alarm holds the confirm back; the message may still land.
                Err(_) if self.is_blocked() => continue,
                Err(_) => return Err(PublishError::Timeout(self.confirm_timeout)),
            }
        };
        match confirmation {
            Err(e) => Err(e.into()),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
            Ok(Confirmation::Ack(Some(_returned))) => Err(PublishError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
            Ok(_) => Ok(()),
        }
    }
}

/// How long closing a channel or connection may take: a broker that blocks
/// the connection (an alarm) never reads the close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes `conn`, bounded by [`CLOSE_TIMEOUT`].
pub async fn close(conn: &Connection, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, why.into())).await;
}

/// The current session's publisher, for routes that outlive sessions (the
/// vendors' callbacks, HTTP enqueue): present while the worker is connected.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(hosts: &[&str]) -> Nodes {
        Nodes::new(BrokerUrls::new(
            hosts.iter().map(|h| format!("amqp://u:pw@{h}:5672/%2f")),
        ))
    }

    /// One connection round where only the nodes in `up` answer: the hosts
    /// tried, in order, and the one connected to.
    async fn connect_round(nodes: &Nodes, up: &[&str]) -> (Vec<String>, Option<String>) {
        let mut tried = Vec::new();
        let connected = nodes
            .first_answer(|url| {
                let host = url::Url::parse(url.expose())
                    .unwrap()
                    .host_str()
                    .unwrap()
                    .to_string();
                tried.push(host.clone());
                let answers = up.contains(&host.as_str());
                async move {
                    if answers {
                        Ok(host)
                    } else {
                        Err(anyhow::anyhow!("{host} refused"))
                    }
                }
            })
            .await
            .ok()
            .map(|(host, node)| {
                assert!(node.expose().contains(&format!("@{host}:")));
                host
            });
        (tried, connected)
    }

    #[test]
    fn a_round_starts_at_the_next_node_and_wraps_around() {
        assert_eq!(round(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(round(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(round(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(round(1, 0).collect::<Vec<_>>(), [0]);
    }

    #[tokio::test]
    async fn the_node_a_worker_lost_is_tried_last_and_a_dead_one_is_not_tried_first() {
        let nodes = cluster(&["a", "b", "c"]);
        let all = ["a", "b", "c"];
        assert_eq!(
            connect_round(&nodes, &all).await,
            (vec!["a".into()], Some("a".into())),
            "the first node that answers"
        );
        // The connection to a is lost and b is down too: c, without waiting on a first.
        assert_eq!(
            connect_round(&nodes, &["a", "c"]).await,
            (vec!["b".into(), "c".into()], Some("c".into()))
        );
        // c is lost and nothing answers: every node once, a and b first.
        assert_eq!(
            connect_round(&nodes, &[]).await,
            (vec!["a".into(), "b".into(), "c".into()], None)
        );
        // The next round starts after c, the node that failed last.
        assert_eq!(
            connect_round(&nodes, &all).await,
            (vec!["a".into()], Some("a".into()))
        );
        assert_eq!(
            connect_round(&nodes, &all).await,
            (vec!["b".into()], Some("b".into())),
            "a was lost: b"
        );
    }

    #[tokio::test]
    async fn one_node_is_always_the_one_tried() {
        let nodes = cluster(&["solo"]);
        for _ in 0..3 {
            assert_eq!(
                connect_round(&nodes, &[]).await,
                (vec!["solo".into()], None)
            );
        }
        assert_eq!(
            connect_round(&nodes, &["solo"]).await,
            (vec!["solo".into()], Some("solo".into()))
        );
    }

    #[tokio::test]
    async fn when_no_node_answers_the_error_names_each_without_its_password() {
        let nodes = Nodes::new(BrokerUrls::new([
            "amqp://u:first-pw@127.0.0.1:1/%2f",
            "amqp://u:second-pw@127.0.0.1:2/%2f",
        ]));
        let err = format!("{:#}", nodes.connect("herald test").await.unwrap_err());
        assert!(
            err.contains("any of the 2 nodes of broker.url")
                && err.contains("amqp://u:****@127.0.0.1:1/%2f")
                && err.contains("amqp://u:****@127.0.0.1:2/%2f"),
            "{err}"
        );
        assert!(
            !err.contains("first-pw") && !err.contains("second-pw"),
            "{err}"
        );
    }

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
