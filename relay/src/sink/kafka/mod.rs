//! Kafka sink: an idempotent producer (`enable.idempotence=true`, `acks=all`) whose
//! delivery reports decide every event's [`Outcome`] (rdkafka with its bundled librdkafka).
//!
//! - **Settled only on a delivery report.** `publish` enqueues the record and awaits
//!   its delivery report; only a report without an error is [`Outcome::Delivered`].
//!   The wait is bounded by `message_timeout` (librdkafka's `message.timeout.ms`,
//!   which includes its own retries) plus a margin; a timed-out delivery adds a
//!   topic lookup of at most 5 s (shared by concurrent timeouts), so a publish
//!   returns within `message_timeout` + 10 s at worst.
//! - **Per-key order.** Key = the route's key (the partition key for Kafka routes),
//!   so a key always lands on one partition; with the default `murmur2_random`
//!   partitioner it is the partition a Java client picks for the same key.
//!   librdkafka's internal retries cannot reorder or duplicate within a partition
//!   because the producer is idempotent (at most 5 requests in flight per
//!   connection), so a key's run has up to `max_in_flight_per_key` events in
//!   flight at once and reads their reports in order; when an event could fail
//!   alone the run waits for it first (see `run.rs`).
//! - **Poison isolation.** An event larger than `max_message_bytes` (key, payload,
//!   header names and values) is [`Outcome::Rejected`] before it is sent; errors that
//!   are the event's own (too large, no such topic, not authorized, invalid record)
//!   are rejections, everything else (queue full, broker down, leader change,
//!   timeouts, anything unknown) is [`Outcome::Retry`]; see [`classify`]. A rejection
//!   concerns one event only: other keys keep flowing.
//! - **Missing topics.** With topic auto-creation off, librdkafka holds a record for
//!   an unknown topic until the topic shows up or `message_timeout` runs out, so a
//!   missing topic usually surfaces as a *timed-out* delivery. On a timeout the sink
//!   asks the broker for the topic's metadata and rejects the event only when the
//!   broker says the topic (or the explicit partition) does not exist.
//! - **Fatal producer errors.** If librdkafka declares the producer instance fatally
//!   failed (its idempotence state cannot be recovered), the sink replaces it with a
//!   new one and the events concerned are retried.
//!
//! Delivery is at-least-once: after a timeout or a replaced producer an event may
//! be published again and consumers see a duplicate of an earlier event, never a
//! gap. Every message carries the [`wire`] headers so consumers can deduplicate
//! (event id) and sort (sequence).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::event::{OutboxEvent, wire};
use crate::route::Route;
use crate::sink::{Outcome, Sink, SinkError};
use topic_limits::{TopicLimit, TopicLimits, batch_bytes};

mod classify;
mod config;
mod producer;
mod record;
mod run;
#[cfg(test)]
mod tests;
mod topic_limits;

// Shared by the submodules (`use super::*`); the public API is re-exported below.
use self::{classify::*, config::*, producer::*, record::*};

pub use self::classify::{Classification, classify};
pub use self::config::KafkaConfig;

/// Default partitioner: librdkafka's Java-compatible murmur2 hash of the key
/// (records without a key go to a random partition; the sink always sends a key).
pub const DEFAULT_PARTITIONER: &str = "murmur2_random";

/// Partitioners librdkafka offers; only `murmur2` and `murmur2_random` place keys
/// where Java clients (and Kafka Streams) expect them.
pub const PARTITIONERS: [&str; 7] = [
    "murmur2_random",
    "murmur2",
    "consistent_random",
    "consistent",
    "fnv1a_random",
    "fnv1a",
    "random",
];

/// Default largest event, in bytes (key + payload + header names and values).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// Room left in librdkafka's `message.max.bytes` above `max_message_bytes` for
/// record and batch framing, in bytes: every event the size check admits also
/// passes librdkafka's own check, and with the defaults a produce request stays
/// below Kafka's default `max.message.bytes` of 1,048,588 bytes.
pub const FRAMING_ALLOWANCE_BYTES: usize = 16 * 1024;

/// Largest `max_message_bytes` accepted (librdkafka's `message.max.bytes` ceiling
/// of 1,000,000,000 bytes minus [`FRAMING_ALLOWANCE_BYTES`]).
pub const MAX_MESSAGE_BYTES_CEILING: usize = 1_000_000_000 - FRAMING_ALLOWANCE_BYTES;

/// Default bound on one delivery, librdkafka retries included (`message.timeout.ms`).
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on the broker check in [`KafkaSink::connect`] and on flushing in `close`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests in flight per broker connection: the most the idempotent producer
/// allows while still keeping each partition's order.
pub const MAX_IN_FLIGHT_PER_CONNECTION: u32 = 5;

/// Default events of one key in flight at once ([`KafkaConfig::max_in_flight_per_key`]).
pub const DEFAULT_MAX_IN_FLIGHT_PER_KEY: usize = 64;

/// Largest `max_in_flight_per_key` accepted.
pub const MAX_IN_FLIGHT_PER_KEY_CEILING: usize = 10_000;

/// Waiting for a delivery report gives up this long after `message_timeout`
/// (librdkafka reports by then; this only guards against a lost report).
const REPORT_MARGIN: Duration = Duration::from_secs(5);

/// Bound on the metadata lookup that tells a missing topic from a slow broker.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a topic lookup's verdict (or the brokers not answering it) is reused.
const TOPIC_CHECK_TTL: Duration = Duration::from_secs(5);

/// Kafka's limit on the length of a topic name.
const MAX_TOPIC_NAME_BYTES: usize = 249;

/// Publishes events to Kafka topics with an idempotent producer; see the [module docs](self).
pub struct KafkaSink {
    config: KafkaConfig,
    /// What every producer instance is built from (also after a fatal error).
    client_config: ClientConfig,
    producer: RwLock<Current>,
    topic_checks: tokio::sync::Mutex<TopicChecks>,
    /// Each topic's `max.message.bytes`, where the brokers tell it.
    topic_limits: TopicLimits,
    closed: AtomicBool,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the ClientConfig: its Debug prints every value, passwords included.
        f.debug_struct("KafkaSink")
            .field("config", &self.config)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Sink for KafkaSink {
    async fn publish(&self, event: &OutboxEvent, route: &Route) -> Outcome {
        let prepared = match self.prepare(event, route).await {
            Ok(prepared) => prepared,
            Err(outcome) => return outcome,
        };
        self.report(prepared).await
    }

    fn max_in_flight_per_key(&self) -> usize {
        self.config.max_in_flight_per_key
    }

    async fn publish_run(&self, run: &[(&OutboxEvent, Route)]) -> Vec<Outcome> {
        self.publish_overlapped(run).await
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let (producer, _) = self.current();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(CONNECT_TIMEOUT)).await;
        match flushed {
            Ok(Ok(())) => tracing::info!(brokers = %self.config.brokers, "Kafka producer flushed"),
            Ok(Err(error)) => tracing::warn!(
                brokers = %self.config.brokers,
                %error,
                "flushing the Kafka producer did not finish within {CONNECT_TIMEOUT:?}; \
                 unconfirmed events stay in the outbox and are published again"
            ),
            Err(error) => tracing::warn!(%error, "flushing the Kafka producer failed"),
        }
    }
}
