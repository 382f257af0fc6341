//! Fake of Tencent Cloud IM's REST send APIs and its `Group.CallbackSendMsgException`.
//!
//! Served under `/tencent`, so an account's `base_url` is `http://<sandbox>/tencent`.
//! Verifies the UserSig in the query (HMAC, SDKAppID, identifier, expiry: 70001
//! when expired, 70003 otherwise), limits each app to `--tencent-rate-limit`
//! requests in any second (60007 above it), and validates the body.
//! `POST /_sandbox/tencent/reject-group` `{"count": N, "callback_url": URL, "token": T}`
//! makes the next N group messages fail after acceptance, as Tencent does, and
//! posts the seed's callback with ErrorCode 10023 to URL (signed when T is set).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Delivered, FakeSettings, FakeVendor, FaultAnswer, Sandbox, unix_now};
use crate::demo::Sample;
use crate::vendor::VendorSpec;
use crate::vendor::tencent::{CALLBACK_COMMAND, SPEC, callback, callback_sign};
use crate::vendor::usersig;

/// Where an account's `base_url` points: `http://<sandbox>/tencent`.
pub const BASE_PATH: &str = "/tencent";

/// The apps the fake accepts and their limit (`herald sandbox --tencent-…`).
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// A Tencent app, as SDKAPPID:SECRETKEY:ADMIN (repeatable).
    #[arg(
        id = "tencent-app",
        long = "tencent-app",
        value_name = "SDKAPPID:KEY:ADMIN",
        value_parser = App::parse,
        default_value = "1400000000:tencent-demo-key:administrator"
    )]
    pub apps: Vec<App>,
    /// Tencent requests allowed in any one-second window per app.
    #[arg(
        id = "tencent-rate-limit",
        long = "tencent-rate-limit",
        value_name = "TENCENT_RATE_LIMIT",
        default_value_t = 200
    )]
    pub rate_limit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        super::flag_defaults()
    }
}

/// A Tencent Cloud IM app: SDKAppID, its secret key, and its admin identifier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct App {
    pub sdk_app_id: u64,
    pub key: String,
    pub admin: String,
}

impl App {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.splitn(3, ':');
        let (Some(id), Some(key), Some(admin)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("must be SDKAPPID:KEY:ADMIN".into());
        };
        Ok(Self {
            sdk_app_id: id
                .parse()
                .map_err(|_| format!("SDKAppID `{id}` is not a number"))?,
            key: key.to_string(),
            admin: admin.to_string(),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RejectGroup {
    pub count: u32,
    pub callback_url: String,
    #[serde(default)]
    pub token: Option<String>,
}

/// What herald answered to a callback the fake posted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallbackAnswer {
    pub status: u16,
    pub body: String,
    pub millis: f64,
}

pub struct Fake {
    apps: Vec<App>,
    rate_limit: usize,
    reject: Mutex<Option<RejectGroup>>,
    answers: Mutex<Vec<CallbackAnswer>>,
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
            apps: settings.apps.clone(),
            rate_limit: settings.rate_limit,
            reject: Mutex::default(),
            answers: Mutex::default(),
        }
    }

    pub fn reject_group(&self, reject: RejectGroup) {
        *self.reject.lock().expect("sandbox lock") = Some(reject);
    }

    pub fn callback_answers(&self) -> Vec<CallbackAnswer> {
        self.answers.lock().expect("sandbox lock").clone()
    }
}

/// The token the demo's account checks callbacks with; the fake signs them with it.
const DEMO_CALLBACK_TOKEN: &str = "demo-callback-token";

impl FakeVendor for Fake {
    fn vendor(&self) -> &'static VendorSpec {
        &SPEC
    }

    fn base_path(&self) -> &'static str {
        BASE_PATH
    }

    fn routes(&self) -> Router<Sandbox> {
        Router::new()
            .route("/tencent/v4/openim/sendmsg", post(sendmsg))
            .route(
                "/tencent/v4/group_open_http_svc/send_group_msg",
                post(send_group_msg),
            )
            .route("/_sandbox/tencent/reject-group", post(reject_group_route))
            .route("/_sandbox/tencent/callbacks", get(callbacks_route))
    }

    fn describe(&self, m: &Delivered) -> String {
        format!(
            "to={}{} MsgBody={}",
            m.field("To_Account"),
            m.field("GroupId"),
            m.field("MsgBody")
        )
    }

    fn demo(&self) -> Sample {
        let app = self.apps.first();
        let id = app.map(|a| a.sdk_app_id.to_string()).unwrap_or_default();
        let (key, admin) = app.map_or(("", ""), |a| (a.key.as_str(), a.admin.as_str()));
        Sample {
            account: "main",
            keys: vec![
                ("sdk_app_id", id),
                ("secret_key", key.into()),
                ("admin_identifier", admin.into()),
                ("callback_token", DEMO_CALLBACK_TOKEN.into()),
                (
                    "callback_key",
                    "demo-callback-key-0123456789abcdef0123456789".into(),
                ),
            ],
            jobs: DEMO_JOBS,
            story: "the group message fails after acceptance and comes back through the failure callback",
            too_large: None,
        }
    }

    fn stage_demo(&self, _sandbox: &Sandbox, callbacks: Option<std::net::SocketAddr>) {
        if let Some(addr) = callbacks {
            self.reject_group(RejectGroup {
                count: 1,
                callback_url: format!("http://{addr}{}", callback::PATH),
                token: Some(DEMO_CALLBACK_TOKEN.into()),
            });
        }
    }
}

/// The demo's Tencent jobs: one to a user, one to a group (the one the demo rejects).
const DEMO_JOBS: &str = r#"
{"id":"demo-tencent-1","vendor":"tencent","account":"main","from":"administrator","to":{"user":"user-7"},"key":"order.shipped","data":{"order":77},"push":{"content":"Your order shipped"}}
{"id":"demo-tencent-group-1","vendor":"tencent","account":"main","from":"administrator","to":{"group":"@TGS#ops"},"key":"system.alert","data":"deploy finished"}
"#;

fn reply(code: i64, info: &str) -> Response {
    let status = if code == 0 { "OK" } else { "FAIL" };
    Json(json!({"ActionStatus": status, "ErrorCode": code, "ErrorInfo": info})).into_response()
}

#[derive(Deserialize)]
struct Signed {
    sdkappid: u64,
    identifier: String,
    usersig: String,
    random: Option<u32>,
    contenttype: Option<String>,
}

#[derive(Clone, Copy)]
enum Kind {
    User,
    Group,
}

async fn sendmsg(state: State<Sandbox>, query: Query<Signed>, body: axum::body::Bytes) -> Response {
    handle(state, query, body, Kind::User).await
}

async fn send_group_msg(
    state: State<Sandbox>,
    query: Query<Signed>,
    body: axum::body::Bytes,
) -> Response {
    handle(state, query, body, Kind::Group).await
}

async fn handle(
    State(sandbox): State<Sandbox>,
    Query(q): Query<Signed>,
    body: axum::body::Bytes,
    kind: Kind,
) -> Response {
    sandbox.delay().await;
    let fake = sandbox.fake::<Fake>();
    let Some(app) = fake.apps.iter().find(|a| a.sdk_app_id == q.sdkappid) else {
        return reply(70003, "unknown SDKAppID");
    };
    if q.random.is_none() || q.contenttype.as_deref() != Some("json") {
        return reply(60003, "random and contenttype=json are required in the URL");
    }
    match usersig::verify(
        &q.usersig,
        &app.key,
        app.sdk_app_id,
        &q.identifier,
        unix_now(),
    ) {
        Err(e) if e.contains("expired") => return reply(70001, &e),
        Err(e) => return reply(70003, &e),
        Ok(_) if q.identifier != app.admin => {
            return reply(90009, "the identifier is not an app admin");
        }
        Ok(_) => {}
    }
    let app_id = app.sdk_app_id.to_string();
    let now = Instant::now();
    if sandbox.arrive("tencent", &app_id, now) > fake.rate_limit {
        sandbox.count_blocked("tencent", &app_id);
        return reply(60007, "REST API call frequency exceeds the limit");
    }
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&body) else {
        return reply(90001, "JSON parse failed");
    };
    let to_key = match kind {
        Kind::User => "To_Account",
        Kind::Group => "GroupId",
    };
    let to = req
        .get(to_key)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if let Some(fault) = sandbox.take_fault("tencent", &app_id, Some(&to)) {
        return match fault {
            FaultAnswer::Code(code) => reply(code, "injected fault"),
            other => sandbox.fault_response(other).await,
        };
    }
    let checked = match kind {
        Kind::User => validate_user(&req),
        Kind::Group => validate_group(&req),
    };
    if let Err(e) = checked {
        return reply(
            if matches!(kind, Kind::Group) {
                10004
            } else {
                90001
            },
            &e,
        );
    }
    if matches!(kind, Kind::Group) {
        let reject = {
            let mut slot = fake.reject.lock().expect("sandbox lock");
            match slot.as_mut() {
                Some(r) if r.count > 0 => {
                    r.count -= 1;
                    Some(r.clone())
                }
                _ => None,
            }
        };
        if let Some(reject) = reject {
            // Accepted now, failed later: Tencent reports it through the callback.
            tokio::spawn(post_callback(
                sandbox.clone(),
                reject,
                app.sdk_app_id,
                q.identifier.clone(),
                req,
            ));
            return accepted(kind);
        }
    }
    let fields = req
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_string),
            )
        })
        .collect::<BTreeMap<_, _>>();
    sandbox.record("tencent", &app_id, fields);
    accepted(kind)
}

/// The success answer, with the message's id as Tencent gives it: `MsgKey`
/// (and `MsgTime`) for a user message, `MsgSeq` for a group message.
fn accepted(kind: Kind) -> Response {
    let mut body = json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""});
    let now = super::unix_now();
    match kind {
        Kind::User => {
            body["MsgTime"] = json!(now);
            body["MsgKey"] = json!(format!(
                "{}_{}_{now}",
                rand::random::<u32>(),
                rand::random::<u32>()
            ));
        }
        Kind::Group => {
            body["MsgTime"] = json!(now);
            body["MsgSeq"] = json!(rand::random::<u32>() % 1_000_000);
        }
    }
    Json(body).into_response()
}

fn validate_common(req: &Map<String, Value>, random_key: &str) -> Result<(), String> {
    if req
        .get("From_Account")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("From_Account is required".into());
    }
    if req
        .get(random_key)
        .and_then(Value::as_u64)
        .is_none_or(|r| r > u64::from(u32::MAX))
    {
        return Err(format!("{random_key} must be a 32-bit unsigned integer"));
    }
    let Some(Value::Array(body)) = req.get("MsgBody") else {
        return Err("MsgBody must be an array".into());
    };
    if body.is_empty() {
        return Err("MsgBody is empty".into());
    }
    for element in body {
        if element["MsgType"] != "TIMCustomElem" && element["MsgType"] != "TIMTextElem" {
            return Err(format!("unsupported MsgType {}", element["MsgType"]));
        }
        if !element["MsgContent"].is_object() {
            return Err("MsgContent must be an object".into());
        }
    }
    if req.get("CloudCustomData").is_some_and(|v| !v.is_string()) {
        return Err("CloudCustomData must be a string".into());
    }
    Ok(())
}

pub fn validate_user(req: &Map<String, Value>) -> Result<(), String> {
    validate_common(req, "MsgRandom")?;
    if req
        .get("To_Account")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("To_Account is required".into());
    }
    Ok(())
}

pub fn validate_group(req: &Map<String, Value>) -> Result<(), String> {
    validate_common(req, "Random")?;
    if req
        .get("GroupId")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("GroupId is required".into());
    }
    if req.get("OnlineOnlyFlag").is_some_and(|v| v != 0 && v != 1) {
        return Err("OnlineOnlyFlag must be 0 or 1".into());
    }
    Ok(())
}

/// Posts `Group.CallbackSendMsgException` (seed 002) for a rejected group message.
async fn post_callback(
    sandbox: Sandbox,
    reject: RejectGroup,
    sdk_app_id: u64,
    operator: String,
    req: Map<String, Value>,
) {
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let body = json!({
        "CallbackCommand": CALLBACK_COMMAND,
        "GroupId": req["GroupId"],
        "Type": "Public",
        "From_Account": req["From_Account"],
        "Operator_Account": operator,
        "Random": req["Random"],
        "OnlineOnlyFlag": req.get("OnlineOnlyFlag").cloned().unwrap_or(json!(0)),
        "MsgBody": req["MsgBody"],
        "CloudCustomData": req.get("CloudCustomData").cloned().unwrap_or(json!("")),
        "ErrorCode": 10023,
        "ErrorInfo": "msg count exceeds limit,please retry later",
        "EventTime": (unix_now() * 1000).to_string(),
    });
    let mut query = vec![
        ("SdkAppid", sdk_app_id.to_string()),
        ("CallbackCommand", CALLBACK_COMMAND.to_string()),
        ("contenttype", "json".to_string()),
        ("ClientIP", "127.0.0.1".to_string()),
        ("OptPlatform", "RESTAPI".to_string()),
    ];
    if let Some(token) = &reject.token {
        let time = unix_now().to_string();
        query.push(("Sign", callback_sign(token, &time)));
        query.push(("RequestTime", time));
    }
    let started = Instant::now();
    let answer = match reqwest::Client::new()
        .post(&reject.callback_url)
        .query(&query)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => CallbackAnswer {
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
            millis: started.elapsed().as_secs_f64() * 1000.0,
        },
        Err(e) => CallbackAnswer {
            status: 0,
            body: e.to_string(),
            millis: started.elapsed().as_secs_f64() * 1000.0,
        },
    };
    sandbox
        .fake::<Fake>()
        .answers
        .lock()
        .expect("sandbox lock")
        .push(answer);
}

async fn reject_group_route(
    State(sandbox): State<Sandbox>,
    Json(reject): Json<RejectGroup>,
) -> &'static str {
    sandbox.fake::<Fake>().reject_group(reject);
    "ok\n"
}

async fn callbacks_route(State(sandbox): State<Sandbox>) -> Json<Vec<CallbackAnswer>> {
    Json(sandbox.fake::<Fake>().callback_answers())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_apps_by_a_numeric_sdkappid() {
        use clap::{Args, FromArgMatches};
        let command = super::super::Settings::augment_args(clap::Command::new("sandbox"));
        let parse = |app: &str| {
            let matches =
                command
                    .clone()
                    .try_get_matches_from(["sandbox", "--tencent-app", app])?;
            super::super::Settings::from_arg_matches(&matches)
        };
        let given = parse("1400000001:k:e:y:admin").unwrap();
        let app = &given.get::<Settings>().apps[0];
        assert_eq!(
            (app.sdk_app_id, app.key.as_str(), app.admin.as_str()),
            (1_400_000_001, "k", "e:y:admin")
        );
        for (bad, says) in [
            ("12:ab", "must be SDKAPPID:KEY:ADMIN"),
            ("x:k:a", "`x` is not a number"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn bodies_are_validated_like_the_api() {
        let ok = json!({"From_Account":"a","To_Account":"b","MsgRandom":1,"MsgBody":[{"MsgType":"TIMCustomElem","MsgContent":{"Data":"d"}}]});
        assert_eq!(validate_user(ok.as_object().unwrap()), Ok(()));
        let no_to = json!({"From_Account":"a","MsgRandom":1,"MsgBody":[{"MsgType":"TIMCustomElem","MsgContent":{}}]});
        assert!(
            validate_user(no_to.as_object().unwrap())
                .unwrap_err()
                .contains("To_Account")
        );
        let group = json!({"From_Account":"a","GroupId":"g","Random":1,"OnlineOnlyFlag":2,"MsgBody":[{"MsgType":"TIMCustomElem","MsgContent":{}}]});
        assert!(
            validate_group(group.as_object().unwrap())
                .unwrap_err()
                .contains("OnlineOnlyFlag")
        );
    }
}
