//! Destinations the relay publishes to.
//!
//! Contract of a [`Sink`]: `publish` returns only after the broker has confirmed
//! the event (publisher confirm, delivery report) or after it is certain that it
//! has not; the relay settles an event only on [`Outcome::Delivered`]. Delivery is
//! at-least-once: a sink may be asked to publish an event it already published
//! (after a timeout, a crash or a lease handover), and consumers must tolerate that.

use std::future::Future;

use crate::event::OutboxEvent;
use crate::resilience::CLOSE_TIMEOUT;
use crate::route::Route;

pub(crate) use instrumented::InstrumentedSink;

mod instrumented;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

/// What happened to one publish.
#[derive(Debug)]
pub enum Outcome {
    /// The broker confirmed the event: it may be settled.
    Delivered,
    /// Broker or network trouble: try again later; does not count against the event.
    Retry(SinkError),
    /// The broker refused this event itself (unroutable, too large, rejected):
    /// counts as a failed attempt; after the configured number it is dead-lettered.
    /// A [permanent](SinkError::is_permanent) rejection (the event can never be
    /// published as it is) is dead-lettered at its first attempt.
    Rejected(SinkError),
}

/// Why a publish did not succeed, in words for logs and the dead-letter table.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// Human-readable reason, naming the broker's reply and what to check.
    pub message: String,
    /// Whether retrying can never help (see [`SinkError::is_permanent`]).
    permanent: bool,
}

impl SinkError {
    /// A sink error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
            permanent: false,
        }
    }

    /// An error of the event itself that no retry can cure (over a size limit, a
    /// name the protocol cannot carry, a row that cannot be decoded): as a
    /// rejection it is dead-lettered at the first attempt instead of holding its
    /// key for `max_attempts` backoffs.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
            permanent: true,
        }
    }

    /// True for errors made with [`SinkError::permanent`].
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// A broker the relay publishes to.
pub trait Sink: Send + Sync + 'static {
    /// Publish one event to `route` and wait for the broker's verdict.
    ///
    /// Must not take longer than the sink's configured publish timeout; a
    /// timeout is an [`Outcome::Retry`]. May be called concurrently for events
    /// of different keys; the relay never has more events of one key in
    /// flight than [`Sink::max_in_flight_per_key`].
    fn publish(&self, event: &OutboxEvent, route: &Route) -> impl Future<Output = Outcome> + Send;

    /// How many events of one partition key the sink has published and not yet
    /// confirmed at once within a [`Sink::publish_run`]. 1 (the default, and
    /// RabbitMQ's): a key's next event is published only after its predecessor's
    /// confirm, and the relay hands such a sink runs of one event. A sink that
    /// keeps a key's order across several outstanding publishes (Kafka's
    /// idempotent producer keeps a partition's order) allows more and gets a
    /// lane's whole chunk as one run.
    fn max_in_flight_per_key(&self) -> usize {
        1
    }

    /// Publish a run of one key's events, in order, and wait for their verdicts.
    ///
    /// Returns one outcome per event for a **prefix** of `run`: every outcome is
    /// [`Outcome::Delivered`] except possibly the last. The events after that prefix
    /// were not delivered (never sent, or failed as well) and the caller hands them
    /// over again later, in order, so no event of the key is first-delivered before
    /// an earlier one. A sink that keeps a key's order with several publishes
    /// outstanding (see [`Sink::max_in_flight_per_key`]) overlaps them here; the
    /// default publishes one event at a time, each after its predecessor's confirm.
    fn publish_run<'a>(
        &'a self,
        run: &'a [(&'a OutboxEvent, Route)],
    ) -> impl Future<Output = Vec<Outcome>> + Send + 'a {
        one_at_a_time(self, run)
    }

    /// Flush and close connections; called once on shutdown, after the last publish.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// A run published one event at a time, each after its predecessor's confirm,
/// stopping at the first event that is not delivered.
pub(crate) async fn one_at_a_time<S: Sink + ?Sized>(
    sink: &S,
    run: &[(&OutboxEvent, Route)],
) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(run.len());
    for (event, route) in run {
        let outcome = sink.publish(event, route).await;
        let delivered = matches!(outcome, Outcome::Delivered);
        outcomes.push(outcome);
        if !delivered {
            break;
        }
    }
    outcomes
}

/// Close the broker connection within [`CLOSE_TIMEOUT`]: a hung broker must not
/// hold the shutdown beyond the grace period.
pub(crate) async fn close_sink<S: Sink>(sink: &S) {
    if tokio::time::timeout(CLOSE_TIMEOUT, sink.close())
        .await
        .is_err()
    {
        tracing::warn!("closing the broker connection timed out; exiting without waiting for it");
    }
}
