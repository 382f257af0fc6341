//! Log set-up: human-readable by default, JSON with `HERALD_LOG_FORMAT=json`,
//! filtered with `RUST_LOG` (default `info`). With a [`TelemetryConfig`] (the
//! worker) that names an `otlp_endpoint`, spans also get OpenTelemetry
//! contexts and go to that collector; job spans carry a `trace_id` field either
//! way (without an endpoint it is made by hand, see [`crate::telemetry`]).

use tracing::Level;
use tracing_subscriber::filter::Targets;
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

/// Installs the global subscriber, logging to stderr; keep what it returns until the process ends.
pub fn init(telemetry: Option<&TelemetryConfig>) -> Option<Telemetry> {
    init_to(telemetry, Sink::Stderr)
}

/// [`init`], logging to `sink`.
pub fn init_to(telemetry: Option<&TelemetryConfig>, sink: Sink) -> Option<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer();
    let fmt = match sink {
        // Colours only on a terminal: in a log file they are bytes to write and to strip.
        Sink::Stderr => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(BoxMakeWriter::new(std::io::stderr)),
        Sink::File(file) => fmt
            .with_ansi(false)
            .with_writer(BoxMakeWriter::new(std::sync::Mutex::new(file))),
    };
    let fmt = if json {
        fmt.json().with_current_span(true).boxed()
    } else {
        fmt.boxed()
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
    telemetry
}
