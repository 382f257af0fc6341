//! Where a delivery goes once its attempt is over, and the broker I/O that puts it there.
//!
//! [`route`] and [`after_copy`] are pure: they decide; [`Lane::settle`] does
//! what they decided. A delivery is acked only once its outcome is durable (the
//! vendor accepted the job, or the broker confirmed its retry or DLQ copy).
//! Handing a delivery back is a `basic.reject` when something failed, which
//! every RabbitMQ version counts toward the lane's delivery limit (so a job
//! that keeps failing ends as `poison`), and a `basic.nack` only when herald
//! is shutting down, which RabbitMQ 4.3 and later no longer count.

use chrono::Utc;
use lapin::message::Delivery;
use tracing::{error, info, warn};

use super::Lane;
use super::acks::{Acks, Settle};
use crate::broker::PublishError;
use crate::envelope::{Envelope, Failure, with_job_id};
use crate::outcome::{Policy, Reason};
use crate::schedule::{Destination, schedule};
use crate::topology::tier_name;

/// How an attempt ended, before any broker I/O.
#[derive(Debug, PartialEq)]
pub(super) enum Settlement {
    Ack,
    Retry {
        tier: usize,
    },
    Dead(Reason),
    /// Not attempted (shutdown): hand it back to the broker.
    Requeue,
    /// Not attempted yet, and waited long enough that the broker's consumer
    /// timeout draws near: a fresh copy goes back to the lane, counting nothing.
    Recycle,
}

#[derive(Debug)]
pub(super) struct Verdict {
    pub settlement: Settlement,
    /// Attempts made, this one included.
    pub attempts: u32,
    pub code: Option<String>,
    pub error: String,
}

impl Verdict {
    pub fn without_attempt(
        settlement: Settlement,
        attempts: u32,
        error: impl Into<String>,
    ) -> Self {
        Self {
            settlement,
            attempts,
            code: None,
            error: error.into(),
        }
    }
}

/// How a delivery goes back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandBack {
    /// Something failed: counted toward the delivery limit on every version.
    Reject,
    /// Not attempted, because herald is stopping.
    Nack,
}

/// Where a delivery goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Ack,
    /// Publish a copy there (confirmed), then ack.
    Copy(Destination),
    /// Publish the delivery as it came (body, properties, headers) to its own
    /// lane queue (confirmed), then ack: a return that counts no delivery and
    /// no attempt, unlike a reject or a channel closed by the broker.
    Recycle,
    HandBack(HandBack),
}

pub(super) fn route(settlement: &Settlement, policy: &Policy) -> Route {
    match settlement {
        Settlement::Ack => Route::Ack,
        Settlement::Retry { tier } => Route::Copy(Destination::Retry(policy.tiers[*tier])),
        Settlement::Dead(reason) => Route::Copy(Destination::Dead(*reason)),
        Settlement::Requeue => Route::HandBack(HandBack::Nack),
        Settlement::Recycle => Route::Recycle,
    }
}

/// What happens to the delivery once publishing its copy returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterCopy {
    Ack,
    /// The broker said no (nack, unroutable, a name it cannot carry): the copy
    /// did not land, and handing the job back counts toward its delivery limit.
    HandBack(HandBack),
    /// The copy may still land (no confirm yet) or the publishing channel is
    /// gone: handing the job back could duplicate it, and would come straight
    /// back to fail again. End the session; the broker redelivers the job
    /// when the connection closes, and the worker reconnects with backoff.
    EndSession,
}

pub(super) fn after_copy(published: &Result<(), PublishError>) -> AfterCopy {
    match published {
        Ok(()) => AfterCopy::Ack,
        Err(
            PublishError::Nacked
            | PublishError::Unroutable { .. }
            | PublishError::TooLong { .. }
            | PublishError::HeadersTooLarge { .. },
        ) => AfterCopy::HandBack(HandBack::Reject),
        Err(PublishError::Timeout(_) | PublishError::Broker(_)) => AfterCopy::EndSession,
    }
}

impl Lane {
    pub(super) async fn settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        id: Option<&str>,
        verdict: Verdict,
        acks: &Acks,
    ) {
        let tag = delivery.delivery_tag;
        let failure = Failure {
            attempts: verdict.attempts,
            first_seen: envelope.first_seen,
            code: verdict.code.as_deref(),
            error: &verdict.error,
            now: Utc::now(),
        };
        let (published, outcome) = match route(&verdict.settlement, &self.account.policy) {
            Route::Ack => (Ok(()), ("delivered", "none")),
            Route::HandBack(how) => {
                let _ = acks.send(Settle::HandBack(tag, how, Some(("requeued", "shutdown"))));
                return;
            }
            Route::Recycle => {
                info!(
                    waited_s = self.recycle_after.as_secs(),
                    "still unsent: handing the job back to its lane as a fresh copy"
                );
                // Straight to the lane queue (default exchange): no binding or alternate exchange in between.
                let published = self
                    .publisher
                    .publish(
                        "",
                        &self.queue(),
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                    .await;
                (published, ("requeued", "consumer_timeout"))
            }
            Route::Copy(destination) => {
                match destination {
                    Destination::Retry(delay) => {
                        info!(tier = %tier_name(delay), code = failure.code.unwrap_or("-"), error = %verdict.error, "retrying later")
                    }
                    Destination::Dead(reason) => {
                        warn!(reason = %reason, code = failure.code.unwrap_or("-"), error = %verdict.error, "dead-lettered")
                    }
                }
                let published = schedule(
                    &self.publisher,
                    &self.names,
                    destination,
                    // The lane's key, not the delivery's: a copy recycled before the
                    // consumer timeout came through the default exchange, keyed by
                    // the queue's name, which no binding of `{p}.jobs` matches.
                    &self.account.routing_key(),
                    &delivery.data,
                    // A copy carries the job's id even when the producer set no message_id,
                    // and the job span's traceparent, so the next attempt continues the trace.
                    &crate::telemetry::carry(with_job_id(&delivery.properties, id)),
                    &failure,
                )
                .await;
                (published, destination.labels())
            }
        };
        match after_copy(&published) {
            // The acker counts the job once its ack went out.
            AfterCopy::Ack => {
                let _ = acks.send(Settle::Ack(tag, outcome));
            }
            AfterCopy::HandBack(how) => {
                let e = published.err().map(|e| e.to_string()).unwrap_or_default();
                error!(error = %e, "the broker refused the job's copy; returning the job to the queue");
                let _ = acks.send(Settle::HandBack(tag, how, None));
            }
            AfterCopy::EndSession => {
                let e = published.err().map(|e| e.to_string()).unwrap_or_default();
                self.end_session(format!(
                    "could not make a job's outcome durable ({e}); ending the broker session, the job stays unacked until the connection closes"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> Policy {
        Policy {
            tiers: vec![Duration::from_secs(1), Duration::from_secs(60)],
            max_attempts: 3,
            ban: Duration::from_secs(10),
        }
    }

    #[test]
    fn each_settlement_has_one_route() {
        let p = policy();
        assert_eq!(route(&Settlement::Ack, &p), Route::Ack);
        assert_eq!(
            route(&Settlement::Retry { tier: 1 }, &p),
            Route::Copy(Destination::Retry(Duration::from_secs(60)))
        );
        assert_eq!(
            route(&Settlement::Dead(Reason::Permanent), &p),
            Route::Copy(Destination::Dead(Reason::Permanent))
        );
        // Only shutdown hands a job back unattempted, with the nack newer brokers do not count.
        assert_eq!(
            route(&Settlement::Requeue, &p),
            Route::HandBack(HandBack::Nack)
        );
        // A job that waited too long goes back as a copy: no return the broker counts.
        assert_eq!(route(&Settlement::Recycle, &p), Route::Recycle);
    }

    #[test]
    fn a_refused_copy_is_rejected_and_an_uncertain_one_ends_the_session() {
        assert_eq!(after_copy(&Ok(())), AfterCopy::Ack);
        for refused in [
            PublishError::Nacked,
            PublishError::Unroutable {
                exchange: "x".into(),
                routing_key: "k".into(),
            },
            PublishError::TooLong {
                what: "routing key",
                len: 300,
            },
            PublishError::HeadersTooLarge {
                size: 140_000,
                frame_max: 131_072,
            },
        ] {
            assert_eq!(
                after_copy(&Err(refused)),
                AfterCopy::HandBack(HandBack::Reject)
            );
        }
        // No confirm yet: the copy may still land, so the job must not be handed back.
        assert_eq!(
            after_copy(&Err(PublishError::Timeout(Duration::from_secs(5)))),
            AfterCopy::EndSession
        );
        assert_eq!(
            after_copy(&Err(PublishError::Broker(lapin::Error::from(
                lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "basic.publish")
            )))),
            AfterCopy::EndSession
        );
    }
}
