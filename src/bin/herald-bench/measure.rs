//! One measured run of one worker: over a backlog (throughput, RSS) or at a
//! fixed publish rate (latency). Figures come from the receiver, on arrival.

use std::path::PathBuf;
use std::time::Duration;

use herald::broker::Publisher;
use herald::config::BrokerUrls;
use lapin::Connection;

use crate::receiver::{self, Stats};
use crate::workers::{self, Process, Target, Worker};

/// What every run of a bench session shares: the broker, the bench's own
/// connection and publisher, and the receiver process.
pub struct Session {
    pub broker: BrokerUrls,
    pub conn: Connection,
    pub publisher: Publisher,
    pub receiver: receiver::Handle,
}

impl Session {
    pub async fn start(broker: &BrokerUrls, latency: Duration) -> anyhow::Result<Self> {
        let (conn, publisher) = workers::connect(broker).await?;
        Ok(Self {
            broker: broker.clone(),
            conn,
            publisher,
            receiver: receiver::Handle::spawn(latency)?,
        })
    }

    pub async fn close(self) {
        self.publisher.close().await;
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

/// How one run went.
#[derive(Debug, Clone)]
pub struct Run {
    pub worker: Worker,
    pub stats: Stats,
    /// The worker's peak RSS, read just before it was stopped.
    pub rss_mib: Option<f64>,
    /// herald's WARN and ERROR lines (0 for the baselines, whose logs say nothing).
    pub warnings: usize,
    pub log: Option<PathBuf>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.stats.rate()
    }

    /// Requests beyond one per job: retries of failed or timed-out requests, redeliveries.
    pub fn extra_requests(&self) -> u64 {
        self.stats.arrivals.saturating_sub(self.stats.unique)
    }
}

/// A worker started on a prepared target, until [`Running::finish`].
pub struct Running<'a> {
    session: &'a Session,
    target: Target,
    process: Process,
}

impl<'a> Running<'a> {
    /// Prepares `worker`'s queue, publishes `backlog` jobs into it, then starts it.
    pub async fn start(
        session: &'a Session,
        worker: &Worker,
        backlog: usize,
    ) -> anyhow::Result<Running<'a>> {
        Self::start_wrapped(session, worker, backlog, &[]).await
    }

    /// The same, with herald's command prefixed by `wrapper` (a profiler).
    pub async fn start_wrapped(
        session: &'a Session,
        worker: &Worker,
        backlog: usize,
        wrapper: &[String],
    ) -> anyhow::Result<Running<'a>> {
        let target =
            Target::prepare(&session.conn, &session.broker, worker, &session.receiver).await?;
        target.publish(&session.publisher, 0..backlog).await?;
        session.receiver.reset().await?;
        let process = target.spawn(&session.broker, &session.receiver, wrapper)?;
        Ok(Self {
            session,
            target,
            process,
        })
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The worker's exit status, if it exited already.
    pub fn process_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.exited()
    }

    /// Waits until `n` distinct jobs arrived (failing after 60 s without one).
    pub async fn wait_for(&mut self, n: usize) -> anyhow::Result<Stats> {
        let waiting = self
            .session
            .receiver
            .wait_for(n as u64, Duration::from_secs(60));
        tokio::pin!(waiting);
        loop {
            tokio::select! {
                stats = &mut waiting => return stats,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Some(status) = self.process.exited() {
                        anyhow::bail!("{} exited early: {status}", self.target.worker.label());
                    }
                }
            }
        }
    }

    /// Stops the worker, deletes its queue, and reports the run.
    pub async fn finish(self, stats: Stats) -> anyhow::Result<Run> {
        let rss_mib = self.process.peak_rss_mib();
        self.process.stop(Duration::from_secs(15))?;
        let worker = self.target.worker.clone();
        let log = workers::bench_dir()?.join(format!("{}.log", self.target.file_stem()));
        let warnings = if worker.is_herald() {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .count()
        } else {
            0
        };
        self.target.finish(&self.session.conn).await?;
        Ok(Run {
            worker,
            stats,
            rss_mib,
            warnings,
            log: Some(log),
        })
    }
}

/// `n` jobs published before the worker starts; the rate is taken at the
/// receiver from the first arrival to the last.
pub async fn backlog(session: &Session, worker: &Worker, n: usize) -> anyhow::Result<Run> {
    let mut running = Running::start(session, worker, n).await?;
    let stats = running.wait_for(n).await?;
    running.finish(stats).await
}

/// `rate` jobs/s published for `seconds` to a worker already consuming (after
/// `warmup` jobs at the same rate); latency is arrival minus publish time.
pub async fn fixed_rate(
    session: &Session,
    worker: &Worker,
    rate: u32,
    seconds: u32,
    warmup: usize,
) -> anyhow::Result<Run> {
    let mut running = Running::start(session, worker, 0).await?;
    publish_at(session, running.target(), rate, 0..warmup).await?;
    running.wait_for(warmup).await?;
    session.receiver.reset().await?;
    let n = rate as usize * seconds as usize;
    publish_at(session, running.target(), rate, warmup..warmup + n).await?;
    let stats = running.wait_for(n).await?;
    running.finish(stats).await
}

/// Publishes jobs `range` at `rate` per second, each stamped when it is
/// published; confirms are awaited apart, so they do not hold the pace.
async fn publish_at(
    session: &Session,
    target: &Target,
    rate: u32,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut confirms = futures_util::stream::FuturesUnordered::new();
    for i in range {
        loop {
            tokio::select! {
                _ = tick.tick() => break,
                Some(confirmed) = confirms.next(), if !confirms.is_empty() => confirmed?,
            }
        }
        confirms.push(target.publish_one(&session.publisher, i));
    }
    while let Some(confirmed) = confirms.next().await {
        confirmed?;
    }
    Ok(())
}
