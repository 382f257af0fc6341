//! The console in a real browser (Debian's Chromium through ChromeDriver): an
//! on-call reviewer logs in, opens a failure group and a job, replays the
//! group and finds the replay in the audit. Screenshots of each page go to
//! `<target>/tmp/console/`; docs/console.md shows two of them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::Browser;
use common::{Options, Process, TestApp, spawn_app, wait_until};
use herald::sandbox::FaultAnswer;

const TOKEN: &str = "browser-test-token-0123456789";

/// `herald console` for `app`'s broker and prefix, on a free port; answers once it serves.
async fn start_console(app: &TestApp) -> (Process, String) {
    let port = common::free_port();
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let text = format!(
        "{}\n[console]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\ntoken_name = \"oncall\"\n",
        app.config_text
    );
    std::fs::write(config.path(), text).unwrap();
    let (config_file, config_path) = config.keep().unwrap();
    drop(config_file);
    let process = Process::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("console")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let health = format!("{base}/healthz");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::get(&health)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "herald console did not answer {health} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(config_path);
    (process, base)
}

fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")
}

/// Five jobs the vendor refuses with 414 and three bodies that are not JSON.
async fn fill_dlq(app: &TestApp) {
    app.sandbox.add_fault(common::fault(
        "netease",
        "u-bad",
        1000,
        FaultAnswer::Code(414),
    ));
    for i in 0..5 {
        app.publish(&app.job(&format!("bad-{i}"), "u-bad")).await;
    }
    for i in 0..3 {
        app.publish_raw("netease.default", b"{oops", &format!("junk-{i}"))
            .await;
    }
    app.wait_for_dead(8, Duration::from_secs(20)).await;
}

async fn log_in(browser: &Browser, base: &str) {
    browser.goto(&format!("{base}/")).await;
    let token = browser.find("#token").await;
    assert!(
        browser.current_url().await.contains("/login"),
        "an unauthenticated visit lands on the login page"
    );
    browser.type_into(&token, TOKEN).await;
    browser.click(&browser.find("#login").await).await;
    browser.find("#groups").await;
}

/// The `a.group-link` of the overview row whose text contains `needle`.
async fn group_link(browser: &Browser, needle: &str) -> common::browser::Element {
    for row in browser.find_all("tr.group").await {
        if browser.text(&row).await.contains(needle) {
            return browser.find_in(&row, "a.group-link").await;
        }
    }
    panic!(
        "no failure group with `{needle}` on the overview:\n{}",
        browser.source().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_logs_in_opens_a_group_and_a_job_replays_it_and_sees_the_audit_entry() {
    let app = spawn_app("console-browser", Options::default()).await;
    fill_dlq(&app).await;
    let (_console, base) = start_console(&app).await;
    let shots = screenshot_dir();
    let browser = Browser::start().await;

    log_in(&browser, &base).await;
    let cookies = browser.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "herald_console")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    assert!(
        browser.find_all("tr.group").await.len() >= 2,
        "the refused jobs and the junk are separate groups"
    );
    browser.screenshot(&shots.join("overview.png")).await;

    browser.click(&group_link(&browser, "414").await).await;
    browser.find("#jobs").await;
    let group_url = browser.current_url().await;
    assert_eq!(browser.find_all("tr.job").await.len(), 5);
    browser.screenshot(&shots.join("group.png")).await;

    browser
        .click(&browser.find("tr.job a.job-link").await)
        .await;
    let body = browser.text(&browser.find("#body").await).await;
    assert!(body.contains("\"u-bad\""), "the job's body: {body}");
    let history = browser.text(&browser.find("#history").await).await;
    assert!(history.contains("414"), "the job's history: {history}");
    browser.find("#headers").await;
    browser.screenshot(&shots.join("job.png")).await;

    // The vendor takes them now; replay the group at 50 jobs/s.
    app.sandbox.clear_faults();
    browser.goto(&group_url).await;
    browser.click(&browser.find("#replay-group").await).await;
    let count = browser.text(&browser.find("#dry-run-count").await).await;
    assert_eq!(count.trim(), "5", "the dry run counts the group");
    assert_eq!(app.dlq_depth().await, 8, "a dry run removes nothing");
    let rate = browser.find("input[name=rate]").await;
    browser.clear(&rate).await;
    browser.type_into(&rate, "50").await;
    browser.screenshot(&shots.join("replay-preview.png")).await;
    browser.click(&browser.find("#confirm").await).await;
    let result = browser.text(&browser.find("#result").await).await;
    assert!(
        result.contains('5'),
        "the result names the 5 replayed: {result}"
    );
    wait_until(
        "the replayed jobs delivered",
        Duration::from_secs(20),
        || {
            app.deliveries_by_id()
                .keys()
                .filter(|id| id.starts_with("bad-"))
                .count()
                == 5
        },
    )
    .await;
    assert_eq!(app.dlq_depth().await, 3, "only the junk is left");

    browser.goto(&format!("{base}/audit")).await;
    let entry = browser.text(&browser.find("tr.audit-entry").await).await;
    assert!(entry.contains("replay"), "{entry}");
    assert!(entry.contains("oncall"), "the token's name is who: {entry}");
    browser.screenshot(&shots.join("audit.png")).await;

    // Logged out, the same group page shows the login form and no job.
    browser.goto(&format!("{base}/")).await;
    browser.click(&browser.find("#logout").await).await;
    browser.goto(&group_url).await;
    browser.find("#token").await;
    let page = browser.source().await;
    assert!(
        !page.contains("junk-0") && !page.contains("u-bad"),
        "{page}"
    );
    browser.quit().await;
    eprintln!("screenshots in {}", shots.display());
}
