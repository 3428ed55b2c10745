//! An event as a Kafka record: key, headers, payload, and its size.

use super::*;

/// The headers and sizes of one record.
pub(super) struct Record<'a> {
    pub(super) headers: Vec<(&'a str, Cow<'a, str>)>,
    /// key + payload + header names and values, in bytes.
    pub(super) size: usize,
    pub(super) key_bytes: usize,
    pub(super) payload_bytes: usize,
    pub(super) header_bytes: usize,
}

/// The headers of one event (writer headers, then the wire headers) and its size.
pub(super) fn record_of<'a>(event: &'a OutboxEvent, route: &Route) -> Record<'a> {
    const WIRE: [&str; 7] = [
        wire::EVENT_ID,
        wire::EVENT_TYPE,
        wire::AGGREGATE_TYPE,
        wire::AGGREGATE_ID,
        wire::PARTITION_KEY,
        wire::CREATED_AT,
        wire::SEQUENCE,
    ];
    let mut headers: Vec<(&str, Cow<'_, str>)> = event
        .headers
        .iter()
        // Kafka headers may repeat a name; the wire headers are the only ones of their names.
        .filter(|(name, _)| !WIRE.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str(), Cow::Borrowed(value.as_str())))
        .collect();
    headers.extend([
        (wire::EVENT_ID, Cow::Owned(event.event_id.to_string())),
        (wire::EVENT_TYPE, Cow::Borrowed(event.event_type.as_str())),
        (
            wire::AGGREGATE_TYPE,
            Cow::Borrowed(event.aggregate_type.as_str()),
        ),
        (
            wire::AGGREGATE_ID,
            Cow::Borrowed(event.aggregate_id.as_str()),
        ),
        (
            wire::PARTITION_KEY,
            Cow::Borrowed(event.partition_key.as_str()),
        ),
        (
            wire::CREATED_AT,
            Cow::Owned(
                event
                    .created_at
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ),
        (wire::SEQUENCE, Cow::Owned(event.sequence.to_string())),
    ]);
    let header_bytes = headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum::<usize>();
    let key_bytes = route.key.len();
    let payload_bytes = event.payload.len();
    Record {
        headers,
        size: key_bytes + payload_bytes + header_bytes,
        key_bytes,
        payload_bytes,
        header_bytes,
    }
}
