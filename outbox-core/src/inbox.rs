//! Consumer-side deduplication: exactly-once *effects* over at-least-once delivery.
//!
//! Brokers deliver some messages more than once. [`Inbox::process`] records
//! `(consumer, message_id)` and runs the handler in **one** transaction: the
//! insert uses `on conflict do nothing`, so of several concurrent deliveries of
//! one message exactly one inserts the row and runs the handler; the others wait
//! for it to commit and then see a [`Processed::Duplicate`]. If the handler fails,
//! the transaction rolls back, the id is not recorded, and a redelivery runs it again.
//!
//! Only effects written through the handler's connection are exactly-once.
//! Calls to other systems made inside the handler can repeat.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::schema::SchemaName;

/// Longest consumer name or message id, in bytes.
pub const MAX_INBOX_KEY_BYTES: usize = 255;

/// What [`Inbox::process`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Processed<T> {
    /// First delivery: the handler ran and its effects committed with the inbox row.
    Handled(T),
    /// The message was processed before; the handler did not run.
    Duplicate,
}

impl<T> Processed<T> {
    /// True when the message had been processed before.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Processed::Duplicate)
    }
}

/// The processed-message record of one schema.
#[derive(Clone, Debug)]
pub struct Inbox {
    schema: SchemaName,
    record_sql: String,
    record_many_sql: String,
    forget_sql: String,
    purge_sql: String,
    count_sql: String,
}

/// Ids deleted per statement by [`Inbox::purge`].
pub const PURGE_BATCH: i64 = 1_000;

impl Inbox {
    /// An inbox whose table lives in `schema`.
    pub fn new(schema: SchemaName) -> Self {
        let table = schema.qualify("inbox");
        Inbox {
            record_sql: format!(
                "insert into {table} (consumer, message_id) values ($1, $2) on conflict do nothing"
            ),
            // Sorted, so concurrent batches of overlapping ids take the rows' locks in
            // one order and never deadlock on each other.
            record_many_sql: format!(
                "insert into {table} (consumer, message_id) \
                 select $1, id from (select distinct unnest($2::text[]) as id) ids order by id \
                 on conflict do nothing returning message_id"
            ),
            forget_sql: format!(
                "delete from {table} where consumer = $1 and message_id = any($2::text[])"
            ),
            // One small batch per statement: a purge never holds many row locks or
            // one long transaction, and skips rows a consumer is writing right now.
            purge_sql: format!(
                "delete from {table} where ctid = any(array(select ctid from {table} \
                 where received_at < now() - make_interval(secs => $1) limit $2 for update skip locked))"
            ),
            count_sql: format!(
                "select count(*) from {table} where received_at < now() - make_interval(secs => $1)"
            ),
            schema,
        }
    }

    /// Process a message once per `consumer`: record its id and run `handler` in one transaction.
    ///
    /// `message_id` is the broker message's id (the relay sets the event id). A
    /// missing or empty id is refused with [`Error::MissingMessageId`] before
    /// anything runs: deduplicating on an empty id would drop unrelated messages.
    ///
    /// ```no_run
    /// # async fn example(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
    /// use outbox_core::{Inbox, Processed};
    /// let inbox = Inbox::new(Default::default());
    /// let outcome = inbox
    ///     .process(&pool, "billing", Some("0190b3c4-..."), async |conn: &mut sqlx::PgConnection| {
    ///         sqlx::query("update accounts set balance = balance + 10 where id = 1")
    ///             .execute(conn)
    ///             .await
    ///             .map_err(|e| outbox_core::Error::Database { operation: "crediting", source: e })?;
    ///         Ok::<_, outbox_core::Error>(())
    ///     })
    ///     .await?;
    /// if outcome.is_duplicate() { /* ack the delivery, nothing else to do */ }
    /// # Ok(()) }
    /// ```
    pub async fn process<T, E, F>(
        &self,
        pool: &PgPool,
        consumer: &str,
        message_id: Option<&str>,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
        E: From<Error>,
    {
        let message_id = check_keys(consumer, message_id)?;
        let mut tx = pool
            .begin()
            .await
            .map_err(Error::database("beginning the inbox transaction"))?;
        if !self.record_checked(&mut tx, consumer, message_id).await? {
            // Nothing was written; dropping the transaction rolls it back.
            return Ok(Processed::Duplicate);
        }
        let value = handler(&mut tx).await?;
        tx.commit()
            .await
            .map_err(Error::database("committing the inbox transaction"))?;
        Ok(Processed::Handled(value))
    }

    /// Record `message_id` in the caller's own transaction; true if this is its first time.
    ///
    /// For callers that manage the transaction themselves: run the effects only
    /// when this returns true, and commit both together.
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_id: Option<&str>,
    ) -> Result<bool> {
        let message_id = check_keys(consumer, message_id)?;
        self.record_checked(conn, consumer, message_id).await
    }

    /// Record several ids in the caller's transaction with one statement; returns
    /// those recorded for the first time (each once, however often it was given).
    ///
    /// Every id must have passed [`check_message_id`]. An id another transaction has
    /// recorded but not yet committed makes this wait for that transaction, as
    /// [`Inbox::record`] does.
    #[cfg_attr(not(any(feature = "lapin", feature = "rdkafka")), allow(dead_code))]
    pub(crate) async fn record_many(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_ids: &[&str],
    ) -> Result<std::collections::HashSet<String>> {
        check_key("consumer", consumer)?;
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(self.record_many_sql.as_str()))
            .bind(consumer)
            .bind(message_ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(|source| self.record_error(source))?;
        Ok(rows.into_iter().collect())
    }

    /// Remove ids this transaction recorded but did not process, before it commits.
    #[cfg_attr(not(any(feature = "lapin", feature = "rdkafka")), allow(dead_code))]
    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_ids: &[&str],
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.forget_sql.as_str()))
            .bind(consumer)
            .bind(message_ids)
            .execute(&mut *conn)
            .await
            .map_err(Error::database("removing unprocessed ids from the inbox"))?;
        Ok(())
    }

    fn record_error(&self, source: sqlx::Error) -> Error {
        match source.as_database_error().and_then(|e| e.code()) {
            Some(code) if code == "42P01" || code == "3F000" => Error::SchemaMissing {
                schema: self.schema.to_string(),
            },
            _ => Error::Database {
                operation: "recording the message id in the inbox",
                source,
            },
        }
    }

    async fn record_checked(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool> {
        let inserted = sqlx::query(AssertSqlSafe(self.record_sql.as_str()))
            .bind(consumer)
            .bind(message_id)
            .execute(&mut *conn)
            .await
            .map_err(|source| self.record_error(source))?
            .rows_affected();
        Ok(inserted == 1)
    }

    /// Forget ids older than the policy's retention window, in batches of
    /// [`PURGE_BATCH`] (each its own short statement); returns how many were deleted.
    pub async fn purge(&self, pool: &PgPool, policy: &InboxRetention) -> Result<u64> {
        let mut total = 0;
        loop {
            let deleted = self.purge_batch(pool, policy, PURGE_BATCH).await?;
            total += deleted;
            if deleted < PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Delete at most `limit` ids older than the retention window; returns how many.
    pub async fn purge_batch(
        &self,
        pool: &PgPool,
        policy: &InboxRetention,
        limit: i64,
    ) -> Result<u64> {
        let deleted = sqlx::query(AssertSqlSafe(self.purge_sql.as_str()))
            .bind(policy.retention.as_secs_f64())
            .bind(limit)
            .execute(pool)
            .await
            .map_err(Error::database("purging old inbox ids"))?
            .rows_affected();
        Ok(deleted)
    }

    /// How many ids [`Inbox::purge`] would delete now.
    pub async fn count_purgeable(&self, pool: &PgPool, policy: &InboxRetention) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(self.count_sql.as_str()))
            .bind(policy.retention.as_secs_f64())
            .fetch_one(pool)
            .await
            .map_err(Error::database("counting old inbox ids"))?;
        Ok(u64::try_from(count).unwrap_or_default())
    }
}

/// How long processed ids are kept. The window is the dedup horizon: a
/// duplicate that arrives after its id was purged runs the handler again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxRetention {
    retention: Duration,
}

impl InboxRetention {
    /// Keep ids for `retention`, which must be at least `longest_redelivery`,
    /// the longest time after which the broker may still redeliver a message
    /// (e.g. the relay's lease plus the broker's retention of unacked messages).
    pub fn new(retention: Duration, longest_redelivery: Duration) -> Result<Self> {
        if retention < longest_redelivery {
            return Err(Error::RetentionTooShort {
                retention_secs: retention.as_secs(),
                redelivery_secs: longest_redelivery.as_secs(),
            });
        }
        Ok(InboxRetention { retention })
    }

    /// The retention window.
    pub fn retention(&self) -> Duration {
        self.retention
    }
}

fn check_keys<'a>(consumer: &str, message_id: Option<&'a str>) -> Result<&'a str> {
    check_key("consumer", consumer)?;
    let message_id = match message_id {
        Some(id) if !id.is_empty() => id,
        _ => return Err(Error::MissingMessageId),
    };
    check_key("message_id", message_id)?;
    Ok(message_id)
}

/// Refuse a message id the inbox cannot record (missing, empty, too long, NUL).
#[cfg_attr(not(any(feature = "lapin", feature = "rdkafka")), allow(dead_code))]
pub(crate) fn check_message_id(message_id: &str) -> Result<()> {
    check_keys("-", Some(message_id)).map(|_| ())
}

fn check_key(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::EmptyField { field });
    }
    if value.len() > MAX_INBOX_KEY_BYTES {
        return Err(Error::FieldTooLong {
            field,
            len: value.len(),
            max: MAX_INBOX_KEY_BYTES,
        });
    }
    if value.contains('\0') {
        return Err(Error::NulCharacter {
            field: field.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_ids_are_refused() {
        assert!(matches!(
            check_keys("c", None),
            Err(Error::MissingMessageId)
        ));
        assert!(matches!(
            check_keys("c", Some("")),
            Err(Error::MissingMessageId)
        ));
        assert!(matches!(
            check_keys("", Some("id")),
            Err(Error::EmptyField { field: "consumer" })
        ));
        assert!(check_keys("c", Some("id")).is_ok());
    }

    #[test]
    fn retention_shorter_than_redelivery_is_refused() {
        let hour = Duration::from_secs(3600);
        assert!(InboxRetention::new(hour, hour * 2).is_err());
        assert!(InboxRetention::new(hour * 2, hour).is_ok());
    }
}
