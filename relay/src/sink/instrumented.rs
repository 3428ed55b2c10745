//! Every publish, measured and traced: a `publish` span per event (a child of
//! the writer's span when the event carries its `traceparent` and the relay is
//! built with the `opentelemetry` feature), the publish duration, and for
//! delivered events the time from the event's creation to the broker's confirm.
//!
//! Commit-to-confirm is measured from the event's `created_at`: the writer's
//! clock when it enqueued the event (inside its transaction, so the transaction's
//! remaining time is included), the best timestamp both sources carry.

use std::future::Future;
use std::sync::Arc;

use tracing::Instrument;

use super::{Outcome, Sink};
use crate::RelayStats;
use crate::event::OutboxEvent;
use crate::route::Route;

/// A sink whose publishes are timed into [`RelayStats`] and traced.
pub(crate) struct InstrumentedSink<S> {
    inner: S,
    stats: Arc<RelayStats>,
    system: &'static str,
}

impl<S: Sink> InstrumentedSink<S> {
    /// Wrap `inner`, a sink of messaging system `system` (`rabbitmq`, `kafka`).
    pub(crate) fn new(inner: S, stats: Arc<RelayStats>, system: &'static str) -> Self {
        InstrumentedSink {
            inner,
            stats,
            system,
        }
    }
}

impl<S: Sink> Sink for InstrumentedSink<S> {
    fn publish(&self, event: &OutboxEvent, route: &Route) -> impl Future<Output = Outcome> + Send {
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = self.system,
            messaging.destination.name = %route.destination,
            messaging.message.id = %event.event_id,
            outbox.sequence = event.sequence,
        );
        follow_writer(&span, event);
        let started = std::time::Instant::now();
        async move {
            let outcome = self.inner.publish(event, route).await;
            self.stats.publish_duration.observe(started.elapsed());
            if let Outcome::Delivered = outcome {
                let age = chrono::Utc::now() - event.created_at;
                self.stats
                    .commit_to_confirm
                    .observe(age.to_std().unwrap_or_default());
            }
            outcome
        }
        .instrument(span)
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        self.inner.close()
    }
}

/// Make `span` a child of the writer's span named by the event's `traceparent`.
#[cfg(feature = "opentelemetry")]
fn follow_writer(span: &tracing::Span, event: &OutboxEvent) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if let Some(parent) = event
        .headers
        .get("traceparent")
        .and_then(|value| parse_traceparent(value))
    {
        // Without an OpenTelemetry layer there is nothing to attach to; that is fine.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

#[cfg(not(feature = "opentelemetry"))]
fn follow_writer(_span: &tracing::Span, _event: &OutboxEvent) {}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) as a remote span context.
#[cfg(feature = "opentelemetry")]
pub(crate) fn parse_traceparent(value: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    let mut parts = value.trim().split('-');
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

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use super::parse_traceparent;

    #[test]
    fn parses_a_valid_traceparent_and_refuses_bad_ones() {
        let context =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
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
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }
}
