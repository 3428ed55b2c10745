//! W3C trace context: captured from the current span into a `traceparent`
//! header by the writer, and followed from that header by the relay and the
//! consumer helpers, so one trace runs from the writer's transaction to the
//! consumer's handler.

/// The `traceparent` value of the current `tracing` span, when the subscriber
/// carries an OpenTelemetry context (tracing-opentelemetry layer) with a valid span.
#[cfg(feature = "opentelemetry")]
pub(crate) fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return None;
    }
    Some(format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    ))
}

/// Without the `opentelemetry` feature there is no trace context to capture.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn current_traceparent() -> Option<String> {
    None
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) as a remote span
/// context; `None` when it does not parse or names no valid trace.
#[cfg(feature = "opentelemetry")]
pub fn remote_parent(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    let mut parts = traceparent.trim().split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace_id.len() != 32 || span_id.len() != 16 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Make `span` a child of the span `traceparent` names (when it parses and the
/// subscriber carries OpenTelemetry contexts; otherwise nothing changes).
#[cfg(feature = "opentelemetry")]
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if let Some(parent) = traceparent.and_then(remote_parent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// Without the `opentelemetry` feature there is no trace to follow.
#[cfg(not(feature = "opentelemetry"))]
pub fn follow(_span: &tracing::Span, _traceparent: Option<&str>) {}

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use super::remote_parent;

    #[test]
    fn parses_a_valid_traceparent_and_refuses_bad_ones() {
        let context =
            remote_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context.is_remote() && context.is_sampled());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(remote_parent(bad).is_none(), "{bad:?}");
        }
    }
}
