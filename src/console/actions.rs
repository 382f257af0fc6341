//! The action routes: replay and purge previews and runs, edit and replay,
//! and a purge's plan file. Every preview is a dry-run pass; every action runs
//! in a task of its own (so a browser that goes away cannot cut it short),
//! is audited by [`crate::dlq`] under the caller's token name, and rebuilds
//! the index when it is done.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use tracing::info;

use super::Console;
use super::auth::Caller;
use super::index::Index;
use super::page::{self, Viewer, esc};
use super::routes::{Fields, fixed, job_query, problem, viewer};
use crate::audit::Actor;
use crate::broker::Publisher;
use crate::dlq::{self, Action, Plan, Selection, Swept};

/// What an action form selects: the checked copies (`id` fields, their
/// fingerprints), else its group with the `f-` filters.
struct Chosen {
    selection: Selection,
    /// The selection in words, for the preview.
    what: String,
    /// The selection as hidden fields, for the confirmation form.
    hidden: String,
}

fn choose(index: &Index, fields: &Fields) -> Result<Chosen, String> {
    let checked = fields.all("id");
    if !checked.is_empty() {
        let plan = Plan::parse(&checked.join("\n"))
            .map_err(|_| "a checked job is not a fingerprint: reload the group page".to_string())?;
        let hidden = checked
            .iter()
            .map(|fp| format!(r#"<input type="hidden" name="id" value="{}">"#, esc(fp)))
            .collect();
        return Ok(Chosen {
            selection: Selection::Planned(plan),
            what: format!("the {} checked job(s)", checked.len()),
            hidden,
        });
    }
    let key = fields
        .get("group")
        .ok_or("no group and no checked job: choose jobs on a group page")?;
    let group = index.group(key).ok_or(
        "this group is no longer in the index (its jobs were replayed or purged?): refresh the overview",
    )?;
    let (query, _) = job_query(fields, "f-")?;
    let selection = Selection::Matching {
        filter: query.filter(group),
        limit: None,
    };
    let what = format!(
        "every job of group `{}` matching {}",
        group.shape,
        selection.describe().0
    );
    let hidden = page::hidden_fields(key, &fixed(&query));
    Ok(Chosen {
        selection,
        what,
        hidden,
    })
}

/// The index and the form's selection, or the problem page saying why not.
async fn chosen(console: &Console, viewer: &Viewer, fields: &Fields) -> Result<Chosen, Response> {
    let index = console.index().await.map_err(|e| {
        problem(
            console,
            viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "The DLQ could not be read",
            &format!("{e:#}"),
        )
    })?;
    choose(&index, fields).map_err(|why| {
        problem(
            console,
            viewer,
            StatusCode::BAD_REQUEST,
            "Nothing selected",
            &why,
        )
    })
}

pub(super) async fn replay_preview(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let viewer = viewer(&caller);
    let chosen = match chosen(&console, &viewer, &Fields::parse(&body)).await {
        Ok(c) => c,
        Err(page) => return page,
    };
    let actor = Actor::console(caller.name());
    let counted = async {
        let conn = console.conn().await?;
        dlq::sweep(
            &conn,
            &console.names,
            chosen.selection,
            Action::DryRun,
            &actor,
        )
        .await
    };
    match counted.await {
        Ok(swept) => Html(page::replay_preview(
            swept.jobs.len(),
            &chosen.what,
            &chosen.hidden,
            swept.warning().as_deref(),
            &viewer,
        ))
        .into_response(),
        Err(e) => problem(
            &console,
            &viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "Replay",
            &format!("{e:#}"),
        ),
    }
}

pub(super) async fn replay(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let viewer = viewer(&caller);
    let fields = Fields::parse(&body);
    let rate = match fields.text("rate").map(|r| r.parse::<u32>()) {
        None => None,
        Some(Ok(r)) if r >= 1 => Some(r),
        Some(_) => {
            return problem(
                &console,
                &viewer,
                StatusCode::BAD_REQUEST,
                "Replay",
                "the rate must be a whole number of jobs per second, at least 1 (or empty for no limit); nothing was replayed",
            );
        }
    };
    let chosen = match chosen(&console, &viewer, &fields).await {
        Ok(c) => c,
        Err(page) => return page,
    };
    let actor = Actor::console(caller.name());
    let task = tokio::spawn(run_replay(
        Arc::clone(&console),
        chosen.selection,
        rate,
        actor,
    ));
    match task.await.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(swept) => {
            info!(who = %caller.name(), replayed = swept.jobs.len(), "console replay");
            let mut notes: Vec<String> = swept.warning().into_iter().collect();
            if swept.skipped > 0 {
                notes.push(format!(
                    "{} dead copy(ies) of jobs this run had replayed already stay in the DLQ",
                    swept.skipped
                ));
            }
            Html(page::result(
                "Replayed",
                &[
                    ("replayed", swept.jobs.len() as u64),
                    ("skipped", swept.skipped as u64),
                    ("unfound", swept.unfound as u64),
                ],
                &notes,
                None,
                &viewer,
            ))
            .into_response()
        }
        Err(e) => action_failed(&console, &viewer, "Replay failed", &e),
    }
}

fn action_failed(console: &Console, viewer: &Viewer, title: &str, e: &anyhow::Error) -> Response {
    let text = console.scrub(&format!("{e:#}"));
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html(page::result(title, &[], &[], Some(&text), viewer)),
    )
        .into_response()
}

pub(super) async fn purge_preview(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let viewer = viewer(&caller);
    let chosen = match chosen(&console, &viewer, &Fields::parse(&body)).await {
        Ok(c) => c,
        Err(page) => return page,
    };
    let actor = Actor::console(caller.name());
    let listed = async {
        let conn = console.conn().await?;
        dlq::sweep(
            &conn,
            &console.names,
            chosen.selection,
            Action::DryRun,
            &actor,
        )
        .await
    };
    match listed.await {
        Ok(swept) => {
            let text = Plan::render(&swept.jobs, &console.names.dlq(), Utc::now());
            let plan = console.store_plan(caller.owner(), Plan::of(&swept.jobs), text);
            Html(page::purge_preview(
                &plan,
                &swept.jobs,
                &chosen.what,
                swept.warning().as_deref(),
                &viewer,
            ))
            .into_response()
        }
        Err(e) => problem(
            &console,
            &viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "Purge",
            &format!("{e:#}"),
        ),
    }
}

pub(super) async fn purge(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let viewer = viewer(&caller);
    let fields = Fields::parse(&body);
    let Some(plan) = fields
        .get("plan")
        .and_then(|id| console.take_plan(id, &caller.owner()))
    else {
        return problem(
            &console,
            &viewer,
            StatusCode::BAD_REQUEST,
            "Purge",
            "this purge list is unknown, expired (1 h) or already used; nothing was removed: preview the purge again",
        );
    };
    let planned = plan.len();
    let actor = Actor::console(caller.name());
    let task = tokio::spawn(run_purge(Arc::clone(&console), plan, actor));
    match task.await.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(swept) => {
            info!(who = %caller.name(), removed = swept.jobs.len(), "console purge");
            let mut notes: Vec<String> = swept.warning().into_iter().collect();
            if swept.unfound > 0 {
                notes.push(format!(
                    "{} of the {planned} listed job(s) were not in the DLQ (removed, replayed or dead again since the listing); nothing else was removed",
                    swept.unfound
                ));
            }
            Html(page::result(
                "Purged",
                &[
                    ("removed", swept.jobs.len() as u64),
                    ("unfound", swept.unfound as u64),
                ],
                &notes,
                None,
                &viewer,
            ))
            .into_response()
        }
        Err(e) => action_failed(&console, &viewer, "Purge failed", &e),
    }
}

pub(super) async fn plan_file(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match console.plan_text(&id, &caller.owner()) {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no such purge plan (expired or used)\n",
        )
            .into_response(),
    }
}

pub(super) async fn edit(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let viewer = viewer(&caller);
    let fields = Fields::parse(&body);
    let (Some(fingerprint), Some(new_body)) = (fields.text("fingerprint"), fields.get("body"))
    else {
        return problem(
            &console,
            &viewer,
            StatusCode::BAD_REQUEST,
            "Edit",
            "the form needs the job's fingerprint and the edited body: open the job page and edit there",
        );
    };
    let new_body = new_body.as_bytes().to_vec();
    let actor = Actor::console(caller.name());
    let task = tokio::spawn(run_edit(Arc::clone(&console), fingerprint, new_body, actor));
    match task.await.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(edited) => {
            info!(who = %caller.name(), id = %edited.id, "console edit");
            Html(page::result(
                "Edited and replayed",
                &[("replayed", 1), ("removed", 1)],
                &[format!(
                    "job `{}` was sent to lane {} and confirmed by the broker; the original dead copy {} was removed",
                    edited.id, edited.routing_key, edited.original.fingerprint
                )],
                None,
                &viewer,
            ))
            .into_response()
        }
        Err(e) => {
            let text = console.scrub(&format!("{e:#}"));
            let status = if text.contains("nothing was changed") {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                Html(page::result("Edit refused", &[], &[], Some(&text), &viewer)),
            )
                .into_response()
        }
    }
}

/// Replays `selection` at `rate` for `actor`, then rebuilds the index.
async fn run_replay(
    console: Arc<Console>,
    selection: Selection,
    rate: Option<u32>,
    actor: Actor,
) -> anyhow::Result<Swept> {
    let conn = console.conn().await?;
    let publisher = Publisher::open(&conn, console.config.broker.confirm_timeout).await?;
    let swept = dlq::sweep(
        &conn,
        &console.names,
        selection,
        Action::Replay {
            publisher: &publisher,
            rate,
        },
        &actor,
    )
    .await;
    publisher.close().await;
    let _ = console.rebuild().await;
    swept
}

/// Removes exactly the copies of `plan` for `actor`, then rebuilds the index.
async fn run_purge(console: Arc<Console>, plan: Plan, actor: Actor) -> anyhow::Result<Swept> {
    let conn = console.conn().await?;
    let swept = dlq::sweep(
        &conn,
        &console.names,
        Selection::Planned(plan),
        Action::Purge,
        &actor,
    )
    .await;
    let _ = console.rebuild().await;
    swept
}

/// Replaces the dead copy `fingerprint` by `new_body` for `actor`; rebuilds the index if it did.
async fn run_edit(
    console: Arc<Console>,
    fingerprint: String,
    new_body: Vec<u8>,
    actor: Actor,
) -> anyhow::Result<dlq::Edited> {
    let conn = console.conn().await?;
    let publisher = Publisher::open(&conn, console.config.broker.confirm_timeout).await?;
    let edited = dlq::edit_and_replay(
        &conn,
        &console.names,
        &publisher,
        &actor,
        &console.config.rules,
        &fingerprint,
        &new_body,
    )
    .await;
    publisher.close().await;
    if edited.is_ok() {
        let _ = console.rebuild().await;
    }
    edited
}
