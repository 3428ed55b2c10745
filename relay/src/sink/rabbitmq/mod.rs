//! RabbitMQ sink: persistent, `mandatory` publishes with publisher confirms (lapin).
//!
//! An event counts as [`Outcome::Delivered`] only when RabbitMQ acked it **and**
//! did not return it as unroutable. Every publish runs alone on a pooled channel
//! in confirm mode, so a returned message, a nack or a channel error always
//! belongs to the one event on that channel:
//!
//! - lapin hands a `basic.return` to whichever confirm on the channel resolves
//!   next (`Confirmation::Ack(Some(returned))`), and resolves a multiple-ack in
//!   hash-map order; with many publishes in flight on one channel a returned
//!   event could be reported on another event's confirm and its own ack would
//!   look clean, which would lose it.
//! - RabbitMQ answers a publish to a missing exchange by closing the channel
//!   (404); on a shared channel that would fail every other publish in flight.
//!
//! Concurrency comes from many channels on one connection (at most
//! [`MAX_CHANNELS`]); a channel goes back to the pool only after a clean answer,
//! and a broken connection is replaced by the first publish that needs it.
//!
//! One event must never take the connection down for every other key. RabbitMQ
//! closes the whole connection (501 FRAME_ERROR) when a message's properties and
//! headers do not fit into one frame (`frame_max`, 128 KiB by default), and
//! refuses bodies over its `max_message_size`; both are checked before the
//! publish and are [permanent](SinkError::permanent) rejections of that event. If
//! the broker still closes the connection with an error about what the client
//! sent, every event that was being published then becomes a suspect: it is
//! published again *alone*, and a suspect that takes the connection down alone
//! is rejected permanently, so neither the breaker's probe nor the retries
//! repeat it forever.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use outbox_core::EventId;
use tokio::sync::{Mutex, RwLock, Semaphore};

use crate::event::{OutboxEvent, wire};
use crate::route::Route;
use crate::sink::{Outcome, Sink, SinkError};

mod channels;
mod config;
mod publish;
mod run;
#[cfg(test)]
mod tests;

// Shared by the submodules (`use super::*`); the public API is re-exported below.
use self::{channels::*, config::*, publish::*};

pub(crate) use self::config::parse_url;
pub use self::config::{ExchangeDeclaration, ExchangeKind, RabbitMqConfig, mask_url};

/// Most channels the sink opens on its connection; each carries one publish at a time,
/// so this bounds the publishes in flight to RabbitMQ (further callers wait for a channel).
pub const MAX_CHANNELS: usize = 256;

/// Largest `max_in_flight_per_key` accepted.
pub const MAX_IN_FLIGHT_PER_KEY_CEILING: usize = 10_000;

/// Writer header whose value becomes the message's `correlation_id`.
pub const CORRELATION_ID_HEADER: &str = "correlation-id";

/// AMQP short strings (exchange, routing key, header names, most properties) hold at most this many bytes.
const MAX_SHORT_STRING_BYTES: usize = 255;

/// Reply code and text of a graceful close.
const REPLY_SUCCESS: u16 = 200;

/// Default largest message body, in bytes: RabbitMQ 4's default `max_message_size` (16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of a content header frame besides the properties: frame type, channel and
/// size (7), class id, weight and body size (12), property flags (2), frame end (1).
const HEADER_FRAME_OVERHEAD_BYTES: usize = 22;

/// Suspects remembered at most; beyond that the set is cleared (they are retried normally).
const MAX_SUSPECTS: usize = 10_000;

/// Publishes events to RabbitMQ exchanges with publisher confirms; see the [module docs](self).
pub struct RabbitMqSink {
    config: RabbitMqConfig,
    uri: AMQPUri,
    /// The url with the password masked, for messages and logs.
    shown_url: String,
    app_id: ShortString,
    connection: Mutex<ConnectionSlot>,
    /// Generation of the connection in `connection`; channels of older ones are stale.
    generation: AtomicU64,
    idle: StdMutex<Vec<PooledChannel>>,
    channels: Semaphore,
    closed: AtomicBool,
    /// The negotiated `frame_max` of the current connection, in bytes.
    frame_max: AtomicU32,
    /// Events that were being published when RabbitMQ closed the connection for
    /// something the client sent; each is published again alone.
    suspects: StdMutex<HashSet<EventId>>,
    /// Ordinary publishes share it; a suspect's publish takes it alone.
    isolation: RwLock<()>,
}

impl fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqSink")
            .field("url", &self.shown_url)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Sink for RabbitMqSink {
    async fn publish(&self, event: &OutboxEvent, route: &Route) -> Outcome {
        let publication = match publication(event, route, &self.app_id, Utc::now().timestamp()) {
            Ok(publication) => publication,
            Err(error) => return Outcome::Rejected(error),
        };
        if let Err(error) = self.check_size(event, &publication) {
            return Outcome::Rejected(error);
        }
        let suspect = self.is_suspect(&event.event_id);
        // Waiting for the others to finish is not this publish's time.
        let turn = if suspect {
            tracing::info!(
                event_id = %event.event_id,
                "publishing alone an event that was in flight when RabbitMQ closed the connection"
            );
            Turn::Alone(self.isolation.write().await)
        } else {
            Turn::Shared(self.isolation.read().await)
        };
        let timeout = self.config.publish_timeout;
        let mut client_fault = None;
        let attempt = tokio::time::timeout(
            timeout,
            self.publish_on_a_channel(publication, &event.payload, route, &mut client_fault),
        )
        .await;
        drop(turn);
        if let Some(reply) = client_fault {
            if suspect {
                self.set_suspect(event.event_id, false);
                return Outcome::Rejected(SinkError::permanent(format!(
                    "RabbitMQ closed the whole connection ({reply}) when this event was published \
                     alone, as it did when it was published with others: the broker refuses \
                     something in it (headers, properties, size); fix the event"
                )));
            }
            self.set_suspect(event.event_id, true);
        } else if suspect {
            self.set_suspect(event.event_id, false);
        }
        match attempt {
            Ok(outcome) => outcome,
            // The channel in use was dropped with the future, so a late answer cannot be misread.
            Err(_) => Outcome::Retry(SinkError::new(format!(
                "publishing to exchange '{}' did not complete within {timeout:?} (no channel, \
                 connection or confirm from RabbitMQ at {}); is the broker overloaded, unreachable \
                 or blocking publishers (memory or disk alarm)?",
                route.destination, self.shown_url
            ))),
        }
    }

    fn max_in_flight_per_key(&self) -> usize {
        self.config.max_in_flight_per_key
    }

    async fn publish_run(&self, run: &[(&OutboxEvent, Route)]) -> Vec<Outcome> {
        if self.config.max_in_flight_per_key <= 1 {
            return crate::sink::one_at_a_time(self, run).await;
        }
        self.publish_overlapped(run).await
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.channels.close();
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        let graceful = async {
            let closes = idle
                .iter()
                .map(|pooled| pooled.channel.close(REPLY_SUCCESS, "OK".into()));
            // Errors on close change nothing: the relay is done with the broker.
            let _ = futures_util::future::join_all(closes).await;
            let live = self.connection.lock().await.live.take();
            if let Some(live) = live {
                let _ = live.connection.close(REPLY_SUCCESS, "OK".into()).await;
            }
        };
        if tokio::time::timeout(self.config.connect_timeout, graceful)
            .await
            .is_err()
        {
            tracing::warn!(url = %self.shown_url, "closing the RabbitMQ connection timed out");
        }
    }
}
