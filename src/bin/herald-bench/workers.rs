//! The workers a bench compares, each run as its own process against the same
//! broker and the same receiver: `herald run` (release build, a generated
//! config, logs at the default level to a file, as in production), and the
//! baselines: a bare lapin + reqwest loop (`herald-bench bare-loop`), Node
//! amqplib + fetch and Go amqp091-go + net/http (`bench/baselines/`).
//!
//! Every worker consumes a quorum queue of the same job bodies: herald its lane
//! (declared by herald's topology under a fresh prefix), a baseline a quorum
//! queue of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use herald::broker::{self, Publisher};
use herald::config::{BrokerUrls, Config};
use herald::topology::{Names, Topology};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection};

use crate::receiver;

/// A worker to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Worker {
    /// `herald run` with an OpenIM account and these extra account lines.
    Herald { label: String, account: String },
    /// Bare lapin + reqwest: consume, POST, ack; a task per delivery.
    Bare { prefetch: u16 },
    /// Node amqplib + fetch.
    Node { prefetch: u16 },
    /// Go amqp091-go + net/http, a goroutine per delivery.
    Go { prefetch: u16 },
}

impl Worker {
    pub fn herald(label: &str, account: &str) -> Self {
        Self::Herald {
            label: label.into(),
            account: account.into(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Worker::Herald { label, .. } => format!("herald, {label}"),
            Worker::Bare { prefetch } => {
                format!("bare lapin + reqwest, a task per delivery, prefetch {prefetch}")
            }
            Worker::Node { prefetch } => format!("Node amqplib + fetch, prefetch {prefetch}"),
            Worker::Go { prefetch } => {
                format!("Go amqp091-go + net/http, a goroutine per delivery, prefetch {prefetch}")
            }
        }
    }

    pub fn is_herald(&self) -> bool {
        matches!(self, Worker::Herald { .. })
    }
}

/// Where a bench's files go: logs, generated configs, the Go baseline's binary.
pub fn bench_dir() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn baselines_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/baselines")
}

/// A queue of jobs prepared for one worker, and how to publish into it.
pub struct Target {
    pub worker: Worker,
    exchange: String,
    routing_key: String,
    queue: String,
    /// herald's generated config (herald only).
    config: Option<(Config, String)>,
    /// Distinguishes this target's job ids from every other run's.
    pub tag: String,
}

impl Target {
    /// Declares the worker's queue (herald: its whole topology) on `conn`.
    pub async fn prepare(
        conn: &Connection,
        broker: &BrokerUrls,
        worker: &Worker,
        receiver: &receiver::Handle,
    ) -> anyhow::Result<Self> {
        let tag = format!("{:08x}", rand::random::<u32>());
        match worker {
            Worker::Herald { account, .. } => {
                let prefix = format!("bench-{tag}");
                let text = format!(
                    r#"[broker]
url = {url}
prefix = "{prefix}"
[http]
listen = "127.0.0.1:0"
[[account]]
vendor = "openim"
name = "bench"
base_url = "{receiver}/openim"
admin_user_id = "imAdmin"
secret = "bench-secret"
{account}
"#,
                    url = broker.to_toml(),
                    receiver = receiver.url(),
                );
                let config = Config::parse(&text, std::iter::empty())?;
                Topology::from_config(&config).declare(conn).await?;
                let names = Names::new(&prefix);
                Ok(Self {
                    worker: worker.clone(),
                    exchange: names.jobs(),
                    routing_key: "openim.bench".into(),
                    queue: names.lane("openim", "bench"),
                    config: Some((config, text)),
                    tag,
                })
            }
            _ => {
                let queue = format!("bench-baseline-{tag}");
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(LongString::from("quorum")),
                );
                let channel = conn.create_channel().await?;
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        args,
                    )
                    .await?;
                let _ = channel.close(200, "declared".into()).await;
                Ok(Self {
                    worker: worker.clone(),
                    exchange: String::new(),
                    routing_key: queue.clone(),
                    queue,
                    config: None,
                    tag,
                })
            }
        }
    }

    /// Publishes jobs `range` (confirmed, 500 at a time), stamped at publish time.
    pub async fn publish(
        &self,
        publisher: &Publisher,
        range: std::ops::Range<usize>,
    ) -> anyhow::Result<()> {
        let all: Vec<usize> = range.collect();
        for chunk in all.chunks(500) {
            futures_util::future::try_join_all(
                chunk.iter().map(|&i| self.publish_one(publisher, i)),
            )
            .await?;
        }
        Ok(())
    }

    /// Publishes job `i`, stamped now.
    pub async fn publish_one(&self, publisher: &Publisher, i: usize) -> anyhow::Result<()> {
        let (id, body) = job(&self.tag, i);
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(id));
        publisher
            .publish(
                &self.exchange,
                &self.routing_key,
                body.as_bytes(),
                properties,
            )
            .await?;
        Ok(())
    }

    /// Starts the worker process on this target's queue.
    /// herald's command is prefixed by `wrapper` when it is not empty (a profiler).
    pub fn spawn(
        &self,
        broker: &BrokerUrls,
        receiver: &receiver::Handle,
        wrapper: &[String],
    ) -> anyhow::Result<Process> {
        let amqp = broker
            .nodes()
            .first()
            .context("no broker URL")?
            .expose()
            .to_string();
        let dir = bench_dir()?;
        let log = std::fs::File::create(dir.join(format!("{}.log", self.file_stem())))?;
        let mut command = match &self.worker {
            Worker::Herald { .. } => {
                let (_, text) = self.config.as_ref().expect("herald has a config");
                let path = dir.join(format!("{}.toml", self.file_stem()));
                std::fs::write(&path, text)?;
                let herald = sibling_binary("herald")?;
                let mut c = match wrapper.split_first() {
                    Some((program, args)) => {
                        let mut c = Command::new(program);
                        c.args(args).arg(herald);
                        c
                    }
                    None => Command::new(herald),
                };
                c.arg("run")
                    .arg("--config")
                    .arg(path)
                    .env_remove("RUST_LOG");
                // herald's default level unless a bench run asks for more (to watch the in-flight limit).
                if let Ok(filter) = std::env::var("HERALD_BENCH_RUST_LOG") {
                    c.env("RUST_LOG", filter);
                }
                c
            }
            Worker::Bare { prefetch } => {
                let mut c = Command::new(std::env::current_exe()?);
                c.args(["bare-loop", "--queue", &self.queue, "--prefetch"])
                    .arg(prefetch.to_string())
                    .args(["--receiver", &receiver.url()])
                    .args(["--amqp", &amqp]);
                c
            }
            Worker::Node { prefetch } => {
                let script = baselines_dir().join("node/worker.mjs");
                anyhow::ensure!(
                    baselines_dir().join("node/node_modules/amqplib").exists(),
                    "the Node baseline needs its modules: (cd bench/baselines/node && npm ci)"
                );
                let mut c = Command::new("node");
                c.arg(script);
                baseline_env(&mut c, &amqp, &self.queue, *prefetch, receiver);
                c
            }
            Worker::Go { prefetch } => {
                let mut c = Command::new(go_worker()?);
                baseline_env(&mut c, &amqp, &self.queue, *prefetch, receiver);
                c
            }
        };
        command.stdout(Stdio::null()).stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.worker.label()))?;
        Ok(Process { child })
    }

    pub fn file_stem(&self) -> String {
        let kind = match &self.worker {
            Worker::Herald { .. } => "herald",
            Worker::Bare { .. } => "bare",
            Worker::Node { .. } => "node",
            Worker::Go { .. } => "go",
        };
        format!("{kind}-{}", self.tag)
    }

    /// Deletes what [`Target::prepare`] declared.
    pub async fn finish(self, conn: &Connection) -> anyhow::Result<()> {
        let channel = conn.create_channel().await?;
        match &self.config {
            Some((config, _)) => Topology::from_config(config).delete(&channel).await?,
            None => {
                channel
                    .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
        let _ = channel.close(200, "bench done".into()).await;
        Ok(())
    }
}

fn baseline_env(c: &mut Command, amqp: &str, queue: &str, prefetch: u16, r: &receiver::Handle) {
    c.env("AMQP_URL", amqp)
        .env("QUEUE", queue)
        .env("PREFETCH", prefetch.to_string())
        .env(
            "RECEIVER_URL",
            format!("{}/openim/msg/send_business_notification", r.url()),
        );
}

/// A binary built next to this one (`cargo build --release` builds them all).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build every binary first (cargo build --release --bins)",
        path.display()
    );
    Ok(path)
}

/// Builds the Go baseline once (Debian's amqp091-go in GOPATH mode, no module download).
fn go_worker() -> anyhow::Result<PathBuf> {
    let out = bench_dir()?.join("go-worker");
    let source = baselines_dir().join("go/worker.go");
    let fresh = |out: &Path| -> Option<bool> {
        Some(out.metadata().ok()?.modified().ok()? >= source.metadata().ok()?.modified().ok()?)
    };
    if fresh(&out) == Some(true) {
        return Ok(out);
    }
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&source)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .status()
        .context("running `go build` (make producers-setup installs Go and amqp091-go)")?;
    anyhow::ensure!(status.success(), "go build of {} failed", source.display());
    Ok(out)
}

/// A worker process; killed if dropped while still running.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, in MiB (Linux `VmHWM`).
    pub fn peak_rss_mib(&self) -> Option<f64> {
        peak_rss_mib(self.pid())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// Exited already (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Peak resident memory of process `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Job `i`'s id and body: an OpenIM job of about 230 bytes whose `data`
/// carries its number (`seq`, for counting distinct arrivals) and its
/// publish time (`sent_us`, for latency).
pub fn job(tag: &str, i: usize) -> (String, String) {
    let id = format!("bench-{tag}-{i}");
    let body = format!(
        r#"{{"v":1,"id":"{id}","vendor":"openim","account":"bench","from":"system","to":{{"user":"u{}"}},"key":"order.shipped","data":{{"seq":{i},"sent_us":{},"text":"Your order has shipped."}}}}"#,
        i % 1000,
        receiver::unix_us(),
    );
    (id, body)
}

/// Opens a connection and a confirming publisher for the bench itself.
pub async fn connect(broker: &BrokerUrls) -> anyhow::Result<(Connection, Publisher)> {
    let conn = broker::connect(broker, "herald-bench").await?;
    let publisher = Publisher::open(&conn, Duration::from_secs(60)).await?;
    Ok((conn, publisher))
}

/// `herald-bench bare-loop`: the baseline in Rust. Consumes `queue` with
/// `prefetch`, POSTs each body to `receiver` in a task of its own, acks when
/// the receiver answered 2xx (else nacks it back). Runs until killed.
pub async fn bare_loop(
    amqp: &str,
    queue: &str,
    prefetch: u16,
    receiver: &str,
) -> anyhow::Result<()> {
    let conn = Connection::connect(amqp, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bare-loop".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::from(prefetch))
        .tcp_nodelay(true)
        .build()?;
    let url = format!("{receiver}/openim/msg/send_business_notification");
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let http = http.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let sent = http
                .post(&url)
                .header("content-type", "application/json")
                .body(delivery.data.clone())
                .send()
                .await;
            let ok = match sent {
                Ok(response) => {
                    let ok = response.status().is_success();
                    ok && response.bytes().await.is_ok()
                }
                Err(_) => false,
            };
            let _ = if ok {
                delivery.ack(BasicAckOptions::default()).await
            } else {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            };
        });
    }
    Ok(())
}
