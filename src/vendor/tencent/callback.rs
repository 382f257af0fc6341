//! `POST /callbacks/tencent`: Tencent's `Group.CallbackSendMsgException`.
//!
//! Tencent posts here when a group message it had accepted failed later (seed
//! 002, e.g. ErrorCode 10023 "msg count exceeds limit, please retry later").
//! A callback makes herald send through an admin account, so it must prove two
//! things before anything is rebuilt or scheduled:
//! - it comes from Tencent: `Sign` (SHA-256 of the callback token and
//!   `RequestTime`), unless the account explicitly opted out;
//! - it is about a message herald sent: the MAC herald put in
//!   `CloudCustomData`, keyed with `callback_key`, which Tencent never sees,
//!   over the job, the attempt and the send time. A signed URL replayed with
//!   another body fails here; an old body fails the age check.
//!
//! Then the job goes (confirmed) to the next retry tier or the DLQ, by
//! [`decide_late_failure`], and Tencent gets `{"ActionStatus":"OK",…}`. No
//! vendor is called while Tencent waits. A callback seen before (same app,
//! job and attempt) is answered OK and not scheduled again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use tracing::{debug, info, warn};

use axum::extract::DefaultBodyLimit;
use axum::http::Method;

use crate::broker::PublisherSlot;
use crate::callback::CallbackSpec;
use crate::config::{Config, Secret};
use crate::envelope::Failure;
use crate::http::Route;
use crate::job::Job;
use crate::outcome::{Class, Policy, decide_late_failure, is_expired};
use crate::schedule::schedule;
use crate::topology::Names;
use crate::vendor::tencent::{
    self, CALLBACK_COMMAND, CALLBACK_MAX_AGE, CallbackSettings, CallbackVerdict, SendMsgException,
};

pub const PATH: &str = "/callbacks/tencent";

/// 408 comes from the request timeout of every listener ([`crate::http::spawn`]).
pub const ROUTE: Route = Route {
    method: Method::POST,
    path: PATH,
    statuses: &[200, 400, 401, 403, 408, 413, 503],
};

/// Tencent's side of the callback seam: [`super::SPEC`] names it.
pub const SPEC: CallbackSpec = CallbackSpec {
    route: &ROUTE,
    takes_callbacks: |account| account.credentials.get("callback_key").is_some(),
    router,
};

/// `POST /callbacks/tencent`, with its own body limit (the route meant for the
/// internet), when a Tencent account of `config` takes callbacks.
fn router(config: &Config, publisher: Arc<PublisherSlot>) -> anyhow::Result<Option<Router>> {
    Ok(
        FailureCallbacks::from_config(config, publisher)?.map(|callbacks| {
            crate::http::serve(Router::new(), &ROUTE, handle)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
                .with_state(callbacks)
        }),
    )
}

/// Largest callback body read; a Tencent message is at most 12 KB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Callbacks remembered at once. Past this, new ones are answered 503 (Tencent
/// retries) rather than forgetting one early and scheduling it twice.
const MAX_REMEMBERED: usize = 100_000;

/// A callback is remembered as long as one for the same attempt can still pass
/// the age check (with the minute of clock skew it tolerates).
const REMEMBER_FOR: Duration = Duration::from_secs(CALLBACK_MAX_AGE.as_secs() + 60);

struct Account {
    sdk_app_id: u64,
    name: String,
    /// Empty: unsigned callbacks were explicitly allowed.
    tokens: Vec<Secret>,
    keys: Vec<Secret>,
    policy: Policy,
}

/// The callbacks already scheduled, bounded in number and in time.
#[derive(Default)]
struct Remembered {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

enum Seen {
    First,
    Again,
    Full,
}

impl Remembered {
    fn mark(&mut self, key: &str, now: Instant, ttl: Duration, capacity: usize) -> Seen {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < ttl {
                break;
            }
            let (at, old) = self.order.pop_front().expect("front exists");
            // A key forgotten and marked again has a newer time: keep that one.
            if self.at.get(&old) == Some(&at) {
                self.at.remove(&old);
            }
        }
        if self.at.contains_key(key) {
            return Seen::Again;
        }
        // Forgotten keys stay queued until they expire: bound the queue itself.
        if self.order.len() >= capacity {
            return Seen::Full;
        }
        self.at.insert(key.to_string(), now);
        self.order.push_back((now, key.to_string()));
        Seen::First
    }

    fn forget(&mut self, key: &str) {
        self.at.remove(key);
    }
}

/// Everything the callback route needs; the publisher is present while the worker is connected.
struct FailureCallbacks {
    accounts: Vec<Account>,
    names: Names,
    max_job_bytes: usize,
    publisher: Arc<PublisherSlot>,
    seen: Mutex<Remembered>,
}

impl FailureCallbacks {
    /// `None` when no Tencent account takes callbacks: the route is then not served.
    fn from_config(
        config: &Config,
        publisher: Arc<PublisherSlot>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let mut accounts = Vec::new();
        for a in config
            .accounts
            .iter()
            .filter(|a| a.vendor == tencent::SPEC.id)
        {
            let settings = CallbackSettings::from_account(a)?;
            if !settings.enabled() {
                continue;
            }
            if settings.unsigned() {
                warn!(
                    account = %a.name,
                    "callback_unsigned = true: callbacks for this account are taken without Tencent's Sign; only callback_key protects the admin account"
                );
            }
            let sdk_app_id = tencent::sdk_app_id(a)?;
            if let Some(first) = accounts
                .iter()
                .find(|b: &&Account| b.sdk_app_id == sdk_app_id)
            {
                // Tencent posts one callback per app: only one account can take it.
                warn!(
                    sdk_app_id,
                    taken_by = %first.name,
                    ignored = %a.name,
                    "two tencent accounts with one SdkAppid take callbacks; the first one gets them"
                );
                continue;
            }
            accounts.push(Account {
                sdk_app_id,
                name: a.name.clone(),
                tokens: settings.tokens,
                keys: settings.keys,
                policy: config.policy_for(a),
            });
        }
        Ok((!accounts.is_empty()).then(|| {
            Arc::new(Self {
                accounts,
                names: Names::new(&config.broker.prefix),
                max_job_bytes: config.worker.max_job_bytes,
                publisher,
                seen: Mutex::default(),
            })
        }))
    }

    fn mark(&self, key: &str) -> Seen {
        self.seen.lock().expect("dedupe lock").mark(
            key,
            Instant::now(),
            REMEMBER_FOR,
            MAX_REMEMBERED,
        )
    }

    fn forget(&self, key: &str) {
        self.seen.lock().expect("dedupe lock").forget(key);
    }

    /// The account a request is signed for, or why not. Every failure gets the
    /// same answer, so a caller learns nothing about which SdkAppids exist.
    fn authenticate_request(&self, q: &HashMap<String, String>) -> Result<usize, String> {
        let app_id = q
            .get("SdkAppid")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("SdkAppid is missing or not a number")?;
        let index = self
            .accounts
            .iter()
            .position(|a| a.sdk_app_id == app_id)
            .ok_or_else(|| format!("SdkAppid {app_id} takes no callbacks here"))?;
        let account = &self.accounts[index];
        if !account.tokens.is_empty() {
            let tokens: Vec<&str> = account.tokens.iter().map(Secret::expose).collect();
            tencent::verify_callback(
                &tokens,
                q.get("Sign").map(String::as_str),
                q.get("RequestTime").map(String::as_str),
                Utc::now().timestamp().max(0) as u64,
            )?;
        }
        Ok(index)
    }
}

fn ok() -> Response {
    Json(json!({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})).into_response()
}

fn count(account: &str, result: &str) {
    crate::metrics::callback(account, result, "none", 1);
}

/// Answers a refused callback that passed authentication: counted, logged, explained.
fn refuse(account: &str, status: StatusCode, result: &str, why: &str) -> Response {
    count(account, result);
    warn!(
        account,
        status = status.as_u16(),
        result,
        why,
        "tencent callback refused"
    );
    answer(status, why)
}

fn answer(status: StatusCode, why: &str) -> Response {
    (
        status,
        Json(json!({"ActionStatus": "FAIL", "ErrorCode": status.as_u16(), "ErrorInfo": why})),
    )
        .into_response()
}

/// A callback that proved it is about attempt `attempt` of a job herald sent.
struct Verified {
    job: Job,
    /// The job as published: the contract's JSON.
    body: Vec<u8>,
    attempt: u32,
    class: Class,
    error_code: i64,
    error_info: String,
}

async fn handle(
    State(callbacks): State<Arc<FailureCallbacks>>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let index = match callbacks.authenticate_request(&query) {
        Ok(index) => index,
        Err(why) => {
            // Anyone can knock: counted, and logged only at debug so it cannot flood the logs.
            count("-", "unauthorized");
            debug!(why, "tencent callback refused: not authenticated");
            return answer(StatusCode::UNAUTHORIZED, "callback not authenticated");
        }
    };
    let account = &callbacks.accounts[index].name;
    // The body is read only once the request is authenticated (and bounded by
    // the route's DefaultBodyLimit).
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) => {
            count(account, "rejected");
            return rejection.into_response();
        }
    };
    let verified = match callbacks.verify(index, &query, &body) {
        Ok(Some(verified)) => verified,
        Ok(None) => {
            count(account, "foreign");
            info!(
                account,
                "callback for a message herald did not send; ignored"
            );
            return ok();
        }
        Err(refused) => return *refused,
    };
    // Marked as seen, a callback must reach the broker or be forgotten: run
    // in its own task, so a request timeout cannot drop it half-way.
    let task = tokio::spawn(Arc::clone(&callbacks).schedule_once(index, verified));
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "tencent callback task failed");
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; retry the callback",
        )
    })
}

impl FailureCallbacks {
    /// Parses, rebuilds and authenticates the callback of account `index`:
    /// `None` for a message herald did not send, `Err` with the answer when refused.
    fn verify(
        &self,
        index: usize,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Result<Option<Verified>, Box<Response>> {
        let account = &self.accounts[index];
        let name = account.name.as_str();
        if query.get("CallbackCommand").map(String::as_str) != Some(CALLBACK_COMMAND) {
            let why = "unsupported CallbackCommand; herald serves Group.CallbackSendMsgException";
            return Err(refuse(name, StatusCode::BAD_REQUEST, "rejected", why).into());
        }
        let event: SendMsgException = serde_json::from_slice(body).map_err(|e| {
            let why = format!("malformed callback body: {e}");
            refuse(name, StatusCode::BAD_REQUEST, "rejected", &why)
        })?;
        if event.command != CALLBACK_COMMAND {
            let why = "body CallbackCommand is not Group.CallbackSendMsgException";
            return Err(refuse(name, StatusCode::BAD_REQUEST, "rejected", why).into());
        }
        let (job, attempt, class, seal) = match tencent::rebuild(&event) {
            Ok(CallbackVerdict::Job {
                job,
                attempt,
                class,
                seal,
            }) => (*job, attempt, class, seal),
            Ok(CallbackVerdict::Foreign) => return Ok(None),
            Err(why) => return Err(refuse(name, StatusCode::BAD_REQUEST, "rejected", &why).into()),
        };
        let keys: Vec<&str> = account.keys.iter().map(Secret::expose).collect();
        let now = Utc::now().timestamp().max(0) as u64;
        if let Err(forgery) = tencent::authenticate(&job, attempt, seal.as_ref(), &keys, now) {
            count(name, "forged");
            warn!(
                account = name,
                check = forgery.as_str(),
                "tencent callback refused: herald did not seal this message; nothing scheduled"
            );
            return Err(answer(StatusCode::FORBIDDEN, "callback content not authenticated").into());
        }
        if job.account != account.name {
            let why = "CloudCustomData names another account than SdkAppid";
            return Err(refuse(name, StatusCode::BAD_REQUEST, "rejected", why).into());
        }
        // What is published must be a job the lane accepts: `rebuild` held it to
        // the contract's fields; the size limit is the worker's.
        let body = serde_json::to_vec(&job).expect("a job serializes");
        if let Err(e) = crate::job::check_size(body.len(), self.max_job_bytes) {
            let why = format!("the rebuilt job breaks the contract: {e}");
            return Err(refuse(name, StatusCode::BAD_REQUEST, "rejected", &why).into());
        }
        Ok(Some(Verified {
            job,
            body,
            attempt,
            class,
            error_code: event.error_code,
            error_info: event.error_info,
        }))
    }

    /// Publishes the retry or dead-letter copy once per app, job and attempt.
    async fn schedule_once(self: Arc<Self>, index: usize, v: Verified) -> Response {
        let account = &self.accounts[index];
        let name = account.name.as_str();
        let key = format!("{}/{}/{}", account.sdk_app_id, v.job.id, v.attempt);
        match self.mark(&key) {
            Seen::First => {}
            Seen::Again => {
                count(name, "duplicate");
                info!(id = %v.job.id, attempt = v.attempt, "duplicate callback; already scheduled");
                return ok();
            }
            Seen::Full => {
                let why = "too many callbacks in the last minutes; retry the callback";
                return refuse(name, StatusCode::SERVICE_UNAVAILABLE, "busy", why);
            }
        }
        let publisher = self.publisher.get();
        let Some(publisher) = publisher else {
            self.forget(&key);
            let why = "not connected to the broker; retry the callback";
            return refuse(name, StatusCode::SERVICE_UNAVAILABLE, "unavailable", why);
        };
        let now = Utc::now();
        let destination = decide_late_failure(
            v.class,
            v.attempt,
            is_expired(v.job.expires_at, now),
            &account.policy,
        );
        let error = format!("tencent callback {} {}", v.error_code, v.error_info);
        let code = v.error_code.to_string();
        let failure = Failure {
            attempts: v.attempt,
            first_seen: now,
            code: Some(&code),
            error: &error,
            now,
        };
        let routing_key = v.job.routing_key();
        let properties = crate::enqueue::properties(&v.job);
        let published = schedule(
            &publisher,
            &self.names,
            destination,
            &routing_key,
            &v.body,
            &properties,
            &failure,
        )
        .await;
        if let Err(e) = published {
            self.forget(&key);
            let why = format!("could not schedule the job: {e}");
            return refuse(name, StatusCode::SERVICE_UNAVAILABLE, "unavailable", &why);
        }
        let (result, reason) = destination.labels();
        info!(id = %v.job.id, attempt = v.attempt, code = v.error_code, result, reason, "tencent send failure handled");
        crate::metrics::callback(name, result, reason, 1);
        ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_is_remembered_for_its_window_then_forgotten() {
        let mut seen = Remembered::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        assert!(matches!(seen.mark("a", t0, ttl, 10), Seen::First));
        assert!(matches!(seen.mark("a", t0 + ttl / 2, ttl, 10), Seen::Again));
        assert!(matches!(seen.mark("a", t0 + ttl, ttl, 10), Seen::First));
        assert_eq!(seen.order.len(), 1, "expired entries leave the queue");
    }

    #[test]
    fn when_full_a_new_callback_is_refused_not_an_old_one_forgotten() {
        let mut seen = Remembered::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        assert!(matches!(seen.mark("a", t0, ttl, 2), Seen::First));
        assert!(matches!(seen.mark("b", t0, ttl, 2), Seen::First));
        assert!(matches!(seen.mark("c", t0, ttl, 2), Seen::Full));
        assert!(matches!(seen.mark("a", t0, ttl, 2), Seen::Again));
        assert!(matches!(seen.mark("c", t0 + ttl, ttl, 2), Seen::First));
    }

    #[test]
    fn forgotten_keys_count_toward_the_cap_until_they_expire() {
        let mut seen = Remembered::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        for _ in 0..3 {
            if matches!(seen.mark("a", t0, ttl, 3), Seen::First) {
                seen.forget("a");
            }
        }
        assert!(matches!(seen.mark("b", t0, ttl, 3), Seen::Full));
        assert!(matches!(seen.mark("b", t0 + ttl, ttl, 3), Seen::First));
    }

    #[test]
    fn a_forgotten_and_re_marked_key_outlives_its_first_expiry() {
        let mut seen = Remembered::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        seen.mark("a", t0, ttl, 10);
        seen.forget("a");
        seen.mark("a", t0 + Duration::from_secs(5), ttl, 10);
        assert!(matches!(
            seen.mark("a", t0 + Duration::from_secs(11), ttl, 10),
            Seen::Again
        ));
    }
}
