//! OpenIM end to end: RabbitMQ → herald → the OpenIM sandbox.

mod common;

use std::time::{Duration, Instant};

use common::{Account, Options, openim_account, spawn_app};
use herald::enqueue;
use herald::outcome::Reason;
use herald::sandbox::{FaultAnswer, Settings, openim};
use serde_json::json;

/// An app with one lane: OpenIM account `main`, as `tweak` makes it.
fn options(tweak: impl FnOnce(Account) -> Account, sandbox: Settings) -> Options {
    Options {
        accounts: vec![tweak(openim_account("main"))],
        sandbox,
        ..Options::default()
    }
}

fn openim_messages(app: &common::TestApp) -> Vec<herald::sandbox::Delivered> {
    app.delivered()
        .into_iter()
        .filter(|m| m.vendor == "openim")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_group_jobs_are_delivered_with_every_field() {
    let app = spawn_app("openim-fields", options(|a| a, Settings::default())).await;
    let mut user = app.vendor_job("openim", "main", "oi-user", "2839678182");
    user["from"] = json!("openIMAdmin");
    user["delivery"] = json!("online");
    user["options"] = json!({"sendMsg": true});
    let mut group = app.vendor_job("openim", "main", "oi-group", "unused");
    group["to"] = json!({"group": "g-42"});
    group["data"] = json!("plain text");
    app.publish(&user).await;
    app.publish(&group).await;
    app.wait_for_delivered(2, Duration::from_secs(15)).await;
    let mut messages = openim_messages(&app);
    messages.sort_by_key(|m| m.fields["recvGroupID"].clone());
    let u = &messages[0].fields;
    assert_eq!(u["sendUserID"], "openIMAdmin");
    assert_eq!(
        (u["recvUserID"].as_str(), u["recvGroupID"].as_str()),
        ("2839678182", "")
    );
    assert_eq!(u["key"], "test.key");
    assert_eq!(u["data"], r#"{"id":"oi-user"}"#);
    assert_eq!(
        (u["sendMsg"].as_str(), u["reliabilityLevel"].as_str()),
        ("true", "1")
    );
    assert_eq!(u["header.operationID"], "oi-user-1");
    let g = &messages[1].fields;
    assert_eq!(
        (g["recvUserID"].as_str(), g["recvGroupID"].as_str()),
        ("", "g-42")
    );
    assert_eq!(
        (
            g["data"].as_str(),
            g["sendMsg"].as_str(),
            g["reliabilityLevel"].as_str()
        ),
        ("plain text", "false", "2")
    );
    assert_eq!(
        app.sandbox.fake::<openim::Fake>().issued(),
        1,
        "one admin token for both jobs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_mid_stream_fails_no_job_and_refreshes_once_per_expiry() {
    let sandbox = Settings::default().with(openim::Settings {
        token_ttl: Duration::from_secs(1),
        ..openim::Settings::default()
    });
    let app = spawn_app(
        "openim-expiry",
        options(|a| a.rate_limit(Some(400)).concurrency(16), sandbox),
    )
    .await;
    let ndjson: String = (0..1000)
        .map(|i| {
            format!(
                "{}\n",
                app.vendor_job("openim", "main", &format!("t-{i}"), &format!("u{i}"))
            )
        })
        .collect();
    let jobs = enqueue::check_all(ndjson.as_bytes(), &app.config).unwrap();
    let started = Instant::now();
    enqueue::publish(&app.publisher, &app.names, &jobs)
        .await
        .unwrap();
    app.wait_for_delivered(1000, Duration::from_secs(60)).await;
    let took = started.elapsed().as_secs_f64();
    let stats = app.app_stats_of("openim", "imAdmin");
    let sending = (stats.last_ms.unwrap() - stats.first_ms.unwrap()) as f64 / 1000.0;
    let tokens = app.sandbox.fake::<openim::Fake>().issued();
    // A 1 s token is renewed at 0.9 s: one renewal per 0.9 s of sending, plus the first.
    let expected = (sending / 0.9).floor() as usize + 1;
    eprintln!(
        "openim: 1000 jobs sent over {sending:.2} s ({took:.2} s in all), crossing {} token expiries (ttl 1 s): \
         {tokens} admin-token requests (expected {expected})",
        sending.floor()
    );
    assert!(
        sending >= 2.0,
        "the stream crossed at least two expiries: {sending:.2} s"
    );
    assert!(tokens >= 2, "tokens were refreshed: {tokens}");
    assert!(
        tokens <= expected + 1,
        "one refresh per expiry, not per job: {tokens}"
    );
    assert_eq!(app.dlq_depth().await, 0, "no job failed");
    assert_eq!(app.deliveries_by_openim_id(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refreshed_once_and_the_job_delivered() {
    let app = spawn_app("openim-revoke", options(|a| a, Settings::default())).await;
    app.publish(&app.vendor_job("openim", "main", "first", "u1"))
        .await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    app.sandbox.fake::<openim::Fake>().expire_all();
    app.publish(&app.vendor_job("openim", "main", "second", "u2"))
        .await;
    app.wait_for_delivered(2, Duration::from_secs(15)).await;
    assert_eq!(app.sandbox.fake::<openim::Fake>().issued(), 2);
    let ops: Vec<String> = openim_messages(&app)
        .iter()
        .map(|m| m.fields["header.operationID"].clone())
        .collect();
    assert_eq!(ops, ["first-1", "second-1-retoken"]);
    assert_eq!(app.dlq_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_codes_are_classified_by_the_table() {
    let app = spawn_app("openim-codes", options(|a| a, Settings::default())).await;
    for (to, code) in [("u-missing", 1004), ("u-busy", 90002)] {
        app.sandbox
            .add_fault(common::fault("openim", to, 1, FaultAnswer::Code(code)));
    }
    app.publish(&app.vendor_job("openim", "main", "missing", "u-missing"))
        .await;
    app.publish(&app.vendor_job("openim", "main", "busy", "u-busy"))
        .await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].code.as_deref()),
        (Reason::Permanent, Some("1004"))
    );
    assert_eq!(
        openim_messages(&app)[0].fields["recvUserID"],
        "u-busy",
        "900xx is retried"
    );
}

/// A forward proxy for plain HTTP: records each request's target and relays it to `upstream`.
async fn forward_proxy(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, Uri};
    let targets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = targets.clone();
    let client = reqwest::Client::new();
    let proxy = axum::Router::new().fallback(
        move |method: Method, uri: Uri, mut headers: HeaderMap, body: Bytes| {
            seen.lock().unwrap().push(uri.to_string());
            let client = client.clone();
            async move {
                headers.remove("host");
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                let answer = client
                    .request(method, format!("http://{upstream}{path}"))
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .expect("the sandbox answers");
                (answer.status(), answer.bytes().await.unwrap_or_default())
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, proxy).await });
    (addr, targets)
}

/// Egress through a proxy named in the environment, as ops set `HTTP_PROXY` /
/// `HTTPS_PROXY` for a pod: herald's direct client does not speak to proxies,
/// so an account the environment proxies must go through the one that does.
/// The vendor's host does not resolve: only the proxy can deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_proxy_carries_the_vendor_requests() {
    let app = spawn_app(
        "openim-proxy",
        Options {
            start_worker: false,
            ..options(
                |a| a.base_url("http://openim.invalid/openim"),
                Settings::default(),
            )
        },
    )
    .await;
    let (proxy, targets) = forward_proxy(app.sandbox_addr).await;
    let config = app.config_file();
    let proxy_url = format!("http://{proxy}");
    let _worker = app.spawn_process_with(
        &config,
        common::free_port(),
        &[
            ("HTTP_PROXY", &proxy_url),
            ("http_proxy", &proxy_url),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
        ],
    );
    for i in 0..3 {
        app.publish(&app.vendor_job("openim", "main", &format!("px-{i}"), "u1"))
            .await;
    }
    app.wait_for_delivered(3, Duration::from_secs(30)).await;
    let targets = targets.lock().unwrap().clone();
    assert!(targets.len() >= 4, "a token and three sends: {targets:?}");
    assert!(
        targets
            .iter()
            .all(|t| t.starts_with("http://openim.invalid/openim/")),
        "absolute-form targets naming the vendor: {targets:?}"
    );
}

/// Jobs whose content headers nearly fill the broker's `frame_max` (131,072
/// bytes on RabbitMQ's defaults): the consuming connection reads their header
/// frames, and the publishing one writes them again in the dead-letter copies,
/// many at once through lapin's I/O rings (8 frames since vendor/README.md).
/// What it guards is herald keeping the broker's `frame_max` rather than
/// shrinking it to save memory: a consuming connection with a smaller one is
/// closed by the first of these jobs, on every redelivery (checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_headers_nearly_fill_a_frame_are_delivered_and_dead_lettered_whole() {
    use herald::dlq;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    const NOTE: usize = 120_000;
    let app = spawn_app("openim-big-headers", options(|a| a, Settings::default())).await;
    let props = |id: &str| {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-note".into(),
            AMQPValue::LongString(LongString::from("n".repeat(NOTE))),
        );
        common::job_properties(id).with_headers(headers)
    };
    let (good, bad) = (24, 12);
    for i in 0..good + bad {
        let id = format!("big-{i}");
        let body = if i < good {
            app.vendor_job("openim", "main", &id, "u-1").to_string()
        } else {
            "{not json".to_string()
        };
        app.publish_with("openim.main", body.as_bytes(), props(&id))
            .await;
    }
    app.wait_for_delivered(good, Duration::from_secs(30)).await;
    app.wait_for_dead(bad, Duration::from_secs(30)).await;
    let mut notes = Vec::new();
    dlq::scan(&app.conn, &app.names, |d| {
        let note = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-note").cloned());
        notes.push(match note {
            Some(AMQPValue::LongString(s)) => s.as_bytes().len(),
            _ => 0,
        });
    })
    .await
    .unwrap();
    assert_eq!(
        notes,
        vec![NOTE; bad],
        "each dead copy keeps the header whole"
    );
    let mut delivered: Vec<_> = openim_messages(&app)
        .into_iter()
        .map(|m| m.fields["header.operationID"].clone())
        .collect();
    assert_eq!(delivered.len(), good, "no job sent twice");
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), good, "every job sent");
}

/// A producer's headers can nearly fill the broker's `frame_max`, so that
/// herald's own on a dead copy push it past. Sent, the copy closed the
/// publishing connection: the session ended on every redelivery until the
/// broker's delivery limit dead-lettered the job without herald's reason
/// (18 s here, the jobs behind it waiting); refused before it is sent
/// (`Publisher::publish`), the job is rejected to the same end at once. The
/// copy leaves the producer's biggest header out instead and says so; body,
/// id, reason and the other headers are kept. Both ways fail this test (checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_copy_too_big_for_a_frame_drops_the_producers_biggest_header_and_says_so() {
    use herald::envelope::{DROPPED_HEADERS, header_str};
    use lapin::types::{AMQPValue, FieldTable, LongString};

    // The broker's frame_max is 131,072: this fits as published, not with herald's headers.
    const NOTE: usize = 130_500;
    let app = spawn_app("openim-frame-full", options(|a| a, Settings::default())).await;
    let bad = 3;
    for i in 0..bad {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-note".into(),
            AMQPValue::LongString(LongString::from("n".repeat(NOTE))),
        );
        headers.insert("x-trace".into(), AMQPValue::LongString("t-1".into()));
        let props = common::job_properties(&format!("full-{i}")).with_headers(headers);
        app.publish_with("openim.main", b"{not json", props).await;
    }
    let good = 5;
    for i in 0..good {
        let id = format!("after-{i}");
        app.publish(&app.vendor_job("openim", "main", &id, "u-1"))
            .await;
    }
    app.wait_for_dead(bad, Duration::from_secs(30)).await;
    app.wait_for_delivered(good, Duration::from_secs(30)).await;
    let mut copies = Vec::new();
    herald::dlq::scan(&app.conn, &app.names, |d| {
        copies.push((
            d.properties.message_id().as_ref().map(|m| m.to_string()),
            header_str(&d.properties, DROPPED_HEADERS),
            header_str(&d.properties, "x-herald-reason"),
            header_str(&d.properties, "x-trace"),
            d.data.clone(),
        ));
    })
    .await
    .unwrap();
    copies.sort();
    let dropped = format!("x-note ({} bytes)", NOTE + 7 + 5);
    let expected: Vec<_> = (0..bad)
        .map(|i| {
            (
                Some(format!("full-{i}")),
                Some(dropped.clone()),
                Some("invalid".to_string()),
                Some("t-1".to_string()),
                b"{not json".to_vec(),
            )
        })
        .collect();
    assert_eq!(copies, expected);
    assert_eq!(app.dlq_depth().await, bad, "each dead once");

    // Any publish too big for a frame is refused before it is sent, and the
    // connection it would have closed goes on publishing.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-note".into(),
        AMQPValue::LongString(LongString::from("n".repeat(140_000))),
    );
    let refused = app
        .publisher
        .publish(
            &app.names.jobs(),
            "openim.main",
            b"{}",
            common::job_properties("too-big").with_headers(headers),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(herald::broker::PublishError::HeadersTooLarge {
                frame_max: 131_072,
                ..
            })
        ),
        "{refused:?}"
    );
    app.publish(&app.vendor_job("openim", "main", "after-refusal", "u-1"))
        .await;
    app.wait_for_delivered(good + 1, Duration::from_secs(30))
        .await;
}
