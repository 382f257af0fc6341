//! Tencent Cloud IM end to end: RabbitMQ → herald → the Tencent sandbox, and
//! the `Group.CallbackSendMsgException` webhook back into herald.

mod common;

use std::time::{Duration, Instant};

use herald::job::Job;
use herald::outcome::Reason;
use herald::sandbox::tencent::{self, RejectGroup};
use herald::sandbox::{Fault, FaultAnswer};
use herald::vendor::tencent::{CALLBACK_COMMAND, Seal, callback_sign, request};
use serde_json::{Value, json};

use common::{
    Account, CALLBACK_KEY as KEY, CALLBACK_TOKEN as TOKEN, Options, TestApp, spawn_app,
    tencent_account,
};

/// An app with one lane: Tencent account `main`, its callbacks signed and
/// sealed, as `tweak` makes it.
fn options(tweak: impl FnOnce(Account) -> Account) -> Options {
    Options {
        accounts: vec![tweak(tencent_account("main").signed_callbacks())],
        ..Options::default()
    }
}

fn tencent_messages(app: &TestApp) -> Vec<herald::sandbox::Delivered> {
    app.delivered()
        .into_iter()
        .filter(|m| m.vendor == "tencent")
        .collect()
}

fn group_job(app: &TestApp, id: &str) -> Value {
    let mut job = app.vendor_job("tencent", "main", id, "unused");
    job["to"] = json!({"group": "@TGS#2J4SZEAEL"});
    job["from"] = json!("administrator");
    job
}

/// Posts a callback to herald as Tencent would, signed with `token` at `time`.
async fn post_callback(app: &TestApp, body: &Value, token: &str, time: u64) -> (u16, String, f64) {
    let time = time.to_string();
    let url = format!("http://{}/callbacks/tencent", app.callback_addr());
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(url)
        .query(&[
            ("SdkAppid", "1400000000"),
            ("CallbackCommand", CALLBACK_COMMAND),
            ("contenttype", "json"),
            ("ClientIP", "127.0.0.1"),
            ("OptPlatform", "RESTAPI"),
            ("Sign", &callback_sign(token, &time)),
            ("RequestTime", &time),
        ])
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, text, started.elapsed().as_secs_f64() * 1000.0)
}

/// The callback Tencent would post for attempt `attempt` of `job`.
fn failure_callback(job: &Value, attempt: u32, code: i64) -> Value {
    let job: Job = serde_json::from_value(job.clone()).unwrap();
    let seal = Seal {
        key: KEY,
        sent_at: now(),
    };
    let (_, sent) = request(&job, attempt, Some(seal)).unwrap();
    json!({
        "CallbackCommand": CALLBACK_COMMAND, "GroupId": sent["GroupId"], "Type": "Public",
        "From_Account": sent["From_Account"], "Operator_Account": "administrator",
        "Random": sent["Random"], "OnlineOnlyFlag": 0, "MsgBody": sent["MsgBody"],
        "CloudCustomData": sent["CloudCustomData"], "ErrorCode": code,
        "ErrorInfo": "msg count exceeds limit,please retry later", "EventTime": "1670574414123"
    })
}

/// The one answer every unauthenticated callback gets, whatever failed.
const UNAUTHENTICATED: &str =
    r#"{"ActionStatus":"FAIL","ErrorCode":401,"ErrorInfo":"callback not authenticated"}"#;

fn now() -> u64 {
    chrono::Utc::now().timestamp() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_group_jobs_are_delivered_with_every_field() {
    let app = spawn_app("tencent-fields", options(|a| a)).await;
    let mut user = app.vendor_job("tencent", "main", "tc-user", "user-7");
    user["from"] = json!("administrator");
    user["delivery"] = json!("online");
    user["push"] = json!({"content": "You have mail", "payload": {"k": "v"}, "sound": "ding.aiff"});
    app.publish(&user).await;
    app.publish(&group_job(&app, "tc-group")).await;
    app.wait_for_delivered(2, Duration::from_secs(15)).await;
    let messages = tencent_messages(&app);
    let u = &messages
        .iter()
        .find(|m| m.fields.contains_key("To_Account"))
        .unwrap()
        .fields;
    assert_eq!(u["To_Account"], "user-7");
    assert_eq!(u["From_Account"], "administrator");
    assert_eq!(u["MsgLifeTime"], "0", "online: not stored offline");
    let body: Value = serde_json::from_str(&u["MsgBody"]).unwrap();
    assert_eq!(
        body,
        json!([{"MsgType":"TIMCustomElem","MsgContent":{"Data":"{\"id\":\"tc-user\"}","Desc":"test.key","Ext":""}}])
    );
    let push: Value = serde_json::from_str(&u["OfflinePushInfo"]).unwrap();
    assert_eq!(
        push,
        json!({"PushFlag":0,"Desc":"You have mail","Ext":"{\"k\":\"v\"}","ApnsInfo":{"Sound":"ding.aiff"}})
    );
    let custom: Value = serde_json::from_str(&u["CloudCustomData"]).unwrap();
    assert_eq!(
        (
            custom["herald"]["id"].as_str(),
            custom["herald"]["attempt"].as_u64()
        ),
        (Some("tc-user"), Some(1))
    );
    assert_eq!(
        u["MsgRandom"],
        herald::vendor::tencent::msg_random("tc-user").to_string()
    );
    let g = &messages
        .iter()
        .find(|m| m.fields.contains_key("GroupId"))
        .unwrap()
        .fields;
    assert_eq!(g["GroupId"], "@TGS#2J4SZEAEL");
    assert_eq!(
        g["Random"],
        herald::vendor::tencent::msg_random("tc-group").to_string()
    );
    assert!(
        !g.contains_key("OnlineOnlyFlag"),
        "persistent group messages are stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frequency_answer_pauses_the_lane_without_counting_an_attempt() {
    let app = spawn_app("tencent-freq", options(|a| a.ban(Duration::from_secs(1)))).await;
    let app_id = Some("1400000000".to_string());
    for (to, code) in [("u-a", 60007), ("u-b", 60007), ("u-b", 90003)] {
        app.sandbox.add_fault(Fault {
            vendor: "tencent".into(),
            app: app_id.clone(),
            to: Some(to.into()),
            times: 1,
            answer: FaultAnswer::Code(code),
        });
    }
    let started = Instant::now();
    app.publish(&app.vendor_job("tencent", "main", "freq-a", "u-a"))
        .await;
    app.publish(&app.vendor_job("tencent", "main", "freq-b", "u-b"))
        .await;
    app.wait_for_delivered(1, Duration::from_secs(20)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "nothing was sent during the pause"
    );
    app.wait_for_dead(1, Duration::from_secs(20)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].code.as_deref(), dead[0].attempts),
        (Reason::Permanent, Some("90003"), 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10023_callback_leads_to_exactly_one_redelivery_that_succeeds() {
    let app = spawn_app("tencent-10023", options(|a| a)).await;
    app.sandbox
        .fake::<tencent::Fake>()
        .reject_group(RejectGroup {
            count: 1,
            callback_url: format!("http://{}/callbacks/tencent", app.callback_addr()),
            token: Some(TOKEN.into()),
        });
    app.publish(&group_job(&app, "rejected-once")).await;
    app.wait_for_delivered(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let messages = tencent_messages(&app);
    assert_eq!(messages.len(), 1, "exactly one redelivery");
    let custom: Value = serde_json::from_str(&messages[0].fields["CloudCustomData"]).unwrap();
    assert_eq!(
        custom["herald"]["attempt"], 2,
        "the callback counted an attempt"
    );
    let answers = app.sandbox.fake::<tencent::Fake>().callback_answers();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&answers[0].body).unwrap(),
        json!({"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0})
    );
    eprintln!("tencent callback: answered in {:.1} ms", answers[0].millis);
    assert_eq!(app.dlq_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_badly_signed_callback_is_401_and_schedules_nothing() {
    let app = spawn_app("tencent-sign", options(|a| a)).await;
    let job = group_job(&app, "forged");
    let (status, body, _) = post_callback(
        &app,
        &failure_callback(&job, 1, 10023),
        "wrong-token",
        now(),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) =
        post_callback(&app, &failure_callback(&job, 1, 10023), TOKEN, now() - 120).await;
    assert_eq!(status, 401, "stale RequestTime");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(tencent_messages(&app).is_empty());
    assert_eq!(app.dlq_depth().await, 0);
}

/// The attack of issue 9: a made-up callback in herald's shape, for a group
/// and text of the attacker's choosing, correctly signed (a captured URL is
/// good for any body for 60 s).
fn forged_callbacks(app: &TestApp) -> Vec<(&'static str, Value)> {
    let genuine = failure_callback(&group_job(app, "real"), 1, 10023);
    let custom: Value = serde_json::from_str(genuine["CloudCustomData"].as_str().unwrap()).unwrap();
    let mut evil_group = genuine.clone();
    evil_group["GroupId"] = json!("@TGS#evil");
    let mut phish = genuine.clone();
    phish["MsgBody"][0]["MsgContent"]["Data"] = json!("phish");
    let mut unsealed = genuine.clone();
    let mut herald = custom["herald"].clone();
    herald.as_object_mut().unwrap().remove("mac");
    herald.as_object_mut().unwrap().remove("sent_at");
    unsealed["GroupId"] = json!("@TGS#evil");
    unsealed["CloudCustomData"] = json!(json!({ "herald": herald }).to_string());
    let mut made_up_mac = unsealed.clone();
    herald["sent_at"] = json!(now());
    herald["mac"] = json!("00".repeat(32));
    made_up_mac["CloudCustomData"] = json!(json!({ "herald": herald }).to_string());
    vec![
        ("another group", evil_group),
        ("another text", phish),
        ("no seal", unsealed),
        ("a made-up seal", made_up_mac),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correctly_signed_callback_with_a_forged_body_schedules_nothing() {
    let app = spawn_app("tencent-forged", options(|a| a)).await;
    for (what, body) in forged_callbacks(&app) {
        let (status, answer, _) = post_callback(&app, &body, TOKEN, now()).await;
        assert_eq!(status, 403, "{what}: {answer}");
        assert!(answer.contains("not authenticated"), "{what}: {answer}");
    }
    let metrics = common::scrape(app.http_addr().port()).await;
    // The recorder is shared by this binary's tests; only this one forges for account `main`.
    let forged: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"herald_callbacks_total{account="main",result="forged",reason="none"} "#,
            )
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(forged, 4.0, "every forgery is counted:\n{metrics}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(tencent_messages(&app).is_empty(), "nothing was sent");
    assert_eq!(app.dlq_depth().await, 0, "nothing was scheduled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_callback_unsigned_only_the_seal_is_checked() {
    let app = spawn_app(
        "tencent-unsigned",
        Options {
            accounts: vec![
                tencent_account("opt-out")
                    .key("callback_key", KEY)
                    .key("callback_unsigned", true),
            ],
            ..Options::default()
        },
    )
    .await;
    for (what, body) in forged_callbacks(&app) {
        let (status, answer, _) = post_callback(&app, &body, "no-token-at-all", now()).await;
        assert_eq!(status, 403, "{what}: {answer}");
    }
    let mut job = group_job(&app, "unsigned");
    job["account"] = json!("opt-out");
    let genuine = failure_callback(&job, 1, 10023);
    let (status, answer, _) = post_callback(&app, &genuine, "no-token-at-all", now()).await;
    assert_eq!(status, 200, "{answer}");
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    let sent = tencent_messages(&app);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].fields["GroupId"], "@TGS#2J4SZEAEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_callback_settings_the_route_is_not_served() {
    let app = spawn_app(
        "tencent-off",
        Options {
            accounts: vec![tencent_account("main")],
            ..Options::default()
        },
    )
    .await;
    assert!(app.http.unwrap().callbacks.is_none());
    let genuine = failure_callback(&group_job(&app, "off"), 1, 10023);
    let response = reqwest::Client::new()
        .post(format!("http://{}/callbacks/tencent", app.http_addr()))
        .query(&[
            ("SdkAppid", "1400000000"),
            ("CallbackCommand", CALLBACK_COMMAND),
        ])
        .body(genuine.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tencent_messages(&app).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_callback_schedules_one_retry_and_other_codes_dead_letter() {
    let app = spawn_app("tencent-dup", options(|a| a)).await;
    let job = group_job(&app, "dup");
    let callback = failure_callback(&job, 1, 10023);
    let mut times = Vec::new();
    for _ in 0..2 {
        let (status, body, ms) = post_callback(&app, &callback, TOKEN, now()).await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#)
        );
        times.push(ms);
    }
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(tencent_messages(&app).len(), 1, "scheduled once");

    let (status, _, _) = post_callback(
        &app,
        &failure_callback(&group_job(&app, "gone"), 1, 10010),
        TOKEN,
        now(),
    )
    .await;
    assert_eq!(status, 200);
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].code.as_deref()),
        (Reason::Permanent, Some("10010"))
    );
    assert!(
        dead[0].error.contains("msg count exceeds limit"),
        "the vendor's ErrorInfo: {}",
        dead[0].error
    );
    eprintln!(
        "tencent callback: answered in {:.1} ms and {:.1} ms",
        times[0], times[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_foreign_callbacks_get_clear_answers() {
    let app = spawn_app("tencent-bad", options(|a| a)).await;
    let url = format!("http://{}/callbacks/tencent", app.callback_addr());
    let client = reqwest::Client::new();
    let time = now().to_string();
    let sign = callback_sign(TOKEN, &time);
    let post = |app_id: &'static str, body: String| {
        client
            .post(&url)
            .query(&[
                ("SdkAppid", app_id),
                ("CallbackCommand", CALLBACK_COMMAND),
                ("Sign", &sign),
                ("RequestTime", &time),
            ])
            .body(body)
            .send()
    };
    let r = post("1400000000", "{not json".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("malformed callback body"));
    let r = post("1499999999", "{}".into()).await.unwrap();
    assert_eq!(r.status(), 401, "an unknown SdkAppid is not told apart");
    assert_eq!(r.text().await.unwrap(), UNAUTHENTICATED);
    let foreign = json!({"CallbackCommand": CALLBACK_COMMAND, "GroupId": "g", "From_Account": "a", "MsgBody": [],
                         "CloudCustomData": "your cloud custom data", "ErrorCode": 10023, "ErrorInfo": "x"});
    let r = post("1400000000", foreign.to_string()).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "a message herald did not send is acknowledged, not retried"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tencent_messages(&app).is_empty());
    assert_eq!(app.dlq_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_usersig_is_regenerated_and_the_job_sent_again_through_the_limiter() {
    // 2 requests/s: the limiter spaces any two requests of the account ~0.5 s apart.
    let app = spawn_app("tencent-sig", options(|a| a.rate_limit(Some(2)))).await;
    // u-sig: refused once, then accepted; u-sig-2: refused with the fresh UserSig too.
    for (to, times) in [("u-sig", 1), ("u-sig-2", 2)] {
        app.sandbox.add_fault(common::fault(
            "tencent",
            to,
            times,
            FaultAnswer::Code(70001),
        ));
    }
    app.publish(&app.vendor_job("tencent", "main", "sig", "u-sig"))
        .await;
    app.wait_for_delivered(1, Duration::from_secs(15)).await;
    let stats = app.app_stats_of("tencent", "1400000000");
    assert_eq!((stats.requests, stats.accepted), (2, 1), "{stats:?}");
    let gap_ms = stats.last_ms.unwrap() - stats.first_ms.unwrap();
    assert!(
        gap_ms >= 400,
        "the resend waited for the limiter like any request: {gap_ms} ms after the first"
    );
    let custom: Value =
        serde_json::from_str(&tencent_messages(&app)[0].fields["CloudCustomData"]).unwrap();
    assert_eq!(
        custom["herald"]["attempt"], 1,
        "regenerating the UserSig is not a new attempt"
    );

    // Refused again with a fresh UserSig: final, with the vendor's code.
    app.publish(&app.vendor_job("tencent", "main", "sig-2", "u-sig-2"))
        .await;
    app.wait_for_dead(1, Duration::from_secs(15)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(
        (dead[0].reason, dead[0].code.as_deref(), dead[0].attempts),
        (Reason::Permanent, Some("70001"), 1)
    );
    assert_eq!(app.app_stats_of("tencent", "1400000000").requests, 4);
}
