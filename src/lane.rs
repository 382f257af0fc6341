//! One lane: consume → limit → send → outcome → settle, for one vendor account.
//!
//! A delivery is acked only once its outcome is durable: the vendor accepted
//! the job, or the broker confirmed its retry or dead-letter copy. Anything
//! that goes wrong before that leaves the delivery unacked, and the broker
//! redelivers it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::breaker::{Admission, Breaker};
use crate::broker::Publisher;
use crate::config::{AccountConfig, Config};
use crate::envelope::{Envelope, Failure, job_id, with_job_id};
use crate::job::Job;
use crate::limit::{AccountLimiter, with_jitter};
use crate::outcome::{Answer, Class, Outcome, Policy, Reason, decide, is_expired};
use crate::schedule::{Destination, schedule};
use crate::topology::{Names, tier_name};
use crate::vendor::{self, Round, Vendor, VendorSpec};

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
    pub concurrency: u16,
    pub immediate_retries: u32,
}

impl Account {
    pub fn build(account: &AccountConfig, config: &Config) -> anyhow::Result<Self> {
        let spec = vendor::spec(&account.vendor)?;
        Ok(Self {
            vendor_id: account.vendor.clone(),
            name: account.name.clone(),
            vendor: vendor::build(account)?,
            spec,
            limiter: AccountLimiter::new(account.rate_limit, account.rate_margin),
            breaker: Breaker::new(account.breaker_threshold, account.breaker_probe),
            policy: config.policy_for(account),
            concurrency: account.concurrency,
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
    pub drain_timeout: Duration,
}

/// How a delivery is settled with the broker.
#[derive(Debug, PartialEq)]
enum Settlement {
    Ack,
    Retry {
        tier: usize,
    },
    Dead(Reason),
    /// Not attempted (shutdown): hand it back to the broker.
    Requeue,
}

#[derive(Debug)]
struct Verdict {
    settlement: Settlement,
    /// Attempts made, this one included.
    attempts: u32,
    code: Option<String>,
    error: String,
}

impl Verdict {
    fn without_attempt(settlement: Settlement, attempts: u32, error: impl Into<String>) -> Self {
        Self {
            settlement,
            attempts,
            code: None,
            error: error.into(),
        }
    }
}

impl Lane {
    fn queue(&self) -> String {
        self.names.lane(&self.account.vendor_id, &self.account.name)
    }

    /// Consumes until `stop` is cancelled (then drains) or the channel fails.
    pub async fn run(
        self: Arc<Self>,
        channel: Channel,
        on_consuming: impl FnOnce(),
    ) -> anyhow::Result<()> {
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
        info!(lane = %queue, prefetch, limited = self.account.limiter.is_limited(), "lane consuming");
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
                                self.account.limiter.pause(TAKEOVER_WINDOW);
                                info!(lane = %queue, "lane active; waiting one window before the first send");
                            }
                        }
                        active = true;
                        tasks.spawn(Arc::clone(&self).guard(delivery));
                    }
                    Some(Err(e)) => break Err(anyhow::anyhow!("lane {queue}: consumer failed: {e}")),
                    None => break Err(anyhow::anyhow!("lane {queue}: the broker cancelled the consumer")),
                },
            }
        };
        if result.is_ok() {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
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
        let _ = channel.close(200, "lane stopped".into()).await;
        crate::metrics::lane_active(&self.account, false);
        result
    }

    /// Runs one delivery; if processing panics, the delivery is handed back
    /// (its delivery count grows, so a job that always panics ends as `poison`).
    async fn guard(self: Arc<Self>, delivery: Delivery) {
        let _in_flight = crate::metrics::InFlight::start(&self.account);
        let acker = delivery.acker.clone();
        let lane = Arc::clone(&self);
        if let Err(e) = tokio::spawn(async move { lane.handle(delivery).await }).await {
            error!(error = %e, "job processing panicked; returning the delivery to the queue");
            requeue(&acker).await;
        }
    }

    async fn handle(&self, delivery: Delivery) {
        let envelope = Envelope::read(&delivery.properties, Utc::now());
        let id = job_id(&delivery.properties, &delivery.data);
        let span = info_span!(
            "job",
            id = id.as_deref().unwrap_or("-"),
            vendor = %self.account.vendor_id,
            account = %self.account.name,
            attempt = envelope.next_attempt(),
            trace_id = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, &delivery.properties);
        async {
            let verdict = self.process(&delivery.data, &envelope).await;
            self.settle(&delivery, &envelope, id.as_deref(), verdict)
                .await;
        }
        .instrument(span)
        .await
    }

    async fn process(&self, body: &[u8], envelope: &Envelope) -> Verdict {
        let account = &self.account;
        let attempts = envelope.attempts;
        let invalid = |error: String| {
            Verdict::without_attempt(Settlement::Dead(Reason::Invalid), attempts, error)
        };
        let job = match Job::parse(body, self.max_job_bytes) {
            Ok(job) => job,
            Err(e) => return invalid(e.0),
        };
        if job.vendor != account.vendor_id || job.account != account.name {
            return invalid(self.misrouted(&job));
        }
        if let Err(e) = (account.spec.check)(&job) {
            return invalid(e);
        }
        let attempt = envelope.next_attempt();
        let mut round = Round::First;
        loop {
            if is_expired(job.expires_at, Utc::now()) {
                let when = job
                    .expires_at
                    .map(crate::envelope::timestamp)
                    .unwrap_or_default();
                return Verdict::without_attempt(
                    Settlement::Dead(Reason::Expired),
                    attempts,
                    format!("expired at {when}"),
                );
            }
            let Some(admission) = self.wait_for_turn().await else {
                return Verdict::without_attempt(Settlement::Requeue, attempts, "shutting down");
            };
            let started = Instant::now();
            let answer = self
                .send(&job, attempt, round)
                .instrument(crate::telemetry::vendor_request_span())
                .await;
            let renew = answer.renewed && round == Round::First;
            account
                .breaker
                .record(admission, answer.class == Class::Transient && !renew);
            crate::metrics::vendor_request(account, started.elapsed());
            if renew {
                // Same attempt, fresh credentials: one more request, through the limiter.
                debug!(
                    code = answer.code.as_deref().unwrap_or("-"),
                    "{}; sending again", answer.detail
                );
                round = Round::Renewed;
                continue;
            }
            let outcome = decide(answer.class, attempt, &account.policy);
            if outcome == Outcome::Ack {
                // "Was job X delivered?": this line, with the vendor's id for the message.
                info!(
                    message_id = answer.message_id.as_deref().unwrap_or("-"),
                    "delivered"
                );
            }
            let settlement = match outcome {
                Outcome::Ack => Settlement::Ack,
                Outcome::RetryIn { tier, .. } => Settlement::Retry { tier },
                Outcome::Dead(reason) => Settlement::Dead(reason),
                Outcome::PauseLane(ban) => {
                    let pause = with_jitter(ban);
                    account.limiter.pause(pause);
                    crate::metrics::lane_paused(account);
                    warn!(
                        code = answer.code.as_deref().unwrap_or("-"),
                        pause_ms = pause.as_millis() as u64,
                        "vendor rate limit: lane paused; the job waits without counting an attempt"
                    );
                    continue;
                }
            };
            return Verdict {
                settlement,
                attempts: attempt,
                code: answer.code,
                error: answer.detail,
            };
        }
    }

    /// Waits for the account's circuit breaker and rate limiter; `None` when the lane stops first.
    async fn wait_for_turn(&self) -> Option<Admission> {
        let account = &self.account;
        let admission = tokio::select! {
            admission = account.breaker.admit() => admission,
            _ = self.stop.cancelled() => return None,
        };
        tokio::select! {
            _ = account.limiter.acquire() => Some(admission),
            _ = self.stop.cancelled() => {
                account.breaker.abandon(admission);
                None
            }
        }
    }

    /// One attempt, with a few immediate retries when the request never left (connect errors).
    async fn send(&self, job: &Job, attempt: u32, round: Round) -> Answer {
        let vendor = &self.account.vendor;
        let once = || async {
            let answer = vendor.send(job, attempt, round).await;
            if answer.unsent {
                Err(answer)
            } else {
                Ok(answer)
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_millis(200))
            .with_max_times(self.account.immediate_retries as usize)
            .with_jitter();
        once.retry(backoff)
            .notify(|answer, delay| debug!(error = %answer.detail, ?delay, "request did not leave; retrying now"))
            .await
            .unwrap_or_else(|answer| answer)
    }

    fn misrouted(&self, job: &Job) -> String {
        if let Err(e) = vendor::spec(&job.vendor) {
            return e.to_string();
        }
        if !self.known_accounts.contains(&job.routing_key()) {
            return format!(
                "no account `{}` is configured for vendor {}",
                job.account, job.vendor
            );
        }
        format!(
            "job is for {} but was published with routing key {}; publish with routing key `<vendor>.<account>` of the job",
            job.routing_key(),
            self.account.routing_key()
        )
    }

    async fn settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        id: Option<&str>,
        verdict: Verdict,
    ) {
        let now = Utc::now();
        let failure = Failure {
            attempts: verdict.attempts,
            first_seen: envelope.first_seen,
            code: verdict.code.as_deref(),
            error: &verdict.error,
            now,
        };
        let routing_key = delivery.routing_key.as_str();
        let destination = match &verdict.settlement {
            Settlement::Ack => None,
            Settlement::Requeue => {
                requeue(&delivery.acker).await;
                crate::metrics::job_settled(&self.account, "requeued", "shutdown");
                return;
            }
            Settlement::Retry { tier } => {
                let delay = self.account.policy.tiers[*tier];
                info!(tier = %tier_name(delay), code = failure.code.unwrap_or("-"), error = %verdict.error, "retrying later");
                Some(Destination::Retry(delay))
            }
            Settlement::Dead(reason) => {
                warn!(reason = %reason, code = failure.code.unwrap_or("-"), error = %verdict.error, "dead-lettered");
                Some(Destination::Dead(*reason))
            }
        };
        let (published, outcome) = match destination {
            None => (Ok(()), ("delivered", "none")),
            Some(destination) => (
                schedule(
                    &self.publisher,
                    &self.names,
                    destination,
                    routing_key,
                    &delivery.data,
                    // A copy carries the job's id even when the producer set no message_id,
                    // and the job span's traceparent, so the next attempt continues the trace.
                    &crate::telemetry::carry(with_job_id(&delivery.properties, id)),
                    &failure,
                )
                .await,
                destination.labels(),
            ),
        };
        match published {
            Ok(()) => match delivery.acker.ack(BasicAckOptions::default()).await {
                Ok(_) => {
                    crate::metrics::job_settled(&self.account, outcome.0, outcome.1);
                }
                Err(e) => warn!(error = %e, "ack failed; the broker will redeliver this job"),
            },
            Err(e) => {
                error!(error = %e, "could not make the outcome durable; returning the job to the queue");
                requeue(&delivery.acker).await;
            }
        }
    }
}

/// Hands a delivery back to its queue (its delivery count grows).
async fn requeue(acker: &lapin::Acker) {
    let options = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if let Err(e) = acker.nack(options).await {
        warn!(error = %e, "could not return the job; the broker will redeliver it when the channel closes");
    }
}
