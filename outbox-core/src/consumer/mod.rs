//! Consumer helpers: exactly-once effects for handlers of relayed events, on RabbitMQ
//! (feature `lapin`, [`amqp`]) and Kafka (feature `rdkafka`, [`kafka`]).
//!
//! A consumer implements [`Handler`]; the helper reads the event's metadata from the
//! broker message ([`MessageMeta`]: event id, type, partition key, sequence, trace
//! context), runs the handler through the [`Inbox`](crate::Inbox) in one transaction,
//! and acknowledges the message (RabbitMQ ack, Kafka offset) **only after** that
//! transaction committed. So:
//!
//! * a crash before the commit redelivers the message and the handler runs again
//!   (nothing of the failed run was committed);
//! * a crash after the commit but before the ack redelivers it, and the inbox skips it
//!   ([`Verdict::Duplicate`]): the effects happen once;
//! * the same message delivered to several consumer instances at once is handled by
//!   one of them; the others see a duplicate.
//!
//! Messages of one partition key are handled one after another, in delivery order;
//! different keys are handled concurrently, up to the configured in-flight limit.
//!
//! A handler error is retried in place with exponential backoff ([`RetryPolicy`]);
//! after `max_attempts`, or at once for a [`HandlerError::permanent`] error, the
//! message is dead-lettered (RabbitMQ: rejected without requeue, so the queue's
//! dead-letter exchange receives it; Kafka: produced to a dead-letter topic with the
//! error in headers) and its key moves on. A failure of the inbox's own database is
//! not the message's fault: it is retried without limit and never dead-letters.
//!
//! Effects outside the handler's connection (HTTP calls, e-mails) are not covered:
//! they can repeat when a run fails after making them.

use std::future::Future;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::error::Error;
use crate::inbox::Inbox;

#[cfg(feature = "lapin")]
pub mod amqp;
#[cfg(feature = "rdkafka")]
pub mod kafka;
#[cfg(any(feature = "lapin", feature = "rdkafka"))]
mod lanes;

/// Wire header names the relay sets (RabbitMQ headers and Kafka headers alike).
pub mod wire {
    /// The event id (on RabbitMQ also the `message_id` property).
    pub const EVENT_ID: &str = "outbox-event-id";
    /// The event type (on RabbitMQ also the `type` property).
    pub const EVENT_TYPE: &str = "outbox-event-type";
    /// The partition key: one key's events are ordered.
    pub const PARTITION_KEY: &str = "outbox-partition-key";
    /// The event's monotonic position per key (outbox sequence or WAL position).
    pub const SEQUENCE: &str = "outbox-sequence";
    /// The writer's W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// The reason a message was dead-lettered (Kafka dead-letter topic).
    pub const DEAD_LETTER_ERROR: &str = "outbox-dead-letter-error";
    /// Where a dead-lettered message came from: `topic/partition/offset` (Kafka).
    pub const DEAD_LETTER_SOURCE: &str = "outbox-dead-letter-source";
}

/// What the relay says about an event, read from the broker message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageMeta {
    /// The event id: the inbox's message id.
    pub event_id: String,
    /// The event type, when the message carries it.
    pub event_type: Option<String>,
    /// The partition key, when the message carries it.
    pub partition_key: Option<String>,
    /// The event's position per key, when the message carries it.
    pub sequence: Option<i64>,
    /// The writer's trace context, when the message carries it.
    pub traceparent: Option<String>,
}

/// One message as the handler sees it.
#[derive(Clone, Debug)]
pub struct Message {
    /// The event's metadata.
    pub meta: MessageMeta,
    /// The payload as published (the writer's JSON).
    pub payload: Vec<u8>,
    /// 1 for the first run of the handler on this delivery, 2 for its first retry, …
    pub attempt: u32,
}

impl Message {
    /// The payload decoded as JSON into `T`; a payload that does not decode is a
    /// permanent failure (retrying cannot fix it).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|error| {
            HandlerError::permanent(format!(
                "the payload of event {} is not the expected JSON: {error}",
                self.meta.event_id
            ))
        })
    }
}

/// Why a handler could not process a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// What went wrong, for logs and the dead letter (never include secrets).
    pub message: String,
    /// True when retrying cannot help: the message is dead-lettered at once.
    pub permanent: bool,
}

impl HandlerError {
    /// A failure that may pass (a timeout, a lock conflict): retried with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure that retrying cannot fix (a malformed payload): dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: true,
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    /// A database error inside the handler: retried (it may be a conflict or a timeout).
    fn from(error: sqlx::Error) -> Self {
        HandlerError::transient(format!("database error in the handler: {error}"))
    }
}

/// The consumer's code. Effects written through `conn` commit in one transaction with
/// the inbox record of the message, so they happen once per message.
pub trait Handler: Send + Sync + 'static {
    /// Process `message`; an error rolls back everything written through `conn`.
    fn handle(
        &self,
        message: &Message,
        conn: &mut PgConnection,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// How handler failures are retried before the message is dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Runs of the handler per delivery, the first included (at least 1).
    pub max_attempts: u32,
    /// Wait before the first retry; it doubles per retry.
    pub backoff_initial: Duration,
    /// Longest wait between retries.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, waits of 100 ms doubling up to 5 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait after the failed run number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.backoff_initial
            .saturating_mul(1_u32 << doublings)
            .min(self.backoff_max)
    }
}

/// Settings shared by the RabbitMQ and Kafka helpers.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The inbox's consumer name: instances of one logical consumer share it, so a
    /// message is handled once among them.
    pub name: String,
    /// Retries of handler failures.
    pub retry: RetryPolicy,
    /// Messages handled at once (different keys); also the RabbitMQ prefetch.
    pub max_in_flight: u16,
    /// Wait between attempts to reach the inbox's database while it does not answer.
    pub database_retry: Duration,
}

impl ConsumerConfig {
    /// Defaults for consumer `name`: [`RetryPolicy::default`], 64 in flight, database
    /// retried every second.
    pub fn new(name: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            retry: RetryPolicy::default(),
            max_in_flight: 64,
            database_retry: Duration::from_secs(1),
        }
    }
}

/// What became of one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The handler ran and its effects committed with the inbox record.
    Handled,
    /// The message had been processed before: skipped.
    Duplicate,
    /// The handler kept failing (or failed permanently): dead-lettered with this reason.
    DeadLettered(String),
    /// The consumer is stopping: left unacknowledged, the broker delivers it again.
    Abandoned,
}

/// Counts of what a consumer did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Messages whose handler ran and committed.
    pub handled: u64,
    /// Messages skipped as already processed.
    pub duplicates: u64,
    /// Handler runs that failed and were retried.
    pub retries: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

impl ConsumerStats {
    pub(crate) fn count(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Handled => self.handled += 1,
            Verdict::Duplicate => self.duplicates += 1,
            Verdict::DeadLettered(_) => self.dead_lettered += 1,
            Verdict::Abandoned => {}
        }
    }

    pub(crate) fn add(&mut self, other: &ConsumerStats) {
        self.handled += other.handled;
        self.duplicates += other.duplicates;
        self.retries += other.retries;
        self.dead_lettered += other.dead_lettered;
    }
}

/// Runs a handler through the inbox with the retry policy; shared by both brokers.
pub(crate) struct Processor<H> {
    pub(crate) pool: PgPool,
    pub(crate) inbox: Inbox,
    pub(crate) config: ConsumerConfig,
    pub(crate) handler: H,
}

/// A failed run: the handler's fault, or the inbox database's.
enum RunError {
    Handler(HandlerError),
    Database(Error),
}

impl<H: Handler> Processor<H> {
    /// Handle `meta` + `payload` until it is handled, a duplicate, dead-lettered, or
    /// `stopping` says to give up (then [`Verdict::Abandoned`]).
    pub(crate) async fn process(
        &self,
        meta: MessageMeta,
        payload: Vec<u8>,
        stopping: &tokio::sync::watch::Receiver<bool>,
        stats: &mut ConsumerStats,
    ) -> Verdict {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "outbox.consume",
            consumer = %self.config.name,
            event_id = %meta.event_id,
            event_type = meta.event_type.as_deref().unwrap_or(""),
            traceparent = meta.traceparent.as_deref().unwrap_or(""),
        );
        // The handler's span continues the writer's trace.
        crate::trace::follow(&span, meta.traceparent.as_deref());
        self.process_in_span(meta, payload, stopping, stats)
            .instrument(span)
            .await
    }

    async fn process_in_span(
        &self,
        meta: MessageMeta,
        payload: Vec<u8>,
        stopping: &tokio::sync::watch::Receiver<bool>,
        stats: &mut ConsumerStats,
    ) -> Verdict {
        let mut message = Message {
            meta,
            payload,
            attempt: 0,
        };
        let max_attempts = self.config.retry.max_attempts.max(1);
        loop {
            if *stopping.borrow() {
                return Verdict::Abandoned;
            }
            message.attempt += 1;
            let wait = match self.run_once(&message).await {
                Ok(true) => return Verdict::Handled,
                Ok(false) => return Verdict::Duplicate,
                Err(RunError::Handler(error)) => {
                    if error.permanent || message.attempt >= max_attempts {
                        tracing::warn!(
                            attempt = message.attempt,
                            permanent = error.permanent,
                            %error,
                            "handler failed for good; dead-lettering the message"
                        );
                        return Verdict::DeadLettered(error.message);
                    }
                    stats.retries += 1;
                    let wait = self.config.retry.backoff(message.attempt);
                    tracing::info!(
                        attempt = message.attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        %error,
                        "handler failed; retrying"
                    );
                    wait
                }
                Err(RunError::Database(error)) => {
                    // Not the message's fault: the attempt does not count.
                    message.attempt -= 1;
                    tracing::warn!(
                        %error,
                        retry_in_ms = self.config.database_retry.as_millis() as u64,
                        "the inbox database failed; retrying the message"
                    );
                    self.config.database_retry
                }
            };
            let mut stopping = stopping.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.wait_for(|stop| *stop) => return Verdict::Abandoned,
            }
        }
    }

    /// One transaction: record the id, run the handler, commit. True on the first time.
    async fn run_once(&self, message: &Message) -> Result<bool, RunError> {
        let mut tx = self.pool.begin().await.map_err(|source| {
            RunError::Database(Error::database("beginning the inbox transaction")(source))
        })?;
        let first = self
            .inbox
            .record(&mut tx, &self.config.name, Some(&message.meta.event_id))
            .await
            .map_err(RunError::Database)?;
        if !first {
            return Ok(false);
        }
        self.handler
            .handle(message, &mut tx)
            .await
            .map_err(RunError::Handler)?;
        tx.commit().await.map_err(|source| {
            RunError::Database(Error::database("committing the inbox transaction")(source))
        })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        };
        let waits: Vec<u128> = (1..=6).map(|a| policy.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_payload_that_is_not_the_expected_json_is_a_permanent_failure() {
        let message = Message {
            meta: MessageMeta {
                event_id: "e-1".into(),
                event_type: None,
                partition_key: None,
                sequence: None,
                traceparent: None,
            },
            payload: b"not json".to_vec(),
            attempt: 1,
        };
        let error = message.json::<serde_json::Value>().unwrap_err();
        assert!(error.permanent);
        assert!(error.message.contains("e-1"), "{error}");
    }
}
