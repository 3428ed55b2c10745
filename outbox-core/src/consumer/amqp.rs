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

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::lanes::KeyLanes;
use super::{ConsumerConfig, ConsumerStats, Handler, MessageMeta, Processor, Verdict, wire};
use crate::error::Error;
use crate::inbox::Inbox;

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
    /// Sets the channel's prefetch to `max_in_flight`. On shutdown it stops taking
    /// deliveries, lets running handlers finish their current run, and returns; what
    /// was not acknowledged is redelivered by RabbitMQ (and deduplicated by the inbox).
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
        let mut lanes: KeyLanes<Delivery> = KeyLanes::new();
        let mut tasks: JoinSet<(String, ConsumerStats)> = JoinSet::new();
        let mut stats = ConsumerStats::default();
        let mut ended = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((key, run)) = joined {
                        stats.add(&run);
                        if let Some(next) = lanes.finish(&key) {
                            self.spawn(&mut tasks, key, next, stop_rx.clone());
                        }
                    }
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let key = lane_key(&delivery);
                        if let Some(start) = lanes.push(&key, delivery) {
                            self.spawn(&mut tasks, key, start, stop_rx.clone());
                        }
                    }
                    Some(Err(error)) => {
                        ended = Some(Error::Broker {
                            operation: "receiving deliveries",
                            message: error.to_string(),
                        });
                        break;
                    }
                    None => break,
                },
            }
        }
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = stop_tx.send(true);
        while let Some(joined) = tasks.join_next().await {
            if let Ok((_, run)) = joined {
                stats.add(&run);
            }
        }
        match ended {
            Some(error) => Err(error),
            None => Ok(stats),
        }
    }

    fn spawn(
        &self,
        tasks: &mut JoinSet<(String, ConsumerStats)>,
        key: String,
        delivery: Delivery,
        stopping: watch::Receiver<bool>,
    ) {
        let processor = self.processor.clone();
        tasks.spawn(async move {
            let stats = handle_delivery(&processor, delivery, &stopping).await;
            (key, stats)
        });
    }
}

async fn handle_delivery<H: Handler>(
    processor: &Processor<H>,
    mut delivery: Delivery,
    stopping: &watch::Receiver<bool>,
) -> ConsumerStats {
    let mut stats = ConsumerStats::default();
    let Some(meta) = message_meta(&delivery) else {
        tracing::warn!(
            consumer = %processor.config.name,
            routing_key = %delivery.routing_key,
            "a delivery without an event id (message_id) cannot be deduplicated; dead-lettering it"
        );
        stats.dead_lettered += 1;
        reject(&delivery, false).await;
        return stats;
    };
    let payload = std::mem::take(&mut delivery.data);
    let verdict = processor.process(meta, payload, stopping, &mut stats).await;
    stats.count(&verdict);
    match verdict {
        Verdict::Handled | Verdict::Duplicate => {
            if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                // The effects are committed; the redelivery will be a duplicate.
                tracing::warn!(%error, "acknowledging a processed delivery failed; it will come again and be skipped");
            }
        }
        Verdict::DeadLettered(_) => reject(&delivery, false).await,
        Verdict::Abandoned => reject(&delivery, true).await,
    }
    stats
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
