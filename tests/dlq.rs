//! Dead-letter review through the `herald dlq` commands, against a real broker.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Options, spawn_app};
use herald::outcome::Reason;
use herald::sandbox::FaultAnswer;

fn herald_dlq(config: &tempfile::NamedTempFile, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("herald runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_list_show_replay_and_purge_dead_jobs() {
    let app = spawn_app("dlqtools", Options::default()).await;
    app.sandbox.add_fault(common::fault(
        "netease",
        "u-bad",
        1000,
        FaultAnswer::Code(414),
    ));
    for i in 0..6 {
        app.publish(&app.job(&format!("bad-{i}"), "u-bad")).await;
    }
    for i in 0..4 {
        app.publish_raw("netease.default", b"{oops", &format!("junk-{i}"))
            .await;
    }
    app.wait_for_dead(10, Duration::from_secs(20)).await;
    let config = app.config_file();

    // list: read-only, stable.
    let (ok, first, stderr) = herald_dlq(&config, &["list"]);
    assert!(ok, "{stderr}");
    let (_, second, _) = herald_dlq(&config, &["list"]);
    assert_eq!(
        first, second,
        "listing twice gives the same jobs in the same order"
    );
    assert!(first.contains("10 dead job(s)"), "{first}");
    assert_eq!(app.dlq_depth().await, 10, "listing removed nothing");
    let (_, filtered, _) = herald_dlq(&config, &["list", "--reason", "permanent", "--code", "414"]);
    assert!(filtered.contains("6 dead job(s)"), "{filtered}");
    let (ok, _, stderr) = herald_dlq(&config, &["list", "--reason", "lost"]);
    assert!(!ok && stderr.contains("unknown reason `lost`"), "{stderr}");

    // show: headers and body of one job.
    let (ok, shown, _) = herald_dlq(&config, &["show", "bad-0"]);
    assert!(ok);
    assert!(
        shown.contains("x-herald-vendor-code: 414") && shown.contains("\"id\": \"bad-0\""),
        "{shown}"
    );
    let (ok, _, stderr) = herald_dlq(&config, &["show", "nope"]);
    assert!(!ok && stderr.contains("no dead job with id `nope`"));

    // replay: a dry run changes nothing; a replay into the same fault dies again with attempts reset.
    let (ok, out, _) = herald_dlq(&config, &["replay", "--code", "414", "--dry-run"]);
    assert!(ok && out.contains("6 job(s) would be replayed"), "{out}");
    assert_eq!(app.dlq_depth().await, 10);
    let (ok, out, stderr) = herald_dlq(&config, &["replay", "--id", "bad-1"]);
    assert!(ok && out.contains("replayed 1 job(s)"), "{out}{stderr}");
    app.wait_for_dead(10, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, shown, _) = herald_dlq(&config, &["show", "bad-1"]);
    assert!(
        shown.contains("x-herald-replayed: 1") && shown.contains("attempts:    1"),
        "{shown}"
    );

    // replay for real once the vendor is fixed: at most --limit jobs, at --rate.
    app.sandbox.clear_faults();
    let (ok, out, stderr) = herald_dlq(
        &config,
        &[
            "replay", "--vendor", "netease", "--code", "414", "--limit", "4", "--rate", "50",
        ],
    );
    assert!(ok && out.contains("replayed 4 job(s)"), "{out}{stderr}");
    app.wait_for_delivered(4, Duration::from_secs(20)).await;
    assert_eq!(app.dlq_depth().await, 6);

    // purge: refuses without a terminal or --yes, then removes only what matches.
    let (ok, _, stderr) = herald_dlq(&config, &["purge", "--reason", "invalid"]);
    assert!(!ok && stderr.contains("--yes"), "{stderr}");
    assert_eq!(app.dlq_depth().await, 6);
    let (ok, out, _) = herald_dlq(&config, &["purge", "--reason", "invalid", "--yes"]);
    assert!(ok && out.contains("removed 4 dead job(s)"), "{out}");
    let left = app.dead_jobs().await;
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|j| j.reason == Reason::Permanent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_pass_sees_every_dead_job_beyond_the_quorum_prefetch_cap() {
    // Quorum queues treat prefetch 0 as 2,000 unacked messages; a DLQ is often larger.
    let app = spawn_app(
        "dlqbig",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let total = 2500;
    for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
        futures_util::future::try_join_all(chunk.iter().map(|i| {
            let props =
                lapin::BasicProperties::default().with_message_id(format!("d-{i}").as_str().into());
            let dead = app.names.dead();
            let publisher = &app.publisher;
            async move {
                publisher
                    .publish(&dead, "netease.default", b"{}", props)
                    .await
            }
        }))
        .await
        .unwrap();
    }
    let ids =
        |jobs: Vec<herald::dlq::DeadJob>| jobs.into_iter().filter_map(|j| j.id).collect::<Vec<_>>();
    let first = ids(app.dead_jobs().await);
    let second = ids(app.dead_jobs().await);
    assert_eq!(first.len(), total);
    assert_eq!(first, second, "same jobs, same order");
    assert_eq!(app.dlq_depth().await, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_loses_nothing_and_repeats_at_most_one_job() {
    let app = spawn_app("dlqcrash", Options::default()).await;
    app.sandbox.add_fault(common::fault(
        "netease",
        "u-bad",
        20,
        FaultAnswer::Code(414),
    ));
    let total = 20;
    for i in 0..total {
        app.publish(&app.job(&format!("r-{i}"), "u-bad")).await;
    }
    app.wait_for_dead(total, Duration::from_secs(20)).await;
    app.sandbox.clear_faults();
    let config = app.config_file();

    let mut replay = common::Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["dlq", "replay", "--rate", "10", "--config"])
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    common::signal(&replay, "-9");
    let _ = replay.wait();
    let partly = app.sandbox.delivered_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        app.dlq_depth().await < total,
        "the first replay moved some jobs"
    );

    let (ok, out, stderr) = herald_dlq(&config, &["replay"]);
    assert!(ok, "{out}{stderr}");
    let sandbox = app.sandbox.clone();
    common::wait_until("all delivered", Duration::from_secs(30), move || {
        let ids: std::collections::BTreeSet<String> = sandbox
            .messages()
            .iter()
            .map(|m| m.fields["attach"].clone())
            .collect();
        ids.len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let by_id = app.deliveries_by_id();
    let duplicates: usize = by_id.values().map(|n| n - 1).sum();
    eprintln!(
        "replay crash: {partly} delivered before the kill, {} ids delivered, {duplicates} duplicate(s)",
        by_id.len()
    );
    assert_eq!(by_id.len(), total, "nothing lost");
    assert!(
        duplicates <= 1,
        "at most the job between confirm and ack repeats: {duplicates}"
    );
    assert_eq!(app.dlq_depth().await, 0);
}
