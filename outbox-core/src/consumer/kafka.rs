//! Kafka consumer helper (feature `rdkafka`): see the [module docs](super).
//!
//! The consumer joins a consumer group and commits offsets only over messages whose
//! inbox transaction committed (or that were dead-lettered): an offset is committed
//! once every earlier message of its partition is done, so a crash re-reads from the
//! first unfinished message (the inbox skips the ones already handled).
//!
//! A message the handler keeps failing on is produced to the dead-letter topic
//! with its key, payload and headers, plus `outbox-dead-letter-error` (the reason) and
//! `outbox-dead-letter-source` (`topic/partition/offset`), before its offset counts
//! as done.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
//! use outbox_core::consumer::kafka::{KafkaConsumer, KafkaSettings};
//! use outbox_core::consumer::{ConsumerConfig, Handler, HandlerError, Message};
//! use outbox_core::Inbox;
//!
//! struct Shipping;
//! impl Handler for Shipping {
//!     async fn handle(&self, message: &Message, conn: &mut sqlx::PgConnection) -> Result<(), HandlerError> {
//!         sqlx::query("insert into shipping.parcels (event_id) values ($1)")
//!             .bind(&message.meta.event_id)
//!             .execute(conn)
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! let settings = KafkaSettings::new("127.0.0.1:9092", "shipping", ["orders"], "orders.dead-letters");
//! let consumer = KafkaConsumer::connect(pool, Inbox::new(Default::default()), ConsumerConfig::new("shipping"), settings, Shipping)?;
//! let stats = consumer.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::lanes::KeyLanes;
use super::{
    ConsumerConfig, ConsumerStats, Handler, Message, MessageMeta, Pending, Processor, Returned,
    Settle, Verdict, wire,
};
use crate::error::Error;
use crate::inbox::Inbox;

/// What a finished batch task hands back to the consumer's loop.
struct BatchDone {
    returned: Vec<Returned<OwnedMessage>>,
    /// Messages that left for good; `true` when done (its offset may be committed).
    settled: Vec<(OwnedMessage, bool)>,
    stats: ConsumerStats,
}

/// Longest wait for the dead-letter topic's delivery report.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to consume.
#[derive(Clone)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The consumer group: instances of one consumer share the partitions.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Topic that receives messages the handler keeps failing on (it must exist).
    pub dead_letter_topic: String,
    /// Further librdkafka settings (security.protocol, sasl.*, ssl.*), for both the
    /// consumer and the dead-letter producer. Offset settings are the helper's own.
    pub extra: BTreeMap<String, String>,
}

impl KafkaSettings {
    /// Settings for `group_id` reading `topics` from `brokers`, dead-lettering to `dead_letter_topic`.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
        dead_letter_topic: impl Into<String>,
    ) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            dead_letter_topic: dead_letter_topic.into(),
            extra: BTreeMap::new(),
        }
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // extra may hold passwords: only its keys are shown.
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Consumes Kafka topics through the inbox; see the [module docs](self).
pub struct KafkaConsumer<H> {
    processor: Arc<Processor<H>>,
    consumer: StreamConsumer,
    producer: FutureProducer,
    dead_letter_topic: String,
}

impl<H: Handler> KafkaConsumer<H> {
    /// Create the group consumer (subscribed to the topics) and the dead-letter producer.
    pub fn connect(
        pool: PgPool,
        inbox: Inbox,
        config: ConsumerConfig,
        settings: KafkaSettings,
        handler: H,
    ) -> Result<Self, Error> {
        let mut client = ClientConfig::new();
        for (key, value) in &settings.extra {
            client.set(key, value);
        }
        client.set("bootstrap.servers", &settings.brokers);
        let producer: FutureProducer = client
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(broker("creating the dead-letter producer"))?;
        let consumer: StreamConsumer = client
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "true")
            // Offsets are stored by the helper, only over finished messages.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(broker("creating the consumer"))?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(broker("subscribing to the topics"))?;
        Ok(KafkaConsumer {
            processor: Arc::new(Processor {
                pool,
                inbox,
                config,
                handler,
            }),
            consumer,
            producer,
            dead_letter_topic: settings.dead_letter_topic,
        })
    }

    /// Consume until `shutdown` completes; returns what was done.
    ///
    /// Messages are handled in batches (see [`ConsumerConfig`]); a message's offset
    /// is stored only after its batch's transaction committed, and committed once
    /// every earlier message of its partition is done. On shutdown it stops reading,
    /// lets running batches finish their current run, commits the offsets of
    /// finished messages and returns; the rest is read again by the next owner of
    /// the partition (and deduplicated by the inbox).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<ConsumerStats, Error> {
        let config = &self.processor.config;
        let max_in_flight = usize::from(config.max_in_flight.max(1));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut lanes: KeyLanes<Pending<OwnedMessage>> = KeyLanes::new();
        let mut offsets: HashMap<(String, i32), PartitionOffsets> = HashMap::new();
        let mut tasks: JoinSet<BatchDone> = JoinSet::new();
        let mut stats = ConsumerStats::default();
        let mut ended = None;
        let mut filling_since: Option<Instant> = None;
        let mut wake_at: Option<Instant> = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                    Ok(done) => self.batch_done(done, &mut lanes, &mut offsets, &mut stats),
                    Err(error) => {
                        tracing::error!(consumer = %config.name, %error, "a batch task failed");
                        ended = Some(Error::HandlerPanicked { consumer: config.name.clone() });
                        break;
                    }
                },
                _ = sleep_until(wake_at), if wake_at.is_some() => {}
                received = self.consumer.recv(), if lanes.held() < max_in_flight => {
                    let mut received = received;
                    loop {
                        match received {
                            Ok(message) => {
                                let message = message.detach();
                                offsets
                                    .entry((message.topic().to_owned(), message.partition()))
                                    .or_default()
                                    .received(message.offset());
                                let pending = pending(message);
                                let key = pending.key.clone();
                                lanes.push(&key, pending);
                            }
                            Err(error) => {
                                // Transport trouble is retried by librdkafka; a fatal error is not.
                                if self.consumer.client().fatal_error().is_some() {
                                    ended = Some(Error::Broker { operation: "consuming", message: error.to_string() });
                                    break;
                                }
                                tracing::warn!(%error, "Kafka consumer error; consuming goes on");
                            }
                        }
                        if lanes.held() >= max_in_flight {
                            break;
                        }
                        // Whatever else is ready now goes into the same batches.
                        match self.consumer.recv().now_or_never() {
                            Some(more) => received = more,
                            None => break,
                        }
                    }
                    if ended.is_some() {
                        break;
                    }
                }
            }
            let now = Instant::now();
            let backoff = lanes.wake(now);
            let fill = self.dispatch(&mut lanes, &mut tasks, &stop_rx, &mut filling_since, now);
            wake_at = super::lanes::earliest(backoff, fill);
        }
        let _ = stop_tx.send(true);
        while let Some(joined) = tasks.join_next().await {
            if let Ok(done) = joined {
                self.batch_done(done, &mut lanes, &mut offsets, &mut stats);
            }
        }
        // Unread by a batch: the partition's next owner reads them again.
        drop(lanes.drain());
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::warn!(%error, "committing the final offsets failed; the next owner re-reads them");
        }
        match ended {
            Some(error) => Err(error),
            None => Ok(stats),
        }
    }

    /// Start batches while there is room and something is ready; returns when to look
    /// again if a batch waits to fill up (`max_batch_wait`).
    fn dispatch(
        &self,
        lanes: &mut KeyLanes<Pending<OwnedMessage>>,
        tasks: &mut JoinSet<BatchDone>,
        stopping: &watch::Receiver<bool>,
        filling_since: &mut Option<Instant>,
        now: Instant,
    ) -> Option<Instant> {
        self.processor
            .start_batches(lanes, tasks, filling_since, now, |batch| {
                let processor = self.processor.clone();
                let producer = self.producer.clone();
                let dead_letter_topic = self.dead_letter_topic.clone();
                let stopping = stopping.clone();
                async move {
                    run_batch(&processor, &producer, &dead_letter_topic, batch, &stopping).await
                }
            })
    }

    /// A batch is over: its keys' lanes move on, and done messages' offsets are stored.
    fn batch_done(
        &self,
        done: BatchDone,
        lanes: &mut KeyLanes<Pending<OwnedMessage>>,
        offsets: &mut HashMap<(String, i32), PartitionOffsets>,
        stats: &mut ConsumerStats,
    ) {
        stats.add(&done.stats);
        for (message, finished) in &done.settled {
            if *finished {
                self.finished(message, offsets);
            }
        }
        for back in done.returned {
            lanes.finish(&back.key, back.pending, back.not_before, back.settled);
        }
    }

    /// Record a finished message; store the offset its partition may now commit.
    fn finished(
        &self,
        message: &OwnedMessage,
        offsets: &mut HashMap<(String, i32), PartitionOffsets>,
    ) {
        let topic = message.topic();
        let partition = message.partition();
        let Some(state) = offsets.get_mut(&(topic.to_owned(), partition)) else {
            return;
        };
        if let Some(done_through) = state.done(message.offset())
            && let Err(error) = self.consumer.store_offset(topic, partition, done_through)
        {
            // Typically a partition revoked by a rebalance: its new owner re-reads.
            tracing::debug!(%error, topic, partition, "storing an offset failed");
        }
    }
}

/// A message as the batches hold it: its lane, and the message for the handler.
fn pending(message: OwnedMessage) -> Pending<OwnedMessage> {
    let key = lane_key(&message);
    let handled = match message_meta(&message) {
        Some(meta) => Ok(Message {
            meta,
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            attempt: 0,
        }),
        None => Err(
            "the message has no outbox-event-id header, so it cannot be deduplicated".to_owned(),
        ),
    };
    Pending {
        item: message,
        key,
        message: handled,
        failures: 0,
    }
}

/// Run one batch, then settle it: dead-letter what failed for good; the loop stores
/// the offsets of what is done.
async fn run_batch<H: Handler>(
    processor: &Processor<H>,
    producer: &FutureProducer,
    dead_letter_topic: &str,
    mut batch: Vec<Pending<OwnedMessage>>,
    stopping: &watch::Receiver<bool>,
) -> BatchDone {
    let mut stats = ConsumerStats::default();
    let outcomes = processor.run_batch(&mut batch, stopping).await;
    let sorted = processor.sort_out(batch, outcomes, &mut stats);
    let mut settled = Vec::with_capacity(sorted.settle.len());
    for (pending, how) in sorted.settle {
        let finished = match how {
            Settle::Ack => true,
            Settle::Abandon => false,
            Settle::DeadLetter(reason) => {
                match dead_letter(
                    producer,
                    dead_letter_topic,
                    &pending.item,
                    &reason,
                    stopping,
                )
                .await
                {
                    Verdict::DeadLettered(_) => {
                        stats.dead_lettered += 1;
                        true
                    }
                    _ => false,
                }
            }
        };
        settled.push((pending.item, finished));
    }
    BatchDone {
        returned: sorted.returned,
        settled,
        stats,
    }
}

/// Sleep until `at` (never, without one).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Produce `message` to the dead-letter topic; retried until delivered or stopping.
async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    message: &OwnedMessage,
    reason: &str,
    stopping: &watch::Receiver<bool>,
) -> Verdict {
    let source = format!(
        "{}/{}/{}",
        message.topic(),
        message.partition(),
        message.offset()
    );
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for header in original.iter() {
            headers = headers.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    let headers = headers
        .insert(Header {
            key: wire::DEAD_LETTER_ERROR,
            value: Some(reason.as_bytes()),
        })
        .insert(Header {
            key: wire::DEAD_LETTER_SOURCE,
            value: Some(source.as_bytes()),
        });
    loop {
        if *stopping.borrow() {
            return Verdict::Abandoned;
        }
        let mut record = FutureRecord::to(topic).headers(headers.clone());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        match producer.send(record, DEAD_LETTER_TIMEOUT).await {
            Ok(_) => {
                tracing::warn!(dead_letter_topic = topic, source = %source, reason, "dead-lettered a message");
                return Verdict::DeadLettered(reason.to_owned());
            }
            Err((error, _)) => {
                tracing::warn!(%error, dead_letter_topic = topic, "producing to the dead-letter topic failed; retrying");
                let mut stopping = stopping.clone();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopping.wait_for(|stop| *stop) => return Verdict::Abandoned,
                }
            }
        }
    }
}

/// The event's metadata from a message the relay produced; `None` without an event id.
pub fn message_meta(message: &impl rdkafka::Message) -> Option<MessageMeta> {
    let headers = message.headers();
    let header = |name: &str| {
        headers.and_then(|headers| {
            headers
                .iter()
                .filter(|header| header.key == name)
                .last()
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        })
    };
    let event_id = header(wire::EVENT_ID).filter(|id| !id.is_empty())?;
    Some(MessageMeta {
        event_id,
        event_type: header(wire::EVENT_TYPE),
        partition_key: header(wire::PARTITION_KEY),
        sequence: header(wire::SEQUENCE).and_then(|text| text.parse().ok()),
        traceparent: header(wire::TRACEPARENT),
    })
}

/// The lane of a message: its key (the relay's partition key), else its position.
fn lane_key(message: &OwnedMessage) -> String {
    match message.key() {
        Some(key) => String::from_utf8_lossy(key).into_owned(),
        None => format!("{}/{}", message.partition(), message.offset()),
    }
}

/// Which offsets of one partition are in flight, and how far all are done.
#[derive(Debug, Default)]
struct PartitionOffsets {
    in_flight: BTreeSet<i64>,
    highest_received: Option<i64>,
    lowest_received: Option<i64>,
    stored: Option<i64>,
}

impl PartitionOffsets {
    fn received(&mut self, offset: i64) {
        self.in_flight.insert(offset);
        self.highest_received = Some(self.highest_received.map_or(offset, |h| h.max(offset)));
        self.lowest_received = Some(self.lowest_received.map_or(offset, |l| l.min(offset)));
    }

    /// `offset` is done; returns the offset through which every received message of
    /// the partition is done, when it moved forward (librdkafka commits it + 1).
    fn done(&mut self, offset: i64) -> Option<i64> {
        self.in_flight.remove(&offset);
        let through = match self.in_flight.first() {
            Some(&first_unfinished) => first_unfinished - 1,
            None => self.highest_received?,
        };
        let moved =
            through >= self.lowest_received? && self.stored.is_none_or(|stored| through > stored);
        moved.then(|| {
            self.stored = Some(through);
            through
        })
    }
}

fn broker(operation: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    move |error| Error::Broker {
        operation,
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_is_committable_only_once_every_earlier_message_is_done() {
        let mut offsets = PartitionOffsets::default();
        for offset in 10..15 {
            offsets.received(offset);
        }
        assert_eq!(offsets.done(12), None, "10 and 11 are still running");
        assert_eq!(offsets.done(10), Some(10));
        assert_eq!(offsets.done(11), Some(12), "12 was already done");
        assert_eq!(offsets.done(14), None, "13 is still running");
        assert_eq!(offsets.done(13), Some(14));
        offsets.received(15);
        assert_eq!(offsets.done(15), Some(15));
    }
}
