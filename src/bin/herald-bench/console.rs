//! `console`: `herald console` over a DLQ of N dead jobs, driven as a browser
//! would (log in, follow links, post forms with their CSRF field): the
//! overview's first answer (the index built from one DLQ pass) and warm
//! answers, a group and a job page, and a whole group replayed at full speed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use herald::config::BrokerUrls;

use crate::workers::{bench_dir, sibling_binary};

const TOKEN: &str = "herald-bench-console-token-0123456789";

pub async fn console(broker: &BrokerUrls, n: usize) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let extra = format!(
        "[console]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\ntoken_name = \"bench\"\n"
    );
    let dead = crate::DeadQueue::fill(broker, n, &extra).await?;
    let dir = bench_dir()?;
    let path = dir.join("console.toml");
    std::fs::write(&path, &dead.config_text)?;
    let spawned = Instant::now();
    let mut child = Command::new(sibling_binary("herald")?)
        .args(["console", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("console.log"))?)
        .spawn()
        .context("starting herald console")?;
    let result = drive(port, n, spawned, child.id()).await;
    let _ = child.kill();
    let _ = child.wait();
    dead.finish().await?;
    result
}

async fn drive(port: u16, n: usize, spawned: Instant, pid: u32) -> anyhow::Result<()> {
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(300))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http.get(format!("{base}/healthz")).send().await, Ok(r) if r.status().is_success())
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "herald console did not start in 60 s (target/bench/console.log)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listening = spawned.elapsed();
    let login = http
        .post(format!("{base}/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await?;
    let cookie = login
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("herald_console="))
        .and_then(|v| v.split(';').next())
        .context("the login answer set no herald_console cookie")?
        .to_owned();
    let page = Page {
        http: &http,
        base: &base,
        cookie: &cookie,
    };

    let (cold, overview) = page.get("/").await?;
    anyhow::ensure!(
        overview.contains("id=\"groups\""),
        "the overview has no groups table"
    );
    let mut warm = Vec::new();
    for _ in 0..5 {
        warm.push(page.get("/").await?.0);
    }
    warm.sort();
    let group_href = first_href(&overview, "/group/").context("no group link on the overview")?;
    let (group_time, group) = page.get(&group_href).await?;
    let job_href = first_href(&group, "/job/").context("no job link on the group page")?;
    let (job_time, _) = page.get(&job_href).await?;

    let (preview_action, preview_fields) =
        form(&group, "replay").context("no form#replay on the group page")?;
    let t = Instant::now();
    let preview = page.post(&preview_action, &preview_fields).await?;
    let dry_run = t.elapsed();
    let count: usize = between(&preview, "id=\"dry-run-count\">", "<")
        .context("no #dry-run-count on the replay preview")?
        .trim()
        .replace(',', "")
        .parse()?;
    if count == 0 {
        std::fs::write(bench_dir()?.join("console-preview.html"), &preview)?;
        anyhow::bail!(
            "the replay preview of {group_href} counts no job (target/bench/console-preview.html)"
        );
    }
    let (action, fields) =
        form_with(&preview, "id=\"confirm\"").context("no #confirm form on the preview")?;
    let fields: Vec<_> = fields.into_iter().filter(|(k, _)| k != "rate").collect();
    let t = Instant::now();
    let result = page.post(&action, &fields).await?;
    let replay = t.elapsed();
    anyhow::ensure!(
        result.contains("id=\"result\""),
        "no #result after the replay"
    );
    let (after, _) = page.get("/").await?;
    println!(
        "console over {n} dead jobs: listening {:.2} s after start; overview first answer {:.2} s, warm median {:.3} s (of {}); \
         group page {:.3} s; job page {:.3} s; replay dry run {:.2} s ({count} jobs); \
         replay of {count} jobs {:.2} s ({:.0} jobs/s); overview after the replay {:.2} s; peak RSS {:.0} MiB",
        listening.as_secs_f64(),
        cold.as_secs_f64(),
        warm[warm.len() / 2].as_secs_f64(),
        warm.len(),
        group_time.as_secs_f64(),
        job_time.as_secs_f64(),
        dry_run.as_secs_f64(),
        replay.as_secs_f64(),
        count as f64 / replay.as_secs_f64(),
        after.as_secs_f64(),
        crate::workers::peak_rss_mib(pid).unwrap_or(0.0),
    );
    Ok(())
}

struct Page<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    cookie: &'a str,
}

impl Page<'_> {
    async fn get(&self, path: &str) -> anyhow::Result<(Duration, String)> {
        let t = Instant::now();
        let answer = self
            .http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie)
            .send()
            .await?;
        anyhow::ensure!(
            answer.status().is_success(),
            "GET {path}: {}",
            answer.status()
        );
        let text = answer.text().await?;
        Ok((t.elapsed(), text))
    }

    /// Posts a form as the browser does, following a 303 to the page it names.
    async fn post(&self, path: &str, fields: &[(String, String)]) -> anyhow::Result<String> {
        let answer = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie)
            .header(reqwest::header::ORIGIN, self.base)
            .form(fields)
            .send()
            .await?;
        if answer.status().is_redirection() {
            let to = answer
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .context("a redirect without Location")?
                .to_owned();
            return Ok(self.get(&to).await?.1);
        }
        anyhow::ensure!(
            answer.status().is_success(),
            "POST {path}: {}",
            answer.status()
        );
        Ok(answer.text().await?)
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    Some(&text[from..from + text[from..].find(end)?])
}

fn first_href(html: &str, prefix: &str) -> Option<String> {
    between(html, &format!("href=\"{prefix}"), "\"")
        .map(|rest| unescape(&format!("{prefix}{rest}")))
}

/// The action and fields of `<form id="{id}">`.
fn form(html: &str, id: &str) -> Option<(String, Vec<(String, String)>)> {
    form_with(html, &format!("id=\"{id}\""))
}

/// The action and fields of the form that contains `marker`.
fn form_with(html: &str, marker: &str) -> Option<(String, Vec<(String, String)>)> {
    let at = html.find(marker)?;
    let start = html[..at].rfind("<form")?;
    let end = start + html[start..].find("</form>")?;
    let form = &html[start..end];
    let open = &form[..form.find('>')?];
    let action = attribute(open, "action")?;
    let mut fields = Vec::new();
    for tag in form
        .split('<')
        .filter(|t| t.starts_with("input") || t.starts_with("button"))
    {
        let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
        if let Some(name) = attribute(tag, "name") {
            let checkbox = attribute(tag, "type").is_some_and(|t| t == "checkbox");
            if !checkbox || tag.contains(" checked") {
                fields.push((name, attribute(tag, "value").unwrap_or_default()));
            }
        }
    }
    Some((action, fields))
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let marker = format!(" {name}=\"");
    let from = tag.find(&marker)? + marker.len();
    Some(unescape(&tag[from..from + tag[from..].find('"')?]))
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_gives_its_action_and_fields_but_not_unchecked_boxes() {
        let html = r#"<p><form id="replay" method="post" action="/actions/replay/preview?x=1&amp;y=2">
            <input type="hidden" name="csrf" value="a&amp;b"><input type="checkbox" name="id" value="j1">
            <input type="checkbox" name="id" value="j2" checked><button id="replay-group" name="all" value="1">Replay</button></form>"#;
        let (action, fields) = form(html, "replay").unwrap();
        assert_eq!(action, "/actions/replay/preview?x=1&y=2");
        let want = [("csrf", "a&b"), ("id", "j2"), ("all", "1")];
        assert_eq!(
            fields,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
        assert_eq!(
            first_href(r#"<a class="group-link" href="/group/a&amp;b">"#, "/group/").unwrap(),
            "/group/a&b"
        );
    }
}
