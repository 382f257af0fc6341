//! `herald console`: the dead-letter queue in a browser, served from the
//! binary on its own listener (`console.listen`).
//!
//! The pages are server-rendered ([`page`]) from an in-memory [`index`] that
//! one reader pass builds; a job page, a text search and every action make
//! their own pass through [`crate::dlq`], the same functions `herald dlq`
//! uses, so the console needs only `[broker]` and audits as the CLI does
//! (under the token's name). Who may do what is [`auth`]; the routes are
//! [`routes`]. The console holds the DLQ's reader lock only during a pass.

mod actions;
pub mod auth;
pub mod chart;
pub mod index;
pub mod page;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker;
use crate::config::ReviewConfig;
use crate::dlq::{self, DeadJob, Plan};
use crate::http::Limits;
use crate::topology::Names;
use auth::{Sessions, Tokens};
use index::{Builder, Index};
use page::JobDetail;

/// How long a purge plan waits for its confirmation.
const PLAN_TTL: Duration = Duration::from_secs(3600);
/// Plans kept at most; the oldest goes first.
const MAX_PLANS: usize = 32;

/// The console's state: config, broker connection, sessions, index and plans.
pub struct Console {
    config: ReviewConfig,
    names: Names,
    tokens: Tokens,
    sessions: Sessions,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    index: RwLock<Option<Arc<Index>>>,
    /// One build at a time; `builds` counts the builds begun.
    building: tokio::sync::Mutex<()>,
    builds: AtomicU64,
    plans: Mutex<HashMap<String, StoredPlan>>,
}

/// A purge preview's exact list, waiting for its confirmation by its owner.
struct StoredPlan {
    owner: String,
    plan: Plan,
    /// The list in the `dlq purge --save-plan` format.
    text: String,
    created: Instant,
}

impl Console {
    /// A console for `config`; it connects to the broker on first use.
    pub fn new(config: ReviewConfig) -> anyhow::Result<Arc<Self>> {
        config.console.check_startable()?;
        Ok(Arc::new(Self {
            names: Names::new(&config.broker.prefix),
            tokens: Tokens::from_config(&config.console),
            sessions: Sessions::default(),
            conn: tokio::sync::Mutex::new(None),
            index: RwLock::new(None),
            building: tokio::sync::Mutex::new(()),
            builds: AtomicU64::new(0),
            plans: Mutex::new(HashMap::new()),
            config,
        }))
    }

    /// The broker connection, opened again if it was lost.
    async fn conn(&self) -> anyhow::Result<Arc<Connection>> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(Arc::clone(conn));
        }
        let conn = Arc::new(broker::connect(&self.config.broker.url, "herald console").await?);
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// The current index, building the first one if there is none yet.
    pub async fn index(&self) -> anyhow::Result<Arc<Index>> {
        if let Some(index) = self.current() {
            return Ok(index);
        }
        // The first build (started with the listener) may be under way: wait for it, not a second pass.
        drop(self.building.lock().await);
        if let Some(index) = self.current() {
            return Ok(index);
        }
        self.rebuild().await
    }

    fn current(&self) -> Option<Arc<Index>> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Builds a new index in one pass. A caller that waited for a build
    /// started after it asked takes that one instead of reading the DLQ again.
    pub async fn rebuild(&self) -> anyhow::Result<Arc<Index>> {
        let asked = self.builds.load(Ordering::SeqCst);
        let _building = self.building.lock().await;
        // A build that began after this call asked has seen everything done before it.
        if self.builds.load(Ordering::SeqCst) > asked
            && let Some(index) = self.current()
        {
            return Ok(index);
        }
        self.builds.fetch_add(1, Ordering::SeqCst);
        let conn = self.conn().await?;
        let started = Instant::now();
        let at = Utc::now();
        let mut builder = Builder::default();
        let coverage = dlq::scan(&conn, &self.names, |d| {
            builder.add(&DeadJob::from_delivery(d))
        })
        .await?;
        let index = Arc::new(builder.finish(coverage, at, started.elapsed()));
        info!(
            jobs = index.total(),
            groups = index.groups.len(),
            took_ms = index.took.as_millis() as u64,
            "console index built"
        );
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&index));
        Ok(index)
    }

    /// Every dead copy of the job `handle` names (an id, or a fingerprint),
    /// read in one pass that stops once it found the `expected` copies the index knows of.
    async fn find(
        &self,
        handle: &str,
        expected: usize,
    ) -> anyhow::Result<(Vec<JobDetail>, Option<String>)> {
        let conn = self.conn().await?;
        let mut reader = dlq::Reader::open(&conn, &self.names).await?;
        let mut found = Vec::new();
        let mut early = false;
        let by_fingerprint = handle.len() == 64 && handle.bytes().all(|b| b.is_ascii_hexdigit());
        while let Some(delivery) = reader.next().await {
            let id = crate::envelope::job_id(&delivery.properties, &delivery.data);
            // Hashing every message is the cost of a pass: only for a handle that can be a fingerprint.
            let matches = id.as_deref() == Some(handle)
                || (by_fingerprint
                    && dlq::fingerprint(
                        &delivery.properties,
                        delivery.routing_key.as_str(),
                        &delivery.data,
                    ) == handle);
            if matches {
                found.push(JobDetail::of(&delivery));
                if expected > 0 && found.len() >= expected {
                    early = true;
                    break;
                }
            }
        }
        let warning = if early {
            None
        } else {
            reader.coverage().warning()
        };
        reader.close(0).await;
        Ok((found, warning))
    }

    fn store_plan(&self, owner: String, plan: Plan, text: String) -> String {
        let id = auth::random_hex();
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        plans.retain(|_, p| p.created.elapsed() < PLAN_TTL);
        while plans.len() >= MAX_PLANS {
            let oldest = plans
                .iter()
                .min_by_key(|(_, p)| p.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => plans.remove(&k),
                None => break,
            };
        }
        plans.insert(
            id.clone(),
            StoredPlan {
                owner,
                plan,
                text,
                created: Instant::now(),
            },
        );
        id
    }

    /// Takes plan `id` if `owner` made it and it has not expired: a plan runs once.
    fn take_plan(&self, id: &str, owner: &str) -> Option<Plan> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let fits = plans
            .get(id)
            .is_some_and(|p| p.owner == owner && p.created.elapsed() < PLAN_TTL);
        fits.then(|| plans.remove(id).map(|p| p.plan)).flatten()
    }

    fn plan_text(&self, id: &str, owner: &str) -> Option<String> {
        let plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        plans
            .get(id)
            .filter(|p| p.owner == owner)
            .map(|p| p.text.clone())
    }

    /// `text` with the broker's passwords and every console token masked.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for node in self.config.broker.url.nodes() {
            text = node.scrub(&text);
        }
        let tokens: Vec<&str> = self.tokens.all().collect();
        crate::redact::scrub(&text, &tokens)
    }
}

/// The console's listener: long requests are allowed (an action on 100,000
/// jobs at a rate takes minutes), and every action runs to its end even if
/// the browser goes away.
fn limits() -> Limits {
    Limits {
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(3600),
        max_connections: 64,
    }
}

/// Serves `console` on `addr` until `shutdown`, starting the first index
/// build at once; returns the bound address.
pub async fn spawn(
    console: Arc<Console>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let bound = crate::http::spawn(
        addr,
        "console.listen",
        routes::router(Arc::clone(&console)),
        limits(),
        shutdown,
    )
    .await?;
    tokio::spawn(async move {
        if let Err(e) = console.rebuild().await {
            warn!(error = %console.scrub(&format!("{e:#}")), "the console's first index build failed; the overview will try again");
        }
    });
    Ok(bound)
}

/// `herald console`: refuses to start without a token, serves until SIGTERM or Ctrl-C.
pub async fn run(config: ReviewConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = config.console.listen;
    let console = Console::new(config)?;
    // Fail at start, not on the first page, when the broker cannot be reached.
    console.conn().await?;
    let bound = spawn(Arc::clone(&console), listen, shutdown.clone()).await?;
    info!(addr = %bound, "console serving on http://{bound}/");
    shutdown.cancelled().await;
    if let Some(conn) = console.conn.lock().await.take() {
        broker::close(&conn, "console stopped").await;
    }
    Ok(())
}
