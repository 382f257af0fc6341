//! No secret anywhere it should not be (issue 9).
//!
//! Each vendor test forces every failure herald can meet (connection refused,
//! TLS error, timeout, HTTP 5xx, garbage body, and a vendor that quotes the
//! request back), lets the jobs go through a retry tier into the DLQ, then
//! searches everything a user sees for every secret: the worker's logs (every
//! crate at debug; text format for two vendors, JSON for the third), the
//! headers of retry and dead copies, `herald config check` and `dlq list /
//! show / stats`, `/metrics` and the callback's answers. The broker test does
//! the same for the broker password in every URL form, through `config
//! check`, `run`, `dlq stats` and `topology apply`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use common::{
    Account, Options, SANDBOX_HOST, TestApp, fault, free_port, scrape, signal, spawn_app,
};
use herald::sandbox::{Caller, FaultAnswer, Settings, netease, openim, tencent};
use herald::topology::tier_name;
use herald::vendor::tencent::{CALLBACK_COMMAND, callback_sign};
use herald::vendor::usersig;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

const NETEASE_KEY: &str = "secrets-app";
const NETEASE_SECRET: &str = "S3CRET-netease-appsecret-7f3a9e";
const OPENIM_SECRET: &str = "S3CRET-openim-secret-91c2d4";
const ECHO_TOKEN: &str = "S3CRET-openim-token-from-echo-0b6f";
const TENCENT_APP: u64 = 1_400_000_000;
const TENCENT_KEY: &str = "S3CRET-tencent-secretkey-5d8e21";
const CALLBACK_TOKEN: &str = "S3CRET-tencent-callback-token-c41b";
const CALLBACK_KEY: &str = "S3CRET-tencent-callback-key-herald-only-77a0e9";
const TIER: Duration = Duration::from_millis(100);

fn settings() -> Settings {
    Settings::default()
        .with(netease::Settings {
            apps: vec![Caller::new(NETEASE_KEY, NETEASE_SECRET)],
            ..netease::Settings::default()
        })
        .with(openim::Settings {
            admin: Caller::new("imAdmin", OPENIM_SECRET),
            ..openim::Settings::default()
        })
        .with(tencent::Settings {
            apps: vec![tencent::App {
                sdk_app_id: TENCENT_APP,
                key: TENCENT_KEY.into(),
                admin: "administrator".into(),
            }],
            ..tencent::Settings::default()
        })
}

/// One vendor's failure scenario: how its accounts reach it and what it may leak.
struct Scenario {
    vendor: &'static str,
    /// Path below the sandbox where the fake serves.
    mount: &'static str,
    /// The vendor's account keys, for its sandbox app.
    keys: Vec<(&'static str, String)>,
    log_format: &'static str,
}

/// Accounts of one vendor, one per way of failing; `sandbox` gets the faults.
const ACCOUNTS: [&str; 4] = ["refused", "tls", "sandbox", "echo"];
/// Jobs to the `sandbox` account: each recipient meets one fault, every attempt.
fn faulted() -> [(&'static str, FaultAnswer); 3] {
    [
        // Never answers: the account's 300 ms timeout fires.
        ("hang-user", FaultAnswer::Hang),
        ("bad-gateway-user", FaultAnswer::HttpStatus(502)),
        ("garbage-user", FaultAnswer::Garbage),
    ]
}

fn accounts(s: &Scenario, echo: SocketAddr) -> Vec<Account> {
    let refused = free_port();
    ACCOUNTS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut account =
                Account::new(s.vendor, name, s.mount).timeout(Duration::from_millis(300));
            account.config.breaker_threshold = 0;
            account = match *name {
                "refused" => account.base_url(&format!("http://127.0.0.1:{refused}{}", s.mount)),
                // The sandbox speaks plain HTTP: a TLS handshake with it fails.
                "tls" => account.base_url(&format!("https://{SANDBOX_HOST}{}", s.mount)),
                "sandbox" => account,
                _ => account.base_url(&format!("http://{echo}{}", s.mount)),
            };
            for (key, value) in &s.keys {
                account = match (*name, *key) {
                    ("sandbox", _) => account.key(key, value),
                    // One vendor app is one account (its rate limit is the
                    // app's), so only `sandbox` uses the sandbox's app.
                    (_, "app_key") => account.key(key, format!("{i}-{value}")),
                    (_, "sdk_app_id") => {
                        account.key(key, value.parse::<u64>().unwrap() + 1 + i as u64)
                    }
                    _ => account.key(key, value),
                };
            }
            account
        })
        .collect()
}

/// One request the echo vendor received.
struct Call {
    /// Path and query.
    target: String,
    headers: BTreeMap<String, String>,
}

/// Every request the echo vendor received.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Call>>>);

impl Seen {
    /// Every value of a header or query parameter named `name`.
    fn values(&self, name: &str) -> Vec<String> {
        let seen = self.0.lock().unwrap();
        let mut out = Vec::new();
        for call in seen.iter() {
            out.extend(call.headers.get(name).cloned());
            if let Some((_, query)) = call.target.split_once('?') {
                out.extend(
                    url::form_urlencoded::parse(query.as_bytes())
                        .filter(|(k, _)| k == name)
                        .map(|(_, v)| v.into_owned()),
                );
            }
        }
        out
    }
}

/// A vendor that fails every call quoting the whole request back, as vendor
/// messages and proxy error pages sometimes do: sends alternate between a proxy's
/// HTTP 502 page (which herald cuts to a snippet) and the vendor's own retryable
/// error. The first OpenIM token request fails the same way, quoting the secret;
/// later ones get [`ECHO_TOKEN`], which the next sends carry and get quoted.
async fn spawn_echo() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    let handler = move |request: Request| {
        let record = record.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&body).into_owned();
            let target = parts.uri.to_string();
            let headers: BTreeMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let quoted = format!("{} {target} {headers:?} {body}", parts.method);
            let is_token = target.contains("get_admin_token");
            let earlier = {
                let mut seen = record.0.lock().unwrap();
                let earlier = seen
                    .iter()
                    .filter(|c| c.target.contains("get_admin_token") == is_token)
                    .count();
                seen.push(Call {
                    target: target.clone(),
                    headers,
                });
                earlier
            };
            if is_token && earlier > 0 {
                let token = json!({"token": ECHO_TOKEN, "expireTimeSeconds": 3600});
                return axum::Json(json!({"errCode": 0, "errMsg": "", "data": token}))
                    .into_response();
            }
            if !is_token && earlier % 2 == 0 {
                let page =
                    format!("<html><body>The proxy could not retrieve {quoted}</body></html>");
                return (StatusCode::BAD_GATEWAY, page).into_response();
            }
            let answer = if target.starts_with("/tencent/") {
                json!({"ActionStatus": "FAIL", "ErrorCode": 91000, "ErrorInfo": quoted})
            } else if target.starts_with("/openim/") {
                json!({"errCode": 500, "errMsg": format!("ServerInternalError: {quoted}")})
            } else {
                json!({"code": 500, "desc": quoted})
            };
            axum::Json(answer).into_response()
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().fallback(handler);
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, seen)
}

/// `herald run` on the app's config, its stderr (the logs) going to a file.
fn start_worker(
    config: &Path,
    port: u16,
    log_format: &str,
) -> (common::Process, tempfile::NamedTempFile) {
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("HERALD_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        // Every crate at debug, as an operator chasing a failure would run it.
        .env("RUST_LOG", "debug")
        .env("HERALD_LOG_FORMAT", log_format)
        .stdout(logs.reopen().unwrap())
        .stderr(logs.reopen().unwrap());
    (common::Process::spawn(&mut command), logs)
}

/// Everything a `herald` command printed, stdout and stderr.
fn herald(args: &[&str], config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("herald runs");
    format!(
        "$ herald {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// AMQP headers as text, nested tables and arrays included.
fn headers_text(headers: &FieldTable) -> String {
    fn value(v: &AMQPValue) -> String {
        match v {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            AMQPValue::ShortString(s) => s.as_str().to_string(),
            AMQPValue::FieldTable(t) => headers_text(t),
            AMQPValue::FieldArray(a) => a
                .as_slice()
                .iter()
                .map(value)
                .collect::<Vec<_>>()
                .join(", "),
            AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
            other => format!("{other:?}"),
        }
    }
    headers
        .inner()
        .iter()
        .map(|(k, v)| format!("{k}={}\n", value(v)))
        .collect()
}

/// The runs of a secret searched for: the whole of a short one, every
/// 24-character run of a long one (a snippet may cut it anywhere).
fn runs(secret: &str) -> Vec<String> {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 24 {
        return vec![secret.to_string()];
    }
    (0..=chars.len() - 24)
        .step_by(4)
        .chain([chars.len() - 24])
        .map(|i| chars[i..i + 24].iter().collect())
        .collect()
}

/// Every place that showed a secret, by the secret's name, with the lines that show it.
#[derive(Default)]
struct Leaks(Vec<String>);

impl Leaks {
    fn search(&mut self, place: &str, text: &str, secrets: &[(&'static str, String)]) {
        for (name, secret) in secrets {
            let runs = runs(secret);
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| runs.iter().any(|r| line.contains(r.as_str())))
                .take(3)
                .collect();
            if !lines.is_empty() {
                self.0.push(format!(
                    "{place} shows the {name}:\n  {}",
                    lines.join("\n  ")
                ));
            }
        }
    }

    fn assert_none(mut self) {
        self.0.dedup();
        assert!(self.0.is_empty(), "secrets leaked:\n{}", self.0.join("\n"));
    }
}

async fn retry_tap(app: &TestApp) -> (lapin::Channel, String) {
    let channel = app.conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-match".into(),
        AMQPValue::LongString(LongString::from("all")),
    );
    args.insert(
        herald::topology::TIER_HEADER.into(),
        AMQPValue::LongString(LongString::from(tier_name(TIER).as_str())),
    );
    channel
        .queue_bind(
            queue.name().clone(),
            app.names.retry_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .unwrap();
    (channel, queue.name().as_str().to_string())
}

/// The headers of every retry copy the tap queue caught.
async fn drain_tap(channel: &lapin::Channel, queue: &str) -> (usize, String) {
    let mut copies = 0;
    let mut text = String::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        copies += 1;
        if let Some(h) = message.delivery.properties.headers() {
            text.push_str(&headers_text(h));
        }
    }
    (copies, text)
}

/// Runs one vendor's scenario and searches what a user sees for every secret.
async fn run_scenario(test: &str, s: Scenario) {
    let (echo, seen) = spawn_echo().await;
    let started = unix_now();
    let app = spawn_app(
        test,
        Options {
            accounts: accounts(&s, echo),
            tiers: vec!["100ms"],
            max_attempts: 2,
            start_worker: false,
            sandbox: settings(),
            ..Options::default()
        },
    )
    .await;
    for (to, answer) in faulted() {
        app.sandbox.add_fault(fault(s.vendor, to, 10, answer));
    }
    let config = app.config_file();
    let (tap, tap_queue) = retry_tap(&app).await;
    let port = free_port();
    let (mut worker, logs) = start_worker(config.path(), port, s.log_format);
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reqwest::get(&ready)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "worker not ready:\n{}",
            std::fs::read_to_string(logs.path()).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut jobs = Vec::new();
    for account in ["refused", "tls", "echo", "echo"] {
        let id = format!("{}-{account}-{}", s.vendor, jobs.len());
        jobs.push((account, id, "u1".to_string()));
    }
    for (to, _) in faulted() {
        jobs.push(("sandbox", format!("{}-{to}", s.vendor), to.to_string()));
    }
    for (account, id, to) in &jobs {
        app.publish(&app.vendor_job(s.vendor, account, id, to))
            .await;
    }
    app.wait_for_dead(jobs.len(), Duration::from_secs(30)).await;

    let mut seen_by_user = Vec::new();
    if s.vendor == "tencent" {
        // Forged, stale, badly sealed and malformed callbacks: refused, and the
        // refusals give nothing away either.
        let url = format!(
            "http://127.0.0.1:{port}{}",
            herald::vendor::tencent::callback::PATH
        );
        let now = chrono::Utc::now().timestamp().to_string();
        let sealed_badly = json!({
            "CallbackCommand": CALLBACK_COMMAND, "GroupId": "@TGS#evil", "From_Account": "a",
            "MsgBody": [{"MsgType": "TIMCustomElem", "MsgContent": {"Data": "phish", "Desc": "k"}}],
            "CloudCustomData": json!({"herald": {"id": "x", "account": "sandbox", "attempt": 1,
                                                 "sent_at": 1, "mac": "00"}}).to_string(),
            "ErrorCode": 10023
        })
        .to_string();
        let attempts = [
            (
                callback_sign("guess", "1"),
                "1".to_string(),
                "{}".to_string(),
            ),
            (
                callback_sign(CALLBACK_TOKEN, "1"),
                "1".to_string(),
                "{}".to_string(),
            ),
            (
                callback_sign(CALLBACK_TOKEN, &now),
                now.clone(),
                sealed_badly,
            ),
            (
                callback_sign(CALLBACK_TOKEN, &now),
                now.clone(),
                "{not json".to_string(),
            ),
        ];
        for (sign, time, body) in attempts {
            let answer = reqwest::Client::new()
                .post(&url)
                .query(&[
                    ("SdkAppid", TENCENT_APP.to_string()),
                    ("CallbackCommand", CALLBACK_COMMAND.to_string()),
                    ("Sign", sign),
                    ("RequestTime", time),
                ])
                .body(body)
                .send()
                .await
                .unwrap();
            seen_by_user.push(("callback answer", answer.text().await.unwrap()));
        }
    }
    seen_by_user.push(("/metrics", scrape(port).await));
    signal(&worker, "-TERM");
    let _ = worker.wait();

    let (copies, retry_headers) = drain_tap(&tap, &tap_queue).await;
    assert!(
        copies >= jobs.len(),
        "every job went through a retry tier: {copies} copies"
    );
    seen_by_user.push(("retry copy headers", retry_headers.clone()));
    let mut dead_headers = String::new();
    herald::dlq::scan(&app.conn, &app.names, |d| {
        if let Some(h) = d.properties.headers() {
            dead_headers.push_str(&headers_text(h));
        }
    })
    .await
    .unwrap();
    let copy_headers = format!("{retry_headers}{dead_headers}");
    seen_by_user.push(("DLQ headers", dead_headers));
    let mut cli = herald(&["config", "check"], config.path());
    cli.push_str(&herald(&["dlq", "list"], config.path()));
    cli.push_str(&herald(&["dlq", "list", "--json"], config.path()));
    cli.push_str(&herald(&["dlq", "stats"], config.path()));
    for (_, id, _) in &jobs {
        cli.push_str(&herald(&["dlq", "show", id], config.path()));
    }
    for (_, id, _) in &jobs {
        assert!(cli.contains(id.as_str()), "dlq show finds {id}:\n{cli}");
    }
    seen_by_user.push(("herald config check / dlq list / show / stats", cli));
    let logs = std::fs::read_to_string(logs.path()).unwrap();
    for what in ["retrying later", "dead-lettered"] {
        assert!(logs.contains(what), "the worker logged `{what}`:\n{logs}");
    }
    seen_by_user.push(("worker logs", logs));

    let mut secrets: Vec<(&str, String)> = vec![
        ("NetEase AppSecret", NETEASE_SECRET.into()),
        ("OpenIM secret", OPENIM_SECRET.into()),
        ("Tencent secret key", TENCENT_KEY.into()),
        ("Tencent callback token", CALLBACK_TOKEN.into()),
        ("Tencent callback key", CALLBACK_KEY.into()),
    ];
    let sent = [
        ("checksum", "NetEase CheckSum"),
        ("token", "OpenIM admin token"),
        ("usersig", "Tencent UserSig"),
    ];
    for (field, name) in sent {
        secrets.extend(seen.values(field).into_iter().map(|v| (name, v)));
    }
    let issued = app.sandbox.fake::<openim::Fake>().tokens().into_iter();
    secrets.extend(issued.map(|t| ("OpenIM admin token", t)));
    // The UserSigs herald generated: one per second it may have started an account's client in.
    for time in started - 1..=unix_now() + 1 {
        let sig = usersig::generate(TENCENT_APP, TENCENT_KEY, "administrator", time, 86_400);
        secrets.push(("Tencent UserSig", sig));
    }
    match s.vendor {
        "netease" => assert!(
            !seen.values("checksum").is_empty(),
            "the echo vendor saw CheckSums"
        ),
        "openim" => assert!(seen.values("token").iter().any(|t| t == ECHO_TOKEN)),
        _ => assert!(
            !seen.values("usersig").is_empty(),
            "the echo vendor saw UserSigs"
        ),
    }
    let mut leaks = Leaks::default();
    for (place, text) in &seen_by_user {
        leaks.search(place, text, &secrets);
    }
    leaks.assert_none();
    // Every failure happened, and the quoted credentials were masked, not dropped.
    for expected in [
        "exhausted",
        "connect",
        "timeout",
        "http-502",
        "garbage",
        "****",
    ] {
        assert!(
            copy_headers.contains(expected),
            "no `{expected}` in:\n{copy_headers}"
        );
    }
}

fn unix_now() -> u64 {
    herald::sandbox::unix_now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netease_failures_show_no_appsecret_or_checksum() {
    let scenario = Scenario {
        vendor: "netease",
        mount: "/netease/nimserver",
        keys: vec![
            ("app_key", NETEASE_KEY.into()),
            ("app_secret", NETEASE_SECRET.into()),
        ],
        log_format: "text",
    };
    run_scenario("secrets-netease", scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_failures_show_no_secret_or_admin_token() {
    let scenario = Scenario {
        vendor: "openim",
        mount: "/openim",
        keys: vec![
            ("admin_user_id", "imAdmin".into()),
            ("secret", OPENIM_SECRET.into()),
        ],
        log_format: "text",
    };
    run_scenario("secrets-openim", scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_failures_show_no_usersig_secret_key_or_callback_token() {
    let scenario = Scenario {
        vendor: "tencent",
        mount: "/tencent",
        keys: vec![
            ("sdk_app_id", TENCENT_APP.to_string()),
            ("secret_key", TENCENT_KEY.into()),
            ("admin_identifier", "administrator".into()),
            ("callback_token", CALLBACK_TOKEN.into()),
            ("callback_key", CALLBACK_KEY.into()),
        ],
        // The JSON log format here, the human one for the other vendors.
        log_format: "json",
    };
    run_scenario("secrets-tencent", scenario).await;
}

/// A broker URL as a user may write it, with its own password and the forms
/// that password may be printed in.
struct BrokerCase {
    url: String,
    passwords: Vec<&'static str>,
    /// Given in `HERALD_BROKER_URL` rather than the file.
    from_env: bool,
}

fn case(url: impl Into<String>, passwords: &[&'static str]) -> BrokerCase {
    BrokerCase {
        url: url.into(),
        passwords: passwords.to_vec(),
        from_env: false,
    }
}

fn broker_cases() -> Vec<BrokerCase> {
    let closed = free_port();
    vec![
        // Well-formed, wrong password: the broker refuses the login.
        case(
            "amqp://herald:S3CRET-broker-wrong@127.0.0.1:5672/%2f",
            &["S3CRET-broker-wrong"],
        ),
        // Well-formed, nothing listening.
        case(
            format!("amqp://herald:S3CRET-broker-closed@127.0.0.1:{closed}/%2f"),
            &["S3CRET-broker-closed"],
        ),
        // No `//`: parses, but as a path with no host.
        case(
            "amqp:herald:S3CRET-broker-noslash@127.0.0.1:5672",
            &["S3CRET-broker-noslash"],
        ),
        // Percent-encoded `@`, `/` and `:` in the password.
        case(
            "amqp://herald:S3CRET%40broker%2Fpct%3Aenc@127.0.0.1:5672/%2f",
            &["S3CRET%40broker%2Fpct%3Aenc", "S3CRET@broker/pct:enc"],
        ),
        // A raw `/` ends the authority early: `herald:5672` becomes host and port.
        case(
            "amqp://herald:5672/S3CRET-broker-slash@127.0.0.1:5672/%2f",
            &["S3CRET-broker-slash"],
        ),
        // `@` in the user name, `:` in the password.
        case(
            "amqp://her@ld:S3CRET-broker:colon@127.0.0.1:5672/%2f",
            &["S3CRET-broker:colon"],
        ),
        // A `"` in the password, unescaped: the TOML line itself does not parse.
        case(
            "amqp://herald:S3CRET-broker\"quote@127.0.0.1:5672/%2f",
            &["S3CRET-broker"],
        ),
        // Unparseable: a port out of range, no host at all, a space and a `#`.
        case(
            "amqp://herald:S3CRET-broker-port@127.0.0.1:99999/%2f",
            &["S3CRET-broker-port"],
        ),
        case(
            "amqp://herald:S3CRET-broker-nohost@",
            &["S3CRET-broker-nohost"],
        ),
        case(
            "amqp://herald:S3CRET broker#hash@127.0.0.1:5672/%2f",
            &["S3CRET broker#hash"],
        ),
        // The environment's URL goes the same way as the file's.
        BrokerCase {
            from_env: true,
            ..case(
                "amqp:herald:S3CRET-broker-env@127.0.0.1:5672",
                &["S3CRET-broker-env"],
            )
        },
        // A cluster's nodes, each with its own password: one refuses the login,
        // one does not answer. In the file (an array) and in the environment.
        case(
            format!(
                "amqp://herald:S3CRET-node-wrong@127.0.0.1:5672/%2f,amqp://herald:S3CRET-node-closed@127.0.0.1:{closed}/%2f"
            ),
            &["S3CRET-node-wrong", "S3CRET-node-closed"],
        ),
        BrokerCase {
            from_env: true,
            ..case(
                format!(
                    "amqp://herald:S3CRET-env-wrong@127.0.0.1:5672/%2f, amqp://herald:S3CRET-env-closed@127.0.0.1:{closed}/%2f"
                ),
                &["S3CRET-env-wrong", "S3CRET-env-closed"],
            )
        },
        // A raw comma in a password splits the environment's list mid-password.
        BrokerCase {
            from_env: true,
            ..case(
                "amqp://herald:S3CRET-broker,cut-here@127.0.0.1:5672/%2f",
                &["S3CRET-broker,cut-here", "S3CRET-broker", "cut-here"],
            )
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_password_is_never_printed_in_any_url_form() {
    let mut children = Vec::new();
    let mut files = Vec::new();
    for BrokerCase {
        url,
        passwords,
        from_env,
    } in broker_cases()
    {
        // A list in the file is an array of strings; anything else is written as given.
        let in_file = if from_env {
            "\"amqp://herald@127.0.0.1:9/%2f\"".to_string()
        } else if url.contains(',') {
            let nodes: Vec<String> = url.split(',').map(|n| format!("\"{n}\"")).collect();
            format!("[{}]", nodes.join(", "))
        } else {
            format!("\"{url}\"")
        };
        let text = format!(
            r#"
[broker]
url = {in_file}
prefix = "t-secrets-broker"
[http]
listen = "127.0.0.1:0"
[[account]]
vendor = "netease"
name = "default"
base_url = "http://127.0.0.1:9/netease/nimserver"
app_key = "{NETEASE_KEY}"
app_secret = "{NETEASE_SECRET}"
"#
        );
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), text).unwrap();
        for args in [
            vec!["config", "check"],
            vec!["dlq", "stats"],
            vec!["run"],
            vec!["topology", "apply"],
        ] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
            if from_env {
                command.env("HERALD_BROKER_URL", &url);
            }
            command
                .args(&args)
                .arg("--config")
                .arg(file.path())
                .env("RUST_LOG", "debug")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            children.push((
                url.clone(),
                passwords.clone(),
                args,
                command.spawn().unwrap(),
            ));
        }
        files.push(file);
    }
    // `run` retries for ever; the others end at once. Two seconds see the first failures.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut leaks = Leaks::default();
    for (url, passwords, args, mut child) in children {
        if child.try_wait().unwrap().is_none() {
            signal(&child, "-TERM");
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.is_empty(), "herald {args:?} with {url} said nothing");
        let secrets: Vec<_> = passwords
            .iter()
            .map(|p| ("broker password", p.to_string()))
            .collect();
        let place = format!("herald {} with {url}", args.join(" "));
        leaks.search(&place, &text, &secrets);
    }
    drop(files);
    leaks.assert_none();
}
