//! `herald run`: the broker connection supervisor and the lanes of every account.
//!
//! The supervisor connects, declares the topology, starts one lane per account
//! and waits. When the connection fails it marks the worker unready, backs off
//! and starts a new session; accounts (limiters, pauses, vendor clients with
//! their cached credentials) survive sessions. Cancelling `shutdown` drains
//! every lane and closes the connection cleanly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{self, Nodes, Publisher};
use crate::callback::Callbacks;
use crate::config::Config;
use crate::http::{self, Health, Limits};
use crate::http_enqueue::Intake;
use crate::lane::{Account, Lane};
use crate::lease::Lease;
use crate::topology::{DlqLayout, Names, Topology};

/// Where a worker's HTTP routes are served.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// `/healthz`, `/readyz`, `/metrics`, and `POST /v1/jobs` when `http.enqueue_token` is set.
    pub http: SocketAddr,
    /// The vendors' callback routes, when an account takes callbacks.
    pub callbacks: Option<SocketAddr>,
}

/// A worker, built from config and ready to run.
pub struct Worker {
    config: Config,
    /// The broker's nodes; a session connects to the first that answers.
    nodes: Nodes,
    accounts: Vec<Arc<Account>>,
    health: Arc<Health>,
    callbacks: Option<Callbacks>,
    intake: Option<Arc<Intake>>,
}

impl Worker {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        if config.accounts.is_empty() {
            anyhow::bail!("no [[account]] is configured: herald has nothing to deliver through");
        }
        let accounts = config
            .accounts
            .iter()
            .map(|a| Account::build(a, &config).map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        crate::metrics::register(&accounts, &config);
        let health = Arc::new(Health::new(accounts.len()));
        let callbacks = Callbacks::from_config(&config)?;
        let intake = Intake::from_config(&config);
        Ok(Self {
            nodes: Nodes::new(config.broker.url.clone()).with_heartbeat(config.broker.heartbeat),
            config,
            accounts,
            health,
            callbacks,
            intake,
        })
    }

    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Starts the HTTP listeners; returns their addresses (useful with port 0).
    pub async fn serve_http(&self, shutdown: CancellationToken) -> anyhow::Result<Listening> {
        let http = &self.config.http;
        let limits = Limits::from_config(http);
        let mut health = http::health_router(self.health());
        if let Some(intake) = &self.intake {
            health = health.merge(http::enqueue_router(Arc::clone(intake)));
        }
        let callbacks = self.callbacks.as_ref().map(Callbacks::router);
        let callback_paths = self
            .callbacks
            .as_ref()
            .map_or(String::new(), |c| c.paths().join(" "));
        let (health, callbacks) = match (callbacks, http.callback_listen) {
            (Some(callbacks), Some(apart)) => {
                let addr = http::spawn(
                    apart,
                    "http.callback_listen",
                    callbacks,
                    limits,
                    shutdown.clone(),
                )
                .await?;
                info!(%addr, "http listening: {callback_paths}");
                (health, Some(addr))
            }
            (Some(callbacks), None) => (health.merge(callbacks), None),
            (None, _) => (health, None),
        };
        let addr = http::spawn(http.listen, "http.listen", health, limits, shutdown).await?;
        let callback_here = self.callbacks.is_some() && callbacks.is_none();
        let callbacks = callbacks.or(callback_here.then_some(addr));
        let mut also = Vec::new();
        if callback_here {
            also.push(callback_paths.as_str());
        }
        if self.intake.is_some() {
            also.push(crate::http_enqueue::PATH);
        }
        info!(%addr, "http listening: /healthz /readyz /metrics {}", also.join(" "));
        Ok(Listening {
            http: addr,
            callbacks,
        })
    }

    /// Runs sessions until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = self.backoff();
        loop {
            let started = Instant::now();
            let result = self.session(&shutdown).await;
            self.health.set_connected(false);
            if shutdown.is_cancelled() {
                info!("worker stopped");
                return result;
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = self.backoff();
            }
            let delay = backoff.next().unwrap_or(self.config.broker.reconnect_max);
            match result {
                Err(e) => error!(
                    error = format!("{e:#}"),
                    retry_in_ms = delay.as_millis() as u64,
                    "broker session failed; reconnecting"
                ),
                Ok(()) => warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "broker session ended; reconnecting"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(self.config.broker.reconnect_max)
            .without_max_times()
            .with_jitter()
            .build()
    }

    async fn session(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let config = &self.config;
        let (conn, node) = self.nodes.connect("herald worker").await?;
        if Topology::from_config(config).declare(&conn).await? == DlqLayout::Legacy {
            warn!(
                dlq = %Names::new(&config.broker.prefix).dlq(),
                "the DLQ has an earlier herald's declaration: on RabbitMQ 4.x each read counts as a delivery \
                 and the broker drops a dead job after 20 reads; run `herald dlq migrate` once"
            );
        }
        // Publishing on a connection of its own: during an alarm the broker blocks
        // connections that publish, and the lanes' acks must still get through.
        let publishing = broker::connect_to(&node, "herald worker publisher").await?;
        let publisher = Publisher::open(&publishing, config.broker.confirm_timeout).await?;
        let _routes = SessionRoutes::open(
            self,
            &publisher,
            tokio::spawn(watch_blocked(publishing.events_listener(), self.health())),
        );
        self.health.set_connected(true);
        info!(broker = %node, prefix = %config.broker.prefix, "connected; topology declared");

        let known_accounts: Arc<BTreeSet<String>> =
            Arc::new(config.accounts.iter().map(|a| a.routing_key()).collect());
        let stop = shutdown.child_token();
        // If setting up the session fails half-way (a channel cannot be opened),
        // the lanes already started must stop too: their jobs would otherwise
        // keep waiting to send on a session that is gone.
        let _stop_on_exit = stop.clone().drop_guard();
        let fault = Arc::new(std::sync::OnceLock::new());
        let depths = conn.create_channel().await?;
        tokio::spawn(crate::metrics::watch_depths(
            depths,
            crate::metrics::watched_queues(&self.accounts, &Names::new(&config.broker.prefix)),
            stop.clone(),
        ));
        let lease = Lease::start(&conn, config.broker.heartbeat, &stop, &fault).await?;
        let mut lanes = JoinSet::new();
        for account in &self.accounts {
            let lane = Arc::new(Lane {
                account: Arc::clone(account),
                names: Names::new(&config.broker.prefix),
                publisher: publisher.clone(),
                max_job_bytes: config.worker.max_job_bytes,
                known_accounts: Arc::clone(&known_accounts),
                stop: stop.clone(),
                fault: Arc::clone(&fault),
                drain_timeout: config.worker.drain_timeout,
                lease: Arc::clone(&lease),
                recycle_after: config.broker.consumer_timeout / 2,
            });
            let channel = conn.create_channel().await?;
            let board = match account.limiter.is_limited() {
                true => Some(conn.create_channel().await?),
                false => None,
            };
            let health = self.health();
            lanes.spawn(lane.run(channel, board, move || health.lane_consuming()));
        }

        let mut first_error = None;
        let mut stopping = false;
        loop {
            tokio::select! {
                joined = lanes.join_next() => {
                    let Some(joined) = joined else { break };
                    let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
                    if let Err(e) = result {
                        // One lane failing usually means the connection failed: end the session.
                        self.health.set_connected(false);
                        stop.cancel();
                        first_error.get_or_insert(e);
                    }
                }
                // A lane whose channel died stops the session's lanes at once, then drains
                // for up to drain_timeout: not ready from the moment it stops, not after.
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    self.health.set_connected(false);
                }
            }
        }
        drop(_routes);
        // A blocked connection reads no close: it is left to go when the alarm
        // ends (or the process exits) instead of holding up the session's end.
        if !publisher.is_blocked() {
            publisher.close().await;
            broker::close(&publishing, "herald stopping").await;
        }
        broker::close(&conn, "herald stopping").await;
        match (first_error, fault.get()) {
            (Some(e), _) => Err(e),
            (None, Some(why)) => Err(anyhow::anyhow!("{why}")),
            (None, None) => Ok(()),
        }
    }
}

/// What a session lends to the routes that outlive it (vendor callbacks,
/// HTTP intake) and its alarm watcher; taken back however the session ends,
/// also when its set-up fails half-way.
struct SessionRoutes<'a> {
    worker: &'a Worker,
    watch_blocked: tokio::task::JoinHandle<()>,
}

impl<'a> SessionRoutes<'a> {
    fn open(
        worker: &'a Worker,
        publisher: &Publisher,
        watch_blocked: tokio::task::JoinHandle<()>,
    ) -> Self {
        if let Some(callbacks) = &worker.callbacks {
            callbacks.set_publisher(Some(publisher.clone()));
        }
        if let Some(intake) = &worker.intake {
            intake.set_publisher(Some(publisher.clone()));
        }
        Self {
            worker,
            watch_blocked,
        }
    }
}

impl Drop for SessionRoutes<'_> {
    fn drop(&mut self) {
        if let Some(callbacks) = &self.worker.callbacks {
            callbacks.set_publisher(None);
        }
        if let Some(intake) = &self.worker.intake {
            intake.set_publisher(None);
        }
        self.watch_blocked.abort();
        self.worker.health.set_blocked(None);
    }
}

/// Tells readiness while the broker blocks the session's publishing connection
/// (`connection.blocked`: a memory or disk alarm), and why.
async fn watch_blocked(
    events: impl futures_util::Stream<Item = lapin::Event> + Send + 'static,
    health: Arc<Health>,
) {
    use futures_util::StreamExt;
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                warn!(reason = %reason, "the broker blocks publishing (alarm); not ready, retry and DLQ copies wait for it");
                health.set_blocked(Some(reason));
            }
            lapin::Event::ConnectionUnblocked => {
                info!("the broker publishes again");
                health.set_blocked(None);
            }
            _ => {}
        }
    }
}
