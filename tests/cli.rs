//! The `herald` binary as an operator uses it.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Options, spawn_app};

fn herald(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("HERALD_CONFIG");
    cmd
}

fn run(cmd: impl std::borrow::BorrowMut<Command>) -> (bool, String, String) {
    let mut cmd = cmd;
    let cmd: &mut Command = cmd.borrow_mut();
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("herald runs");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

const CONFIG: &str = r#"
[broker]
url = "amqp://guest:broker-pass-123@127.0.0.1:5672/%2f"

[[account]]
vendor = "netease"
name = "default"
base_url = "https://api.netease.im/nimserver"
app_key = "visible-app-key"
rate_limit = 100
"#;

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn config_check_prints_the_resolved_config_with_secrets_redacted() {
    let file = config_file(CONFIG);
    let (ok, stdout, stderr) = run(herald(&["config", "check", "--config"])
        .arg(file.path())
        .env(
            "HERALD_ACCOUNT_NETEASE_DEFAULT_APP_SECRET",
            "env-secret-456",
        ));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("visible-app-key"), "{stdout}");
    assert!(stdout.contains("app_secret = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("tiers = ["), "defaults are shown: {stdout}");
    for secret in ["env-secret-456", "broker-pass-123"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
}

#[test]
fn config_check_fails_with_a_clear_message_on_each_mistake() {
    let with_secret = CONFIG.replace("rate_limit = 100", "app_secret = \"s\"\nrate_limit = 100");
    let account = &with_secret[with_secret.find("[[account]]").unwrap()..];
    let cases = [
        (CONFIG.to_string(), "missing key `app_secret`"),
        (
            with_secret.replace("rate_limit", "rate_limt"),
            "unknown key `rate_limt`",
        ),
        (format!("{with_secret}\n[wrker]\n"), "wrker"),
        (
            with_secret.replace("https://api.netease.im/nimserver", "ftp://x"),
            "base_url must be http",
        ),
        (format!("{with_secret}{account}"), "duplicate account"),
        (with_secret.replace("amqp://", "amqx://"), "amqp://"),
    ];
    for (text, expected) in cases {
        let file = config_file(&text);
        let (ok, _, stderr) = run(herald(&["config", "check", "--config"]).arg(file.path()));
        assert!(!ok, "should fail: {expected}");
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in: {stderr}"
        );
        assert!(
            !stderr.contains("broker-pass-123"),
            "secret in error: {stderr}"
        );
    }
    let (ok, _, stderr) = run(herald(&[
        "config",
        "check",
        "--config",
        "/nonexistent/herald.toml",
    ]));
    assert!(
        !ok && stderr.contains("cannot read config file"),
        "{stderr}"
    );
}

#[test]
fn schema_prints_the_contract_as_json_schema_2020_12() {
    let (ok, stdout, stderr) = run(&mut herald(&["schema"]));
    assert!(ok, "{stderr}");
    let schema: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["title"], "herald job v1");
    assert_eq!(schema["$id"], herald::job::SCHEMA_ID);
    let vendors: Vec<&str> = herald::vendor::VENDORS.iter().map(|v| v.id).collect();
    assert_eq!(
        schema["properties"]["vendor"]["enum"],
        serde_json::json!(vendors)
    );
}

#[test]
fn the_committed_schema_is_what_herald_schema_prints() {
    let (ok, stdout, stderr) = run(&mut herald(&["schema"]));
    assert!(ok, "{stderr}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/job.schema.json");
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == stdout,
        "docs/job.schema.json is stale: run `cargo run -- schema > docs/job.schema.json`"
    );
}

#[test]
fn every_subcommand_explains_itself() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["enqueue", "--help"],
        vec!["schema", "--help"],
        vec!["topology", "apply", "--help"],
        vec!["config", "check", "--help"],
        vec!["sandbox", "--help"],
        vec!["dlq", "stats", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "show", "--help"],
        vec!["dlq", "replay", "--help"],
        vec!["dlq", "purge", "--help"],
        vec!["demo", "--help"],
    ] {
        let (ok, stdout, _) = run(&mut herald(&args));
        assert!(
            ok && stdout.contains("Usage:") && stdout.len() > 60,
            "{args:?}: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_checks_every_job_before_publishing_and_confirms_valid_ones() {
    let app = spawn_app(
        "cli-enqueue",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let config = app.config_file();
    let valid = app.job("e-1", "u1").to_string();
    let mut oversize = app.job("e-2", "u1");
    oversize["data"] = serde_json::json!("x".repeat(5000));
    let mut unknown = app.job("e-3", "u1");
    unknown["account"] = serde_json::json!("nope");

    let batch = format!("{valid}\n{oversize}\n{unknown}\n");
    let mut child = herald(&["enqueue", "--config"])
        .arg(config.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("job #2") && stderr.contains("attach"),
        "{stderr}"
    );
    assert!(
        stderr.contains("job #3") && stderr.contains("no account `nope`"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was published"), "{stderr}");
    assert_eq!(
        app.lane_depth().await,
        0,
        "a batch with a bad job publishes nothing"
    );

    let (ok, _, stderr) = run(herald(&["enqueue", "--config"])
        .arg(config.path())
        .arg(&valid));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("published 1 job(s)"), "{stderr}");
    let pretty = serde_json::to_string_pretty(&app.job("e-4", "u2")).unwrap();
    let file = config_file(&format!("{pretty}\n{}\n", app.job("e-5", "u3")));
    let (ok, _, stderr) = run(herald(&["enqueue", "--config"])
        .arg(config.path())
        .arg("--file")
        .arg(file.path()));
    assert!(ok, "{stderr}");
    assert_eq!(app.lane_depth().await, 3);

    // basic.get is refused on single-active-consumer quorum queues: read with a consumer.
    let channel = app.conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            app.names.lane("netease", "default").as_str().into(),
            "cli-test".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let got = futures_util::StreamExt::next(&mut consumer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("e-1")
    );
    assert_eq!(
        got.properties.content_type().as_ref().map(|m| m.as_str()),
        Some("application/json")
    );
    assert_eq!(got.properties.delivery_mode(), &Some(2), "persistent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_an_id_over_255_bytes_as_invalid_instead_of_panicking() {
    let app = spawn_app(
        "cli-long-id",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let config = app.config_file();
    // 90 CJK characters: within the 128-character limit, but 270 bytes.
    let job = app.job(&"测".repeat(90), "u1").to_string();
    let out = herald(&["enqueue", "--config"])
        .arg(config.path())
        .arg(&job)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("job #1") && stderr.contains("`id`") && stderr.contains("255 bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was published"), "{stderr}");
    assert_eq!(app.lane_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_of_a_forged_routing_key_over_255_bytes_fails_with_an_error_not_a_panic() {
    use lapin::types::{AMQPValue, FieldTable};

    let app = spawn_app(
        "cli-long-key",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let config = app.config_file();
    // Anyone who may publish to the dead exchange can write this header.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-herald-reason".into(),
        AMQPValue::LongString("invalid".into()),
    );
    headers.insert(
        "x-herald-routing-key".into(),
        AMQPValue::LongString(format!("netease.{}", "a".repeat(300)).into()),
    );
    let props = lapin::BasicProperties::default()
        .with_message_id("forged".into())
        .with_headers(headers);
    app.publisher
        .publish(&app.names.dead(), "", b"{}", props)
        .await
        .unwrap();
    app.wait_for_dead(1, Duration::from_secs(15)).await;

    let out = herald(&["dlq", "replay", "--config"])
        .arg(config.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("routing key is 308 bytes"), "{stderr}");
    // The replay's unacked hold on it ends with the process: it is back in the DLQ.
    app.wait_for_dead(1, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_apply_is_idempotent_and_dlq_stats_reports_groups() {
    let app = spawn_app("cli-topo", Options::default()).await;
    let config = app.config_file();
    for _ in 0..2 {
        let (ok, stdout, stderr) =
            run(herald(&["topology", "apply", "--config"]).arg(config.path()));
        assert!(ok, "{stderr}");
        assert!(stdout.contains("1 lane(s), 2 retry tier(s)"), "{stdout}");
    }
    app.publish_raw("netease.default", b"not json", "junk")
        .await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let (ok, stdout, stderr) = run(herald(&["dlq", "stats", "--config"]).arg(config.path()));
    assert!(ok, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("netease") && l.contains("invalid") && l.contains(" 1 ")),
        "{stdout}"
    );
    let (ok, stdout, _) = run(herald(&["dlq", "stats", "--json", "--config"]).arg(config.path()));
    assert!(ok);
    let groups: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(groups[0]["reason"], "invalid");
    assert_eq!(groups[0]["count"], 1);
    assert_eq!(
        app.dlq_depth().await,
        1,
        "stats read the DLQ without removing anything"
    );
}

#[test]
fn the_example_config_documents_a_valid_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/herald.example.toml");
    let (ok, stdout, stderr) = run(herald(&["config", "check", "--config", path]));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("app_secret = \"[redacted]\""), "{stdout}");
    let token = "example-enqueue-token-0123456789";
    let (ok, stdout, stderr) =
        run(herald(&["config", "check", "--config", path]).env("HERALD_HTTP_ENQUEUE_TOKEN", token));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("enqueue_token = \"[redacted]\""),
        "{stdout}"
    );
    assert!(!stdout.contains(token), "{stdout}");
    let console_token = "example-console-token-0123456789";
    let (ok, stdout, stderr) =
        run(herald(&["config", "check", "--config", path])
            .env("HERALD_CONSOLE_TOKEN", console_token));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("[console]") && stdout.contains("token = \"[redacted]\""),
        "{stdout}"
    );
    assert!(!stdout.contains(console_token), "{stdout}");

    // The commented cluster form of `broker.url`, in place of the single URL, is valid too.
    let text = std::fs::read_to_string(path).unwrap();
    let cluster: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("url = "))
        .map(|l| match l.strip_prefix("# ") {
            Some(line)
                if line.starts_with("url = [") || line.starts_with("  \"amqp") || line == "]" =>
            {
                line
            }
            _ => l,
        })
        .collect();
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), cluster.join("\n")).unwrap();
    let (ok, stdout, stderr) = run(herald(&["config", "check", "--config"]).arg(file.path()));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("\"amqp://herald:****@rabbit-3:5672/%2f\",") && !stdout.contains("secret@"),
        "{stdout}"
    );
}

#[test]
fn the_compose_config_is_valid_with_the_environment_compose_gives_it() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/herald.compose.toml");
    let (ok, _, stderr) = run(herald(&["config", "check", "--config", path])
        .env("HERALD_ACCOUNT_NETEASE_DEFAULT_APP_SECRET", "demo-secret"));
    assert!(ok, "{stderr}");
}

#[test]
fn enqueue_check_needs_no_broker_and_no_secret() {
    // No app_secret, and a broker that is not there: --check needs neither.
    let file = config_file(&CONFIG.replace("127.0.0.1:5672", "127.0.0.1:1"));
    let good = r#"{"id":"ci-1","vendor":"netease","account":"default","from":"s","to":{"user":"u"},"key":"k","data":"d"}"#;
    let other = good.replace("ci-1", "ci-2").replace("default", "marketing");
    let mut cmd = herald(&["enqueue", "--check", "--config"]);
    cmd.arg(file.path()).arg(good);
    let (ok, stdout, stderr) = run(cmd);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "ci-1\n");
    assert!(stderr.contains("nothing was published"), "{stderr}");

    let mut cmd = herald(&["enqueue", "--check", "--config"]);
    cmd.arg(file.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let ndjson = format!("{good}\n{other}\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ndjson.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("job #2: no account `marketing` is configured for vendor netease"),
        "{stderr}"
    );

    // Without a config file: the contract and the vendor's limits, not the account names.
    let long_to = good.replace("\"u\"", &format!("\"{}\"", "u".repeat(40)));
    let mut cmd = herald(&["enqueue", "--check", "--config", "/nonexistent/herald.toml"]);
    cmd.arg(&other);
    let (ok, _, stderr) = run(cmd);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("account names are not checked"), "{stderr}");
    let mut cmd = herald(&["enqueue", "--check", "--config", "/nonexistent/herald.toml"]);
    cmd.arg(&long_to);
    let (ok, _, stderr) = run(cmd);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("job #1: to is 40 characters, the vendor allows at most"),
        "{stderr}"
    );
}

async fn health(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(herald(&args))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_for_a_ready_worker_and_1_for_one_that_is_not_or_is_gone() {
    let mut app = spawn_app("health", Options::default()).await;
    let addr = app.http_addr().to_string();
    let (ok, stdout, stderr) = health(vec!["health".into(), "--addr".into(), addr.clone()]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#""ready":true"#), "{stdout}");
    let (ok, stdout, _) = health(vec![
        "health".into(),
        "--live".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(ok);
    assert_eq!(stdout, "ok\n");

    // Listening, but never connected to a broker: /readyz answers 503. Asked
    // through a config file whose http.listen is a wildcard address.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let text = CONFIG.replace("127.0.0.1:5672", "127.0.0.1:1")
        + "app_secret = \"s\"\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let config = herald::config::Config::parse(&text, Vec::new()).unwrap();
    let worker = herald::worker::Worker::new(config).unwrap();
    let unready = worker.serve_http(shutdown.clone()).await.unwrap().http;
    let file = config_file(&text.replace("127.0.0.1:0", &format!("0.0.0.0:{}", unready.port())));
    let path = file.path().to_str().unwrap().to_string();
    let (ok, _, stderr) = health(vec!["health".into(), "--config".into(), path.clone()]).await;
    assert!(!ok);
    assert!(
        stderr.contains("not ready") && stderr.contains("503"),
        "{stderr}"
    );
    let (ok, _, stderr) = health(vec![
        "health".into(),
        "--live".into(),
        "--config".into(),
        path,
    ])
    .await;
    assert!(ok, "alive though not ready: {stderr}");
    shutdown.cancel();

    app.stop_worker().await;
    let (ok, _, stderr) = health(vec!["health".into(), "--addr".into(), addr]).await;
    assert!(!ok);
    assert!(stderr.contains("not ready"), "{stderr}");
}

#[test]
fn the_demo_reports_the_whole_path_and_keeps_the_workers_log_in_the_file_it_names() {
    let broker = common::broker_url();
    let (ok, stdout, stderr) = run(herald(&["demo", "--broker", &broker]).env("RUST_LOG", "info"));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("INFO") && !stderr.contains("WARN"),
        "the report reads alone: {stderr}"
    );
    for line in [
        "enqueued 7 valid jobs:",
        "delivered (as the sandbox received them):",
        "retried: 1 job(s) through a retry tier after a vendor error, 1 after a vendor's failure callback",
        "dead-lettered:",
        "demo-oversize-1  reason=invalid",
        "`herald dlq stats`:",
        "2 dead job(s)",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    let log = stdout
        .lines()
        .find_map(|l| l.strip_prefix("the worker's log: "))
        .expect("the report names the worker's log");
    let text = std::fs::read_to_string(log).unwrap();
    let _ = std::fs::remove_file(log);
    assert!(
        text.contains("lane consuming") && text.contains("delivered"),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "no terminal colours in a file: {text}"
    );
}

/// A log pipe nobody reads (a stuck log shipper, a paused container runtime)
/// fills in ~250 lines; a worker that wrote its lines inline would stop
/// delivering there. herald writes them from a thread of its own, so
/// deliveries go on, and every line still comes out once the pipe is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_holds_no_delivery_and_loses_no_line() {
    let app = spawn_app(
        "logpipe",
        Options {
            start_worker: false,
            accounts: vec![common::netease_account("default", 0).rate_limit(None)],
            ..Options::default()
        },
    )
    .await;
    let jobs = 1_500; // ~380 KB of `delivered` lines: six times a pipe's 64 KiB
    app.publish_jobs("log", jobs).await;
    let config = app.config_file();
    let mut worker = common::Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--config"])
            .arg(config.path())
            .env(
                "HERALD_HTTP_LISTEN",
                format!("127.0.0.1:{}", common::free_port()),
            )
            .env("RUST_LOG", "info,lapin=warn")
            .stderr(Stdio::piped()),
    );
    // Held open and unread until every job has arrived.
    let stderr = worker.stderr.take().expect("piped stderr");
    app.wait_for_delivered(jobs, Duration::from_secs(60)).await;
    common::signal(&worker, "-TERM");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut text).map(|_| text)
    });
    let status = worker.wait().expect("herald exits");
    let text = reader.join().unwrap().expect("stderr reads");
    assert!(
        status.success(),
        "{status}\n{}",
        &text[text.len().saturating_sub(2000)..]
    );
    let delivered = text.lines().filter(|l| l.contains(": delivered")).count();
    assert_eq!(
        delivered, jobs,
        "every job's line, written after the pipe was read"
    );
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.contains("worker stopped"),
        "the last line written at exit: {last}"
    );
}
