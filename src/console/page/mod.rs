//! The console's HTML, rendered by pure functions from what the routes
//! gathered. Everything that comes from a dead job (bodies, headers, errors,
//! ids) is attacker-controlled and goes through [`esc`].

mod action;
mod audit;
mod group;
mod job;
mod overview;

pub use action::{purge_preview, replay_preview, result};
pub use audit::{ActionRow, actions, audit};
pub use group::{group, hidden_fields};
pub use job::{JobDetail, job};
pub use overview::overview;

use chrono::{DateTime, Utc};

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// What a path segment or query value keeps unencoded: RFC 3986's unreserved characters.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment or query value.
pub fn url_part(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, UNRESERVED).to_string()
}

/// A time as the pages show it (UTC, seconds).
pub fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// Who is looking, and the CSRF token their forms carry (none for bearer clients).
#[derive(Debug, Clone)]
pub struct Viewer {
    pub name: String,
    pub csrf: Option<String>,
}

impl Viewer {
    /// The hidden CSRF field every form carries.
    pub fn csrf_field(&self) -> String {
        self.csrf
            .as_deref()
            .map(|c| format!(r#"<input type="hidden" name="csrf" value="{}">"#, esc(c)))
            .unwrap_or_default()
    }
}

/// A whole page: header with navigation and logout, then `body`.
pub fn layout(title: &str, viewer: &Viewer, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · herald console</title>
<link rel="stylesheet" href="/static/console.css"><script src="/static/console.js" defer></script></head>
<body><header><a class="brand" href="/">herald console</a>
<nav><a href="/">Overview</a> <a href="/audit">Audit</a></nav>
<span class="who">signed in as {who}</span>
<form method="post" action="/logout" class="logout">{csrf}<button id="logout">Log out</button></form></header>
<main>{body}</main></body></html>
"#,
        title = esc(title),
        who = esc(&viewer.name),
        csrf = viewer.csrf_field(),
    )
}

/// The login form; `error` says why the last try failed.
pub fn login(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error" id="login-error">{}</p>"#, esc(e)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Log in · herald console</title>
<link rel="stylesheet" href="/static/console.css"></head>
<body class="login"><main><h1>herald console</h1>{error}
<form method="post" action="/login"><label for="token">Console token</label>
<input name="token" id="token" type="password" autocomplete="current-password" required autofocus>
<button id="login">Log in</button></form>
<p class="hint">The token is <code>console.token</code> (or <code>HERALD_CONSOLE_TOKEN</code>) of the console's config.</p>
</main></body></html>
"#
    )
}

/// A page that says what went wrong and what to do next.
pub fn problem(viewer: &Viewer, title: &str, text: &str) -> String {
    layout(
        title,
        viewer,
        &format!(
            r#"<h1>{}</h1><p class="error" id="problem">{}</p><p><a href="/">Back to the overview</a></p>"#,
            esc(title),
            esc(text)
        ),
    )
}

/// Where the coverage of a pass falls short, said plainly; empty when it saw everything.
pub fn coverage_note(warning: Option<&str>) -> String {
    warning
        .map(|w| format!(r#"<p class="warning" id="partial">{}</p>"#, esc(w)))
        .unwrap_or_default()
}

/// Page links `1 2 … n` keeping `query` (already encoded, without `page`).
pub fn pager(base: &str, query: &str, page: usize, pages: usize) -> String {
    if pages <= 1 {
        return String::new();
    }
    let link = |n: usize, label: &str, id: &str| {
        format!(
            r#"<a {id}href="{base}?page={n}{sep}{query}">{label}</a>"#,
            sep = if query.is_empty() { "" } else { "&amp;" },
            query = esc(query),
        )
    };
    let mut out = String::from(r#"<nav class="pager">"#);
    if page > 1 {
        out.push_str(&link(page - 1, "previous", r#"id="prev" "#));
    }
    out.push_str(&format!(" page {page} of {pages} "));
    if page < pages {
        out.push_str(&link(page + 1, "next", r#"id="next" "#));
    }
    out.push_str("</nav>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(url_part("a b/c?d-e.f"), "a%20b%2Fc%3Fd-e.f");
    }

    #[test]
    fn the_layout_carries_the_csrf_token_and_the_login_form_the_contract_ids() {
        let viewer = Viewer {
            name: "<b>on</b>".into(),
            csrf: Some("c5rf".into()),
        };
        let page = layout("t", &viewer, "<p>x</p>");
        assert!(page.contains(r#"<input type="hidden" name="csrf" value="c5rf">"#));
        assert!(page.contains("&lt;b&gt;on"), "{page}");
        let bearer = Viewer {
            name: "api".into(),
            csrf: None,
        };
        assert!(!layout("t", &bearer, "").contains("name=\"csrf\""));
        let form = login(Some("wrong token"));
        for part in [
            r#"<input name="token" id="token" type="password""#,
            r#"<button id="login">"#,
            "wrong token",
        ] {
            assert!(form.contains(part), "{part}");
        }
    }

    #[test]
    fn the_pager_links_previous_and_next_with_the_filters() {
        assert_eq!(pager("/group/k", "", 1, 1), "");
        let nav = pager("/group/k", "key=a%20b", 2, 3);
        assert!(
            nav.contains(r#"href="/group/k?page=1&amp;key=a%20b">previous"#),
            "{nav}"
        );
        assert!(
            nav.contains(r#"href="/group/k?page=3&amp;key=a%20b">next"#),
            "{nav}"
        );
        assert!(nav.contains("page 2 of 3"));
    }
}
