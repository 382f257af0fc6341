//! The console's routes: the public ones (`/login`, `/healthz`, `/static/…`)
//! and, behind [`guard`], every page, action and API route.
//!
//! Handlers gather data through [`Console`] and [`crate::dlq`], then render
//! with [`page`]; every action runs in a task of its own, so a browser that
//! goes away cannot cut a replay or purge short.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use chrono::Utc;
use tracing::info;

use super::auth::{self, Caller, Decision, Facts};
use super::index::{GroupSummary, JobQuery, JobSummary, Page};
use super::page::{self, Viewer};
use super::{Console, actions};
use crate::audit::Actor;
use crate::dlq::{self, Action, Selection};

/// Largest form accepted: an edited body (64 KiB by default) with room to spare.
const MAX_FORM_BYTES: usize = 1024 * 1024;
/// Audit records read for the audit page (the newest).
const AUDIT_RECORDS: usize = 5000;
/// Actions the audit page shows.
const AUDIT_ROWS: usize = 200;
const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

pub fn router(console: Arc<Console>) -> Router {
    let protected = Router::new()
        .route("/", get(overview))
        .route("/refresh", post(refresh))
        .route("/logout", post(logout))
        .route("/group/{key}", get(group))
        .route("/job/{handle}", get(job))
        .route("/actions/replay/preview", post(actions::replay_preview))
        .route("/actions/replay", post(actions::replay))
        .route("/actions/purge/preview", post(actions::purge_preview))
        .route("/actions/purge", post(actions::purge))
        .route("/actions/edit", post(actions::edit))
        .route("/plan/{id}", get(actions::plan_file))
        .route("/audit", get(audit))
        .route("/api/groups", get(api_groups))
        .route("/api/group/{key}", get(api_group))
        .route("/api/job/{handle}", get(api_job))
        .route("/api/audit", get(api_audit))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&console), guard));
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .merge(protected)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(middleware::from_fn(hardened))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(console)
}

/// Headers every answer carries: no framing, no sniffing, no caching, no
/// referrer to other sites, and a policy that runs only the console's own script.
/// `same-origin`, not `no-referrer`: under `no-referrer` Chromium sends
/// `Origin: null` with a form's POST, which the same-origin rule must refuse
/// (tests/console_browser.rs caught it at the login form).
async fn hardened(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    response
}

fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Lets in a session (with its CSRF token on a POST) or a bearer token; a
/// page without either redirects to `/login`, an API call gets 401. No data
/// is read before this passes.
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let h = &parts.headers;
    let post = parts.method == axum::http::Method::POST;
    let bearer = header_text(h, header::AUTHORIZATION)
        .map(|value| auth::bearer(value).and_then(|t| console.tokens.name_of(t)));
    let session = header_text(h, header::COOKIE)
        .and_then(|c| auth::cookie(c, auth::COOKIE))
        .and_then(|id| console.sessions.get(id, Instant::now()));
    let same_origin = auth::same_origin(
        header_text(h, header::ORIGIN),
        header_text(h, header::HOST),
        header_text(h, "sec-fetch-site"),
    );
    let needs_csrf = post && bearer.is_none() && session.is_some();
    // A session's POST is read here for its CSRF field, then handed on whole.
    let (body, bytes) = if needs_csrf {
        match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
            Ok(b) => (None, b),
            Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "form too large\n").into_response(),
        }
    } else {
        (Some(body), Bytes::new())
    };
    let fields = Fields::parse(&bytes);
    let decision = auth::decide(Facts {
        post,
        api: parts.uri.path().starts_with("/api/"),
        bearer,
        session,
        same_origin,
        csrf: fields.get("csrf"),
    });
    match decision {
        Decision::Allow(caller) => {
            parts.extensions.insert(caller);
            let body = body.unwrap_or_else(|| Body::from(bytes));
            next.run(Request::from_parts(parts, body)).await
        }
        Decision::Login => (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, "/login")],
            "log in first\n",
        )
            .into_response(),
        Decision::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid console token is required: log in, or send Authorization: Bearer <token>\n",
        )
            .into_response(),
        Decision::Forbidden(why) => (StatusCode::FORBIDDEN, format!("{why}\n")).into_response(),
    }
}

/// A form or query string's fields, repeated names kept (checkboxes).
pub(super) struct Fields(Vec<(String, String)>);

impl Fields {
    pub(super) fn parse(bytes: &[u8]) -> Self {
        Self(url::form_urlencoded::parse(bytes).into_owned().collect())
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`, trimmed, when it is not empty.
    pub(super) fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
    }

    pub(super) fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

pub(super) fn viewer(caller: &Caller) -> Viewer {
    Viewer {
        name: caller.name().to_string(),
        csrf: caller.csrf().map(String::from),
    }
}

/// An error page with `text` scrubbed of every secret.
pub(super) fn problem(
    console: &Console,
    viewer: &Viewer,
    status: StatusCode,
    title: &str,
    text: &str,
) -> Response {
    let text = console.scrub(text);
    (status, Html(page::problem(viewer, title, &text))).into_response()
}

fn api_problem(console: &Console, status: StatusCode, text: &str) -> Response {
    let text = console.scrub(text);
    (status, Json(serde_json::json!({ "error": text }))).into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        JS,
    )
        .into_response()
}

async fn login_form() -> Html<String> {
    Html(page::login(None))
}

/// Trades a token for a session. The token is compared with every configured
/// one in constant time and never logged; only its name is.
async fn login(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let same_origin = auth::same_origin(
        header_text(&headers, header::ORIGIN),
        header_text(&headers, header::HOST),
        header_text(&headers, "sec-fetch-site"),
    );
    if !same_origin {
        return (StatusCode::FORBIDDEN, "cross-origin request refused\n").into_response();
    }
    let fields = Fields::parse(&body);
    match fields.get("token").and_then(|t| console.tokens.name_of(t)) {
        Some(name) => {
            let session = console.sessions.create(&name, Instant::now());
            info!(who = %name, "console login");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_string()),
                    (header::SET_COOKIE, auth::session_cookie(&session.id)),
                ],
            )
                .into_response()
        }
        None => {
            info!("console login refused: not a configured token");
            (
                StatusCode::UNAUTHORIZED,
                Html(page::login(Some(
                    "That is not one of the console's tokens. Nothing was logged in.",
                ))),
            )
                .into_response()
        }
    }
}

async fn logout(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    if let Caller::Session(session) = &caller {
        console.sessions.remove(&session.id);
        info!(who = %session.name, "console logout");
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_string()),
            (header::SET_COOKIE, auth::cleared_cookie()),
        ],
    )
        .into_response()
}

async fn overview(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let viewer = viewer(&caller);
    match console.index().await {
        Ok(index) => Html(page::overview(&index, &viewer, Utc::now())).into_response(),
        Err(e) => problem(
            &console,
            &viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "The DLQ could not be read",
            &format!("{e:#}"),
        ),
    }
}

async fn refresh(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    match console.rebuild().await {
        Ok(_) => see_other("/"),
        Err(e) => problem(
            &console,
            &viewer(&caller),
            StatusCode::SERVICE_UNAVAILABLE,
            "The DLQ could not be read",
            &format!("{e:#}"),
        ),
    }
}

/// The filters of a group page (or of an action form, whose fields carry
/// `prefix`), and the set ones as given. Times are RFC 3339 or a duration ago.
pub(super) fn job_query(
    fields: &Fields,
    prefix: &str,
) -> Result<(JobQuery, Vec<(String, String)>), String> {
    let mut given = Vec::new();
    let mut text = |name: &str| {
        let value = fields.text(&format!("{prefix}{name}"));
        if let Some(v) = &value {
            given.push((name.to_string(), v.clone()));
        }
        value
    };
    let now = Utc::now();
    let time = |t: Option<String>| t.map(|t| dlq::parse_time(&t, now)).transpose();
    let query = JobQuery {
        id: text("id"),
        recipient: text("recipient"),
        key: text("key"),
        text: text("text"),
        since: time(text("since"))?,
        until: time(text("until"))?,
    };
    Ok((query, given))
}

/// The query with its times fixed as RFC 3339: what an action's confirmation carries.
pub(super) fn fixed(query: &JobQuery) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut put = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push((name.to_string(), v));
        }
    };
    put("id", query.id.clone());
    put("recipient", query.recipient.clone());
    put("key", query.key.clone());
    put("text", query.text.clone());
    put("since", query.since.map(|t| t.to_rfc3339()));
    put("until", query.until.map(|t| t.to_rfc3339()));
    out
}

/// A group's page of jobs: from the index, or for a text search from a pass
/// over the DLQ (bodies are not in the index). `Err` is (status, why).
async fn group_page(
    console: &Console,
    caller: &Caller,
    key: &str,
    fields: &Fields,
) -> Result<
    (
        GroupSummary,
        Vec<(String, String)>,
        Page,
        Option<Option<String>>,
    ),
    (StatusCode, String),
> {
    let index = console
        .index()
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    let group = index.group(key).cloned().ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            "no such group in the index: its jobs may have been replayed or purged; refresh the overview".to_string(),
        )
    })?;
    let (query, given) = job_query(fields, "").map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let page_no = fields
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1);
    if query.text.is_none() {
        let page = Page::of(index.members(&group, &query), page_no);
        return Ok((group, given, page, None));
    }
    let conn = console
        .conn()
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    let selection = Selection::Matching {
        filter: query.filter(&group),
        limit: None,
    };
    let actor = Actor::console(caller.name());
    let swept = dlq::sweep(&conn, &console.names, selection, Action::DryRun, &actor)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    let found: Vec<JobSummary> = swept.jobs.iter().map(JobSummary::of).collect();
    let page = Page::of(found.iter(), page_no);
    Ok((group, given, page, Some(swept.warning())))
}

async fn group(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let viewer = viewer(&caller);
    let fields = Fields::parse(query.unwrap_or_default().as_bytes());
    match group_page(&console, &caller, &key, &fields).await {
        Ok((group, given, page, searched)) => {
            Html(page::group(&group, &given, &page, searched, &viewer)).into_response()
        }
        Err((status, why)) => problem(&console, &viewer, status, "Group", &why),
    }
}

async fn api_group(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let fields = Fields::parse(query.unwrap_or_default().as_bytes());
    match group_page(&console, &caller, &key, &fields).await {
        Ok((group, _, page, searched)) => Json(serde_json::json!({
            "group": group,
            "page": page,
            "searched": searched.is_some(),
            "warning": searched.flatten(),
        }))
        .into_response(),
        Err((status, why)) => api_problem(&console, status, &why),
    }
}

/// The copies of one job, read from the DLQ (stopping once the index's count is found).
async fn find(
    console: &Console,
    handle: &str,
) -> anyhow::Result<(Vec<page::JobDetail>, Option<String>)> {
    let expected = console.current().map_or(0, |i| i.copies(handle));
    console.find(handle, expected).await
}

async fn job(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(handle): Path<String>,
) -> Response {
    let viewer = viewer(&caller);
    match find(&console, &handle).await {
        Ok((copies, warning)) if copies.is_empty() => problem(
            &console,
            &viewer,
            StatusCode::NOT_FOUND,
            "Job",
            &format!(
                "no dead job `{handle}` is in the DLQ (replayed, purged or edited since it was listed?){}",
                warning.map(|w| format!(" {w}")).unwrap_or_default()
            ),
        ),
        Ok((copies, warning)) => {
            Html(page::job(&handle, &copies, warning.as_deref(), &viewer)).into_response()
        }
        Err(e) => problem(
            &console,
            &viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "Job",
            &format!("{e:#}"),
        ),
    }
}

async fn api_job(State(console): State<Arc<Console>>, Path(handle): Path<String>) -> Response {
    match find(&console, &handle).await {
        Ok((copies, _)) if copies.is_empty() => api_problem(
            &console,
            StatusCode::NOT_FOUND,
            &format!("no dead job `{handle}` is in the DLQ"),
        ),
        Ok((copies, warning)) => {
            Json(serde_json::json!({ "copies": copies, "warning": warning })).into_response()
        }
        Err(e) => api_problem(&console, StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

async fn audit_rows(console: &Console) -> anyhow::Result<Vec<page::ActionRow>> {
    let conn = console.conn().await?;
    let records = crate::audit::read(&conn, &console.names, None, AUDIT_RECORDS).await?;
    let mut rows = page::actions(&records);
    rows.truncate(AUDIT_ROWS);
    Ok(rows)
}

async fn audit(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let viewer = viewer(&caller);
    match audit_rows(&console).await {
        Ok(rows) => Html(page::audit(&rows, &viewer)).into_response(),
        Err(e) => problem(
            &console,
            &viewer,
            StatusCode::SERVICE_UNAVAILABLE,
            "Audit",
            &format!("{e:#}"),
        ),
    }
}

async fn api_audit(State(console): State<Arc<Console>>) -> Response {
    match audit_rows(&console).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => api_problem(&console, StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

async fn api_groups(State(console): State<Arc<Console>>) -> Response {
    match console.index().await {
        Ok(index) => Json(serde_json::json!({
            "built_at": index.built_at,
            "age_seconds": (Utc::now() - index.built_at).num_seconds().max(0),
            "took_ms": index.took.as_millis() as u64,
            "complete": index.coverage.is_complete(),
            "warning": index.coverage.warning(),
            "total": index.total(),
            "groups": index.groups,
        }))
        .into_response(),
        Err(e) => api_problem(&console, StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}
