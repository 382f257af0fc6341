//! `herald demo`: the whole path on one machine, in one command.
//!
//! Starts the sandbox and a worker in this process (with their own topology
//! prefix on the given broker), enqueues sample jobs (valid ones, one the
//! sandbox fails once, one that breaks NetEase's attach limit, one that is not
//! JSON), waits until every job is delivered or dead-lettered, prints what
//! happened, and deletes its topology.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::ShortString;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Publisher};
use crate::config::{BrokerUrls, Config};
use crate::dlq::{self, DeadJob};
use crate::enqueue;
use crate::http::prometheus;
use crate::sandbox::tencent::RejectGroup;
use crate::sandbox::{Fault, FaultAnswer, Sandbox, Settings};
use crate::topology::{Names, Topology};
use crate::worker::Worker;

const VALID: &str = r#"
{"id":"demo-order-8812","vendor":"netease","account":"default","from":"system","to":{"user":"u-alice"},"key":"order.shipped","data":{"order":8812},"push":{"content":"Your order shipped","payload":{"order":8812},"sound":"ding"}}
{"id":"demo-friend-17","vendor":"netease","account":"default","from":"u-bob","to":{"user":"u-alice"},"key":"friend.request","data":"bob wants to be friends","delivery":"online"}
{"id":"demo-alert-3","vendor":"netease","account":"default","from":"system","to":{"group":"ops-room"},"key":"system.alert","data":{"level":"warn","text":"disk 91%"},"options":{"isForcePush":true,"forcePushContent":"disk alert"}}
{"id":"demo-flaky-1","vendor":"netease","account":"default","from":"system","to":{"user":"u-flaky"},"key":"order.shipped","data":{"order":9001}}
{"id":"demo-openim-1","vendor":"openim","account":"main","from":"openIMAdmin","to":{"user":"2839678182"},"key":"friend.request","data":{"from":"bob"},"options":{"sendMsg":false}}
{"id":"demo-tencent-1","vendor":"tencent","account":"main","from":"administrator","to":{"user":"user-7"},"key":"order.shipped","data":{"order":77},"push":{"content":"Your order shipped"}}
{"id":"demo-tencent-group-1","vendor":"tencent","account":"main","from":"administrator","to":{"group":"@TGS#ops"},"key":"system.alert","data":"deploy finished"}
"#;

pub async fn run(broker_url: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let sandbox = Sandbox::new(Settings::default());
    let sandbox_addr = sandbox
        .clone()
        .spawn(([127, 0, 0, 1], 0).into(), shutdown.clone())
        .await?;
    let prefix = format!("herald-demo-{}", std::process::id());
    let url = BrokerUrls::from_list(broker_url).to_toml();
    let config = Config::parse(
        &format!(
            r#"
[broker]
url = {url}
prefix = "{prefix}"
[http]
listen = "127.0.0.1:0"
[retry]
tiers = ["1s", "5s"]
max_attempts = 3
[[account]]
vendor = "netease"
name = "default"
base_url = "http://{sandbox_addr}/netease/nimserver"
app_key = "demo-app"
app_secret = "demo-secret"
rate_limit = 100
[[account]]
vendor = "openim"
name = "main"
base_url = "http://{sandbox_addr}/openim"
admin_user_id = "imAdmin"
secret = "openIM123"
[[account]]
vendor = "tencent"
name = "main"
base_url = "http://{sandbox_addr}/tencent"
sdk_app_id = 1400000000
secret_key = "tencent-demo-key"
admin_identifier = "administrator"
callback_token = "demo-callback-token"
callback_key = "demo-callback-key-0123456789abcdef0123456789"
"#
        ),
        std::iter::empty(),
    )?;
    let names = Names::new(&prefix);
    println!("herald demo");
    println!("  broker   {} (prefix `{prefix}`)", config.broker.url);
    println!("  sandbox  http://{sandbox_addr} (fake NetEase, OpenIM and Tencent Cloud IM)");

    let worker = Worker::new(config.clone())?;
    let listening = worker.serve_http(shutdown.clone()).await?;
    let health = worker.health();
    println!("  worker   http://{}/metrics\n", listening.http);
    let callback_addr = listening
        .callbacks
        .ok_or_else(|| anyhow::anyhow!("the demo's tencent account takes callbacks"))?;
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let outcome = drive(&config, &sandbox, &names, &health, callback_addr).await;

    shutdown.cancel();
    let _ = worker_task.await;
    let conn = broker::connect(&config.broker.url, "herald demo cleanup").await?;
    let channel = conn.create_channel().await?;
    Topology::from_config(&config).delete(&channel).await?;
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "demo done".into()).await;
    println!("\ndemo topology `{prefix}.*` deleted");
    outcome
}

async fn drive(
    config: &Config,
    sandbox: &Sandbox,
    names: &Names,
    health: &crate::http::Health,
    callback_addr: std::net::SocketAddr,
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

    sandbox.add_fault(Fault {
        vendor: "netease".into(),
        app: None,
        to: Some("u-flaky".into()),
        times: 1,
        answer: FaultAnswer::Code(500),
    });
    sandbox.tencent_reject_group(RejectGroup {
        count: 1,
        callback_url: format!("http://{callback_addr}{}", crate::callback::PATH),
        token: Some("demo-callback-token".into()),
    });
    let valid =
        enqueue::check_all(VALID.as_bytes(), config).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    enqueue::publish(&publisher, names, &valid).await?;
    println!(
        "enqueued {} valid jobs: 4 NetEase (u-flaky's first attempt gets a 500), 1 OpenIM, 2 Tencent\n  \
         (the Tencent group message fails after acceptance; Tencent reports it to {})",
        valid.len(),
        crate::callback::PATH
    );

    let oversize = format!(
        r#"{{"id":"demo-oversize-1","vendor":"netease","account":"default","from":"system","to":{{"user":"u-alice"}},"key":"report","data":"{}"}}"#,
        "x".repeat(5000)
    );
    if let Err(errors) = enqueue::check_all(oversize.as_bytes(), config) {
        println!(
            "`herald enqueue` refuses demo-oversize-1: {}",
            errors.join("; ")
        );
    }
    println!("publishing it anyway, and a body that is not JSON, as a careless producer would");
    let raw = |id: &str| {
        BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(id))
    };
    publisher
        .publish(
            &names.jobs(),
            "netease.default",
            oversize.as_bytes(),
            raw("demo-oversize-1"),
        )
        .await?;
    publisher
        .publish(
            &names.jobs(),
            "netease.default",
            b"{\"id\": \"demo-broken-1\", oops",
            raw("demo-broken-1"),
        )
        .await?;

    let expect_delivered = valid.len();
    let expect_dead = 2;
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
        let field = |k: &str| m.fields.get(k).cloned().unwrap_or_default();
        let what = match m.vendor.as_str() {
            "netease" => format!(
                "to={} msgtype={} save={} attach={}",
                field("to"),
                field("msgtype"),
                field("save"),
                field("attach")
            ),
            "openim" => format!(
                "recvUserID={} key={} data={} operationID={}",
                field("recvUserID"),
                field("key"),
                field("data"),
                field("header.operationID")
            ),
            _ => format!(
                "to={}{} MsgBody={}",
                field("To_Account"),
                field("GroupId"),
                field("MsgBody")
            ),
        };
        println!("  +{:>5} ms  {:<8} {what}", m.received_ms, m.vendor);
    }
    println!(
        "\nretried: {} job(s) through a retry tier after a vendor error, {} after a Tencent failure callback",
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
