//! Benchmarks, reported as ratios measured in one run on one broker.
//!
//! `throughput`: the same N OpenIM job bodies go through each worker, every one
//! its own process, to the same receiver (`receiver`, a small HTTP server in a
//! child process that counts and timestamps arrivals): `herald run` with its
//! defaults and tuned, a bare lapin + reqwest consume+POST+ack loop
//! (`bare-loop`), Node amqplib + fetch and Go amqp091-go + net/http
//! (`bench/baselines/`). Prints jobs/s at the receiver, peak RSS, and
//! herald's ratio to each.
//!
//! `latency`: herald and the bare loop at a fixed publish rate; publish to
//! arrival at the receiver, p50/p90/p99/max. `rss`: herald's peak RSS while it
//! drains a backlog (1,000,000 jobs by default). `adaptive`: herald's default
//! (adaptive) in-flight limit against fixed limits, at several vendor latencies.
//! `profile`: callgrind instructions per job, or a `perf record`, of `herald run`.
//!
//! `dlq-stats`: fills a DLQ with N dead jobs (a mix of reasons and codes) and
//! times one `herald dlq stats` pass over it, with the process's peak memory.
//!
//! `console`: fills a DLQ the same way and drives `herald console` over it as a
//! browser would: the overview's first and warm answers, a group page, a job
//! page, and a whole group replayed (jobs/s), with the console's peak memory.
//!
//! `http-enqueue`: concurrent clients post N jobs in NDJSON batches to a
//! worker's `POST /v1/jobs`; prints jobs/s (202s, so broker-confirmed) and
//! request latencies for each batch size.
//!
//! With `HERALD_BENCH_LOG=1` the bench logs as `herald run` without an
//! `otlp_endpoint` does (the same subscriber, trace ids and `traceparent` made
//! by hand, `RUST_LOG` and `HERALD_LOG_FORMAT` apply; redirect stderr), to
//! measure what logging and tracing cost.
//!
//! ```sh
//! cargo build --release --bins   # herald-bench runs target/release/herald
//! target/release/herald-bench throughput --jobs 50000
//! target/release/herald-bench latency --rate 1000 --seconds 20
//! target/release/herald-bench rss --jobs 1000000
//! target/release/herald-bench adaptive --latency-ms 1,100
//! target/release/herald-bench profile --tool callgrind --jobs 5000
//! target/release/herald-bench dlq-stats --jobs 100000
//! target/release/herald-bench console --jobs 100000
//! target/release/herald-bench http-enqueue --jobs 50000 --batch 100,500 --clients 4
//! ```

#[path = "herald-bench/console.rs"]
mod console;
#[path = "herald-bench/measure.rs"]
mod measure;
#[path = "herald-bench/profile.rs"]
mod profile;
#[path = "herald-bench/receiver.rs"]
mod receiver;
#[path = "herald-bench/suites.rs"]
mod suites;
#[path = "herald-bench/workers.rs"]
mod workers;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use herald::broker::{self, Publisher};
use herald::config::{BrokerUrls, Config};
use herald::envelope::{Failure, copy_with};
use herald::outcome::Reason;
use herald::sandbox::{Sandbox, Settings};
use herald::topology::{Names, Topology};
use herald::worker::Worker;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// One URL, or a cluster's nodes separated by commas.
    #[arg(
        long,
        env = "HERALD_BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    broker: String,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// herald (defaults and tuned) vs the bare, Node and Go baselines, to one receiver.
    Throughput {
        #[arg(long, default_value_t = 50_000)]
        jobs: usize,
        /// Account lines of the tuned herald: by hand, a fixed limit, as the
        /// `adaptive` bench's fixed settings (which the defaults are held to).
        #[arg(
            long,
            default_value = "concurrency = 256\nadaptive_concurrency = false"
        )]
        tuned: String,
        /// Only these workers: herald, tuned, bare, node, go.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The whole sequence this many times, a table each.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Publish-to-arrival latency of herald and the bare loop at a fixed rate.
    Latency {
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// herald then the bare loop, this many times.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// herald's peak RSS while it drains a backlog of N jobs.
    Rss {
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
    },
    /// herald's default (adaptive) in-flight limit vs fixed limits, per vendor latency.
    Adaptive {
        #[arg(long, value_delimiter = ',', default_values_t = [1, 100])]
        latency_ms: Vec<u64>,
        #[arg(long, value_delimiter = ',', default_values_t = [64, 256, 1024, 2048])]
        fixed: Vec<u16>,
        /// Jobs per run, for each latency in turn (the last repeats).
        #[arg(long, value_delimiter = ',', default_values_t = [50_000, 30_000])]
        jobs: Vec<usize>,
        /// Each fixed setting and the defaults, this many times over.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Instructions per job (callgrind) or a CPU profile (perf) of `herald run`.
    Profile {
        #[arg(long, value_enum, default_value = "callgrind")]
        tool: profile::Tool,
        #[arg(long, default_value_t = 5_000)]
        jobs: usize,
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
        /// Extra account lines (e.g. `concurrency = 256`).
        #[arg(long, default_value = "")]
        account: String,
        /// The receiver's latency for each request (the vendor's distance).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// The receiver, as a child process of the benches.
    #[command(hide = true)]
    Receiver {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 0)]
        latency_us: u64,
    },
    /// The bare lapin + reqwest baseline, as a child process of the benches.
    #[command(hide = true)]
    BareLoop {
        #[arg(long)]
        amqp: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        prefetch: u16,
        #[arg(long)]
        receiver: String,
    },
    /// Time `dlq stats` over a DLQ of N dead jobs.
    DlqStats {
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
    },
    /// `herald console` over a DLQ of N dead jobs: overview cold and warm, pages, a group's replay.
    Console {
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
    },
    /// `POST /v1/jobs` throughput: NDJSON batches from concurrent clients.
    HttpEnqueue {
        /// Jobs posted for each batch size.
        #[arg(long, default_value_t = 50_000)]
        jobs: usize,
        /// Jobs per request; each size is measured in turn.
        #[arg(long, value_delimiter = ',', default_values_t = [100, 500])]
        batch: Vec<usize>,
        /// Clients posting at once, each waiting for its answer before the next request.
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let broker = BrokerUrls::from_list(&args.broker);
    let _logs = std::env::var_os("HERALD_BENCH_LOG")
        .map(|_| herald::logging::init(Some(&herald::config::TelemetryConfig::default())));
    match args.bench {
        Bench::Throughput {
            jobs,
            tuned,
            only,
            rounds,
        } => {
            let workers: Vec<_> = suites::throughput_workers(&tuned)
                .into_iter()
                .zip(["herald", "bare", "node", "go", "tuned"])
                .filter(|(_, name)| only.is_empty() || only.iter().any(|o| o == name))
                .map(|(w, _)| w)
                .collect();
            suites::throughput(&broker, jobs, &workers, rounds).await
        }
        Bench::Latency {
            rate,
            seconds,
            rounds,
        } => suites::latency(&broker, rate, seconds, rounds).await,
        Bench::Rss { jobs } => suites::rss(&broker, jobs).await,
        Bench::Adaptive {
            latency_ms,
            fixed,
            jobs,
            rounds,
        } => {
            let latencies: Vec<_> = latency_ms.into_iter().map(Duration::from_millis).collect();
            suites::adaptive(&broker, &latencies, &fixed, &jobs, rounds).await
        }
        Bench::Profile {
            tool,
            jobs,
            warmup,
            account,
            latency_ms,
        } => {
            let latency = Duration::from_millis(latency_ms);
            profile::profile(&broker, tool, jobs, warmup, &account, latency).await
        }
        Bench::Receiver { listen, latency_us } => {
            receiver::serve(listen, Duration::from_micros(latency_us)).await
        }
        Bench::BareLoop {
            amqp,
            queue,
            prefetch,
            receiver,
        } => workers::bare_loop(&amqp, &queue, prefetch, &receiver).await,
        Bench::DlqStats { jobs } => dlq_stats(&broker, jobs).await,
        Bench::Console { jobs } => console::console(&broker, jobs).await,
        Bench::HttpEnqueue {
            jobs,
            batch,
            clients,
        } => http_enqueue(&broker, jobs, &batch, clients).await,
    }
}

/// What the herald benchmarks share: a sandbox, a fresh topology under its
/// own prefix with one NetEase account `bench`, and the config that names them.
struct Setup {
    shutdown: CancellationToken,
    sandbox: Sandbox,
    config: Config,
    names: Names,
    conn: lapin::Connection,
    channel: lapin::Channel,
}

impl Setup {
    /// `http` and `account` are extra TOML lines for `[http]` and the account.
    async fn start(
        broker: &BrokerUrls,
        tag: &str,
        settings: Settings,
        http: &str,
        account: &str,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let sandbox = Sandbox::new(settings);
        let addr = sandbox
            .clone()
            .spawn(([127, 0, 0, 1], 0).into(), shutdown.clone())
            .await?;
        let prefix = format!("{tag}-{:08x}", rand::random::<u32>());
        let url = broker.to_toml();
        let config = Config::parse(
            &format!(
                r#"
[broker]
url = {url}
prefix = "{prefix}"
[http]
listen = "127.0.0.1:0"
{http}
[[account]]
vendor = "netease"
name = "bench"
base_url = "http://{addr}/netease/nimserver"
app_key = "demo-app"
app_secret = "demo-secret"
{account}
"#
            ),
            std::iter::empty(),
        )?;
        let conn = broker::connect(&config.broker.url, "herald-bench").await?;
        let channel = conn.create_channel().await?;
        Topology::from_config(&config).declare(&conn).await?;
        Ok(Self {
            shutdown,
            sandbox,
            names: Names::new(&prefix),
            config,
            conn,
            channel,
        })
    }

    /// Deletes the topology and closes the connection.
    async fn finish(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        Topology::from_config(&self.config)
            .delete(&self.channel)
            .await?;
        let _ = self.conn.close(200, "bench done".into()).await;
        Ok(())
    }
}

/// Peak resident memory of this process, from /proc (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A fresh topology whose DLQ holds N dead jobs, a mix of reasons, codes and
/// errors that differ only in ids and numbers (as real ones do).
struct DeadQueue {
    config_text: String,
    names: Names,
    conn: lapin::Connection,
    channel: lapin::Channel,
    topology: Topology,
    publisher: Publisher,
    filled_in: Duration,
}

impl DeadQueue {
    /// `extra` is more config (a `[console]` table, say), appended to the config text.
    async fn fill(broker: &BrokerUrls, n: usize, extra: &str) -> anyhow::Result<Self> {
        let prefix = format!("bench-dlq-{:08x}", rand::random::<u32>());
        let url = broker.to_toml();
        let config_text = format!(
            r#"
[broker]
url = {url}
prefix = "{prefix}"
[[account]]
vendor = "netease"
name = "bench"
base_url = "http://127.0.0.1:9/netease/nimserver"
app_key = "k"
app_secret = "s"
{extra}"#
        );
        let config = Config::parse(&config_text, std::iter::empty())?;
        let names = Names::new(&prefix);
        let conn = broker::connect(&config.broker.url, "herald-bench dlq").await?;
        let channel = conn.create_channel().await?;
        let topology = Topology::from_config(&config);
        topology.declare(&conn).await?;
        let publisher = Publisher::open(&conn, Duration::from_secs(60)).await?;
        let filled = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            futures_util::future::try_join_all(chunk.iter().map(|&i| {
                let (props, body) = bench_dead_job(i, chrono::Utc::now());
                let dead = names.dead();
                let publisher = &publisher;
                async move {
                    publisher
                        .publish(&dead, BENCH_ROUTING_KEY, body.as_bytes(), props)
                        .await
                }
            }))
            .await?;
        }
        Ok(Self {
            config_text,
            names,
            conn,
            channel,
            topology,
            publisher,
            filled_in: filled.elapsed(),
        })
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.topology.delete(&self.channel).await?;
        self.publisher.close().await;
        let _ = self.conn.close(200, "bench done".into()).await;
        Ok(())
    }
}

async fn dlq_stats(broker: &BrokerUrls, n: usize) -> anyhow::Result<()> {
    let dead = DeadQueue::fill(broker, n, "").await?;
    let (conn, names) = (&dead.conn, &dead.names);
    println!(
        "dlq-stats: {n} dead jobs published in {:.1} s",
        dead.filled_in.as_secs_f64()
    );
    let rss_before = peak_rss_mib().unwrap_or(0.0);
    let started = Instant::now();
    let (stats, _) = herald::dlq::stats(conn, names).await?;
    let took = started.elapsed().as_secs_f64();
    let depth = herald::dlq::depth(conn, names).await?;
    let order = || async {
        let mut ids = Vec::with_capacity(n);
        herald::dlq::scan(conn, names, |d| {
            ids.push(
                d.properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_string()),
            )
        })
        .await
        .map(|_| ids)
    };
    let (first, second) = (order().await?, order().await?);
    println!(
        "  two more passes: {} and {} jobs, same order: {}",
        first.len(),
        second.len(),
        first == second
    );
    print!("{}", stats.table());
    println!(
        "  stats over {} jobs: {took:.2} s ({:.0} jobs/s); peak RSS {:.0} MiB before the pass, {:.0} MiB after; depth after: {depth}",
        stats.total(),
        stats.total() as f64 / took,
        rss_before,
        peak_rss_mib().unwrap_or(0.0)
    );
    anyhow::ensure!(
        depth as usize == n,
        "stats must not remove anything: depth {depth}"
    );
    dead.finish().await
}

/// The lane of every job `dlq-stats` dead-letters.
const BENCH_ROUTING_KEY: &str = "netease.bench";

/// Dead job `i` of `dlq-stats` (one of a mix of reasons and codes), its
/// headers written by the worker's own [`Failure::dead_headers`], so they
/// read as the worker's dead jobs do.
fn bench_dead_job(i: usize, now: chrono::DateTime<chrono::Utc>) -> (BasicProperties, String) {
    const REASONS: [(Reason, &str); 5] = [
        (Reason::Permanent, "414"),
        (Reason::Permanent, "403"),
        (Reason::Exhausted, "500"),
        (Reason::Invalid, ""),
        (Reason::Expired, ""),
    ];
    let (reason, code) = REASONS[i % REASONS.len()];
    // Errors that differ only in ids and numbers, as real ones do: one fingerprint per reason and code.
    let error = format!("{code}: user u{i} not found (request {:08x})", i * 7919);
    let failure = Failure {
        attempts: 1,
        first_seen: now,
        code: Some(code),
        error: &error,
        now,
    };
    let id = format!("dead-{i}");
    let fresh = BasicProperties::default().with_message_id(id.as_str().into());
    let props = copy_with(&fresh, failure.dead_headers(reason, BENCH_ROUTING_KEY));
    let body = format!(r#"{{"id":"{id}","vendor":"netease","account":"bench","to":"u{i}"}}"#);
    (props, body)
}

const BENCH_TOKEN: &str = "herald-bench-enqueue-token-0123456789";

/// Starts a worker with `POST /v1/jobs` and posts `n` jobs per batch size from
/// `clients` concurrent clients. The lane is held to NetEase's 100/s, as in
/// production, so almost every job waits in its quorum lane: what is measured
/// is the HTTP route, the checks and the confirmed publish.
async fn http_enqueue(
    broker: &BrokerUrls,
    n: usize,
    batches: &[usize],
    clients: usize,
) -> anyhow::Result<()> {
    let http_extra = format!("enqueue_token = \"{BENCH_TOKEN}\"");
    let bench = Setup::start(broker, "bench-http", Settings::default(), &http_extra, "").await?;
    let (sandbox, config, shutdown) = (&bench.sandbox, &bench.config, &bench.shutdown);
    let worker = Worker::new(config.clone())?;
    let health = worker.health();
    let http = worker.serve_http(shutdown.clone()).await?.http;
    let task = tokio::spawn(worker.run(shutdown.clone()));
    while !health.is_ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "http-enqueue: {n} jobs per batch size, {clients} clients, broker {}",
        broker
    );
    let client = reqwest::Client::new();
    let url = format!("http://{http}/v1/jobs");
    let mut posted = 0;
    for &batch in batches {
        let bodies: Vec<String> = (0..n)
            .collect::<Vec<_>>()
            .chunks(batch.max(1))
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|i| {
                        format!(
                            r#"{{"v":1,"id":"http-{batch}-{i}","vendor":"netease","account":"bench","from":"system","to":{{"user":"u{}"}},"key":"order.shipped","data":{{"order":{i}}}}}"#,
                            i % 1000
                        ) + "\n"
                    })
                    .collect()
            })
            .collect();
        let size = bodies[0].len();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let started = Instant::now();
        let latencies = futures_util::future::try_join_all((0..clients).map(|_| async {
            let mut took = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return anyhow::Ok(took);
                };
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(BENCH_TOKEN)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status();
                let answer = response.text().await?;
                anyhow::ensure!(status == 202, "POST /v1/jobs answered {status}: {answer}");
                took.push(sent.elapsed());
            }
        }))
        .await?;
        let elapsed = started.elapsed().as_secs_f64();
        let mut latencies: Vec<Duration> = latencies.into_iter().flatten().collect();
        latencies.sort();
        let at =
            |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        println!(
            "  batches of {batch:>4} (~{:>3} KiB): {:>8.0} jobs/s, {} requests, latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            size / 1024,
            n as f64 / elapsed,
            latencies.len(),
            at(0.5),
            at(0.99),
            at(1.0),
        );
        posted += n;
    }
    shutdown.cancel();
    let _ = task.await;
    let depth = broker::queue_depth(&bench.channel, &bench.names.lane("netease", "bench")).await?;
    let delivered = sandbox.delivered_count();
    println!(
        "  every 202 was confirmed: {depth} jobs in the lane + {delivered} delivered = {} of {posted} posted",
        depth as usize + delivered
    );
    bench.finish().await?;
    anyhow::ensure!(
        depth as usize + delivered >= posted,
        "jobs answered 202 are missing"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use herald::dlq::DeadJob;
    use lapin::message::Delivery;

    use super::*;

    #[test]
    fn a_bench_dead_job_reads_back_as_the_dead_job_it_was_built_as() {
        let now = Utc
            .timestamp_millis_opt(1_764_000_000_123)
            .single()
            .unwrap();
        let read = |i: usize| {
            let (props, body) = bench_dead_job(i, now);
            // The DLQ delivers it with the routing key it was published with.
            let mut delivery = Delivery::mock(
                1,
                "bench.dead".into(),
                BENCH_ROUTING_KEY.into(),
                false,
                body.into_bytes(),
            );
            delivery.properties = props;
            DeadJob::from_delivery(&delivery)
        };
        let job = read(0);
        assert_eq!(job.id.as_deref(), Some("dead-0"));
        assert_eq!(
            (job.vendor.as_str(), job.account.as_str()),
            ("netease", "bench")
        );
        assert_eq!(job.routing_key, BENCH_ROUTING_KEY);
        assert_eq!(
            (job.reason, job.code.as_deref(), job.error.as_str()),
            (
                Reason::Permanent,
                Some("414"),
                "414: user u0 not found (request 00000000)"
            )
        );
        assert_eq!(job.attempts, 1);
        assert_eq!(job.died_at, Some(now));
        let mix: Vec<_> = (0..5).map(|i| (read(i).reason, read(i).code)).collect();
        assert_eq!(
            mix,
            [
                (Reason::Permanent, Some("414".into())),
                (Reason::Permanent, Some("403".into())),
                (Reason::Exhausted, Some("500".into())),
                (Reason::Invalid, None),
                (Reason::Expired, None),
            ]
        );
        assert_eq!(read(7).id.as_deref(), Some("dead-7"));
    }
}
