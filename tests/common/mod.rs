//! Shared test harness: a real RabbitMQ, herald's sandbox, and a worker built from test config.
//!
//! Every app gets its own topology prefix, so tests run in parallel and
//! repeatedly against one broker; the topology is deleted when the app drops,
//! also when the test fails.
#![allow(dead_code)]

pub mod browser;
pub mod proxy;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use herald::broker::{self, Publisher};
use herald::config::{AccountConfig, AccountRetry, BrokerUrls, Config};
use herald::dlq::{self, DeadJob};
use herald::http::Health;
use herald::sandbox::{AppStats, Delivered, Sandbox, Settings, netease};
use herald::topology::{Names, Topology};
use herald::worker::{Listening, Worker};
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The token Tencent signs the tests' callbacks with.
pub const CALLBACK_TOKEN: &str = "cb-token";
/// herald's own key for sealing what it sends to the sandbox's Tencent app.
pub const CALLBACK_KEY: &str = "cb-key-only-herald-knows-0123456789";

/// The host of a base URL that [`spawn_app`] points at the sandbox.
pub const SANDBOX_HOST: &str = "sandbox.invalid";

/// One `[[account]]` of a test app, typed: herald's own [`AccountConfig`]
/// for the keys every account has, and the vendor's keys beside it in plain
/// text (an `AccountConfig` holds them as secrets, which serialize redacted).
#[derive(Debug, Clone)]
pub struct Account {
    pub config: AccountConfig,
    keys: BTreeMap<String, String>,
    /// The sandbox's NetEase app whose key and secret it uses, by index.
    netease_app: Option<usize>,
}

impl Account {
    /// An account of `vendor` with every common key at its default, served
    /// by the sandbox under `mount`.
    pub fn new(vendor: &str, name: &str, mount: &str) -> Self {
        let mut table = toml::Table::new();
        table.insert("vendor".into(), vendor.into());
        table.insert("name".into(), name.into());
        table.insert(
            "base_url".into(),
            format!("http://{SANDBOX_HOST}{mount}").into(),
        );
        Self {
            config: toml::Value::Table(table)
                .try_into()
                .expect("an account with its defaults"),
            keys: BTreeMap::new(),
            netease_app: None,
        }
    }

    /// A vendor key (a credential, a callback setting).
    pub fn key(mut self, key: &str, value: impl ToString) -> Self {
        self.keys.insert(key.to_string(), value.to_string());
        self
    }

    /// A base URL of its own (an unreachable vendor, say); a host of
    /// `sandbox.invalid` still means the sandbox.
    pub fn base_url(mut self, url: &str) -> Self {
        self.config.base_url = url.parse().expect("a valid base URL");
        self
    }

    pub fn rate_limit(mut self, rate_limit: Option<u32>) -> Self {
        self.config.rate_limit = rate_limit;
        self
    }

    pub fn concurrency(mut self, concurrency: u16) -> Self {
        self.config.concurrency = Some(concurrency);
        self
    }

    pub fn ban(mut self, ban: Duration) -> Self {
        self.config.ban = Some(ban);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    pub fn breaker(mut self, threshold: u32, probe: Duration) -> Self {
        self.config.breaker_threshold = threshold;
        self.config.breaker_probe = probe;
        self
    }

    /// `[account.retry]`.
    pub fn retry(mut self, tiers: &[Duration], max_attempts: u32) -> Self {
        self.config.retry = Some(AccountRetry {
            tiers: tiers.to_vec(),
            max_attempts: Some(max_attempts),
        });
        self
    }

    /// Callbacks signed with [`CALLBACK_TOKEN`] and sealed with [`CALLBACK_KEY`].
    pub fn signed_callbacks(self) -> Self {
        self.key("callback_token", CALLBACK_TOKEN)
            .key("callback_key", CALLBACK_KEY)
    }

    /// The `[[account]]` table, pointed at the sandbox on `sandbox`.
    fn table(&self, sandbox: SocketAddr, settings: &Settings) -> toml::Table {
        let mut config = self.config.clone();
        if config.base_url.host_str() == Some(SANDBOX_HOST) {
            config.base_url.set_host(Some("127.0.0.1")).unwrap();
            config.base_url.set_port(Some(sandbox.port())).unwrap();
        }
        let mut table = toml::Table::try_from(&config).expect("an account serializes");
        if let Some(i) = self.netease_app {
            let app = &settings.get::<netease::Settings>().apps[i];
            table.insert("app_key".into(), app.id.clone().into());
            table.insert("app_secret".into(), app.secret.clone().into());
        }
        for (key, value) in &self.keys {
            table.insert(key.clone(), value.clone().into());
        }
        table
    }
}

/// A NetEase account on the sandbox's app `app` (its index in the sandbox's
/// NetEase settings), at the tests' usual 100/s and 8 in flight.
pub fn netease_account(name: &str, app: usize) -> Account {
    Account {
        netease_app: Some(app),
        ..Account::new("netease", name, "/netease/nimserver")
            .rate_limit(Some(100))
            .concurrency(8)
    }
}

/// A Tencent account on the sandbox's Tencent app, named `name`.
pub fn tencent_account(name: &str) -> Account {
    Account::new("tencent", name, "/tencent")
        .key("sdk_app_id", 1400000000)
        .key("secret_key", "tencent-demo-key")
        .key("admin_identifier", "administrator")
}

/// An OpenIM account on the sandbox's OpenIM admin, named `name`.
pub fn openim_account(name: &str) -> Account {
    Account::new("openim", name, "/openim")
        .key("admin_user_id", "imAdmin")
        .key("secret", "openIM123")
}

/// A job's AMQP properties as a producer sets them: JSON, with its id.
pub fn job_properties(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(id))
}

pub fn broker_url() -> String {
    std::env::var("HERALD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Knobs a test may turn; everything else is the production default.
#[derive(Debug, Clone)]
pub struct Options {
    pub tiers: Vec<&'static str>,
    pub max_attempts: u32,
    pub sandbox: Settings,
    pub start_worker: bool,
    /// The accounts, one lane each: only those the test uses. By default one
    /// NetEase account, `default`, on the sandbox's first app.
    pub accounts: Vec<Account>,
    /// Extra TOML lines for `[broker]`.
    pub broker_extra: &'static str,
    /// Extra TOML lines for `[worker]`.
    pub worker_extra: &'static str,
    /// Extra TOML lines for `[http]`.
    pub http_extra: &'static str,
    /// Run with no other test of this binary: for tests that measure rates at the receiver.
    pub alone: bool,
    /// `broker.url` as a list of nodes (a cluster); empty: [`broker_url`] alone.
    pub broker_nodes: Vec<String>,
}

/// Tests that measure arrival rates at the sandbox run alone in their test
/// binary (cargo runs binaries one after another). On two cores, other tests'
/// workers and process start-ups can delay some requests and let later ones
/// catch up; the limiter's two spare requests cover only ~21 ms of such jitter
/// (see `herald::limit`).
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

enum TimingGuard {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tiers: vec!["200ms", "400ms"],
            max_attempts: 4,
            sandbox: Settings::default(),
            start_worker: true,
            accounts: vec![netease_account("default", 0)],
            broker_extra: "",
            worker_extra: "",
            http_extra: "",
            alone: false,
            broker_nodes: Vec::new(),
        }
    }
}

pub struct TestApp {
    pub config: Config,
    pub config_text: String,
    pub sandbox: Sandbox,
    pub sandbox_addr: SocketAddr,
    pub names: Names,
    pub conn: Connection,
    pub publisher: Publisher,
    pub health: Option<Arc<Health>>,
    pub http: Option<Listening>,
    shutdown: CancellationToken,
    worker: Option<JoinHandle<anyhow::Result<()>>>,
    /// Declared last: released only after `Drop` stopped the worker and deleted the topology.
    _timing: TimingGuard,
}

/// Serves the sandbox from its own thread and runtime until `shutdown`. On the
/// test's runtime, the test's own work (copying 3,000 delivered messages while
/// polling, say) held up request handling for tens of milliseconds and
/// squeezed the arrival times it measures: a CI run saw 101 in one second.
async fn spawn_sandbox(sandbox: Sandbox, shutdown: CancellationToken) -> SocketAddr {
    let (bound, addr) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sandbox".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("sandbox")
                .enable_all()
                .build()
                .expect("sandbox runtime");
            runtime.block_on(async move {
                let _ = bound.send(
                    sandbox
                        .spawn(([127, 0, 0, 1], 0).into(), shutdown.clone())
                        .await,
                );
                shutdown.cancelled().await;
            });
        })
        .expect("sandbox thread starts");
    addr.await
        .expect("sandbox thread answers")
        .expect("sandbox starts")
}

/// Starts a sandbox, declares a fresh topology and (by default) an in-process worker.
pub async fn spawn_app(test: &str, options: Options) -> TestApp {
    init_test_logging();
    let timing = if options.alone {
        TimingGuard::Alone(TIMING.write().await)
    } else {
        TimingGuard::Shared(TIMING.read().await)
    };
    let shutdown = CancellationToken::new();
    let sandbox = Sandbox::new(options.sandbox.clone());
    let sandbox_addr = spawn_sandbox(sandbox.clone(), shutdown.clone()).await;
    let prefix = format!("t-{test}-{:08x}", rand::random::<u32>());
    let tiers: Vec<String> = options.tiers.iter().map(|t| format!("\"{t}\"")).collect();
    let mut config_text = format!(
        r#"
[broker]
url = {url}
prefix = "{prefix}"
{broker_extra}
[http]
listen = "127.0.0.1:0"
{http_extra}
[worker]
drain_timeout = "10s"
{worker_extra}
[retry]
tiers = [{tiers}]
max_attempts = {max_attempts}
"#,
        url = if options.broker_nodes.is_empty() {
            format!("\"{}\"", broker_url())
        } else {
            BrokerUrls::new(&options.broker_nodes).to_toml()
        },
        broker_extra = options.broker_extra,
        worker_extra = options.worker_extra,
        http_extra = options.http_extra,
        tiers = tiers.join(", "),
        max_attempts = options.max_attempts,
    );
    let accounts: Vec<toml::Value> = options
        .accounts
        .iter()
        .map(|a| a.table(sandbox_addr, &options.sandbox).into())
        .collect();
    if !accounts.is_empty() {
        let mut table = toml::Table::new();
        table.insert("account".into(), accounts.into());
        config_text.push_str(&toml::to_string(&table).expect("accounts serialize"));
    }
    let config = Config::parse(&config_text, Vec::new()).expect("test config is valid");
    let conn = broker::connect(&config.broker.url, "herald test")
        .await
        .expect("RabbitMQ is reachable");
    Topology::from_config(&config)
        .declare(&conn)
        .await
        .expect("topology declares");
    let publisher = Publisher::open(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let mut app = TestApp {
        names: Names::new(&prefix),
        config,
        config_text,
        sandbox,
        sandbox_addr,
        conn,
        publisher,
        health: None,
        http: None,
        shutdown,
        worker: None,
        _timing: timing,
    };
    if options.start_worker {
        app.start_worker().await;
    }
    app
}

impl TestApp {
    pub async fn start_worker(&mut self) {
        let worker = Worker::new(self.config.clone()).expect("worker builds");
        self.http = Some(worker.serve_http(self.shutdown.clone()).await.unwrap());
        let health = worker.health();
        self.worker = Some(tokio::spawn(worker.run(self.shutdown.clone())));
        wait_until("worker ready", Duration::from_secs(20), || {
            health.is_ready()
        })
        .await;
        self.health = Some(health);
    }

    /// Publishes `n` valid jobs `{prefix}-{i}` to users `u{i}` for the test
    /// account, checked and confirmed as `herald enqueue` does.
    pub async fn publish_jobs(&self, prefix: &str, n: usize) {
        let ndjson: String = (0..n)
            .map(|i| format!("{}\n", self.job(&format!("{prefix}-{i}"), &format!("u{i}"))))
            .collect();
        let jobs = herald::enqueue::check_all(ndjson.as_bytes(), &self.config).expect("valid jobs");
        herald::enqueue::publish(&self.publisher, &self.names, &jobs)
            .await
            .expect("the broker confirms the jobs");
    }

    /// A valid job for the test account; `to` is a user id.
    pub fn job(&self, id: &str, to: &str) -> Value {
        self.job_for("default", id, to)
    }

    pub fn job_for(&self, account: &str, id: &str, to: &str) -> Value {
        self.vendor_job("netease", account, id, to)
    }

    pub fn vendor_job(&self, vendor: &str, account: &str, id: &str, to: &str) -> Value {
        json!({
            "v": 1, "id": id, "vendor": vendor, "account": account,
            "from": "system", "to": {"user": to}, "key": "test.key", "data": {"id": id}
        })
    }

    /// The `herald run` HTTP address of the in-process worker.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("worker started").http
    }

    /// Where the in-process worker serves the Tencent callback.
    pub fn callback_addr(&self) -> SocketAddr {
        self.http
            .expect("worker started")
            .callbacks
            .expect("a tencent account takes callbacks")
    }

    /// Starts `herald run` as a child process with this app's config, serving HTTP on `port`.
    pub fn spawn_process(&self, config: &tempfile::NamedTempFile, port: u16) -> Process {
        self.spawn_process_with(config, port, &[])
    }

    /// [`Self::spawn_process`] with these environment variables besides.
    pub fn spawn_process_with(
        &self,
        config: &tempfile::NamedTempFile,
        port: u16,
        env: &[(&str, &str)],
    ) -> Process {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(["run", "--config"])
            .arg(config.path())
            .env("HERALD_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::null());
        Process::spawn(&mut command)
    }

    /// Stats of one NetEase sandbox app.
    pub fn app_stats(&self, app: &str) -> AppStats {
        self.app_stats_of("netease", app)
    }

    pub fn app_stats_of(&self, vendor: &str, app: &str) -> AppStats {
        self.sandbox
            .stats()
            .get(vendor)
            .and_then(|apps| apps.get(app))
            .cloned()
            .unwrap_or_default()
    }

    pub async fn publish(&self, job: &Value) {
        let key = format!(
            "{}.{}",
            job["vendor"].as_str().unwrap(),
            job["account"].as_str().unwrap()
        );
        let id = job["id"].as_str().unwrap_or("no-id");
        self.publish_raw(&key, job.to_string().as_bytes(), id).await;
    }

    /// Publishes as Spring AMQP does by default: no `message_id`.
    pub async fn publish_without_message_id(&self, job: &Value) {
        let key = format!(
            "{}.{}",
            job["vendor"].as_str().unwrap(),
            job["account"].as_str().unwrap()
        );
        let props =
            BasicProperties::default().with_content_type(ShortString::from("application/json"));
        self.publisher
            .publish(&self.names.jobs(), &key, job.to_string().as_bytes(), props)
            .await
            .expect("publish confirmed");
    }

    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], id: &str) {
        self.publish_with(routing_key, body, job_properties(id))
            .await;
    }

    /// Publishes to the jobs exchange with these properties, confirmed.
    pub async fn publish_with(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.publisher
            .publish(&self.names.jobs(), routing_key, body, props)
            .await
            .expect("publish confirmed");
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.sandbox.messages()
    }

    pub fn netease_stats(&self) -> AppStats {
        self.app_stats(
            &self.sandbox.settings().get::<netease::Settings>().apps[0]
                .id
                .clone(),
        )
    }

    pub async fn dead_jobs(&self) -> Vec<DeadJob> {
        let mut jobs = Vec::new();
        dlq::scan(&self.conn, &self.names, |d| {
            jobs.push(DeadJob::from_delivery(d))
        })
        .await
        .unwrap();
        jobs
    }

    /// Messages ready in the account's lane.
    pub async fn lane_depth(&self) -> u32 {
        let channel = self.conn.create_channel().await.unwrap();
        let queue = self.names.lane("netease", "default");
        let depth = broker::queue_depth(&channel, &queue).await.unwrap();
        let _ = channel.close(200, "read".into()).await;
        depth
    }

    pub async fn dlq_depth(&self) -> usize {
        dlq::depth(&self.conn, &self.names).await.unwrap() as usize
    }

    pub async fn wait_for_dead(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = self.dlq_depth().await;
            if depth >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {n} dead jobs, have {depth}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_for_delivered(&self, n: usize, timeout: Duration) {
        let sandbox = self.sandbox.clone();
        wait_until(&format!("{n} delivered"), timeout, move || {
            sandbox.delivered_count() >= n
        })
        .await;
    }

    /// Waits until `n` distinct jobs were delivered (NetEase). Counting is
    /// cheap; grouping by id copies every message, so the count comes first.
    pub async fn wait_for_distinct_jobs(&self, n: usize, timeout: Duration) {
        self.wait_for_delivered(n, timeout).await;
        wait_until(&format!("{n} distinct jobs delivered"), timeout, || {
            self.deliveries_by_id().len() >= n
        })
        .await;
    }

    /// Stops the in-process worker, draining it.
    pub async fn stop_worker(&mut self) {
        self.shutdown.cancel();
        if let Some(worker) = self.worker.take() {
            worker
                .await
                .expect("worker task")
                .expect("worker stops cleanly");
        }
    }

    /// Writes the app's config to a file, for tests that run the binary.
    pub fn config_file(&self) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), &self.config_text).unwrap();
        file
    }

    /// Distinct OpenIM jobs delivered (their `data` carries the id).
    pub fn deliveries_by_openim_id(&self) -> usize {
        let ids: std::collections::BTreeSet<String> = self
            .delivered()
            .into_iter()
            .filter(|m| m.vendor == "openim")
            .map(|m| m.fields["data"].clone())
            .collect();
        ids.len()
    }

    /// Delivered messages per job id (read from `attach.data.id`).
    pub fn deliveries_by_id(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for m in self.delivered() {
            let attach: Value = serde_json::from_str(&m.fields["attach"]).unwrap();
            let id = attach["data"]["id"].as_str().unwrap_or("?").to_string();
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let topology = Topology::from_config(&self.config);
        let url = self.config.broker.url.clone();
        // Async cleanup from Drop: a thread with its own runtime, joined, so it also runs on panic.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) = broker::connect(&url, "herald test cleanup").await {
                    if let Ok(channel) = conn.create_channel().await {
                        let _ = topology.delete(&channel).await;
                        let _ = channel.close(200, "cleaned".into()).await;
                    }
                    let _ = conn.close(200, "cleaned".into()).await;
                }
            });
        })
        .join();
    }
}

/// Logs go through libtest's capture (shown for failing tests); `RUST_LOG` filters, default `info`.
fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A sandbox fault for `vendor`: the next `times` requests to `to` (any app) get `answer`.
pub fn fault(
    vendor: &str,
    to: &str,
    times: u32,
    answer: herald::sandbox::FaultAnswer,
) -> herald::sandbox::Fault {
    herald::sandbox::Fault {
        vendor: vendor.into(),
        app: None,
        to: Some(to.into()),
        times,
        answer,
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Prometheus text of a worker's `/metrics`, or empty if it does not answer.
pub async fn scrape(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A child process that is killed and reaped when dropped: a test that fails
/// half-way leaves no worker behind to re-declare its topology and run on.
pub struct Process(std::process::Child);

impl Process {
    pub fn spawn(command: &mut std::process::Command) -> Self {
        Self(command.spawn().expect("the process starts"))
    }
}

impl std::ops::Deref for Process {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Both are no-ops for a child already reaped.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends a signal (`-9`, `-TERM`) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

pub async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
