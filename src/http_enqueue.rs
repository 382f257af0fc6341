//! `POST /v1/jobs`: enqueue over HTTP, for producers without an AMQP client.
//!
//! The same checks and the same confirmed publish as `herald enqueue`
//! ([`crate::enqueue`]): the bearer token first, then every job of the body,
//! and only if all pass are they published; 202 goes out once the broker has
//! confirmed every one. The route is served on `http.listen` only when
//! `http.enqueue_token` is set.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::broker::{Publisher, PublisherSlot};
use crate::config::Config;
use crate::enqueue::{self, Checked};
use crate::topology::Names;

pub const PATH: &str = "/v1/jobs";

/// Seconds a client is asked to wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// Everything the route needs; the publisher is present while the worker is connected.
pub struct Intake {
    config: Config,
    names: Names,
    /// SHA-256 of `enqueue_token`, then of `enqueue_token_previous`.
    token_digests: Vec<[u8; 32]>,
    max_body_bytes: usize,
    publisher: PublisherSlot,
}

impl Intake {
    /// `None` when `http.enqueue_token` is unset: the route is then not served.
    pub fn from_config(config: &Config) -> Option<Arc<Self>> {
        let http = &config.http;
        let token = http.enqueue_token.as_ref()?;
        let token_digests = std::iter::once(token)
            .chain(http.enqueue_token_previous.as_ref())
            .map(|t| Sha256::digest(t.expose().as_bytes()).into())
            .collect();
        Some(Arc::new(Self {
            config: config.clone(),
            names: Names::new(&config.broker.prefix),
            token_digests,
            max_body_bytes: http.enqueue_max_bytes,
            publisher: PublisherSlot::default(),
        }))
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn set_publisher(&self, publisher: Option<Publisher>) {
        self.publisher.set(publisher);
    }

    /// Whether `Authorization` carries a configured token. Digests are compared,
    /// in constant time, so neither the content nor the length of a token leaks.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
        else {
            return false;
        };
        let given = Sha256::digest(given.as_bytes());
        crate::constant_time::matches_any(&given, &self.token_digests)
    }
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// How the body is split into jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// One job.
    Json,
    /// One job per line, or several concatenated JSON documents.
    Ndjson,
}

fn format(headers: &HeaderMap) -> Option<Format> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next()?.trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Some(Format::Json)
    } else if essence.eq_ignore_ascii_case("application/x-ndjson") {
        Some(Format::Ndjson)
    } else {
        None
    }
}

fn count(result: &'static str, jobs: usize) {
    metrics::counter!(crate::metrics::HTTP_ENQUEUE_JOBS.name, "result" => result)
        .increment(jobs as u64);
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    metrics::counter!(crate::metrics::HTTP_ENQUEUE_REQUESTS.name, "status" => status.as_str().to_string())
        .increment(1);
    (status, Json(body)).into_response()
}

fn unavailable(body: serde_json::Value) -> Response {
    let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, body);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

fn ids<'a>(jobs: impl IntoIterator<Item = &'a Checked>) -> Vec<&'a str> {
    jobs.into_iter().map(|c| c.job.id.as_str()).collect()
}

pub async fn handle(State(intake): State<Arc<Intake>>, request: Request) -> Response {
    // Nothing of the request but its head is read before the token is checked.
    if !intake.authorized(request.headers()) {
        debug!("POST {PATH} refused: missing or wrong bearer token");
        let mut response = answer(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong bearer token"}),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let Some(format) = format(request.headers()) else {
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({"error": "send Content-Type: application/json (one job) or application/x-ndjson (one job per line)"}),
        );
    };
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!(
                    "the body is larger than http.enqueue_max_bytes ({} bytes); send fewer jobs per request",
                    intake.max_body_bytes
                )}),
            );
        }
        Err(rejection) => {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("cannot read the body: {}", rejection.body_text()), "jobs": []}),
            );
        }
    };

    let batch = enqueue::check_batch(&body, &intake.config);
    let mut rejected: Vec<_> = batch
        .rejected
        .iter()
        .map(|(n, e)| json!({"index": n, "error": e}))
        .collect();
    if format == Format::Json && batch.checked.len() + batch.rejected.len() > 1 {
        // What comes after the one job is not a job of this request: say so, once.
        rejected.retain(|r| r["index"] == 1);
        rejected.push(json!({
            "index": 2,
            "error": "application/json carries one job; send several as application/x-ndjson",
        }));
    }
    if batch.checked.is_empty() && rejected.is_empty() {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "the body holds no job", "jobs": []}),
        );
    }
    if !rejected.is_empty() {
        count("invalid", batch.rejected.len());
        count("withheld", batch.checked.len());
        info!(
            invalid = batch.rejected.len(),
            valid = batch.checked.len(),
            "POST {PATH}: batch refused; nothing published"
        );
        return answer(
            StatusCode::BAD_REQUEST,
            json!({
                "error": format!("{} job(s) failed the checks; nothing was published", rejected.len()),
                "jobs": rejected,
            }),
        );
    }

    let jobs = batch.checked;
    let publisher = intake.publisher.get();
    let Some(publisher) = publisher else {
        count("unavailable", jobs.len());
        return unavailable(json!({
            "error": "not connected to the broker; nothing was published, retry later",
            "confirmed": [],
            "unconfirmed": ids(&jobs),
        }));
    };
    if publisher.is_blocked() {
        // A publish would wait for the alarm to end, past any client's timeout.
        count("unavailable", jobs.len());
        return unavailable(json!({
            "error": "the broker is blocking publishers (a memory or disk alarm); nothing was published, retry later",
            "confirmed": [],
            "unconfirmed": ids(&jobs),
        }));
    }
    let published = enqueue::publish_each(&publisher, &intake.names, &jobs).await;
    if let Some(e) = published.error {
        let (confirmed, unconfirmed): (Vec<_>, Vec<_>) = jobs
            .iter()
            .zip(&published.confirmed)
            .partition(|(_, ok)| **ok);
        count("accepted", confirmed.len());
        count("unavailable", unconfirmed.len());
        warn!(
            error = %e,
            confirmed = confirmed.len(),
            unconfirmed = unconfirmed.len(),
            "POST {PATH}: the broker did not confirm every job"
        );
        return unavailable(json!({
            "error": format!("the broker did not confirm every job ({e}); retry the unconfirmed ones, with the same ids"),
            "confirmed": ids(confirmed.into_iter().map(|(c, _)| c)),
            "unconfirmed": ids(unconfirmed.into_iter().map(|(c, _)| c)),
        }));
    }
    count("accepted", jobs.len());
    debug!(jobs = jobs.len(), "POST {PATH}: published and confirmed");
    answer(StatusCode::ACCEPTED, json!({"ids": ids(&jobs)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake(token: &str, previous: Option<&str>) -> Arc<Intake> {
        let previous = previous
            .map(|p| format!("enqueue_token_previous = \"{p}\"\n"))
            .unwrap_or_default();
        let config = Config::parse(
            &format!(
                "[broker]\nurl = \"amqp://127.0.0.1\"\n[http]\nenqueue_token = \"{token}\"\n{previous}"
            ),
            Vec::new(),
        )
        .unwrap();
        Intake::from_config(&config).unwrap()
    }

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[test]
    fn only_a_configured_bearer_token_is_authorized() {
        let i = intake(
            "current-token-0123456789",
            Some("previous-token-0123456789"),
        );
        assert!(i.authorized(&headers("Bearer current-token-0123456789")));
        assert!(i.authorized(&headers("bearer previous-token-0123456789")));
        assert!(!i.authorized(&headers("Bearer current-token-012345678")));
        assert!(!i.authorized(&headers("Basic current-token-0123456789")));
        assert!(!i.authorized(&headers("current-token-0123456789")));
        assert!(!i.authorized(&headers("Bearer ")));
        assert!(!i.authorized(&HeaderMap::new()));
    }

    #[test]
    fn content_types_choose_one_job_or_many() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            format(&h)
        };
        assert_eq!(with("application/json"), Some(Format::Json));
        assert_eq!(with("Application/JSON; charset=utf-8"), Some(Format::Json));
        assert_eq!(with("application/x-ndjson"), Some(Format::Ndjson));
        assert_eq!(with("text/plain"), None);
        assert_eq!(format(&HeaderMap::new()), None);
    }
}
