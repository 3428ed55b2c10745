//! Consumer helpers: exactly-once effects for handlers of relayed events, on RabbitMQ
//! (feature `lapin`, [`amqp`]) and Kafka (feature `rdkafka`, [`kafka`]).
//!
//! A consumer implements [`Handler`]; the helper reads the event's metadata from the
//! broker message ([`MessageMeta`]: event id, type, partition key, sequence, trace
//! context), runs the handler through the [`Inbox`] in a database
//! transaction, and acknowledges the message (RabbitMQ ack, Kafka offset) **only
//! after** that transaction committed.
//!
//! # What is guaranteed
//!
//! * **Delivery is at-least-once**, never exactly-once: brokers redeliver after
//!   crashes, lost connections and rebalances, and the relay may publish an event
//!   twice. The helpers do not hide this; the inbox absorbs it.
//! * **Effects are exactly-once** for what the handler writes through its
//!   connection: the inbox row `(consumer, event id)` and the effects commit
//!   together, so
//!   * a crash before the commit redelivers the message and the handler runs again
//!     (nothing of the failed run was committed);
//!   * a crash after the commit but before the ack redelivers it, and the inbox skips
//!     it ([`Verdict::Duplicate`]);
//!   * copies of a message delivered to several consumer instances at once, or
//!     inside one batch, are handled once; the others are duplicates.
//! * **Per-key order**: messages of one partition key are handled one after another,
//!   in delivery order, and a failing message holds the rest of its key until it is
//!   handled or dead-lettered. Different keys are handled concurrently.
//! * Not covered: effects outside the handler's connection (HTTP calls, e-mails) can
//!   repeat when a run fails after making them; order across keys; order between
//!   two instances that share a RabbitMQ queue (each takes whatever the queue gives).
//!
//! # Batches
//!
//! Messages that are ready at once (several keys, and consecutive messages of one
//! key in order) are handled in **one** transaction: their ids are recorded with one
//! statement, each first-time message's handler runs, and one commit covers them
//! all ([`ConsumerConfig::max_batch_messages`], [`ConsumerConfig::max_batch_wait`],
//! [`ConsumerConfig::max_concurrent_batches`]). The handlers first run without
//! savepoints, one round trip each. When one fails, that transaction is rolled back
//! and the batch runs again with a savepoint per message, so a failing handler rolls
//! back only its own message: the others commit and are acknowledged once; the
//! failed message's id is not recorded, and the message and the rest of its key go
//! back to wait. The handlers before the failing one therefore run twice (the first
//! run's effects were rolled back); the failing handler runs once per attempt. A handler error is retried with exponential
//! backoff ([`RetryPolicy`]); after `max_attempts`, or at once for a
//! [`HandlerError::permanent`] error, the message is dead-lettered (RabbitMQ:
//! rejected without requeue, so the queue's dead-letter exchange receives it; Kafka:
//! produced to a dead-letter topic with the error in headers) and its key moves on.
//!
//! A failure of the inbox's own database (connect, the id insert, the commit) is not
//! the messages' fault: the whole batch is retried every `database_retry`, without
//! limit, and never dead-letters. A handler that returns `Ok` but leaves the
//! transaction failed counts as a failed run of that handler.

use std::future::Future;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::inbox::Inbox;

#[cfg(feature = "lapin")]
pub mod amqp;
mod batch;
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
///
/// Throughput comes from batching: the messages that are ready at once (of several
/// keys, and consecutive messages of one key in order) are handled in **one**
/// transaction of at most `max_batch_messages`; when a handler fails, the batch runs
/// again with each message in a savepoint of its own, so a failing handler rolls back
/// only its message (see [the module docs](self#batches)). One commit covers the
/// batch, and only after it are the deliveries acknowledged (RabbitMQ) or their
/// offsets stored (Kafka). Up to `max_concurrent_batches` such transactions run at
/// once, each on its own connection of the pool, and no key is in two of them.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The inbox's consumer name: instances of one logical consumer share it, so a
    /// message is handled once among them.
    pub name: String,
    /// Retries of handler failures.
    pub retry: RetryPolicy,
    /// Messages held at once: received and not yet settled, in batches or waiting
    /// behind their key. Also the RabbitMQ prefetch.
    pub max_in_flight: u16,
    /// Most messages in one transaction. Up to 64 stays within PostgreSQL's
    /// per-transaction cache of subtransaction ids (one savepoint per message when
    /// a batch runs again after a failure);
    /// beyond it, other sessions' snapshots get slower while the batch runs.
    pub max_batch_messages: u16,
    /// How long a batch may wait to fill up before it starts. Zero (the default)
    /// starts it with whatever is ready now: no latency is added when the consumer
    /// is idle, and under load batches fill up while earlier ones run.
    pub max_batch_wait: Duration,
    /// Batch transactions at once; each holds a connection of the pool while it runs.
    pub max_concurrent_batches: u16,
    /// Wait between attempts to reach the inbox's database while it does not answer.
    pub database_retry: Duration,
}

/// Default [`ConsumerConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: u16 = 256;
/// Default [`ConsumerConfig::max_batch_messages`].
pub const DEFAULT_MAX_BATCH_MESSAGES: u16 = 64;
/// Default [`ConsumerConfig::max_concurrent_batches`].
pub const DEFAULT_MAX_CONCURRENT_BATCHES: u16 = 4;

impl ConsumerConfig {
    /// Defaults for consumer `name`: [`RetryPolicy::default`], 256 messages in flight,
    /// batches of at most 64 messages started with whatever is ready (no wait), 4
    /// batches at once, the database retried every second. Give the pool at least
    /// `max_concurrent_batches` connections.
    pub fn new(name: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            retry: RetryPolicy::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_batch_wait: Duration::ZERO,
            max_concurrent_batches: DEFAULT_MAX_CONCURRENT_BATCHES,
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
    pub(crate) fn add(&mut self, other: &ConsumerStats) {
        self.handled += other.handled;
        self.duplicates += other.duplicates;
        self.retries += other.retries;
        self.dead_lettered += other.dead_lettered;
    }
}

/// A received message on its way through the batches, until it is settled.
pub(crate) struct Pending<T> {
    /// The broker's handle (a delivery, a message), settled after the commit.
    pub(crate) item: T,
    /// The lane: the partition key, else something unique to the message.
    pub(crate) key: String,
    /// The message for the handler, or why it cannot be processed (dead-lettered).
    pub(crate) message: Result<Message, String>,
    /// Failed handler runs so far.
    pub(crate) failures: u32,
}

/// What one batch transaction did with one of its messages.
pub(crate) enum Outcome {
    /// The handler's effects committed with the inbox record.
    Handled,
    /// Processed before (by another instance, or an earlier copy in this batch).
    Duplicate,
    /// The handler failed (its effects were rolled back), or the message cannot be
    /// processed at all.
    Failed(HandlerError),
    /// Not run: an earlier message of its key (or copy of it) failed in this batch.
    NotRun,
    /// The consumer stopped while the database did not answer.
    Abandoned,
}

/// What becomes of a message after its batch.
pub(crate) enum Settle {
    /// Acknowledge (RabbitMQ) or mark done (Kafka): the batch committed.
    Ack,
    /// Dead-letter with this reason.
    #[cfg_attr(not(feature = "rdkafka"), allow(dead_code))]
    DeadLetter(String),
    /// Leave it to the broker to deliver again (RabbitMQ: reject with requeue).
    Abandon,
}

/// A key's messages that go back to its lane after a batch.
pub(crate) struct Returned<T> {
    pub(crate) key: String,
    /// Not settled, in order: the failed message first, then the rest of its key.
    pub(crate) pending: Vec<Pending<T>>,
    /// The key waits out the failed message's backoff until then.
    pub(crate) not_before: Option<tokio::time::Instant>,
    /// The key's messages of the batch that were settled.
    pub(crate) settled: usize,
}

/// A batch sorted out: what to settle now, and what goes back to the lanes.
pub(crate) struct Sorted<T> {
    pub(crate) settle: Vec<(Pending<T>, Settle)>,
    pub(crate) returned: Vec<Returned<T>>,
}

/// Runs batches of messages through the inbox with the retry policy; shared by both brokers.
pub(crate) struct Processor<H> {
    pub(crate) pool: PgPool,
    pub(crate) inbox: Inbox,
    pub(crate) config: ConsumerConfig,
    pub(crate) handler: H,
}

impl<H: Handler> Processor<H> {
    /// Most messages per batch.
    pub(crate) fn max_batch(&self) -> usize {
        usize::from(self.config.max_batch_messages.max(1))
    }

    /// Most batches at once.
    pub(crate) fn max_batches(&self) -> usize {
        usize::from(self.config.max_concurrent_batches.max(1))
    }

    /// The next batch to start when `running` batches run: `Ok(batch)`, or
    /// `Err(Some(when))` while a batch waits to fill up (`max_batch_wait`), or
    /// `Err(None)` when there is no room or nothing is ready.
    fn next_batch<T>(
        &self,
        lanes: &mut lanes::KeyLanes<Pending<T>>,
        running: usize,
        filling_since: &mut Option<tokio::time::Instant>,
        now: tokio::time::Instant,
    ) -> Result<Vec<Pending<T>>, Option<tokio::time::Instant>> {
        let max_batch = self.max_batch();
        let wait = self.config.max_batch_wait;
        if running >= self.max_batches() || !lanes.has_ready() {
            return Err(None);
        }
        if !wait.is_zero() && lanes.ready_count(max_batch) < max_batch {
            let since = *filling_since.get_or_insert(now);
            if now < since + wait {
                return Err(Some(since + wait));
            }
        }
        *filling_since = None;
        Ok(lanes
            .take_batch(max_batch)
            .into_iter()
            .map(|(_, pending)| pending)
            .collect())
    }

    /// Start batches while there is room and something is ready, each as the task
    /// `start` makes of it; returns when to look again if a batch waits to fill up
    /// (`max_batch_wait`).
    pub(crate) fn start_batches<T, D, F>(
        &self,
        lanes: &mut lanes::KeyLanes<Pending<T>>,
        tasks: &mut tokio::task::JoinSet<D>,
        filling_since: &mut Option<tokio::time::Instant>,
        now: tokio::time::Instant,
        mut start: impl FnMut(Vec<Pending<T>>) -> F,
    ) -> Option<tokio::time::Instant>
    where
        D: Send + 'static,
        F: Future<Output = D> + Send + 'static,
    {
        loop {
            match self.next_batch(lanes, tasks.len(), filling_since, now) {
                Ok(batch) => {
                    tasks.spawn(start(batch));
                }
                Err(look_again) => return look_again,
            }
        }
    }

    /// The handler's span; it continues the writer's trace.
    fn span(&self, meta: &MessageMeta) -> tracing::Span {
        let span = tracing::info_span!(
            "outbox.consume",
            consumer = %self.config.name,
            event_id = %meta.event_id,
            event_type = meta.event_type.as_deref().unwrap_or(""),
            traceparent = meta.traceparent.as_deref().unwrap_or(""),
        );
        crate::trace::follow(&span, meta.traceparent.as_deref());
        span
    }

    /// Sort out a batch by outcome: settle now (ack, dead-letter, abandon), or back
    /// to the key's lane (a failed run to retry after its backoff, and what did not
    /// run). Counts handled, duplicates and retries into `stats`.
    pub(crate) fn sort_out<T>(
        &self,
        batch: Vec<Pending<T>>,
        outcomes: Vec<Outcome>,
        stats: &mut ConsumerStats,
    ) -> Sorted<T> {
        let max_attempts = self.config.retry.max_attempts.max(1);
        let mut settle = Vec::new();
        let mut returned: Vec<Returned<T>> = Vec::new();
        let lane = |returned: &mut Vec<Returned<T>>, key: &str| -> usize {
            match returned.iter().position(|r| r.key == key) {
                Some(at) => at,
                None => {
                    returned.push(Returned {
                        key: key.to_owned(),
                        pending: Vec::new(),
                        not_before: None,
                        settled: 0,
                    });
                    returned.len() - 1
                }
            }
        };
        for (mut pending, outcome) in batch.into_iter().zip(outcomes) {
            let at = lane(&mut returned, &pending.key);
            let decision = match outcome {
                Outcome::Handled => {
                    stats.handled += 1;
                    Some(Settle::Ack)
                }
                Outcome::Duplicate => {
                    stats.duplicates += 1;
                    Some(Settle::Ack)
                }
                Outcome::Abandoned => Some(Settle::Abandon),
                Outcome::NotRun => None,
                Outcome::Failed(error) => {
                    pending.failures += 1;
                    let event_id = match &pending.message {
                        Ok(message) => message.meta.event_id.as_str(),
                        Err(_) => "",
                    };
                    if error.permanent || pending.failures >= max_attempts {
                        tracing::warn!(
                            consumer = %self.config.name,
                            event_id,
                            attempt = pending.failures,
                            permanent = error.permanent,
                            %error,
                            "handler failed for good; dead-lettering the message"
                        );
                        Some(Settle::DeadLetter(error.message))
                    } else {
                        stats.retries += 1;
                        let wait = self.config.retry.backoff(pending.failures);
                        tracing::info!(
                            consumer = %self.config.name,
                            event_id,
                            attempt = pending.failures,
                            retry_in_ms = wait.as_millis() as u64,
                            %error,
                            "handler failed; retrying after the backoff, its key waits"
                        );
                        returned[at].not_before = Some(tokio::time::Instant::now() + wait);
                        None
                    }
                }
            };
            match decision {
                Some(how) => {
                    returned[at].settled += 1;
                    settle.push((pending, how));
                }
                None => returned[at].pending.push(pending),
            }
        }
        Sorted { settle, returned }
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
