//! WAL-message writer mode: events as logical decoding messages, no table row.
//!
//! [`emit`] writes an [`Event`] with `pg_logical_emit_message(true, prefix, bytes)`
//! in the caller's transaction. Nothing is stored in a table: the event exists
//! only in the write-ahead log, and only the relay's WAL source (a logical
//! replication slot) can read it. Like [`Outbox::enqueue`](crate::Outbox::enqueue),
//! the event is delivered if and only if the transaction commits: the message is
//! *transactional* (`true`), so PostgreSQL decodes it with its transaction's
//! commit and drops it with a rollback. (A non-transactional message would be
//! delivered even when its transaction rolls back; the relay ignores those.)
//!
//! Trade-offs against the default table mode:
//! * no table writes, no bloat, no cleanup;
//! * the relay must use the WAL source, with a slot that exists *before* the
//!   first event is emitted (events written while no slot exists are never seen);
//! * if the slot is lost (dropped, or invalidated by `max_slot_wal_keep_size`),
//!   unconfirmed events cannot be recovered from a table: they are gone. Use
//!   table mode where that is not acceptable.
//!
//! The message content is a versioned JSON document holding every field of the
//! event (see [`encode`]); the relay reads it back with [`decode`].
//!
//! ```no_run
//! use outbox_core::{Event, wal_message};
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! let event = Event::builder("order", "42", "order.placed")
//!     .payload(&serde_json::json!({ "total_cents": 1999 }))
//!     .build()?;
//! wal_message::emit(
//!     &mut tx,
//!     wal_message::DEFAULT_PREFIX,
//!     &event,
//!     outbox_core::writer::DEFAULT_MAX_PAYLOAD_BYTES,
//! )
//! .await?;
//! tx.commit().await?; // the relay sees the event only if this commit happens
//! # Ok(()) }
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::PgConnection;

use crate::error::{Error, Result};
use crate::message::{Event, EventId, Headers};

/// Default prefix of the logical decoding messages (the relay's default too).
pub const DEFAULT_PREFIX: &str = "outbox";

/// Version of the JSON document written by [`encode`]; [`decode`] accepts only this one.
pub const FORMAT_VERSION: u32 = 1;

/// Emits a transactional message; `$2` as bytea, so the content is taken verbatim.
const EMIT_SQL: &str = "select pg_logical_emit_message(true, $1, $2::bytea)";

/// Write `event` as a transactional logical decoding message with `prefix`, in the
/// caller's transaction (pass `&mut *tx`).
///
/// Checked before any SQL, so the caller's transaction stays usable after a
/// validation error: the payload against `max_payload_bytes` (as
/// [`Outbox::enqueue`](crate::Outbox::enqueue) does), and the prefix (not empty,
/// no NUL). Outside an explicit transaction the statement commits on its own.
pub async fn emit(
    conn: &mut PgConnection,
    prefix: &str,
    event: &Event,
    max_payload_bytes: usize,
) -> Result<()> {
    check_prefix(prefix)?;
    if event.payload_bytes() > max_payload_bytes {
        return Err(Error::PayloadTooLarge {
            event_id: event.id(),
            size_bytes: event.payload_bytes(),
            max_bytes: max_payload_bytes,
        });
    }
    let content = encode(event)?;
    sqlx::query(EMIT_SQL)
        .bind(prefix)
        .bind(content)
        .execute(conn)
        .await
        .map_err(Error::database("emitting a logical decoding message"))?;
    Ok(())
}

/// The message content for `event`: a JSON object with `"v": 1` and every field,
/// `{"v":1,"event_id":…,"aggregate_type":…,"aggregate_id":…,"event_type":…,
/// "partition_key":…,"destination":…|null,"payload":…,"headers":{…},"created_at":"RFC 3339"}`.
pub fn encode(event: &Event) -> Result<Vec<u8>> {
    let document = WireEventOut {
        v: FORMAT_VERSION,
        event_id: event.id(),
        aggregate_type: event.aggregate_type(),
        aggregate_id: event.aggregate_id(),
        event_type: event.event_type(),
        partition_key: event.partition_key(),
        destination: event.destination(),
        payload: event.payload(),
        headers: event.headers(),
        created_at: event.created_at(),
    };
    serde_json::to_vec(&document).map_err(|source| Error::PayloadNotSerializable { source })
}

/// Read back a message content written by [`encode`].
pub fn decode(bytes: &[u8]) -> std::result::Result<DecodedEvent, DecodeError> {
    let document: WireEventIn<'_> = match serde_json::from_slice(bytes) {
        Ok(document) => document,
        Err(source) => {
            // A document of another version may fail on its fields; say which version it is.
            if let Ok(VersionOnly { v: Some(version) }) = serde_json::from_slice(bytes)
                && version != FORMAT_VERSION
            {
                return Err(DecodeError::UnsupportedVersion { version });
            }
            return Err(DecodeError::Json { source });
        }
    };
    if document.v != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            version: document.v,
        });
    }
    for (field, value) in [
        ("aggregate_type", &document.aggregate_type),
        ("aggregate_id", &document.aggregate_id),
        ("event_type", &document.event_type),
        ("partition_key", &document.partition_key),
    ] {
        if value.is_empty() {
            return Err(DecodeError::EmptyField { field });
        }
    }
    Ok(DecodedEvent {
        event_id: document.event_id,
        aggregate_type: document.aggregate_type,
        aggregate_id: document.aggregate_id,
        event_type: document.event_type,
        partition_key: document.partition_key,
        destination: document.destination,
        payload: document.payload.get().as_bytes().to_vec(),
        headers: document.headers,
        created_at: document.created_at,
    })
}

/// An event read back from a WAL message by [`decode`].
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedEvent {
    /// The event's unique id.
    pub event_id: EventId,
    /// Type of the aggregate, e.g. `order`.
    pub aggregate_type: String,
    /// Id of the aggregate.
    pub aggregate_id: String,
    /// What happened, e.g. `order.placed`.
    pub event_type: String,
    /// Key whose events are delivered in commit order.
    pub partition_key: String,
    /// Route override (exchange or topic), if the writer set one.
    pub destination: Option<String>,
    /// The JSON payload as UTF-8 bytes, exactly as encoded.
    pub payload: Vec<u8>,
    /// The writer's headers (including `traceparent` when captured).
    pub headers: Headers,
    /// When the event happened (the writer's time).
    pub created_at: DateTime<Utc>,
}

/// Why a WAL message could not be read as an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The content is not the JSON document of [`encode`].
    #[error("WAL message is not a valid outbox event document: {source}")]
    Json {
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The document has a version this build does not read.
    #[error(
        "WAL message has format version {version}, this relay reads version {FORMAT_VERSION}: upgrade the relay before the writers"
    )]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// A required text field is empty.
    #[error("WAL message has an empty {field}")]
    EmptyField {
        /// The empty field.
        field: &'static str,
    },
}

#[derive(Serialize)]
struct WireEventOut<'a> {
    v: u32,
    event_id: EventId,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    event_type: &'a str,
    partition_key: &'a str,
    destination: Option<&'a str>,
    payload: &'a serde_json::Value,
    headers: &'a Headers,
    created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct WireEventIn<'a> {
    v: u32,
    event_id: EventId,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    partition_key: String,
    #[serde(default)]
    destination: Option<String>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    headers: Headers,
    created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: Option<u32>,
}

fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Err(Error::EmptyField { field: "prefix" });
    }
    if prefix.contains('\0') {
        return Err(Error::NulCharacter {
            field: "prefix".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn full_event() -> Event {
        Event::builder("order", "o-42", "order.placed")
            .payload(&serde_json::json!({
                "total_cents": 1999,
                "lines": [{"sku": "A-1", "qty": 2}],
                "note": "quote \" and unicode é ✓",
                "gift": null
            }))
            .header("schema-version", "2")
            .header("tenant.id", "acme")
            .partition_key("customer:7")
            .destination("orders-exchange")
            .created_at(
                Utc.with_ymd_and_hms(2026, 11, 23, 10, 30, 15).unwrap()
                    + chrono::TimeDelta::microseconds(123_456),
            )
            .without_trace_context()
            .build()
            .unwrap()
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let event = full_event();
        let decoded = decode(&encode(&event).unwrap()).unwrap();
        assert_eq!(decoded.event_id, event.id());
        assert_eq!(decoded.aggregate_type, "order");
        assert_eq!(decoded.aggregate_id, "o-42");
        assert_eq!(decoded.event_type, "order.placed");
        assert_eq!(decoded.partition_key, "customer:7");
        assert_eq!(decoded.destination.as_deref(), Some("orders-exchange"));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&decoded.payload).unwrap(),
            *event.payload()
        );
        assert_eq!(decoded.headers, *event.headers());
        assert_eq!(decoded.created_at, event.created_at());
    }

    #[test]
    fn round_trip_of_a_minimal_event() {
        let event = Event::builder("a", "b", "c")
            .without_trace_context()
            .build()
            .unwrap();
        let decoded = decode(&encode(&event).unwrap()).unwrap();
        assert_eq!(decoded.partition_key, "a:b");
        assert_eq!(decoded.destination, None);
        assert_eq!(decoded.payload, b"null");
        assert!(decoded.headers.is_empty());
        assert_eq!(decoded.created_at, event.created_at());
    }

    #[test]
    fn encoding_is_a_versioned_json_document() {
        let value: serde_json::Value =
            serde_json::from_slice(&encode(&full_event()).unwrap()).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["aggregate_type"], "order");
        assert_eq!(value["headers"]["tenant.id"], "acme");
        assert_eq!(value["created_at"], "2026-11-23T10:30:15.123456Z");
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let v2 = br#"{"v":2,"something":"else"}"#;
        assert!(matches!(
            decode(v2),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        ));
        let mut doc: serde_json::Value =
            serde_json::from_slice(&encode(&full_event()).unwrap()).unwrap();
        doc["v"] = 3.into();
        assert!(matches!(
            decode(&serde_json::to_vec(&doc).unwrap()),
            Err(DecodeError::UnsupportedVersion { version: 3 })
        ));
        assert!(matches!(decode(b"not json"), Err(DecodeError::Json { .. })));
        assert!(matches!(
            decode(br#"{"v":1,"event_id":"x"}"#),
            Err(DecodeError::Json { .. })
        ));
        doc["v"] = 1.into();
        doc["event_type"] = "".into();
        assert!(matches!(
            decode(&serde_json::to_vec(&doc).unwrap()),
            Err(DecodeError::EmptyField {
                field: "event_type"
            })
        ));
    }

    #[test]
    fn bad_prefix_is_refused_before_sql() {
        assert!(matches!(
            check_prefix(""),
            Err(Error::EmptyField { field: "prefix" })
        ));
        assert!(matches!(
            check_prefix("a\0b"),
            Err(Error::NulCharacter { .. })
        ));
        assert!(check_prefix(DEFAULT_PREFIX).is_ok());
    }
}
