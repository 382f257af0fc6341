//! What happens to a job after one sending attempt, decided by a pure function.
//!
//! Vendor clients classify their answers into a [`Class`] (through their own code
//! tables); [`decide`] turns that class, the attempt number and the retry policy
//! into an [`Outcome`]. No I/O happens here, so every rule is unit-tested.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A vendor answer, classified by the vendor's code table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The vendor accepted the message.
    Delivered,
    /// Worth another try later: transport errors, timeouts, 5xx, "busy".
    Transient,
    /// The account hit the vendor's rate limit; the whole lane must pause.
    RateLimited,
    /// The vendor will never accept this job as it is.
    Permanent,
}

/// One classified answer, with the vendor's own code and words for the DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub class: Class,
    /// The vendor's code (`416`, `http-503`, `transport`), if any.
    pub code: Option<String>,
    pub detail: String,
    /// The request never left this process (connect failure): safe to retry at once.
    pub unsent: bool,
    /// The vendor refused the client's credentials as stale (an expired UserSig,
    /// a revoked token) and the client has renewed them: the lane sends this
    /// attempt once more, through the limiter like any request.
    pub renewed: bool,
    /// The vendor's id for the message it accepted (OpenIM `serverMsgID`,
    /// Tencent `MsgKey` or `MsgSeq`; NetEase gives none).
    pub message_id: Option<String>,
}

impl Answer {
    pub fn delivered() -> Self {
        Self::new(Class::Delivered, None, "")
    }

    /// Accepted, under the vendor's own id for the message, if it gives one.
    pub fn delivered_as(message_id: Option<String>) -> Self {
        Self {
            message_id,
            ..Self::delivered()
        }
    }

    pub fn new(class: Class, code: Option<String>, detail: impl Into<String>) -> Self {
        Self {
            class,
            code,
            detail: detail.into(),
            unsent: false,
            renewed: false,
            message_id: None,
        }
    }

    /// Stale credentials were refused and renewed: the lane sends the attempt once more.
    pub fn credentials_renewed(code: Option<String>, detail: impl Into<String>) -> Self {
        Self {
            renewed: true,
            ..Self::new(Class::Transient, code, detail)
        }
    }
}

/// Why a job ended in the dead-letter queue (header `x-herald-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// herald refused it before sending: malformed, unknown vendor or account, broken field limits.
    Invalid,
    /// The vendor refused it for good (parameter, permission, not found).
    Permanent,
    /// Retryable failures outlasted the retry schedule.
    Exhausted,
    /// Its `expires_at` passed before it could be delivered.
    Expired,
    /// It was redelivered past the lane's delivery limit (it crashes or hangs workers).
    Poison,
    /// Its routing key matched no lane.
    Unroutable,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Invalid,
        Reason::Permanent,
        Reason::Exhausted,
        Reason::Expired,
        Reason::Poison,
        Reason::Unroutable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "invalid",
            Reason::Permanent => "permanent",
            Reason::Exhausted => "exhausted",
            Reason::Expired => "expired",
            Reason::Poison => "poison",
            Reason::Unroutable => "unroutable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the lane does with the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// Publish to retry tier `tier` (index into the schedule), counting this attempt.
    RetryIn {
        tier: usize,
        delay: Duration,
    },
    /// Pause the lane for this long, then send the job again without counting an attempt.
    PauseLane(Duration),
    Dead(Reason),
}

/// The retry schedule of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub tiers: Vec<Duration>,
    pub max_attempts: u32,
    /// How long the vendor blocks an account that exceeded its rate limit.
    pub ban: Duration,
}

/// Turns a classified answer to attempt number `attempt` (1-based) into an outcome.
pub fn decide(class: Class, attempt: u32, policy: &Policy) -> Outcome {
    match class {
        Class::Delivered => Outcome::Ack,
        Class::Permanent => Outcome::Dead(Reason::Permanent),
        Class::RateLimited => Outcome::PauseLane(policy.ban),
        Class::Transient => match next_tier(attempt, policy) {
            Some((tier, delay)) => Outcome::RetryIn { tier, delay },
            None => Outcome::Dead(Reason::Exhausted),
        },
    }
}

/// The retry tier after failed attempt `attempt`, or `None` when attempts ran out.
fn next_tier(attempt: u32, policy: &Policy) -> Option<(usize, Duration)> {
    if attempt >= policy.max_attempts {
        return None;
    }
    let tier = (attempt.saturating_sub(1) as usize).min(policy.tiers.len() - 1);
    Some((tier, policy.tiers[tier]))
}

/// Where a failed attempt's copy goes: a retry tier or the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The retry tier whose messages wait this long.
    Retry(Duration),
    Dead(Reason),
}

impl Destination {
    /// The `herald_jobs_total` outcome (`herald_callbacks_total` result) and reason labels.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Destination::Retry(_) => ("retried", "transient"),
            Destination::Dead(reason) => ("dead", reason.as_str()),
        }
    }
}

/// What happens to a job whose message the vendor accepted and failed later
/// (Tencent's `Group.CallbackSendMsgException`): attempt `attempt` failed. An
/// expired job is dead; a frequency code is worth another attempt, by the
/// lane's rule for a transient failure; any other code is the vendor's final
/// word (Tencent reports no transient failure this way: a message it accepted
/// and could not deliver will not be delivered by sending it again unchanged).
pub fn decide_late_failure(
    class: Class,
    attempt: u32,
    expired: bool,
    policy: &Policy,
) -> Destination {
    if expired {
        return Destination::Dead(Reason::Expired);
    }
    match class {
        Class::RateLimited => next_tier(attempt, policy)
            .map_or(Destination::Dead(Reason::Exhausted), |(_, delay)| {
                Destination::Retry(delay)
            }),
        Class::Delivered | Class::Transient | Class::Permanent => {
            Destination::Dead(Reason::Permanent)
        }
    }
}

/// A job whose deadline has passed is dead-lettered instead of sent.
pub fn is_expired(expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    expires_at.is_some_and(|deadline| deadline <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            tiers: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            max_attempts: 5,
            ban: Duration::from_secs(10),
        }
    }

    #[test]
    fn delivered_is_acked() {
        assert_eq!(decide(Class::Delivered, 1, &policy()), Outcome::Ack);
    }

    #[test]
    fn transient_failures_walk_the_tiers_and_repeat_the_last() {
        let p = policy();
        let tiers: Vec<_> = (1..=4)
            .map(|attempt| match decide(Class::Transient, attempt, &p) {
                Outcome::RetryIn { tier, .. } => tier,
                other => panic!("attempt {attempt}: {other:?}"),
            })
            .collect();
        assert_eq!(tiers, [0, 1, 2, 2]);
    }

    #[test]
    fn transient_failure_on_the_last_attempt_is_exhausted() {
        assert_eq!(
            decide(Class::Transient, 5, &policy()),
            Outcome::Dead(Reason::Exhausted)
        );
    }

    #[test]
    fn rate_limit_pauses_the_lane_for_the_ban_even_on_the_last_attempt() {
        assert_eq!(
            decide(Class::RateLimited, 5, &policy()),
            Outcome::PauseLane(Duration::from_secs(10))
        );
    }

    #[test]
    fn permanent_is_dead_on_first_attempt() {
        assert_eq!(
            decide(Class::Permanent, 1, &policy()),
            Outcome::Dead(Reason::Permanent)
        );
    }

    #[test]
    fn a_late_frequency_failure_takes_the_next_tier_until_attempts_run_out() {
        let p = policy();
        assert_eq!(
            decide_late_failure(Class::RateLimited, 2, false, &p),
            Destination::Retry(Duration::from_secs(5))
        );
        for attempt in [1, 2, 3, 4] {
            let Outcome::RetryIn { delay, .. } = decide(Class::Transient, attempt, &p) else {
                panic!("attempt {attempt}")
            };
            assert_eq!(
                decide_late_failure(Class::RateLimited, attempt, false, &p),
                Destination::Retry(delay),
                "the lane's rule for attempt {attempt}"
            );
        }
        assert_eq!(
            decide_late_failure(Class::RateLimited, 5, false, &p),
            Destination::Dead(Reason::Exhausted)
        );
    }

    #[test]
    fn a_late_failure_never_pauses_the_lane_and_other_codes_are_final() {
        let p = policy();
        for class in [Class::Delivered, Class::Transient, Class::Permanent] {
            assert_eq!(
                decide_late_failure(class, 1, false, &p),
                Destination::Dead(Reason::Permanent),
                "{class:?}"
            );
        }
    }

    #[test]
    fn a_late_failure_of_an_expired_job_is_expired_whatever_the_code() {
        for class in [Class::RateLimited, Class::Permanent] {
            assert_eq!(
                decide_late_failure(class, 1, true, &policy()),
                Destination::Dead(Reason::Expired)
            );
        }
    }

    #[test]
    fn expiry_is_inclusive_and_optional() {
        let now = Utc::now();
        assert!(is_expired(Some(now), now));
        assert!(!is_expired(Some(now + chrono::Duration::seconds(1)), now));
        assert!(!is_expired(None, now));
    }

    #[test]
    fn reasons_round_trip_through_their_header_value() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }
}
