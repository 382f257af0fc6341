//! Dead-letter review through the `herald dlq` commands, against a real broker.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::proxy::ConsumeGate;
use common::{Options, TestApp, spawn_app};
use futures_util::StreamExt;
use herald::envelope::REPLAYED;
use herald::envelope::header_u64;
use herald::outcome::Reason;
use herald::sandbox::FaultAnswer;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

fn herald_dlq(config: &tempfile::NamedTempFile, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config.path())
        .env("RUST_LOG", "warn")
        .env("USER", "tester")
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
    for (filter, value, n) in [
        ("--recipient", "u-bad", 6),
        ("--key", "test.key", 6),
        ("--text", "JUNK-2", 1),
    ] {
        let (_, listed, _) = herald_dlq(&config, &["list", filter, value]);
        assert!(
            listed.contains(&format!("\n{n} dead job(s)"))
                || listed.starts_with(&format!("{n} dead")),
            "{filter}: {listed}"
        );
    }
    let (_, stats, _) = herald_dlq(&config, &["stats", "--json"]);
    let groups: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let invalid = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["reason"] == "invalid")
        .unwrap();
    let shape = invalid["shape"].as_str().unwrap();
    assert!(!shape.is_empty() && invalid["count"] == 4, "{stats}");
    let (_, listed, _) = herald_dlq(&config, &["list", "--shape", shape]);
    assert!(listed.contains("4 dead job(s)"), "{listed}");
    let (_, table, _) = herald_dlq(&config, &["stats"]);
    assert!(table.lines().next().unwrap().ends_with("SHAPE"), "{table}");
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

/// A proxy to the test broker that holds the first `basic.consume` of whoever connects through it.
async fn consume_gate() -> ConsumeGate {
    let url = url::Url::parse(&common::broker_url()).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
    ConsumeGate::start(upstream.parse().unwrap()).await
}

/// The app's config, with the broker reached through `gate`.
fn gated_config(app: &TestApp, gate: &ConsumeGate) -> tempfile::NamedTempFile {
    let mut url = url::Url::parse(&common::broker_url()).unwrap();
    url.set_port(Some(gate.addr.port())).unwrap();
    let text = app.config_text.replace(
        &format!("url = \"{}\"", common::broker_url()),
        &format!("url = \"{url}\""),
    );
    assert_ne!(text, app.config_text, "the broker URL was replaced");
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// Another reader of the DLQ, holding messages unacked until it is released.
struct OtherReader {
    channel: lapin::Channel,
    _consumer: lapin::Consumer,
}

impl OtherReader {
    /// Takes the next `n` messages of the DLQ and holds them.
    async fn hold(app: &TestApp, n: u16) -> Self {
        let channel = app.conn.create_channel().await.unwrap();
        channel
            .basic_qos(n, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                app.names.dlq().as_str().into(),
                "another-reader".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("the other reader gets a message")
                .unwrap()
                .unwrap();
        }
        Self {
            channel,
            _consumer: consumer,
        }
    }

    /// Closes its channel: the broker hands the held messages back.
    async fn release(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// Publishes `n` dead jobs straight to the dead-letter exchange, as herald writes them.
async fn dead(app: &TestApp, prefix: &str, n: usize) {
    for i in 0..n {
        let mut headers = FieldTable::default();
        herald::envelope::set_str(&mut headers, herald::envelope::REASON, "invalid");
        herald::envelope::set_str(
            &mut headers,
            herald::envelope::ROUTING_KEY,
            "netease.default",
        );
        let props = lapin::BasicProperties::default()
            .with_message_id(format!("{prefix}-{i}").as_str().into())
            .with_headers(headers);
        app.publisher
            .publish(&app.names.dead(), "netease.default", b"{oops", props)
            .await
            .unwrap();
    }
}

/// Every dead copy's job id with its `x-herald-replayed` count, in queue order.
async fn replay_counts(app: &TestApp) -> Vec<(String, u64)> {
    let mut counts = Vec::new();
    herald::dlq::scan(&app.conn, &app.names, |d| {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map_or("-".to_string(), |m| m.as_str().to_string());
        counts.push((id, header_u64(&d.properties, REPLAYED).unwrap_or(0)));
    })
    .await
    .unwrap();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_exactly_the_jobs_it_listed_never_one_that_died_later() {
    let app = spawn_app("dlqplan", Options::default()).await;
    for i in 0..4 {
        app.publish_raw("netease.default", b"{oops", &format!("junk-{i}"))
            .await;
    }
    app.wait_for_dead(4, Duration::from_secs(20)).await;
    let config = app.config_file();
    let plan = tempfile::NamedTempFile::new().unwrap();
    let plan_path = plan.path().to_str().unwrap();

    // The operator reviews what would go, and keeps that list.
    let (ok, out, stderr) = herald_dlq(
        &config,
        &["purge", "--reason", "invalid", "--save-plan", plan_path],
    );
    assert!(ok, "{out}{stderr}");
    assert!(
        out.contains("4 dead job(s)") && out.contains("nothing removed"),
        "{out}"
    );
    assert_eq!(app.dlq_depth().await, 4);

    // Meanwhile a new job dies the same way, and junk-0 is replayed and dies again.
    app.publish_raw("netease.default", b"{late", "junk-late")
        .await;
    let (ok, out, stderr) = herald_dlq(&config, &["replay", "--id", "junk-0"]);
    assert!(ok && out.contains("replayed 1 job(s)"), "{out}{stderr}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ids: Vec<_> = app
            .dead_jobs()
            .await
            .into_iter()
            .filter_map(|j| j.id)
            .collect();
        if ids.len() == 5 && ids.contains(&"junk-0".into()) && ids.contains(&"junk-late".into()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dead jobs now: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Removing by the plan removes the three listed copies still there, nothing else.
    let (ok, out, stderr) = herald_dlq(&config, &["purge", "--yes", "--plan", plan_path]);
    assert!(ok, "{out}{stderr}");
    assert!(out.contains("removed 3 dead job(s)"), "{out}");
    assert!(
        out.contains("1 of the 4 listed job(s) were not in the DLQ"),
        "{out}"
    );
    let mut left: Vec<_> = app
        .dead_jobs()
        .await
        .into_iter()
        .filter_map(|j| j.id)
        .collect();
    left.sort();
    assert_eq!(left, ["junk-0", "junk-late"]);

    // A plan is the whole selection: filters cannot widen or narrow it.
    let (ok, _, stderr) = herald_dlq(
        &config,
        &["purge", "--yes", "--plan", plan_path, "--reason", "invalid"],
    );
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    assert_eq!(app.dlq_depth().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_never_resends_a_job_it_already_replayed_in_the_same_run() {
    let app = spawn_app("dlqonce", Options::default()).await;
    // Every replay fails again at once, so its copy is back in the DLQ while the run sweeps.
    app.sandbox.add_fault(common::fault(
        "netease",
        "u-bad",
        1000,
        FaultAnswer::Code(414),
    ));
    let total = 10;
    for i in 0..total {
        app.publish(&app.job(&format!("once-{i}"), "u-bad")).await;
    }
    app.wait_for_dead(total, Duration::from_secs(20)).await;
    let mut gate = consume_gate().await;
    let config = gated_config(&app, &gate);

    let replay = tokio::task::spawn_blocking(move || herald_dlq(&config, &["replay"]));
    // The replay has counted 10 dead jobs; another reader takes 4 before it consumes.
    gate.held().await;
    let other = OtherReader::hold(&app, 4).await;
    gate.release();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    other.release().await;
    let (ok, out, stderr) = replay.await.unwrap();

    // Each job was sent once by the run: every copy back in the DLQ was replayed once.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let counts = replay_counts(&app).await;
        assert!(
            counts.iter().all(|(_, n)| *n <= 1),
            "a job was replayed twice in one run: {counts:?}"
        );
        if counts.len() == total && counts.iter().all(|(_, n)| *n == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every job was replayed exactly once: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "{out}{stderr}");
    assert!(out.contains("replayed 10 job(s)"), "{out}");
    assert!(
        out.contains("skipped") && out.contains("they stay in the DLQ"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_could_not_see_the_whole_dlq_says_so() {
    let app = spawn_app(
        "dlqpartial",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "p", 10).await;
    let config = app.config_file();

    // Another reader holds 4 when the pass starts: no count the broker gives includes them.
    let other = OtherReader::hold(&app, 4).await;
    let (ok, out, stderr) = herald_dlq(&config, &["list"]);
    assert!(ok, "{stderr}");
    assert!(out.contains("6 dead job(s)"), "{out}");
    assert!(
        stderr.contains("incomplete pass") && stderr.contains("1 other consumer(s)"),
        "{stderr}"
    );
    let (ok, out, stderr) = herald_dlq(&config, &["purge", "--yes", "--id", "p-9"]);
    assert!(!ok, "a purge that saw part of the DLQ fails: {out}{stderr}");
    assert!(out.contains("removed 1 dead job(s)"), "{out}");
    assert!(stderr.contains("incomplete pass"), "{stderr}");
    other.release().await;
    // A quorum queue takes returned messages back asynchronously.
    app.wait_for_dead(9, Duration::from_secs(10)).await;

    // Another reader takes 3 after the pass counted 9: it sees 6 of 9 and says so.
    let mut gate = consume_gate().await;
    let gated = gated_config(&app, &gate);
    let replay = tokio::task::spawn_blocking(move || herald_dlq(&gated, &["replay"]));
    gate.held().await;
    let other = OtherReader::hold(&app, 3).await;
    gate.release();
    let (ok, out, stderr) = replay.await.unwrap();
    other.release().await;
    assert!(!ok, "{out}{stderr}");
    assert!(out.contains("replayed 6 job(s)"), "{out}");
    assert!(
        stderr.contains("saw 6 of the 9") && stderr.contains("no message for 3 s"),
        "{stderr}"
    );
    app.wait_for_dead(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.dlq_depth().await,
        3,
        "the 3 it never saw are still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_without_message_id_is_found_by_its_body_id() {
    let app = spawn_app("dlq-no-msgid", Options::default()).await;
    app.sandbox
        .add_fault(common::fault("netease", "u-bad", 1, FaultAnswer::Code(414)));
    app.publish_without_message_id(&app.job("spring-7", "u-bad"))
        .await;
    app.wait_for_dead(1, Duration::from_secs(20)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(dead[0].id.as_deref(), Some("spring-7"));
    let config = app.config_file();
    let (ok, shown, stderr) = herald_dlq(&config, &["show", "spring-7"]);
    assert!(ok, "{stderr}");
    assert!(shown.contains("x-herald-vendor-code: 414"), "{shown}");
    let (_, listed, _) = herald_dlq(&config, &["list"]);
    assert!(listed.contains("spring-7"), "{listed}");
}

/// The ids in the DLQ, in queue order.
async fn dlq_ids(app: &TestApp) -> Vec<String> {
    replay_counts(app)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// RabbitMQ 4.x counts each return of a read toward a quorum queue's delivery
/// limit (20 when none is set) and then drops the message: the DLQ states one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reads_leave_every_dead_job_in_place_and_in_order() {
    let app = spawn_app(
        "dlq-reads",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "read", 10).await;
    let before = dlq_ids(&app).await;
    assert_eq!(before.len(), 10);
    let config = app.config_file();
    for round in 0..50 {
        let (ok, out, err) = match round % 3 {
            0 => herald_dlq(&config, &["stats"]),
            1 => herald_dlq(&config, &["list"]),
            _ => herald_dlq(&config, &["show", "read-7"]),
        };
        assert!(ok, "read {round} succeeds: {out}{err}");
        match round % 3 {
            0 => assert!(out.contains("10 dead job(s)"), "read {round}: {out}"),
            1 => assert_eq!(out.matches("read-").count(), 10, "read {round}: {out}"),
            _ => assert!(out.contains("read-7"), "read {round}: {out}"),
        }
    }
    assert_eq!(dlq_ids(&app).await, before, "same jobs, same order");
}

/// A DLQ declared by an earlier herald (no delivery limit) is refused for
/// reading, then moved to the current declaration in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_dlq_is_refused_for_reading_then_migrated_in_order() {
    let app = spawn_app(
        "dlq-legacy",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let channel = app.conn.create_channel().await.unwrap();
    let dlq = app.names.dlq();
    channel
        .queue_delete(dlq.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut legacy = FieldTable::default();
    legacy.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(dlq.as_str().into(), durable, legacy)
        .await
        .unwrap();
    channel
        .queue_bind(
            dlq.as_str().into(),
            app.names.dead().as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    dead(&app, "legacy", 12).await;
    let config = app.config_file();

    let (ok, out, err) = herald_dlq(&config, &["stats"]);
    assert!(!ok, "a legacy DLQ is not read: {out}");
    assert!(err.contains("herald dlq migrate"), "{err}");

    let (ok, out, err) = herald_dlq(&config, &["migrate"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("12 dead job(s) moved out, 12 moved back"),
        "{out}"
    );
    let expected: Vec<String> = (0..12).map(|i| format!("legacy-{i}")).collect();
    assert_eq!(dlq_ids(&app).await, expected, "every job, in order");
    // New dead jobs reach the redeclared DLQ through the dead exchange.
    dead(&app, "after", 1).await;
    assert_eq!(app.dlq_depth().await, 13);

    let (ok, out, _) = herald_dlq(&config, &["migrate"]);
    assert!(
        ok && out.contains("already has the current declaration"),
        "{out}"
    );
    let (ok, out, err) = herald_dlq(&config, &["stats"]);
    assert!(ok && out.contains("13 dead job(s)"), "{out}{err}");
}

/// Reviewing dead jobs needs only `[broker]`: accounts may leave out every secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_read_a_config_without_vendor_secrets() {
    let app = spawn_app(
        "dlq-review",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "rev", 3).await;
    let without_secrets: String = app
        .config_text
        .lines()
        .filter(|l| !l.starts_with("app_secret") && !l.starts_with("app_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(herald::config::Config::parse(&without_secrets, Vec::new()).is_err());
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(config.path(), &without_secrets).unwrap();
    let (ok, out, err) = herald_dlq(&config, &["stats"]);
    assert!(ok && out.contains("3 dead job(s)"), "{out}{err}");
    std::fs::write(config.path(), format!("{without_secrets}\nlimit = 1\n")).unwrap();
    let (ok, _, err) = herald_dlq(&config, &["stats"]);
    assert!(
        !ok && err.contains("limit"),
        "an unknown key is still an error: {err}"
    );
}

/// Every death and replay is in the job's history, and `dlq show` prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_job_keeps_its_story_through_a_replay_and_shows_it() {
    let app = spawn_app("dlq-story", Options::default()).await;
    app.sandbox.add_fault(common::fault(
        "netease",
        "u-bad",
        1000,
        FaultAnswer::Code(414),
    ));
    app.publish(&app.job("story-1", "u-bad")).await;
    app.wait_for_dead(1, Duration::from_secs(20)).await;
    let config = app.config_file();
    let (ok, out, err) = herald_dlq(&config, &["replay", "--id", "story-1"]);
    assert!(ok, "{out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let (_, shown, _) = herald_dlq(&config, &["show", "story-1"]);
        if shown.matches("  dead  ").count() == 2 {
            break shown;
        }
        assert!(std::time::Instant::now() < deadline, "{shown}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let history: Vec<&str> = shown
        .lines()
        .skip_while(|l| *l != "history:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert_eq!(history.len(), 3, "{shown}");
    assert!(
        history[0].contains("dead") && history[0].contains("reason permanent"),
        "{shown}"
    );
    assert!(
        history[0].contains("code 414") && history[0].contains("attempt 1"),
        "{shown}"
    );
    assert!(
        history[1].contains("replay") && history[1].contains("by tester"),
        "{shown}"
    );
    assert!(
        history[2].contains("dead") && history[2].contains("code 414"),
        "{shown}"
    );
    assert!(
        !shown.contains("x-herald-history:"),
        "the raw header is not repeated: {shown}"
    );
}

/// The audit trail as `herald dlq audit --json` prints it.
fn audit_records(config: &tempfile::NamedTempFile) -> Vec<serde_json::Value> {
    let (ok, out, err) = herald_dlq(config, &["audit", "--json"]);
    assert!(ok, "{out}{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replay_and_purge_is_audited_with_who_which_jobs_and_the_result() {
    let app = spawn_app(
        "dlq-audit",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "au", 3).await;
    let config = app.config_file();
    let (ok, out, err) = herald_dlq(&config, &["replay", "--id", "au-0"]);
    assert!(ok && out.contains("replayed 1 job(s)"), "{out}{err}");
    let (ok, out, err) = herald_dlq(&config, &["purge", "--yes", "--reason", "invalid"]);
    assert!(ok && out.contains("removed 2 dead job(s)"), "{out}{err}");
    let (ok, out, _) = herald_dlq(&config, &["list"]);
    assert!(ok && out.contains("0 dead job(s)"), "{out}");

    let records = audit_records(&config);
    let summary: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().into(),
                r["phase"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expect = |a: &str, p: &str| (a.to_string(), p.to_string());
    assert_eq!(
        summary,
        [
            expect("replay", "started"),
            expect("replay", "jobs"),
            expect("replay", "finished"),
            expect("purge", "started"),
            expect("purge", "jobs"),
            expect("purge", "finished"),
        ],
        "the dry listing before the purge is a read, not an action: {records:#?}"
    );
    assert!(
        records
            .iter()
            .all(|r| r["who"] == "tester" && r["source"] == "cli")
    );
    assert_eq!(records[0]["filter"], "--id au-0");
    assert_eq!(records[0]["action_id"], records[2]["action_id"]);
    assert_ne!(records[0]["action_id"], records[3]["action_id"]);
    assert_eq!(records[1]["jobs"][0]["id"], "au-0");
    assert_eq!(
        records[1]["jobs"][0]["fingerprint"].as_str().unwrap().len(),
        64
    );
    assert_eq!(records[2]["outcome"]["done"], 1);
    let purged: Vec<&str> = records[4]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(purged, ["au-1", "au-2"]);
    assert_eq!(records[5]["outcome"]["done"], 2);
    assert_eq!(
        audit_records(&config).len(),
        6,
        "reading the audit removes nothing"
    );
    let (ok, recent, err) = herald_dlq(
        &config,
        &["audit", "--since", "1h", "--limit", "2", "--json"],
    );
    let recent: Vec<serde_json::Value> = serde_json::from_str(&recent).unwrap();
    assert!(
        ok && recent.len() == 2 && recent[1] == records[5],
        "the newest two: {recent:?}{err}"
    );
    let (_, later, _) = herald_dlq(
        &config,
        &["audit", "--since", "2100-01-01T00:00:00Z", "--json"],
    );
    assert_eq!(later.trim(), "[]");
    let (_, table, _) = herald_dlq(&config, &["audit"]);
    assert!(
        table.contains("purge") && table.contains("tester") && table.contains("6 record(s)"),
        "{table}"
    );

    // Without its audit stream an action does nothing.
    dead(&app, "kept", 1).await;
    let channel = app.conn.create_channel().await.unwrap();
    channel
        .queue_delete(app.names.audit().as_str().into(), Default::default())
        .await
        .unwrap();
    let (ok, out, err) = herald_dlq(&config, &["purge", "--yes", "--id", "kept-0"]);
    assert!(
        !ok && err.contains("audit") && err.contains("nothing was done"),
        "{out}{err}"
    );
    assert_eq!(app.dlq_depth().await, 1);
}

/// Two passes at once, on one connection (the console) or from two processes,
/// each see the whole DLQ: the second waits for the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_readers_at_once_each_see_every_dead_job_one_after_the_other() {
    let app = spawn_app(
        "dlq-readers",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "two", 10).await;
    // On one connection, as the console's passes are: the second waits for the first.
    let mut first = herald::dlq::Reader::open(&app.conn, &app.names)
        .await
        .unwrap();
    for _ in 0..10 {
        first.next().await.expect("a dead job");
    }
    let second = async {
        let mut n = 0;
        let coverage = herald::dlq::scan(&app.conn, &app.names, |_| n += 1)
            .await
            .unwrap();
        (n, coverage.is_complete())
    };
    let release_first = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        first.close(0).await;
    };
    let (seen, ()) = tokio::join!(second, release_first);
    assert_eq!(seen, (10, true), "the second pass saw the whole DLQ");

    // A pass holds all ten unacked; a `herald dlq list` started meanwhile waits, then sees them all.
    let mut reader = herald::dlq::Reader::open(&app.conn, &app.names)
        .await
        .unwrap();
    for _ in 0..10 {
        reader.next().await.expect("a dead job");
    }
    let config = app.config_file();
    let list = tokio::task::spawn_blocking(move || herald_dlq(&config, &["list"]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    reader.close(0).await;
    let (ok, out, err) = list.await.unwrap();
    assert!(ok && out.contains("10 dead job(s)"), "{out}{err}");
    assert!(!err.contains("incomplete"), "{err}");
    assert_eq!(app.dlq_depth().await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_cannot_get_the_lock_in_time_says_so_and_reads_nothing() {
    let app = spawn_app(
        "dlq-locked",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "lk", 4).await;
    let other = herald::broker::connect(&app.config.broker.url, "another reader")
        .await
        .unwrap();
    let held = herald::dlq::ReaderLock::acquire(&other, &app.names, Duration::from_secs(5))
        .await
        .unwrap();
    let err = herald::dlq::Reader::open_within(&app.conn, &app.names, Duration::from_secs(1))
        .await
        .err()
        .expect("the lock is held");
    let err = format!("{err:#}");
    assert!(
        err.contains("another herald dlq command or console is reading the DLQ")
            && err.contains("Nothing was read"),
        "{err}"
    );
    let channel = app.conn.create_channel().await.unwrap();
    let (ready, consumers) = herald::broker::queue_status(&channel, &app.names.dlq())
        .await
        .unwrap();
    assert_eq!((ready, consumers), (4, 0), "nothing was taken from the DLQ");
    // The holder's connection dies: the lock is free at once.
    let _ = other.close(200, "gone".into()).await;
    drop(held);
    let reader = herald::dlq::Reader::open_within(&app.conn, &app.names, Duration::from_secs(5))
        .await
        .unwrap();
    reader.close(0).await;
}

/// `[dlq]` retention: a DLQ declared otherwise is reported, `migrate` redeclares
/// it, and at `max_jobs` a new dead job drops the oldest (never refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_reported_until_migrated_then_the_oldest_dead_job_makes_room() {
    let app = spawn_app(
        "dlq-retain",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "old", 5).await;
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        config.path(),
        format!("{}\n[dlq]\nmax_jobs = 3\n", app.config_text),
    )
    .unwrap();
    let (ok, out, err) = herald_dlq(&config, &["stats"]);
    assert!(ok && out.contains("5 dead job(s)"), "{out}{err}");
    assert!(
        err.contains("declared with other retention") && err.contains("herald dlq migrate"),
        "{err}"
    );

    let (ok, out, err) = herald_dlq(&config, &["migrate"]);
    assert!(ok && out.contains("5 dead job(s) moved out"), "{out}{err}");
    assert_eq!(
        dlq_ids(&app).await,
        ["old-2", "old-3", "old-4"],
        "the newest three, in order"
    );
    dead(&app, "new", 1).await;
    assert_eq!(dlq_ids(&app).await, ["old-3", "old-4", "new-0"]);
    let (ok, out, err) = herald_dlq(&config, &["stats"]);
    assert!(
        ok && out.contains("3 dead job(s)") && !err.contains("warning"),
        "{out}{err}"
    );

    // max_age: a dead job goes once it is older, reads or not.
    std::fs::write(
        config.path(),
        format!("{}\n[dlq]\nmax_age = \"2s\"\n", app.config_text),
    )
    .unwrap();
    let (ok, out, err) = herald_dlq(&config, &["migrate"]);
    assert!(ok, "{out}{err}");
    dead(&app, "aged", 1).await;
    let (ok, out, _) = herald_dlq(&config, &["list"]);
    assert!(ok && out.contains("aged-0"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.dlq_depth().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the TTL drops every dead job"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes one dead job with `body`, as herald writes a dead copy.
async fn dead_with_body(app: &TestApp, id: &str, body: &[u8]) {
    let mut headers = FieldTable::default();
    herald::envelope::set_str(&mut headers, herald::envelope::REASON, "permanent");
    herald::envelope::set_str(&mut headers, herald::envelope::VENDOR_CODE, "414");
    herald::envelope::set_str(
        &mut headers,
        herald::envelope::ROUTING_KEY,
        "netease.default",
    );
    let props = lapin::BasicProperties::default()
        .with_message_id(id.into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    app.publisher
        .publish(&app.names.dead(), "netease.default", body, props)
        .await
        .unwrap();
}

/// `(id, fingerprint)` of every dead job, in queue order, as `dlq list --json` prints them.
fn listed(config: &tempfile::NamedTempFile) -> Vec<(String, String)> {
    let (ok, out, err) = herald_dlq(config, &["list", "--json"]);
    assert!(ok, "{out}{err}");
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    jobs.iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap_or("-").to_string(),
                j["fingerprint"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_job_is_checked_linked_to_its_original_and_replaces_it_once_confirmed() {
    let app = spawn_app(
        "dlq-edit",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead_with_body(
        &app,
        "ed-1",
        app.job("ed-1", "u-bad").to_string().as_bytes(),
    )
    .await;
    let config = app.config_file();
    let original = listed(&config)[0].1.clone();
    let edit = tempfile::NamedTempFile::new().unwrap();

    std::fs::write(edit.path(), r#"{"id":"ed-1","vendor":"netease"}"#).unwrap();
    let path = edit.path().to_str().unwrap();
    let (ok, out, err) = herald_dlq(&config, &["edit", "ed-1", "--file", path]);
    assert!(
        !ok && err.contains("not valid") && err.contains("nothing was changed"),
        "{out}{err}"
    );
    let mut wrong_account = app.job("ed-1", "u-good");
    wrong_account["account"] = "nope".into();
    std::fs::write(edit.path(), wrong_account.to_string()).unwrap();
    let (ok, _, err) = herald_dlq(&config, &["edit", "ed-1", "--file", path]);
    assert!(!ok && err.contains("no account `nope`"), "{err}");
    assert_eq!(app.dlq_depth().await, 1);

    std::fs::write(edit.path(), app.job("ed-1", "u-good").to_string()).unwrap();
    let (ok, out, err) = herald_dlq(&config, &["edit", "ed-1", "--file", path]);
    assert!(
        ok && out.contains("edited job `ed-1` sent to lane netease.default"),
        "{out}{err}"
    );
    assert_eq!(app.dlq_depth().await, 0, "the original is gone");
    let channel = app.conn.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut lane = channel
        .basic_consume(
            app.names.lane("netease", "default").as_str().into(),
            "look".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let copy = tokio::time::timeout(Duration::from_secs(10), lane.next())
        .await
        .expect("the edited copy is in the lane")
        .unwrap()
        .unwrap();
    let p = &copy.properties;
    assert_eq!(
        herald::envelope::header_str(p, herald::envelope::EDITED_FROM),
        Some(original.clone())
    );
    let body: serde_json::Value = serde_json::from_slice(&copy.data).unwrap();
    assert_eq!(body["to"]["user"], "u-good");
    let history = herald::envelope::history(p);
    let last = history.events.last().unwrap();
    assert_eq!(
        (last.kind, last.by.as_deref()),
        (herald::envelope::EventKind::Edit, Some("tester"))
    );
    let records = audit_records(&config);
    assert_eq!(records.len(), 3, "{records:#?}");
    assert!(records.iter().all(|r| r["action"] == "edit"));
    assert_eq!(records[1]["jobs"][0]["fingerprint"], original.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_purge_import_gives_back_the_same_jobs_with_the_same_fingerprints() {
    let app = spawn_app(
        "dlq-export",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    dead(&app, "ex", 3).await;
    dead_with_body(&app, "ex-bin", &[0xc3, 0x28, 0xff, 0x00]).await;
    let config = app.config_file();
    let before = listed(&config);
    assert_eq!(before.len(), 4);

    let (ok, export, err) = herald_dlq(&config, &["export"]);
    assert!(ok && err.contains("exported 4 dead job(s)"), "{err}");
    assert_eq!(export.lines().count(), 4);
    assert!(
        export.contains("body_base64"),
        "a body that is not UTF-8 survives: {export}"
    );
    assert_eq!(app.dlq_depth().await, 4, "an export removes nothing");
    let (_, some, _) = herald_dlq(&config, &["export", "--id", "ex-1"]);
    assert_eq!(some.lines().count(), 1);

    let (ok, out, err) = herald_dlq(&config, &["purge", "--yes"]);
    assert!(ok && out.contains("removed 4"), "{out}{err}");
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    std::fs::write(file.path(), export.replace("ex-2", "ex-X")).unwrap();
    let (ok, _, err) = herald_dlq(&config, &["import", path]);
    assert!(
        !ok && err.contains("line 3") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(app.dlq_depth().await, 0);

    std::fs::write(file.path(), &export).unwrap();
    let (ok, out, err) = herald_dlq(&config, &["import", path]);
    assert!(ok && out.contains("imported 4 dead job(s)"), "{out}{err}");
    assert_eq!(
        listed(&config),
        before,
        "same jobs, same order, same fingerprints"
    );
    let imports: Vec<serde_json::Value> = audit_records(&config)
        .into_iter()
        .filter(|r| r["action"] == "import")
        .collect();
    assert_eq!(imports.len(), 3);
    assert_eq!(imports[1]["jobs"].as_array().unwrap().len(), 4);
    assert_eq!(imports[2]["outcome"]["done"], 4);
}
