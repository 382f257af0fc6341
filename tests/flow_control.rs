//! A broker memory alarm (`connection.blocked`) in the middle of a stream:
//! nothing lost, nothing duplicated, readiness says why, SIGTERM still exits.
//!
//! The alarm blocks every publisher on the broker, so these tests run alone in
//! their binary (cargo runs test binaries one after another) and put the
//! watermark back however they end. `HERALD_TEST_RABBITMQCTL` is the command
//! that reaches the broker under test (default `rabbitmqctl`; the Makefile sets
//! the RabbitMQ 4 node's).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Options, fault, spawn_app, wait_until};
use herald::sandbox::FaultAnswer;

/// A memory alarm on the broker under test for as long as this lives.
struct Alarm {
    restore: String,
}

fn rabbitmqctl(args: &[&str]) -> String {
    let command = std::env::var("HERALD_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = command.split_whitespace();
    let out = Command::new(words.next().expect("a command"))
        .args(words)
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Alarm {
    fn raise() -> Self {
        let restore = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        assert!(
            restore.parse::<f64>().is_ok(),
            "a relative watermark to restore, not {restore}"
        );
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "10MB"]);
        Self { restore }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.restore]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_mid_stream_neither_loses_nor_duplicates_a_job() {
    let app = spawn_app(
        "alarm",
        Options {
            accounts: vec![common::netease_account("default", 0).rate_limit(Some(50))],
            alone: true,
            ..Options::default()
        },
    )
    .await;
    let health = app.health.clone().unwrap();
    let total = 400;
    for i in 0..total {
        // Every fourth job fails once: its retry copy is published during the alarm.
        let to = if i % 4 == 0 {
            let to = format!("u-flaky-{i}");
            app.sandbox
                .add_fault(fault("netease", &to, 1, FaultAnswer::Code(500)));
            to
        } else {
            format!("u{i}")
        };
        app.publish(&app.job(&format!("a-{i}"), &to)).await;
    }
    wait_until("100 delivered", Duration::from_secs(30), || {
        app.sandbox.delivered_count() >= 100
    })
    .await;

    let alarm = Alarm::raise();
    let h = health.clone();
    wait_until(
        "readiness says the broker blocks",
        Duration::from_secs(15),
        move || h.blocked().is_some() && !h.is_ready(),
    )
    .await;
    let during = app.sandbox.delivered_count();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after_alarm = app.sandbox.delivered_count();
    drop(alarm);

    app.wait_for_distinct_jobs(total, Duration::from_secs(60))
        .await;
    let h = health.clone();
    wait_until("ready again", Duration::from_secs(15), move || h.is_ready()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = app.deliveries_by_id();
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "alarm: {} jobs delivered ({during} before the alarm was seen, {after_alarm} by its end), {} duplicate(s), {} dead",
        counts.len(),
        duplicates.len(),
        app.dlq_depth().await
    );
    assert_eq!(counts.len(), total, "every job delivered");
    assert!(
        duplicates.is_empty(),
        "no job delivered twice: {duplicates:?}"
    );
    assert_eq!(app.dlq_depth().await, 0, "no job dead-lettered");
    assert!(
        after_alarm > during,
        "jobs that need no copy are still delivered and acked during the alarm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_alarm_exits_within_the_drain_timeout() {
    let mut app = spawn_app(
        "alarm-term",
        Options {
            start_worker: false,
            alone: true,
            ..Options::default()
        },
    )
    .await;
    let total = 40;
    for i in 0..total {
        // Every fourth fails once (its retry copy waits on the alarm); not more
        // in a row than the circuit breaker lets through.
        let to = format!("u-term-{i}");
        if i % 4 == 0 {
            app.sandbox
                .add_fault(fault("netease", &to, 1, FaultAnswer::Code(500)));
        }
        app.publish(&app.job(&format!("t-{i}"), &to)).await;
    }
    let config = app.config_file();
    let port = common::free_port();
    let alarm = Alarm::raise();
    let mut worker = app.spawn_process(&config, port);
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let mut seen_blocked = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen_blocked && Instant::now() < deadline {
        if let Ok(r) = reqwest::get(&ready).await {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            seen_blocked = status == 503 && body.contains("\"broker_blocking\":\"");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_blocked, "/readyz says the broker blocks publishing");
    wait_until("jobs attempted", Duration::from_secs(20), || {
        app.netease_stats().requests >= 12
    })
    .await;

    common::signal(&worker, "-TERM");
    let sent = Instant::now();
    while worker.try_wait().unwrap().is_none() {
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "SIGTERM during an alarm exits within drain_timeout (10 s) and a few seconds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = sent.elapsed();
    drop(alarm);

    // Nothing lost: every job reaches the vendor once the alarm is over.
    app.start_worker().await;
    app.wait_for_distinct_jobs(total, Duration::from_secs(60))
        .await;
    let counts = app.deliveries_by_id();
    eprintln!(
        "SIGTERM during an alarm: exited after {exited:?}; {} jobs delivered, {} more than once",
        counts.len(),
        counts.values().filter(|n| **n > 1).count()
    );
}
