//! `/group/KEY`: one failure group's jobs, a page at a time, with the filters
//! and the replay and purge forms (for the selection, or the whole filtered group).

use super::{Viewer, coverage_note, esc, layout, pager, time, url_part};
use crate::console::index::{GroupSummary, Page};

/// The filter fields of a group page, in the order the form shows them.
pub const FILTERS: &[(&str, &str)] = &[
    ("id", "Job id"),
    ("recipient", "Recipient"),
    ("key", "Key"),
    ("text", "Text (id, error, body)"),
    ("since", "Since (RFC 3339 or 1h)"),
    ("until", "Until"),
];

/// `filters` holds the set filter fields as given (`name`, raw value);
/// `searched` is set when a pass over the DLQ answered the query (a text
/// search), with that pass's incomplete-coverage warning if any.
pub fn group(
    group: &GroupSummary,
    filters: &[(String, String)],
    page: &Page,
    searched: Option<Option<String>>,
    viewer: &Viewer,
) -> String {
    let value = |name: &str| {
        filters
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let mut body = format!(
        r#"<h1>Group <span id="group-shape">{shape}</span></h1>
<p class="facts">{vendor} · {account} · <span class="reason">{reason}</span> · code {code} · {count} job(s) in the index</p>
<form method="get" action="/group/{key}" id="filters" class="filters">"#,
        shape = esc(&group.shape),
        vendor = esc(&group.vendor),
        account = esc(&group.account),
        reason = esc(group.reason.as_str()),
        code = esc(group.code.as_deref().unwrap_or("-")),
        count = group.count,
        key = esc(&group.key),
    );
    for (name, label) in FILTERS {
        body.push_str(&format!(
            r#"<label>{label} <input name="{name}" id="filter-{name}" value="{value}"></label> "#,
            value = esc(value(name)),
        ));
    }
    body.push_str(r#"<button id="apply-filters">Filter</button></form>"#);
    if let Some(warning) = &searched {
        body.push_str(r#"<p class="hint" id="searched">Text searched in every dead job's body by one pass over the DLQ.</p>"#);
        body.push_str(&coverage_note(warning.as_deref()));
    }
    let hidden = hidden_fields(&group.key, filters);
    body.push_str(&format!(
        r#"<p><span id="match-count">{total}</span> job(s) match.</p>
<form method="post" action="/actions/replay/preview" id="replay">{csrf}{hidden}
<table id="jobs"><thead><tr><th><input type="checkbox" id="select-page" title="select this page"></th><th>Id</th><th>Recipient</th><th>Key</th><th>Attempts</th><th>Died (UTC)</th><th>Error</th></tr></thead><tbody>"#,
        total = page.total,
        csrf = viewer.csrf_field(),
    ));
    for job in &page.jobs {
        body.push_str(&format!(
            r#"<tr class="job"><td><input type="checkbox" name="id" value="{fp}"></td><td><a class="job-link" href="/job/{handle}">{id}</a></td><td>{recipient}</td><td>{key}</td><td>{attempts}</td><td>{died}</td><td class="error">{error}</td></tr>"#,
            fp = esc(&job.fingerprint),
            handle = esc(&url_part(job.handle())),
            id = esc(job.id.as_deref().unwrap_or("(no id)")),
            recipient = esc(job.recipient.as_deref().unwrap_or("-")),
            key = esc(job.key.as_deref().unwrap_or("-")),
            attempts = job.attempts,
            died = time(job.died_at),
            error = esc(&job.error),
        ));
    }
    body.push_str(
        r#"</tbody></table>
<p class="actions"><button id="replay-group">Replay…</button> the checked jobs, or with none checked every job that matches the filters (a dry-run count comes first).</p></form>"#,
    );
    body.push_str(&format!(
        r#"<form method="post" action="/actions/purge/preview" id="purge">{csrf}{hidden}<button id="purge-group">Purge…</button> the checked jobs, or with none checked every job that matches (the exact list is shown first).</form>"#,
        csrf = viewer.csrf_field(),
    ));
    let query: Vec<String> = filters
        .iter()
        .map(|(n, v)| format!("{n}={}", url_part(v)))
        .collect();
    body.push_str(&pager(
        &format!("/group/{}", url_part(&group.key)),
        &query.join("&"),
        page.page,
        page.pages,
    ));
    layout("Group", viewer, &body)
}

/// The group and its filters as hidden form fields: what the action previews select.
pub fn hidden_fields(group: &str, filters: &[(String, String)]) -> String {
    let mut out = format!(
        r#"<input type="hidden" name="group" value="{}">"#,
        esc(group)
    );
    for (name, value) in filters {
        out.push_str(&format!(
            r#"<input type="hidden" name="f-{}" value="{}">"#,
            esc(name),
            esc(value)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use super::*;
    use crate::console::index::{Builder, JobQuery};
    use crate::dlq::Coverage;
    use crate::outcome::Reason;

    #[test]
    fn a_group_page_lists_its_jobs_with_links_checkboxes_forms_and_escaped_fields() {
        let mut builder = Builder::default();
        for i in 0..60 {
            let mut job =
                crate::console::index::tests::dead(&format!("j{i}"), Reason::Invalid, "bad", i);
            job.recipient = Some("<img src=x onerror=alert(1)>".into());
            builder.add(&job);
        }
        let index = builder.finish(Coverage::default(), Utc::now(), Duration::ZERO);
        let g = &index.groups[0];
        let q = JobQuery::default();
        let page = Page::of(index.members(g, &q), 1);
        let filters = vec![("key".to_string(), "a\"b".to_string())];
        let viewer = Viewer {
            name: "oncall".into(),
            csrf: Some("tok".into()),
        };
        let html = group(g, &filters, &page, None, &viewer);
        assert_eq!(html.matches(r#"<tr class="job">"#).count(), 50);
        assert!(
            html.contains(r#"<a class="job-link" href="/job/j0">j0</a>"#),
            "{html}"
        );
        assert!(html.contains(&format!(
            r#"name="id" value="{}""#,
            index.jobs[0].fingerprint
        )));
        for id in [
            r#"<table id="jobs">"#,
            r#"id="replay""#,
            r#"id="purge""#,
            r#"<button id="replay-group">"#,
            r#"<button id="purge-group">"#,
        ] {
            assert!(html.contains(id), "{id}");
        }
        assert!(!html.contains("<img src=x"), "recipients are escaped");
        assert!(html.contains(r#"<input type="hidden" name="f-key" value="a&quot;b">"#));
        assert!(
            html.contains("page 1 of 2") && html.contains("?page=2&amp;key=a%22b"),
            "{html}"
        );
        assert_eq!(
            html.matches(r#"name="csrf" value="tok""#).count(),
            3,
            "logout, replay, purge"
        );
    }
}
