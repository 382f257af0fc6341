//! OpenIM v3: business notifications (`msg/send_business_notification`, seed 000).
//!
//! Every call carries an admin token (header `token`) obtained from
//! `POST /auth/get_admin_token` with the account's secret. The token is cached
//! for the whole account, refreshed at 90% of its lifetime, and once at once on
//! a token error; a refresh holds the cache's lock, so concurrent refreshes
//! collapse into one request. Answers are always HTTP 200; `errCode` decides.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::header::{CONTENT_TYPE, HeaderName};
use http::{StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{
    Http, Key, KeyKind, Round, Vendor, VendorSpec, http_status_answer, snippet, transport,
    without_secrets,
};
use crate::config::{AccountConfig, Secret};
use crate::job::{Delivery, Job, Recipient};
use crate::metrics::{Kind, Metric};
use crate::outcome::{Answer, Class};
use crate::redact::scrub;

pub const SPEC: VendorSpec = VendorSpec {
    id: "openim",
    name: "OpenIM",
    app_key: None,
    keys: &[
        Key {
            name: "admin_user_id",
            kind: KeyKind::Plain,
        },
        Key {
            name: "secret",
            kind: KeyKind::Secret,
        },
    ],
    // No limit is documented: competing consumers on every replica unless the account sets one.
    default_rate_limit: None,
    default_ban: Duration::from_secs(1),
    check: |job| send_msg(job).map(|_| ()),
    // Presence and secrecy of its keys are all it needs; config checks those.
    validate: |_| Ok(()),
    build,
    callback: None,
    account_counters: &[&TOKEN_REQUESTS],
};

/// Admin token requests, per account (one of [`SPEC`]'s `account_counters`).
pub const TOKEN_REQUESTS: Metric = Metric {
    name: "herald_openim_token_requests_total",
    kind: Kind::Counter,
    labels: &["account"],
    help: "Admin token requests to OpenIM's /auth/get_admin_token.",
};

pub const SEND_PATH: &str = "/msg/send_business_notification";
pub const TOKEN_PATH: &str = "/auth/get_admin_token";

/// OpenIM v3 `errCode`s (seed 000 shows 0 and 1004; the rest from OpenIM's
/// public error-code list: 1001 ArgsError, 1002 NoPermissionError, 1004
/// RecordNotFoundError, 1501–1507 token errors, 500 and 900xx server errors).
pub const CODES: &[(i64, Class, &str)] = &[
    (0, Class::Delivered, "success"),
    (1001, Class::Permanent, "ArgsError"),
    (1002, Class::Permanent, "NoPermissionError"),
    (1004, Class::Permanent, "RecordNotFoundError"),
    (500, Class::Transient, "ServerInternalError"),
];

/// 1501 expired, 1502 invalid, 1503 malformed, 1504 not valid yet, 1505 unknown,
/// 1506 kicked, 1507 not exist: fetch a new admin token and try once more.
pub fn is_token_error(code: i64) -> bool {
    (1501..=1507).contains(&code)
}

pub fn classify(code: i64) -> (Class, &'static str) {
    if let Some((_, class, name)) = CODES.iter().find(|(c, _, _)| *c == code) {
        return (*class, name);
    }
    if (90000..=90099).contains(&code) {
        return (Class::Transient, "infrastructure error");
    }
    (Class::Transient, "unknown code")
}

/// The `sendMsg` of a job's options, once its push fields and options pass.
fn send_msg(job: &Job) -> Result<bool, String> {
    if job.push.is_some() {
        return Err("openim business notifications have no push fields; remove `push`".into());
    }
    let mut send_msg = false;
    for (name, value) in &job.options {
        match (name.as_str(), value) {
            ("sendMsg", Value::Bool(b)) => send_msg = *b,
            ("sendMsg", _) => return Err("option `sendMsg` must be a bool".into()),
            _ => {
                return Err(format!(
                    "unknown option `{name}` for openim; known options: sendMsg"
                ));
            }
        }
    }
    Ok(send_msg)
}

/// The JSON body of `send_business_notification`, borrowed from its job.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Body<'a> {
    #[serde(rename = "sendUserID")]
    send_user_id: &'a str,
    #[serde(rename = "recvUserID")]
    recv_user_id: &'a str,
    #[serde(rename = "recvGroupID")]
    recv_group_id: &'a str,
    key: &'a str,
    data: String,
    send_msg: bool,
    reliability_level: u8,
}

/// The JSON body of `send_business_notification` for a job.
pub fn body(job: &Job) -> Result<Body<'_>, String> {
    let send_msg = send_msg(job)?;
    let (user, group) = match &job.to {
        Recipient::User(id) => (id.as_str(), ""),
        Recipient::Group(id) => ("", id.as_str()),
    };
    Ok(Body {
        send_user_id: &job.from,
        recv_user_id: user,
        recv_group_id: group,
        key: &job.key,
        data: job.data_text(),
        send_msg,
        reliability_level: match job.delivery {
            Delivery::Online => 1,
            Delivery::Persistent => 2,
        },
    })
}

/// The JSON every OpenIM answer is wrapped in.
#[derive(Debug, Clone, Deserialize)]
pub struct Reply {
    #[serde(rename = "errCode")]
    pub err_code: i64,
    #[serde(rename = "errMsg", default)]
    pub err_msg: String,
    #[serde(default)]
    pub data: Option<Value>,
}

/// Longest lifetime herald believes of an admin token: a vendor answering
/// `expireTimeSeconds` near u64::MAX would otherwise overflow the refresh instant.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

const OPERATION_ID: HeaderName = HeaderName::from_static("operationid");
const TOKEN: HeaderName = HeaderName::from_static("token");

struct Token {
    value: String,
    refresh_at: Instant,
}

struct Client {
    http: Http,
    /// `{base_url}/msg/send_business_notification` and `/auth/get_admin_token`,
    /// parsed once: parsing a URL costs more than building the whole request.
    send_url: Uri,
    token_url: Uri,
    admin_user_id: String,
    secret: Secret,
    token: Mutex<Option<Token>>,
    account: String,
}

fn build(account: &AccountConfig) -> anyhow::Result<Arc<dyn Vendor>> {
    let base = account.base_url.as_str().trim_end_matches('/');
    let send_url: Uri = format!("{base}{SEND_PATH}").parse()?;
    Ok(Arc::new(Client {
        http: Http::new(&send_url, account.timeout)?,
        send_url,
        token_url: format!("{base}{TOKEN_PATH}").parse()?,
        admin_user_id: account.credentials.require("admin_user_id")?.to_string(),
        secret: Secret::new(account.credentials.require("secret")?),
        token: Mutex::new(None),
        account: account.name.clone(),
    }))
}

/// Classifies an HTTP answer of the OpenIM API into the reply or a final answer.
pub fn parse(status: StatusCode, text: &str) -> Result<Reply, Answer> {
    if !status.is_success() {
        return Err(http_status_answer(status, text));
    }
    serde_json::from_str::<Reply>(text).map_err(|_| {
        Answer::new(
            Class::Transient,
            Some("garbage".into()),
            format!(
                "vendor answered something that is not its JSON: {}",
                snippet(text)
            ),
        )
    })
}

impl Client {
    /// One request; whatever of the answer becomes text has this request's credentials masked.
    async fn post(
        &self,
        url: &Uri,
        operation_id: &str,
        token: Option<&str>,
        body: &impl Serialize,
    ) -> Result<Reply, Answer> {
        let secrets = [token.unwrap_or(""), self.secret.expose()];
        let (status, text) = self
            .exchange(url, operation_id, token, body)
            .await
            .map_err(|answer| without_secrets(answer, &secrets))?;
        // Masked before parsing too: a garbage answer is cut to a snippet, which may cut a secret in two.
        let mut reply = parse(status, &scrub(&text, &secrets))
            .map_err(|answer| without_secrets(answer, &secrets))?;
        // And after: JSON escapes may spell a secret differently in the raw text.
        reply.err_msg = scrub(&reply.err_msg, &secrets);
        Ok(reply)
    }

    async fn exchange(
        &self,
        url: &Uri,
        operation_id: &str,
        token: Option<&str>,
        body: &impl Serialize,
    ) -> Result<(StatusCode, String), Answer> {
        let mut headers = crate::telemetry::http_headers();
        headers.insert(CONTENT_TYPE, transport::JSON);
        headers.insert(
            OPERATION_ID,
            transport::header_value("operationID", operation_id)?,
        );
        if let Some(token) = token {
            headers.insert(TOKEN, transport::header_value("token", token)?);
        }
        self.http
            .post(url.clone(), headers, transport::json_body(body)?)
            .await
    }

    /// The cached admin token, or a fresh one when it is due or was refused (`stale`).
    async fn token(&self, stale: Option<&str>) -> Result<String, Answer> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
            && Some(t.value.as_str()) != stale
        {
            return Ok(t.value.clone());
        }
        metrics::counter!(TOKEN_REQUESTS.name, "account" => self.account.clone()).increment(1);
        let op = format!("herald-token-{:016x}", rand::random::<u64>());
        let body = json!({"secret": self.secret.expose(), "userID": self.admin_user_id});
        let reply = self.post(&self.token_url, &op, None, &body).await?;
        let (token, refresh_in) = admin_token(reply)?;
        *cached = Some(Token {
            value: token.clone(),
            refresh_at: Instant::now() + refresh_in,
        });
        tracing::debug!(
            refresh_in_s = refresh_in.as_secs(),
            "openim admin token refreshed"
        );
        Ok(token)
    }
}

/// The token in a `get_admin_token` reply and how long to use it before
/// refreshing (90% of its lifetime), or the answer that explains the refusal.
pub fn admin_token(reply: Reply) -> Result<(String, Duration), Answer> {
    let data = reply.data.unwrap_or_default();
    let (Some(token), Some(ttl)) = (data["token"].as_str(), data["expireTimeSeconds"].as_u64())
    else {
        return Err(Answer::new(
            if reply.err_code == 0 || classify(reply.err_code).0 == Class::Transient {
                Class::Transient
            } else {
                Class::Permanent
            },
            Some(reply.err_code.to_string()),
            format!(
                "openim refused the admin token: {} {}",
                reply.err_code, reply.err_msg
            ),
        ));
    };
    let lifetime = Duration::from_secs(ttl).min(MAX_TOKEN_LIFETIME);
    Ok((token.to_string(), lifetime.mul_f64(0.9)))
}

#[async_trait]
impl Vendor for Client {
    async fn send(&self, job: &Job, attempt: u32, round: Round) -> Answer {
        let body = match body(job) {
            Ok(b) => b,
            Err(e) => return Answer::new(Class::Permanent, None, e),
        };
        let token = match self.token(None).await {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        // Unique per request, traceable to the job.
        let op = match round {
            Round::First => format!("{}-{attempt}", job.id),
            Round::Renewed => format!("{}-{attempt}-retoken", job.id),
        };
        let reply = match self.post(&self.send_url, &op, Some(&token), &body).await {
            Ok(r) => r,
            Err(answer) => return answer,
        };
        let code = Some(reply.err_code.to_string());
        if is_token_error(reply.err_code) {
            if round == Round::Renewed {
                return Answer::new(
                    Class::Permanent,
                    code,
                    format!(
                        "openim refused a fresh admin token: {} {}",
                        reply.err_code, reply.err_msg
                    ),
                );
            }
            // Renew now, so that a failure to get a token is this attempt's answer.
            if let Err(answer) = self.token(Some(&token)).await {
                return answer;
            }
            return Answer::credentials_renewed(
                code,
                format!(
                    "openim refused the admin token ({}); renewed it",
                    reply.err_msg
                ),
            );
        }
        let (class, name) = classify(reply.err_code);
        if class == Class::Delivered {
            let id = reply
                .data
                .as_ref()
                .and_then(|d| d.get("serverMsgID"))
                .and_then(|v| v.as_str())
                .map(str::to_string);
            return Answer::delivered_as(id);
        }
        Answer::new(
            class,
            code,
            format!("openim {} {name}: {}", reply.err_code, reply.err_msg),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(to: &str, extra: &str) -> Job {
        let text = format!(
            r#"{{"id":"j1","vendor":"openim","account":"default","from":"openIMAdmin","to":{to},"key":"xxx","data":{{"a":1}}{extra}}}"#
        );
        Job::parse(text.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn maps_the_seed_fields() {
        let body = |job: &Job| serde_json::to_value(body(job).unwrap()).unwrap();
        let b = body(&job(
            r#"{"user":"2839678182"}"#,
            r#","delivery":"online","options":{"sendMsg":true}"#,
        ));
        assert_eq!(
            b,
            json!({"sendUserID":"openIMAdmin","recvUserID":"2839678182","recvGroupID":"","key":"xxx",
                   "data":"{\"a\":1}","sendMsg":true,"reliabilityLevel":1})
        );
        let b = body(&job(r#"{"group":"g1"}"#, ""));
        assert_eq!(
            (b["recvUserID"].as_str(), b["recvGroupID"].as_str()),
            (Some(""), Some("g1"))
        );
        assert_eq!(b["reliabilityLevel"], 2);
        assert_eq!(b["sendMsg"], false);
    }

    #[test]
    fn push_and_unknown_options_are_refused() {
        assert!(
            body(&job(r#"{"user":"u"}"#, r#","push":{"content":"x"}"#))
                .unwrap_err()
                .contains("push")
        );
        assert!(
            body(&job(r#"{"user":"u"}"#, r#","options":{"x":1}"#))
                .unwrap_err()
                .contains("unknown option `x`")
        );
    }

    #[test]
    fn code_table() {
        assert_eq!(classify(0).0, Class::Delivered);
        for code in [1001, 1002, 1004] {
            assert_eq!(classify(code).0, Class::Permanent, "{code}");
        }
        for code in [500, 90001, 90099, 4242] {
            assert_eq!(classify(code).0, Class::Transient, "{code}");
        }
        assert!((1501..=1507).all(is_token_error));
        assert!(!is_token_error(1500) && !is_token_error(1508));
    }

    #[test]
    fn non_json_and_http_errors_are_transient() {
        let err = parse(StatusCode::OK, "<html/>").err().unwrap();
        assert_eq!(
            (err.class, err.code.as_deref()),
            (Class::Transient, Some("garbage"))
        );
        let err = parse(StatusCode::SERVICE_UNAVAILABLE, "down")
            .err()
            .unwrap();
        assert_eq!(
            (err.class, err.code.as_deref()),
            (Class::Transient, Some("http-503"))
        );
    }

    #[test]
    fn an_admin_token_is_refreshed_at_90_percent_and_a_huge_lifetime_is_capped() {
        let reply = |ttl: u64| {
            parse(
                StatusCode::OK,
                &json!({"errCode": 0, "data": {"token": "t", "expireTimeSeconds": ttl}})
                    .to_string(),
            )
            .unwrap()
        };
        assert_eq!(
            admin_token(reply(1000)).unwrap(),
            ("t".to_string(), Duration::from_secs(900))
        );
        let (_, refresh_in) = admin_token(reply(u64::MAX)).unwrap();
        assert_eq!(refresh_in, MAX_TOKEN_LIFETIME.mul_f64(0.9));
        // The refresh instant is computed from it: it must not overflow.
        assert!(Instant::now().checked_add(refresh_in).is_some());
        let refused = parse(StatusCode::OK, r#"{"errCode":1002,"errMsg":"no"}"#).unwrap();
        assert_eq!(admin_token(refused).unwrap_err().class, Class::Permanent);
    }
}
