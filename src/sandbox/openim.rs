//! Fake of OpenIM v3's admin token and `msg/send_business_notification` (seed 000).
//!
//! Served under `/openim`, so an account's `base_url` is `http://<sandbox>/openim`.
//! Tokens live `--openim-token-ttl`; a request with an expired token gets 1501,
//! an unknown one 1502, none 1507. `POST /_sandbox/openim/expire-tokens` expires
//! every token at once; `GET /_sandbox/openim/tokens` counts issued tokens.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Caller, Delivered, FakeSettings, FakeVendor, FaultAnswer, Sandbox};
use crate::demo::Sample;
use crate::vendor::VendorSpec;
use crate::vendor::openim::SPEC;

/// Where an account's `base_url` points: `http://<sandbox>/openim`.
pub const BASE_PATH: &str = "/openim";

/// The admin the fake accepts and its tokens' lifetime (`herald sandbox --openim-…`).
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// The OpenIM admin, as USERID:SECRET.
    #[arg(
        id = "openim-admin",
        long = "openim-admin",
        value_name = "USERID:SECRET",
        value_parser = |s: &str| Caller::parse(s, "USERID:SECRET"),
        default_value = "imAdmin:openIM123"
    )]
    pub admin: Caller,
    /// Lifetime of the OpenIM admin tokens the fake issues.
    #[arg(
        id = "openim-token-ttl",
        long = "openim-token-ttl",
        value_name = "OPENIM_TOKEN_TTL",
        default_value = "1h",
        value_parser = humantime::parse_duration
    )]
    pub token_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        super::flag_defaults()
    }
}

pub struct Fake {
    admin: String,
    secret: String,
    ttl: Duration,
    tokens: Mutex<HashMap<String, Instant>>,
    issued: AtomicUsize,
}

impl FakeSettings for Settings {
    type Fake = Fake;

    fn start(&self) -> Fake {
        Fake::new(self)
    }
}

impl Fake {
    pub fn new(settings: &Settings) -> Self {
        Self {
            admin: settings.admin.id.clone(),
            secret: settings.admin.secret.clone(),
            ttl: settings.token_ttl,
            tokens: Mutex::default(),
            issued: AtomicUsize::new(0),
        }
    }

    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Every token issued so far, expired or not.
    pub fn tokens(&self) -> Vec<String> {
        self.tokens
            .lock()
            .expect("sandbox lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn expire_all(&self) {
        let now = Instant::now();
        for until in self.tokens.lock().expect("sandbox lock").values_mut() {
            *until = now;
        }
    }
}

impl FakeVendor for Fake {
    fn vendor(&self) -> &'static VendorSpec {
        &SPEC
    }

    fn base_path(&self) -> &'static str {
        BASE_PATH
    }

    fn routes(&self) -> Router<Sandbox> {
        Router::new()
            .route("/openim/auth/get_admin_token", post(get_admin_token))
            .route(
                "/openim/msg/send_business_notification",
                post(send_business_notification),
            )
            .route("/_sandbox/openim/expire-tokens", post(expire_tokens))
            .route("/_sandbox/openim/tokens", get(tokens))
    }

    fn describe(&self, m: &Delivered) -> String {
        format!(
            "recvUserID={} key={} data={} operationID={}",
            m.field("recvUserID"),
            m.field("key"),
            m.field("data"),
            m.field("header.operationID")
        )
    }

    fn demo(&self) -> Sample {
        Sample {
            account: "main",
            keys: vec![
                ("admin_user_id", self.admin.clone()),
                ("secret", self.secret.clone()),
            ],
            jobs: DEMO_JOBS,
            story: "",
            too_large: None,
        }
    }
}

/// The demo's OpenIM job: a business notification to one user.
const DEMO_JOBS: &str = r#"
{"id":"demo-openim-1","vendor":"openim","account":"main","from":"openIMAdmin","to":{"user":"2839678182"},"key":"friend.request","data":{"from":"bob"},"options":{"sendMsg":false}}
"#;

fn reply(code: i64, msg: &str, data: Option<Value>) -> Response {
    let mut body = json!({"errCode": code, "errMsg": msg, "errDlt": if code == 0 { String::new() } else { format!(": [{code}]{msg}") }});
    if let Some(data) = data {
        body["data"] = data;
    }
    Json(body).into_response()
}

async fn get_admin_token(State(sandbox): State<Sandbox>, body: axum::body::Bytes) -> Response {
    sandbox.delay().await;
    let fake = sandbox.fake::<Fake>();
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return reply(1001, "ArgsError", None);
    };
    if req["userID"] != fake.admin.as_str() || req["secret"] != fake.secret.as_str() {
        return reply(1002, "NoPermissionError", None);
    }
    let token = format!("tok-{:016x}", rand::random::<u64>());
    fake.tokens
        .lock()
        .expect("sandbox lock")
        .insert(token.clone(), Instant::now() + fake.ttl);
    fake.issued.fetch_add(1, Ordering::SeqCst);
    reply(
        0,
        "",
        Some(json!({"token": token, "expireTimeSeconds": fake.ttl.as_secs().max(1)})),
    )
}

async fn send_business_notification(
    State(sandbox): State<Sandbox>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    sandbox.delay().await;
    let fake = sandbox.fake::<Fake>();
    let now = Instant::now();
    sandbox.arrive("openim", &fake.admin, now);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let operation_id = header("operationID");
    if operation_id.is_empty() {
        return reply(1001, "ArgsError: operationID is required", None);
    }
    let token = header("token");
    match fake.tokens.lock().expect("sandbox lock").get(&token) {
        _ if token.is_empty() => return reply(1507, "TokenNotExistError", None),
        None => return reply(1502, "TokenInvalidError", None),
        Some(until) if *until <= now => return reply(1501, "TokenExpiredError", None),
        Some(_) => {}
    }
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&body) else {
        return reply(1001, "ArgsError: body is not a JSON object", None);
    };
    let text = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("");
    let to = if text("recvUserID").is_empty() {
        text("recvGroupID")
    } else {
        text("recvUserID")
    };
    if let Some(fault) = sandbox.take_fault("openim", &fake.admin, Some(to)) {
        return match fault {
            FaultAnswer::Code(code) => reply(code, "injected fault", None),
            other => sandbox.fault_response(other).await,
        };
    }
    if let Err(e) = validate(&req) {
        return reply(1001, &format!("ArgsError: {e}"), None);
    }
    let mut fields: BTreeMap<String, String> = req
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_string),
            )
        })
        .collect();
    fields.insert("header.operationID".into(), operation_id);
    sandbox.record("openim", &fake.admin, fields);
    reply(
        0,
        "",
        Some(
            json!({"serverMsgID": format!("{:032x}", rand::random::<u128>()), "clientMsgID": format!("{:032x}", rand::random::<u128>()), "sendTime": super::unix_now() * 1000}),
        ),
    )
}

/// Seed 000's rules for the request body.
pub fn validate(req: &serde_json::Map<String, Value>) -> Result<(), String> {
    const KNOWN: &[&str] = &[
        "sendUserID",
        "recvUserID",
        "recvGroupID",
        "key",
        "data",
        "sendMsg",
        "reliabilityLevel",
    ];
    if let Some(unknown) = req.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown}"));
    }
    let text = |k: &str| req.get(k).and_then(Value::as_str);
    for required in ["sendUserID", "key", "data"] {
        if text(required).is_none_or(str::is_empty) {
            return Err(format!("{required} is required and must be a string"));
        }
    }
    let user = text("recvUserID").unwrap_or("");
    let group = text("recvGroupID").unwrap_or("");
    if user.is_empty() == group.is_empty() {
        return Err("exactly one of recvUserID and recvGroupID must be set".into());
    }
    if req.get("sendMsg").is_some_and(|v| !v.is_boolean()) {
        return Err("sendMsg must be a bool".into());
    }
    match req.get("reliabilityLevel") {
        None => Ok(()),
        Some(v) if v == 1 || v == 2 => Ok(()),
        Some(_) => Err("reliabilityLevel must be 1 or 2".into()),
    }
}

async fn expire_tokens(State(sandbox): State<Sandbox>) -> &'static str {
    sandbox.fake::<Fake>().expire_all();
    "ok\n"
}

async fn tokens(State(sandbox): State<Sandbox>) -> Json<Value> {
    Json(json!({"issued": sandbox.fake::<Fake>().issued()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn seed_example_is_valid_and_recipients_are_exclusive() {
        let ok = req(
            json!({"sendUserID":"openIMAdmin","recvUserID":"2839678182","recvGroupID":"","key":"xxx","data":"xxxxxx","sendMsg":false,"reliabilityLevel":1}),
        );
        assert_eq!(validate(&ok), Ok(()));
        let both =
            req(json!({"sendUserID":"a","recvUserID":"u","recvGroupID":"g","key":"k","data":"d"}));
        assert!(validate(&both).unwrap_err().contains("exactly one"));
        let level = req(
            json!({"sendUserID":"a","recvUserID":"u","key":"k","data":"d","reliabilityLevel":3}),
        );
        assert!(validate(&level).unwrap_err().contains("reliabilityLevel"));
    }
}
