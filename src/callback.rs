//! `POST /callbacks/tencent`: Tencent's `Group.CallbackSendMsgException`.
//!
//! Tencent posts here when a group message it had accepted failed later (seed
//! 002, e.g. ErrorCode 10023 "msg count exceeds limit, please retry later").
//! herald checks the app and the signature, rebuilds the job from
//! `CloudCustomData` and the body, and publishes it (confirmed) to the next retry
//! tier (frequency codes, attempt counted) or to the DLQ (`permanent`, with the
//! vendor's code and words), then answers `{"ActionStatus":"OK",…}`. No vendor
//! is called while Tencent waits. A callback seen before (same app, job and
//! attempt) is answered OK and not scheduled again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;
use tracing::{info, warn};

use crate::broker::Publisher;
use crate::config::{Config, Secret};
use crate::envelope::Failure;
use crate::outcome::{Class, Outcome, Policy, Reason, decide, is_expired};
use crate::topology::{Names, tier_name};
use crate::vendor::tencent::{self, CALLBACK_COMMAND, CallbackVerdict, SendMsgException};

pub const PATH: &str = "/callbacks/tencent";

/// A callback seen within this long is a duplicate.
const DEDUPE_FOR: Duration = Duration::from_secs(600);

struct Account {
    sdk_app_id: u64,
    name: String,
    token: Option<Secret>,
    policy: Policy,
}

/// Everything the callback route needs; the publisher is present while the worker is connected.
pub struct Callbacks {
    accounts: Vec<Account>,
    names: Names,
    publisher: RwLock<Option<Publisher>>,
    seen: Mutex<HashMap<String, Instant>>,
}

impl Callbacks {
    /// `None` when no Tencent account is configured.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let mut accounts = Vec::new();
        for a in config
            .accounts
            .iter()
            .filter(|a| a.vendor == tencent::SPEC.id)
        {
            accounts.push(Account {
                sdk_app_id: tencent::sdk_app_id(a)?,
                name: a.name.clone(),
                token: a.credentials.get("callback_token").map(Secret::new),
                policy: config.policy_for(a),
            });
        }
        Ok((!accounts.is_empty()).then(|| {
            Arc::new(Self {
                accounts,
                names: Names::new(&config.broker.prefix),
                publisher: RwLock::new(None),
                seen: Mutex::default(),
            })
        }))
    }

    pub fn set_publisher(&self, publisher: Option<Publisher>) {
        *self.publisher.write().expect("publisher lock") = publisher;
    }

    /// Marks a callback as being handled; `false` if it was already.
    fn first_time(&self, key: &str) -> bool {
        let mut seen = self.seen.lock().expect("dedupe lock");
        let now = Instant::now();
        seen.retain(|_, at| now.duration_since(*at) < DEDUPE_FOR);
        seen.insert(key.to_string(), now).is_none()
    }

    fn forget(&self, key: &str) {
        self.seen.lock().expect("dedupe lock").remove(key);
    }
}

fn ok() -> Response {
    Json(json!({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})).into_response()
}

fn refuse(status: StatusCode, why: &str) -> Response {
    let outcome = match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "rejected",
    };
    metrics::counter!("herald_callbacks_total", "result" => outcome).increment(1);
    warn!(status = status.as_u16(), why, "tencent callback refused");
    (
        status,
        Json(json!({"ActionStatus": "FAIL", "ErrorCode": status.as_u16(), "ErrorInfo": why})),
    )
        .into_response()
}

pub async fn handle(
    State(callbacks): State<Arc<Callbacks>>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let q = |k: &str| query.get(k).map(String::as_str);
    let Some(app_id) = q("SdkAppid").and_then(|s| s.parse::<u64>().ok()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "SdkAppid is missing or not a number",
        );
    };
    let Some(account) = callbacks.accounts.iter().find(|a| a.sdk_app_id == app_id) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "SdkAppid matches no configured tencent account",
        );
    };
    if q("CallbackCommand") != Some(CALLBACK_COMMAND) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unsupported CallbackCommand; herald serves Group.CallbackSendMsgException",
        );
    }
    if let Some(token) = &account.token
        && let Err(why) = tencent::verify_callback(
            token.expose(),
            q("Sign"),
            q("RequestTime"),
            Utc::now().timestamp() as u64,
        )
    {
        return refuse(StatusCode::UNAUTHORIZED, &why);
    }
    let event: SendMsgException = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("malformed callback body: {e}"),
            );
        }
    };
    if event.command != CALLBACK_COMMAND {
        return refuse(
            StatusCode::BAD_REQUEST,
            "body CallbackCommand is not Group.CallbackSendMsgException",
        );
    }
    let (job, attempt, class) = match tencent::rebuild(&event) {
        Ok(CallbackVerdict::Job {
            job,
            attempt,
            class,
        }) => (job, attempt, class),
        Ok(CallbackVerdict::Foreign) => {
            metrics::counter!("herald_callbacks_total", "result" => "foreign").increment(1);
            info!(group = %event.group_id, code = event.error_code, "callback for a message herald did not send; ignored");
            return ok();
        }
        Err(why) => return refuse(StatusCode::BAD_REQUEST, &why),
    };
    if job.account != account.name {
        return refuse(
            StatusCode::BAD_REQUEST,
            "CloudCustomData names another account than SdkAppid",
        );
    }
    let key = format!("{app_id}/{}/{attempt}", job.id);
    if !callbacks.first_time(&key) {
        metrics::counter!("herald_callbacks_total", "result" => "duplicate").increment(1);
        info!(id = %job.id, attempt, "duplicate callback; already scheduled");
        return ok();
    }
    let Some(publisher) = callbacks.publisher.read().expect("publisher lock").clone() else {
        callbacks.forget(&key);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the broker; retry the callback",
        );
    };

    let now = Utc::now();
    let error = format!("tencent callback {} {}", event.error_code, event.error_info);
    let code = event.error_code.to_string();
    let failure = Failure {
        attempts: attempt,
        first_seen: now,
        code: Some(&code),
        error: &error,
        now,
    };
    let routing_key = job.routing_key();
    let body = serde_json::to_vec(&job).expect("a job serializes");
    let base = crate::enqueue::properties(&job);
    // Tencent accepted the message and failed it later: that attempt failed. A
    // frequency code is worth another attempt, by the same rule as a lane's
    // transient failure; anything else is the vendor's final word.
    let outcome = if is_expired(job.expires_at, now) {
        Outcome::Dead(Reason::Expired)
    } else if class == Class::RateLimited {
        decide(Class::Transient, attempt, &account.policy)
    } else {
        Outcome::Dead(Reason::Permanent)
    };
    let (exchange, props, result) = match outcome {
        Outcome::RetryIn { delay, .. } => (
            callbacks.names.retry_exchange(),
            crate::envelope::copy_with(&base, failure.retry_headers(&tier_name(delay))),
            "retried".to_string(),
        ),
        Outcome::Dead(reason) => (
            callbacks.names.dead(),
            crate::envelope::copy_with(&base, failure.dead_headers(reason, &routing_key)),
            format!("dead_{reason}"),
        ),
        Outcome::Ack | Outcome::PauseLane(_) => {
            unreachable!("decide(Transient) retries or dead-letters")
        }
    };
    if let Err(e) = publisher
        .publish(&exchange, &routing_key, &body, props)
        .await
    {
        callbacks.forget(&key);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("could not schedule the job: {e}"),
        );
    }
    info!(id = %job.id, attempt, code = event.error_code, result = %result, "tencent send failure handled");
    metrics::counter!("herald_callbacks_total", "result" => result).increment(1);
    ok()
}
