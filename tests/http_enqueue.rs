//! `POST /v1/jobs` against a real worker, broker and sandbox: the token, the
//! checks that publish nothing when one job is wrong, the confirmed publish,
//! the body limit; and `docs/openapi.yaml` kept equal to what is served.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Options, netease_account, openim_account, spawn_app, tencent_account};
use herald::http::{ENQUEUE_JOBS, routes};
use herald::worker::Worker;
use lapin::types::FieldTable;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "enqueue-token-for-tests-0123456789";
const PREVIOUS: &str = "previous-enqueue-token-0123456789";

fn options() -> Options {
    Options {
        accounts: vec![netease_account("default", 0).rate_limit(None)],
        http_extra: r#"
enqueue_token = "enqueue-token-for-tests-0123456789"
enqueue_token_previous = "previous-enqueue-token-0123456789"
enqueue_max_bytes = 4096
"#,
        ..Options::default()
    }
}

/// Posts `body` to `/v1/jobs`; every status the server answers must be documented.
async fn post(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://{addr}/v1/jobs"))
        .header("content-type", content_type)
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the worker answers");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    assert!(
        ENQUEUE_JOBS.statuses.contains(&status.as_u16()) || status == StatusCode::NOT_FOUND,
        "{status} is not in herald::http::ENQUEUE_JOBS (and docs/openapi.yaml): {body}"
    );
    (status, headers, body)
}

fn ndjson(jobs: &[Value]) -> String {
    jobs.iter().map(|j| format!("{j}\n")).collect()
}

/// Nothing reached the lane or the vendor, after giving a worker time to deliver it.
async fn assert_nothing_published(app: &common::TestApp) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.sandbox.delivered_count(), 0, "nothing was delivered");
    assert_eq!(app.lane_depth().await, 0, "nothing waits in the lane");
    assert_eq!(app.dlq_depth().await, 0, "nothing was dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_or_with_a_wrong_token_the_answer_is_401_and_nothing_is_published() {
    let app = spawn_app("enqueue-401", options()).await;
    let body = app.job("should-not-pass", "u1").to_string();
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let (status, headers, answer) =
            post(app.http_addr(), token, "application/json", body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "token {token:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(answer, json!({"error": "missing or wrong bearer token"}));
    }
    // A wrong token is refused before the body is even looked at.
    let (status, _, _) = post(app.http_addr(), None, "text/plain", "not json").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_nothing_published(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_is_accepted_once_confirmed_and_delivered() {
    let app = spawn_app("enqueue-one", options()).await;
    let (status, _, answer) = post(
        app.http_addr(),
        Some(TOKEN),
        "application/json",
        app.job("http-one", "u1").to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer, json!({"ids": ["http-one"]}));
    app.wait_for_distinct_jobs(1, Duration::from_secs(10)).await;
    assert_eq!(app.deliveries_by_id().get("http-one"), Some(&1));

    // During a rotation the previous token still works.
    let (status, _, _) = post(
        app.http_addr(),
        Some(PREVIOUS),
        "application/json; charset=utf-8",
        app.job("http-two", "u1").to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.wait_for_distinct_jobs(2, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_batch_is_accepted_with_ids_in_order_and_all_delivered() {
    let app = spawn_app("enqueue-batch", options()).await;
    let jobs: Vec<Value> = (0..20)
        .map(|i| app.job(&format!("batch-{i:02}"), &format!("u{i}")))
        .collect();
    // Lines, and at the end two documents with no newline between them, as `herald enqueue` takes.
    let mut body = ndjson(&jobs[..18]);
    body.push_str(&format!("{}{}", jobs[18], jobs[19]));
    let (status, _, answer) =
        post(app.http_addr(), Some(TOKEN), "application/x-ndjson", body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let expected: Vec<String> = (0..20).map(|i| format!("batch-{i:02}")).collect();
    assert_eq!(answer, json!({ "ids": expected }));
    app.wait_for_distinct_jobs(20, Duration::from_secs(20))
        .await;
    let by_id = app.deliveries_by_id();
    assert!(
        expected.iter().all(|id| by_id.contains_key(id)),
        "{by_id:?}"
    );

    let metrics = common::scrape(app.http_addr().port()).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("herald_http_enqueue_jobs_total{result=\"accepted\"}")),
        "{metrics}"
    );
    assert!(
        !metrics.contains(TOKEN) && !metrics.contains("batch-0"),
        "no secret, no id in metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_bad_jobs_publishes_nothing_and_names_each_index_and_field() {
    let app = spawn_app("enqueue-400", options()).await;
    let mut bad_field = app.job("bad-field", "u2");
    bad_field["push"] = json!({"sound": "s".repeat(31)});
    let unknown_account = app.job_for("nobody", "bad-account", "u4");
    let body = ndjson(&[
        app.job("good-1", "u1"),
        bad_field,
        app.job("good-3", "u3"),
        unknown_account,
    ]);
    let (status, _, answer) =
        post(app.http_addr(), Some(TOKEN), "application/x-ndjson", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let listed = answer["jobs"].as_array().expect("a list of failing jobs");
    assert_eq!(listed.len(), 2, "{answer}");
    assert_eq!(listed[0]["index"], 2);
    assert!(
        listed[0]["error"].as_str().unwrap().contains("sound"),
        "{answer}"
    );
    assert_eq!(listed[1]["index"], 4);
    let why = listed[1]["error"].as_str().unwrap();
    assert!(
        why.contains("nobody") && why.contains("account"),
        "{answer}"
    );

    // A body that is not JSON names where it broke.
    let (status, _, answer) = post(
        app.http_addr(),
        Some(TOKEN),
        "application/x-ndjson",
        format!("{}\n{{\"id\": ", app.job("good-5", "u5")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["jobs"][0]["index"], 2, "{answer}");

    // application/json is one job.
    let two = format!(
        "{}{}",
        app.job("one-of-two", "u1"),
        app.job("two-of-two", "u1")
    );
    let (status, _, answer) = post(app.http_addr(), Some(TOKEN), "application/json", two).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["jobs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("x-ndjson")
    );

    let (status, _, _) = post(app.http_addr(), Some(TOKEN), "text/plain", "{}").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_nothing_published(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_body_gets_413_and_nothing_is_published() {
    let app = spawn_app("enqueue-413", options()).await;
    let jobs: Vec<Value> = (0..60)
        .map(|i| app.job(&format!("big-{i}"), "u1"))
        .collect();
    let body = ndjson(&jobs);
    assert!(body.len() > 4096);
    let (status, _, answer) =
        post(app.http_addr(), Some(TOKEN), "application/x-ndjson", body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("4096"),
        "{answer}"
    );
    assert_nothing_published(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_route_is_not_served() {
    let app = spawn_app("enqueue-off", Options::default()).await;
    let (status, _, _) = post(
        app.http_addr(),
        Some(TOKEN),
        "application/json",
        app.job("nowhere", "u1").to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_nothing_published(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_disconnected_the_answer_is_503_with_retry_after() {
    let app = spawn_app(
        "enqueue-503",
        Options {
            start_worker: false,
            ..options()
        },
    )
    .await;
    // Served but never connected: the worker has no publisher to lend the route.
    let worker = Worker::new(app.config.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let addr = worker.serve_http(shutdown.clone()).await.unwrap().http;
    let (status, headers, answer) = post(
        addr,
        Some(TOKEN),
        "application/json",
        app.job("not-yet", "u1").to_string(),
    )
    .await;
    shutdown.cancel();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(answer["confirmed"], json!([]));
    assert_eq!(answer["unconfirmed"], json!(["not-yet"]));
    assert_eq!(app.lane_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_failing_midway_is_503_naming_the_confirmed_and_unconfirmed_ids() {
    let app = spawn_app(
        "enqueue-midway",
        Options {
            accounts: vec![
                netease_account("default", 0).rate_limit(None),
                openim_account("main"),
            ],
            ..options()
        },
    )
    .await;
    // With its lane and the DLQ unbound, a job for openim.main has nowhere to
    // go, not even the alternate exchange: the broker returns it.
    let channel = app.conn.create_channel().await.unwrap();
    channel
        .queue_unbind(
            app.names.lane("openim", "main").as_str().into(),
            app.names.jobs().as_str().into(),
            "openim.main".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_unbind(
            app.names.dlq().as_str().into(),
            app.names.dead().as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let body = ndjson(&[
        app.job("before", "u1"),
        app.vendor_job("openim", "main", "lost", "u2"),
        app.job("after", "u3"),
    ]);
    let (status, headers, answer) =
        post(app.http_addr(), Some(TOKEN), "application/x-ndjson", body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(answer["confirmed"], json!(["before", "after"]), "{answer}");
    assert_eq!(answer["unconfirmed"], json!(["lost"]), "{answer}");
    app.wait_for_distinct_jobs(2, Duration::from_secs(10)).await;
}

fn openapi() -> Value {
    let text = include_str!("../docs/openapi.yaml");
    serde_norway::from_str(text).expect("docs/openapi.yaml is YAML")
}

#[test]
fn the_openapi_file_describes_exactly_the_routes_and_statuses_served() {
    let spec = openapi();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            for status in operation["responses"]
                .as_object()
                .expect("responses")
                .keys()
            {
                documented.insert((method.to_uppercase(), path.clone(), status.clone()));
            }
        }
    }
    let served: BTreeSet<_> = routes()
        .iter()
        .flat_map(|r| {
            r.statuses
                .iter()
                .map(|s| (r.method.to_string(), r.path.to_string(), s.to_string()))
        })
        .collect();
    assert_eq!(
        documented, served,
        "docs/openapi.yaml and herald::http::routes() differ"
    );
    let enqueue = &spec["paths"]["/v1/jobs"]["post"];
    assert_eq!(enqueue["security"], json!([{"enqueueToken": []}]));
    let scheme = &spec["components"]["securitySchemes"]["enqueueToken"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"]),
        (&json!("http"), &json!("bearer"))
    );
}

#[test]
fn the_openapi_files_references_point_at_committed_files() {
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&openapi(), &mut found);
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let files: Vec<_> = found.iter().filter(|r| !r.starts_with('#')).collect();
    assert!(!files.is_empty(), "the job body refers to job.schema.json");
    for r in files {
        let file = r.split('#').next().unwrap();
        assert!(
            docs.join(file).is_file(),
            "docs/openapi.yaml refers to a missing {file}"
        );
    }
}

/// The properties a documented JSON answer may have.
fn documented_fields(spec: &Value, status: &str) -> BTreeSet<String> {
    let schema = &spec["paths"]["/v1/jobs"]["post"]["responses"][status]["content"]["application/json"]
        ["schema"]["$ref"];
    let name = schema.as_str().unwrap().rsplit('/').next().unwrap();
    spec["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn fields(answer: &Value) -> BTreeSet<String> {
    answer.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_examples_are_accepted_and_every_route_listed_is_served() {
    let app = spawn_app(
        "enqueue-openapi",
        Options {
            accounts: vec![
                netease_account("default", 0).rate_limit(None),
                tencent_account("main").signed_callbacks(),
            ],
            ..options()
        },
    )
    .await;
    let spec = openapi();
    let content = &spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"];
    let mut ids = Vec::new();
    for (content_type, media) in content.as_object().unwrap() {
        for (name, example) in media["examples"].as_object().unwrap() {
            let body = match &example["value"] {
                Value::String(text) => text.clone(),
                job => job.to_string(),
            };
            let (status, _, answer) = post(app.http_addr(), Some(TOKEN), content_type, body).await;
            assert_eq!(status, StatusCode::ACCEPTED, "example {name}: {answer}");
            assert_eq!(fields(&answer), documented_fields(&spec, "202"));
            ids.extend(answer["ids"].as_array().unwrap().iter().cloned());
        }
    }
    assert!(ids.len() >= 3, "{ids:?}");
    app.wait_for_delivered(ids.len(), Duration::from_secs(10))
        .await;

    let (status, _, answer) = post(app.http_addr(), Some(TOKEN), "application/json", "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&answer), documented_fields(&spec, "400"));
    let (_, _, answer) = post(app.http_addr(), None, "application/json", "{}").await;
    assert_eq!(fields(&answer), documented_fields(&spec, "401"));

    // With a token and a callback account on one listener, every route is there.
    let client = reqwest::Client::new();
    for route in routes() {
        let url = format!("http://{}{}", app.http_addr(), route.path);
        let status = client
            .request(route.method.clone(), url)
            .send()
            .await
            .unwrap()
            .status();
        assert!(
            route.statuses.contains(&status.as_u16()),
            "{} {} answered {status}",
            route.method,
            route.path
        );
    }
}
