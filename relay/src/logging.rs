//! The daemon's log output: text or JSON lines on stderr, colour only on a terminal.
//!
//! Every format applies [`crate::log_filter`], so the caps that keep payloads and
//! headers out of library logs hold in both.

use std::io::IsTerminal;

use tracing_subscriber::Layer as _;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal and `NO_COLOR` is unset.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`), never coloured.
    Json,
}

/// Whether text logs may carry ANSI colour codes: only on a terminal, and never
/// when `NO_COLOR` is set to anything non-empty (<https://no-color.org>).
pub fn colour_allowed(stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

/// Keeps the trace exporter (if any) alive; dropping it flushes the spans still queued.
#[must_use = "dropping the guard stops the trace export"]
pub struct LogGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Install the global subscriber writing to stderr in `format`. Built with the
/// `otlp` feature and with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are also exported over OTLP
/// (HTTP, protobuf) to that collector.
pub fn init(format: LogFormat) -> LogGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let lines = match format {
        LogFormat::Text => {
            let no_color = std::env::var("NO_COLOR").ok();
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour_allowed(
                    std::io::stderr().is_terminal(),
                    no_color.as_deref(),
                ))
                .boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let registry = tracing_subscriber::registry()
        .with(crate::log_filter())
        .with(lines);
    #[cfg(feature = "otlp")]
    {
        let (layer, provider) = match otlp::tracer() {
            Some((layer, provider)) => (Some(layer), Some(provider)),
            None => (None, None),
        };
        registry.with(layer).init();
        LogGuard { provider }
    }
    #[cfg(not(feature = "otlp"))]
    {
        registry.init();
        LogGuard {}
    }
}

/// The OTLP exporter, when a collector endpoint is configured.
#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::registry::LookupSpan;

    /// A tracing layer exporting spans to the configured collector, and its provider.
    pub(super) fn tracer<S>() -> Option<(impl tracing_subscriber::Layer<S>, SdkTracerProvider)>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if !configured {
            return None;
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => exporter,
            Err(error) => {
                eprintln!("warning: OTLP trace export is off: {error}");
                return None;
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("outbox-relay")
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-relay"));
        Some((layer, provider))
    }
}

#[cfg(test)]
mod tests {
    use super::colour_allowed;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some("")));
        assert!(!colour_allowed(true, Some("1")));
        assert!(!colour_allowed(false, None));
    }
}
