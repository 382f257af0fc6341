//! Traces end to end: a producer's `traceparent` continues through `herald
//! run` (a real process) to the vendor and through a retry, the spans reach an
//! OTLP/HTTP receiver under the producer's trace id, and every JSON log line
//! about the job carries that trace id. Without an OTLP endpoint (no
//! OpenTelemetry layer) the trace id and `traceparent` still go through.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::{Options, Process, fault, free_port, signal, spawn_app, wait_until};
use herald::sandbox::FaultAnswer;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
}

/// A minimal OTLP/HTTP receiver: decodes every protobuf export it is sent.
async fn otlp_receiver() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut sink = sink.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            sink.push(Received {
                                name: span.name,
                                trace_id: hex::encode(span.trace_id),
                                span_id: hex::encode(span.span_id),
                                parent_span_id: hex::encode(span.parent_span_id),
                                attributes: span
                                    .attributes
                                    .into_iter()
                                    .map(|kv| (kv.key, format!("{:?}", kv.value)))
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producers_trace_continues_through_the_job_the_vendor_request_and_a_retry() {
    let (receiver, spans) = otlp_receiver().await;
    let app = spawn_app(
        "trace",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    // The first attempt gets a 500: the job goes through a retry tier, then is delivered.
    app.sandbox
        .add_fault(fault("netease", "u-traced", 1, FaultAnswer::Code(500)));
    let file = app.config_file();
    let text = format!(
        "{}\n[telemetry]\notlp_endpoint = \"http://{receiver}\"\n",
        app.config_text
    );
    std::fs::write(file.path(), text).unwrap();
    let (mut worker, logs, port) = spawn_json_worker(file.path());
    let client = reqwest::Client::new();
    wait_until_ready(&client, port).await;

    let job = app.job("traced-1", "u-traced");
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{TRACE}-{PRODUCER_SPAN}-01").into()),
    );
    let properties = BasicProperties::default()
        .with_message_id("traced-1".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    app.publisher
        .publish(
            &app.names.jobs(),
            "netease.default",
            job.to_string().as_bytes(),
            properties,
        )
        .await
        .unwrap();
    app.wait_for_delivered(1, Duration::from_secs(20)).await;

    let delivered = &app.delivered()[0];
    let sent = &delivered.fields["header.traceparent"];
    println!("vendor request header: traceparent: {sent}");
    assert!(sent.starts_with(&format!("00-{TRACE}-")), "{sent}");

    // SIGTERM: the worker drains and its tracer sends what it still holds.
    signal(&worker, "-TERM");
    let exit = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    wait_until("spans at the receiver", Duration::from_secs(10), || {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == "job")
            .count()
            >= 2
    })
    .await;

    let spans = spans.lock().unwrap().clone();
    println!("spans received by the OTLP receiver:");
    for s in &spans {
        println!(
            "  {:<15} trace {} span {} parent {} {:?}",
            s.name, s.trace_id, s.span_id, s.parent_span_id, s.attributes
        );
    }
    let ours: Vec<&Received> = spans.iter().filter(|s| s.trace_id == TRACE).collect();
    let jobs: Vec<&&Received> = ours.iter().filter(|s| s.name == "job").collect();
    let requests: Vec<&&Received> = ours.iter().filter(|s| s.name == "vendor request").collect();
    assert_eq!(jobs.len(), 2, "the first attempt and the retry: {spans:#?}");
    assert_eq!(requests.len(), 2, "one vendor request per attempt");
    let first = jobs
        .iter()
        .find(|s| s.parent_span_id == PRODUCER_SPAN)
        .expect("the first attempt is a child of the producer's span");
    let retry = jobs
        .iter()
        .find(|s| s.parent_span_id == first.span_id)
        .expect("the retry continues from the first attempt's span");
    for request in &requests {
        assert!(
            [&first.span_id, &retry.span_id].contains(&&request.parent_span_id),
            "a vendor request is a child of its job span"
        );
    }
    assert!(
        sent.contains(
            &requests
                .iter()
                .find(|r| r.parent_span_id == retry.span_id)
                .unwrap()
                .span_id
        )
    );

    let mut text = String::new();
    std::fs::File::open(logs.path())
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let about_the_job: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#""id":"traced-1""#))
        .collect();
    println!("JSON log lines about the job:");
    for line in &about_the_job {
        println!("  {line}");
    }
    assert!(about_the_job.len() >= 2, "{text}");
    for line in &about_the_job {
        assert!(
            line.contains(&format!(r#""trace_id":"{TRACE}""#)),
            "a log line about the job without its trace id: {line}"
        );
    }
    assert!(
        about_the_job
            .iter()
            .any(|l| l.contains(r#""level":"INFO""#) && l.contains(r#""message":"delivered""#)),
        "the delivery is logged at info"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_the_trace_id_still_reaches_the_logs_the_vendor_and_the_retry() {
    let app = spawn_app(
        "trace-no-otlp",
        Options {
            start_worker: false,
            ..Options::default()
        },
    )
    .await;
    // A 500 first: the retry copy must carry the trace to the second attempt.
    app.sandbox
        .add_fault(fault("netease", "u-traced", 1, FaultAnswer::Code(500)));
    let file = app.config_file();
    let (mut worker, logs, port) = spawn_json_worker(file.path());
    let client = reqwest::Client::new();
    wait_until_ready(&client, port).await;

    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{TRACE}-{PRODUCER_SPAN}-01").into()),
    );
    let properties = BasicProperties::default()
        .with_message_id("traced-2".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let job = app.job("traced-2", "u-traced");
    app.publisher
        .publish(
            &app.names.jobs(),
            "netease.default",
            job.to_string().as_bytes(),
            properties,
        )
        .await
        .unwrap();
    app.wait_for_delivered(1, Duration::from_secs(20)).await;

    let sent = app.delivered()[0].fields["header.traceparent"].clone();
    println!("vendor request header: traceparent: {sent}");
    assert!(sent.starts_with(&format!("00-{TRACE}-")), "{sent}");
    assert!(sent.ends_with("-01"), "{sent}");
    assert_eq!(sent.len(), 55, "{sent}");
    assert!(
        !sent.contains(PRODUCER_SPAN),
        "a span id of its own: {sent}"
    );

    signal(&worker, "-TERM");
    let exit = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");

    let mut text = String::new();
    std::fs::File::open(logs.path())
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let about_the_job: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#""id":"traced-2""#))
        .collect();
    println!("JSON log lines about the job:");
    for line in &about_the_job {
        println!("  {line}");
    }
    for line in &about_the_job {
        assert!(
            line.contains(&format!(r#""trace_id":"{TRACE}""#)),
            "a log line about the job without its trace id: {line}"
        );
    }
    assert!(
        about_the_job
            .iter()
            .any(|l| l.contains(r#""attempt":1"#) && l.contains(r#""message":"retrying later""#)),
        "the first attempt is logged: {text}"
    );
    assert!(
        about_the_job.iter().any(|l| l.contains(r#""attempt":2"#)
            && l.contains(r#""level":"INFO""#)
            && l.contains(r#""message":"delivered""#)),
        "the retry, under the same trace id, is logged as delivered: {text}"
    );
}

async fn wait_until_ready(client: &reqwest::Client, port: u16) {
    for _ in 0..200 {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the worker never became ready");
}

/// `herald run` with JSON logs at info into a file: the worker, its log file and its HTTP port.
fn spawn_json_worker(config: &std::path::Path) -> (Process, tempfile::NamedTempFile, u16) {
    let logs = tempfile::NamedTempFile::new().unwrap();
    let port = free_port();
    let worker = Process::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--config"])
            .arg(config)
            .env("HERALD_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,lapin=warn")
            .stderr(logs.reopen().unwrap()),
    );
    (worker, logs, port)
}
