//! One delivery's attempt: check the job, wait for the account's turn (circuit
//! breaker, then rate limiter), send, and classify the answer into a [`Verdict`].
//! No broker I/O happens here; [`super::settle`] puts the verdict into effect.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::Lane;
use super::settle::{Settlement, Verdict};
use crate::ban;
use crate::breaker::Admission;
use crate::envelope::Envelope;
use crate::in_flight::{Seen, Slot};
use crate::job::Job;
use crate::limit::with_jitter;
use crate::outcome::{Answer, Class, Outcome, Reason, decide, is_expired};
use crate::vendor::{self, Round};

/// Why a job stopped waiting for its first slot of the in-flight limit.
pub(super) enum Halt {
    Stop,
    Recycle,
}

impl From<Halt> for Turn<'_> {
    fn from(halt: Halt) -> Self {
        match halt {
            Halt::Stop => Turn::Stop,
            Halt::Recycle => Turn::Recycle,
        }
    }
}

/// A job's first slot, taken before anything of the job is built, or why it has none.
pub(super) type FirstSlot<'a> = Result<Slot<'a>, Halt>;

/// How waiting for the account's turn ended.
enum Turn<'a> {
    /// Send now, in this slot of the in-flight limit.
    Go(Admission, Slot<'a>),
    /// The lane is stopping.
    Stop,
    /// Waited too long: the job goes back to its lane before the broker's consumer timeout.
    Recycle,
}

impl Lane {
    /// Checks the job, then makes its attempt.
    /// `slot` is the first request's slot, or why the job has none.
    pub(super) async fn process<'a>(
        &'a self,
        body: &[u8],
        envelope: &Envelope,
        recycle_at: Instant,
        slot: FirstSlot<'a>,
    ) -> Verdict {
        match self.check(body) {
            Ok(job) => self.attempt(&job, envelope, recycle_at, slot).await,
            Err(error) => Verdict::without_attempt(
                Settlement::Dead(Reason::Invalid),
                envelope.attempts,
                error,
            ),
        }
    }

    /// The job, if it parses, belongs to this lane and passes its vendor's checks.
    fn check(&self, body: &[u8]) -> Result<Job, String> {
        let account = &self.account;
        let job = Job::parse(body, self.max_job_bytes).map_err(|e| e.0)?;
        if job.vendor != account.vendor_id || job.account != account.name {
            return Err(self.misrouted(&job));
        }
        (account.spec.check)(&job)?;
        Ok(job)
    }

    /// One attempt: wait for the account's turn and send, as often as a rate
    /// limit answer (a pause, not an attempt) or renewed credentials require.
    /// A job still waiting for its turn at `recycle_at` goes back to the lane.
    async fn attempt<'a>(
        &'a self,
        job: &Job,
        envelope: &Envelope,
        recycle_at: Instant,
        first_slot: FirstSlot<'a>,
    ) -> Verdict {
        let account = &self.account;
        let attempts = envelope.attempts;
        let attempt = envelope.next_attempt();
        let mut round = Round::First;
        let mut first_slot = Some(first_slot);
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
            let turn = match first_slot.take() {
                Some(Ok(slot)) => self.wait_for_turn(recycle_at, Some(slot)).await,
                Some(Err(halt)) => Turn::from(halt),
                None => self.wait_for_turn(recycle_at, None).await,
            };
            let (admission, slot) = match turn {
                Turn::Go(admission, slot) => (admission, slot),
                Turn::Stop => {
                    return Verdict::without_attempt(
                        Settlement::Requeue,
                        attempts,
                        "shutting down",
                    );
                }
                Turn::Recycle => {
                    return Verdict::without_attempt(
                        Settlement::Recycle,
                        attempts,
                        format!(
                            "unsent after {} s of waiting; before the broker's consumer timeout",
                            self.recycle_after.as_secs()
                        ),
                    );
                }
            };
            let started = Instant::now();
            // Boxed: only a job at the vendor holds a request's state (kilobytes);
            // the many that wait for a slot in a lane's prefetch stay small.
            let answer = Box::pin(self.send(job, attempt, round))
                .instrument(crate::telemetry::vendor_request_span())
                .await;
            let renew = answer.renewed && round == Round::First;
            let failed = answer.class == Class::Transient && !renew;
            account.breaker.record(admission, failed);
            crate::metrics::vendor_request(account, started.elapsed());
            let seen = if failed || answer.class == Class::RateLimited {
                Seen::Overload
            } else if answer.class == Class::Delivered {
                Seen::Delivered
            } else {
                Seen::Refused
            };
            if let Some(limit) = slot.done(seen) {
                account.metrics.in_flight_limit(limit);
                debug!(in_flight_limit = limit, "in-flight limit changed");
            }
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
                    if account.limiter.pause(pause) && account.limiter.is_limited() {
                        // A standby that takes the lane over during the ban reads it there.
                        let board = self.ban_board();
                        // Boxed: a publish's state would otherwise be in every waiting job's.
                        let announced = Box::pin(ban::announce(&self.publisher, &board, pause));
                        if let Err(e) = announced.await {
                            warn!(error = %e, "could not write the ban on the lane's ban board");
                        }
                    }
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

    /// Comes when the lane stops or at `recycle_at`, whichever is first (a stop if both).
    pub(super) async fn halted(&self, recycle_at: Instant) -> Halt {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => Halt::Stop,
            _ = tokio::time::sleep_until(recycle_at) => Halt::Recycle,
        }
    }

    /// Waits for a slot of the in-flight limit (unless given one), the
    /// account's circuit breaker, then (rate-limited lanes) a fresh broker
    /// lease and a limiter token, until the lane stops or `recycle_at`; once
    /// either has come, the job waits no more even for a turn that is ready.
    async fn wait_for_turn<'a>(&'a self, recycle_at: Instant, slot: Option<Slot<'a>>) -> Turn<'a> {
        let account = &self.account;
        let halt = || async { Turn::from(self.halted(recycle_at).await) };
        let slot = match slot {
            Some(slot) => slot,
            None => tokio::select! {
                biased;
                halt = halt() => return halt,
                slot = account.in_flight.acquire() => slot,
            },
        };
        let admission = tokio::select! {
            biased;
            halt = halt() => return halt,
            admission = account.breaker.admit() => admission,
        };
        let lease = account.limiter.is_limited().then_some(&self.lease);
        loop {
            let ready = async {
                if let Some(lease) = lease {
                    lease.fresh().await;
                }
                account.limiter.acquire().await;
            };
            tokio::select! {
                biased;
                halt = halt() => {
                    account.breaker.abandon(admission);
                    return halt;
                }
                _ = ready => {}
            }
            // A lease gone stale while we waited for the token wins; the token is lost.
            if lease.is_none_or(|lease| lease.is_fresh()) {
                return Turn::Go(admission, slot);
            }
            debug!("broker lease went stale while waiting for a token; not sending");
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
}
