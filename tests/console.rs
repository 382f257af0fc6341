//! `herald console` over HTTP against a real broker: who gets in, what each
//! page shows, and that every action does exactly what its preview said.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Options, TestApp, spawn_app};
use futures_util::StreamExt;
use herald::config::ReviewConfig;
use herald::envelope::{
    ERROR, Event, EventKind, HISTORY, History, REASON, ROUTING_KEY, VENDOR_CODE,
};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::{Response, StatusCode};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "console-test-token-0123456789";
const OTHER_TOKEN: &str = "console-alice-token-0123456789";

struct Console {
    app: TestApp,
    addr: SocketAddr,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `[console]` section the tests run with.
fn console_section(listen: &str) -> String {
    format!(
        "\n[console]\nlisten = \"{listen}\"\ntoken = \"{TOKEN}\"\ntoken_name = \"oncall\"\n[console.tokens]\nalice = \"{OTHER_TOKEN}\"\n"
    )
}

/// A topology of its own (no worker: replayed jobs stay in their lane) and a console on it.
async fn console(test: &str) -> Console {
    let app = spawn_app(
        test,
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let text = format!("{}{}", app.config_text, console_section("127.0.0.1:0"));
    let config = ReviewConfig::parse(&text, Vec::new()).expect("console config");
    let shutdown = CancellationToken::new();
    let console = herald::console::Console::new(config).unwrap();
    let addr = herald::console::spawn(console, "127.0.0.1:0".parse().unwrap(), shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Console {
        app,
        addr,
        http,
        shutdown,
    }
}

/// One dead job as herald writes it, published straight to the dead-letter exchange.
async fn dead(app: &TestApp, id: &str, reason: &str, error: &str, body: &[u8]) {
    dead_with(app, id, reason, error, body, |_| {}).await
}

async fn dead_with(
    app: &TestApp,
    id: &str,
    reason: &str,
    error: &str,
    body: &[u8],
    more: impl FnOnce(&mut FieldTable),
) {
    let mut headers = FieldTable::default();
    herald::envelope::set_str(&mut headers, REASON, reason);
    herald::envelope::set_str(&mut headers, ERROR, error);
    herald::envelope::set_str(&mut headers, ROUTING_KEY, "netease.default");
    if reason == "permanent" {
        herald::envelope::set_str(&mut headers, VENDOR_CODE, "414");
    }
    more(&mut headers);
    let props = lapin::BasicProperties::default()
        .with_message_id(id.into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_headers(headers);
    app.publisher
        .publish(&app.names.dead(), "netease.default", body, props)
        .await
        .unwrap();
}

/// `n` dead copies of valid jobs `{prefix}-{i}` for users `u{i}`, all `permanent` 414.
async fn dead_jobs(app: &TestApp, prefix: &str, n: usize) {
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let body = app.job(&id, &format!("u{i}")).to_string();
        dead(
            app,
            &id,
            "permanent",
            "recipient u1 is not registered",
            body.as_bytes(),
        )
        .await;
    }
    app.wait_for_dead(n, Duration::from_secs(10)).await;
}

/// A logged-in browser: its session cookie and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

impl Console {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn get(&self, path: &str, session: Option<&Session>) -> Response {
        let mut request = self.http.get(self.url(path));
        if let Some(s) = session {
            request = request.header(COOKIE, &s.cookie);
        }
        request.send().await.unwrap()
    }

    async fn text(&self, path: &str, session: &Session) -> String {
        let response = self.get(path, Some(session)).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
        text
    }

    /// A POST as the console's own page sends it: the session's cookie, its CSRF token, our Origin.
    async fn post(&self, path: &str, session: &Session, fields: &[(&str, &str)]) -> Response {
        let mut form: Vec<(&str, &str)> = vec![("csrf", &session.csrf)];
        form.extend_from_slice(fields);
        self.http
            .post(self.url(path))
            .header(COOKIE, &session.cookie)
            .header(ORIGIN, self.origin())
            .form(&form)
            .send()
            .await
            .unwrap()
    }

    async fn login_with(&self, token: &str) -> Response {
        self.http
            .post(self.url("/login"))
            .header(ORIGIN, self.origin())
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
    }

    async fn login(&self) -> Session {
        let response = self.login_with(TOKEN).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let set = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        let page = self
            .http
            .get(self.url("/"))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Session {
            csrf: attribute(&page, r#"name="csrf" value=""#).expect("a CSRF field"),
            cookie,
        }
    }

    async fn api(&self, path: &str) -> serde_json::Value {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.json().await.unwrap()
    }

    /// The key of the group whose shape contains `shape`.
    async fn group_key(&self, shape: &str) -> String {
        let groups = self.api("/api/groups").await;
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["shape"].as_str().unwrap().contains(shape))
            .unwrap_or_else(|| panic!("no group like `{shape}`: {groups}"))["key"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Rebuilds the index (as Refresh does), so it holds the dead jobs published so far.
    async fn reindex(&self) {
        let response = self
            .http
            .post(self.url("/refresh"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
    }

    async fn refresh(&self, session: &Session) {
        let response = self.post("/refresh", session, &[]).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
    }
}

/// The value of the first attribute that starts with `prefix` (which ends in `="`).
fn attribute(html: &str, prefix: &str) -> Option<String> {
    let start = html.find(prefix)? + prefix.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_string())
}

/// The text of the element whose id is `id`.
fn by_id(html: &str, id: &str) -> Option<String> {
    let open = format!(r#"id="{id}">"#);
    let start = html.find(&open)? + open.len();
    let end = html[start..].find('<')? + start;
    Some(html[start..end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sets_a_strict_http_only_cookie_and_logout_ends_the_session() {
    let c = console("console-login").await;
    let start = c.get("/", None).await;
    assert_eq!(start.status(), StatusCode::SEE_OTHER);
    assert_eq!(start.headers()[LOCATION], "/login");
    let form = c.get("/login", None).await.text().await.unwrap();
    assert!(form.contains(r#"<input name="token" id="token" type="password""#));

    let wrong = c.login_with("console-test-token-012345678X").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(SET_COOKIE).is_none());

    let response = c.login_with(TOKEN).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/");
    let set = response.headers()[SET_COOKIE].to_str().unwrap();
    assert!(set.starts_with("herald_console="), "{set}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    let session = c.login().await;
    let overview = c.text("/", &session).await;
    assert!(overview.contains(r#"<table id="groups">"#));
    assert!(overview.contains("signed in as oncall"));

    let out = c.post("/logout", &session, &[]).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(
        out.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let after = c.get("/", Some(&session)).await;
    assert_eq!(
        after.status(),
        StatusCode::SEE_OTHER,
        "the old cookie no longer opens anything"
    );

    // The second token logs in under its own name.
    let alice = c.login_with(OTHER_TOKEN).await;
    assert_eq!(alice.status(), StatusCode::SEE_OTHER);
    let cookie = alice.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = c
        .http
        .get(c.url("/"))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("signed in as alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_authentication_no_route_serves_any_job_data() {
    let c = console("console-noauth").await;
    let body = c.app.job("leak-me-7", "u-leak").to_string();
    dead(
        &c.app,
        "leak-me-7",
        "permanent",
        "vendor says leak-error",
        body.as_bytes(),
    )
    .await;
    c.app.wait_for_dead(1, Duration::from_secs(10)).await;
    c.reindex().await;
    let key = c.group_key("leak-error").await;
    let session = c.login().await;
    let fingerprint = attribute(
        &c.text(&format!("/group/{key}"), &session).await,
        r#"name="id" value=""#,
    )
    .unwrap();
    let gets = [
        "/".to_string(),
        format!("/group/{key}"),
        format!("/group/{key}?page=1&recipient=u-leak"),
        "/job/leak-me-7".into(),
        format!("/job/{fingerprint}"),
        "/audit".into(),
        "/plan/whatever".into(),
        "/api/groups".into(),
        format!("/api/group/{key}"),
        "/api/job/leak-me-7".into(),
        "/api/audit".into(),
    ];
    let posts = [
        "/refresh",
        "/logout",
        "/actions/replay/preview",
        "/actions/replay",
        "/actions/purge/preview",
        "/actions/purge",
        "/actions/edit",
    ];
    let leaks = |text: &str| {
        ["leak-me-7", "u-leak", "leak-error", &fingerprint, &key]
            .iter()
            .any(|s| text.contains(s))
    };
    let forged = "herald_console=0000000000000000000000000000000000000000000000000000000000000000";
    for path in &gets {
        for (cookie, bearer) in [
            (None, None),
            (Some(forged), None),
            (None, Some("wrong-token-0123456789")),
        ] {
            let mut request = c.http.get(c.url(path));
            if let Some(cookie) = cookie {
                request = request.header(COOKIE, cookie);
            }
            if let Some(token) = bearer {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            let expected = if path.starts_with("/api/") || bearer.is_some() {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::SEE_OTHER
            };
            assert_eq!(status, expected, "GET {path}");
            let text = format!(
                "{:?} {}",
                response.headers().clone(),
                response.text().await.unwrap()
            );
            assert!(!leaks(&text), "GET {path} leaked: {text}");
        }
    }
    for path in posts {
        let response = c
            .http
            .post(c.url(path))
            .header(ORIGIN, c.origin())
            .form(&[
                ("group", key.as_str()),
                ("id", fingerprint.as_str()),
                ("fingerprint", fingerprint.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "POST {path}");
        assert!(!leaks(&response.text().await.unwrap()), "POST {path}");
    }
    assert_eq!(c.app.dlq_depth().await, 1, "no action ran");
    let health = c.get("/healthz", None).await.text().await.unwrap();
    assert_eq!(health, "ok\n");
    let css = c.get("/static/console.css", None).await;
    assert_eq!(css.status(), StatusCode::OK);
    // With the token, the API answers.
    let groups = c.api("/api/groups").await;
    assert_eq!(groups["total"], 1);
    let job = c.api("/api/job/leak-me-7").await;
    assert_eq!(job["copies"][0]["job"]["id"], "leak-me-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_without_the_session_csrf_token_or_from_another_origin_are_refused() {
    let c = console("console-csrf").await;
    let session = c.login().await;
    let post = |fields: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut request = c
            .http
            .post(c.url("/refresh"))
            .header(COOKIE, &session.cookie)
            .form(&fields);
        if let Some(o) = origin {
            request = request.header(ORIGIN, o);
        }
        request.send()
    };
    let missing = post(vec![], None).await.unwrap();
    assert_eq!(missing.status(), StatusCode::FORBIDDEN);
    assert!(missing.text().await.unwrap().contains("CSRF"));
    let wrong = post(vec![("csrf", "0".repeat(64))], None).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let cross = post(
        vec![("csrf", session.csrf.clone())],
        Some("http://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    assert!(cross.text().await.unwrap().contains("cross-origin"));
    let cross_site = c
        .http
        .post(c.url("/refresh"))
        .header(COOKIE, &session.cookie)
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", session.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    let login_from_elsewhere = c
        .http
        .post(c.url("/login"))
        .header(ORIGIN, "http://evil.example")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login_from_elsewhere.status(), StatusCode::FORBIDDEN);
    assert!(login_from_elsewhere.headers().get(SET_COOKIE).is_none());
    // What Chrome sends from a page whose referrer policy hides the origin.
    let opaque = c
        .http
        .post(c.url("/login"))
        .header(ORIGIN, "null")
        .header("sec-fetch-site", "same-origin")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(opaque.status(), StatusCode::SEE_OTHER);
    let sandboxed = c
        .http
        .post(c.url("/login"))
        .header(ORIGIN, "null")
        .header("sec-fetch-site", "cross-site")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(sandboxed.status(), StatusCode::FORBIDDEN);
    // Another session's CSRF token does not do either.
    let other = c.login().await;
    let mixed = post(vec![("csrf", other.csrf.clone())], None)
        .await
        .unwrap();
    assert_eq!(mixed.status(), StatusCode::FORBIDDEN);
    let ok = post(vec![("csrf", session.csrf.clone())], Some("")).await;
    let ok = ok.unwrap();
    assert_eq!(
        ok.status(),
        StatusCode::FORBIDDEN,
        "an empty Origin is no origin of ours"
    );
    c.refresh(&session).await;
    // A bearer client needs no CSRF token.
    let bearer = c
        .http
        .post(c.url("/refresh"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_command_needs_only_the_broker_and_a_token_and_never_shows_the_token() {
    let app = spawn_app(
        "console-cmd",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    // Only `[broker]`: no account, no vendor secret.
    let broker = format!(
        "[broker]\nurl = \"{}\"\nprefix = \"{}\"\n",
        common::broker_url(),
        app.names.prefix()
    );
    let run = |extra: &str, env: Option<&str>| {
        std::fs::write(file.path(), format!("{broker}{extra}")).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(["console", "--config"])
            .arg(file.path())
            .env_remove("HERALD_CONSOLE_TOKEN")
            .env("RUST_LOG", "debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(token) = env {
            command.env("HERALD_CONSOLE_TOKEN", token);
        }
        command
    };
    for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
        let out = run(&format!("\n[console]\nlisten = \"{listen}\"\n"), None)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{listen}: {stderr}");
        assert!(stderr.contains("HERALD_CONSOLE_TOKEN"), "{stderr}");
        if listen.starts_with("0.0.0.0") {
            assert!(stderr.contains("non-loopback"), "{stderr}");
        }
    }
    let short = run("", Some("short")).output().unwrap();
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 16"));

    // Started with the token from the environment: its pages, headers and log never show it.
    let port = common::free_port();
    let mut child = common::Process::spawn(&mut run(
        &format!("\n[console]\nlisten = \"127.0.0.1:{port}\"\n"),
        Some(TOKEN),
    ));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the console did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = String::new();
    for token in [TOKEN, "not-the-token-0123456789"] {
        let r = http
            .post(format!("{base}/login"))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        seen.push_str(&format!("{:?}", r.headers()));
        let cookie = r
            .headers()
            .get(SET_COOKIE)
            .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string());
        seen.push_str(&r.text().await.unwrap());
        if let Some(cookie) = cookie {
            for path in ["/", "/audit", "/group/none", "/job/none"] {
                let r = http
                    .get(format!("{base}{path}"))
                    .header(COOKIE, &cookie)
                    .send()
                    .await
                    .unwrap();
                seen.push_str(&format!("{:?}", r.headers()));
                seen.push_str(&r.text().await.unwrap());
            }
        }
    }
    for path in ["/api/groups", "/api/audit"] {
        let r = http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        seen.push_str(&format!("{:?}", r.headers()));
        seen.push_str(&r.text().await.unwrap());
    }
    common::signal(&child, "-TERM");
    let status = child.wait().unwrap();
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("console login"), "{log}");
    assert!(!seen.contains(TOKEN), "a page or header showed the token");
    assert!(!log.contains(TOKEN), "the log showed the token: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_in_a_body_or_header_is_shown_escaped() {
    let c = console("console-xss").await;
    let body = br#"{"id":"xss-1","data":"</pre><script>alert(1)</script>"}"#;
    dead(
        &c.app,
        "xss-1",
        "invalid",
        "<img src=x onerror=alert(2)>",
        body,
    )
    .await;
    c.app.wait_for_dead(1, Duration::from_secs(10)).await;
    c.reindex().await;
    let session = c.login().await;
    let key = c.group_key("img").await;
    let pages = [
        c.text("/", &session).await,
        c.text(&format!("/group/{key}"), &session).await,
        c.text("/job/xss-1", &session).await,
    ];
    for page in &pages {
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
    }
    assert!(pages[2].contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let response = c.get("/", Some(&session)).await;
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_groups_invalid_jobs_by_their_error_fingerprint() {
    let c = console("console-groups").await;
    for (id, error) in [
        ("a-1", "pushcontent is 612 characters, at most 500"),
        ("a-2", "pushcontent is 700 characters, at most 500"),
        ("b-1", "unknown field `tto`, expected one of `v`, `id`"),
    ] {
        dead(&c.app, id, "invalid", error, b"{}").await;
    }
    c.app.wait_for_dead(3, Duration::from_secs(10)).await;
    c.reindex().await;
    let session = c.login().await;
    let overview = c.text("/", &session).await;
    assert_eq!(
        overview.matches(r#"<tr class="group">"#).count(),
        2,
        "{overview}"
    );
    assert_eq!(overview.matches(r#"class="group-link""#).count(), 2);
    assert_eq!(overview.matches("<svg class=\"chart\"").count(), 2);
    assert_eq!(by_id(&overview, "total").as_deref(), Some("3"));
    assert!(by_id(&overview, "index-age").is_some());
    let groups = c.api("/api/groups").await;
    let counts: Vec<u64> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [2, 1]);
    assert_eq!(groups["complete"], true);
    // New jobs show after a refresh.
    dead(
        &c.app,
        "a-3",
        "invalid",
        "pushcontent is 9 characters, at most 500",
        b"{}",
    )
    .await;
    c.app.wait_for_dead(4, Duration::from_secs(10)).await;
    c.reindex().await;
    c.refresh(&session).await;
    assert_eq!(
        by_id(&c.text("/", &session).await, "total").as_deref(),
        Some("4")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_pages_fifty_jobs_at_a_time_and_filters_them() {
    let c = console("console-paging").await;
    dead_jobs(&c.app, "p", 120).await;
    c.reindex().await;
    let session = c.login().await;
    let key = c.group_key("not registered").await;
    let rows = |html: &str| html.matches(r#"<tr class="job">"#).count();
    let first = c.text(&format!("/group/{key}"), &session).await;
    assert_eq!(rows(&first), 50);
    assert!(first.contains("page 1 of 3"));
    assert!(first.contains(r#"<a class="job-link" href="/job/p-0">"#));
    let third = c.text(&format!("/group/{key}?page=3"), &session).await;
    assert_eq!(rows(&third), 20);
    let one = c
        .text(&format!("/group/{key}?recipient=u7"), &session)
        .await;
    assert_eq!(rows(&one), 1);
    assert!(one.contains("/job/p-7"));
    let by_id_filter = c.text(&format!("/group/{key}?id=p-42"), &session).await;
    assert_eq!(rows(&by_id_filter), 1);
    let keyed = c
        .text(&format!("/group/{key}?key=test.key&page=2"), &session)
        .await;
    assert_eq!(rows(&keyed), 50);
    let none = c
        .text(
            &format!("/group/{key}?until=2000-01-01T00:00:00Z"),
            &session,
        )
        .await;
    assert_eq!(rows(&none), 0);
    let recent = c.text(&format!("/group/{key}?since=1h"), &session).await;
    assert_eq!(by_id(&recent, "match-count").as_deref(), Some("120"));
    // Text is searched in the bodies, by a pass over the DLQ.
    let text = c
        .text(&format!("/group/{key}?text=%22u11%22"), &session)
        .await;
    assert_eq!(rows(&text), 1, "{text}");
    assert!(text.contains(r#"id="searched""#));
    let bad = c
        .get(&format!("/group/{key}?since=yesterday"), Some(&session))
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let api = c.api(&format!("/api/group/{key}?page=2")).await;
    assert_eq!(api["page"]["jobs"].as_array().unwrap().len(), 50);
    assert_eq!(api["page"]["total"], 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_page_shows_the_pretty_body_every_header_and_the_history() {
    let c = console("console-job").await;
    let history = History::default()
        .with(Event {
            tier: Some("1s".into()),
            attempt: Some(1),
            error: Some("http 503 from vendor".into()),
            ..Event::new(EventKind::Retry, chrono::Utc::now())
        })
        .with(Event {
            reason: Some("exhausted".into()),
            attempt: Some(2),
            error: Some("http 503 again".into()),
            ..Event::new(EventKind::Dead, chrono::Utc::now())
        });
    let body = c.app.job("h-1", "u1").to_string();
    dead_with(
        &c.app,
        "h-1",
        "exhausted",
        "http 503 again",
        body.as_bytes(),
        |h| {
            herald::envelope::set_str(h, HISTORY, &serde_json::to_string(&history).unwrap());
            herald::envelope::set_str(h, "x-custom-note", "from the producer");
        },
    )
    .await;
    c.app.wait_for_dead(1, Duration::from_secs(10)).await;
    c.reindex().await;
    let session = c.login().await;
    let page = c.text("/job/h-1", &session).await;
    assert!(page.contains(r#"<pre id="body">"#));
    assert!(
        page.contains("\n  &quot;id&quot;: &quot;h-1&quot;"),
        "pretty-printed: {page}"
    );
    assert!(page.contains("x-custom-note") && page.contains("from the producer"));
    assert!(page.contains("x-herald-reason") && page.contains("exhausted"));
    assert_eq!(page.matches(r#"<tr class="event">"#).count(), 2);
    assert!(page.contains("http 503 from vendor"));
    assert!(page.contains(r#"<button id="edit-replay">"#));
    let missing = c.get("/job/nope", Some(&session)).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(c.app.dlq_depth().await, 1, "reading a job removes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_counts_first_then_moves_the_jobs_to_their_lane_and_is_audited() {
    let c = console("console-replay").await;
    dead_jobs(&c.app, "r", 5).await;
    c.reindex().await;
    dead(&c.app, "other-1", "invalid", "something else", b"{}").await;
    c.app.wait_for_dead(6, Duration::from_secs(10)).await;
    c.reindex().await;
    let session = c.login().await;
    let key = c.group_key("not registered").await;
    let preview = c
        .post(
            "/actions/replay/preview",
            &session,
            &[("group", &key), ("f-since", "1h")],
        )
        .await;
    assert_eq!(preview.status(), StatusCode::OK);
    let preview = preview.text().await.unwrap();
    assert_eq!(
        by_id(&preview, "dry-run-count").as_deref(),
        Some("5"),
        "{preview}"
    );
    assert!(preview.contains(r#"name="rate""#));
    assert_eq!(c.app.dlq_depth().await, 6, "a dry run moves nothing");
    let since = attribute(&preview, r#"name="f-since" value=""#).unwrap();
    let done = c
        .post(
            "/actions/replay",
            &session,
            &[("group", &key), ("f-since", &since), ("rate", "100")],
        )
        .await;
    assert_eq!(done.status(), StatusCode::OK);
    let done = done.text().await.unwrap();
    assert!(done.contains(r#"<div id="result">"#));
    assert_eq!(by_id(&done, "replayed").as_deref(), Some("5"), "{done}");
    assert_eq!(c.app.dlq_depth().await, 1);
    assert_eq!(c.app.lane_depth().await, 5, "the jobs are in their lane");
    // The index was rebuilt by the action.
    assert_eq!(
        by_id(&c.text("/", &session).await, "total").as_deref(),
        Some("1")
    );

    // A selection: exactly the checked copy.
    dead_jobs(&c.app, "s", 3).await;
    c.reindex().await;
    c.refresh(&session).await;
    let key = c.group_key("not registered").await;
    let page = c.text(&format!("/group/{key}?id=s-1"), &session).await;
    let fp = attribute(&page, r#"name="id" value=""#).unwrap();
    let preview = c
        .post("/actions/replay/preview", &session, &[("id", &fp)])
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(by_id(&preview, "dry-run-count").as_deref(), Some("1"));
    let done = c
        .post("/actions/replay", &session, &[("id", &fp), ("rate", "")])
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(by_id(&done, "replayed").as_deref(), Some("1"), "{done}");
    assert_eq!(c.app.lane_depth().await, 6);

    let audit = c.text("/audit", &session).await;
    assert_eq!(
        audit.matches(r#"<tr class="audit-entry">"#).count(),
        2,
        "{audit}"
    );
    assert!(audit.contains(r#"<td class="who">oncall</td>"#));
    assert!(audit.contains(r#"<td class="action">replay</td>"#));
    assert!(audit.contains("5: r-0 r-1 r-2 r-3 r-4"), "{audit}");
    assert!(audit.contains("1: s-1") && audit.contains("done 1"));
    let api = c.api("/api/audit").await;
    assert_eq!(api[0]["who"], "oncall");
    assert_eq!(api[0]["source"], "console");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_removes_exactly_the_listed_jobs_and_not_one_that_arrived_after() {
    let c = console("console-purge").await;
    dead_jobs(&c.app, "x", 3).await;
    c.reindex().await;
    let session = c.login().await;
    let key = c.group_key("not registered").await;
    let preview = c
        .post("/actions/purge/preview", &session, &[("group", &key)])
        .await;
    assert_eq!(preview.status(), StatusCode::OK);
    let preview = preview.text().await.unwrap();
    assert_eq!(preview.matches(r#"<tr class="planned">"#).count(), 3);
    for id in ["x-0", "x-1", "x-2"] {
        assert!(preview.contains(&format!("<td>{id}</td>")), "{preview}");
    }
    let plan = attribute(&preview, r#"name="plan" value=""#).unwrap();
    // Same group, arrived after the preview.
    let late = c.app.job("x-late", "u9").to_string();
    dead(
        &c.app,
        "x-late",
        "permanent",
        "recipient u1 is not registered",
        late.as_bytes(),
    )
    .await;
    c.app.wait_for_dead(4, Duration::from_secs(10)).await;
    c.reindex().await;
    let done = c
        .post("/actions/purge", &session, &[("plan", &plan)])
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(by_id(&done, "removed").as_deref(), Some("3"), "{done}");
    let left = c.app.dead_jobs().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id.as_deref(), Some("x-late"));
    // A plan runs once.
    let again = c.post("/actions/purge", &session, &[("plan", &plan)]).await;
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    assert_eq!(c.app.dlq_depth().await, 1);
    // Another session cannot run this session's plan.
    let preview = c
        .post("/actions/purge/preview", &session, &[("group", &key)])
        .await
        .text()
        .await
        .unwrap();
    let plan = attribute(&preview, r#"name="plan" value=""#).unwrap();
    let other = c.login().await;
    let stolen = c.post("/actions/purge", &other, &[("plan", &plan)]).await;
    assert_eq!(stolen.status(), StatusCode::BAD_REQUEST);
    assert_eq!(c.app.dlq_depth().await, 1);
    let audit = c.text("/audit", &session).await;
    assert!(
        audit.contains(r#"<td class="action">purge</td>"#) && audit.contains("3: x-"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_with_an_invalid_body_is_refused_and_a_valid_one_replaces_the_original() {
    let c = console("console-edit").await;
    let body = c.app.job("e-1", "u-bad").to_string();
    dead(
        &c.app,
        "e-1",
        "permanent",
        "recipient u-bad is not registered",
        body.as_bytes(),
    )
    .await;
    c.app.wait_for_dead(1, Duration::from_secs(10)).await;
    c.reindex().await;
    let session = c.login().await;
    let page = c.text("/job/e-1", &session).await;
    let fingerprint = attribute(&page, r#"name="fingerprint" value=""#).unwrap();

    let refused = c
        .post(
            "/actions/edit",
            &session,
            &[
                ("fingerprint", &fingerprint),
                ("body", r#"{"id":"e-1","vendor":"netease"}"#),
            ],
        )
        .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let refused = refused.text().await.unwrap();
    assert!(
        refused.contains("not valid") && refused.contains("nothing was changed"),
        "{refused}"
    );
    assert_eq!(c.app.dlq_depth().await, 1);

    let fixed = c.app.job("e-1", "u-good").to_string();
    let done = c
        .post(
            "/actions/edit",
            &session,
            &[("fingerprint", &fingerprint), ("body", &fixed)],
        )
        .await;
    assert_eq!(done.status(), StatusCode::OK);
    let done = done.text().await.unwrap();
    assert!(done.contains("sent to lane netease.default"), "{done}");
    assert_eq!(c.app.dlq_depth().await, 0, "the original is gone");
    let channel = c.app.conn.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut lane = channel
        .basic_consume(
            c.app.names.lane("netease", "default").as_str().into(),
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
    assert_eq!(
        herald::envelope::header_str(&copy.properties, herald::envelope::EDITED_FROM),
        Some(fingerprint)
    );
    let sent: serde_json::Value = serde_json::from_slice(&copy.data).unwrap();
    assert_eq!(sent["to"]["user"], "u-good");
    let last = herald::envelope::history(&copy.properties)
        .events
        .pop()
        .unwrap();
    assert_eq!(
        (last.kind, last.by.as_deref()),
        (EventKind::Edit, Some("oncall"))
    );
    let audit = c.text("/audit", &session).await;
    assert!(audit.contains(r#"<td class="action">edit</td>"#), "{audit}");
}

/// Cold: an index built from 100,000 dead jobs (one pass) and the overview
/// served from it, within 3 s together; a group page and a job page after.
/// `cargo test --release --test console -- --ignored hundred_thousand`
/// (`HERALD_TEST_CONSOLE_JOBS` sets another count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fills a DLQ with 100,000 dead jobs: run it alone, in release"]
async fn the_overview_of_a_hundred_thousand_dead_jobs_is_served_within_3_s() {
    let n: usize = std::env::var("HERALD_TEST_CONSOLE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let c = console("console-100k").await;
    let errors = [
        ("permanent", "recipient u{i} is not registered"),
        ("invalid", "pushcontent is {i} characters, at most 500"),
        ("invalid", "unknown field `x{i}`"),
        ("exhausted", "http 503 after {i} ms"),
    ];
    let started = std::time::Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        futures_util::future::try_join_all(chunk.iter().map(|&i| {
            let (reason, error) = errors[i % errors.len()];
            let mut headers = FieldTable::default();
            herald::envelope::set_str(&mut headers, REASON, reason);
            herald::envelope::set_str(&mut headers, ERROR, &error.replace("{i}", &i.to_string()));
            herald::envelope::set_str(&mut headers, ROUTING_KEY, "netease.default");
            herald::envelope::set_str(
                &mut headers,
                herald::envelope::LAST_ATTEMPT,
                &herald::envelope::timestamp(chrono::Utc::now()),
            );
            let id = format!("big-{i}");
            let body = c.app.job(&id, &format!("u{i}")).to_string();
            let props = lapin::BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_headers(headers);
            let (app, dead) = (&c.app, c.app.names.dead());
            async move {
                app.publisher
                    .publish(&dead, "netease.default", body.as_bytes(), props)
                    .await
            }
        }))
        .await
        .unwrap();
    }
    c.app.wait_for_dead(n, Duration::from_secs(60)).await;
    println!(
        "{n} dead jobs published in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let session = c.login().await;
    let rss_before = rss_mib();
    let started = std::time::Instant::now();
    c.reindex().await;
    let built = started.elapsed();
    let rss_after = rss_mib();
    let overview = c.text("/", &session).await;
    let cold = started.elapsed();
    assert_eq!(by_id(&overview, "total"), Some(n.to_string()));
    assert_eq!(overview.matches(r#"<tr class="group">"#).count(), 4);
    let key = c.group_key("not registered").await;
    let started = std::time::Instant::now();
    let group = c.text(&format!("/group/{key}?page=100"), &session).await;
    let group_took = started.elapsed();
    assert_eq!(group.matches(r#"<tr class="job">"#).count(), 50);
    let started = std::time::Instant::now();
    c.text(&format!("/job/big-{}", n / 2), &session).await;
    let job_took = started.elapsed();
    // The same DLQ read by `herald dlq stats`: what one pass costs on this machine now.
    let started = std::time::Instant::now();
    let depth = c.app.dlq_depth().await;
    let (stats, coverage) = herald::dlq::stats(&c.app.conn, &c.app.names).await.unwrap();
    let stats_took = started.elapsed();
    assert_eq!(
        stats.total() as usize,
        n,
        "depth {depth} before the pass: {coverage:?}"
    );
    println!(
        "dlq stats over the same {n} dead jobs: {:.2} s",
        stats_took.as_secs_f64()
    );
    println!(
        "index built in {:.2} s (RSS {rss_before:.0} -> {rss_after:.0} MiB), overview served {:.2} s after the refresh began ({} bytes); group page {:.3} s; job page {:.2} s",
        built.as_secs_f64(),
        cold.as_secs_f64(),
        overview.len(),
        group_took.as_secs_f64(),
        job_took.as_secs_f64()
    );
    assert!(cold < Duration::from_secs(3), "cold overview took {cold:?}");
}

/// This process's resident memory, in MiB (0 where /proc is not there).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
