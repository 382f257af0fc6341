//! NetEase Yunxin IM: custom system notifications (`msg/sendAttachMsg.action`, seed 001).
//!
//! Form-encoded POST signed with `CheckSum = sha1(AppSecret + Nonce + CurTime)`.
//! Errors arrive as HTTP 200 with `{"code": N, "desc": "…"}`; [`CODES`] classifies them.
//! The app may make 100 requests per second; above that it is blocked for 10 s.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::Uri;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;
use sha1::{Digest, Sha1};

use super::{
    Http, Key, KeyKind, Round, Vendor, VendorSpec, check_len, http_status_answer, snippet,
    transport, without_secrets,
};
use crate::config::{AccountConfig, Secret};
use crate::job::{Delivery, Job, Recipient};
use crate::outcome::{Answer, Class};
use crate::redact::scrub;

pub const SPEC: VendorSpec = VendorSpec {
    id: "netease",
    name: "NetEase Yunxin",
    app_key: Some("app_key"),
    keys: &[
        Key {
            name: "app_key",
            kind: KeyKind::Plain,
        },
        Key {
            name: "app_secret",
            kind: KeyKind::Secret,
        },
    ],
    // Seed 001: "单个应用默认最高调用频率:100 次/秒。如超限,将被屏蔽 10 秒。"
    default_rate_limit: Some(100),
    default_ban: Duration::from_secs(10),
    check: |job| form(job).map(|_| ()),
    // Presence and secrecy of its keys are all it needs; config checks those.
    validate: |_| Ok(()),
    build,
    callback: None,
    account_counters: &[],
};

/// Path of the API below the account's `base_url` (e.g. `https://api.netease.im/nimserver`).
pub const SEND_PATH: &str = "/msg/sendAttachMsg.action";

/// NetEase status codes, from seed 001 (200, 414, 403, 500) and the public
/// status-code page of the NetEase IM server API (the others).
pub const CODES: &[(i64, Class, &str)] = &[
    (200, Class::Delivered, "success"),
    (
        403,
        Class::Permanent,
        "forbidden: app permission check failed",
    ),
    (404, Class::Permanent, "not found"),
    (405, Class::Permanent, "parameter too long"),
    (408, Class::Transient, "request timed out at the vendor"),
    (
        414,
        Class::Permanent,
        "parameter error (also a bad CheckSum or CurTime)",
    ),
    (
        416,
        Class::RateLimited,
        "frequency control: the app is blocked for 10 s",
    ),
    (417, Class::Permanent, "repeated operation"),
    (431, Class::Transient, "repeated HTTP request"),
    (500, Class::Transient, "internal server error"),
    (503, Class::Transient, "server busy"),
    (514, Class::Transient, "service unavailable"),
];

/// Codes not in the table are retried, and end as `exhausted` if they persist.
pub fn classify(code: i64) -> (Class, &'static str) {
    CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, class, what)| (*class, *what))
        .unwrap_or((Class::Transient, "unknown code"))
}

// Field limits of seed 001, in characters.
const MAX_ACCID: usize = 32;
const MAX_ATTACH: usize = 4096;
const MAX_PUSHCONTENT: usize = 500;
const MAX_PAYLOAD: usize = 2048;
const MAX_SOUND: usize = 30;
const MAX_FORCE_PUSH_CONTENT: usize = 500;
const MAX_FORCE_PUSH_LIST: usize = 100;
const MAX_ENV: usize = 32;

/// The job's `options` this vendor understands, with the type each must have.
pub const OPTIONS: &[(&str, &str)] = &[
    ("option", "object"),
    ("isForcePush", "bool"),
    ("forcePushContent", "string"),
    ("forcePushAll", "bool"),
    ("forcePushList", "array of strings"),
    ("env", "string"),
    ("checkAccidAsyncEnable", "bool"),
];

/// Maps a job onto the form fields of `sendAttachMsg.action`, enforcing the seed's limits.
///
/// `attach` is `{"key": …, "data": …}` so clients receive the business key with the data.
pub fn form(job: &Job) -> Result<Vec<(&'static str, String)>, String> {
    check_len("from", &job.from, MAX_ACCID)?;
    check_len("to", job.to.id(), MAX_ACCID)?;
    let attach = serde_json::json!({"key": job.key, "data": job.data}).to_string();
    check_len("attach (the JSON of key and data)", &attach, MAX_ATTACH)?;
    let msgtype = match job.to {
        Recipient::User(_) => "0",
        Recipient::Group(_) => "1",
    };
    let save = match job.delivery {
        Delivery::Online => "1",
        Delivery::Persistent => "2",
    };
    let mut fields = vec![
        ("from", job.from.clone()),
        ("msgtype", msgtype.to_string()),
        ("to", job.to.id().to_string()),
        ("attach", attach),
        ("save", save.to_string()),
    ];
    if let Some(push) = &job.push {
        if let Some(content) = &push.content {
            check_len("push.content (pushcontent)", content, MAX_PUSHCONTENT)?;
            fields.push(("pushcontent", content.clone()));
        }
        if let Some(payload) = &push.payload {
            let payload = Value::Object(payload.clone()).to_string();
            check_len("push.payload (payload)", &payload, MAX_PAYLOAD)?;
            fields.push(("payload", payload));
        }
        if let Some(sound) = &push.sound {
            check_len("push.sound (sound)", sound, MAX_SOUND)?;
            fields.push(("sound", sound.clone()));
        }
    }
    for (name, value) in &job.options {
        let Some((field, expected)) = OPTIONS.iter().find(|(o, _)| o == name) else {
            let known: Vec<_> = OPTIONS.iter().map(|(o, _)| *o).collect();
            return Err(format!(
                "unknown option `{name}` for netease; known options: {}",
                known.join(", ")
            ));
        };
        let wrong_type = || format!("option `{name}` must be a {expected}");
        let text = match (*field, value) {
            ("option", Value::Object(_)) => value.to_string(),
            ("isForcePush" | "forcePushAll" | "checkAccidAsyncEnable", Value::Bool(b)) => {
                b.to_string()
            }
            ("forcePushContent", Value::String(s)) => {
                check_len("option forcePushContent", s, MAX_FORCE_PUSH_CONTENT)?;
                s.clone()
            }
            ("env", Value::String(s)) => {
                check_len("option env", s, MAX_ENV)?;
                s.clone()
            }
            ("forcePushList", Value::Array(list)) => {
                if list.iter().any(|v| !v.is_string()) {
                    return Err(wrong_type());
                }
                if list.len() > MAX_FORCE_PUSH_LIST {
                    return Err(format!(
                        "option forcePushList has {} users, the vendor allows at most {MAX_FORCE_PUSH_LIST}",
                        list.len()
                    ));
                }
                value.to_string()
            }
            _ => return Err(wrong_type()),
        };
        fields.push((field, text));
    }
    Ok(fields)
}

/// `CheckSum` header: lowercase hex SHA-1 of AppSecret + Nonce + CurTime.
pub fn checksum(app_secret: &str, nonce: &str, cur_time: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(app_secret.as_bytes());
    sha.update(nonce.as_bytes());
    sha.update(cur_time.as_bytes());
    hex::encode(sha.finalize())
}

struct Client {
    http: Http,
    url: Uri,
    app_key: HeaderValue,
    app_secret: Secret,
}

const FORM: HeaderValue =
    HeaderValue::from_static("application/x-www-form-urlencoded;charset=utf-8");

fn build(account: &AccountConfig) -> anyhow::Result<Arc<dyn Vendor>> {
    let url: Uri = format!(
        "{}{SEND_PATH}",
        account.base_url.as_str().trim_end_matches('/')
    )
    .parse()?;
    let app_key = account.credentials.require("app_key")?;
    Ok(Arc::new(Client {
        http: Http::new(&url, account.timeout)?,
        url,
        app_key: HeaderValue::from_str(app_key)
            .map_err(|_| anyhow::anyhow!("app_key holds a character HTTP headers do not allow"))?,
        app_secret: Secret::new(account.credentials.require("app_secret")?),
    }))
}

#[derive(Deserialize)]
struct Reply {
    code: i64,
    #[serde(default)]
    desc: Option<String>,
}

/// Classifies the HTTP answer of `sendAttachMsg.action`.
pub fn classify_reply(status: http::StatusCode, body: &str) -> Answer {
    if !status.is_success() {
        return http_status_answer(status, body);
    }
    let Ok(reply) = serde_json::from_str::<Reply>(body) else {
        return Answer::new(
            Class::Transient,
            Some("garbage".into()),
            format!(
                "vendor answered something that is not its JSON: {}",
                snippet(body)
            ),
        );
    };
    let (class, meaning) = classify(reply.code);
    if class == Class::Delivered {
        return Answer::delivered();
    }
    let desc = reply.desc.unwrap_or_default();
    Answer::new(
        class,
        Some(reply.code.to_string()),
        format!("netease {}: {meaning}: {desc}", reply.code),
    )
}

#[async_trait]
impl Vendor for Client {
    async fn send(&self, job: &Job, _attempt: u32, _round: Round) -> Answer {
        let fields = match form(job) {
            Ok(fields) => fields,
            Err(e) => return Answer::new(Class::Permanent, None, e),
        };
        let nonce = format!("{:016x}", rand::random::<u64>());
        let cur_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let sum = checksum(self.app_secret.expose(), &nonce, &cur_time);
        let secrets = [sum.as_str(), self.app_secret.expose()];
        match self.exchange(&fields, &nonce, &cur_time, &sum).await {
            // Masked before classifying too: the detail keeps a snippet, which may cut a secret in two.
            Ok((status, body)) => {
                without_secrets(classify_reply(status, &scrub(&body, &secrets)), &secrets)
            }
            Err(answer) => without_secrets(answer, &secrets),
        }
    }
}

impl Client {
    async fn exchange(
        &self,
        fields: &[(&str, String)],
        nonce: &str,
        cur_time: &str,
        sum: &str,
    ) -> Result<(http::StatusCode, String), Answer> {
        let mut headers = crate::telemetry::http_headers();
        headers.insert(APP_KEY, self.app_key.clone());
        headers.insert(NONCE, transport::header_value("Nonce", nonce)?);
        headers.insert(CUR_TIME, transport::header_value("CurTime", cur_time)?);
        headers.insert(CHECK_SUM, transport::header_value("CheckSum", sum)?);
        headers.insert(CONTENT_TYPE, FORM);
        self.http
            .post(
                self.url.clone(),
                headers,
                serde_urlencoded_body(fields).into_bytes(),
            )
            .await
    }
}

const APP_KEY: HeaderName = HeaderName::from_static("appkey");
const NONCE: HeaderName = HeaderName::from_static("nonce");
const CUR_TIME: HeaderName = HeaderName::from_static("curtime");
const CHECK_SUM: HeaderName = HeaderName::from_static("checksum");

fn serde_urlencoded_body(fields: &[(&str, String)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields.iter().map(|(k, v)| (*k, v.as_str())))
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> Job {
        let text = format!(
            r#"{{"id":"j1","vendor":"netease","account":"default","from":"system","to":{{"user":"u1"}},"key":"order.shipped","data":{{"order":8812}}{extra}}}"#
        );
        Job::parse(text.as_bytes(), 1 << 20).unwrap()
    }

    fn field<'a>(fields: &'a [(&str, String)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn checksum_matches_sha1_of_secret_nonce_curtime() {
        // sha1("secret" + "nonce" + "1443592222"), computed independently with sha1sum.
        assert_eq!(
            checksum("secret", "nonce", "1443592222"),
            "6c44195b0140d787ed24095408dfdc9ea9d83ccf"
        );
        assert_eq!(
            checksum("", "", ""),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
    }

    #[test]
    fn every_seed_field_is_mapped() {
        let j = job(
            r#","delivery":"online","push":{"content":"hi","payload":{"k":"v"},"sound":"ding"},
            "options":{"option":{"badge":false},"isForcePush":true,"forcePushContent":"fp","forcePushAll":false,
            "forcePushList":["a","b"],"env":"prod","checkAccidAsyncEnable":true}"#,
        );
        let f = form(&j).unwrap();
        let expect = [
            ("from", "system"),
            ("msgtype", "0"),
            ("to", "u1"),
            ("attach", r#"{"data":{"order":8812},"key":"order.shipped"}"#),
            ("save", "1"),
            ("pushcontent", "hi"),
            ("payload", r#"{"k":"v"}"#),
            ("sound", "ding"),
            ("option", r#"{"badge":false}"#),
            ("isForcePush", "true"),
            ("forcePushContent", "fp"),
            ("forcePushAll", "false"),
            ("forcePushList", r#"["a","b"]"#),
            ("env", "prod"),
            ("checkAccidAsyncEnable", "true"),
        ];
        for (name, value) in expect {
            assert_eq!(field(&f, name), Some(value), "{name}");
        }
        assert_eq!(f.len(), expect.len());
    }

    #[test]
    fn group_and_persistent_map_to_msgtype_1_and_save_2() {
        let mut j = job("");
        j.to = Recipient::Group("tid1".into());
        let f = form(&j).unwrap();
        assert_eq!(field(&f, "msgtype"), Some("1"));
        assert_eq!(field(&f, "save"), Some("2"));
    }

    #[test]
    fn seed_limits_are_enforced_with_the_field_name() {
        let mut j = job("");
        j.data = Value::String("x".repeat(4096));
        assert!(form(&j).unwrap_err().contains("attach"));
        let mut j = job("");
        j.push = Some(crate::job::Push {
            content: Some("x".repeat(501)),
            payload: None,
            sound: None,
        });
        assert!(form(&j).unwrap_err().contains("pushcontent"));
        let mut j = job("");
        j.push = Some(crate::job::Push {
            content: None,
            payload: None,
            sound: Some("x".repeat(31)),
        });
        assert!(form(&j).unwrap_err().contains("at most 30"));
        let list: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
        let j = job(&format!(
            r#","options":{{"forcePushList":{}}}"#,
            serde_json::to_string(&list).unwrap()
        ));
        assert!(form(&j).unwrap_err().contains("at most 100"));
        let mut j = job("");
        j.from = "x".repeat(33);
        assert!(form(&j).unwrap_err().contains("from"));
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let mut j = job("");
        j.push = Some(crate::job::Push {
            content: Some("送".repeat(500)),
            payload: None,
            sound: None,
        });
        assert!(form(&j).is_ok());
    }

    #[test]
    fn unknown_or_mistyped_options_are_refused() {
        let err = form(&job(r#","options":{"badge":true}"#)).unwrap_err();
        assert!(
            err.contains("unknown option `badge`") && err.contains("isForcePush"),
            "{err}"
        );
        let err = form(&job(r#","options":{"isForcePush":"yes"}"#)).unwrap_err();
        assert!(err.contains("must be a bool"), "{err}");
    }

    #[test]
    fn code_table_classifies_the_seed_codes() {
        let ok = http::StatusCode::OK;
        assert_eq!(classify_reply(ok, r#"{"code":200}"#), Answer::delivered());
        let a = classify_reply(ok, r#"{"code":414,"desc":"check msgType"}"#);
        assert_eq!(
            (a.class, a.code.as_deref()),
            (Class::Permanent, Some("414"))
        );
        assert!(a.detail.contains("check msgType"));
        assert_eq!(
            classify_reply(ok, r#"{"code":403}"#).class,
            Class::Permanent
        );
        assert_eq!(
            classify_reply(ok, r#"{"code":500}"#).class,
            Class::Transient
        );
        assert_eq!(
            classify_reply(ok, r#"{"code":416,"desc":"freq"}"#).class,
            Class::RateLimited
        );
        assert_eq!(
            classify_reply(ok, r#"{"code":999}"#).class,
            Class::Transient
        );
    }

    #[test]
    fn garbage_and_http_errors_are_transient() {
        let a = classify_reply(http::StatusCode::OK, "<html>oops</html>");
        assert_eq!(
            (a.class, a.code.as_deref()),
            (Class::Transient, Some("garbage"))
        );
        let a = classify_reply(http::StatusCode::BAD_GATEWAY, "bad gateway");
        assert_eq!(
            (a.class, a.code.as_deref()),
            (Class::Transient, Some("http-502"))
        );
    }
}
