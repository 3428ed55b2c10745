//! An outbox row as the relay reads it.

use chrono::{DateTime, Utc};
use outbox_core::{EventId, Headers};

/// One event read from the outbox, ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    /// Position in the outbox; monotonic per key, sent on the wire so consumers can sort.
    pub sequence: i64,
    /// Unique id; RabbitMQ `message_id`, Kafka header; consumers deduplicate on it.
    pub event_id: EventId,
    /// Aggregate type, e.g. `order`.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type, e.g. `order.placed`.
    pub event_type: String,
    /// Events of one key are first-delivered in commit order.
    pub partition_key: String,
    /// Route override (exchange or topic) set by the writer.
    pub destination: Option<String>,
    /// The JSON payload, as UTF-8 bytes.
    pub payload: Vec<u8>,
    /// The writer's headers (including `traceparent` when captured).
    pub headers: Headers,
    /// When the event happened (the writer's time, not the publish time).
    pub created_at: DateTime<Utc>,
    /// Failed publish attempts of this event so far (broker outages do not count).
    pub attempts: i32,
}

/// Names of the headers the relay adds to every message.
pub mod wire {
    /// The event id (also the RabbitMQ `message_id`).
    pub const EVENT_ID: &str = "outbox-event-id";
    /// The event type (also the RabbitMQ `type`).
    pub const EVENT_TYPE: &str = "outbox-event-type";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "outbox-aggregate-type";
    /// The aggregate id.
    pub const AGGREGATE_ID: &str = "outbox-aggregate-id";
    /// The partition key.
    pub const PARTITION_KEY: &str = "outbox-partition-key";
    /// When the event happened, RFC 3339 with microseconds (the broker timestamp is the publish time).
    pub const CREATED_AT: &str = "outbox-created-at";
    /// Monotonic position (outbox sequence) so consumers can sort and deduplicate.
    pub const SEQUENCE: &str = "outbox-sequence";
}
