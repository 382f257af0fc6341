//! The action pages: a replay's dry-run count and rate, a purge's exact
//! list, and the result of any action.

use super::{Viewer, coverage_note, esc, layout, time, url_part};
use crate::dlq::DeadJob;

/// Rows a purge preview lists at most; the plan holds every copy regardless.
pub const PLAN_ROWS: usize = 1000;

/// The dry-run count of a replay, and the form that runs it. `hidden` carries
/// the selection; `what` says it in words.
pub fn replay_preview(
    count: usize,
    what: &str,
    hidden: &str,
    warning: Option<&str>,
    viewer: &Viewer,
) -> String {
    let body = format!(
        r#"<h1>Replay</h1><p>Dry run: <span id="dry-run-count">{count}</span> job(s) would be replayed to their lanes with attempts reset ({what}). The replay takes what matches when it runs, each job once; the result says how many.</p>{coverage}
<form method="post" action="/actions/replay" id="replay-confirm">{csrf}{hidden}
<label>Rate (jobs per second, empty for no limit) <input name="rate" id="rate" type="number" min="1" value="50"></label>
<button id="confirm">Replay</button></form><p><a href="/" id="cancel">Cancel</a> (nothing is replayed)</p>"#,
        what = esc(what),
        coverage = coverage_note(warning),
        csrf = viewer.csrf_field(),
    );
    layout("Replay", viewer, &body)
}

/// Exactly the copies a purge removes; the form names the stored plan.
pub fn purge_preview(
    plan: &str,
    jobs: &[DeadJob],
    what: &str,
    warning: Option<&str>,
    viewer: &Viewer,
) -> String {
    let mut body = format!(
        r#"<h1>Purge</h1><p>Exactly these <span id="plan-count">{n}</span> dead job(s) will be removed ({what}); a job that arrived or died again after this list stays.</p>{coverage}"#,
        n = jobs.len(),
        what = esc(what),
        coverage = coverage_note(warning),
    );
    body.push_str(r#"<table id="plan"><thead><tr><th>Id</th><th>Lane</th><th>Reason</th><th>Died (UTC)</th><th>Fingerprint</th></tr></thead><tbody>"#);
    for j in jobs.iter().take(PLAN_ROWS) {
        body.push_str(&format!(
            r#"<tr class="planned"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>"#,
            esc(j.id.as_deref().unwrap_or("(no id)")),
            esc(&j.routing_key),
            esc(j.reason.as_str()),
            time(j.died_at),
            esc(&j.fingerprint),
        ));
    }
    body.push_str("</tbody></table>");
    if jobs.len() > PLAN_ROWS {
        body.push_str(&format!(
            r#"<p class="hint">{} more are in the plan: <a href="/plan/{}" id="plan-file">the whole list</a> (the format of <code>herald dlq purge --save-plan</code>).</p>"#,
            jobs.len() - PLAN_ROWS,
            esc(&url_part(plan)),
        ));
    }
    if jobs.is_empty() {
        body.push_str(r#"<p id="nothing">Nothing to purge.</p>"#);
    } else {
        body.push_str(&format!(
            r#"<form method="post" action="/actions/purge" id="purge-confirm">{csrf}<input type="hidden" name="plan" value="{plan}"><button id="confirm">Remove these {n} job(s)</button></form>"#,
            csrf = viewer.csrf_field(),
            plan = esc(plan),
            n = jobs.len(),
        ));
    }
    body.push_str(r#"<p><a href="/" id="cancel">Cancel</a> (nothing is removed)</p>"#);
    layout("Purge", viewer, &body)
}

/// How an action went: `counts` as (label, number), then its warning or error.
pub fn result(
    title: &str,
    counts: &[(&str, u64)],
    notes: &[String],
    error: Option<&str>,
    viewer: &Viewer,
) -> String {
    let mut body = format!(r#"<h1>{}</h1><div id="result">"#, esc(title));
    if let Some(e) = error {
        body.push_str(&format!(r#"<p class="error" id="error">{}</p>"#, esc(e)));
    }
    if !counts.is_empty() {
        body.push_str("<ul>");
        for (label, n) in counts {
            body.push_str(&format!(
                r#"<li>{label}: <span id="{id}">{n}</span></li>"#,
                label = esc(label),
                id = esc(label),
            ));
        }
        body.push_str("</ul>");
    }
    for note in notes {
        body.push_str(&format!(r#"<p class="warning">{}</p>"#, esc(note)));
    }
    body.push_str(
        r#"</div><p><a href="/">Back to the overview</a> · <a href="/audit">Audit</a></p>"#,
    );
    layout(title, viewer, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer() -> Viewer {
        Viewer {
            name: "oncall".into(),
            csrf: Some("tok".into()),
        }
    }

    #[test]
    fn a_replay_preview_shows_the_count_a_rate_and_carries_the_selection() {
        let html = replay_preview(
            12,
            "group x",
            r#"<input type="hidden" name="group" value="k">"#,
            Some("partial!"),
            &viewer(),
        );
        assert!(html.contains(r#"<span id="dry-run-count">12</span>"#));
        assert!(html.contains(r#"name="rate""#) && html.contains(r#"<button id="confirm">"#));
        assert!(html.contains(r#"name="group" value="k""#) && html.contains("partial!"));
    }

    #[test]
    fn a_purge_preview_lists_every_planned_copy_and_the_result_page_counts() {
        let jobs: Vec<DeadJob> = (0..3)
            .map(|i| {
                crate::console::index::tests::dead(
                    &format!("<p{i}>"),
                    crate::outcome::Reason::Invalid,
                    "e",
                    i,
                )
            })
            .collect();
        let html = purge_preview("plan-1", &jobs, "group", None, &viewer());
        assert_eq!(html.matches(r#"<tr class="planned">"#).count(), 3);
        assert!(html.contains(r#"<table id="plan">"#) && html.contains("&lt;p0&gt;"));
        assert!(html.contains(r#"name="plan" value="plan-1""#));
        let empty = purge_preview("plan-2", &[], "group", None, &viewer());
        assert!(!empty.contains(r#"id="confirm""#));
        let done = result(
            "Purged",
            &[("removed", 3), ("unfound", 1)],
            &["note".into()],
            None,
            &viewer(),
        );
        assert!(
            done.contains(r#"<div id="result">"#)
                && done.contains(r#"<span id="removed">3</span>"#)
        );
        let failed = result("Edit refused", &[], &[], Some("not <valid>"), &viewer());
        assert!(failed.contains("not &lt;valid&gt;"));
    }
}
