//! Scaling out: account-wide limits across worker processes, failover after
//! `kill -9`, the circuit breaker, poison jobs and expiry in a retry tier.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Options, free_port, netease_account, scrape, signal, spawn_app, wait_until};
use herald::enqueue;
use herald::outcome::Reason;
use herald::sandbox::{Caller, Fault, FaultAnswer, Settings, netease};
use serde_json::json;

const ACTIVE: &str = "herald_lane_active{vendor=\"netease\",account=\"default\"} 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_hold_the_account_limit_and_a_standby_takes_over_after_kill_9() {
    let app = spawn_app(
        "replicas",
        Options {
            start_worker: false,
            alone: true,
            ..Options::default()
        },
    )
    .await;
    let total = 3000;
    app.publish_jobs("k", total).await;

    let config = app.config_file();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut workers: Vec<_> = ports
        .iter()
        .map(|p| app.spawn_process(&config, *p))
        .collect();
    wait_until("1000 delivered", Duration::from_secs(60), || {
        app.sandbox.delivered_count() >= 1000
    })
    .await;

    let mut active = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        if scrape(*port).await.contains(ACTIVE) {
            active.push(i);
        }
    }
    assert_eq!(
        active.len(),
        1,
        "exactly one replica consumes the limited lane: {active:?}"
    );
    let victim = active[0];
    let before_kill = app.netease_stats();
    let killed_at_ms = app.sandbox.now_ms();
    signal(&workers[victim], "-9");
    let _ = workers[victim].wait();

    app.wait_for_distinct_jobs(total, Duration::from_secs(90))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut new_active = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        if i != victim && scrape(*port).await.contains(ACTIVE) {
            new_active.push(i);
        }
    }
    for (i, w) in workers.iter_mut().enumerate() {
        if i != victim {
            signal(w, "-TERM");
            let _ = w.wait();
        }
    }

    let stats = app.netease_stats();
    let delivered = app.delivered();
    // The failover is the longest silence around the kill: requests the victim
    // sent just before dying may still arrive after `killed_at_ms`.
    let mut around_kill: Vec<u64> = delivered
        .iter()
        .map(|m| m.received_ms)
        .filter(|ms| *ms + 1000 >= killed_at_ms)
        .collect();
    around_kill.sort_unstable();
    let failover_s = around_kill
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .expect("deliveries around the kill") as f64
        / 1000.0;
    let by_id = app.deliveries_by_id();
    let duplicates: usize = by_id.values().map(|n| n - 1).sum();
    let steady_rate = (before_kill.requests - 1) as f64
        / ((before_kill.last_ms.unwrap() - before_kill.first_ms.unwrap()) as f64 / 1000.0);
    let overall_rate = (stats.requests - 1) as f64
        / ((stats.last_ms.unwrap() - stats.first_ms.unwrap()) as f64 / 1000.0);
    eprintln!(
        "replicas: 4 workers, {total} jobs: max {} in any 1 s, {} blocked (416), steady {steady_rate:.1} req/s \
         ({:.1}% of 100) before the kill, {overall_rate:.1} req/s overall, failover {failover_s:.2} s, \
         {duplicates} duplicate(s), new active replica {new_active:?}; busiest second from {} ms, kill at {killed_at_ms} ms",
        stats.max_in_any_second,
        stats.blocked,
        steady_rate,
        stats.busiest_second_ms.unwrap_or_default()
    );
    assert!(stats.max_in_any_second <= 100, "{stats:?}");
    assert_eq!(stats.blocked, 0, "{stats:?}");
    assert!(failover_s <= 5.0, "standby took over in {failover_s} s");
    assert_eq!(by_id.len(), total, "every job delivered");
    assert!(
        duplicates <= 8,
        "only jobs in flight at the kill (≤ prefetch 8) may repeat: {duplicates}"
    );
    assert_eq!(new_active.len(), 1, "one standby took over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_stops_one_account_while_another_delivers_at_full_rate() {
    let app = spawn_app(
        "breaker",
        Options {
            accounts: ["a", "b"]
                .into_iter()
                .enumerate()
                .map(|(i, name)| netease_account(name, i).breaker(3, Duration::from_millis(500)))
                .collect(),
            sandbox: Settings::default().with(netease::Settings {
                apps: vec![
                    Caller::new("app-a", "secret-a"),
                    Caller::new("app-b", "secret-b"),
                ],
                ..netease::Settings::default()
            }),
            tiers: vec!["200ms"],
            max_attempts: 50,
            alone: true,
            ..Options::default()
        },
    )
    .await;
    app.sandbox.add_fault(Fault {
        vendor: "netease".into(),
        app: Some("app-a".into()),
        to: None,
        times: 100_000,
        answer: FaultAnswer::HttpStatus(503),
    });
    let storm_started = Instant::now();
    for i in 0..40 {
        app.publish(&app.job_for("a", &format!("a-{i}"), &format!("u{i}")))
            .await;
    }
    let b_jobs: String = (0..300)
        .map(|i| {
            format!(
                "{}\n",
                app.job_for("b", &format!("b-{i}"), &format!("u{i}"))
            )
        })
        .collect();
    let b_jobs = enqueue::check_all(b_jobs.as_bytes(), &app.config).unwrap();
    enqueue::publish(&app.publisher, &app.names, &b_jobs)
        .await
        .unwrap();

    let sandbox = app.sandbox.clone();
    wait_until("b delivered", Duration::from_secs(30), move || {
        sandbox.count_messages(|m| m.app == "app-b") >= 300
    })
    .await;
    let storm = storm_started.elapsed().as_secs_f64();
    let a = app.app_stats("app-a");
    let b = app.app_stats("app-b");
    let b_rate =
        (b.requests - 1) as f64 / ((b.last_ms.unwrap() - b.first_ms.unwrap()) as f64 / 1000.0);
    // Without a breaker, 40 jobs retried every 200 ms would send ~96/s for the whole storm.
    let bound = 8 + 3 + (storm / 0.5).ceil() as usize + 2;
    eprintln!(
        "breaker: storm {storm:.1} s: account a sent {} requests (bound {bound}), account b {} at {b_rate:.1} req/s, \
         max {} in any 1 s",
        a.requests, b.requests, b.max_in_any_second
    );
    assert!(
        a.requests <= bound,
        "a kept hammering: {} requests",
        a.requests
    );
    assert!(b_rate >= 90.0, "b delivered at full rate: {b_rate:.1}/s");
    assert_eq!(b.blocked, 0);

    app.sandbox.clear_faults();
    let sandbox = app.sandbox.clone();
    wait_until("a recovers", Duration::from_secs(30), move || {
        sandbox.count_messages(|m| m.app == "app-a") >= 40
    })
    .await;
    assert_eq!(app.dlq_depth().await, 0, "no job was lost or exhausted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_killing_workers_ends_in_the_dlq_as_poison() {
    let app = spawn_app(
        "poison",
        Options {
            start_worker: false,
            worker_extra: "delivery_limit = 2",
            ..Options::default()
        },
    )
    .await;
    // The sandbox never answers for u-poison; the test plays the crash by killing the worker
    // every time that request arrives, as a segfault or OOM kill would.
    app.sandbox
        .add_fault(common::fault("netease", "u-poison", 100, FaultAnswer::Hang));
    app.publish(&app.job("poison-1", "u-poison")).await;
    app.publish(&app.job("fine-1", "u-fine")).await;
    let config = app.config_file();
    let mut kills = 0;
    while app.dlq_depth().await == 0 {
        assert!(kills <= 4, "still not dead-lettered after {kills} crashes");
        let hung = app.sandbox.hung();
        let worker = app.spawn_process(&config, free_port());
        let deadline = Instant::now() + Duration::from_secs(15);
        while app.sandbox.hung() == hung && app.dlq_depth().await == 0 {
            assert!(
                Instant::now() < deadline,
                "the worker never sent the poison job"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if app.sandbox.hung() > hung {
            kills += 1;
        }
        signal(&worker, "-9");
        let mut worker = worker;
        let _ = worker.wait();
    }
    let dead = app.dead_jobs().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id.as_deref(), Some("poison-1"));
    assert_eq!(dead[0].reason, Reason::Poison);
    assert!(
        dead[0].error.contains("delivery limit"),
        "{}",
        dead[0].error
    );
    assert_eq!(
        app.deliveries_by_id().keys().collect::<Vec<_>>(),
        ["fine-1"]
    );
    eprintln!("poison: dead-lettered after {kills} worker crashes (delivery_limit 2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_expires_while_waiting_in_a_tier_is_dead_lettered_as_expired() {
    let app = spawn_app(
        "tierexpiry",
        Options {
            tiers: vec!["2s"],
            ..Options::default()
        },
    )
    .await;
    app.sandbox.add_fault(common::fault(
        "netease",
        "u-late",
        1,
        FaultAnswer::Code(500),
    ));
    let mut job = app.job("late", "u-late");
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(2500);
    job["expires_at"] = json!(expires.to_rfc3339());
    app.publish(&job).await;
    app.wait_for_dead(1, Duration::from_secs(20)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].attempts),
        (Reason::Expired, 1),
        "{dead:?}"
    );
    assert_eq!(
        app.netease_stats().requests,
        1,
        "not sent again after expiry"
    );
    let ids: BTreeSet<_> = app.deliveries_by_id().into_keys().collect();
    assert!(ids.is_empty());
}
