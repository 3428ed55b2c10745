//! Destinations the relay publishes to.
//!
//! Contract of a [`Sink`]: `publish` returns only after the broker has confirmed
//! the event (publisher confirm, delivery report) or after it is certain that it
//! has not; the relay settles an event only on [`Outcome::Delivered`]. Delivery is
//! at-least-once: a sink may be asked to publish an event it already published
//! (after a timeout, a crash or a lease handover), and consumers must tolerate that.

use std::future::Future;

use crate::event::OutboxEvent;
use crate::route::Route;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kafka")]
mod kafka_topic_limits;
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
    Rejected(SinkError),
}

/// Why a publish did not succeed, in words for logs and the dead-letter table.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// Human-readable reason, naming the broker's reply and what to check.
    pub message: String,
}

impl SinkError {
    /// A sink error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
        }
    }
}

/// A broker the relay publishes to.
pub trait Sink: Send + Sync + 'static {
    /// Publish one event to `route` and wait for the broker's verdict.
    ///
    /// Must not take longer than the sink's configured publish timeout; a
    /// timeout is an [`Outcome::Retry`]. May be called concurrently for events
    /// of different keys; the relay never has two events of one key in flight.
    fn publish(&self, event: &OutboxEvent, route: &Route) -> impl Future<Output = Outcome> + Send;

    /// Flush and close connections; called once on shutdown, after the last publish.
    fn close(&self) -> impl Future<Output = ()> + Send;
}
