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

impl<S: Sink> InstrumentedSink<S> {
    /// The `publish` span of one event, a child of the writer's span.
    fn span(&self, event: &OutboxEvent, route: &Route) -> tracing::Span {
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = self.system,
            messaging.destination.name = %route.destination,
            messaging.message.id = %event.event_id,
            outbox.sequence = event.sequence,
        );
        follow_writer(&span, event);
        span
    }
}

impl<S: Sink> Sink for InstrumentedSink<S> {
    fn publish(&self, event: &OutboxEvent, route: &Route) -> impl Future<Output = Outcome> + Send {
        let span = self.span(event, route);
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

    fn max_in_flight_per_key(&self) -> usize {
        self.inner.max_in_flight_per_key()
    }

    /// One event at a time through [`InstrumentedSink::publish`] when the inner sink
    /// allows one per key; otherwise the inner sink's overlapped run, each event
    /// with its own span and the run's duration as its publish duration.
    async fn publish_run<'a>(&'a self, run: &'a [(&'a OutboxEvent, Route)]) -> Vec<Outcome> {
        if self.inner.max_in_flight_per_key() <= 1 {
            let mut outcomes = Vec::with_capacity(run.len());
            for (event, route) in run {
                let outcome = self.publish(event, route).await;
                let delivered = matches!(outcome, Outcome::Delivered);
                outcomes.push(outcome);
                if !delivered {
                    break;
                }
            }
            return outcomes;
        }
        let spans: Vec<tracing::Span> = run
            .iter()
            .map(|(event, route)| self.span(event, route))
            .collect();
        let started = std::time::Instant::now();
        let outcomes = self.inner.publish_run(run).await;
        let took = started.elapsed();
        let now = chrono::Utc::now();
        for (outcome, (event, _route)) in outcomes.iter().zip(run) {
            self.stats.publish_duration.observe(took);
            if let Outcome::Delivered = outcome {
                let age = now - event.created_at;
                self.stats
                    .commit_to_confirm
                    .observe(age.to_std().unwrap_or_default());
            }
        }
        drop(spans);
        outcomes
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        self.inner.close()
    }
}

/// Make `span` a child of the writer's span named by the event's `traceparent`.
fn follow_writer(span: &tracing::Span, event: &OutboxEvent) {
    #[cfg(feature = "opentelemetry")]
    outbox_core::trace::follow(span, event.headers.get("traceparent").map(String::as_str));
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (span, event);
}
