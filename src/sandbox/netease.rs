//! Fake of NetEase Yunxin's `msg/sendAttachMsg.action` (seed 001).
//!
//! Served at `/netease/nimserver/msg/sendAttachMsg.action`, so an account's
//! `base_url` is `http://<sandbox>/netease/nimserver`. Checks, in the vendor's
//! order: AppKey, the per-app limit (more than 100 requests in any one second
//! blocks the app for 10 s, answered with 416), CurTime (±5 min) and CheckSum,
//! then every form field against the seed's rules.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use super::{Caller, Delivered, FakeSettings, FakeVendor, Fault, FaultAnswer, Sandbox, unix_now};
use crate::demo::Sample;
use crate::vendor::VendorSpec;
use crate::vendor::netease::{SPEC, checksum};

/// Where an account's `base_url` points: `http://<sandbox>/netease/nimserver`.
pub const BASE_PATH: &str = "/netease/nimserver";
pub const PATH: &str = "/netease/nimserver/msg/sendAttachMsg.action";

/// The apps the fake accepts and their limit (`herald sandbox --netease-…`).
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// A NetEase app the fake accepts, as APPKEY:APPSECRET (repeatable).
    #[arg(
        id = "netease-app",
        long = "netease-app",
        value_name = "KEY:SECRET",
        value_parser = |s: &str| Caller::parse(s, "KEY:SECRET"),
        default_value = "demo-app:demo-secret"
    )]
    pub apps: Vec<Caller>,
    /// NetEase requests allowed in any one-second window per app.
    #[arg(
        id = "netease-rate-limit",
        long = "netease-rate-limit",
        value_name = "NETEASE_RATE_LIMIT",
        default_value_t = 100
    )]
    pub rate_limit: usize,
    /// How long a NetEase app that exceeded its limit stays blocked.
    #[arg(
        id = "netease-block",
        long = "netease-block",
        value_name = "NETEASE_BLOCK",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub block: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        super::flag_defaults()
    }
}

/// The fake's own state: apps and their blocks.
pub struct Fake {
    apps: HashMap<String, String>,
    rate_limit: usize,
    block: Duration,
    blocked_until: Mutex<HashMap<String, Instant>>,
    /// The first app, the one the demo sends with.
    first: Option<Caller>,
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
            apps: settings
                .apps
                .iter()
                .map(|app| (app.id.clone(), app.secret.clone()))
                .collect(),
            rate_limit: settings.rate_limit,
            block: settings.block,
            blocked_until: Mutex::default(),
            first: settings.apps.first().cloned(),
        }
    }

    /// Counts this request against the app's window; `true` when the app is (now) blocked.
    fn over_limit(&self, in_last_second: usize, app: &str, now: Instant) -> bool {
        let mut blocked = self.blocked_until.lock().expect("sandbox lock");
        if blocked.get(app).is_some_and(|until| *until > now) {
            return true;
        }
        if in_last_second > self.rate_limit {
            blocked.insert(app.to_string(), now + self.block);
            return true;
        }
        false
    }

    /// Blocks `app` for the block time from now, as the vendor does after another client of the app overshot.
    pub fn block(&self, app: &str) {
        let until = Instant::now() + self.block;
        self.blocked_until
            .lock()
            .expect("sandbox lock")
            .insert(app.to_string(), until);
    }
}

/// The same API under `/netease/<via>/nimserver`: one sandbox app reached
/// through several base URLs, so a test can tell its senders apart.
pub const VIA_PATH: &str = "/netease/{via}/nimserver/msg/sendAttachMsg.action";

impl FakeVendor for Fake {
    fn vendor(&self) -> &'static VendorSpec {
        &SPEC
    }

    fn base_path(&self) -> &'static str {
        BASE_PATH
    }

    fn routes(&self) -> Router<Sandbox> {
        Router::new().route(PATH, post(send_attach_msg)).route(
            VIA_PATH,
            post(
                |State(sandbox): State<Sandbox>,
                 Path(via): Path<String>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    receive(sandbox, Some(via), headers, body).await
                },
            ),
        )
    }

    fn describe(&self, m: &Delivered) -> String {
        format!(
            "to={} msgtype={} save={} attach={}",
            m.field("to"),
            m.field("msgtype"),
            m.field("save"),
            m.field("attach")
        )
    }

    fn demo(&self) -> Sample {
        let (key, secret) = self
            .first
            .as_ref()
            .map_or(("", ""), |a| (a.id.as_str(), a.secret.as_str()));
        Sample {
            account: "default",
            keys: vec![("app_key", key.into()), ("app_secret", secret.into())],
            jobs: DEMO_JOBS,
            story: "u-flaky's first attempt gets a 500",
            too_large: Some(format!(
                r#"{{"id":"demo-oversize-1","vendor":"netease","account":"default","from":"system","to":{{"user":"u-alice"}},"key":"report","data":"{}"}}"#,
                "x".repeat(5000)
            )),
        }
    }

    fn stage_demo(&self, sandbox: &Sandbox, _callbacks: Option<std::net::SocketAddr>) {
        sandbox.add_fault(Fault {
            vendor: SPEC.id.into(),
            app: None,
            to: Some("u-flaky".into()),
            times: 1,
            answer: FaultAnswer::Code(500),
        });
    }
}

/// The demo's NetEase jobs: a user, an online-only one, a group with a forced push, and u-flaky.
const DEMO_JOBS: &str = r#"
{"id":"demo-order-8812","vendor":"netease","account":"default","from":"system","to":{"user":"u-alice"},"key":"order.shipped","data":{"order":8812},"push":{"content":"Your order shipped","payload":{"order":8812},"sound":"ding"}}
{"id":"demo-friend-17","vendor":"netease","account":"default","from":"u-bob","to":{"user":"u-alice"},"key":"friend.request","data":"bob wants to be friends","delivery":"online"}
{"id":"demo-alert-3","vendor":"netease","account":"default","from":"system","to":{"group":"ops-room"},"key":"system.alert","data":{"level":"warn","text":"disk 91%"},"options":{"isForcePush":true,"forcePushContent":"disk alert"}}
{"id":"demo-flaky-1","vendor":"netease","account":"default","from":"system","to":{"user":"u-flaky"},"key":"order.shipped","data":{"order":9001}}
"#;

fn answer(code: i64, desc: &str) -> Response {
    let body = if code == 200 {
        json!({"code": 200})
    } else {
        json!({"code": code, "desc": desc})
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        body.to_string(),
    )
        .into_response()
}

async fn send_attach_msg(
    State(sandbox): State<Sandbox>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receive(sandbox, None, headers, body).await
}

async fn receive(
    sandbox: Sandbox,
    via: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sandbox.delay().await;
    let fake = sandbox.fake::<Fake>();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let app = header("AppKey");
    let Some(secret) = fake.apps.get(app) else {
        return answer(403, "invalid AppKey");
    };
    let now = Instant::now();
    let in_last_second = sandbox.arrive("netease", app, now);
    if fake.over_limit(in_last_second, app, now) {
        sandbox.count_blocked("netease", app);
        return answer(416, "api freq control: app blocked");
    }
    let (nonce, cur_time, sum) = (header("Nonce"), header("CurTime"), header("CheckSum"));
    if nonce.is_empty() || nonce.len() > 128 {
        return answer(414, "Nonce is required, at most 128 characters");
    }
    match cur_time.parse::<u64>() {
        Ok(t) if t.abs_diff(unix_now()) <= 300 => {}
        _ => return answer(414, "CurTime is illegal"),
    }
    if !sum.eq_ignore_ascii_case(&checksum(secret, nonce, cur_time)) {
        return answer(414, "checksum error");
    }
    let mut fields: BTreeMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    if let Some(fault) = sandbox.take_fault("netease", app, fields.get("to").map(String::as_str)) {
        return match fault {
            FaultAnswer::Code(code) => answer(code, "injected fault"),
            other => sandbox.fault_response(other).await,
        };
    }
    if let Err(desc) = validate(&fields) {
        return answer(414, &desc);
    }
    let traceparent = header("traceparent");
    if !traceparent.is_empty() {
        fields.insert("header.traceparent".into(), traceparent.to_string());
    }
    sandbox.record_via("netease", app, via, fields);
    answer(200, "")
}

/// The seed's rules for each form field; an error becomes a 414 with this text.
pub fn validate(fields: &BTreeMap<String, String>) -> Result<(), String> {
    const KNOWN: &[&str] = &[
        "from",
        "msgtype",
        "to",
        "attach",
        "pushcontent",
        "payload",
        "sound",
        "save",
        "option",
        "isForcePush",
        "forcePushContent",
        "forcePushAll",
        "forcePushList",
        "env",
        "checkAccidAsyncEnable",
    ];
    if let Some(unknown) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown parameter {unknown}"));
    }
    let get = |k: &str| fields.get(k).map(String::as_str);
    let max = |k: &str, n: usize| match get(k) {
        Some(v) if v.chars().count() > n => Err(format!("{k} too long, at most {n}")),
        _ => Ok(()),
    };
    for required in ["from", "msgtype", "to", "attach"] {
        if get(required).is_none_or(str::is_empty) {
            return Err(format!("{required} is required"));
        }
    }
    if !matches!(get("msgtype"), Some("0" | "1")) {
        return Err("check msgType".into());
    }
    max("from", 32)?;
    max("to", 32)?;
    max("attach", 4096)?;
    max("pushcontent", 500)?;
    max("payload", 2048)?;
    max("sound", 30)?;
    max("forcePushContent", 500)?;
    max("env", 32)?;
    if let Some(save) = get("save")
        && !matches!(save, "1" | "2")
    {
        return Err("save must be 1 or 2".into());
    }
    for flag in ["isForcePush", "forcePushAll", "checkAccidAsyncEnable"] {
        if let Some(v) = get(flag)
            && !matches!(v, "true" | "false")
        {
            return Err(format!("{flag} must be true or false"));
        }
    }
    for json_field in ["payload", "option"] {
        if let Some(v) = get(json_field)
            && !serde_json::from_str::<Value>(v).is_ok_and(|v| v.is_object())
        {
            return Err(format!("{json_field} must be a JSON object"));
        }
    }
    if let Some(list) = get("forcePushList") {
        match serde_json::from_str::<Vec<String>>(list) {
            Ok(list) if list.len() <= 100 => {}
            Ok(_) => return Err("forcePushList has more than 100 accounts".into()),
            Err(_) => return Err("forcePushList must be a JSON array of accids".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seed_example_is_valid() {
        let f = fields(&[
            ("from", "zhangsan"),
            ("msgtype", "0"),
            ("to", "lisi"),
            ("attach", r#"{"myattach":"test"}"#),
        ]);
        assert_eq!(validate(&f), Ok(()));
    }

    #[test]
    fn bad_msgtype_is_414_check_msgtype() {
        let f = fields(&[
            ("from", "a"),
            ("msgtype", "2"),
            ("to", "b"),
            ("attach", "x"),
        ]);
        assert_eq!(validate(&f), Err("check msgType".into()));
    }

    #[test]
    fn limits_and_json_fields_are_checked() {
        let long = "x".repeat(4097);
        let f = fields(&[
            ("from", "a"),
            ("msgtype", "0"),
            ("to", "b"),
            ("attach", &long),
        ]);
        assert!(validate(&f).unwrap_err().contains("attach"));
        let f = fields(&[
            ("from", "a"),
            ("msgtype", "0"),
            ("to", "b"),
            ("attach", "x"),
            ("payload", "not json"),
        ]);
        assert!(validate(&f).unwrap_err().contains("payload"));
        let f = fields(&[
            ("from", "a"),
            ("msgtype", "0"),
            ("to", "b"),
            ("attach", "x"),
            ("save", "3"),
        ]);
        assert!(validate(&f).unwrap_err().contains("save"));
    }

    fn flags(args: &[&str]) -> Result<super::super::Settings, clap::Error> {
        use clap::{Args, FromArgMatches};
        let command = super::super::Settings::augment_args(clap::Command::new("sandbox"));
        let matches = command.try_get_matches_from(["sandbox"].iter().chain(args))?;
        super::super::Settings::from_arg_matches(&matches)
    }

    #[test]
    fn flags_replace_the_default_apps_and_a_malformed_one_is_refused() {
        let app = Caller::new;
        assert_eq!(Settings::default().apps, [app("demo-app", "demo-secret")]);
        let given = flags(&[
            "--netease-app",
            "k1:s1",
            "--netease-app",
            "k2:s:2",
            "--netease-block",
            "4s",
        ])
        .unwrap();
        let netease = given.get::<Settings>();
        assert_eq!(netease.apps, [app("k1", "s1"), app("k2", "s:2")]);
        assert_eq!(
            (netease.rate_limit, netease.block),
            (100, Duration::from_secs(4))
        );
        let err = flags(&["--netease-app", "nocolon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be KEY:SECRET"), "{err}");
    }

    #[test]
    fn app_is_blocked_for_the_block_time_after_exceeding_the_limit() {
        let fake = Fake::new(&Settings {
            rate_limit: 100,
            block: Duration::from_secs(10),
            ..Settings::default()
        });
        let now = Instant::now();
        assert!(!fake.over_limit(100, "demo-app", now));
        assert!(fake.over_limit(101, "demo-app", now));
        assert!(fake.over_limit(1, "demo-app", now + Duration::from_secs(9)));
        assert!(!fake.over_limit(1, "demo-app", now + Duration::from_secs(11)));
    }
}
