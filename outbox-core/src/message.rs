//! The event model: [`Event`], its builder, [`EventId`] and [`Headers`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Longest aggregate type, event type or destination, in bytes (AMQP short strings hold 255).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest aggregate id or partition key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest header name, in bytes (AMQP field-table keys hold 255).
pub const MAX_HEADER_NAME_BYTES: usize = 255;
/// Longest header value, in bytes. RabbitMQ carries every header in one frame
/// (`frame_max`, 128 KiB by default) and closes the connection over it.
pub const MAX_HEADER_VALUE_BYTES: usize = 16 * 1024;
/// Most bytes of all header names and values of one event together, leaving room
/// in RabbitMQ's 128 KiB frame for the headers and properties the relay adds.
pub const MAX_HEADERS_TOTAL_BYTES: usize = 64 * 1024;
/// Header names starting with this prefix (any case) are set by the relay on the wire.
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";
/// Name of the W3C trace-context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Unique id of an event: a UUID v7, so ids sort by creation time.
///
/// Consumers deduplicate on it: the relay sends it as the RabbitMQ `message_id`
/// and as a Kafka header.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// A new time-ordered id (UUID v7).
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }

    /// Wrap an existing UUID, e.g. one read back from the outbox table.
    pub fn from_uuid(uuid: Uuid) -> Self {
        EventId(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EventId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Uuid::parse_str(s).map(EventId)
    }
}

/// String headers carried with an event, sorted by name.
pub type Headers = BTreeMap<String, String>;

/// A fact that happened to an aggregate, ready to be written to the outbox.
///
/// Built with [`Event::builder`]; a built event has passed every check that does
/// not depend on configuration (the payload size limit is checked by the writer).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    id: EventId,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: serde_json::Value,
    payload_bytes: usize,
    headers: Headers,
    partition_key: String,
    destination: Option<String>,
    created_at: DateTime<Utc>,
}

impl Event {
    /// Start building an event of `event_type` about the aggregate `aggregate_type`/`aggregate_id`.
    ///
    /// ```
    /// use outbox_core::Event;
    /// let event = Event::builder("order", "o-42", "order.placed")
    ///     .payload(&serde_json::json!({"total_cents": 1999}))
    ///     .header("schema-version", "1")
    ///     .build()?;
    /// assert_eq!(event.partition_key(), "order:o-42");
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    pub fn builder(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            id: None,
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: Ok(serde_json::Value::Null),
            headers: Headers::new(),
            partition_key: None,
            destination: None,
            created_at: None,
            capture_trace_context: true,
        }
    }

    /// The event's unique id.
    pub fn id(&self) -> EventId {
        self.id
    }
    /// Type of the aggregate the event is about, e.g. `order`.
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    /// Id of the aggregate the event is about.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    /// What happened, e.g. `order.placed`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The JSON payload.
    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }
    /// Size of the payload serialized as JSON, in bytes.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }
    /// String headers, including `traceparent` when a trace context was captured.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// Key whose events are delivered in commit order: the override, or
    /// `"{aggregate_type}:{aggregate_id}"`.
    pub fn partition_key(&self) -> &str {
        &self.partition_key
    }
    /// Route override (exchange or topic) instead of the relay's configured template.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }
    /// When the event happened (microsecond precision, as PostgreSQL stores it).
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
}

/// Builder for [`Event`]; see [`Event::builder`].
#[derive(Debug)]
#[must_use = "an EventBuilder does nothing until build() is called"]
pub struct EventBuilder {
    id: Option<EventId>,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: std::result::Result<serde_json::Value, serde_json::Error>,
    headers: Headers,
    partition_key: Option<String>,
    destination: Option<String>,
    created_at: Option<DateTime<Utc>>,
    capture_trace_context: bool,
}

impl EventBuilder {
    /// Use this id instead of a fresh UUID v7 (for example to make a retried command idempotent).
    pub fn id(mut self, id: EventId) -> Self {
        self.id = Some(id);
        self
    }

    /// The payload, from any `Serialize` value; stored as jsonb. Defaults to JSON `null`.
    pub fn payload<T: Serialize + ?Sized>(mut self, payload: &T) -> Self {
        self.payload = serde_json::to_value(payload);
        self
    }

    /// Add or replace one header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Add or replace several headers.
    pub fn headers<K, V>(mut self, headers: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.headers
            .extend(headers.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Order this event with others of the same key instead of the default
    /// `"{aggregate_type}:{aggregate_id}"`.
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Send this event to this exchange or topic instead of the relay's configured route.
    pub fn destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// When the event happened; defaults to now. Truncated to microseconds.
    pub fn created_at(mut self, at: DateTime<Utc>) -> Self {
        self.created_at = Some(at);
        self
    }

    /// Do not copy the current span's trace context into a `traceparent` header.
    pub fn without_trace_context(mut self) -> Self {
        self.capture_trace_context = false;
        self
    }

    /// Check every field and build the event.
    pub fn build(self) -> Result<Event> {
        let payload = self
            .payload
            .map_err(|source| Error::PayloadNotSerializable { source })?;
        check_text("aggregate_type", &self.aggregate_type, MAX_NAME_BYTES)?;
        check_text("aggregate_id", &self.aggregate_id, MAX_KEY_BYTES)?;
        check_text("event_type", &self.event_type, MAX_NAME_BYTES)?;
        if let Some(key) = &self.partition_key {
            check_text("partition_key", key, MAX_KEY_BYTES)?;
        }
        if let Some(destination) = &self.destination {
            check_text("destination", destination, MAX_NAME_BYTES)?;
        }
        let mut headers = self.headers;
        let mut total = 0_usize;
        for (name, value) in &headers {
            check_header(name, value)?;
            total = total.saturating_add(name.len() + value.len());
        }
        if total > MAX_HEADERS_TOTAL_BYTES {
            return Err(Error::HeadersTooLarge {
                total,
                max: MAX_HEADERS_TOTAL_BYTES,
            });
        }
        check_json_nul(&payload, &mut String::from("payload"))?;
        if self.capture_trace_context
            && !headers.contains_key(TRACEPARENT_HEADER)
            && let Some(traceparent) = crate::trace::current_traceparent()
        {
            headers.insert(TRACEPARENT_HEADER.to_owned(), traceparent);
        }
        let payload_bytes = json_len(&payload);
        let partition_key = self
            .partition_key
            .unwrap_or_else(|| format!("{}:{}", self.aggregate_type, self.aggregate_id));
        Ok(Event {
            id: self.id.unwrap_or_default(),
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            payload,
            payload_bytes,
            headers,
            partition_key,
            destination: self.destination,
            created_at: truncate_to_micros(self.created_at.unwrap_or_else(Utc::now)),
        })
    }
}

fn truncate_to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(at)
}

fn json_len(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value to an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::EmptyField { field });
    }
    if value.len() > max {
        return Err(Error::FieldTooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if value.contains('\0') {
        return Err(Error::NulCharacter {
            field: field.to_owned(),
        });
    }
    Ok(())
}

/// Header names must survive both brokers and HTTP-style tooling: 1 to 255
/// bytes of ASCII letters, digits, `-`, `_` and `.`, not the relay's reserved prefix.
fn check_header(name: &str, value: &str) -> Result<()> {
    let refuse = |reason| {
        Err(Error::InvalidHeaderName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("header names must not be empty");
    }
    if name.len() > MAX_HEADER_NAME_BYTES {
        return refuse("header names are at most 255 bytes (AMQP short string)");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return refuse("use only ASCII letters, digits, '-', '_' and '.'");
    }
    if name.len() >= RESERVED_HEADER_PREFIX.len()
        && name[..RESERVED_HEADER_PREFIX.len()].eq_ignore_ascii_case(RESERVED_HEADER_PREFIX)
    {
        return refuse("the 'outbox-' prefix is reserved for headers the relay sets; rename it");
    }
    if value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(Error::HeaderValueTooLong {
            name: name.to_owned(),
            len: value.len(),
            max: MAX_HEADER_VALUE_BYTES,
        });
    }
    if value.contains('\0') {
        return Err(Error::InvalidHeaderValue {
            name: name.to_owned(),
            reason: "contains a NUL character, which PostgreSQL cannot store",
        });
    }
    Ok(())
}

/// jsonb refuses `\u0000` anywhere; find it before PostgreSQL does, with its path.
fn check_json_nul(value: &serde_json::Value, path: &mut String) -> Result<()> {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Err(Error::NulCharacter {
            field: path.clone(),
        }),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_json_nul(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                if key.contains('\0') {
                    return Err(Error::NulCharacter {
                        field: path.clone(),
                    });
                }
                check_json_nul(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_partition_key_is_aggregate_type_and_id() {
        let event = Event::builder("order", "7", "placed").build().unwrap();
        assert_eq!(event.partition_key(), "order:7");
    }

    #[test]
    fn header_names_are_checked() {
        for bad in ["", "has space", "ünï", "outbox-event-id", "OUTBOX-x", "a:b"] {
            let err = Event::builder("a", "b", "c")
                .header(bad, "v")
                .build()
                .unwrap_err();
            assert!(
                matches!(err, Error::InvalidHeaderName { .. }),
                "{bad:?}: {err}"
            );
        }
        let long = "h".repeat(256);
        assert!(
            Event::builder("a", "b", "c")
                .header(long, "v")
                .build()
                .is_err()
        );
        assert!(
            Event::builder("a", "b", "c")
                .header("x-tenant.id_1", "v")
                .build()
                .is_ok()
        );
    }

    #[test]
    fn header_values_and_total_header_bytes_are_limited_with_errors_naming_the_limit() {
        let long = "v".repeat(MAX_HEADER_VALUE_BYTES + 1);
        let err = Event::builder("a", "b", "c")
            .header("big", long)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, Error::HeaderValueTooLong { ref name, len, max }
                if name == "big" && len == MAX_HEADER_VALUE_BYTES + 1 && max == MAX_HEADER_VALUE_BYTES),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("16384") && text.contains("payload"), "{text}");
        assert!(
            Event::builder("a", "b", "c")
                .header("big", "v".repeat(MAX_HEADER_VALUE_BYTES))
                .build()
                .is_ok(),
            "exactly the limit is fine"
        );
        let many: Vec<(String, String)> = (0..5)
            .map(|i| (format!("h{i}"), "v".repeat(MAX_HEADER_VALUE_BYTES - 10)))
            .collect();
        let err = Event::builder("a", "b", "c")
            .headers(many)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, Error::HeadersTooLarge { max, .. } if max == MAX_HEADERS_TOTAL_BYTES),
            "{err}"
        );
        assert!(err.to_string().contains("65536"), "{err}");
    }

    #[test]
    fn nul_in_payload_is_found_with_its_path() {
        let err = Event::builder("a", "b", "c")
            .payload(&serde_json::json!({"items": [{"name": "ok"}, {"name": "x\u{0}"}]}))
            .build()
            .unwrap_err();
        match err {
            Error::NulCharacter { field } => assert_eq!(field, "payload.items[1].name"),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn payload_size_is_the_serialized_length() {
        let value = serde_json::json!({"a": [1, 2, 3], "b": "é"});
        let event = Event::builder("a", "b", "c")
            .payload(&value)
            .build()
            .unwrap();
        assert_eq!(
            event.payload_bytes(),
            serde_json::to_vec(&value).unwrap().len()
        );
    }
}
