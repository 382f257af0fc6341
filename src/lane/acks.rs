//! The lane channel's acks, sent by one task per session in the order jobs
//! settle, with one `basic.ack multiple` for every run of deliveries whose
//! outcomes are durable and that no unsettled delivery precedes.
//!
//! A job whose outcome is durable asks for its ack and is done; the acker
//! sends what the [`AckWindow`] (pure) says. A multiple ack covers only tags
//! below the lowest delivery still unsettled, so no job is acked before its
//! outcome is durable; acks past that delivery go out one by one, at once,
//! never held back (a held ack would keep a prefetch slot). Hand-backs go out
//! before the acks decided with them: a multiple ack must not reach a tag the
//! broker should see rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::task::Poll;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tracing::warn;

use super::Account;
use super::settle::HandBack;

/// The `outcome` and `reason` a job is counted under once its ack went out.
pub(super) type Counted = (&'static str, &'static str);

/// What the acker hears about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    /// Received; nothing decided yet.
    Delivered(u64),
    /// Its outcome is durable.
    Ack(u64, Counted),
    /// It goes back to the queue, counted under `Counted` once it did.
    HandBack(u64, HandBack, Option<Counted>),
    /// The lane stops: send what is decided and end.
    Stop,
}

/// One frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Frame {
    /// `basic.ack` of `tag` (and, with `multiple`, of every unacked tag below),
    /// settling the jobs counted in `counted`.
    Ack {
        tag: u64,
        multiple: bool,
        counted: Vec<Counted>,
    },
    HandBack {
        tag: u64,
        how: HandBack,
        counted: Option<Counted>,
    },
}

/// The deliveries of one channel between their arrival and their ack.
#[derive(Debug, Default)]
pub(super) struct AckWindow {
    unsettled: BTreeSet<u64>,
    ready: BTreeMap<u64, Counted>,
    back: Vec<(u64, HandBack, Option<Counted>)>,
}

impl AckWindow {
    pub fn note(&mut self, settle: Settle) {
        match settle {
            Settle::Delivered(tag) => {
                self.unsettled.insert(tag);
            }
            Settle::Ack(tag, counted) => {
                if self.unsettled.remove(&tag) {
                    self.ready.insert(tag, counted);
                }
            }
            Settle::HandBack(tag, how, counted) => {
                if self.unsettled.remove(&tag) {
                    self.back.push((tag, how, counted));
                }
            }
            Settle::Stop => {}
        }
    }

    /// The frames for everything noted since the last call: hand-backs, one
    /// multiple ack for the ready tags below the lowest unsettled one, then
    /// single acks for the ready tags above it.
    pub fn frames(&mut self) -> Vec<Frame> {
        let mut frames: Vec<Frame> = self
            .back
            .drain(..)
            .map(|(tag, how, counted)| Frame::HandBack { tag, how, counted })
            .collect();
        let lowest = self.unsettled.first().copied().unwrap_or(u64::MAX);
        let above = self.ready.split_off(&lowest);
        let below = std::mem::replace(&mut self.ready, above);
        if let Some((&last, _)) = below.last_key_value() {
            frames.push(Frame::Ack {
                tag: last,
                multiple: below.len() > 1,
                counted: below.into_values().collect(),
            });
        }
        frames.extend(
            std::mem::take(&mut self.ready)
                .into_iter()
                .map(|(tag, counted)| Frame::Ack {
                    tag,
                    multiple: false,
                    counted: vec![counted],
                }),
        );
        frames
    }
}

/// Where a lane's jobs send their settlements.
pub(super) type Acks = mpsc::UnboundedSender<Settle>;

/// Sends the acks of `channel` until [`Settle::Stop`] (or every sender is gone).
pub(super) async fn run(
    channel: Channel,
    account: &Account,
    mut settled: mpsc::UnboundedReceiver<Settle>,
) {
    let mut window = AckWindow::default();
    let mut batch = Vec::with_capacity(64);
    loop {
        if settled.recv_many(&mut batch, 1024).await == 0 {
            return;
        }
        let stop = batch.contains(&Settle::Stop);
        for settle in batch.drain(..) {
            window.note(settle);
        }
        send_all(&channel, account, window.frames()).await;
        if stop {
            return;
        }
    }
}

/// Sends `frames` in their order and waits for all of them: each frame is
/// queued on the channel when its future is first polled, so they are polled
/// once each in order, then awaited together (one hand-off to lapin's I/O
/// thread for the lot, instead of one round trip per frame).
async fn send_all(channel: &Channel, account: &Account, frames: Vec<Frame>) {
    let mut pending = Vec::with_capacity(frames.len());
    for frame in frames {
        let mut sending = Box::pin(send(channel, account, frame));
        let first = std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await;
        if first.is_pending() {
            pending.push(sending);
        }
    }
    futures_util::future::join_all(pending).await;
}

async fn send(channel: &Channel, account: &Account, frame: Frame) {
    match frame {
        Frame::Ack {
            tag,
            multiple,
            counted,
        } => match channel.basic_ack(tag, BasicAckOptions { multiple }).await {
            Ok(()) => {
                for (outcome, reason) in counted {
                    account.metrics.job_settled(outcome, reason);
                }
            }
            Err(e) => {
                warn!(error = %e, jobs = counted.len(), "ack failed; the broker will redeliver these jobs")
            }
        },
        Frame::HandBack { tag, how, counted } => {
            let result = match how {
                HandBack::Reject => {
                    channel
                        .basic_reject(tag, BasicRejectOptions { requeue: true })
                        .await
                }
                HandBack::Nack => {
                    channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            },
                        )
                        .await
                }
            };
            match (result, counted) {
                (Ok(()), Some((outcome, reason))) => account.metrics.job_settled(outcome, reason),
                (Ok(()), None) => {}
                (Err(e), _) => {
                    warn!(error = %e, "could not return the job; the broker will redeliver it when the channel closes")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELIVERED: Counted = ("delivered", "none");
    const RETRIED: Counted = ("retried", "transient");

    fn window(tags: std::ops::RangeInclusive<u64>) -> AckWindow {
        let mut w = AckWindow::default();
        for tag in tags {
            w.note(Settle::Delivered(tag));
        }
        w
    }

    fn ack(tag: u64, multiple: bool, counted: Vec<Counted>) -> Frame {
        Frame::Ack {
            tag,
            multiple,
            counted,
        }
    }

    #[test]
    fn a_settled_run_from_the_lowest_delivery_is_one_multiple_ack() {
        let mut w = window(1..=5);
        w.note(Settle::Ack(2, RETRIED));
        w.note(Settle::Ack(1, DELIVERED));
        w.note(Settle::Ack(3, DELIVERED));
        assert_eq!(
            w.frames(),
            vec![ack(3, true, vec![DELIVERED, RETRIED, DELIVERED])]
        );
        assert_eq!(w.frames(), vec![], "nothing is sent twice");
    }

    #[test]
    fn an_unsettled_delivery_is_never_covered_and_acks_past_it_go_at_once() {
        let mut w = window(1..=5);
        w.note(Settle::Ack(2, DELIVERED));
        w.note(Settle::Ack(3, DELIVERED));
        w.note(Settle::Ack(5, DELIVERED));
        // 1 and 4 are unsettled: 2, 3 and 5 each alone, never a multiple ack over 1.
        assert_eq!(
            w.frames(),
            vec![
                ack(2, false, vec![DELIVERED]),
                ack(3, false, vec![DELIVERED]),
                ack(5, false, vec![DELIVERED]),
            ]
        );
        w.note(Settle::Ack(1, DELIVERED));
        assert_eq!(w.frames(), vec![ack(1, false, vec![DELIVERED])]);
    }

    #[test]
    fn hand_backs_go_out_before_a_multiple_ack_that_passes_them() {
        let mut w = window(1..=3);
        w.note(Settle::Ack(1, DELIVERED));
        w.note(Settle::HandBack(2, HandBack::Reject, None));
        w.note(Settle::Ack(3, DELIVERED));
        assert_eq!(
            w.frames(),
            vec![
                Frame::HandBack {
                    tag: 2,
                    how: HandBack::Reject,
                    counted: None
                },
                ack(3, true, vec![DELIVERED, DELIVERED]),
            ]
        );
    }

    #[test]
    fn a_tag_settles_once_and_unknown_tags_are_ignored() {
        let mut w = window(1..=2);
        w.note(Settle::Ack(1, DELIVERED));
        w.note(Settle::Ack(1, DELIVERED));
        w.note(Settle::HandBack(1, HandBack::Nack, None));
        w.note(Settle::Ack(9, DELIVERED));
        assert_eq!(w.frames(), vec![ack(1, false, vec![DELIVERED])]);
    }
}
