//! `/`: every failure group of the index, biggest first, with the index's age and coverage.

use chrono::{DateTime, Utc};

use super::{Viewer, coverage_note, esc, layout, time};
use crate::console::chart;
use crate::console::index::Index;

pub fn overview(index: &Index, viewer: &Viewer, now: DateTime<Utc>) -> String {
    let age = (now - index.built_at).num_seconds().max(0);
    let mut body = format!(
        r#"<h1>Dead jobs</h1>
<section class="index" id="index-state"><p><span id="total">{total}</span> dead job(s) in <span id="group-count">{groups}</span> group(s).
Index built <span id="index-age">{age} s</span> ago at {built} UTC in {took:.1} s.</p>
{coverage}<form method="post" action="/refresh" id="refresh">{csrf}<button id="refresh-index">Refresh</button></form></section>
"#,
        total = index.total(),
        groups = index.groups.len(),
        built = time(Some(index.built_at)),
        took = index.took.as_secs_f64(),
        coverage = coverage_note(index.coverage.warning().as_deref()),
        csrf = viewer.csrf_field(),
    );
    if index.groups.is_empty() {
        body.push_str(r#"<p id="empty">The DLQ is empty.</p>"#);
    }
    let span = index
        .span
        .map(|(from, to)| format!("{} to {}", time(Some(from)), time(Some(to))))
        .unwrap_or_default();
    body.push_str(
        r#"<table id="groups"><thead><tr><th>Vendor</th><th>Account</th><th>Reason</th><th>Code</th><th>Error fingerprint</th><th>Count</th><th>Oldest (UTC)</th><th>Newest (UTC)</th><th>Arrivals</th></tr></thead><tbody>"#,
    );
    for g in &index.groups {
        body.push_str(&format!(
            r#"<tr class="group"><td class="vendor">{vendor}</td><td class="account">{account}</td><td class="reason">{reason}</td><td class="code">{code}</td><td class="shape"><a class="group-link" href="/group/{key}">{shape}</a></td><td class="count">{count}</td><td>{oldest}</td><td>{newest}</td><td>{chart}</td></tr>"#,
            vendor = esc(&g.vendor),
            account = esc(&g.account),
            reason = esc(g.reason.as_str()),
            code = esc(g.code.as_deref().unwrap_or("-")),
            key = esc(&g.key),
            shape = esc(if g.shape.is_empty() { "(no error text)" } else { &g.shape }),
            count = g.count,
            oldest = time(g.oldest),
            newest = time(g.newest),
            chart = chart::arrivals(&g.arrivals, &span),
        ));
    }
    body.push_str("</tbody></table>");
    if !span.is_empty() {
        body.push_str(&format!(
            r#"<p class="hint">Charts: deaths per {} of {} UTC.</p>"#,
            esc(&bucket_width(index)),
            esc(&span)
        ));
    }
    layout("Overview", viewer, &body)
}

/// The span one bar covers, in words.
fn bucket_width(index: &Index) -> String {
    let Some((from, to)) = index.span else {
        return String::new();
    };
    let secs =
        ((to - from).num_seconds().max(0) as u64).div_ceil(crate::console::index::BUCKETS as u64);
    humantime::format_duration(std::time::Duration::from_secs(secs.max(1))).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::console::index::Builder;
    use crate::dlq::Coverage;
    use crate::outcome::Reason;

    #[test]
    fn the_overview_lists_groups_with_links_charts_age_and_partial_coverage() {
        let mut builder = Builder::default();
        let mut job =
            crate::console::index::tests::dead("a", Reason::Invalid, "<script>x</script> 12", 100);
        builder.add(&job);
        job.error = "other error".into();
        job.shape = "other error".into();
        builder.add(&job);
        let built = Utc::now();
        let index = builder.finish(
            Coverage {
                expected: 3,
                seen: 2,
                other_consumers: 1,
                stopped: None,
            },
            built,
            Duration::from_millis(1500),
        );
        let viewer = Viewer {
            name: "oncall".into(),
            csrf: Some("tok".into()),
        };
        let page = overview(&index, &viewer, built + chrono::Duration::seconds(7));
        assert_eq!(page.matches(r#"<tr class="group">"#).count(), 2);
        assert!(page.contains(r#"<table id="groups">"#));
        assert!(page.contains(&format!(r#"href="/group/{}""#, index.groups[0].key)));
        assert!(page.contains("<svg class=\"chart\""));
        assert!(
            page.contains(r#"<span id="index-age">7 s</span>"#),
            "{page}"
        );
        assert!(page.contains(r#"id="partial""#) && page.contains("saw 2 of the 3"));
        assert!(!page.contains("<script>x"), "errors are escaped");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"), "{page}");
        assert!(page.contains(r#"action="/refresh""#));
    }
}
