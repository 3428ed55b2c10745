//! An outbox row as the relay reads it (a polling claim, the WAL source's table
//! drain) and the event it becomes.

use chrono::{DateTime, Utc};
use outbox_core::{EventId, Headers};

use crate::error::Result;
use crate::event::OutboxEvent;

/// An event with the partition it was claimed from.
#[derive(Clone, Debug)]
pub struct ClaimedEvent {
    /// The event.
    pub event: OutboxEvent,
    /// Its work partition.
    pub partition: u32,
    /// Why the row cannot become an event (e.g. `created_at` is `infinity`), if it
    /// cannot: such a row is dead-lettered as it is, without a publish attempt.
    pub undecodable: Option<String>,
}

/// The `created_at` columns of a claim: the value where the relay can represent
/// it (finite, before year 262143), else null, plus the raw text for the error.
/// Decoding `infinity` as a timestamp would panic the driver.
pub(crate) const CREATED_AT_COLUMNS: &str = "case when isfinite(o.created_at) \
       and o.created_at < '262143-01-01 00:00:00+00'::timestamptz then o.created_at end as created_at, \
     o.created_at::text as created_at_text";

/// The dead-letter reason of a row whose `created_at` (its text `raw`) no event can carry.
pub(crate) fn unpublishable_created_at(raw: &str) -> String {
    format!(
        "created_at is '{raw}', which is not a time the relay can publish (infinite, or \
         beyond year 262142), so the row can never be sent as it is; set a real \
         created_at on it (outbox_core's writer always does), then \
         `outbox-relay dead-letters retry`"
    )
}

/// The `headers` column as event headers. Rows written by other writers (SQL,
/// other languages) may carry non-string header values: they are carried as
/// their JSON text rather than dropping or failing the event; headers that are
/// not an object are none. Shared by the polling claim, the table drain and the
/// WAL stream, so every source sees the same headers.
pub(crate) fn headers_from_json(value: serde_json::Value) -> Headers {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => Headers::new(),
    }
}

/// An outbox row as the claim query (and the WAL source's table drain) selects it.
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimRow {
    sequence: i64,
    event_id: uuid::Uuid,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    partition_key: String,
    destination: Option<String>,
    payload: String,
    headers: serde_json::Value,
    /// Null where the row's value cannot be represented (see [`CREATED_AT_COLUMNS`]).
    created_at: Option<DateTime<Utc>>,
    created_at_text: String,
    attempts: i32,
    partition: i64,
}

impl ClaimRow {
    /// The row's outbox sequence.
    pub(crate) fn sequence(&self) -> i64 {
        self.sequence
    }

    pub(crate) fn into_claimed(self) -> Result<ClaimedEvent> {
        let headers = headers_from_json(self.headers);
        let undecodable = match self.created_at {
            Some(_) => None,
            None => Some(unpublishable_created_at(&self.created_at_text)),
        };
        Ok(ClaimedEvent {
            partition: u32::try_from(self.partition).unwrap_or_default(),
            undecodable,
            event: OutboxEvent {
                sequence: self.sequence,
                event_id: EventId::from_uuid(self.event_id),
                aggregate_type: self.aggregate_type,
                aggregate_id: self.aggregate_id,
                event_type: self.event_type,
                partition_key: self.partition_key,
                destination: self.destination,
                payload: self.payload.into_bytes(),
                headers,
                // Never published when undecodable; any value will do.
                created_at: self.created_at.unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                attempts: self.attempts,
            },
        })
    }
}
