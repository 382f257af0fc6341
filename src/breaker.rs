//! A circuit breaker per account: stop hammering a vendor that keeps failing.
//!
//! After `threshold` consecutive retryable failures (5xx, timeouts, garbage) the
//! circuit opens: no job of the account is sent. Every `probe_interval` one job
//! goes through as a probe; its success closes the circuit, its failure keeps it
//! open for another interval. Jobs waiting at a closed gate have not been sent,
//! so they spend no attempt; jobs that failed go to their retry tier as usual.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else waits for its verdict.
    Probing,
}

/// The breaker's state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    Probing,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 open, 2 probing.
    pub fn value(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::Probing => 2.0,
        }
    }
}

/// Whether a request went through as usual or as the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

pub struct Breaker {
    /// 0 disables the breaker.
    threshold: u32,
    probe_interval: Duration,
    state: Mutex<State>,
    changed: Notify,
}

impl Breaker {
    pub fn new(threshold: u32, probe_interval: Duration) -> Self {
        Self {
            threshold,
            probe_interval,
            state: Mutex::new(State::Closed { failures: 0 }),
            changed: Notify::new(),
        }
    }

    /// What the breaker is doing, for the `herald_breaker_state` gauge.
    pub fn state(&self) -> BreakerState {
        match *self.state.lock().expect("breaker lock") {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::Probing => BreakerState::Probing,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(
            *self.state.lock().expect("breaker lock"),
            State::Closed { .. }
        )
    }

    /// Waits until a request may be sent.
    pub async fn admit(&self) -> Admission {
        loop {
            // Registered before the state is read, so no state change can be missed.
            let changed = self.changed.notified();
            let open_until = {
                let mut state = self.state.lock().expect("breaker lock");
                match *state {
                    State::Closed { .. } => return Admission::Normal,
                    State::Open { until } if Instant::now() >= until => {
                        *state = State::Probing;
                        return Admission::Probe;
                    }
                    State::Open { until } => Some(until),
                    State::Probing => None,
                }
            };
            match open_until {
                Some(until) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Gives an admission back unused (the lane is stopping): a probe not sent reopens the circuit.
    pub fn abandon(&self, admission: Admission) {
        let mut state = self.state.lock().expect("breaker lock");
        if admission == Admission::Probe && *state == State::Probing {
            *state = State::Open {
                until: Instant::now(),
            };
            self.changed.notify_waiters();
        }
    }

    /// Reports how an admitted request went: `failed` for retryable failures only.
    pub fn record(&self, admission: Admission, failed: bool) {
        if self.threshold == 0 {
            return;
        }
        let mut state = self.state.lock().expect("breaker lock");
        let next = match (*state, admission, failed) {
            (State::Probing, Admission::Probe, false) => {
                info!("vendor answered the probe: circuit closed");
                State::Closed { failures: 0 }
            }
            (State::Probing, Admission::Probe, true) => State::Open {
                until: Instant::now() + self.probe_interval,
            },
            (State::Closed { .. }, _, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, _, true) if failures + 1 >= self.threshold => {
                warn!(
                    failures = failures + 1,
                    probe_every_ms = self.probe_interval.as_millis() as u64,
                    "vendor keeps failing: circuit open, sending one probe per interval"
                );
                State::Open {
                    until: Instant::now() + self.probe_interval,
                }
            }
            (State::Closed { failures }, _, true) => State::Closed {
                failures: failures + 1,
            },
            // Answers to requests sent before the circuit opened change nothing.
            (other, _, _) => other,
        };
        if next != *state {
            *state = next;
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_failures_and_probes_once_per_interval() {
        let b = Breaker::new(3, Duration::from_secs(5));
        for _ in 0..2 {
            let a = b.admit().await;
            b.record(a, true);
        }
        assert!(!b.is_open());
        let a = b.admit().await;
        b.record(a, true);
        assert!(b.is_open());

        let started = Instant::now();
        let probe = b.admit().await;
        assert_eq!(probe, Admission::Probe);
        assert!(started.elapsed() >= Duration::from_secs(5));
        b.record(probe, true);
        let probe = b.admit().await;
        assert!(started.elapsed() >= Duration::from_secs(10));
        b.record(probe, false);
        assert!(!b.is_open());
        assert_eq!(b.admit().await, Admission::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_released_when_the_probe_succeeds() {
        let b = std::sync::Arc::new(Breaker::new(1, Duration::from_secs(1)));
        let a = b.admit().await;
        b.record(a, true);
        let probe = b.admit().await;
        assert_eq!(probe, Admission::Probe);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !waiter.is_finished(),
            "nobody passes while the probe is out"
        );
        b.record(probe, false);
        assert_eq!(waiter.await.unwrap(), Admission::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        b.record(Admission::Normal, true);
        b.record(Admission::Normal, false);
        b.record(Admission::Normal, true);
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_zero_disables_it() {
        let b = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            b.record(Admission::Normal, true);
        }
        assert!(!b.is_open());
    }
}
