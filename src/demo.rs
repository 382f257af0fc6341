//! `herald demo`: the whole path on one machine, in one command.
//!
//! Starts the sandbox and a worker in this process (with their own topology
//! prefix on the given broker), enqueues each fake's [`Sample`] (valid jobs,
//! some the fake fails once or after acceptance, one that breaks a field
//! limit) and a body that is not JSON, waits until every job is delivered or
//! dead-lettered, prints what happened, and deletes its topology. The worker's
//! log goes to a file the report names, so the report reads alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::ShortString;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Publisher};
use crate::config::{BrokerUrls, Config};
use crate::dlq::{self, DeadJob};
use crate::enqueue;
use crate::http::prometheus;
use crate::sandbox::{FakeVendor, Sandbox, Settings};
use crate::topology::{Names, Topology};
use crate::worker::Worker;

/// What the demo sends through one vendor's fake; each fake gives its own.
pub struct Sample {
    /// The account's name; its vendor and `base_url` come from the fake.
    pub account: &'static str,
    /// The account's vendor keys, for the fake's own app.
    pub keys: Vec<(&'static str, String)>,
    /// Valid jobs for the account, one JSON object a line.
    pub jobs: &'static str,
    /// What befalls them on the way, for the report; empty when they go straight through.
    pub story: &'static str,
    /// A job that breaks one of the vendor's field limits: refused by `herald
    /// enqueue`, published anyway, dead-lettered by the worker.
    pub too_large: Option<String>,
}

/// A fake and what the demo sends through it.
type Part<'a> = (&'a dyn FakeVendor, Sample);

/// Where `herald demo` writes the worker's log, unless it is asked to print it.
pub fn log_path() -> PathBuf {
    std::env::temp_dir().join(format!("herald-demo-{}.log", std::process::id()))
}

/// Runs the demo on `broker_url`; `log` is where the worker's log went (`None`: stderr).
pub async fn run(broker_url: &str, log: Option<&Path>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let sandbox = Sandbox::new(Settings::default());
    let sandbox_addr = sandbox
        .clone()
        .spawn(([127, 0, 0, 1], 0).into(), shutdown.clone())
        .await?;
    let prefix = format!("herald-demo-{}", std::process::id());
    let parts: Vec<Part> = sandbox.fakes().map(|fake| (fake, fake.demo())).collect();
    let config = Config::parse(
        &config_text(broker_url, &prefix, sandbox_addr, &parts),
        std::iter::empty(),
    )?;
    let names = Names::new(&prefix);
    println!("herald demo");
    println!("  broker   {} (prefix `{prefix}`)", config.broker.url);
    println!(
        "  sandbox  http://{sandbox_addr} (fakes of {})",
        crate::vendor::names()
    );

    let worker = Worker::new(config.clone())?;
    let listening = worker.serve_http(shutdown.clone()).await?;
    let health = worker.health();
    println!("  worker   http://{}/metrics", listening.http);
    if let Some(log) = log {
        println!(
            "  log      {} (the worker's; `herald demo --verbose` prints it here instead)",
            log.display()
        );
    }
    println!();
    for (fake, _) in &parts {
        fake.stage_demo(&sandbox, listening.callbacks);
    }
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let outcome = drive(&config, &sandbox, &names, &health, &parts).await;

    shutdown.cancel();
    let _ = worker_task.await;
    let conn = broker::connect(&config.broker.url, "herald demo cleanup").await?;
    let channel = conn.create_channel().await?;
    Topology::from_config(&config).delete(&channel).await?;
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "demo done".into()).await;
    println!("\ndemo topology `{prefix}.*` deleted");
    if let Some(log) = log {
        println!("the worker's log: {}", log.display());
    }
    outcome
}

/// The demo's config: short retry tiers, and one account per fake.
fn config_text(broker_url: &str, prefix: &str, sandbox: SocketAddr, parts: &[Part]) -> String {
    let url = BrokerUrls::from_list(broker_url).to_toml();
    let mut text = format!(
        r#"
[broker]
url = {url}
prefix = "{prefix}"
[http]
listen = "127.0.0.1:0"
[retry]
tiers = ["1s", "5s"]
max_attempts = 3
"#
    );
    for (fake, sample) in parts {
        let mut account = toml::Table::new();
        let mut put = |key: &str, value: String| {
            account.insert(key.to_string(), toml::Value::String(value));
        };
        put("vendor", fake.vendor().id.to_string());
        put("name", sample.account.to_string());
        put("base_url", format!("http://{sandbox}{}", fake.base_path()));
        for (key, value) in &sample.keys {
            put(key, value.clone());
        }
        text.push_str("[[account]]\n");
        text.push_str(&toml::to_string(&account).expect("an account serializes"));
    }
    text
}

async fn drive(
    config: &Config,
    sandbox: &Sandbox,
    names: &Names,
    health: &crate::http::Health,
    parts: &[Part<'_>],
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !health.is_ready() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "worker did not become ready in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conn = broker::connect(&config.broker.url, "herald demo").await?;
    let publisher = Publisher::open(&conn, config.broker.confirm_timeout).await?;

    let jobs: String = parts.iter().map(|(_, sample)| sample.jobs).collect();
    let valid =
        enqueue::check_all(jobs.as_bytes(), config).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    enqueue::publish(&publisher, names, &valid).await?;
    println!("enqueued {} valid jobs:", valid.len());
    for (fake, sample) in parts {
        let n = sample.jobs.lines().filter(|l| !l.trim().is_empty()).count();
        let story = match sample.story {
            "" => String::new(),
            story => format!(": {story}"),
        };
        println!("  {n} {}{story}", fake.vendor().name);
    }
    let careless = careless_jobs(parts);
    for (id, _, body) in &careless {
        if let Err(errors) = enqueue::check_all(body, config) {
            println!("`herald enqueue` refuses {id}: {}", errors.join("; "));
        }
    }
    println!("publishing them anyway, as a careless producer would");
    for (id, routing_key, body) in &careless {
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(id.as_str()));
        publisher
            .publish(&names.jobs(), routing_key, body, properties)
            .await?;
    }

    let expect_delivered = valid.len();
    let expect_dead = careless.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = sandbox.delivered_count();
        let dead = dlq::depth(&conn, names).await? as usize;
        if delivered >= expect_delivered && dead >= expect_dead {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out: {delivered}/{expect_delivered} delivered, {dead}/{expect_dead} dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("\ndelivered (as the sandbox received them):");
    for m in sandbox.messages() {
        let what = match sandbox.fakes().find(|f| f.vendor().id == m.vendor) {
            Some(fake) => fake.describe(&m),
            None => format!("{:?}", m.fields),
        };
        println!("  +{:>5} ms  {:<8} {what}", m.received_ms, m.vendor);
    }
    println!(
        "\nretried: {} job(s) through a retry tier after a vendor error, {} after a vendor's failure callback",
        counter("herald_jobs_total", "retried"),
        counter("herald_callbacks_total", "retried")
    );
    for (vendor, apps) in sandbox.stats() {
        for (app, s) in apps {
            println!(
                "  sandbox {vendor} app {app}: {} requests, {} accepted, {} blocked, at most {} in any second",
                s.requests, s.accepted, s.blocked, s.max_in_any_second
            );
        }
    }
    println!("\ndead-lettered:");
    let mut jobs = Vec::new();
    dlq::scan(&conn, names, |d| jobs.push(DeadJob::from_delivery(d))).await?;
    for j in &jobs {
        println!(
            "  {:<16} reason={:<8} {}",
            j.id.as_deref().unwrap_or("-"),
            j.reason,
            j.error
        );
    }
    println!("\n`herald dlq stats`:");
    print!("{}", dlq::stats(&conn, names).await?.0.table());
    publisher.close().await;
    let _ = conn.close(200, "demo done".into()).await;
    Ok(())
}

/// What a careless producer publishes, as (id, routing key, body): every
/// fake's job that breaks a field limit, then a body that is not JSON, to the first lane.
fn careless_jobs(parts: &[Part]) -> Vec<(String, String, Vec<u8>)> {
    let lane = |(fake, sample): &Part| format!("{}.{}", fake.vendor().id, sample.account);
    let mut jobs: Vec<_> = parts
        .iter()
        .filter_map(|part| {
            let job = part.1.too_large.as_ref()?;
            let id = serde_json::from_str::<serde_json::Value>(job).ok()?["id"]
                .as_str()?
                .to_string();
            Some((id, lane(part), job.clone().into_bytes()))
        })
        .collect();
    if let Some(first) = parts.first() {
        jobs.push((
            "demo-broken-1".to_string(),
            lane(first),
            b"{\"id\": \"demo-broken-1\", oops".to_vec(),
        ));
    }
    jobs
}

/// Sum of a counter for one outcome or result, read from this process's metrics.
fn counter(name: &str, value: &str) -> u64 {
    let needles = [
        format!("outcome=\"{value}\""),
        format!("result=\"{value}\""),
    ];
    prometheus()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().any(|n| l.contains(n.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
