//! A job waiting behind a long pause must not trip the broker's consumer
//! timeout: herald hands it back to its lane as a fresh copy first.
//!
//! With `HERALD_TEST_RABBITMQCTL` set (`make test-rabbitmq4` does) the test
//! puts a `consumer-timeout` policy on its own lane queue, so RabbitMQ 4.x
//! would close the lane's channel; 3.x refuses the policy (it has only the
//! global setting, never changed on the shared broker), and the test then
//! exercises the same path without it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Options, fault, scrape, spawn_app};
use herald::sandbox::FaultAnswer;

/// `rabbitmqctl` of the broker under test, as words, when the test may set policies.
fn rabbitmqctl() -> Option<Vec<String>> {
    let words: Vec<String> = std::env::var("HERALD_TEST_RABBITMQCTL")
        .ok()?
        .split_whitespace()
        .map(String::from)
        .collect();
    (!words.is_empty()).then_some(words)
}

/// Runs rabbitmqctl; `false` when it refused (3.x refuses a `consumer-timeout` policy).
fn ctl(words: &[String], args: &[&str]) -> bool {
    std::process::Command::new(&words[0])
        .args(&words[1..])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs")
        .success()
}

/// A policy removed when dropped, also when the test fails.
struct Policy {
    ctl: Vec<String>,
    name: String,
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = ctl(&self.ctl, &["clear_policy", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_paused_past_half_the_consumer_timeout_goes_back_to_its_lane_without_a_restart() {
    let mut app = spawn_app(
        "ctimeout",
        Options {
            start_worker: false,
            broker_extra: "consumer_timeout = \"6s\"",
            ..Options::default()
        },
    )
    .await;
    let queue = app.names.lane("netease", "default");
    let policy = rabbitmqctl().and_then(|words| {
        let name = format!("{queue}-consumer-timeout");
        let pattern = format!("^{}$", regex_escape(&queue));
        let set = [
            "set_policy",
            "--apply-to",
            "queues",
            &name,
            &pattern,
            r#"{"consumer-timeout":6000}"#,
        ];
        ctl(&words, &set).then_some(Policy { ctl: words, name })
    });
    // RabbitMQ checks consumer timeouts on the channel's tick, once a minute:
    // to be sure the broker would act, the pause spans a whole tick.
    let ban = if policy.is_some() { 70 } else { 8 };
    app.config.accounts[0].ban = Some(Duration::from_secs(ban));
    app.start_worker().await;
    let health = app.health.clone().unwrap();
    let never_unready = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let flag = never_unready.clone();
        async move {
            loop {
                if !health.is_ready() {
                    flag.store(false, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    app.sandbox
        .add_fault(fault("netease", "u-0", 1, FaultAnswer::Code(416)));
    let started = std::time::Instant::now();
    app.publish(&app.job("ct-0", "u-0")).await;
    common::wait_until("the ban answer", Duration::from_secs(10), || {
        app.netease_stats().requests >= 1
    })
    .await;
    // ct-1's first attempt, made from a recycled copy, fails: its retry must
    // still find the lane (a recycled copy arrives keyed by the queue's name).
    app.sandbox
        .add_fault(fault("netease", "u-1", 1, FaultAnswer::Code(500)));
    for i in 1..5 {
        app.publish(&app.job(&format!("ct-{i}"), &format!("u-{i}")))
            .await;
    }
    app.wait_for_distinct_jobs(5, Duration::from_secs(120))
        .await;
    let waited = started.elapsed().as_secs_f64();
    watcher.abort();

    let metrics = scrape(app.http_addr().port()).await;
    let recycled: f64 = metrics
        .lines()
        .find(|l| l.starts_with("herald_jobs_total") && l.contains("reason=\"consumer_timeout\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let by_id = app.deliveries_by_id();
    eprintln!(
        "ctimeout: ban {ban} s, consumer timeout 6 s (policy: {}): 5 jobs delivered after {waited:.1} s, \
         {recycled} hand-back(s) as fresh copies, deliveries per job {:?}, ready throughout: {}",
        policy.is_some(),
        by_id.values().collect::<Vec<_>>(),
        never_unready.load(Ordering::SeqCst)
    );
    assert!(
        never_unready.load(Ordering::SeqCst),
        "the broker session restarted while the jobs waited"
    );
    assert!(
        recycled >= 5.0,
        "every waiting job went back as a copy: {recycled}"
    );
    assert!(by_id.values().all(|n| *n == 1), "{by_id:?}");
    assert_eq!(app.dlq_depth().await, 0);
    app.stop_worker().await;
}

/// `s` as a regular expression matching itself (queue names hold `.` and `-`).
fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".^$*+?()[]{}|\\".contains(c);
            special.then_some('\\').into_iter().chain(Some(c))
        })
        .collect()
}
