//! Tencent Cloud IM: REST `v4/openim/sendmsg` (users) and
//! `v4/group_open_http_svc/send_group_msg` (groups), and the
//! `Group.CallbackSendMsgException` webhook (seed 002).
//!
//! Each message is one `TIMCustomElem` (`Data` = job data, `Desc` = job key).
//! `CloudCustomData` carries herald's part of the job (id, account, attempt,
//! push, expiry) so that a later failure callback can rebuild and retry it;
//! `MsgRandom` / `Random` is derived from the job id, stable across retries.
//! Calls are signed with a UserSig generated locally ([`super::usersig`]).

pub mod callback;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use http::Uri;
use http::header::CONTENT_TYPE;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{
    Http, Key, KeyKind, Round, Vendor, VendorSpec, http_status_answer, snippet, transport, usersig,
    without_secrets,
};
use crate::config::{AccountConfig, Secret};
use crate::constant_time::matches_any;
use crate::job::{Delivery, Job, Push, Recipient};
use crate::outcome::{Answer, Class};
use crate::redact::scrub;

pub const SPEC: VendorSpec = VendorSpec {
    id: "tencent",
    name: "Tencent Cloud IM",
    app_key: Some("sdk_app_id"),
    keys: &[
        Key {
            name: "sdk_app_id",
            kind: KeyKind::Plain,
        },
        Key {
            name: "secret_key",
            kind: KeyKind::Secret,
        },
        Key {
            name: "admin_identifier",
            kind: KeyKind::Plain,
        },
        Key {
            name: "callback_token",
            kind: KeyKind::OptionalSecret,
        },
        Key {
            name: "callback_token_previous",
            kind: KeyKind::OptionalSecret,
        },
        Key {
            name: "callback_key",
            kind: KeyKind::OptionalSecret,
        },
        Key {
            name: "callback_key_previous",
            kind: KeyKind::OptionalSecret,
        },
        Key {
            name: "callback_unsigned",
            kind: KeyKind::OptionalPlain,
        },
    ],
    // Public REST docs: sendmsg allows 200 calls per second per app by default.
    default_rate_limit: Some(200),
    default_ban: Duration::from_secs(1),
    check: |job| request(job, 1, None).map(|_| ()),
    validate,
    build,
    callback: Some(&callback::SPEC),
    account_counters: &[],
};

pub const USER_PATH: &str = "/v4/openim/sendmsg";
pub const GROUP_PATH: &str = "/v4/group_open_http_svc/send_group_msg";
/// The only callback herald serves.
pub const CALLBACK_COMMAND: &str = "Group.CallbackSendMsgException";

/// Public message limit of Tencent IM: a message body of at most 12 KB.
const MAX_BODY_BYTES: usize = 12 * 1024;

/// Tencent IM `ErrorCode`s (public REST error-code docs; 10023 from seed 002).
pub const CODES: &[(i64, Class, &str)] = &[
    (0, Class::Delivered, "OK"),
    (
        60007,
        Class::RateLimited,
        "REST API call frequency exceeds the limit",
    ),
    (
        60011,
        Class::RateLimited,
        "single-account call frequency exceeds the limit",
    ),
    (
        60018,
        Class::RateLimited,
        "request frequency exceeds the limit",
    ),
    (60019, Class::RateLimited, "frequency control"),
    (
        10023,
        Class::RateLimited,
        "msg count exceeds limit, please retry later",
    ),
    (60003, Class::Permanent, "invalid JSON in the request"),
    (90001, Class::Permanent, "JSON parse failed"),
    (20003, Class::Permanent, "invalid or unknown account"),
    (90003, Class::Permanent, "To_Account does not exist"),
    (90009, Class::Permanent, "the caller is not an app admin"),
    (10004, Class::Permanent, "invalid group parameter"),
    (10007, Class::Permanent, "no permission in this group"),
    (10010, Class::Permanent, "group does not exist"),
    (10015, Class::Permanent, "invalid group id"),
    (
        70001,
        Class::Permanent,
        "UserSig expired (after regeneration)",
    ),
    (91000, Class::Transient, "internal service error"),
    (60008, Class::Transient, "service timed out"),
];

/// UserSig expired: generate a new one and send again once.
pub const USERSIG_EXPIRED: i64 = 70001;

pub fn classify(code: i64) -> (Class, &'static str) {
    CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, class, what)| (*class, *what))
        .unwrap_or((Class::Transient, "unknown code"))
}

/// herald's part of a job, carried in `CloudCustomData` under the key `herald`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carried {
    pub id: String,
    pub account: String,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    /// The job's own `delivery`: audio-video groups report `OnlineOnlyFlag` 0 for every message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub online: bool,
    /// Unix time herald sent this attempt; a callback may come at most [`CALLBACK_MAX_AGE`] later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<u64>,
    /// Hex HMAC-SHA256 of the job and attempt ([`seal_mac`]), keyed with the
    /// account's `callback_key`, which Tencent never sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The longest a failure callback may come after herald sent the message;
/// older ones are refused, which also bounds how long a callback is remembered.
pub const CALLBACK_MAX_AGE: Duration = Duration::from_secs(600);

/// How herald seals what it sends, so that a callback can prove herald sent it.
#[derive(Debug, Clone, Copy)]
pub struct Seal<'a> {
    pub key: &'a str,
    pub sent_at: u64,
}

/// HMAC-SHA256 over every field a callback rebuilds the job from, with the
/// attempt and the send time. Fields are length-prefixed, so no two different
/// jobs share an input.
pub fn seal_mac(key: &str, job: &Job, attempt: u32, sent_at: u64) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    let (kind, to) = match &job.to {
        Recipient::User(u) => ("user", u.as_str()),
        Recipient::Group(g) => ("group", g.as_str()),
    };
    let expires = job
        .expires_at
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default();
    let push = job
        .push
        .as_ref()
        .map(|p| serde_json::to_string(p).expect("push serializes"))
        .unwrap_or_default();
    let delivery = match job.delivery {
        Delivery::Online => "online",
        Delivery::Persistent => "persistent",
    };
    let attempt = attempt.to_string();
    let sent_at = sent_at.to_string();
    let data = job.data_text();
    for field in [
        "herald-tencent-callback-v1",
        &job.id,
        &job.account,
        &attempt,
        &sent_at,
        kind,
        to,
        &job.from,
        &job.key,
        &data,
        delivery,
        &expires,
        &push,
    ] {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field.as_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// `MsgRandom` for a job: the first 32 bits of SHA-256 of its id.
pub fn msg_random(id: &str) -> u32 {
    let digest = Sha256::digest(id.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The request path and JSON body for one attempt of a job; `seal` is present
/// when the account takes failure callbacks (it has a `callback_key`).
pub fn request(
    job: &Job,
    attempt: u32,
    seal: Option<Seal<'_>>,
) -> Result<(&'static str, Value), String> {
    if let Some((name, _)) = job.options.iter().next() {
        return Err(format!(
            "unknown option `{name}` for tencent; it takes no options"
        ));
    }
    let data = job.data_text();
    if data.len() + job.key.len() > MAX_BODY_BYTES {
        return Err(format!(
            "data and key are {} bytes, the vendor allows at most {MAX_BODY_BYTES} per message",
            data.len() + job.key.len()
        ));
    }
    let carried = Carried {
        id: job.id.clone(),
        account: job.account.clone(),
        attempt,
        expires_at: job.expires_at,
        push: job.push.clone(),
        online: job.delivery == Delivery::Online,
        sent_at: seal.map(|s| s.sent_at),
        mac: seal.map(|s| hex::encode(seal_mac(s.key, job, attempt, s.sent_at))),
    };
    let custom = json!({"herald": carried}).to_string();
    let msg_body = json!([{"MsgType": "TIMCustomElem", "MsgContent": {"Data": data, "Desc": job.key, "Ext": ""}}]);
    let online = job.delivery == Delivery::Online;
    let mut body = Map::new();
    let path = match &job.to {
        Recipient::User(to) => {
            body.insert("SyncOtherMachine".into(), json!(2));
            body.insert("From_Account".into(), json!(job.from));
            body.insert("To_Account".into(), json!(to));
            body.insert("MsgRandom".into(), json!(msg_random(&job.id)));
            if online {
                // MsgLifeTime 0: not stored for offline delivery.
                body.insert("MsgLifeTime".into(), json!(0));
            }
            USER_PATH
        }
        Recipient::Group(group) => {
            body.insert("GroupId".into(), json!(group));
            body.insert("From_Account".into(), json!(job.from));
            body.insert("Random".into(), json!(msg_random(&job.id)));
            if online {
                body.insert("OnlineOnlyFlag".into(), json!(1));
            }
            GROUP_PATH
        }
    };
    body.insert("MsgBody".into(), msg_body);
    body.insert("CloudCustomData".into(), json!(custom));
    if let Some(push) = &job.push {
        let mut info = Map::new();
        info.insert("PushFlag".into(), json!(0));
        if let Some(content) = &push.content {
            info.insert("Desc".into(), json!(content));
        }
        if let Some(payload) = &push.payload {
            info.insert(
                "Ext".into(),
                json!(Value::Object(payload.clone()).to_string()),
            );
        }
        if let Some(sound) = &push.sound {
            info.insert("ApnsInfo".into(), json!({"Sound": sound}));
        }
        body.insert("OfflinePushInfo".into(), Value::Object(info));
    }
    Ok((path, Value::Object(body)))
}

#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "ActionStatus", default)]
    action_status: String,
    #[serde(rename = "ErrorCode")]
    error_code: i64,
    #[serde(rename = "ErrorInfo", default)]
    error_info: String,
    /// A user message's id (sendmsg).
    #[serde(rename = "MsgKey", default)]
    msg_key: Option<String>,
    /// A group message's sequence number (send_group_msg).
    #[serde(rename = "MsgSeq", default)]
    msg_seq: Option<u64>,
}

/// Classifies an HTTP answer of the REST API.
pub fn classify_reply(status: http::StatusCode, text: &str) -> (Answer, Option<i64>) {
    if !status.is_success() {
        return (http_status_answer(status, text), None);
    }
    let Ok(reply) = serde_json::from_str::<Reply>(text) else {
        let detail = format!(
            "vendor answered something that is not its JSON: {}",
            snippet(text)
        );
        return (
            Answer::new(Class::Transient, Some("garbage".into()), detail),
            None,
        );
    };
    if reply.error_code == 0 && reply.action_status == "OK" {
        let id = reply
            .msg_key
            .filter(|k| !k.is_empty())
            .or(reply.msg_seq.map(|s| s.to_string()));
        return (Answer::delivered_as(id), Some(0));
    }
    let (class, meaning) = classify(reply.error_code);
    let detail = format!(
        "tencent {} {meaning}: {}",
        reply.error_code, reply.error_info
    );
    (
        Answer::new(class, Some(reply.error_code.to_string()), detail),
        Some(reply.error_code),
    )
}

struct Client {
    http: Http,
    base: String,
    sdk_app_id: u64,
    secret_key: Secret,
    admin: String,
    /// Seals `CloudCustomData` for failure callbacks; absent when they are off.
    callback_key: Option<Secret>,
    /// UserSig and the unix time after which it is regenerated.
    usersig: Mutex<Option<(String, u64)>>,
}

/// UserSigs herald generates live this long; they are renewed an hour before.
const USERSIG_LIFETIME: u64 = 86_400;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub fn sdk_app_id(account: &AccountConfig) -> anyhow::Result<u64> {
    let raw = account.credentials.require("sdk_app_id")?;
    raw.parse()
        .map_err(|_| anyhow::anyhow!("sdk_app_id must be the numeric SDKAppID, got `{raw}`"))
}

/// A numeric SDKAppID and consistent callback keys: what `build` reads, checked without building.
fn validate(account: &AccountConfig) -> anyhow::Result<()> {
    sdk_app_id(account)?;
    CallbackSettings::from_account(account)?;
    Ok(())
}

fn build(account: &AccountConfig) -> anyhow::Result<Arc<dyn Vendor>> {
    let base = account.base_url.as_str().trim_end_matches('/').to_string();
    Ok(Arc::new(Client {
        http: Http::new(&base.parse()?, account.timeout)?,
        base,
        sdk_app_id: sdk_app_id(account)?,
        secret_key: Secret::new(account.credentials.require("secret_key")?),
        admin: account.credentials.require("admin_identifier")?.to_string(),
        callback_key: CallbackSettings::from_account(account)?
            .keys
            .into_iter()
            .next(),
        usersig: Mutex::new(None),
    }))
}

impl Client {
    async fn usersig(&self, renew: bool) -> String {
        let mut cached = self.usersig.lock().await;
        let now = unix_now();
        if let Some((sig, renew_at)) = cached.as_ref()
            && !renew
            && now < *renew_at
        {
            return sig.clone();
        }
        let sig = usersig::generate(
            self.sdk_app_id,
            self.secret_key.expose(),
            &self.admin,
            now,
            USERSIG_LIFETIME,
        );
        *cached = Some((sig.clone(), now + USERSIG_LIFETIME - 3600));
        sig
    }

    /// One request; the credentials it carries are masked in whatever of the answer becomes text.
    async fn post(&self, path: &str, body: &Value, usersig: &str) -> (Answer, Option<i64>) {
        let secrets = [usersig, self.secret_key.expose()];
        match self.exchange(path, body, usersig).await {
            // Masked before classifying too: the detail keeps a snippet, which may cut a secret in two.
            Ok((status, text)) => {
                let (answer, code) = classify_reply(status, &scrub(&text, &secrets));
                (without_secrets(answer, &secrets), code)
            }
            Err(answer) => (without_secrets(answer, &secrets), None),
        }
    }

    async fn exchange(
        &self,
        path: &str,
        body: &Value,
        usersig: &str,
    ) -> Result<(http::StatusCode, String), Answer> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("sdkappid", &self.sdk_app_id.to_string())
            .append_pair("identifier", &self.admin)
            .append_pair("usersig", usersig)
            .append_pair("random", &rand::random::<u32>().to_string())
            .append_pair("contenttype", "json")
            .finish();
        // Not quoted in the error: the query holds the UserSig.
        let uri: Uri = format!("{}{path}?{query}", self.base)
            .parse()
            .map_err(|_| {
                Answer::new(
                    Class::Transient,
                    Some("transport".into()),
                    "the request URI is not valid",
                )
            })?;
        let mut headers = crate::telemetry::http_headers();
        headers.insert(CONTENT_TYPE, transport::JSON);
        self.http
            .post(uri, headers, transport::json_body(body)?)
            .await
    }
}

#[async_trait]
impl Vendor for Client {
    async fn send(&self, job: &Job, attempt: u32, round: Round) -> Answer {
        let seal = self.callback_key.as_ref().map(|key| Seal {
            key: key.expose(),
            sent_at: unix_now(),
        });
        let (path, body) = match request(job, attempt, seal) {
            Ok(r) => r,
            Err(e) => return Answer::new(Class::Permanent, None, e),
        };
        let (answer, code) = self.post(path, &body, &self.usersig(false).await).await;
        if code == Some(USERSIG_EXPIRED) && round == Round::First {
            // A second 70001 right after renewing is final (the code table's entry).
            self.usersig(true).await;
            return Answer::credentials_renewed(
                answer.code,
                "UserSig expired; generated a new one",
            );
        }
        answer
    }
}

/// `Sign` of a callback: hex SHA-256 of the callback token followed by `RequestTime`.
pub fn callback_sign(token: &str, request_time: &str) -> String {
    hex::encode(Sha256::digest(format!("{token}{request_time}").as_bytes()))
}

/// Checks a callback's signature against any of `tokens` (current, previous)
/// and its freshness (at most 60 s from `now`). The comparison takes the same
/// time wherever the signatures differ.
pub fn verify_callback(
    tokens: &[&str],
    sign: Option<&str>,
    request_time: Option<&str>,
    now: u64,
) -> Result<(), String> {
    let (Some(sign), Some(time)) = (sign, request_time) else {
        return Err("callback is not signed: Sign and RequestTime are required".into());
    };
    let t: u64 = time
        .parse()
        .map_err(|_| "RequestTime is not a unix time".to_string())?;
    if t.abs_diff(now) > 60 {
        return Err("RequestTime is more than 60 s away from now".into());
    }
    let given = hex::decode(sign).unwrap_or_default();
    let expected = tokens
        .iter()
        .map(|token| Sha256::digest(format!("{token}{time}").as_bytes()));
    if !matches_any(&given, expected) {
        return Err("Sign does not match".into());
    }
    Ok(())
}

/// How an account takes failure callbacks, read from its keys.
#[derive(Debug, Clone, Default)]
pub struct CallbackSettings {
    /// `callback_token`, then `callback_token_previous`; empty when unsigned callbacks are allowed.
    pub tokens: Vec<Secret>,
    /// `callback_key`, then `callback_key_previous`; empty when callbacks are off.
    pub keys: Vec<Secret>,
}

/// A `callback_key` shorter than this is refused: it is the only thing between a forger and the admin account.
pub const MIN_CALLBACK_KEY_LEN: usize = 32;

impl CallbackSettings {
    pub fn from_account(account: &AccountConfig) -> anyhow::Result<Self> {
        let get = |k: &str| account.credentials.get(k);
        let unsigned = match get("callback_unsigned") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => anyhow::bail!("callback_unsigned must be true or false, got `{other}`"),
        };
        let pair = |current: &str, previous: &str| -> anyhow::Result<Vec<Secret>> {
            match (get(current), get(previous)) {
                (None, Some(_)) => {
                    anyhow::bail!("{previous} is set but {current} is not; set {current} first")
                }
                (c, p) => Ok(c.into_iter().chain(p).map(Secret::new).collect()),
            }
        };
        let tokens = pair("callback_token", "callback_token_previous")?;
        let keys = pair("callback_key", "callback_key_previous")?;
        if let Some(short) = keys
            .iter()
            .find(|k| k.expose().chars().count() < MIN_CALLBACK_KEY_LEN)
        {
            let n = short.expose().chars().count();
            anyhow::bail!(
                "callback_key (or its previous value) is {n} characters; use at least {MIN_CALLBACK_KEY_LEN} random ones, e.g. `openssl rand -hex 32`"
            );
        }
        match (tokens.is_empty(), keys.is_empty(), unsigned) {
            (false, true, _) => anyhow::bail!(
                "callback_token is set but callback_key is not: without it herald cannot tell its own messages from forged ones. Set callback_key to a random secret (at least {MIN_CALLBACK_KEY_LEN} characters, the same on every replica), or remove callback_token to keep the callback route off"
            ),
            (false, false, true) => anyhow::bail!(
                "callback_unsigned = true and callback_token are both set; remove one"
            ),
            (true, false, false) => anyhow::bail!(
                "callback_key is set but callback_token is not: set callback_token to the token of the IM console's callback settings, or callback_unsigned = true to accept callbacks without a Sign (not recommended)"
            ),
            (true, true, true) => anyhow::bail!(
                "callback_unsigned = true needs callback_key; without it the callback route stays off"
            ),
            _ => Ok(Self { tokens, keys }),
        }
    }

    /// Failure callbacks are taken for this account.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Callbacks are taken without checking Tencent's `Sign` (explicit opt-out).
    pub fn unsigned(&self) -> bool {
        self.enabled() && self.tokens.is_empty()
    }
}

/// Why a rebuilt callback job is not herald's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// `CloudCustomData` is in herald's shape but carries no seal.
    Unsealed,
    /// The seal does not match the message under any configured key.
    BadSeal,
    /// Sealed more than [`CALLBACK_MAX_AGE`] ago, or in the future.
    Stale,
}

impl Forgery {
    pub fn as_str(self) -> &'static str {
        match self {
            Forgery::Unsealed => "unsealed",
            Forgery::BadSeal => "bad_seal",
            Forgery::Stale => "stale",
        }
    }
}

/// Checks that herald itself sealed attempt `attempt` of `job` with one of
/// `keys`, at most [`CALLBACK_MAX_AGE`] before `now` (a minute of clock skew
/// between replicas is tolerated the other way).
pub fn authenticate(
    job: &Job,
    attempt: u32,
    seal: Option<&CarriedSeal>,
    keys: &[&str],
    now: u64,
) -> Result<(), Forgery> {
    let seal = seal.ok_or(Forgery::Unsealed)?;
    let given = hex::decode(&seal.mac).unwrap_or_default();
    let expected = keys
        .iter()
        .map(|key| seal_mac(key, job, attempt, seal.sent_at));
    if !matches_any(&given, expected) {
        return Err(Forgery::BadSeal);
    }
    let age = now as i128 - seal.sent_at as i128;
    if age > CALLBACK_MAX_AGE.as_secs() as i128 || age < -60 {
        return Err(Forgery::Stale);
    }
    Ok(())
}

/// The body of `Group.CallbackSendMsgException` (seed 002).
#[derive(Debug, Clone, Deserialize)]
pub struct SendMsgException {
    #[serde(rename = "CallbackCommand")]
    pub command: String,
    #[serde(rename = "GroupId")]
    pub group_id: String,
    #[serde(rename = "From_Account")]
    pub from_account: String,
    #[serde(rename = "Random", default)]
    pub random: u64,
    #[serde(rename = "OnlineOnlyFlag", default)]
    pub online_only: u8,
    #[serde(rename = "MsgBody", default)]
    pub msg_body: Vec<Value>,
    #[serde(rename = "CloudCustomData", default)]
    pub cloud_custom_data: String,
    #[serde(rename = "ErrorCode")]
    pub error_code: i64,
    #[serde(rename = "ErrorInfo", default)]
    pub error_info: String,
    #[serde(rename = "EventTime", default)]
    pub event_time: Value,
}

/// What herald does with a failure callback.
#[derive(Debug, Clone, PartialEq)]
pub enum CallbackVerdict {
    /// Not a message herald sent: log and count, nothing else.
    Foreign,
    /// Retry (frequency codes such as 10023) or dead-letter (anything else) this
    /// job, once [`authenticate`] accepts `seal`.
    Job {
        job: Box<Job>,
        attempt: u32,
        class: Class,
        seal: Option<CarriedSeal>,
    },
}

/// The send time and MAC a callback carries back, as herald wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedSeal {
    pub sent_at: u64,
    pub mac: String,
}

/// Rebuilds the job from `CloudCustomData` and the callback body.
pub fn rebuild(event: &SendMsgException) -> Result<CallbackVerdict, String> {
    let Some(carried) = serde_json::from_str::<Value>(&event.cloud_custom_data)
        .ok()
        .and_then(|v| serde_json::from_value::<Carried>(v.get("herald")?.clone()).ok())
    else {
        return Ok(CallbackVerdict::Foreign);
    };
    let element = event
        .msg_body
        .iter()
        .find(|e| e["MsgType"] == "TIMCustomElem")
        .ok_or("MsgBody has no TIMCustomElem")?;
    let content = &element["MsgContent"];
    let (Some(data), Some(key)) = (content["Data"].as_str(), content["Desc"].as_str()) else {
        return Err("TIMCustomElem lacks Data or Desc".into());
    };
    let job = Job {
        v: 1,
        id: carried.id,
        vendor: SPEC.id.into(),
        account: carried.account,
        from: event.from_account.clone(),
        to: Recipient::Group(event.group_id.clone()),
        key: key.into(),
        data: Value::String(data.into()),
        delivery: if carried.online || event.online_only == 1 {
            Delivery::Online
        } else {
            Delivery::Persistent
        },
        push: carried.push,
        expires_at: carried.expires_at,
        options: Map::new(),
    };
    // The id and account come from the callback body: hold them to the contract
    // before they become a message_id and a routing key.
    job.check()
        .map_err(|e| format!("CloudCustomData carries a job herald would not send: {e}"))?;
    let seal = carried
        .sent_at
        .zip(carried.mac)
        .map(|(sent_at, mac)| CarriedSeal { sent_at, mac });
    Ok(CallbackVerdict::Job {
        job: Box::new(job),
        attempt: carried.attempt,
        class: classify(event.error_code).0,
        seal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(to: &str, extra: &str) -> Job {
        let text = format!(
            r#"{{"id":"j-1","vendor":"tencent","account":"main","from":"admin","to":{to},"key":"order.shipped","data":{{"o":1}}{extra}}}"#
        );
        Job::parse(text.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn user_job_maps_to_sendmsg_with_a_custom_element() {
        let (path, b) = request(&job(r#"{"user":"u1"}"#, r#","delivery":"online","push":{"content":"hi","payload":{"k":"v"},"sound":"a.wav"}"#), 3, None).unwrap();
        assert_eq!(path, USER_PATH);
        assert_eq!(b["To_Account"], "u1");
        assert_eq!(b["From_Account"], "admin");
        assert_eq!(b["MsgRandom"], msg_random("j-1"));
        assert_eq!(b["MsgLifeTime"], 0);
        assert_eq!(b["MsgBody"][0]["MsgType"], "TIMCustomElem");
        assert_eq!(b["MsgBody"][0]["MsgContent"]["Data"], r#"{"o":1}"#);
        assert_eq!(b["MsgBody"][0]["MsgContent"]["Desc"], "order.shipped");
        assert_eq!(b["OfflinePushInfo"]["Desc"], "hi");
        assert_eq!(b["OfflinePushInfo"]["Ext"], r#"{"k":"v"}"#);
        assert_eq!(b["OfflinePushInfo"]["ApnsInfo"]["Sound"], "a.wav");
        let custom: Value = serde_json::from_str(b["CloudCustomData"].as_str().unwrap()).unwrap();
        assert_eq!(custom["herald"]["id"], "j-1");
        assert_eq!(custom["herald"]["attempt"], 3);
    }

    #[test]
    fn group_job_maps_to_send_group_msg_and_persistent_is_not_online_only() {
        let (path, b) = request(&job(r#"{"group":"@TGS#1"}"#, ""), 1, None).unwrap();
        assert_eq!(path, GROUP_PATH);
        assert_eq!(b["GroupId"], "@TGS#1");
        assert_eq!(b["Random"], msg_random("j-1"));
        assert!(b.get("OnlineOnlyFlag").is_none());
        assert!(b.get("OfflinePushInfo").is_none());
    }

    #[test]
    fn a_delivery_carries_tencents_message_id() {
        let ok = http::StatusCode::OK;
        let user = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","MsgTime":1,"MsgKey":"123_456_1"}"#;
        assert_eq!(
            classify_reply(ok, user).0.message_id.as_deref(),
            Some("123_456_1")
        );
        let group = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","MsgTime":1,"MsgSeq":42}"#;
        assert_eq!(
            classify_reply(ok, group).0.message_id.as_deref(),
            Some("42")
        );
    }

    #[test]
    fn msg_random_is_stable_per_job() {
        assert_eq!(msg_random("a"), msg_random("a"));
        assert_ne!(msg_random("a"), msg_random("b"));
    }

    #[test]
    fn options_and_oversize_data_are_refused() {
        assert!(
            request(&job(r#"{"user":"u"}"#, r#","options":{"x":1}"#), 1, None)
                .unwrap_err()
                .contains("unknown option")
        );
        let mut j = job(r#"{"user":"u"}"#, "");
        j.data = Value::String("x".repeat(13_000));
        assert!(request(&j, 1, None).unwrap_err().contains("12288"));
    }

    #[test]
    fn code_table() {
        let ok = http::StatusCode::OK;
        assert_eq!(
            classify_reply(ok, r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#).0,
            Answer::delivered()
        );
        for code in [60007, 60011, 60018, 60019] {
            assert_eq!(classify(code).0, Class::RateLimited, "{code}");
        }
        for code in [60003, 90001, 20003, 90003, 90009] {
            assert_eq!(classify(code).0, Class::Permanent, "{code}");
        }
        for code in [91000, 60008, 12345] {
            assert_eq!(classify(code).0, Class::Transient, "{code}");
        }
        let (a, code) = classify_reply(
            ok,
            r#"{"ActionStatus":"FAIL","ErrorCode":70001,"ErrorInfo":"sig expired"}"#,
        );
        assert_eq!((code, a.code.as_deref()), (Some(70001), Some("70001")));
        assert_eq!(classify_reply(ok, "nope").0.class, Class::Transient);
    }

    #[test]
    fn callback_sign_matches_the_documented_example() {
        assert_eq!(
            callback_sign("xxxxyyyy", "1669872112"),
            "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
        );
        let sign = callback_sign("xxxxyyyy", "1669872112");
        let t = Some("1669872112");
        assert!(verify_callback(&["xxxxyyyy"], Some(&sign), t, 1669872150).is_ok());
        assert!(
            verify_callback(&["new", "xxxxyyyy"], Some(&sign), t, 1669872150).is_ok(),
            "the previous token still verifies during a rotation"
        );
        assert!(verify_callback(&["xxxxyyyy"], Some(&sign.to_uppercase()), t, 1669872150).is_ok());
        assert!(
            verify_callback(&["xxxxyyyy"], Some(&sign), t, 1669872200)
                .unwrap_err()
                .contains("60 s")
        );
        for bad in [&sign[..62], "zz", ""] {
            assert!(
                verify_callback(&["xxxxyyyy"], Some(bad), t, 1669872112)
                    .unwrap_err()
                    .contains("Sign")
            );
        }
        assert!(
            verify_callback(&["other"], Some(&sign), t, 1669872112)
                .unwrap_err()
                .contains("Sign")
        );
        assert!(
            verify_callback(&["xxxxyyyy"], None, None, 0)
                .unwrap_err()
                .contains("required")
        );
    }

    #[test]
    fn a_callback_rebuilds_the_job_herald_sent() {
        let original = job(
            r#"{"group":"@TGS#2J4SZEAEL"}"#,
            r#","delivery":"online","push":{"content":"hi"}"#,
        );
        let key = "k".repeat(32);
        let seal = Seal {
            key: &key,
            sent_at: 1_670_574_400,
        };
        let (_, sent) = request(&original, 2, Some(seal)).unwrap();
        let event: SendMsgException = serde_json::from_value(json!({
            "CallbackCommand": CALLBACK_COMMAND, "GroupId": "@TGS#2J4SZEAEL", "Type": "Public",
            "From_Account": "admin", "Operator_Account": "admin", "Random": sent["Random"],
            "OnlineOnlyFlag": 1, "MsgBody": sent["MsgBody"], "CloudCustomData": sent["CloudCustomData"],
            "ErrorCode": 10023, "ErrorInfo": "msg count exceeds limit,please retry later", "EventTime": "1670574414123"
        }))
        .unwrap();
        let CallbackVerdict::Job {
            job,
            attempt,
            class,
            seal: carried,
        } = rebuild(&event).unwrap()
        else {
            panic!("foreign")
        };
        assert_eq!((attempt, class), (2, Class::RateLimited));
        assert_eq!(job.id, original.id);
        assert_eq!(job.delivery, Delivery::Online);
        assert_eq!(job.push, original.push);
        assert_eq!(
            authenticate(&job, attempt, carried.as_ref(), &[&key], seal.sent_at + 30),
            Ok(())
        );
        // Sending the rebuilt job puts the same message on the wire.
        let (_, resent) = request(&job, 3, None).unwrap();
        assert_eq!(resent["MsgBody"], sent["MsgBody"]);
        assert_eq!(resent["Random"], sent["Random"]);
    }

    /// A callback for `job`'s attempt 1, sealed with `key` at `sent_at`, as Tencent would echo it.
    fn sealed_event(job: &Job, key: &str, sent_at: u64) -> Value {
        let (_, sent) = request(job, 1, Some(Seal { key, sent_at })).unwrap();
        json!({
            "CallbackCommand": CALLBACK_COMMAND, "GroupId": sent["GroupId"], "From_Account": sent["From_Account"],
            "MsgBody": sent["MsgBody"], "CloudCustomData": sent["CloudCustomData"], "ErrorCode": 10023
        })
    }

    fn check(event: Value, keys: &[&str], now: u64) -> Result<(), Forgery> {
        let event: SendMsgException = serde_json::from_value(event).unwrap();
        let CallbackVerdict::Job {
            job, attempt, seal, ..
        } = rebuild(&event).unwrap()
        else {
            panic!("foreign")
        };
        authenticate(&job, attempt, seal.as_ref(), keys, now)
    }

    #[test]
    fn any_change_to_what_herald_sealed_is_refused() {
        let key = "k".repeat(32);
        let original = job(r#"{"group":"@TGS#real"}"#, "");
        let event = sealed_event(&original, &key, 1000);
        assert_eq!(check(event.clone(), &[&key], 1010), Ok(()));
        let custom = |event: &Value| -> Value {
            serde_json::from_str(event["CloudCustomData"].as_str().unwrap()).unwrap()
        };
        let with_custom = |mut event: Value, custom: Value| {
            event["CloudCustomData"] = json!(custom.to_string());
            event
        };
        let mut tampered = Vec::new();
        for (pointer, value) in [
            ("/GroupId", json!("@TGS#evil")),
            ("/From_Account", json!("someone")),
            ("/MsgBody/0/MsgContent/Data", json!("phish")),
            ("/MsgBody/0/MsgContent/Desc", json!("other.key")),
        ] {
            let mut e = event.clone();
            *e.pointer_mut(pointer).unwrap() = value;
            tampered.push((pointer.to_string(), e));
        }
        for (field, value) in [
            ("attempt", json!(0)),
            ("id", json!("j-2")),
            ("online", json!(true)),
            ("push", json!({"content": "click here"})),
            ("expires_at", json!("2099-01-01T00:00:00Z")),
            ("sent_at", json!(1001)),
        ] {
            let mut c = custom(&event);
            c["herald"][field] = value;
            tampered.push((field.to_string(), with_custom(event.clone(), c)));
        }
        for (what, e) in tampered {
            assert_eq!(check(e, &[&key], 1010), Err(Forgery::BadSeal), "{what}");
        }
        let mut c = custom(&event);
        c["herald"].as_object_mut().unwrap().remove("mac");
        assert_eq!(
            check(with_custom(event.clone(), c), &[&key], 1010),
            Err(Forgery::Unsealed)
        );
        assert_eq!(
            check(event.clone(), &[&"x".repeat(32)], 1010),
            Err(Forgery::BadSeal),
            "another key"
        );
    }

    #[test]
    fn a_seal_holds_for_its_window_and_under_the_previous_key() {
        let (old, new) = ("o".repeat(32), "n".repeat(32));
        let event = sealed_event(&job(r#"{"group":"g"}"#, ""), &old, 1000);
        let max = CALLBACK_MAX_AGE.as_secs();
        assert_eq!(check(event.clone(), &[&new, &old], 1000 + max), Ok(()));
        assert_eq!(
            check(event.clone(), &[&new, &old], 1001 + max),
            Err(Forgery::Stale)
        );
        assert_eq!(check(event.clone(), &[&old], 939), Err(Forgery::Stale));
        assert_eq!(check(event, &[&new], 1000), Err(Forgery::BadSeal));
    }

    fn settings(keys: &[(&str, &str)]) -> anyhow::Result<CallbackSettings> {
        let mut account: AccountConfig = toml::from_str(
            "vendor = \"tencent\"\nname = \"main\"\nbase_url = \"http://127.0.0.1:1\"",
        )
        .unwrap();
        account.credentials = crate::config::Credentials::from_pairs(keys.iter().copied());
        CallbackSettings::from_account(&account)
    }

    #[test]
    fn callbacks_are_off_unless_sealed_and_signed_or_explicitly_unsigned() {
        let key = "k".repeat(32);
        let off = settings(&[]).unwrap();
        assert!(!off.enabled());
        let signed = settings(&[("callback_token", "t"), ("callback_key", &key)]).unwrap();
        assert!(signed.enabled() && !signed.unsigned());
        let unsigned = settings(&[("callback_unsigned", "true"), ("callback_key", &key)]).unwrap();
        assert!(unsigned.enabled() && unsigned.unsigned());
        for (keys, says) in [
            (vec![("callback_token", "t")], "callback_key is not"),
            (
                vec![("callback_key", key.as_str())],
                "callback_token is not",
            ),
            (vec![("callback_unsigned", "true")], "needs callback_key"),
            (
                vec![("callback_token", "t"), ("callback_key", "short")],
                "at least 32",
            ),
            (
                vec![("callback_token_previous", "t")],
                "set callback_token first",
            ),
            (vec![("callback_unsigned", "yes")], "true or false"),
        ] {
            let err = settings(&keys).unwrap_err().to_string();
            assert!(err.contains(says), "{keys:?}: {err}");
            assert!(!err.contains(&key), "the key is never printed: {err}");
        }
    }

    #[test]
    fn a_callback_without_herald_data_is_foreign() {
        let event: SendMsgException = serde_json::from_value(json!({
            "CallbackCommand": CALLBACK_COMMAND, "GroupId": "g", "From_Account": "a",
            "MsgBody": [], "CloudCustomData": "your cloud custom data", "ErrorCode": 10023
        }))
        .unwrap();
        assert_eq!(rebuild(&event).unwrap(), CallbackVerdict::Foreign);
    }

    #[test]
    fn a_callback_whose_job_breaks_the_contract_is_refused_not_rebuilt() {
        let mut original = job(r#"{"group":"@TGS#1"}"#, "");
        original.id = "测".repeat(90);
        let (_, sent) = request(&original, u32::MAX, None).unwrap();
        let event: SendMsgException = serde_json::from_value(json!({
            "CallbackCommand": CALLBACK_COMMAND, "GroupId": "@TGS#1", "From_Account": "admin",
            "MsgBody": sent["MsgBody"], "CloudCustomData": sent["CloudCustomData"], "ErrorCode": 10023
        }))
        .unwrap();
        let err = rebuild(&event).unwrap_err();
        assert!(err.contains("`id`") && err.contains("255 bytes"), "{err}");
    }

    #[test]
    fn a_callback_carrying_attempt_u32_max_is_exhausted_without_overflow() {
        let original = job(r#"{"group":"@TGS#1"}"#, "");
        let (_, sent) = request(&original, u32::MAX, None).unwrap();
        let event: SendMsgException = serde_json::from_value(json!({
            "CallbackCommand": CALLBACK_COMMAND, "GroupId": "@TGS#1", "From_Account": "admin",
            "MsgBody": sent["MsgBody"], "CloudCustomData": sent["CloudCustomData"], "ErrorCode": 10023
        }))
        .unwrap();
        let Ok(CallbackVerdict::Job { attempt, .. }) = rebuild(&event) else {
            panic!("not rebuilt")
        };
        assert_eq!(attempt, u32::MAX);
        let policy = crate::outcome::Policy {
            tiers: vec![Duration::from_secs(1)],
            max_attempts: 5,
            ban: Duration::from_secs(1),
        };
        assert_eq!(
            crate::outcome::decide_late_failure(Class::RateLimited, attempt, false, &policy),
            crate::outcome::Destination::Dead(crate::outcome::Reason::Exhausted)
        );
    }
}
