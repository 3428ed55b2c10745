//! RabbitMQ consumer helper (feature `lapin`): see the [module docs](super).
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool, channel: lapin::Channel) -> Result<(), outbox_core::Error> {
//! use outbox_core::consumer::amqp::AmqpConsumer;
//! use outbox_core::consumer::{ConsumerConfig, Handler, HandlerError, Message};
//! use outbox_core::Inbox;
//!
//! struct Billing;
//! impl Handler for Billing {
//!     async fn handle(&self, message: &Message, conn: &mut sqlx::PgConnection) -> Result<(), HandlerError> {
//!         let order: serde_json::Value = message.json()?;
//!         sqlx::query("insert into billing.ledger (order_id) values ($1)")
//!             .bind(order["id"].as_i64())
//!             .execute(conn)
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! let consumer = AmqpConsumer::new(pool, Inbox::new(Default::default()), ConsumerConfig::new("billing"), Billing);
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! let stats = consumer.run(&channel, "billing", shutdown).await?;
//! println!("handled {}, duplicates skipped {}", stats.handled, stats.duplicates);
//! # Ok(()) }
//! ```
//!
//! Dead-lettering rejects the message without requeue: declare the queue with a
//! dead-letter exchange (`x-dead-letter-exchange`), or RabbitMQ drops it. The
//! dead-lettered copy carries RabbitMQ's `x-death` header; the reason is logged.

use std::future::Future;
use std::sync::Arc;

use futures_util::{FutureExt as _, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::lanes::KeyLanes;
use super::{
    ConsumerConfig, ConsumerStats, Handler, Message, MessageMeta, Pending, Processor, Returned,
    Settle, wire,
};
use crate::error::Error;
use crate::inbox::Inbox;

/// Deliveries taken from the stream at once when several are ready, before a batch starts.
const DRAIN_READY_MAX: usize = 1_024;

/// What a finished batch task hands back to the consumer's loop.
struct BatchDone {
    returned: Vec<Returned<Delivery>>,
    /// Delivery tags whose batch committed: to acknowledge.
    done: Vec<u64>,
    /// Delivery tags rejected (dead-lettered or requeued): settled.
    rejected: Vec<u64>,
    stats: ConsumerStats,
}

/// Where a delivery the channel has not settled yet stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    /// In a batch, or waiting in its key's lane (for a batch, behind its key, or
    /// a retry backoff).
    Held,
    /// Its batch committed; the ack is not sent yet.
    Done,
}

/// Unsettled deliveries of the channel by tag, so that one `basic.ack` with
/// `multiple` can acknowledge a run of committed ones: it covers every unsettled
/// tag up to it, so it is sent only over a prefix of done ones.
struct Tags {
    tags: std::collections::BTreeMap<u64, Tag>,
    /// Done tags held back behind an older unsettled one.
    deferred: usize,
    /// Most done tags held back before they are acknowledged one by one.
    max_deferred: usize,
}

impl Tags {
    fn set(&mut self, tag: u64, state: Tag) {
        self.tags.insert(tag, state);
    }

    /// Acknowledge what committed: one multiple ack for the done prefix. Done tags
    /// behind an older unsettled one are held back for a later multiple ack (the
    /// older one is in a batch, or waits for one), up to `max_deferred`: beyond that
    /// (the older one waits out a long backoff) they are acknowledged one by one,
    /// so held-back acks never take more than that share of the prefetch.
    async fn flush(&mut self, channel: &Channel) {
        let mut through = None;
        while let Some(entry) = self.tags.first_entry() {
            if *entry.get() != Tag::Done {
                break;
            }
            through = Some(*entry.key());
            entry.remove();
        }
        if let Some(tag) = through {
            ack(channel, tag, true).await;
        }
        let done: Vec<u64> = self
            .tags
            .iter()
            .filter(|(_, state)| **state == Tag::Done)
            .map(|(tag, _)| *tag)
            .collect();
        self.deferred = done.len();
        if self.deferred <= self.max_deferred {
            return;
        }
        for tag in done {
            self.tags.remove(&tag);
            ack(channel, tag, false).await;
        }
        self.deferred = 0;
    }

    /// Acknowledge every done tag (the consumer stops).
    async fn flush_all(&mut self, channel: &Channel) {
        self.max_deferred = 0;
        self.flush(channel).await;
    }
}

async fn ack(channel: &Channel, tag: u64, multiple: bool) {
    if let Err(error) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
        // The effects are committed; the redelivery will be a duplicate.
        tracing::warn!(%error, multiple, "acknowledging processed deliveries failed; they will come again and be skipped");
    }
}

/// Consumes a RabbitMQ queue through the inbox; see the [module docs](super).
pub struct AmqpConsumer<H> {
    processor: Arc<Processor<H>>,
}

impl<H: Handler> AmqpConsumer<H> {
    /// A consumer that records processed ids in `inbox` (on `pool`) as `config.name`.
    pub fn new(pool: PgPool, inbox: Inbox, config: ConsumerConfig, handler: H) -> Self {
        AmqpConsumer {
            processor: Arc::new(Processor {
                pool,
                inbox,
                config,
                handler,
            }),
        }
    }

    /// Consume `queue` on `channel` until `shutdown` completes or the channel closes.
    ///
    /// Sets the channel's prefetch to `max_in_flight`. Deliveries are handled in
    /// batches (see [`ConsumerConfig`]) and each is acknowledged only after its
    /// batch's transaction committed. On shutdown it stops taking deliveries, lets
    /// running batches finish their current run, rejects what it still holds with
    /// requeue, and returns; what was not acknowledged is delivered again by RabbitMQ
    /// (and deduplicated by the inbox).
    pub async fn run(
        &self,
        channel: &Channel,
        queue: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerStats, Error> {
        let config = &self.processor.config;
        channel
            .basic_qos(config.max_in_flight.max(1), BasicQosOptions::default())
            .await
            .map_err(broker("setting the channel's prefetch"))?;
        let tag = format!("{}-{}", config.name, uuid::Uuid::new_v4().simple());
        let mut deliveries = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("starting to consume the queue"))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut lanes: KeyLanes<Pending<Delivery>> = KeyLanes::new();
        let mut tags = Tags {
            tags: std::collections::BTreeMap::new(),
            deferred: 0,
            max_deferred: usize::from(config.max_in_flight.max(1)) / 2,
        };
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
                    Ok(done) => {
                        stats.add(&done.stats);
                        settle_tags(&mut tags, &done);
                        for back in done.returned {
                            lanes.finish(&back.key, back.pending, back.not_before, back.settled);
                        }
                        tags.flush(channel).await;
                    }
                    Err(error) => {
                        tracing::error!(consumer = %config.name, %error, "a batch task failed");
                        ended = Some(Error::HandlerPanicked { consumer: config.name.clone() });
                        break;
                    }
                },
                _ = sleep_until(wake_at), if wake_at.is_some() => {}
                next = deliveries.next() => {
                    let mut next = next;
                    let mut taken = 0;
                    let mut closed = false;
                    loop {
                        match next {
                            Some(Ok(delivery)) => {
                                tags.set(delivery.delivery_tag, Tag::Held);
                                lanes.push_pending(received(delivery));
                            }
                            Some(Err(error)) => {
                                ended = Some(Error::Broker {
                                    operation: "receiving deliveries",
                                    message: error.to_string(),
                                });
                                closed = true;
                                break;
                            }
                            // Cancelled by the broker, or the channel closed.
                            None => {
                                closed = true;
                                break;
                            }
                        }
                        taken += 1;
                        // Whatever else is ready now goes into the same batches.
                        match deliveries.next().now_or_never() {
                            Some(more) if taken < DRAIN_READY_MAX => next = more,
                            _ => break,
                        }
                    }
                    if closed {
                        break;
                    }
                }
            }
            let now = Instant::now();
            let backoff = lanes.wake(now);
            let fill = self.dispatch(&mut lanes, &mut tasks, &stop_rx, &mut filling_since, now);
            wake_at = super::lanes::earliest(backoff, fill);
        }
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = stop_tx.send(true);
        let mut left: Vec<Pending<Delivery>> = lanes.drain();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(done) = joined {
                stats.add(&done.stats);
                settle_tags(&mut tags, &done);
                left.extend(done.returned.into_iter().flat_map(|back| back.pending));
            }
        }
        tags.flush_all(channel).await;
        // Not processed: back to the queue for this or another instance.
        futures_util::future::join_all(left.iter().map(|pending| reject(&pending.item, true)))
            .await;
        match ended {
            Some(error) => Err(error),
            None => Ok(stats),
        }
    }

    /// Start batches while there is room and something is ready; returns when to look
    /// again if a batch waits to fill up (`max_batch_wait`).
    fn dispatch(
        &self,
        lanes: &mut KeyLanes<Pending<Delivery>>,
        tasks: &mut JoinSet<BatchDone>,
        stopping: &watch::Receiver<bool>,
        filling_since: &mut Option<Instant>,
        now: Instant,
    ) -> Option<Instant> {
        self.processor
            .start_batches(lanes, tasks, filling_since, now, |batch| {
                let (processor, stopping) = (self.processor.clone(), stopping.clone());
                async move { run_batch(&processor, batch, &stopping).await }
            })
    }
}

impl KeyLanes<Pending<Delivery>> {
    fn push_pending(&mut self, pending: Pending<Delivery>) {
        let key = pending.key.clone();
        self.push(&key, pending);
    }
}

/// A delivery as the batches hold it: its lane, and the message for the handler.
fn received(mut delivery: Delivery) -> Pending<Delivery> {
    let key = lane_key(&delivery);
    let message = match message_meta(&delivery) {
        Some(meta) => Ok(Message {
            meta,
            payload: std::mem::take(&mut delivery.data),
            attempt: 0,
        }),
        None => {
            tracing::warn!(
                routing_key = %delivery.routing_key,
                "a delivery without an event id (message_id) cannot be deduplicated; dead-lettering it"
            );
            Err(
                "the delivery has no message_id (event id), so it cannot be deduplicated"
                    .to_owned(),
            )
        }
    };
    Pending {
        item: delivery,
        key,
        message,
        failures: 0,
    }
}

/// A finished batch's tags: committed ones are done, rejected ones settled (the
/// returned ones stay held).
fn settle_tags(tags: &mut Tags, done: &BatchDone) {
    for tag in &done.done {
        tags.set(*tag, Tag::Done);
    }
    for tag in &done.rejected {
        tags.tags.remove(tag);
    }
}

/// Run one batch, then reject what is dead-lettered or abandoned; the consumer's
/// loop acknowledges what committed.
async fn run_batch<H: Handler>(
    processor: &Processor<H>,
    mut batch: Vec<Pending<Delivery>>,
    stopping: &watch::Receiver<bool>,
) -> BatchDone {
    let mut stats = ConsumerStats::default();
    let outcomes = processor.run_batch(&mut batch, stopping).await;
    let sorted = processor.sort_out(batch, outcomes, &mut stats);
    let mut done = Vec::new();
    let mut rejects = Vec::new();
    for (pending, how) in &sorted.settle {
        match how {
            Settle::Ack => done.push(pending.item.delivery_tag),
            Settle::DeadLetter(_) => {
                stats.dead_lettered += 1;
                rejects.push((&pending.item, false));
            }
            Settle::Abandon => rejects.push((&pending.item, true)),
        }
    }
    // Awaited before the loop's next multiple ack, which must not cover them.
    futures_util::future::join_all(
        rejects
            .iter()
            .map(|(delivery, requeue)| reject(delivery, *requeue)),
    )
    .await;
    let rejected = rejects
        .iter()
        .map(|(delivery, _)| delivery.delivery_tag)
        .collect();
    BatchDone {
        returned: sorted.returned,
        done,
        rejected,
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

async fn reject(delivery: &Delivery, requeue: bool) {
    if let Err(error) = delivery.acker.reject(BasicRejectOptions { requeue }).await {
        tracing::warn!(%error, requeue, "rejecting a delivery failed; RabbitMQ will deliver it again");
    }
}

/// The event's metadata from a delivery the relay published: the event id is the
/// `message_id` property (or the `outbox-event-id` header); `None` without one.
pub fn message_meta(delivery: &Delivery) -> Option<MessageMeta> {
    let properties = &delivery.properties;
    let headers = properties.headers().as_ref();
    let header = |name: &str| headers.and_then(|table| header_text(table, name));
    let event_id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .filter(|id| !id.is_empty())
        .or_else(|| header(wire::EVENT_ID))?;
    Some(MessageMeta {
        event_id,
        event_type: header(wire::EVENT_TYPE).or_else(|| {
            properties
                .kind()
                .as_ref()
                .map(|kind| kind.as_str().to_owned())
        }),
        partition_key: header(wire::PARTITION_KEY),
        sequence: header(wire::SEQUENCE).and_then(|text| text.parse().ok()),
        traceparent: header(wire::TRACEPARENT),
    })
}

/// The lane of a delivery: its partition key, else its event id (no order to keep).
fn lane_key(delivery: &Delivery) -> String {
    let headers = delivery.properties.headers().as_ref();
    headers
        .and_then(|table| header_text(table, wire::PARTITION_KEY))
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
        })
        .unwrap_or_default()
}

fn header_text(table: &FieldTable, name: &str) -> Option<String> {
    let value = table
        .inner()
        .iter()
        .find(|(key, _)| key.as_str() == name)?
        .1;
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        _ => None,
    }
}

fn broker(operation: &'static str) -> impl FnOnce(lapin::Error) -> Error {
    move |error| Error::Broker {
        operation,
        message: error.to_string(),
    }
}
