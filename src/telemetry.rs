//! Traces: a producer's W3C `traceparent` continues through the job's span to
//! the vendor request, and on through retries and replays; spans go to an
//! OTLP/HTTP collector when `[telemetry] otlp_endpoint` is set.
//!
//! The job span takes the producer's context from the AMQP headers (or starts a
//! trace when there is none) and records its `trace_id`, so every log line
//! about the job carries it. Each vendor request is a child span whose context
//! goes out as a `traceparent` header. A retry or dead-letter copy carries the
//! job span's `traceparent`, so the next attempt, and a replay, continue the trace.

use std::collections::HashMap;
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

/// The span of one vendor request, a child of the current (job) span.
pub fn vendor_request_span() -> Span {
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
pub fn http_headers() -> reqwest::header::HeaderMap {
    current()
        .into_iter()
        .filter_map(|(k, v)| Some((reqwest::header::HeaderName::from_static(k), v.parse().ok()?)))
        .collect()
}

/// `properties` with `traceparent` set to the current span's, so a copy
/// (retry, dead letter, and a replay of it) continues the trace.
pub fn carry(properties: BasicProperties) -> BasicProperties {
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
        let replayed = crate::envelope::copy_for_replay(&dead, "run-1");
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
}
