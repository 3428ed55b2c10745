//! What the WAL relay does with outbox table rows: delete the rows of
//! confirmed transactions, dead-letter poison events, and read the rows a new
//! slot cannot see (the table drain after the slot was created or lost).
//!
//! Order of settling: rows are deleted *before* the slot's position is
//! confirmed. So every event the broker has not confirmed still has its row
//! (table mode), and a lost slot can always be recovered from the table; a
//! crash between the delete and the confirm only re-sends events from the WAL.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};

use crate::config::DatabaseConfig;
use crate::error::{Result, db_call};
use crate::event::OutboxEvent;
use crate::source::row::{CREATED_AT_COLUMNS, ClaimRow};
use crate::source::wal::MalformedMessage;

/// Most bytes of a malformed WAL message's content kept in its dead letter
/// (base64 in `payload`); longer content is cut there, its full length recorded.
pub const MAX_KEPT_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// `aggregate_type` of the dead letter of a malformed WAL message.
pub const MALFORMED_MESSAGE_AGGREGATE_TYPE: &str = "outbox.wal-message";
/// `event_type` of the dead letter of a malformed WAL message.
pub const MALFORMED_MESSAGE_EVENT_TYPE: &str = "outbox.malformed-wal-message";

/// SQL on the outbox tables of one schema, for the WAL relay.
#[derive(Debug, Clone)]
pub struct WalRows {
    pool: PgPool,
    timeout: Duration,
    delete: String,
    dead_letter: String,
    high_water: String,
    page: String,
    dead_letter_row: String,
    dead_letter_streamed_row: String,
    dead_letter_message: String,
    record_rejection: String,
}

impl WalRows {
    /// Statements for `database`'s schema, run on `pool`.
    pub fn new(pool: PgPool, database: &DatabaseConfig) -> Self {
        let outbox = database.schema.qualify("outbox");
        let dead = database.schema.qualify("outbox_dead_letter");
        WalRows {
            pool,
            timeout: database.statement_timeout + Duration::from_secs(5),
            delete: format!(
                "delete from {outbox} where sequence = any($1::int8[]) returning sequence"
            ),
            dead_letter: format!(
                "with moved as (delete from {outbox} where sequence = $1 and $2) \
                 insert into {dead} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
                                     destination, payload, headers, created_at, attempts, last_error, \
                                     first_failed_at, last_failed_at) \
                 values ($1, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10, $11, $12, $13, now(), now()) \
                 on conflict (event_id) do update set attempts = excluded.attempts, \
                        last_error = excluded.last_error, last_failed_at = excluded.last_failed_at, \
                        dead_lettered_at = now()"
            ),
            high_water: format!("select coalesce(max(sequence), 0) from {outbox}"),
            // The attempt is counted on the row, so it survives a restart and shows in
            // `status`; `available_at` tells when the retry is due.
            record_rejection: format!(
                "update {outbox} set attempts = least(greatest(attempts, 0), 2147483646) + 1, \
                        last_error = $2, first_failed_at = coalesce(first_failed_at, now()), \
                        last_failed_at = now(), available_at = now() + make_interval(secs => $3) \
                 where sequence = $1 and published_at is null returning attempts"
            ),
            page: format!(
                "select o.sequence, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, o.partition_key, \
                        o.destination, o.payload::text as payload, o.headers, {CREATED_AT_COLUMNS}, o.attempts, \
                        0::int8 as partition \
                 from {outbox} o \
                 where o.sequence > $1 and o.sequence <= $2 and o.published_at is null \
                 order by o.sequence limit $3"
            ),
            // Moves the row itself, so the raw values (an infinite created_at) are kept.
            dead_letter_row: format!(
                "with moved as (delete from {outbox} where sequence = $1 returning *) \
                 insert into {dead} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
                                     destination, payload, headers, created_at, attempts, last_error, \
                                     first_failed_at, last_failed_at) \
                 select sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, \
                        payload, headers, created_at, least(greatest(attempts, 0), 2147483646) + 1, $2, coalesce(first_failed_at, now()), now() \
                 from moved \
                 on conflict (event_id) do update set attempts = excluded.attempts, \
                        last_error = excluded.last_error, last_failed_at = excluded.last_failed_at, \
                        dead_lettered_at = now()"
            ),
            // As `dead_letter_row`, for a row seen in the stream; says whether the row is
            // in the dead-letter table now (moved now, or by an earlier session).
            dead_letter_streamed_row: format!(
                "with moved as (delete from {outbox} where sequence = $1 returning *), \
                 inserted as ( \
                   insert into {dead} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
                                       destination, payload, headers, created_at, attempts, last_error, \
                                       first_failed_at, last_failed_at) \
                   select sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, \
                          payload, headers, created_at, least(greatest(attempts, 0), 2147483646) + 1, $2, \
                          coalesce(first_failed_at, now()), now() \
                   from moved \
                   on conflict (event_id) do update set attempts = excluded.attempts, \
                          last_error = excluded.last_error, last_failed_at = excluded.last_failed_at, \
                          dead_lettered_at = now() \
                   returning 1) \
                 select exists (select from inserted) or exists (select from {dead} where sequence = $1)"
            ),
            // A message seen again after a restart (moved, not yet confirmed) keeps its first
            // dead letter: the event id is made from the LSN.
            dead_letter_message: format!(
                "insert into {dead} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
                                     destination, payload, headers, created_at, attempts, last_error, \
                                     first_failed_at, last_failed_at) \
                 values ($1, $2, $3, $4, $5, $6, null, \
                         jsonb_build_object('wal_message', jsonb_build_object( \
                           'lsn', $4::text, 'prefix', $7::text, 'content_bytes', $8::int8, \
                           'truncated', $9::bool, 'content_base64', translate(encode($10::bytea, 'base64'), E'\\n', ''), \
                           'content_text', $11::text)), \
                         '{{}}'::jsonb, $12, 1, $13, now(), now()) \
                 on conflict do nothing"
            ),
        }
    }

    /// Count a broker rejection of row `sequence` on the row (attempts, last error,
    /// when the retry is due); returns the row's attempts now, or `None` when the
    /// row is gone (a wal-message event has none).
    pub async fn record_rejection(
        &self,
        sequence: i64,
        error: &str,
        retry_in: Duration,
    ) -> Result<Option<u32>> {
        let attempts: Option<i32> = db_call(
            "recording a rejected attempt",
            self.timeout,
            sqlx::query_scalar(AssertSqlSafe(self.record_rejection.as_str()))
                .bind(sequence)
                .bind(error)
                .bind(retry_in.as_secs_f64())
                .fetch_optional(&self.pool),
        )
        .await?;
        Ok(attempts.map(|a| u32::try_from(a).unwrap_or(u32::MAX)))
    }

    /// Move the streamed outbox row `sequence` that cannot become an event to the
    /// dead-letter table as it is, with `reason`. False when the row is in
    /// neither table (not visible yet, or deleted by someone): try again later.
    pub async fn dead_letter_streamed_row(&self, sequence: i64, reason: &str) -> Result<bool> {
        db_call(
            "dead-lettering an undecodable outbox row",
            self.timeout,
            sqlx::query_scalar(AssertSqlSafe(self.dead_letter_streamed_row.as_str()))
                .bind(sequence)
                .bind(reason)
                .fetch_one(&self.pool),
        )
        .await
    }

    /// Record a malformed WAL message in the dead-letter table: sequence = its
    /// LSN, a fixed `aggregate_type`/`event_type`
    /// ([`MALFORMED_MESSAGE_AGGREGATE_TYPE`], [`MALFORMED_MESSAGE_EVENT_TYPE`]),
    /// `aggregate_id` = the LSN, `created_at` = its commit time, the reason in
    /// `last_error`, and `payload = {"wal_message": {"lsn", "prefix",
    /// "content_bytes", "truncated", "content_base64", "content_text"}}`
    /// (`content_text` when the content is UTF-8 without NUL, else null; at most
    /// [`MAX_KEPT_MESSAGE_BYTES`] kept). Its event id is derived from the LSN, so
    /// seeing it again after a restart changes nothing: false then.
    pub async fn dead_letter_message(
        &self,
        message: &MalformedMessage,
        committed_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let sequence = message.lsn.to_i64().unwrap_or(i64::MAX);
        let kept = &message.content[..message.content.len().min(MAX_KEPT_MESSAGE_BYTES)];
        let text = std::str::from_utf8(kept)
            .ok()
            .filter(|text| !text.contains('\0'));
        let lsn = message.lsn.to_string();
        let inserted = db_call(
            "dead-lettering a malformed WAL message",
            self.timeout,
            sqlx::query(AssertSqlSafe(self.dead_letter_message.as_str()))
                .bind(sequence)
                .bind(malformed_message_id(message.lsn))
                .bind(MALFORMED_MESSAGE_AGGREGATE_TYPE)
                .bind(&lsn)
                .bind(MALFORMED_MESSAGE_EVENT_TYPE)
                .bind(format!("wal-message:{lsn}"))
                .bind(&message.prefix)
                .bind(i64::try_from(message.content.len()).unwrap_or(i64::MAX))
                .bind(kept.len() < message.content.len())
                .bind(kept)
                .bind(text)
                .bind(committed_at)
                .bind(&message.reason)
                .execute(&self.pool),
        )
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Delete the rows of confirmed events; returns the sequences deleted.
    ///
    /// A row can be missing for two reasons: it is gone already (dead-lettered,
    /// or deleted after the table drain), or its transaction's commit reached the
    /// WAL stream before it became visible to other sessions (a window of
    /// microseconds the relay can be faster than). The caller retries the missing
    /// ones for a while.
    pub async fn delete(&self, sequences: &[i64]) -> Result<Vec<i64>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        db_call(
            "deleting relayed outbox rows",
            self.timeout,
            sqlx::query_scalar(AssertSqlSafe(self.delete.as_str()))
                .bind(sequences)
                .fetch_all(&self.pool),
        )
        .await
    }

    /// Move `event` to the dead-letter table with its last error; its row, if it
    /// has one (`has_row`), is deleted in the same statement.
    pub async fn dead_letter(
        &self,
        event: &OutboxEvent,
        has_row: bool,
        attempts: u32,
        error: &str,
    ) -> Result<()> {
        let headers = serde_json::to_value(&event.headers).unwrap_or(serde_json::Value::Null);
        let payload = String::from_utf8_lossy(&event.payload);
        db_call(
            "dead-lettering an event",
            self.timeout,
            sqlx::query(AssertSqlSafe(self.dead_letter.as_str()))
                .bind(event.sequence)
                .bind(has_row)
                .bind(event.event_id.as_uuid())
                .bind(&event.aggregate_type)
                .bind(&event.aggregate_id)
                .bind(&event.event_type)
                .bind(&event.partition_key)
                .bind(&event.destination)
                .bind(payload.as_ref())
                .bind(headers)
                .bind(event.created_at)
                .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
                .bind(error)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// The highest sequence in the table now: after a slot was created, rows at
    /// or below it that are visible now committed before the slot's start.
    pub async fn high_water(&self) -> Result<i64> {
        db_call(
            "reading the outbox high-water mark",
            self.timeout,
            sqlx::query_scalar(AssertSqlSafe(self.high_water.as_str())).fetch_one(&self.pool),
        )
        .await
    }

    /// Up to `limit` rows with `after < sequence <= upto`, in sequence order.
    ///
    /// Rows that cannot become events (an infinite `created_at`) are moved to the
    /// dead-letter table here, with the reason; an empty result still means that
    /// no rows are left in the range.
    pub async fn page(&self, after: i64, upto: i64, limit: usize) -> Result<Vec<OutboxEvent>> {
        let mut after = after;
        loop {
            let rows: Vec<ClaimRow> = db_call(
                "reading outbox rows the slot cannot see",
                self.timeout,
                sqlx::query_as(AssertSqlSafe(self.page.as_str()))
                    .bind(after)
                    .bind(upto)
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(&self.pool),
            )
            .await?;
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let mut events = Vec::with_capacity(rows.len());
            for row in rows {
                let claimed = row.into_claimed()?;
                after = claimed.event.sequence;
                match claimed.undecodable {
                    None => events.push(claimed.event),
                    Some(reason) => {
                        db_call(
                            "dead-lettering an undecodable outbox row",
                            self.timeout,
                            sqlx::query(AssertSqlSafe(self.dead_letter_row.as_str()))
                                .bind(claimed.event.sequence)
                                .bind(&reason)
                                .execute(&self.pool),
                        )
                        .await?;
                        tracing::error!(
                            sequence = claimed.event.sequence,
                            event_id = %claimed.event.event_id,
                            error = %reason,
                            "undecodable outbox row dead-lettered; its key continues"
                        );
                    }
                }
            }
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    /// Drop the replication slot `slot` once no session streams from it, and the
    /// recorded position `position_row` with it (a new slot starts afresh).
    pub async fn drop_slot(
        &self,
        slot: &str,
        position_row: &str,
        leases_table: &str,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let dropped = db_call(
                "dropping the replication slot",
                self.timeout,
                sqlx::query_scalar::<_, i64>(
                    "select count(pg_drop_replication_slot(slot_name)) from pg_replication_slots \
                     where slot_name = $1 and active_pid is null",
                )
                .bind(slot)
                .fetch_one(&self.pool),
            )
            .await;
            let gone: bool = db_call(
                "checking the replication slot",
                self.timeout,
                sqlx::query_scalar(
                    "select not exists (select 1 from pg_replication_slots where slot_name = $1)",
                )
                .bind(slot)
                .fetch_one(&self.pool),
            )
            .await?;
            if gone {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                dropped?;
                return Err(crate::error::RelayError::DatabaseTimeout {
                    operation: "dropping the replication slot (a session still streams from it)",
                    timeout_ms: self.timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        db_call(
            "forgetting the slot's recorded position",
            self.timeout,
            sqlx::query(AssertSqlSafe(format!(
                "delete from {leases_table} where name = $1"
            )))
            .bind(position_row)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }
}

/// The dead letter's event id of the malformed WAL message at `lsn`: a UUID
/// version 8 of a fixed marker and the LSN, the same every time it is seen.
pub fn malformed_message_id(lsn: crate::source::wal::Lsn) -> uuid::Uuid {
    let mut bytes = [0_u8; 16];
    bytes[..8].copy_from_slice(b"outboxwm");
    bytes[8..].copy_from_slice(&lsn.as_u64().to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::wal::Lsn;

    #[test]
    fn a_malformed_message_has_the_same_event_id_every_time_and_one_per_position() {
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(malformed_message_id(lsn), malformed_message_id(lsn));
        assert_ne!(
            malformed_message_id(lsn),
            malformed_message_id(Lsn(lsn.0 + 1))
        );
        assert_eq!(
            malformed_message_id(lsn).get_version(),
            Some(uuid::Version::Custom)
        );
    }
}
