//! The worker's HTTP listeners under slow, idle, oversize and numerous
//! clients: each is cut off within its bound, and delivery goes on meanwhile.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Options, netease_account, openim_account, spawn_app, tencent_account};
use herald::vendor::tencent::{CALLBACK_COMMAND, callback_sign};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn options() -> Options {
    with_http(
        r#"
callback_listen = "127.0.0.1:0"
header_timeout = "1s"
request_timeout = "1s"
max_connections = 32
"#,
    )
}

fn with_http(http_extra: &'static str) -> Options {
    Options {
        http_extra,
        accounts: vec![
            netease_account("default", 0).rate_limit(None),
            tencent_account("main").signed_callbacks(),
        ],
        ..Options::default()
    }
}

/// Reads until the server closes the connection; returns what it sent and
/// how long that took, or `None` if it kept the connection past `limit`.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&seen).into_owned(),
                    started.elapsed(),
                ));
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

async fn connect_and_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_callback_listen_apart() {
    let app = spawn_app("http-apart", options()).await;
    let client = reqwest::Client::new();
    let callbacks = app.callback_addr();
    assert_ne!(callbacks, app.http_addr());
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = client
            .get(format!("http://{callbacks}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path} is not served to the internet");
    }
    let r = client
        .post(format!("http://{}/callbacks/tencent", app.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the callback is only on callback_listen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_oversize_clients_are_cut_off_while_jobs_are_delivered() {
    let app = spawn_app("http-hostile", options()).await;
    let callbacks = app.callback_addr();
    let bound = Duration::from_secs(4);

    // Slowloris: half a request head, then nothing.
    let mut slow_heads = Vec::new();
    for _ in 0..10 {
        slow_heads.push(
            connect_and_send(
                callbacks,
                b"POST /callbacks/tencent HTTP/1.1\r\nHost: x\r\n",
            )
            .await,
        );
    }
    // Connected, never a byte.
    let mut idle = TcpStream::connect(callbacks).await.unwrap();
    // A signed request (the body of an unsigned one is never read) whose body
    // is announced at 64 bytes and sent at 10.
    let time = chrono::Utc::now().timestamp().to_string();
    let head = format!(
        "POST /callbacks/tencent?SdkAppid=1400000000&CallbackCommand={CALLBACK_COMMAND}&Sign={}&RequestTime={time} HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n0123456789",
        callback_sign(common::CALLBACK_TOKEN, &time)
    );
    let mut slow_body = connect_and_send(callbacks, head.as_bytes()).await;

    let jobs = 40;
    for i in 0..jobs {
        app.publish(&app.job(&format!("under-attack-{i}"), "u1"))
            .await;
    }

    for (i, stream) in slow_heads.iter_mut().enumerate() {
        let closed = until_closed(stream, bound).await;
        assert!(
            closed.is_some(),
            "slow head #{i} was kept open past {bound:?}"
        );
    }
    assert!(
        until_closed(&mut idle, bound).await.is_some(),
        "an idle connection was kept open past {bound:?}"
    );
    let (answer, _) = until_closed(&mut slow_body, bound)
        .await
        .expect("a slow body is cut off");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Oversize body and oversize head.
    let big = vec![b'x'; 1 << 20];
    let r = reqwest::Client::new()
        .post(format!(
            "http://{callbacks}/callbacks/tencent?SdkAppid=1400000000"
        ))
        .body(big)
        .send()
        .await;
    // Either the 401 comes first (the request is not signed) or the body limit answers 413;
    // in no case is a megabyte read and parsed.
    if let Ok(r) = r {
        assert!([401, 413].contains(&r.status().as_u16()), "{}", r.status());
    }
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 64 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    let mut big_head = TcpStream::connect(app.http_addr()).await.unwrap();
    let _ = big_head.write_all(&head).await;
    let (answer, _) = until_closed(&mut big_head, bound)
        .await
        .expect("an oversize head is refused");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    app.wait_for_delivered(jobs, Duration::from_secs(20)).await;
    let r = reqwest::get(format!("http://{}/healthz", app.http_addr()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_are_closed_and_health_is_untouched() {
    // Held connections must outlive the check on a slow machine: 5 s, not 1 s.
    let app = spawn_app(
        "http-many",
        with_http(
            r#"
callback_listen = "127.0.0.1:0"
header_timeout = "5s"
max_connections = 32
"#,
        ),
    )
    .await;
    let callbacks = app.callback_addr();
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(connect_and_send(callbacks, b"POST /callbacks/tencent HTTP/1.1\r\n").await);
    }
    // Give the accept loop a moment to take the 32 connections.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(callbacks).await.unwrap();
    let (_, after) = until_closed(&mut extra, Duration::from_secs(1))
        .await
        .expect("the 33rd connection is closed at once, not after the header timeout");
    assert!(after < Duration::from_secs(1), "{after:?}");
    // The health listener has its own connections.
    let r = reqwest::get(format!("http://{}/healthz", app.http_addr()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Once the held ones time out, the callback listener serves again.
    for stream in &mut held {
        until_closed(stream, Duration::from_secs(8))
            .await
            .expect("held connections time out");
    }
    let r = reqwest::Client::new()
        .post(format!("http://{callbacks}/callbacks/tencent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Metric names and kinds in docs/metrics.md's table.
fn documented_metrics() -> std::collections::BTreeMap<String, String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    doc.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`herald_")?.strip_suffix('`')?;
            Some((format!("herald_{name}"), cells.get(2)?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exports_exactly_what_docs_metrics_md_lists_each_with_help_and_counters_at_zero() {
    let mut options = options();
    // An OpenIM account too: its token counter is registered with it.
    options.accounts.push(openim_account("main"));
    let app = spawn_app("metrics-doc", options).await;
    let url = format!("http://{}/metrics", app.http_addr());
    let mut text = String::new();
    // Queue depths come from the first broker read, right after the session starts.
    for _ in 0..100 {
        text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if text.contains("herald_dlq_messages ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut exported = std::collections::BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            exported.insert(name.to_string(), kind.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(help.len() > 20, "{name}: {help}");
            helped.insert(name.to_string());
        }
    }
    assert_eq!(
        exported,
        documented_metrics(),
        "/metrics vs docs/metrics.md:\n{text}"
    );
    let names: std::collections::BTreeSet<String> = exported.keys().cloned().collect();
    assert_eq!(helped, names, "HELP on every metric");
    for series in [
        r#"herald_jobs_total{vendor="netease",account="default",outcome="dead",reason="invalid"} 0"#,
        r#"herald_jobs_total{vendor="tencent",account="main",outcome="delivered",reason="none"} 0"#,
        r#"herald_lane_pauses_total{vendor="netease",account="default"} 0"#,
        r#"herald_callbacks_total{account="main",result="dead",reason="permanent"} 0"#,
        r#"herald_breaker_state{vendor="netease",account="default"} 0"#,
        r#"herald_vendor_request_seconds_bucket{vendor="netease",account="default",le="0.05"} 0"#,
        r#"herald_build_info{version=""#,
    ] {
        // Other tests of this binary share the process's recorder: only presence is certain.
        let series = series.strip_suffix(" 0").unwrap_or(series);
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
}
