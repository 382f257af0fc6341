//! One lane: consume → limit → send → outcome → settle, for one vendor account.
//!
//! This module holds the consume loop and the drain; [`attempt`] makes one
//! delivery's attempt (in-flight slot, admission, request, classification),
//! [`settle`] decides where the delivery goes (a pure function) and does the
//! broker I/O, and [`acks`] sends the channel's acks, several at once where it
//! can. A delivery is acked only once its outcome is durable: the vendor
//! accepted the job, or the broker confirmed its retry or dead-letter copy.

mod acks;
mod attempt;
mod settle;

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::ban;
use crate::breaker::Breaker;
use crate::broker::Publisher;
use crate::config::{AccountConfig, Config};
use crate::envelope::{Envelope, job_id};
use crate::in_flight::Gate;
use crate::lease::Lease;
use crate::limit::AccountLimiter;
use crate::metrics::AccountMetrics;
use crate::outcome::Policy;
use crate::topology::Names;
use crate::vendor::{self, Vendor, VendorSpec};

use attempt::FirstSlot;
pub use settle::HandBack;

/// After taking over a rate-limited lane, wait this long: the previous consumer
/// may have used the whole window.
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(1);

/// A configured account with its client and limiter; outlives broker sessions.
pub struct Account {
    pub vendor_id: String,
    pub name: String,
    pub vendor: Arc<dyn Vendor>,
    pub spec: &'static VendorSpec,
    pub limiter: AccountLimiter,
    pub breaker: Breaker,
    pub policy: Policy,
    /// The lane's prefetch and the in-flight limit's ceiling.
    pub concurrency: u16,
    /// The account's requests at the vendor from this process, at most the (adaptive) limit.
    pub in_flight: Gate,
    pub metrics: AccountMetrics,
    pub immediate_retries: u32,
}

impl Account {
    pub fn build(account: &AccountConfig, config: &Config) -> anyhow::Result<Self> {
        let spec = vendor::spec(&account.vendor)?;
        let concurrency = account
            .concurrency
            .unwrap_or_else(|| crate::in_flight::default_concurrency(account.rate_limit.is_some()));
        Ok(Self {
            vendor_id: account.vendor.clone(),
            name: account.name.clone(),
            vendor: vendor::build(account)?,
            spec,
            limiter: AccountLimiter::new(account.rate_limit, account.rate_margin),
            breaker: Breaker::new(account.breaker_threshold, account.breaker_probe),
            policy: config.policy_for(account),
            concurrency,
            in_flight: Gate::new(concurrency, account.adaptive_concurrency),
            metrics: AccountMetrics::new(&account.vendor, &account.name),
            immediate_retries: config.retry.immediate,
        })
    }

    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.vendor_id, self.name)
    }
}

/// Everything a lane's jobs share during one broker session.
pub struct Lane {
    pub account: Arc<Account>,
    pub names: Names,
    pub publisher: Publisher,
    pub max_job_bytes: usize,
    /// `vendor.account` of every configured account, to explain misrouted jobs.
    pub known_accounts: Arc<BTreeSet<String>>,
    /// Cancelled to stop consuming and drain (shutdown, or the session ending).
    pub stop: CancellationToken,
    /// Why a lane ended the session, if one did ([`Lane::end_session`]).
    pub fault: Arc<OnceLock<String>>,
    pub drain_timeout: Duration,
    /// This session's broker lease: a rate-limited lane sends only while it is fresh.
    pub lease: Arc<Lease>,
    /// A job still unsent this long after its delivery goes back to the lane as
    /// a fresh copy (half the broker's consumer timeout).
    pub recycle_after: Duration,
}

impl Lane {
    fn queue(&self) -> String {
        self.names.lane(&self.account.vendor_id, &self.account.name)
    }

    fn ban_board(&self) -> String {
        self.names
            .ban_board(&self.account.vendor_id, &self.account.name)
    }

    /// Takes over a rate-limited lane: waits one window, and honours a ban the
    /// previous active replica met (read now, and again half a window later in
    /// case its last requests were answered with a ban after it let go).
    ///
    /// The board is read on a channel of its own (`board`), never the lane's: a
    /// read cut short by its timeout may hold the board's message unacked, and
    /// closing that channel hands it back at once for the next reader; a
    /// broker error on it cannot close the lane's channel either.
    fn take_over(self: &Arc<Self>, board_channel: Option<Channel>) {
        self.account.limiter.pause(TAKEOVER_WINDOW);
        let Some(channel) = board_channel else {
            return;
        };
        let lane = Arc::clone(self);
        tokio::spawn(async move {
            let board = lane.ban_board();
            for wait in [Duration::ZERO, TAKEOVER_WINDOW / 2] {
                tokio::time::sleep(wait).await;
                let read = tokio::time::timeout(TAKEOVER_WINDOW / 4, ban::read(&channel, &board));
                let answered = match read.await {
                    Ok(Ok(Some(until))) => {
                        if let Some(left) = ban::remaining(until, ban::now_ms()) {
                            lane.account.limiter.pause(left);
                            warn!(lane = %lane.queue(), pause_ms = left.as_millis() as u64, "the vendor ban met by the previous active replica is still on: lane paused");
                        }
                        true
                    }
                    Ok(Ok(None)) => true,
                    Ok(Err(e)) => {
                        warn!(error = %e, "could not read the lane's ban board");
                        false
                    }
                    Err(_) => {
                        warn!("no answer from the lane's ban board");
                        false
                    }
                };
                if !answered {
                    break;
                }
            }
            // Hands back a board message a cut-short read may still hold.
            let _ = tokio::time::timeout(
                crate::broker::CLOSE_TIMEOUT,
                channel.close(200, "ban board read".into()),
            )
            .await;
        });
    }

    /// Consumes until `stop` is cancelled (then drains) or the channel fails.
    /// `board` is a channel for reading the ban board at takeover (rate-limited lanes).
    pub async fn run(
        self: Arc<Self>,
        channel: Channel,
        board: Option<Channel>,
        on_consuming: impl FnOnce(),
    ) -> anyhow::Result<()> {
        let mut board = board;
        let queue = self.queue();
        let prefetch = self.account.concurrency;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("herald-{}-{}", std::process::id(), rand::random::<u32>());
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        on_consuming();
        info!(
            lane = %queue,
            prefetch,
            in_flight_limit = self.account.in_flight.limit(),
            adaptive = self.account.in_flight.is_adaptive(),
            limited = self.account.limiter.is_limited(),
            "lane consuming"
        );
        let (acks, settled) = tokio::sync::mpsc::unbounded_channel();
        let acker = {
            let (channel, lane) = (channel.clone(), Arc::clone(&self));
            tokio::spawn(async move { acks::run(channel, &lane.account, settled).await })
        };
        let tasks = TaskTracker::new();
        let mut active = false;
        let result = loop {
            tokio::select! {
                _ = self.stop.cancelled() => break Ok(()),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        if !active {
                            crate::metrics::lane_active(&self.account, true);
                            if self.account.limiter.is_limited() {
                                // With single active consumer, the first delivery means we just became active.
                                self.take_over(board.take());
                                info!(lane = %queue, "lane active; waiting one window before the first send");
                            }
                        }
                        active = true;
                        let _ = acks.send(acks::Settle::Delivered(delivery.delivery_tag));
                        tasks.spawn(Arc::clone(&self).guard(delivery, acks.clone()));
                    }
                    Some(Err(e)) => break Err(anyhow::anyhow!("lane {queue}: consumer failed: {e}")),
                    None => break Err(anyhow::anyhow!("lane {queue}: the broker cancelled the consumer")),
                },
            }
        };
        if result.is_ok() {
            // Bounded: on a connection the broker no longer answers (a lost lease) it never returns.
            let _ = tokio::time::timeout(
                crate::broker::CLOSE_TIMEOUT,
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
        } else {
            // The channel is gone: no ack can reach the broker, which will redeliver
            // every unacked job. Jobs not yet sent must not be sent now (each would be
            // a duplicate), so stop the session's lanes at once.
            self.stop.cancel();
        }
        tasks.close();
        let in_flight = tasks.len();
        if in_flight > 0 {
            info!(lane = %queue, in_flight, "draining in-flight jobs");
        }
        if tokio::time::timeout(self.drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            warn!(lane = %queue, left = tasks.len(), "drain timeout; unfinished jobs return to the queue");
        }
        // The acks decided so far go out before the channel closes.
        let _ = acks.send(acks::Settle::Stop);
        let _ = tokio::time::timeout(crate::broker::CLOSE_TIMEOUT, acker).await;
        let _ = tokio::time::timeout(
            crate::broker::CLOSE_TIMEOUT,
            channel.close(200, "lane stopped".into()),
        )
        .await;
        crate::metrics::lane_active(&self.account, false);
        result
    }

    /// Runs one delivery; if processing panics, the delivery is rejected back
    /// (every broker version counts that toward the delivery limit, so a job
    /// that always panics ends as `poison`).
    async fn guard(self: Arc<Self>, delivery: Delivery, acks: acks::Acks) {
        let _in_flight = crate::metrics::InFlight::start(&self.account);
        let tag = delivery.delivery_tag;
        let recycle_at = tokio::time::Instant::now() + self.recycle_after;
        // Nothing of the job is built before it has a slot: of a prefetch of
        // 2,048 jobs, most wait here, each as its delivery and this small task.
        let slot = match std::panic::AssertUnwindSafe(self.first_slot(recycle_at))
            .catch_unwind()
            .await
        {
            Ok(slot) => slot,
            Err(panic) => return hand_back_after_panic(&acks, tag, panic.as_ref()),
        };
        // Boxed: the job's future is large, and a task's future is moved (copied) as it starts.
        let job =
            std::panic::AssertUnwindSafe(Box::pin(self.handle(delivery, &acks, recycle_at, slot)));
        if let Err(panic) = job.catch_unwind().await {
            hand_back_after_panic(&acks, tag, panic.as_ref());
        }
    }

    /// The job's first slot of the in-flight limit, unless the lane stops or
    /// `recycle_at` comes first: then the job is handed back or recycled
    /// without a request, even if a slot is free at that moment.
    async fn first_slot(&self, recycle_at: tokio::time::Instant) -> FirstSlot<'_> {
        tokio::select! {
            biased;
            halt = self.halted(recycle_at) => Err(halt),
            slot = self.account.in_flight.acquire() => Ok(slot),
        }
    }

    /// Stops every lane of this broker session and makes the session fail with
    /// `why`; the worker reconnects with backoff. The deliveries left unacked
    /// return to their queues when the connection closes.
    pub(crate) fn end_session(&self, why: String) {
        if self.fault.set(why.clone()).is_ok() {
            error!(error = %why, "ending the broker session");
        }
        self.stop.cancel();
    }

    async fn handle<'a>(
        &'a self,
        delivery: Delivery,
        acks: &acks::Acks,
        recycle_at: tokio::time::Instant,
        slot: FirstSlot<'a>,
    ) {
        let envelope = Envelope::read(&delivery.properties, Utc::now());
        let id = job_id(&delivery.properties, &delivery.data);
        // Without an OTLP exporter the trace context is made by hand (cheap);
        // with one, OpenTelemetry gives the span its context and trace id.
        let trace = crate::telemetry::job_trace(&delivery.properties);
        let trace_id = trace.map(|t| t.trace_id_hex());
        let span = info_span!(
            "job",
            id = id.as_deref().unwrap_or("-"),
            vendor = %self.account.vendor_id,
            account = %self.account.name,
            attempt = envelope.next_attempt(),
            trace_id = trace_id.as_ref().map(|t| t.as_str()),
        );
        if trace.is_none() {
            crate::telemetry::continue_trace(&span, &delivery.properties);
        }
        let job = async {
            let verdict = self
                .process(&delivery.data, &envelope, recycle_at, slot)
                .await;
            // Boxed, as the request is (see `attempt`): only settling jobs hold a publish's state.
            Box::pin(self.settle(&delivery, &envelope, id.as_deref(), verdict, acks)).await;
        }
        .instrument(span);
        // Boxed before `in_trace` takes it: a future passed by value is stored
        // twice in its caller's state (as the argument, then as the awaited
        // future), which made each delivery waiting for a slot hold 7 KB.
        crate::telemetry::in_trace(trace, Box::pin(job)).await
    }
}

/// A job's processing panicked: its delivery is rejected back to the queue
/// (counted toward the delivery limit, so a job that always panics ends as `poison`).
fn hand_back_after_panic(acks: &acks::Acks, tag: u64, panic: &(dyn std::any::Any + Send)) {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic");
    error!(error = %what, "job processing panicked; returning the delivery to the queue");
    let _ = acks.send(acks::Settle::HandBack(tag, HandBack::Reject, None));
}
