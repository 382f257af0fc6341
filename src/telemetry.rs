//! Traces: a producer's W3C `traceparent` continues through the job's span to
//! the vendor request, and on through retries and replays; spans go to an
//! OTLP/HTTP collector when `[telemetry] otlp_endpoint` is set.
//!
//! The job span takes the producer's context from the AMQP headers (or starts a
//! trace when there is none) and records its `trace_id`, so every log line
//! about the job carries it. Each vendor request is a child span whose context
//! goes out as a `traceparent` header. A retry or dead-letter copy carries the
//! job span's `traceparent`, so the next attempt, and a replay, continue the trace.
//!
//! All of the above needs OpenTelemetry only to export spans. Without an
//! `otlp_endpoint` no OpenTelemetry layer is installed and the job's trace
//! context is made by hand ([`JobTrace`]): the trace id of a valid producer
//! `traceparent` (or a fresh one), written into the job span's `trace_id`
//! field, sent as `traceparent` with a fresh span id on each vendor request,
//! and carried on retry and dead-letter copies. That costs a header parse, two
//! random numbers and a few hex digits per job, instead of two OpenTelemetry spans.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};

use crate::config::TelemetryConfig;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Set once an OpenTelemetry layer is installed ([`crate::logging::init`] with
/// an `otlp_endpoint`); until then jobs get a [`JobTrace`] made by hand.
static OTEL: AtomicBool = AtomicBool::new(false);

/// Jobs' trace contexts come from OpenTelemetry spans from now on.
pub fn use_opentelemetry() {
    OTEL.store(true, Ordering::Relaxed);
}

fn opentelemetry() -> bool {
    OTEL.load(Ordering::Relaxed)
}

/// Keeps the tracer provider alive; dropping it sends the spans still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

impl Telemetry {
    /// A provider exporting to `config.otlp_endpoint` when set; without one,
    /// spans still have trace ids (for logs and `traceparent`) but go nowhere.
    pub fn new(config: &TelemetryConfig) -> anyhow::Result<Self> {
        let mut provider = SdkTracerProvider::builder().with_resource(
            Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .build(),
        );
        if let Some(endpoint) = &config.otlp_endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(traces_url(endpoint))
                .with_timeout(Duration::from_secs(10))
                .with_headers(HashMap::new())
                .build()?;
            provider = provider.with_batch_exporter(exporter);
        }
        Ok(Self {
            provider: provider.build(),
        })
    }

    /// The tracing layer that gives spans their OpenTelemetry context.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("herald"))
            .with_location(false)
            .with_threads(false)
    }

    /// Sends the spans buffered so far.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// The collector's OTLP/HTTP traces URL: `/v1/traces` below a bare endpoint.
fn traces_url(endpoint: &url::Url) -> String {
    if endpoint.path() == "/" || endpoint.path().is_empty() {
        format!("{}v1/traces", endpoint.as_str())
    } else {
        endpoint.to_string()
    }
}

struct Headers<'a>(&'a FieldTable);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` continue the trace named by `properties`' `traceparent` (a
/// new trace without one, or with a malformed one) and records its `trace_id`
/// field. Call before the span is entered.
pub fn continue_trace(span: &Span, properties: &BasicProperties) {
    if let Some(headers) = properties.headers() {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records `span`'s trace id in its `trace_id` field (declared `Empty`).
pub fn record_trace_id(span: &Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// The span of one vendor request, a child of the current (job) span; none
/// without OpenTelemetry (the job span has all there is to log).
pub fn vendor_request_span() -> Span {
    if !opentelemetry() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "vendor request",
        otel.kind = "client",
        trace_id = tracing::field::Empty
    );
    record_trace_id(&span);
    span
}

struct Map(HashMap<String, String>);

impl Injector for Map {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// `traceparent` (and `tracestate`) of the current span; empty outside a trace.
pub fn current() -> Vec<(&'static str, String)> {
    let mut map = Map(HashMap::new());
    TraceContextPropagator::new().inject_context(&Span::current().context(), &mut map);
    [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|k| map.0.remove(k).filter(|v| !v.is_empty()).map(|v| (k, v)))
        .collect()
}

/// The headers of a vendor request made in the current span.
pub fn http_headers() -> http::header::HeaderMap {
    if let Some(job) = hand_made() {
        let mut headers = http::header::HeaderMap::with_capacity(1);
        let value =
            http::header::HeaderValue::from_str(job.child_traceparent().as_str()).expect("ASCII");
        headers.insert(http::header::HeaderName::from_static(TRACEPARENT), value);
        return headers;
    }
    current()
        .into_iter()
        .filter_map(|(k, v)| Some((http::header::HeaderName::from_static(k), v.parse().ok()?)))
        .collect()
}

/// `properties` with `traceparent` set to the current span's, so a copy
/// (retry, dead letter, and a replay of it) continues the trace.
pub fn carry(properties: BasicProperties) -> BasicProperties {
    if let Some(job) = hand_made() {
        // The producer's `tracestate`, if any, is in the copied headers already.
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(job.traceparent().as_str().into()),
        );
        return properties.with_headers(headers);
    }
    let context = current();
    if context.is_empty() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (key, value) in context {
        headers.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    properties.with_headers(headers)
}

/// A producer's `traceparent`, as far as herald uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    /// The `sampled` flag; the other flags are dropped, as OpenTelemetry does.
    pub sampled: bool,
}

/// Longest `traceparent` looked at; a later version may append fields, but
/// nothing legitimate comes near this.
const MAX_TRACEPARENT: usize = 512;

/// Parses a W3C `traceparent`: `<version>-<trace id>-<parent id>-<flags>`, two,
/// 32, 16 and two lowercase hex digits. `None` for version `ff`, a version 00
/// value that is not exactly 55 characters, a later version whose extra fields
/// are not `-`-separated, an all-zero id, uppercase or non-hex digits.
pub fn parse_traceparent(value: &[u8]) -> Option<TraceParent> {
    if value.len() > MAX_TRACEPARENT {
        return None;
    }
    let value = value.trim_ascii();
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = hex(&value[..2])? as u8;
    let rest = &value[55..];
    let extra_ok = if version == 0 {
        rest.is_empty()
    } else {
        rest.is_empty() || rest[0] == b'-'
    };
    if version == 0xff || !extra_ok {
        return None;
    }
    let trace_id = hex(&value[3..35])?;
    let parent_id = hex(&value[36..52])? as u64;
    let flags = hex(&value[53..55])? as u8;
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        sampled: flags & 1 == 1,
    })
}

/// The value of at most 32 lowercase hex digits.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

/// ASCII text of a fixed length, on the stack.
#[derive(Clone, Copy)]
pub struct Ascii<const N: usize>([u8; N]);

impl<const N: usize> Ascii<N> {
    pub fn as_str(&self) -> &str {
        // Only ever filled with ASCII hex digits and `-`.
        std::str::from_utf8(&self.0).expect("ASCII")
    }
}

impl<const N: usize> std::fmt::Display for Ascii<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for Ascii<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn write_hex(out: &mut [u8], mut n: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for d in out.iter_mut().rev() {
        *d = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// A trace id as 32 lowercase hex digits.
pub fn format_trace_id(trace_id: u128) -> Ascii<32> {
    let mut out = [0; 32];
    write_hex(&mut out, trace_id);
    Ascii(out)
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn format_traceparent(trace_id: u128, span_id: u64, sampled: bool) -> Ascii<55> {
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    write_hex(&mut out[3..35], trace_id);
    write_hex(&mut out[36..52], u128::from(span_id));
    out[53..].copy_from_slice(if sampled { b"01" } else { b"00" });
    Ascii(out)
}

fn nonzero<T: PartialEq + Default>(random: impl Fn() -> T) -> T {
    loop {
        let n = random();
        if n != T::default() {
            return n;
        }
    }
}

/// A job's trace context made by hand, when no OpenTelemetry layer is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobTrace {
    pub trace_id: u128,
    /// The job's own span id: the parent named on its retry and dead-letter copies.
    pub span_id: u64,
    pub sampled: bool,
}

impl JobTrace {
    /// Continues the producer's trace when `properties` carry a valid
    /// `traceparent`, else starts one (sampled, as OpenTelemetry's default does).
    pub fn from_properties(properties: &BasicProperties) -> Self {
        let parent =
            properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(TRACEPARENT)? {
                    AMQPValue::LongString(s) => parse_traceparent(s.as_bytes()),
                    AMQPValue::ShortString(s) => parse_traceparent(s.as_str().as_bytes()),
                    _ => None,
                });
        Self {
            trace_id: parent.map_or_else(|| nonzero(rand::random::<u128>), |p| p.trace_id),
            span_id: nonzero(rand::random::<u64>),
            sampled: parent.is_none_or(|p| p.sampled),
        }
    }

    pub fn trace_id_hex(&self) -> Ascii<32> {
        format_trace_id(self.trace_id)
    }

    /// The `traceparent` of a new span (a vendor request) in this job's trace.
    pub fn child_traceparent(&self) -> Ascii<55> {
        format_traceparent(self.trace_id, nonzero(rand::random::<u64>), self.sampled)
    }

    /// The `traceparent` naming the job's own span (on its copies).
    pub fn traceparent(&self) -> Ascii<55> {
        format_traceparent(self.trace_id, self.span_id, self.sampled)
    }
}

tokio::task_local! {
    static JOB: JobTrace;
}

/// The job's trace context made by hand, or `None` when OpenTelemetry makes it
/// (then call [`continue_trace`] on the job span).
pub fn job_trace(properties: &BasicProperties) -> Option<JobTrace> {
    (!opentelemetry()).then(|| JobTrace::from_properties(properties))
}

/// Runs a job's future with its trace context: `trace` (made by hand) is what
/// [`http_headers`] and [`carry`] then use; without one, the current span's.
pub async fn in_trace<F: Future>(trace: Option<JobTrace>, job: F) -> F::Output {
    match trace {
        Some(trace) => JOB.scope(trace, job).await,
        None => job.await,
    }
}

fn hand_made() -> Option<JobTrace> {
    JOB.try_with(|t| *t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced<T>(f: impl FnOnce() -> T) -> T {
        let telemetry = Telemetry::new(&TelemetryConfig::default()).unwrap();
        let subscriber = tracing_subscriber::registry().with(telemetry.layer());
        tracing::subscriber::with_default(subscriber, f)
    }

    fn with_traceparent(value: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(TRACEPARENT.into(), AMQPValue::LongString(value.into()));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_job_span_continues_the_producers_trace_into_the_vendor_request_and_its_copies() {
        traced(|| {
            let span = tracing::info_span!("job", trace_id = tracing::field::Empty);
            continue_trace(&span, &with_traceparent(PARENT));
            let _job = span.enter();
            let request = tracing::info_span!("vendor request");
            let _request = request.enter();
            let headers = http_headers();
            let sent = headers[TRACEPARENT].to_str().unwrap();
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            assert!(!sent.contains("00f067aa0ba902b7"), "a child span's own id");
            drop(_request);
            let copy = carry(BasicProperties::default());
            let carried = copy.headers().as_ref().unwrap().inner()[TRACEPARENT].clone();
            let AMQPValue::LongString(carried) = carried else {
                panic!("{carried:?}")
            };
            assert!(
                carried
                    .to_string()
                    .contains("4bf92f3577b34da6a3ce929d0e0e4736")
            );
        });
    }

    #[test]
    fn a_job_without_or_with_a_broken_traceparent_starts_a_trace() {
        traced(|| {
            for properties in [
                BasicProperties::default(),
                with_traceparent("00-zz-not-a-trace"),
            ] {
                let span = tracing::info_span!("job", trace_id = tracing::field::Empty);
                continue_trace(&span, &properties);
                let _job = span.enter();
                let sent = current();
                assert_eq!(sent.len(), 1, "{sent:?}");
                assert!(!sent[0].1.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
            }
        });
    }

    #[test]
    fn the_traceparent_survives_the_dead_copy_and_its_replay() {
        let dead = crate::envelope::copy_with(&with_traceparent(PARENT), |_| {});
        let replayed = crate::envelope::copy_for_replay(&dead, "run-1", "alice");
        let headers = replayed.headers().clone().unwrap();
        let Some(AMQPValue::LongString(kept)) = headers.inner().get(TRACEPARENT) else {
            panic!("{headers:?}")
        };
        assert_eq!(kept.to_string(), PARENT);
    }

    #[test]
    fn a_bare_endpoint_gets_the_traces_path() {
        let bare = url::Url::parse("http://collector:4318").unwrap();
        assert_eq!(traces_url(&bare), "http://collector:4318/v1/traces");
        let full = url::Url::parse("http://collector:4318/otlp/v1/traces").unwrap();
        assert_eq!(traces_url(&full), "http://collector:4318/otlp/v1/traces");
    }
    #[test]
    fn a_valid_traceparent_parses() {
        assert_eq!(
            parse_traceparent(PARENT.as_bytes()),
            Some(TraceParent {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                parent_id: 0x00f067aa0ba902b7,
                sampled: true,
            })
        );
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // Flags other than `sampled` are dropped; surrounding blanks are ignored.
        let other = " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03\t";
        assert!(parse_traceparent(other.as_bytes()).unwrap().sampled);
        // A later version may append fields after a `-`.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert_eq!(
            parse_traceparent(later.as_bytes()).unwrap().trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736
        );
    }

    #[test]
    fn hostile_or_broken_traceparents_are_refused() {
        let long = format!("{PARENT}{}", "-0".repeat(10_000));
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("garbage", "00-zz-not-a-trace".into()),
            ("version ff", PARENT.replacen("00", "ff", 1)),
            ("non-hex version", PARENT.replacen("00", "0x", 1)),
            (
                "uppercase trace id",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".into(),
            ),
            (
                "uppercase parent id",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01".into(),
            ),
            ("uppercase flags", PARENT.replace("-01", "-0A")),
            (
                "all-zero trace id",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
            ),
            (
                "all-zero parent id",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into(),
            ),
            ("short trace id", PARENT.replace("4bf9", "4bf")),
            ("long trace id", PARENT.replace("4bf9", "4bf99")),
            ("short parent id", PARENT.replace("00f067", "0f067")),
            ("one flag digit", PARENT[..54].to_string()),
            ("version 00 with more", format!("{PARENT}-00")),
            (
                "later version, no separator",
                format!("{}x", PARENT.replacen("00", "01", 1)),
            ),
            ("misplaced separators", PARENT.replace('-', "_")),
            ("plus sign in hex", PARENT.replace("4bf9", "+bf9")),
            ("non-ASCII", PARENT.replace("4bf9", "4b\u{e9}")),
            (
                "non-ASCII, same length",
                "00-4bf92f3577b34da6a3ce929d0e0e47\u{e9}-00f067aa0ba902b7-01".into(),
            ),
            ("very long", long),
        ];
        for (what, value) in cases {
            assert_eq!(
                parse_traceparent(value.as_bytes()),
                None,
                "{what}: {value:.80}"
            );
        }
        assert_eq!(parse_traceparent(&[0xff; 55]), None, "not UTF-8");
    }

    #[test]
    fn traceparents_are_formatted_in_lowercase_with_leading_zeros() {
        assert_eq!(
            format_traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0xf067aa0ba902b7, true).as_str(),
            PARENT
        );
        assert_eq!(
            format_traceparent(1, 2, false).as_str(),
            "00-00000000000000000000000000000001-0000000000000002-00"
        );
        assert_eq!(
            format_trace_id(u128::MAX).as_str(),
            "ffffffffffffffffffffffffffffffff"
        );
        let trace = JobTrace::from_properties(&BasicProperties::default());
        let back = parse_traceparent(trace.child_traceparent().as_str().as_bytes()).unwrap();
        assert_eq!(back.trace_id, trace.trace_id);
        assert_ne!(
            back.parent_id, trace.span_id,
            "a vendor request's own span id"
        );
    }

    #[test]
    fn a_job_trace_continues_a_valid_traceparent_and_starts_one_otherwise() {
        let continued = JobTrace::from_properties(&with_traceparent(PARENT));
        assert_eq!(
            continued.trace_id_hex().as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(continued.span_id, 0x00f067aa0ba902b7);
        let mut short = FieldTable::default();
        short.insert(TRACEPARENT.into(), AMQPValue::ShortString(PARENT.into()));
        let short = BasicProperties::default().with_headers(short);
        assert_eq!(
            JobTrace::from_properties(&short).trace_id,
            continued.trace_id
        );
        let unsampled = with_traceparent(&PARENT.replace("-01", "-00"));
        assert!(!JobTrace::from_properties(&unsampled).sampled);
        for fresh in [
            BasicProperties::default(),
            with_traceparent("00-zz-not-a-trace"),
            with_traceparent(&PARENT.to_uppercase()),
        ] {
            let trace = JobTrace::from_properties(&fresh);
            assert_ne!(trace.trace_id, continued.trace_id);
            assert_ne!(trace.trace_id, 0);
            assert!(trace.sampled);
        }
    }

    #[tokio::test]
    async fn a_hand_made_trace_reaches_the_vendor_request_and_the_copies() {
        let trace = JobTrace::from_properties(&with_traceparent(PARENT));
        let (sent, copy) = in_trace(Some(trace), async {
            let sent = http_headers()[TRACEPARENT].to_str().unwrap().to_string();
            (sent, carry(BasicProperties::default()))
        })
        .await;
        let sent = parse_traceparent(sent.as_bytes()).unwrap();
        assert_eq!(sent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_ne!(sent.parent_id, 0x00f067aa0ba902b7);
        assert_ne!(sent.parent_id, trace.span_id);
        let Some(AMQPValue::LongString(carried)) = copy
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get(TRACEPARENT)
            .cloned()
        else {
            panic!("{copy:?}")
        };
        assert_eq!(carried.to_string(), trace.traceparent().as_str());
        // Outside a job, and without OpenTelemetry, there is no trace to send.
        assert!(http_headers().is_empty());
    }
}
