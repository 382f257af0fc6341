//! NetEase jobs from RabbitMQ to the (sandboxed) vendor: delivery, bad input,
//! retries, bans, rate precision and shutdown, against a real broker.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Account, Options, spawn_app, wait_until};
use herald::outcome::Reason;
use herald::sandbox::{Caller, Fault, FaultAnswer, netease};
use serde_json::json;

fn fault(to: &str, answer: FaultAnswer) -> Fault {
    common::fault("netease", to, 1, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_job_is_delivered_once_with_every_mapped_field() {
    let app = spawn_app("deliver", Options::default()).await;
    let job = json!({
        "v": 1, "id": "order-8812-shipped", "vendor": "netease", "account": "default",
        "from": "system", "to": {"group": "tid-42"}, "key": "order.shipped",
        "data": {"order": 8812}, "delivery": "online",
        "push": {"content": "Your order shipped", "payload": {"k": "v"}, "sound": "ding"},
        "expires_at": "2099-01-01T00:00:00Z",
        "options": {"option": {"badge": false}, "isForcePush": true, "forcePushContent": "fp",
                    "forcePushAll": true, "forcePushList": ["a1", "a2"], "env": "prod",
                    "checkAccidAsyncEnable": false}
    });
    app.publish(&job).await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    // Give a duplicate the chance to show up before asserting there is none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = app.delivered();
    assert_eq!(delivered.len(), 1, "delivered exactly once");
    let f = &delivered[0].fields;
    let expect = [
        ("from", "system"),
        ("msgtype", "1"),
        ("to", "tid-42"),
        ("attach", r#"{"data":{"order":8812},"key":"order.shipped"}"#),
        ("pushcontent", "Your order shipped"),
        ("payload", r#"{"k":"v"}"#),
        ("sound", "ding"),
        ("save", "1"),
        ("option", r#"{"badge":false}"#),
        ("isForcePush", "true"),
        ("forcePushContent", "fp"),
        ("forcePushAll", "true"),
        ("forcePushList", r#"["a1","a2"]"#),
        ("env", "prod"),
        ("checkAccidAsyncEnable", "false"),
    ];
    for (name, value) in expect {
        assert_eq!(f.get(name).map(String::as_str), Some(value), "field {name}");
    }
    // HTTP headers the sandbox records (`header.traceparent`) are not form fields.
    let fields = f.keys().filter(|k| !k.starts_with("header.")).count();
    assert_eq!(fields, expect.len(), "no unexpected fields: {f:?}");
    assert_eq!(delivered[0].app, "demo-app");
    assert_eq!(app.dlq_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_lands_in_the_dlq_with_reason_and_message_and_the_worker_keeps_going() {
    let app = spawn_app("badinput", Options::default()).await;
    app.publish_raw("netease.default", b"{\"id\": \"broken\", nope", "malformed")
        .await;
    let mut unknown_vendor = app.job("unknown-vendor", "u1");
    unknown_vendor["vendor"] = json!("carrier-pigeon");
    app.publish_raw(
        "netease.default",
        unknown_vendor.to_string().as_bytes(),
        "unknown-vendor",
    )
    .await;
    let mut unknown_account = app.job("unknown-account", "u1");
    unknown_account["account"] = json!("nope");
    app.publish_raw(
        "netease.default",
        unknown_account.to_string().as_bytes(),
        "unknown-account",
    )
    .await;
    let mut oversize = app.job("oversize", "u1");
    oversize["data"] = json!("x".repeat(5000));
    app.publish(&oversize).await;
    app.publish_raw(
        "netease.typo",
        app.job("unroutable", "u1").to_string().as_bytes(),
        "unroutable",
    )
    .await;
    app.publish(&app.job("fine", "u1")).await;

    app.wait_for_dead(5, Duration::from_secs(15)).await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    let by_id = |id: &str| {
        dead.iter()
            .find(|d| d.id.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("{id} in the DLQ: {dead:?}"))
    };
    let malformed = by_id("malformed");
    assert_eq!(malformed.reason, Reason::Invalid);
    assert!(
        malformed.error.starts_with("malformed job"),
        "{}",
        malformed.error
    );
    let v = by_id("unknown-vendor");
    assert_eq!(v.reason, Reason::Invalid);
    assert!(
        v.error.contains("unknown vendor `carrier-pigeon`"),
        "{}",
        v.error
    );
    let a = by_id("unknown-account");
    assert_eq!(a.reason, Reason::Invalid);
    assert!(a.error.contains("no account `nope`"), "{}", a.error);
    let o = by_id("oversize");
    assert_eq!(o.reason, Reason::Invalid);
    assert!(
        o.error.contains("attach") && o.error.contains("4096"),
        "{}",
        o.error
    );
    let u = by_id("unroutable");
    assert_eq!(u.reason, Reason::Unroutable);
    assert!(u.error.contains("netease.typo"), "{}", u.error);
    for d in &dead {
        assert_eq!(d.vendor, "netease");
        assert!(
            d.died_at.is_some() || d.reason == Reason::Unroutable,
            "{d:?}"
        );
    }
    assert_eq!(
        app.delivered().len(),
        1,
        "only the valid job reached the vendor"
    );
    assert_eq!(
        app.netease_stats().requests,
        1,
        "invalid jobs are never sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_500_is_retried_through_a_tier_then_delivered() {
    let app = spawn_app("retry500", Options::default()).await;
    app.sandbox
        .add_fault(fault("u-flaky", FaultAnswer::Code(500)));
    app.publish(&app.job("flaky", "u-flaky")).await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    // Outlast every tier: a retry copied into more than one tier would arrive twice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.delivered().len(), 1, "delivered exactly once");
    let stats = app.netease_stats();
    assert_eq!((stats.requests, stats.accepted), (2, 1), "{stats:?}");
    let gap = stats.last_ms.unwrap() - stats.first_ms.unwrap();
    assert!(
        gap >= 200,
        "the retry waited for the 200ms tier, not in process: {gap} ms"
    );
    assert_eq!(app.dlq_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_http_errors_are_retried_then_exhausted_with_the_last_code() {
    let app = spawn_app(
        "exhaust",
        Options {
            max_attempts: 3,
            ..Options::default()
        },
    )
    .await;
    app.sandbox.add_fault(fault("u-x", FaultAnswer::Garbage));
    app.sandbox
        .add_fault(fault("u-x", FaultAnswer::HttpStatus(502)));
    app.sandbox.add_fault(fault("u-x", FaultAnswer::Code(503)));
    app.publish(&app.job("doomed", "u-x")).await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, Reason::Exhausted);
    assert_eq!(dead[0].code.as_deref(), Some("503"));
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(app.netease_stats().requests, 3);
    assert!(app.delivered().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_414_is_dead_lettered_with_vendor_code_414() {
    let app = spawn_app("dead414", Options::default()).await;
    app.sandbox
        .add_fault(fault("u-bad", FaultAnswer::Code(414)));
    app.publish(&app.job("param-error", "u-bad")).await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.reason, d.code.as_deref(), d.attempts),
        (Reason::Permanent, Some("414"), 1)
    );
    assert!(d.error.contains("netease 414"), "{}", d.error);
    assert_eq!(
        app.netease_stats().requests,
        1,
        "a permanent error is never retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netease_block_pauses_lane_without_counting_an_attempt() {
    let app = spawn_app(
        "ban",
        Options {
            accounts: vec![common::netease_account("default", 0).ban(Duration::from_secs(1))],
            ..Options::default()
        },
    )
    .await;
    // u-a: blocked once, then delivered. u-b: blocked once, then a 414 whose DLQ copy shows the count.
    app.sandbox.add_fault(fault("u-a", FaultAnswer::Code(416)));
    app.sandbox.add_fault(fault("u-b", FaultAnswer::Code(416)));
    app.sandbox.add_fault(fault("u-b", FaultAnswer::Code(414)));
    app.publish(&app.job("blocked-then-ok", "u-a")).await;
    app.publish(&app.job("blocked-then-414", "u-b")).await;
    app.wait_for_delivered(1, Duration::from_secs(20)).await;
    app.wait_for_dead(1, Duration::from_secs(20)).await;
    let stats = app.netease_stats();
    let delivered = &app.delivered()[0];
    assert_eq!(delivered.fields["to"], "u-a");
    let paused_for = delivered.received_ms - stats.first_ms.unwrap();
    assert!(
        paused_for >= 1000,
        "nothing was sent during the 1 s ban: delivered {paused_for} ms after the block"
    );
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].attempts),
        (Reason::Permanent, 1),
        "the block did not count: {dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_job_is_dead_lettered_instead_of_sent() {
    let app = spawn_app("expired", Options::default()).await;
    let mut job = app.job("too-late", "u1");
    job["expires_at"] = json!("2020-01-01T00:00:00Z");
    app.publish(&job).await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(dead[0].reason, Reason::Expired);
    assert!(dead[0].error.contains("2020-01-01"), "{}", dead[0].error);
    assert_eq!(app.netease_stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_jobs_at_100_per_second_are_never_blocked_and_never_exceed_100_in_any_second() {
    let app = spawn_app(
        "rate1000",
        Options {
            alone: true,
            ..Options::default()
        },
    )
    .await;
    app.publish_jobs("r", 1000).await;
    app.wait_for_delivered(1000, Duration::from_secs(60)).await;
    let stats = app.netease_stats();
    let seconds = (stats.last_ms.unwrap() - stats.first_ms.unwrap()) as f64 / 1000.0;
    let rate = (stats.requests - 1) as f64 / seconds;
    eprintln!(
        "rate1000: {} requests, {} accepted, {} blocked, max {} in any 1 s window, {rate:.1} req/s over {seconds:.2} s",
        stats.requests, stats.accepted, stats.blocked, stats.max_in_any_second
    );
    assert_eq!(stats.blocked, 0, "{stats:?}");
    assert_eq!(stats.accepted, 1000, "{stats:?}");
    assert!(stats.max_in_any_second <= 100, "{stats:?}");
    assert_eq!(app.deliveries_by_id().len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_drains_and_a_second_worker_finishes_with_nothing_lost() {
    let app = spawn_app(
        "sigterm",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    app.sandbox.set_latency(Duration::from_millis(30));
    let total = 400;
    let mut body = String::new();
    for i in 0..total {
        let mut job = app.job(&format!("s-{i}"), &format!("u{i}"));
        if i % 50 == 7 {
            job["data"] = json!({"id": format!("s-{i}"), "pad": "x".repeat(5000)}); // invalid: oversize attach
        }
        body.push_str(&format!("{job}\n"));
    }
    for line in body.lines() {
        app.publish(&serde_json::from_str(line).unwrap()).await;
    }
    let invalid = (0..total).filter(|i| i % 50 == 7).count();
    let config = app.config_file();
    let herald = env!("CARGO_BIN_EXE_herald");
    let run = || {
        common::Process::spawn(
            Command::new(herald)
                .args(["run", "--config"])
                .arg(config.path())
                .env("RUST_LOG", "warn")
                .stderr(Stdio::null()),
        )
    };
    let mut first = run();
    wait_until(
        "first worker delivers some",
        Duration::from_secs(20),
        || app.sandbox.delivered_count() >= 50,
    )
    .await;
    let stopped_at = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || first.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    let after_first = app.delivered().len();
    eprintln!(
        "sigterm: first worker delivered {after_first} and stopped in {:?}",
        stopped_at.elapsed()
    );
    assert!(
        after_first < total - invalid,
        "the first worker was stopped mid-stream"
    );

    let mut second = run();
    wait_until("everything delivered", Duration::from_secs(60), || {
        app.sandbox.delivered_count() >= total - invalid
    })
    .await;
    app.wait_for_dead(invalid, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || second.wait()).await;

    let by_id = app.deliveries_by_id();
    let duplicates: usize = by_id.values().map(|n| n - 1).sum();
    let dead: BTreeSet<String> = app
        .dead_jobs()
        .await
        .into_iter()
        .filter_map(|d| d.id)
        .collect();
    let accounted: BTreeSet<String> = by_id.keys().cloned().chain(dead.iter().cloned()).collect();
    eprintln!(
        "sigterm: {} delivered, {} dead, {duplicates} duplicates, {} of {total} accounted for",
        by_id.len(),
        dead.len(),
        accounted.len()
    );
    assert_eq!(by_id.len(), total - invalid);
    assert_eq!(dead.len(), invalid);
    assert_eq!(
        accounted.len(),
        total,
        "every job delivered or dead-lettered"
    );
    assert_eq!(
        duplicates, 0,
        "a graceful stop finishes in-flight jobs before acking: no duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_unreachable_vendors_and_a_wrong_secret_end_where_they_should() {
    let app = spawn_app(
        "netfaults",
        Options {
            max_attempts: 2,
            // A second app, for an account configured with the wrong secret.
            sandbox: herald::sandbox::Settings::default().with(netease::Settings {
                apps: vec![
                    Caller::new("demo-app", "demo-secret"),
                    Caller::new("other-app", "other-secret"),
                ],
                ..netease::Settings::default()
            }),
            accounts: vec![
                common::netease_account("default", 0).timeout(Duration::from_millis(300)),
                Account::new("netease", "unreachable", "/netease/nimserver")
                    .base_url("http://127.0.0.1:1/netease/nimserver")
                    .key("app_key", "unreachable-app")
                    .key("app_secret", "demo-secret"),
                Account::new("netease", "wrongsecret", "/netease/nimserver")
                    .key("app_key", "other-app")
                    .key("app_secret", "not-the-secret"),
            ],
            ..Options::default()
        },
    )
    .await;
    app.sandbox
        .add_fault(common::fault("netease", "u-slow", 1, FaultAnswer::Hang));
    app.publish(&app.job("slow", "u-slow")).await;
    app.publish(&app.job_for("unreachable", "nowhere", "u1"))
        .await;
    app.publish(&app.job_for("wrongsecret", "badsum", "u1"))
        .await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    app.wait_for_dead(2, Duration::from_secs(15)).await;

    // The request that timed out went to a tier and was delivered on its second attempt.
    let listed: Vec<serde_json::Value> =
        reqwest::get(format!("http://{}/_sandbox/messages", app.sandbox_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        listed.len(),
        1,
        "the sandbox lists accepted messages over HTTP"
    );
    assert_eq!(listed[0]["fields"]["to"], "u-slow");
    let dead = app.dead_jobs().await;
    let by_id = |id: &str| dead.iter().find(|d| d.id.as_deref() == Some(id)).unwrap();
    let nowhere = by_id("nowhere");
    assert_eq!(
        (nowhere.reason, nowhere.code.as_deref(), nowhere.attempts),
        (Reason::Exhausted, Some("connect"), 2)
    );
    let badsum = by_id("badsum");
    assert_eq!(
        (badsum.reason, badsum.code.as_deref()),
        (Reason::Permanent, Some("414"))
    );
    assert!(
        badsum.error.contains("checksum"),
        "the sandbox checks CheckSum: {}",
        badsum.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_retry_schedule_overrides_the_global_one() {
    let app = spawn_app(
        "ownretry",
        Options {
            max_attempts: 5,
            accounts: vec![
                common::netease_account("default", 0).retry(&[Duration::from_millis(300)], 2),
            ],
            ..Options::default()
        },
    )
    .await;
    for _ in 0..3 {
        app.sandbox.add_fault(fault("u-x", FaultAnswer::Code(500)));
    }
    app.publish(&app.job("own", "u-x")).await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].attempts),
        (Reason::Exhausted, 2),
        "the account's max_attempts"
    );
    let stats = app.netease_stats();
    let gap = stats.last_ms.unwrap() - stats.first_ms.unwrap();
    assert!(
        gap >= 300,
        "the account's 300ms tier, not the global 200ms: {gap} ms"
    );
}
