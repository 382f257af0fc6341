//! Handing a rate-limited lane from one replica to another without breaking
//! the vendor's limit: a SIGTERM during a vendor ban, and a half-open
//! connection to the broker. Each test runs two `herald run` processes.

mod common;

use std::time::Duration;

use common::{Options, Process, TestApp, free_port, scrape, signal, spawn_app, wait_until};
use herald::enqueue;
use herald::sandbox::{Settings, netease};

const ACTIVE: &str = "herald_lane_active{vendor=\"netease\",account=\"default\"} 1";

async fn is_active(port: u16) -> bool {
    scrape(port).await.contains(ACTIVE)
}

async fn wait_active(port: u16, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !is_active(port).await {
        assert!(
            std::time::Instant::now() < deadline,
            "replica on port {port} never became active"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the replica's lanes consume (`/readyz` answers 200).
async fn wait_ready(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "replica never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_jobs(app: &TestApp, total: usize) {
    let ndjson: String = (0..total)
        .map(|i| format!("{}\n", app.job(&format!("h-{i}"), &format!("u{i}"))))
        .collect();
    let jobs = enqueue::check_all(ndjson.as_bytes(), &app.config).expect("valid jobs");
    enqueue::publish(&app.publisher, &app.names, &jobs)
        .await
        .unwrap();
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_taking_over_during_a_vendor_ban_sends_nothing_until_the_ban_is_over() {
    ban_then_stop("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_taking_over_from_a_killed_replica_during_a_vendor_ban_waits_for_its_end() {
    ban_then_stop("-9").await;
}

/// A meets a 4 s vendor ban, then gets `sig`; B takes the lane over.
async fn ban_then_stop(sig: &str) {
    let app = spawn_app(
        "banhandover",
        Options {
            start_worker: false,
            alone: true,
            accounts: vec![common::netease_account("default", 0).ban(Duration::from_secs(4))],
            sandbox: Settings::default().with(netease::Settings {
                block: Duration::from_secs(4),
                ..netease::Settings::default()
            }),
            ..Options::default()
        },
    )
    .await;
    let total = 1000;
    publish_jobs(&app, total).await;
    let config = app.config_file();
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = app.spawn_process(&config, port_a);
    wait_active(port_a, Duration::from_secs(30)).await;
    let mut b = app.spawn_process(&config, port_b);
    wait_ready(port_b).await;
    wait_until("200 delivered", Duration::from_secs(30), || {
        app.sandbox.delivered_count() >= 200
    })
    .await;
    assert!(!is_active(port_b).await, "b stands by while a is active");

    // Another client of the app overshoots: the vendor bans it for 4 s, and a meets the ban.
    let app_key = app.sandbox.settings().get::<netease::Settings>().apps[0]
        .id
        .clone();
    let banned_at_ms = app.sandbox.now_ms();
    app.sandbox.fake::<netease::Fake>().block(&app_key);
    wait_until("a meets the ban", Duration::from_secs(10), || {
        app.netease_stats().blocked >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blocked_before = app.netease_stats().blocked;
    let stopped_at_ms = app.sandbox.now_ms();
    signal(&a, sig);
    let _ = a.wait();

    app.wait_for_distinct_jobs(total, Duration::from_secs(60))
        .await;
    let b_active = is_active(port_b).await;
    signal(&b, "-TERM");
    let _ = b.wait();

    let stats = app.netease_stats();
    let extra = stats.blocked - blocked_before;
    let first_after_stop_ms = app
        .delivered()
        .iter()
        .map(|m| m.received_ms)
        .filter(|ms| *ms > stopped_at_ms + 50)
        .min()
        .expect("b delivered after a stopped");
    let duplicates: usize = app.deliveries_by_id().values().map(|n| n - 1).sum();
    eprintln!(
        "banhandover: ban began at {banned_at_ms} ms (4 s), a met it with {blocked_before} 416(s) and got kill {sig} at \
         {stopped_at_ms} ms; b's first delivery at {first_after_stop_ms} ms ({} ms after the ban began); extra 416s after \
         the signal: {extra}; max {} in any 1 s; {duplicates} duplicate(s)",
        first_after_stop_ms - banned_at_ms,
        stats.max_in_any_second
    );
    assert!(b_active, "b took the lane over");
    assert_eq!(extra, 0, "b sent into the ban: {stats:?}");
    assert!(
        first_after_stop_ms >= banned_at_ms + 4000,
        "b delivered {} ms after the ban began",
        first_after_stop_ms - banned_at_ms
    );
    assert!(stats.max_in_any_second <= 100, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_hearing_the_broker_stops_sending_before_the_standby_starts() {
    const LIMIT: usize = 20;
    const HEARTBEAT_S: u64 = 4;
    let app = spawn_app(
        "stall",
        Options {
            start_worker: false,
            alone: true,
            // The active replica holds 10 s of jobs when its broker goes silent.
            accounts: vec![
                common::netease_account("default", 0)
                    .rate_limit(Some(LIMIT as u32))
                    .concurrency(200),
            ],
            broker_extra: "heartbeat = \"4s\"",
            ..Options::default()
        },
    )
    .await;
    let total = 450;
    publish_jobs(&app, total).await;

    let broker: url::Url = common::broker_url().parse().unwrap();
    let upstream = format!(
        "{}:{}",
        broker.host_str().unwrap(),
        broker.port().unwrap_or(5672)
    );
    let proxy = common::proxy::Proxy::start(upstream.parse().unwrap()).await;
    let mut via_proxy = broker.clone();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    // Each replica reaches the sandbox's app through its own base URL, so the
    // sandbox records who sent what, on its own clock.
    let text = |via: &str, url: &str| {
        app.config_text
            .replace(&common::broker_url(), url)
            .replace("/netease/nimserver", &format!("/netease/{via}/nimserver"))
    };
    let config_a = config_file(&text("a", via_proxy.as_str()));
    let config_b = config_file(&text("b", &common::broker_url()));
    let (port_a, port_b) = (free_port(), free_port());
    let mut a: Process = app.spawn_process(&config_a, port_a);
    wait_active(port_a, Duration::from_secs(30)).await;
    let mut b = app.spawn_process(&config_b, port_b);
    wait_ready(port_b).await;
    wait_until("60 delivered", Duration::from_secs(30), || {
        app.sandbox.delivered_count() >= 60
    })
    .await;
    assert!(!is_active(port_b).await, "b stands by while a is active");

    // Silence both ways for two heartbeats. RabbitMQ documents that it drops a
    // peer after about one heartbeat timeout of silence (3.10 measured later);
    // the proxy plays its earliest: the broker's side closes after one.
    let stalled_at_ms = app.sandbox.now_ms();
    proxy.stall();
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_S)).await;
    proxy.sever_upstream();
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_S)).await;
    proxy.resume();
    app.wait_for_distinct_jobs(total, Duration::from_secs(90))
        .await;
    signal(&a, "-TERM");
    signal(&b, "-TERM");
    let _ = (a.wait(), b.wait());

    let delivered = app.delivered();
    let sent = |via: &str| -> Vec<u64> {
        delivered
            .iter()
            .filter(|m| m.via.as_deref() == Some(via))
            .map(|m| m.received_ms)
            .collect()
    };
    let (by_a, by_b) = (sent("a"), sent("b"));
    let first_b = *by_b.iter().min().expect("b took over");
    let last_a = *by_a.iter().max().expect("a sent");
    let a_after_stall = by_a.iter().filter(|ms| **ms >= stalled_at_ms).count();
    let stats = app.netease_stats();
    let duplicates: usize = app.deliveries_by_id().values().map(|n| n - 1).sum();
    eprintln!(
        "stall: heartbeat {HEARTBEAT_S} s, limit {LIMIT}/s, stalled at {stalled_at_ms} ms for {} s: a sent {a_after_stall} \
         request(s) after the stall began, its last {} ms after it; b's first {} ms after it; gap {} ms; \
         max {} in any 1 s, {} blocked, {duplicates} duplicate(s) of {total} jobs",
        2 * HEARTBEAT_S,
        last_a as i64 - stalled_at_ms as i64,
        first_b - stalled_at_ms,
        first_b as i64 - last_a as i64,
        stats.max_in_any_second,
        stats.blocked
    );
    assert!(
        first_b >= last_a + 1000,
        "a's last send at {last_a} ms, b's first at {first_b} ms: less than a second apart"
    );
    assert!(stats.max_in_any_second <= LIMIT, "{stats:?}");
    assert_eq!(stats.blocked, 0, "{stats:?}");
}
