//! Log set-up: human-readable by default, JSON with `HERALD_LOG_FORMAT=json`,
//! filtered with `RUST_LOG` (default `info`). With a [`TelemetryConfig`] (the
//! worker) that names an `otlp_endpoint`, spans also get OpenTelemetry
//! contexts and go to that collector; job spans carry a `trace_id` field either
//! way (without an endpoint it is made by hand, see [`crate::telemetry`]).

mod writer;

use std::fmt;

use tracing::Level;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;
use crate::telemetry::Telemetry;

/// Where log lines go.
pub enum Sink {
    Stderr,
    /// A file, without terminal colours (`herald demo` keeps its report apart so).
    File(std::fs::File),
}

/// What [`init`] set up; keep it until the process ends.
pub struct Logs {
    /// The trace exporter, if the worker's config names one.
    pub telemetry: Option<Telemetry>,
    writer: writer::Flush,
}

impl Logs {
    /// Writes every log line so far before the caller writes to stderr itself
    /// (a final error); later lines are written as they are logged.
    pub fn flush(&mut self) {
        self.writer.flush();
    }
}

/// Installs the global subscriber, logging to stderr; keep what it returns until the process ends.
pub fn init(telemetry: Option<&TelemetryConfig>) -> Logs {
    init_to(telemetry, Sink::Stderr)
}

/// [`init`], logging to `sink`. Lines are written by a thread of their own
/// ([`writer`]): a sink that blocks (a full pipe, a file system flushing)
/// holds no delivery.
pub fn init_to(telemetry: Option<&TelemetryConfig>, sink: Sink) -> Logs {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: in a log file they are bytes to write and to strip.
    let (ansi, sink): (bool, Box<dyn std::io::Write + Send>) = match sink {
        Sink::Stderr => (
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            Box::new(std::io::stderr()),
        ),
        Sink::File(file) => (false, Box::new(file)),
    };
    let (lines, flush) = writer::spawn(sink);
    let writer = BoxMakeWriter::new(lines);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let fmt = if json {
        fmt.json().with_current_span(true).boxed()
    } else if ansi {
        fmt.boxed()
    } else {
        fmt.fmt_fields(PlainFields).boxed()
    };
    // Only an exporter needs OpenTelemetry spans: without one, jobs' trace
    // contexts are made by hand (see `telemetry::JobTrace`), at a fraction of the cost.
    let telemetry = telemetry
        .filter(|config| config.otlp_endpoint.is_some())
        .and_then(|config| {
            Telemetry::new(config)
                .inspect_err(|e| eprintln!("warning: no traces exported: {e:#}"))
                .ok()
        });
    // herald's own spans are traced whatever RUST_LOG lets the log show.
    let otel = telemetry.as_ref().map(|t| {
        t.layer()
            .with_filter(Targets::new().with_target("herald", Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .try_init()
        .is_ok();
    if installed && telemetry.is_some() {
        crate::telemetry::use_opentelemetry();
    }
    Logs {
        telemetry,
        writer: flush,
    }
}

/// The fields of a log line without colours, as tracing's default field
/// formatter writes them with ANSI off (`name=value`, space-separated, the
/// message first and bare), without going through its styling on every field
/// name (a third of what a job's span and `delivered` line cost to format).
/// The message, errors and raw identifiers are left to the default visitor,
/// which sanitises ANSI escapes in them.
struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        PlainVisitor {
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes `name=` and `value`, or hands the field to the default visitor.
    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        self.result = write!(self.writer, "{separator}{}=", field.name())
            .and_then(|()| value(&mut self.writer));
    }

    fn default_visitor(&mut self) -> DefaultVisitor<'_> {
        let is_empty = std::mem::replace(&mut self.is_empty, false);
        DefaultVisitor::new(self.writer.by_ref(), is_empty)
    }

    fn is_plain(field: &Field) -> bool {
        field.name() != "message" && !field.name().starts_with("r#")
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::is_plain(field) {
            self.write(field, |w| write!(w, "{value:?}"));
        } else {
            self.delegate(|v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if Self::is_plain(field) {
            self.write(field, |w| write!(w, "{value}"));
        } else {
            self.delegate(|v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if Self::is_plain(field) {
            self.write(field, |w| write!(w, "{value}"));
        } else {
            self.delegate(|v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::is_plain(field) {
            self.write(field, |w| write!(w, "{value}"));
        } else {
            self.delegate(|v| v.record_bool(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if Self::is_plain(field) {
            self.write(field, |w| write!(w, "{value:?}"));
        } else {
            self.delegate(|v| v.record_debug(field, value));
        }
    }
}

impl PlainVisitor<'_> {
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = self.default_visitor();
        record(&mut visitor);
        self.result = visitor.finish();
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// What a job's life logs, written with the field formatter `plain` or the default.
    fn log_a_job(plain: bool) -> String {
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_writer(lines.clone());
        let layer = if plain {
            layer.fmt_fields(PlainFields).boxed()
        } else {
            layer.boxed()
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "job",
                id = "order \"8812\"\n\u{1b}[31m",
                vendor = %"openim",
                attempt = 2u32,
                late = -3i64,
                retry = true,
                trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736"),
                r#type = "x",
            );
            let _entered = span.enter();
            tracing::info!(message_id = "-", "delivered \u{1b}[2J");
            let error = std::io::Error::other("refused");
            tracing::warn!(error = &error as &dyn std::error::Error, code = ?Some(7), "no answer");
            tracing::warn!(pause_ms = 5u64, "vendor rate limit: {} paused", "lane");
        });
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn plain_fields_write_what_the_default_formatter_writes_without_colours() {
        let plain = log_a_job(true);
        assert!(plain.contains("attempt=2"), "{plain}");
        assert!(plain.contains("delivered"), "{plain}");
        assert_eq!(plain, log_a_job(false));
    }
}
