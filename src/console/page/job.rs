//! `/job/ID`: one dead job whole: the pretty-printed body, every header, the
//! history of its attempts and failures, and the edit-and-replay form.

use lapin::message::Delivery;
use serde::Serialize;

use super::{Viewer, coverage_note, esc, layout, time};
use crate::dlq::DeadJob;
use crate::envelope::header_str;
use crate::envelope::{HISTORY, History, history};

/// Everything about one dead copy, taken from its message.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    pub job: DeadJob,
    /// Every header but the history (which has its own table), as text.
    pub headers: Vec<(String, String)>,
    pub history: History,
    /// The body as JSON, pretty-printed; the raw text when it is not JSON.
    pub body: String,
    pub body_is_json: bool,
}

impl JobDetail {
    pub fn of(delivery: &Delivery) -> Self {
        let p = &delivery.properties;
        let headers = p
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| k.as_str() != HISTORY)
                    .map(|(k, v)| {
                        let text = header_str(p, k.as_str()).unwrap_or_else(|| {
                            serde_json::to_string(v).unwrap_or_else(|_| "(unreadable)".into())
                        });
                        (k.as_str().to_string(), text)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let pretty = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok());
        Self {
            job: DeadJob::from_delivery(delivery),
            headers,
            history: history(p),
            body_is_json: pretty.is_some(),
            body: pretty.unwrap_or_else(|| String::from_utf8_lossy(&delivery.data).into_owned()),
        }
    }
}

/// The page for the copies of one job (usually one); `warning` is the pass's
/// incomplete-coverage note.
pub fn job(handle: &str, copies: &[JobDetail], warning: Option<&str>, viewer: &Viewer) -> String {
    let mut body = format!(r#"<h1>Job <span id="job-id">{}</span></h1>"#, esc(handle));
    body.push_str(&coverage_note(warning));
    if copies.len() > 1 {
        body.push_str(&format!(
            r#"<p class="warning">{} dead copies of this job are in the DLQ; each is shown, each can be edited on its own.</p>"#,
            copies.len()
        ));
    }
    for (n, copy) in copies.iter().enumerate() {
        body.push_str(&one_copy(copy, n == 0, viewer));
    }
    layout("Job", viewer, &body)
}

/// One copy; the first gets the contract's element ids.
fn one_copy(copy: &JobDetail, first: bool, viewer: &Viewer) -> String {
    let id = |name: &str| {
        if first {
            format!(r#" id="{name}""#)
        } else {
            String::new()
        }
    };
    let j = &copy.job;
    let mut out = format!(
        r#"<section class="copy"><table class="facts"><tr><th>Lane</th><td>{lane}</td></tr><tr><th>Reason</th><td>{reason}</td></tr><tr><th>Code</th><td>{code}</td></tr><tr><th>Attempts</th><td>{attempts}</td></tr><tr><th>Died (UTC)</th><td>{died}</td></tr><tr><th>Error</th><td class="error">{error}</td></tr><tr><th>Fingerprint</th><td><code>{fp}</code></td></tr></table>
<h2>Body</h2><pre{body_id}>{body}</pre>
<h2>Headers</h2><table{headers_id}><tbody>"#,
        lane = esc(&j.routing_key),
        reason = esc(j.reason.as_str()),
        code = esc(j.code.as_deref().unwrap_or("-")),
        attempts = j.attempts,
        died = time(j.died_at),
        error = esc(&j.error),
        fp = esc(&j.fingerprint),
        body_id = id("body"),
        body = esc(&copy.body),
        headers_id = id("headers"),
    );
    for (k, v) in &copy.headers {
        out.push_str(&format!(
            r#"<tr class="header"><th>{}</th><td>{}</td></tr>"#,
            esc(k),
            esc(v)
        ));
    }
    out.push_str(&format!(
        r#"</tbody></table><h2>History</h2><table{}><thead><tr><th>At</th><th>Event</th><th>Tier</th><th>Reason</th><th>Attempt</th><th>Code</th><th>By</th><th>Error</th></tr></thead><tbody>"#,
        id("history")
    ));
    let h = &copy.history;
    if h.unreadable {
        out.push_str(
            r#"<tr><td colspan="8">The x-herald-history header is not one herald wrote.</td></tr>"#,
        );
    }
    if h.dropped > 0 {
        out.push_str(&format!(
            r#"<tr><td colspan="8">{} older event(s) dropped.</td></tr>"#,
            h.dropped
        ));
    }
    for e in &h.events {
        let cell = |v: &Option<String>| esc(v.as_deref().unwrap_or(""));
        out.push_str(&format!(
            r#"<tr class="event"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="error">{}</td></tr>"#,
            esc(&e.at),
            esc(e.kind.as_str()),
            cell(&e.tier),
            cell(&e.reason),
            e.attempt.map(|a| a.to_string()).unwrap_or_default(),
            cell(&e.code),
            cell(&e.by),
            cell(&e.error),
        ));
    }
    if h.events.is_empty() && !h.unreadable {
        out.push_str(r#"<tr><td colspan="8">No history recorded.</td></tr>"#);
    }
    out.push_str(&format!(
        r#"</tbody></table>
<h2>Edit and replay</h2><form method="post" action="/actions/edit"{form_id}>{csrf}<input type="hidden" name="fingerprint" value="{fp}">
<textarea name="body" rows="16" cols="80" spellcheck="false">{body}</textarea>
<p><button{button_id}>Check, replay this edited job, remove the original</button></p>
<p class="hint">The edited job is checked against the job contract and the configured accounts; the new copy names this one in x-herald-edited-from, and this copy leaves the DLQ only once the broker confirmed the new one.</p></form></section>"#,
        form_id = id("edit"),
        csrf = viewer.csrf_field(),
        fp = esc(&j.fingerprint),
        body = esc(&copy.body),
        button_id = id("edit-replay"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::FieldTable;

    use super::*;
    use crate::envelope::set_str;
    use crate::envelope::{ERROR, Event, EventKind, REASON};

    #[test]
    fn a_hostile_body_and_headers_are_shown_escaped_with_the_history() {
        let mut delivery = Delivery::mock(
            1,
            "t.dead".into(),
            "netease.default".into(),
            false,
            br#"{"id":"x-1","data":"</pre><script>alert(1)</script>"}"#.to_vec(),
        );
        let mut headers = FieldTable::default();
        set_str(&mut headers, REASON, "permanent");
        set_str(&mut headers, ERROR, "<b>bold</b>");
        let history = History::default()
            .with(Event {
                tier: Some("1s".into()),
                attempt: Some(1),
                error: Some("timeout <1>".into()),
                ..Event::new(EventKind::Retry, chrono::Utc::now())
            })
            .with(Event {
                reason: Some("permanent".into()),
                ..Event::new(EventKind::Dead, chrono::Utc::now())
            });
        set_str(
            &mut headers,
            HISTORY,
            &serde_json::to_string(&history).unwrap(),
        );
        delivery.properties = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("x-1".into());
        let detail = JobDetail::of(&delivery);
        assert!(detail.body_is_json && detail.body.contains("\n  \"id\": \"x-1\""));
        let viewer = Viewer {
            name: "oncall".into(),
            csrf: Some("tok".into()),
        };
        let html = job("x-1", &[detail], None, &viewer);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<b>bold"));
        assert_eq!(html.matches(r#"<tr class="event">"#).count(), 2);
        assert!(html.contains("timeout &lt;1&gt;"));
        for id in [
            r#"<pre id="body">"#,
            r#"<table id="headers">"#,
            r#"<table id="history">"#,
            r#"id="edit""#,
            r#"<button id="edit-replay">"#,
            r#"<textarea name="body""#,
        ] {
            assert!(html.contains(id), "{id}");
        }
        assert!(html.contains("x-herald-reason") && !html.contains(r#"<th>x-herald-history</th>"#));
    }
}
