//! Transactional outbox and idempotent inbox for PostgreSQL.
//!
//! A service that changes data and must tell others about it writes the event
//! into the `outbox` table **in the same transaction** as the change
//! ([`Outbox::enqueue`]); the `outbox-relay` daemon publishes committed events to
//! RabbitMQ or Kafka afterwards. An event is published if and only if its
//! transaction committed.
//!
//! What is guaranteed, and what is not:
//! * delivery to the broker is **at-least-once**: after a crash or an outage an
//!   event can be published again, never lost;
//! * consumers get **exactly-once effects** by processing through the [`Inbox`],
//!   which records message ids in the consumer's own transaction;
//! * events with the same partition key are first-delivered in commit order
//!   (see [`writer`] for the rule that makes it so);
//! * exactly-once *delivery* is not promised, by this or any outbox.
//!
//! ```no_run
//! use outbox_core::{migrate, Event, Outbox, OutboxConfig};
//!
//! # async fn place_order(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = Outbox::new(OutboxConfig::default());
//! migrate(&pool, &outbox.config().schema).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("update orders set status = 'placed' where id = $1")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Event::builder("order", "42", "order.placed")
//!     .payload(&serde_json::json!({ "order_id": 42, "total_cents": 1999 }))
//!     .build()?;
//! outbox.enqueue(&mut tx, &event).await?;
//! tx.commit().await?; // the event exists only if this commit happens
//! # Ok(()) }
//! ```

#[cfg(any(feature = "lapin", feature = "rdkafka"))]
pub mod consumer;
pub mod error;
pub mod inbox;
pub mod message;
pub mod schema;
pub mod trace;
pub mod wal_message;
pub mod writer;

pub use error::{Error, Result};
pub use inbox::{Inbox, InboxRetention, Processed};
pub use message::{Event, EventBuilder, EventId, Headers};
pub use schema::{MIGRATOR, SchemaName, migrate};
pub use wal_message::{DecodeError as WalMessageDecodeError, DecodedEvent};
pub use writer::{Enqueued, KeyOrdering, Outbox, OutboxConfig, enqueue, enqueue_all};
