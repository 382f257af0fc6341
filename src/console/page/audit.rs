//! `/audit`: the audit stream as one row per action (its start, jobs and end
//! records joined by action id), newest first.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Viewer, esc, layout, time};
use crate::audit::{Action, Outcome, Phase, Record, Source};

/// Ids a row shows before it says how many more.
const IDS_SHOWN: usize = 5;

/// One action as the audit page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActionRow {
    pub action_id: String,
    pub at: DateTime<Utc>,
    pub who: String,
    pub source: Source,
    pub action: Action,
    pub filter: String,
    /// Job ids handled, in order (`-` for a job without one).
    pub ids: Vec<String>,
    /// `None` while the action runs, or when it died before its end was recorded.
    pub outcome: Option<Outcome>,
}

/// Joins records into actions, newest first.
pub fn actions(records: &[Record]) -> Vec<ActionRow> {
    let mut rows: Vec<ActionRow> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for r in records {
        let n = *at.entry(&r.action_id).or_insert_with(|| {
            rows.push(ActionRow {
                action_id: r.action_id.clone(),
                at: r.at,
                who: r.who.clone(),
                source: r.source,
                action: r.action,
                filter: r.filter.clone(),
                ids: Vec::new(),
                outcome: None,
            });
            rows.len() - 1
        });
        let row = &mut rows[n];
        match r.phase {
            Phase::Started => row.at = r.at,
            Phase::Jobs => row.ids.extend(
                r.jobs
                    .iter()
                    .map(|j| j.id.clone().unwrap_or_else(|| "-".into())),
            ),
            Phase::Finished => row.outcome = r.outcome.clone(),
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.at));
    rows
}

fn outcome_text(outcome: &Option<Outcome>) -> String {
    let Some(o) = outcome else {
        return "not finished (running, or stopped before its end was recorded)".into();
    };
    let mut text = format!("done {}", o.done);
    if o.skipped > 0 {
        text.push_str(&format!(", skipped {}", o.skipped));
    }
    if o.unfound > 0 {
        text.push_str(&format!(", not found {}", o.unfound));
    }
    if let Some(w) = &o.warning {
        text.push_str(&format!("; {w}"));
    }
    if let Some(e) = &o.error {
        text.push_str(&format!("; error: {e}"));
    }
    text
}

pub fn audit(rows: &[ActionRow], viewer: &Viewer) -> String {
    let mut body = String::from(
        r#"<h1>Audit</h1><p class="hint">Every replay, purge, edit and import, from the console or the CLI, as recorded in the audit stream.</p>
<table id="audit"><thead><tr><th>When (UTC)</th><th>Who</th><th>From</th><th>Action</th><th>Filter</th><th>Jobs</th><th>Result</th></tr></thead><tbody>"#,
    );
    for r in rows {
        let mut ids: Vec<&str> = r.ids.iter().take(IDS_SHOWN).map(String::as_str).collect();
        let more = r.ids.len().saturating_sub(IDS_SHOWN);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        if ids.is_empty() {
            ids.push("none");
        }
        body.push_str(&format!(
            r#"<tr class="audit-entry"><td>{at}</td><td class="who">{who}</td><td>{source}</td><td class="action">{action}</td><td><code>{filter}</code></td><td class="ids">{n}: {ids}{more}</td><td class="outcome">{outcome}</td></tr>"#,
            at = time(Some(r.at)),
            who = esc(&r.who),
            source = match r.source {
                Source::Cli => "cli",
                Source::Console => "console",
            },
            action = r.action.as_str(),
            filter = esc(&r.filter),
            n = r.ids.len(),
            ids = esc(&ids.join(" ")),
            outcome = esc(&outcome_text(&r.outcome)),
        ));
    }
    body.push_str("</tbody></table>");
    layout("Audit", viewer, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::JobRef;

    fn record(id: &str, phase: Phase, secs: i64) -> Record {
        Record {
            action_id: id.into(),
            phase,
            at: DateTime::from_timestamp(secs, 0).unwrap(),
            who: "oncall".into(),
            source: Source::Console,
            action: Action::Replay,
            filter: "--vendor netease".into(),
            filter_json: serde_json::Value::Null,
            jobs: Vec::new(),
            part: None,
            outcome: None,
        }
    }

    #[test]
    fn records_join_into_one_row_per_action_newest_first() {
        let jobs = |ids: &[&str]| Record {
            jobs: ids
                .iter()
                .map(|i| JobRef {
                    id: Some(i.to_string()),
                    fingerprint: "f".into(),
                })
                .collect(),
            ..record("a", Phase::Jobs, 11)
        };
        let records = vec![
            record("a", Phase::Started, 10),
            jobs(&["j1", "j2", "j3"]),
            jobs(&["j4", "j5", "<j6>"]),
            Record {
                outcome: Some(Outcome {
                    done: 6,
                    ..Outcome::default()
                }),
                ..record("a", Phase::Finished, 12)
            },
            record("b", Phase::Started, 20),
        ];
        let rows = actions(&records);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].action_id, "b", "newest first");
        assert!(rows[0].outcome.is_none());
        assert_eq!(rows[1].ids.len(), 6);
        let viewer = Viewer {
            name: "x".into(),
            csrf: None,
        };
        let html = audit(&rows, &viewer);
        assert_eq!(html.matches(r#"<tr class="audit-entry">"#).count(), 2);
        assert!(html.contains("6: j1 j2 j3 j4 j5 and 1 more"), "{html}");
        assert!(html.contains("done 6") && html.contains("not finished"));
    }
}
