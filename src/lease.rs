//! The broker lease: a rate-limited lane sends only while this replica hears its broker.
//!
//! When a connection's traffic is silently dropped (a half-open TCP
//! connection: no RST, no FIN), RabbitMQ closes it after about one heartbeat
//! timeout `h` of silence and hands single-active-consumer lanes to a standby;
//! lapin gives up only after `2h` without a byte. A replica that kept sending
//! in between would share the vendor's limit with its successor. So every
//! session makes a cheap round trip (`basic.qos` on a probe channel) every
//! `h / 4`. A limited lane may send while the last answered probe was *sent*
//! less than `h / 2` ago; the session ends once it was sent more than `h` ago.
//! The broker heard that probe, so it cannot have handed the lane over before
//! `sent + h`: the replica stops at least `h / 2` earlier, and the successor
//! waits one more window ([`crate::lane::TAKEOVER_WINDOW`]) before sending.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// Where a lease stands, by the age of the last answered probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Limited lanes may send.
    Fresh,
    /// Limited lanes wait: the broker may be gone.
    Stale,
    /// The broker may already have handed the lanes to another replica: end the session.
    Lost,
}

/// `age`: time since the last answered probe was sent; `heartbeat`: the agreed timeout.
pub fn standing(age: Duration, heartbeat: Duration) -> Standing {
    if age < heartbeat / 2 {
        Standing::Fresh
    } else if age <= heartbeat {
        Standing::Stale
    } else {
        Standing::Lost
    }
}

/// One broker session's lease.
pub struct Lease {
    heartbeat: Duration,
    /// When the last answered probe was sent (the session start at first).
    renewed: Mutex<Instant>,
    changed: Notify,
}

impl Lease {
    /// A lease as fresh as a connection just opened.
    pub fn new(heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            renewed: Mutex::new(Instant::now()),
            changed: Notify::new(),
        }
    }

    /// Starts the lease of a session on `conn`, with the heartbeat agreed with
    /// the broker (`asked` if none was). Losing it ends the session: `fault`
    /// says why and `stop` stops every lane.
    pub async fn start(
        conn: &Connection,
        asked: Duration,
        stop: &CancellationToken,
        fault: &Arc<OnceLock<String>>,
    ) -> lapin::Result<Arc<Self>> {
        let agreed = conn.configuration().heartbeat();
        let heartbeat = if agreed == 0 {
            asked
        } else {
            Duration::from_secs(agreed.into())
        };
        let lease = Arc::new(Self::new(heartbeat));
        let probe = conn.create_channel().await?;
        let (keeper, stop, fault) = (Arc::clone(&lease), stop.clone(), Arc::clone(fault));
        tokio::spawn(async move {
            if let Some(why) = keeper.keep(probe.clone(), stop.clone()).await {
                if fault.set(why.clone()).is_ok() {
                    error!(error = %why, "ending the broker session");
                }
                stop.cancel();
            }
            // Bounded: the broker may never answer again.
            let _ = tokio::time::timeout(
                keeper.heartbeat / 4,
                probe.close(200, "session over".into()),
            )
            .await;
        });
        Ok(lease)
    }

    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub fn standing(&self) -> Standing {
        let renewed = *self.renewed.lock().expect("lease lock");
        standing(renewed.elapsed(), self.heartbeat)
    }

    pub fn is_fresh(&self) -> bool {
        self.standing() == Standing::Fresh
    }

    /// A probe sent at `sent` was answered.
    pub fn renew(&self, sent: Instant) {
        let mut renewed = self.renewed.lock().expect("lease lock");
        if sent > *renewed {
            *renewed = sent;
            self.changed.notify_waiters();
        }
    }

    /// Waits until the lease is fresh (forever if it never is again: select on the session's stop).
    pub async fn fresh(&self) {
        loop {
            // Registered before the check, so no renewal can be missed.
            let changed = self.changed.notified();
            if self.is_fresh() {
                return;
            }
            changed.await;
        }
    }

    /// Probes the broker on `channel` every heartbeat / 4 until `stop`; returns
    /// why the lease was lost, or `None` when stopped.
    pub async fn keep(&self, channel: Channel, stop: CancellationToken) -> Option<String> {
        let mut tick = tokio::time::interval(self.heartbeat / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe: Option<std::pin::Pin<Box<dyn Future<Output = _> + Send>>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tick.tick() => {
                    let age = self.renewed.lock().expect("lease lock").elapsed();
                    if standing(age, self.heartbeat) == Standing::Lost {
                        return Some(format!(
                            "no answer from the broker to a probe sent {} ms ago (heartbeat {} s): the connection is presumed dead",
                            age.as_millis(),
                            self.heartbeat.as_secs()
                        ));
                    }
                    if probe.is_none() {
                        let channel = channel.clone();
                        let sent = Instant::now();
                        probe = Some(Box::pin(async move {
                            (sent, channel.basic_qos(0, BasicQosOptions::default()).await)
                        }));
                    }
                }
                (sent, answered) = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                    probe = None;
                    match answered {
                        Ok(()) => self.renew(sent),
                        Err(e) => {
                            warn!(error = %e, "broker lease probe failed");
                            return Some(format!("the broker lease probe failed: {e}"));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_under_half_a_heartbeat_lost_over_one() {
        let h = Duration::from_secs(4);
        assert_eq!(standing(Duration::ZERO, h), Standing::Fresh);
        assert_eq!(standing(Duration::from_millis(1999), h), Standing::Fresh);
        assert_eq!(standing(Duration::from_secs(2), h), Standing::Stale);
        assert_eq!(standing(Duration::from_secs(4), h), Standing::Stale);
        assert_eq!(standing(Duration::from_millis(4001), h), Standing::Lost);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_releases_lanes_waiting_on_a_stale_lease() {
        let lease = std::sync::Arc::new(Lease::new(Duration::from_secs(4)));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(lease.standing(), Standing::Stale);
        let waiter = tokio::spawn({
            let lease = lease.clone();
            async move { lease.fresh().await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "nothing sends on a stale lease");
        // A probe older than the current renewal changes nothing.
        lease.renew(Instant::now() - Duration::from_secs(20));
        assert_eq!(lease.standing(), Standing::Lost);
        lease.renew(Instant::now());
        waiter.await.unwrap();
        assert!(lease.is_fresh());
    }
}
