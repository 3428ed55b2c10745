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
//!   partitioner it is the partition a Java client picks for the same key. The
//!   relay never has two events of one key in flight, and librdkafka's internal
//!   retries cannot reorder or duplicate within a partition because the producer
//!   is idempotent (at most 5 requests in flight per connection).
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
use crate::sink::kafka_topic_limits::{TopicLimit, TopicLimits, batch_bytes};
use crate::sink::{Outcome, Sink, SinkError};

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

/// Waiting for a delivery report gives up this long after `message_timeout`
/// (librdkafka reports by then; this only guards against a lost report).
const REPORT_MARGIN: Duration = Duration::from_secs(5);

/// Bound on the metadata lookup that tells a missing topic from a slow broker.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a topic lookup's verdict (or the brokers not answering it) is reused.
const TOPIC_CHECK_TTL: Duration = Duration::from_secs(5);

/// Kafka's limit on the length of a topic name.
const MAX_TOPIC_NAME_BYTES: usize = 249;

/// How the Kafka sink connects and publishes.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]` (`bootstrap.servers`).
    pub brokers: String,
    /// The producer's `client.id`, shown in broker logs and quotas, e.g. `outbox-relay`.
    pub client_id: String,
    /// librdkafka partitioner, one of [`PARTITIONERS`]; default [`DEFAULT_PARTITIONER`]
    /// (Java-compatible). Ignored for events sent to `explicit_partition`.
    pub partitioner: String,
    /// Bound on one delivery including librdkafka's retries (`message.timeout.ms`,
    /// a.k.a. `delivery.timeout.ms`); a delivery that takes longer is retried by the relay.
    /// Must be at least 1 ms; keep it well below the relay's lease.
    pub message_timeout: Duration,
    /// Largest event in bytes (key + payload + header names and values), default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]. Larger events are rejected without being sent.
    /// Keep it at most the topic's `max.message.bytes` (Kafka's default 1,048,588)
    /// minus [`FRAMING_ALLOWANCE_BYTES`].
    pub max_message_bytes: usize,
    /// Send every event to this partition instead of partitioning by key.
    pub explicit_partition: Option<i32>,
    /// Further librdkafka producer settings passed through as they are, e.g.
    /// `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
    /// `ssl.ca.location`, `compression.type`. Settings that would break the sink's
    /// guarantees (`enable.idempotence=false`, `acks` other than `all`, …) and
    /// settings that have a field above are refused by [`KafkaSink::connect`].
    /// Values of secret-looking keys (passwords, keys, tokens, JAAS) are never printed.
    pub extra: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A configuration for `brokers` with every other setting at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            client_id: "outbox-relay".to_owned(),
            partitioner: DEFAULT_PARTITIONER.to_owned(),
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            explicit_partition: None,
            extra: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(key, value)| (key.as_str(), shown_value(key, value)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("partitioner", &self.partitioner)
            .field("message_timeout", &self.message_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("explicit_partition", &self.explicit_partition)
            .field("extra", &extra)
            .finish()
    }
}

/// What the sink makes of a librdkafka error; see [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classification {
    /// The event itself cannot be published as it is (too large, invalid record,
    /// no such topic or partition, not authorized): [`Outcome::Rejected`].
    Rejected,
    /// Broker or network trouble, a full local queue, or anything not known to be
    /// permanent: [`Outcome::Retry`].
    Retry,
    /// No delivery report within `message_timeout`. A missing topic (auto-creation
    /// off) looks exactly like this, so the sink looks the topic up: rejected if the
    /// broker says it does not exist, retried otherwise.
    TimedOut,
    /// The producer instance failed fatally and can publish nothing more: the sink
    /// replaces it and the event is retried.
    ProducerFailed,
}

/// Classify a librdkafka error from enqueuing a record or from its delivery report.
///
/// | librdkafka error | classification |
/// |---|---|
/// | `MessageSizeTooLarge`, `InvalidMessageSize`, `MessageBatchTooLarge` (record list too large) | rejected |
/// | `InvalidRecord`, `InvalidMessage` (corrupt), `UnsupportedForMessageFormat`, `PolicyViolation` | rejected |
/// | `UnknownTopicOrPartition`, `UnknownTopic`, `UnknownPartition`, `InvalidTopic` | rejected |
/// | `TopicAuthorizationFailed`, `InvalidArgument` | rejected |
/// | `MessageTimedOut` | timed out (topic looked up) |
/// | `Fatal` | producer failed (replaced, retried) |
/// | `QueueFull`, `BrokerTransportFailure`, `AllBrokersDown`, `LeaderNotAvailable`, `NotLeaderForPartition`, `RequestTimedOut`, `NotEnoughReplicas`, purges, authentication, anything else | retry |
pub fn classify(error: &KafkaError) -> Classification {
    use RDKafkaErrorCode as Code;
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        // A dropped producer, a failed flush or anything not tied to this record.
        _ => return Classification::Retry,
    };
    match code {
        Code::MessageSizeTooLarge
        | Code::InvalidMessageSize
        | Code::MessageBatchTooLarge
        | Code::InvalidRecord
        | Code::InvalidMessage
        | Code::UnsupportedForMessageFormat
        | Code::PolicyViolation
        | Code::UnknownTopicOrPartition
        | Code::UnknownTopic
        | Code::UnknownPartition
        | Code::InvalidTopic
        | Code::TopicAuthorizationFailed
        | Code::InvalidArgument => Classification::Rejected,
        Code::MessageTimedOut => Classification::TimedOut,
        // The idempotent producer's identity is no longer accepted (librdkafka raises these
        // as fatal after an epoch bump the broker refuses): only a new producer recovers.
        Code::Fatal
        | Code::ProducerFenced
        | Code::InvalidProducerEpoch
        | Code::OutOfOrderSequenceNumber
        | Code::UnknownProducerId
        | Code::InvalidProducerIdMapping => Classification::ProducerFailed,
        _ => Classification::Retry,
    }
}

/// Whether a rejection is about the record itself (its size or format), which no
/// retry can change; a missing topic or a permission can be fixed by an operator,
/// so those count attempts.
fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        error,
        KafkaError::MessageProduction(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::InvalidMessage
                | Code::UnsupportedForMessageFormat
                | Code::InvalidTopic
        )
    )
}

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

/// Recent answers to "does this topic exist?", see `missing_topic`.
#[derive(Default)]
struct TopicChecks {
    /// The last lookup got no answer: until then, timeouts are not looked into.
    unreachable_until: Option<Instant>,
    /// Topic → (when looked up, why it cannot take records).
    verdicts: HashMap<String, (Instant, Option<String>)>,
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

type SinkProducer = FutureProducer<SinkContext>;

struct Current {
    producer: SinkProducer,
    /// Incremented each time a fatally failed producer is replaced.
    generation: u64,
}

/// Forwards librdkafka's log lines and client errors to `tracing`, and keeps the
/// last client error so that a failed start can say what went wrong.
struct SinkContext {
    brokers: String,
    last_error: Arc<StdMutex<Option<String>>>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let brokers = self.brokers.as_str();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", brokers, facility, "{message}")
            }
            // Connection failures are logged as errors by librdkafka, yet they are
            // retried; the relay reports the outcome of each publish itself.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", brokers, facility, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", brokers, facility, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", brokers, facility, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", brokers = %self.brokers, %error, "{reason}");
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        // "n/n brokers are down" says less than the connect failure before it.
        if last.is_none() || error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *last = Some(reason.to_owned());
        }
    }
}

/// The headers and sizes of one record.
struct Record<'a> {
    headers: Vec<(&'a str, Cow<'a, str>)>,
    /// key + payload + header names and values, in bytes.
    size: usize,
    key_bytes: usize,
    payload_bytes: usize,
    header_bytes: usize,
}

impl KafkaSink {
    /// Check the configuration, create the idempotent producer and check that the
    /// brokers answer (a metadata request within [`CONNECT_TIMEOUT`]).
    ///
    /// Errors name the brokers and what to check; secret settings are never shown.
    pub async fn connect(config: KafkaConfig) -> Result<Self, SinkError> {
        // Settings errors: no retry can help.
        let client_config =
            client_config(&config).map_err(|error| SinkError::permanent(error.message))?;
        let last_error = Arc::new(StdMutex::new(None));
        let producer = create_producer(&client_config, &config, last_error.clone())
            .map_err(|error| SinkError::permanent(error.message))?;
        let brokers = config.brokers.clone();
        let probe = producer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(|metadata| metadata.brokers().len())
        })
        .await;
        let reachable = match metadata {
            Ok(Ok(0)) => Err("the cluster's metadata lists no brokers".to_owned()),
            Ok(Ok(count)) => Ok(count),
            Ok(Err(error)) => {
                let last = last_error.lock().unwrap_or_else(|e| e.into_inner()).take();
                Err(connect_hint(&error, last.as_deref()))
            }
            Err(join) => Err(format!("the metadata request failed: {join}")),
        };
        let broker_count = match reachable {
            Ok(count) => count,
            Err(reason) => {
                // Dropping a producer blocks until librdkafka has shut its threads down.
                let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
                return Err(SinkError::new(format!(
                    "cannot reach the Kafka brokers {brokers} within {CONNECT_TIMEOUT:?}: {reason}"
                )));
            }
        };
        tracing::info!(
            brokers = %config.brokers,
            broker_count,
            partitioner = %config.partitioner,
            max_message_bytes = config.max_message_bytes,
            "connected to Kafka"
        );
        let topic_limits = TopicLimits::new(&client_config);
        Ok(KafkaSink {
            config,
            client_config,
            topic_limits,
            producer: RwLock::new(Current {
                producer,
                generation: 1,
            }),
            topic_checks: tokio::sync::Mutex::new(TopicChecks::default()),
            closed: AtomicBool::new(false),
        })
    }

    /// The configuration this sink was built with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    fn current(&self) -> (SinkProducer, u64) {
        let current = self.producer.read().unwrap_or_else(|e| e.into_inner());
        (current.producer.clone(), current.generation)
    }

    /// Enqueue one record; the future resolves with its delivery report.
    fn enqueue(
        &self,
        producer: &SinkProducer,
        event: &OutboxEvent,
        route: &Route,
        record: &Record<'_>,
    ) -> Result<DeliveryFuture, KafkaError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, (name, value)| {
                headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                })
            },
        );
        let mut future_record = FutureRecord::to(&route.destination)
            .key(route.key.as_bytes())
            .payload(event.payload.as_slice())
            .headers(headers)
            .timestamp(Utc::now().timestamp_millis());
        if let Some(partition) = self.config.explicit_partition {
            future_record = future_record.partition(partition);
        }
        producer
            .send_result(future_record)
            .map_err(|(error, _record)| error)
    }

    /// The outcome of a record that librdkafka reported as failed.
    async fn failed(
        &self,
        error: &KafkaError,
        route: &Route,
        record: &Record<'_>,
        producer: SinkProducer,
        generation: u64,
    ) -> Outcome {
        let topic = &route.destination;
        match classify(error) {
            Classification::Rejected => {
                let message = rejected_message(error, topic, record, &self.config);
                Outcome::Rejected(if is_permanent(error) {
                    SinkError::permanent(message)
                } else {
                    SinkError::new(message)
                })
            }
            Classification::TimedOut => match self.missing_topic(producer, topic).await {
                Some(reason) => Outcome::Rejected(SinkError::new(format!(
                    "{reason} (the delivery timed out after {:?}: {error}); create it (topic \
                     auto-creation is off on this cluster) or fix the route",
                    self.config.message_timeout
                ))),
                None => Outcome::Retry(SinkError::new(format!(
                    "no delivery report from Kafka for topic '{topic}' within message_timeout \
                     {:?} ({error}); are the brokers {} reachable and the partition's leader \
                     available? The event will be published again",
                    self.config.message_timeout, self.config.brokers
                ))),
            },
            Classification::ProducerFailed => {
                let reason = producer
                    .client()
                    .fatal_error()
                    .map(|(code, reason)| format!("{code}: {reason}"))
                    .unwrap_or_else(|| error.to_string());
                let replaced = self.replace_producer(generation, &reason).await;
                Outcome::Retry(SinkError::new(format!(
                    "the Kafka producer failed fatally while publishing to topic '{topic}' \
                     ({reason}); {replaced}, and the event will be published again"
                )))
            }
            Classification::Retry => Outcome::Retry(SinkError::new(retry_message(
                error,
                topic,
                &self.config.brokers,
            ))),
        }
    }

    /// Why `topic` cannot take records, if the broker says it does not exist (or
    /// lacks the explicit partition); `None` if it exists or the broker does not answer.
    ///
    /// Verdicts are shared for [`TOPIC_CHECK_TTL`]: when a broker outage times out
    /// every publish at once, one lookup answers all of them.
    async fn missing_topic(&self, producer: SinkProducer, topic: &str) -> Option<String> {
        let mut checks = self.topic_checks.lock().await;
        let now = Instant::now();
        if checks.unreachable_until.is_some_and(|until| until > now) {
            return None;
        }
        if let Some((checked_at, verdict)) = checks.verdicts.get(topic)
            && now.duration_since(*checked_at) < TOPIC_CHECK_TTL
        {
            return verdict.clone();
        }
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), TOPIC_CHECK_TIMEOUT)
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map(|t| (t.error().map(RDKafkaErrorCode::from), t.partitions().len()))
                })
        })
        .await;
        let now = Instant::now();
        let Ok(Ok(found)) = metadata else {
            checks.unreachable_until = Some(now + TOPIC_CHECK_TTL);
            return None;
        };
        let verdict = match found {
            None
            | Some((
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic),
                _,
            )) => Some(format!(
                "topic '{topic}' does not exist on the brokers {}",
                self.config.brokers
            )),
            Some((None, partitions)) => match self.config.explicit_partition {
                Some(partition) if usize::try_from(partition).is_ok_and(|p| p >= partitions) => {
                    Some(format!(
                        "topic '{topic}' has {partitions} partitions, so explicit_partition \
                         {partition} does not exist"
                    ))
                }
                _ => None,
            },
            Some((Some(_), _)) => None,
        };
        checks
            .verdicts
            .retain(|_, (checked_at, _)| now.duration_since(*checked_at) < TOPIC_CHECK_TTL);
        checks
            .verdicts
            .insert(topic.to_owned(), (now, verdict.clone()));
        verdict
    }

    /// Replace a fatally failed producer (once for all callers that saw it fail).
    async fn replace_producer(&self, failed_generation: u64, reason: &str) -> String {
        let old = {
            let mut current = self.producer.write().unwrap_or_else(|e| e.into_inner());
            if current.generation != failed_generation {
                return "another publish already replaced it".to_owned();
            }
            let last_error = Arc::new(StdMutex::new(None));
            let fresh = match create_producer(&self.client_config, &self.config, last_error) {
                Ok(fresh) => fresh,
                Err(error) => return format!("replacing it failed ({error})"),
            };
            current.generation += 1;
            tracing::warn!(
                brokers = %self.config.brokers,
                generation = current.generation,
                reason,
                "the Kafka producer failed fatally; replaced it with a new one"
            );
            std::mem::replace(&mut current.producer, fresh)
        };
        // Dropping purges what the old producer still held (those publishes report a
        // failure and are retried) and blocks until its threads are gone.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        "it was replaced by a new producer".to_owned()
    }

    fn closed_error(&self) -> SinkError {
        SinkError::new(format!(
            "the Kafka sink for {} is closed (the relay is shutting down)",
            self.config.brokers
        ))
    }
}

impl Sink for KafkaSink {
    async fn publish(&self, event: &OutboxEvent, route: &Route) -> Outcome {
        if self.closed.load(Ordering::Acquire) {
            return Outcome::Retry(self.closed_error());
        }
        if let Err(problem) = check_topic_name(&route.destination) {
            return Outcome::Rejected(SinkError::permanent(problem));
        }
        let record = record_of(event, route);
        if record.size > self.config.max_message_bytes {
            return Outcome::Rejected(SinkError::permanent(oversize_message(
                &record,
                &route.destination,
                self.config.max_message_bytes,
            )));
        }
        if let TopicLimit::MaxMessageBytes(topic_max) =
            self.topic_limits.limit(&route.destination).await
        {
            let batch = batch_bytes(record.size, record.headers.len());
            if batch > topic_max {
                return Outcome::Rejected(SinkError::new(topic_oversize_message(
                    &record,
                    batch,
                    &route.destination,
                    topic_max,
                )));
            }
        }
        let (producer, generation) = self.current();
        let delivery = match self.enqueue(&producer, event, route, &record) {
            Ok(delivery) => delivery,
            Err(error) => {
                return self
                    .failed(&error, route, &record, producer, generation)
                    .await;
            }
        };
        let bound = self.config.message_timeout + REPORT_MARGIN;
        match tokio::time::timeout(bound, delivery).await {
            Ok(Ok(Ok(_delivered))) => Outcome::Delivered,
            Ok(Ok(Err((error, _message)))) => {
                self.failed(&error, route, &record, producer, generation)
                    .await
            }
            Ok(Err(_canceled)) => Outcome::Retry(SinkError::new(format!(
                "the Kafka producer was shut down before it reported the delivery to topic \
                 '{}'; the event will be published again",
                route.destination
            ))),
            // The record may still be delivered; a second publish is then a duplicate
            // that follows it in the partition, never an event that overtakes it.
            Err(_) => Outcome::Retry(SinkError::new(format!(
                "no delivery report for topic '{}' within {bound:?} (message_timeout plus \
                 {REPORT_MARGIN:?}); are the brokers {} reachable? The event will be published again",
                route.destination, self.config.brokers
            ))),
        }
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

/// The librdkafka settings for `config`, after refusing settings that would break
/// the sink's guarantees. Pure: no I/O.
fn client_config(config: &KafkaConfig) -> Result<ClientConfig, SinkError> {
    let error = |message: String| SinkError::new(format!("invalid Kafka settings: {message}"));
    let invalid = |message: String| Err(error(message));
    if config.brokers.trim().is_empty() {
        return invalid("brokers is empty; set it to host:port[,host:port…]".into());
    }
    if !PARTITIONERS.contains(&config.partitioner.as_str()) {
        return invalid(format!(
            "partitioner '{}' is unknown; use one of {} ({DEFAULT_PARTITIONER} places keys where \
             Java clients do)",
            config.partitioner,
            PARTITIONERS.join(", ")
        ));
    }
    let timeout_ms = config.message_timeout.as_millis();
    if timeout_ms == 0 || timeout_ms > i32::MAX as u128 {
        return invalid(format!(
            "message_timeout {:?} is out of range; use 1 ms to 24 days (default {:?})",
            config.message_timeout, DEFAULT_MESSAGE_TIMEOUT
        ));
    }
    if config.max_message_bytes == 0 || config.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
        return invalid(format!(
            "max_message_bytes {} is out of range; use 1 to {MAX_MESSAGE_BYTES_CEILING} \
             (default {DEFAULT_MAX_MESSAGE_BYTES}) and at most the topic's max.message.bytes",
            config.max_message_bytes
        ));
    }
    if let Some(partition) = config.explicit_partition
        && partition < 0
    {
        return invalid(format!(
            "explicit_partition {partition} is negative; partitions are numbered from 0"
        ));
    }
    check_extra(&config.extra).map_err(error)?;

    let mut client = ClientConfig::new();
    for (key, value) in &config.extra {
        client.set(key.trim(), value.as_str());
    }
    client
        .set("bootstrap.servers", config.brokers.as_str())
        .set("client.id", config.client_id.as_str())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "max.in.flight.requests.per.connection",
            MAX_IN_FLIGHT_PER_CONNECTION.to_string(),
        )
        .set("partitioner", config.partitioner.as_str())
        .set("message.timeout.ms", timeout_ms.to_string())
        .set(
            "message.max.bytes",
            (config.max_message_bytes + FRAMING_ALLOWANCE_BYTES).to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Info);
    if !config.extra.keys().any(|key| is_compression_key(key)) {
        client.set("compression.type", "none");
    }
    Ok(client)
}

fn create_producer(
    client: &ClientConfig,
    config: &KafkaConfig,
    last_error: Arc<StdMutex<Option<String>>>,
) -> Result<SinkProducer, SinkError> {
    let context = SinkContext {
        brokers: config.brokers.clone(),
        last_error,
    };
    client.create_with_context(context).map_err(|error| {
        let reason = match &error {
            KafkaError::ClientConfig(_, description, key, value) => {
                format!("{key}={}: {description}", shown_value(key, value))
            }
            // Creation errors quote librdkafka's reason, not setting values.
            other => other.to_string(),
        };
        SinkError::new(format!(
            "cannot create the Kafka producer for {}: {reason}; check the settings in extra",
            config.brokers
        ))
    })
}

/// Refuse `extra` settings that would break a guarantee or that a field owns.
fn check_extra(extra: &BTreeMap<String, String>) -> Result<(), String> {
    for (raw_key, raw_value) in extra {
        let key = raw_key.trim().to_ascii_lowercase();
        let value = raw_value.trim().to_ascii_lowercase();
        let field = match key.as_str() {
            "bootstrap.servers" | "metadata.broker.list" => Some("brokers"),
            "client.id" => Some("client_id"),
            "partitioner" => Some("partitioner"),
            "message.timeout.ms" | "delivery.timeout.ms" => Some("message_timeout"),
            "message.max.bytes" => Some("max_message_bytes"),
            _ => None,
        };
        if let Some(field) = field {
            return Err(format!(
                "extra sets {raw_key}, which the sink derives from {field}: set {field} instead"
            ));
        }
        let refused = match key.as_str() {
            // librdkafka reads "true", "t" and "1" as true.
            "enable.idempotence" => (!matches!(value.as_str(), "true" | "t" | "1")).then_some(
                "the sink needs the idempotent producer so that librdkafka's retries neither \
                 duplicate nor reorder a key's events",
            ),
            "acks" | "request.required.acks" => (value != "all" && value != "-1").then_some(
                "the sink needs acks=all so that a delivered event survives the loss of the \
                 partition leader",
            ),
            "max.in.flight.requests.per.connection" | "max.in.flight" => value
                .parse::<u32>()
                .map_or(true, |n| n == 0 || n > MAX_IN_FLIGHT_PER_CONNECTION)
                .then_some(
                    "the idempotent producer keeps per-partition order only with 1 to 5 \
                     requests in flight",
                ),
            "transactional.id" => Some(
                "the sink publishes with an idempotent, non-transactional producer; \
                 transactions are not supported",
            ),
            "queuing.strategy" => (value != "fifo")
                .then_some("only the fifo queuing strategy keeps a key's events in order"),
            _ => None,
        };
        if let Some(reason) = refused {
            return Err(format!(
                "extra sets {raw_key}={}, which is refused: {reason}; remove it",
                shown_value(raw_key, raw_value)
            ));
        }
    }
    Ok(())
}

fn is_compression_key(key: &str) -> bool {
    matches!(
        key.trim().to_ascii_lowercase().as_str(),
        "compression.type" | "compression.codec"
    )
}

/// Whether a librdkafka setting's value may be secret. Masks too much rather than
/// too little: passwords, secrets, tokens, JAAS and OAUTHBEARER configs, keys and PEMs.
fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        "credential",
        "key",
        "pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| key.contains(word))
}

fn shown_value<'a>(key: &str, value: &'a str) -> &'a str {
    if is_sensitive(key) { "***" } else { value }
}

/// Kafka's topic name rules: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn check_topic_name(topic: &str) -> Result<(), String> {
    let problem = if topic.is_empty() {
        Some("is empty")
    } else if topic.len() > MAX_TOPIC_NAME_BYTES {
        Some("is longer than 249 characters")
    } else if topic == "." || topic == ".." {
        Some("is '.' or '..'")
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("has characters other than a-z, A-Z, 0-9, '.', '_' and '-'")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => {
            let start: String = topic.chars().take(60).collect();
            Err(format!(
                "topic name '{start}' {problem}, which Kafka does not allow; fix the route's \
                 topic template or the event's destination"
            ))
        }
    }
}

/// The headers of one event (writer headers, then the wire headers) and its size.
fn record_of<'a>(event: &'a OutboxEvent, route: &Route) -> Record<'a> {
    const WIRE: [&str; 7] = [
        wire::EVENT_ID,
        wire::EVENT_TYPE,
        wire::AGGREGATE_TYPE,
        wire::AGGREGATE_ID,
        wire::PARTITION_KEY,
        wire::CREATED_AT,
        wire::SEQUENCE,
    ];
    let mut headers: Vec<(&str, Cow<'_, str>)> = event
        .headers
        .iter()
        // Kafka headers may repeat a name; the wire headers are the only ones of their names.
        .filter(|(name, _)| !WIRE.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str(), Cow::Borrowed(value.as_str())))
        .collect();
    headers.extend([
        (wire::EVENT_ID, Cow::Owned(event.event_id.to_string())),
        (wire::EVENT_TYPE, Cow::Borrowed(event.event_type.as_str())),
        (
            wire::AGGREGATE_TYPE,
            Cow::Borrowed(event.aggregate_type.as_str()),
        ),
        (
            wire::AGGREGATE_ID,
            Cow::Borrowed(event.aggregate_id.as_str()),
        ),
        (
            wire::PARTITION_KEY,
            Cow::Borrowed(event.partition_key.as_str()),
        ),
        (
            wire::CREATED_AT,
            Cow::Owned(
                event
                    .created_at
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ),
        (wire::SEQUENCE, Cow::Owned(event.sequence.to_string())),
    ]);
    let header_bytes = headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum::<usize>();
    let key_bytes = route.key.len();
    let payload_bytes = event.payload.len();
    Record {
        headers,
        size: key_bytes + payload_bytes + header_bytes,
        key_bytes,
        payload_bytes,
        header_bytes,
    }
}

fn oversize_message(record: &Record<'_>, topic: &str, max_message_bytes: usize) -> String {
    format!(
        "event is {} bytes (key {}, payload {}, headers {}), over the maximum message size of \
         {max_message_bytes} bytes (max_message_bytes / the topic's max.message.bytes); it was \
         not sent to topic '{topic}': make the event smaller (e.g. publish a reference to the \
         data instead of the data), or raise max_message_bytes together with the topic's \
         max.message.bytes and the brokers' message.max.bytes",
        record.size, record.key_bytes, record.payload_bytes, record.header_bytes
    )
}

fn topic_oversize_message(
    record: &Record<'_>,
    batch: usize,
    topic: &str,
    topic_max: usize,
) -> String {
    format!(
        "event is {} bytes (key {}, payload {}, headers {}; {batch} bytes as a record batch), \
         over topic '{topic}''s max.message.bytes of {topic_max} bytes (read from the brokers); \
         it was not sent: make the event smaller (e.g. publish a reference to the data instead \
         of the data), or raise the topic's max.message.bytes",
        record.size, record.key_bytes, record.payload_bytes, record.header_bytes
    )
}

/// The message of an error that [`classify`] calls [`Classification::Rejected`].
fn rejected_message(
    error: &KafkaError,
    topic: &str,
    record: &Record<'_>,
    config: &KafkaConfig,
) -> String {
    use RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge) => {
            format!(
                "Kafka refused the event for topic '{topic}' as too large ({error}); it is {} \
                 bytes: raise the topic's max.message.bytes, or lower max_message_bytes (now {}) \
                 to the topic's limit minus {FRAMING_ALLOWANCE_BYTES} so such events are \
                 rejected before sending",
                record.size, config.max_message_bytes
            )
        }
        Some(Code::UnknownTopicOrPartition | Code::UnknownTopic) => format!(
            "topic '{topic}' does not exist on the brokers {} ({error}); create it (topic \
             auto-creation is off on this cluster) or fix the route",
            config.brokers
        ),
        Some(Code::UnknownPartition) => format!(
            "topic '{topic}' has no partition {} ({error}); fix explicit_partition or add \
             partitions to the topic",
            config
                .explicit_partition
                .map_or_else(|| "chosen by the partitioner".to_owned(), |p| p.to_string())
        ),
        Some(Code::TopicAuthorizationFailed) => format!(
            "not authorized to write to topic '{topic}' ({error}); grant the relay's principal \
             WRITE on the topic, or fix the route"
        ),
        Some(Code::InvalidTopic) => format!(
            "Kafka says '{topic}' is not a valid topic name ({error}); fix the route's topic \
             template or the event's destination"
        ),
        _ => format!(
            "Kafka refused the event for topic '{topic}' ({error}); the record itself is the \
             problem (check the topic's policies and message format version)"
        ),
    }
}

/// The message of an error that [`classify`] calls [`Classification::Retry`].
fn retry_message(error: &KafkaError, topic: &str, brokers: &str) -> String {
    use RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::QueueFull) => format!(
            "the Kafka producer's local queue is full ({error}); the event for topic '{topic}' \
             will be published again after a backoff (raise queue.buffering.max.messages / \
             queue.buffering.max.kbytes in extra if this persists)"
        ),
        Some(
            Code::Authentication
            | Code::SaslAuthenticationFailed
            | Code::ClusterAuthorizationFailed
            | Code::SSL,
        ) => format!(
            "publishing to topic '{topic}' failed: {error}; check the credentials and \
             security.protocol / sasl.* / ssl.* settings in extra (the idempotent producer \
             also needs IDEMPOTENT_WRITE on the cluster for older brokers); the event will be \
             published again"
        ),
        _ => format!(
            "publishing to topic '{topic}' failed: {error}; librdkafka keeps reconnecting to \
             the brokers {brokers} and the event will be published again"
        ),
    }
}

/// The reason of a failed broker check, with what to check.
fn connect_hint(error: &KafkaError, last_client_error: Option<&str>) -> String {
    let what = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            "check the sasl.* credentials in extra"
        }
        Some(RDKafkaErrorCode::SSL) => "check security.protocol and the ssl.* settings in extra",
        _ => {
            "is Kafka running, are the hosts and ports in brokers right and reachable (firewall, \
             DNS, advertised listeners), and do security.protocol / sasl.* / ssl.* in extra match \
             the listener?"
        }
    };
    match last_client_error {
        Some(last) => format!("{error} (last broker error: {last}); {what}"),
        None => format!("{error}; {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> OutboxEvent {
        OutboxEvent {
            sequence: 42,
            event_id: outbox_core::EventId::new(),
            aggregate_type: "order".into(),
            aggregate_id: "7".into(),
            event_type: "order.placed".into(),
            partition_key: "order:7".into(),
            destination: None,
            payload: br#"{"total":1}"#.to_vec(),
            headers: [
                ("tenant".to_owned(), "acme".to_owned()),
                (wire::SEQUENCE.to_owned(), "forged".to_owned()),
            ]
            .into(),
            created_at: chrono::TimeZone::timestamp_opt(&Utc, 1_700_000_000, 123_456_789).unwrap(),
            attempts: 0,
        }
    }

    fn route() -> Route {
        Route {
            destination: "orders".into(),
            key: "order:7".into(),
        }
    }

    #[test]
    fn errors_are_classified_as_the_events_fault_or_transient() {
        use Classification::*;
        use RDKafkaErrorCode as Code;
        let produce = KafkaError::MessageProduction;
        for code in [
            Code::MessageSizeTooLarge,
            Code::MessageBatchTooLarge,
            Code::InvalidRecord,
            Code::UnknownTopicOrPartition,
            Code::UnknownTopic,
            Code::UnknownPartition,
            Code::InvalidTopic,
            Code::TopicAuthorizationFailed,
        ] {
            assert_eq!(classify(&produce(code)), Rejected, "{code:?}");
        }
        for code in [
            Code::QueueFull,
            Code::BrokerTransportFailure,
            Code::AllBrokersDown,
            Code::LeaderNotAvailable,
            Code::NotLeaderForPartition,
            Code::RequestTimedOut,
            Code::NotEnoughReplicas,
            Code::PurgeQueue,
            Code::PurgeInflight,
            Code::SaslAuthenticationFailed,
            Code::Unknown,
        ] {
            assert_eq!(classify(&produce(code)), Retry, "{code:?}");
        }
        assert_eq!(classify(&produce(Code::MessageTimedOut)), TimedOut);
        for code in [
            Code::Fatal,
            Code::ProducerFenced,
            Code::InvalidProducerEpoch,
            Code::OutOfOrderSequenceNumber,
            Code::UnknownProducerId,
        ] {
            assert_eq!(classify(&produce(code)), ProducerFailed, "{code:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), Retry);
        assert_eq!(
            classify(&KafkaError::Flush(Code::MessageSizeTooLarge)),
            Retry,
            "only errors about this record reject it"
        );
    }

    #[test]
    fn records_carry_the_wire_headers_once_and_count_every_byte() {
        let event = event();
        let record = record_of(&event, &route());
        let value = |name: &str| {
            let found: Vec<_> = record.headers.iter().filter(|(n, _)| *n == name).collect();
            assert_eq!(found.len(), 1, "{name} appears once");
            found[0].1.to_string()
        };
        assert_eq!(value("tenant"), "acme");
        assert_eq!(value(wire::EVENT_ID), event.event_id.to_string());
        assert_eq!(value(wire::SEQUENCE), "42");
        assert_eq!(value(wire::CREATED_AT), "2023-11-14T22:13:20.123456Z");
        assert_eq!(value(wire::PARTITION_KEY), "order:7");
        let headers: usize = record.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert_eq!(record.size, "order:7".len() + event.payload.len() + headers);
        assert_eq!(record.header_bytes, headers);
    }

    #[test]
    fn settings_that_break_guarantees_are_refused() {
        let with = |key: &str, value: &str| {
            let mut config = KafkaConfig::new("127.0.0.1:9092");
            config.extra.insert(key.into(), value.into());
            client_config(&config).map(|_| ()).map_err(|e| e.message)
        };
        let err = with("enable.idempotence", "false").unwrap_err();
        assert!(
            err.contains("enable.idempotence") && err.contains("idempotent"),
            "{err}"
        );
        assert!(with("acks", "1").unwrap_err().contains("acks=all"));
        assert!(with("request.required.acks", "0").is_err());
        assert!(with("max.in.flight.requests.per.connection", "6").is_err());
        assert!(with("transactional.id", "x").is_err());
        assert!(with("queuing.strategy", "lifo").is_err());
        assert!(
            with("message.max.bytes", "5000000")
                .unwrap_err()
                .contains("max_message_bytes")
        );
        assert!(
            with("partitioner", "random")
                .unwrap_err()
                .contains("set partitioner")
        );
        assert!(with("acks", "all").is_ok());
        assert!(with("enable.idempotence", "true").is_ok());
        assert!(with("security.protocol", "sasl_ssl").is_ok());
        assert!(with("sasl.password", "hunter22").is_ok());
    }

    #[test]
    fn producer_settings_follow_the_config() {
        let mut config = KafkaConfig::new("k1:9092,k2:9092");
        config.max_message_bytes = 2_000_000;
        config.message_timeout = Duration::from_millis(7_500);
        config
            .extra
            .insert("compression.type".into(), "zstd".into());
        let client = client_config(&config).unwrap();
        assert_eq!(client.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(
            client.get("max.in.flight.requests.per.connection"),
            Some("5")
        );
        assert_eq!(client.get("partitioner"), Some("murmur2_random"));
        assert_eq!(client.get("message.timeout.ms"), Some("7500"));
        assert_eq!(client.get("message.max.bytes"), Some("2016384"));
        assert_eq!(client.get("compression.type"), Some("zstd"));
        assert_eq!(
            client_config(&KafkaConfig::new("k:9092"))
                .unwrap()
                .get("compression.type"),
            Some("none")
        );
        let mut bad = KafkaConfig::new("k:9092");
        bad.partitioner = "murmur3".into();
        assert!(client_config(&bad).is_err());
        bad = KafkaConfig::new("k:9092");
        bad.message_timeout = Duration::ZERO;
        assert!(client_config(&bad).is_err());
        bad = KafkaConfig::new(" ");
        assert!(client_config(&bad).is_err());
    }

    #[test]
    fn secrets_are_never_shown() {
        let mut config = KafkaConfig::new("k:9092");
        for (key, value) in [
            ("sasl.password", "hunter22"),
            ("ssl.key.password", "keypass1"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----abc"),
            ("sasl.oauthbearer.client.secret", "s3cr3t"),
            ("sasl.jaas.config", "password=\"jaaspw\""),
            ("sasl.username", "relay"),
        ] {
            config.extra.insert(key.into(), value.into());
        }
        let shown = format!("{config:?}");
        for secret in ["hunter22", "keypass1", "PRIVATE", "s3cr3t", "jaaspw"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("relay"), "{shown}");
        config.extra.insert("acks".into(), "1".into());
        config
            .extra
            .insert("enable.idempotence".into(), "false".into());
        let err = client_config(&config).unwrap_err();
        assert!(!err.message.contains("hunter22"), "{err}");
    }

    #[test]
    fn topic_names_follow_kafkas_rules() {
        assert!(check_topic_name("orders.v1_x-y").is_ok());
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name("a/b").is_err());
        assert!(check_topic_name(&"t".repeat(250)).is_err());
    }
}
