//! The one error type of outbox-core.

use crate::message::EventId;

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in outbox-core.
///
/// Validation variants are returned before any SQL is sent, so a caller's
/// transaction is still usable after one of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required text field of an event, or an inbox key, is empty.
    #[error("{field} must not be empty: give the event a non-empty {field}")]
    EmptyField {
        /// Name of the empty field.
        field: &'static str,
    },

    /// A text field contains a NUL character, which PostgreSQL text and jsonb cannot store.
    #[error("{field} contains a NUL character (\\u0000), which PostgreSQL cannot store: remove it")]
    NulCharacter {
        /// Name of the field (for payloads, a JSON path such as `payload.items[2].name`).
        field: String,
    },

    /// A header name that one of the brokers would reject or that the relay reserves.
    #[error("invalid header name {name:?}: {reason}")]
    InvalidHeaderName {
        /// The offending header name.
        name: String,
        /// Why it is refused and what is allowed.
        reason: &'static str,
    },

    /// A header value that cannot be carried.
    #[error("invalid value for header {name:?}: {reason}")]
    InvalidHeaderValue {
        /// Name of the header whose value is refused.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// One header value is longer than [`crate::message::MAX_HEADER_VALUE_BYTES`].
    #[error(
        "header {name:?} has a value of {len} bytes, over the maximum of {max} bytes per header value \
         (RabbitMQ must fit all headers into one frame, 128 KiB by default): put large data in the payload"
    )]
    HeaderValueTooLong {
        /// Name of the header.
        name: String,
        /// Length of its value in bytes.
        len: usize,
        /// The maximum in bytes.
        max: usize,
    },

    /// The headers together (names and values) are larger than [`crate::message::MAX_HEADERS_TOTAL_BYTES`].
    #[error(
        "the event's headers total {total} bytes (names and values), over the maximum of {max} bytes \
         (RabbitMQ must fit all headers into one frame, 128 KiB by default): send fewer or shorter headers, \
         and put large data in the payload"
    )]
    HeadersTooLarge {
        /// Bytes of all header names and values.
        total: usize,
        /// The maximum in bytes.
        max: usize,
    },

    /// The payload could not be turned into JSON.
    #[error("event payload cannot be serialized to JSON: {source}")]
    PayloadNotSerializable {
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// The serialized payload exceeds the configured maximum.
    #[error(
        "payload of event {event_id} is {size_bytes} bytes, over the maximum of {max_bytes} bytes: \
         send a reference to the data instead, or raise OutboxConfig::max_payload_bytes (brokers have limits too: Kafka's default is 1 MiB)"
    )]
    PayloadTooLarge {
        /// The event that is too large.
        event_id: EventId,
        /// Size of its serialized payload.
        size_bytes: usize,
        /// The configured maximum.
        max_bytes: usize,
    },

    /// A text field is longer than allowed.
    #[error("{field} is {len} bytes, over the maximum of {max} bytes")]
    FieldTooLong {
        /// Name of the field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The maximum length in bytes.
        max: usize,
    },

    /// A PostgreSQL schema name that is not a plain lowercase identifier.
    #[error(
        "invalid schema name {name:?}: use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit (and not pg_*)"
    )]
    InvalidSchemaName {
        /// The refused name.
        name: String,
    },

    /// An inbox message arrived without a message id; deduplicating on it would be unsafe.
    #[error(
        "message has no message id, so it cannot be deduplicated: publish with a message id (the relay always sets one) and reject or dead-letter this message"
    )]
    MissingMessageId,

    /// The inbox retention window is shorter than the longest redelivery it must cover.
    #[error(
        "inbox retention of {retention_secs} s is shorter than the longest redelivery window of {redelivery_secs} s: \
         ids would be forgotten while duplicates can still arrive; raise the retention"
    )]
    RetentionTooShort {
        /// The configured retention.
        retention_secs: u64,
        /// The longest time after which a duplicate may still arrive.
        redelivery_secs: u64,
    },

    /// An event with this id is already in the outbox.
    #[error(
        "event {event_id} is already in the outbox: event ids must be unique; build a new Event for a new fact"
    )]
    DuplicateEventId {
        /// The duplicate id.
        event_id: EventId,
    },

    /// The outbox tables are missing in the configured schema.
    #[error(
        "outbox tables not found in schema {schema:?}: run the migrations first (outbox_core::migrate or `outbox-relay migrate`)"
    )]
    SchemaMissing {
        /// The schema that was expected to hold the tables.
        schema: String,
    },

    /// A database call failed.
    #[error("database error while {operation}: {source}")]
    Database {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A broker call of a consumer helper failed (feature `lapin` or `rdkafka`).
    #[error("broker error while {operation}: {message}")]
    Broker {
        /// What was being done.
        operation: &'static str,
        /// The client library's error.
        message: String,
    },

    /// A consumer helper's handler panicked: the helper stops, and the messages it
    /// held are delivered again by the broker (and deduplicated by the inbox).
    #[error("a handler of consumer {consumer:?} panicked; the consumer stopped")]
    HandlerPanicked {
        /// The consumer's name.
        consumer: String,
    },

    /// Running the migrations failed.
    #[error("migrating schema {schema:?} failed: {source}")]
    Migrate {
        /// The schema being migrated.
        schema: String,
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

impl Error {
    /// True for errors about the input, which are returned before any SQL runs.
    pub fn is_validation(&self) -> bool {
        matches!(
            self,
            Error::EmptyField { .. }
                | Error::NulCharacter { .. }
                | Error::InvalidHeaderName { .. }
                | Error::InvalidHeaderValue { .. }
                | Error::PayloadNotSerializable { .. }
                | Error::PayloadTooLarge { .. }
                | Error::FieldTooLong { .. }
                | Error::InvalidSchemaName { .. }
                | Error::MissingMessageId
                | Error::RetentionTooShort { .. }
        )
    }

    pub(crate) fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Database { operation, source }
    }
}
