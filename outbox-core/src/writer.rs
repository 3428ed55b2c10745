//! Writing events into the outbox inside the caller's transaction.
//!
//! # Per-key order
//!
//! A polling relay publishes rows in `sequence` order. The sequence is taken when
//! the row is inserted, not when its transaction commits, so two transactions
//! that enqueue for the same key could commit in the opposite order of their
//! sequences. Per key, sequence order equals commit order when the second
//! transaction cannot insert before the first has committed. Two ways give that:
//!
//! * [`KeyOrdering::CallerLocksAggregate`] (default, free): the usual pattern.
//!   The transaction updates or locks (`select … for update`) the aggregate's
//!   row *before* it enqueues, so writers of one aggregate are serialized by
//!   that row lock. Enqueue after the business write, not before it.
//! * [`KeyOrdering::AdvisoryLock`]: the writer takes a transaction-scoped
//!   advisory lock per partition key (in hash order, so one `enqueue_all` call
//!   cannot deadlock with another) before inserting. Use it when events are
//!   keyed by something no row lock covers. It costs one extra round trip per
//!   call, and a transaction that enqueues for keys A then B in separate calls
//!   while another does B then A can deadlock; PostgreSQL aborts one of them,
//!   which loses nothing (the aborted transaction wrote nothing) but must be retried.
//!
//! The WAL source sees commit order directly and needs neither.

use sqlx::postgres::PgDatabaseError;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::error::{Error, Result};
use crate::message::{Event, EventId};
use crate::schema::SchemaName;

/// Default largest payload accepted, in bytes (Kafka's default message limit is 1 MiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// How the writer makes per-key sequence order equal commit order; see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyOrdering {
    /// The caller's transaction locks or updates the aggregate's row before enqueueing.
    #[default]
    CallerLocksAggregate,
    /// The writer takes a transaction-scoped advisory lock per partition key.
    AdvisoryLock,
}

/// Settings of an [`Outbox`] writer.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// Schema holding the outbox tables (default `outbox`).
    pub schema: SchemaName,
    /// Largest serialized payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// How per-key order is kept; see the module docs.
    pub key_ordering: KeyOrdering,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            schema: SchemaName::default(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            key_ordering: KeyOrdering::default(),
        }
    }
}

/// Where an event landed in the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// The event's id.
    pub event_id: EventId,
    /// Its position in the outbox; relays publish each key's events in this order.
    pub sequence: i64,
}

/// Writes events into the outbox table of one schema.
///
/// Cheap to clone; build it once and share it.
#[derive(Clone, Debug)]
pub struct Outbox {
    config: OutboxConfig,
    insert_one_sql: String,
    insert_many_sql: String,
    lock_keys_sql: String,
}

const COLUMNS: &str = "event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, payload, headers, created_at";

impl Outbox {
    /// A writer for the given configuration.
    pub fn new(config: OutboxConfig) -> Self {
        let table = config.schema.qualify("outbox");
        let insert_one_sql = format!(
            "insert into {table} ({COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning sequence"
        );
        let insert_many_sql = format!(
            "insert into {table} ({COLUMNS}) \
             select {COLUMNS} from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                          $6::text[], $7::jsonb[], $8::jsonb[], $9::timestamptz[]) \
               with ordinality as e({COLUMNS}, ord) \
             order by ord \
             returning event_id, sequence"
        );
        let lock_keys_sql = "select pg_advisory_xact_lock(hashtext($1), h) \
             from (select distinct hashtext(k) as h from unnest($2::text[]) as k order by h) as keys"
            .to_owned();
        Outbox {
            config,
            insert_one_sql,
            insert_many_sql,
            lock_keys_sql,
        }
    }

    /// The configuration this writer was built with.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Write one event in the caller's transaction (pass `&mut *tx`).
    ///
    /// The event becomes visible to relays when, and only if, that transaction commits.
    pub async fn enqueue(&self, conn: &mut PgConnection, event: &Event) -> Result<Enqueued> {
        self.check_size(event)?;
        self.lock_keys(conn, std::slice::from_ref(event)).await?;
        let headers = headers_json(event);
        let sequence: i64 = sqlx::query_scalar(AssertSqlSafe(self.insert_one_sql.as_str()))
            .bind(event.id().as_uuid())
            .bind(event.aggregate_type())
            .bind(event.aggregate_id())
            .bind(event.event_type())
            .bind(event.partition_key())
            .bind(event.destination())
            .bind(event.payload())
            .bind(&headers)
            .bind(event.created_at())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.insert_error(e, std::slice::from_ref(event)))?;
        Ok(Enqueued {
            event_id: event.id(),
            sequence,
        })
    }

    /// Write several events with one statement, in slice order, in the caller's transaction.
    ///
    /// Their sequences increase in slice order. Returns one [`Enqueued`] per event, in slice order.
    pub async fn enqueue_all(
        &self,
        conn: &mut PgConnection,
        events: &[Event],
    ) -> Result<Vec<Enqueued>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        for event in events {
            self.check_size(event)?;
        }
        self.lock_keys(conn, events).await?;
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut destinations = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        for event in events {
            ids.push(*event.id().as_uuid());
            aggregate_types.push(event.aggregate_type());
            aggregate_ids.push(event.aggregate_id());
            event_types.push(event.event_type());
            keys.push(event.partition_key());
            destinations.push(event.destination());
            payloads.push(event.payload());
            headers.push(headers_json(event));
            created.push(event.created_at());
        }
        let rows: Vec<(uuid::Uuid, i64)> =
            sqlx::query_as(AssertSqlSafe(self.insert_many_sql.as_str()))
                .bind(&ids)
                .bind(&aggregate_types)
                .bind(&aggregate_ids)
                .bind(&event_types)
                .bind(&keys)
                .bind(&destinations)
                .bind(&payloads)
                .bind(&headers)
                .bind(&created)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| self.insert_error(e, events))?;
        let sequences: std::collections::HashMap<uuid::Uuid, i64> = rows.into_iter().collect();
        events
            .iter()
            .map(|event| {
                sequences
                    .get(event.id().as_uuid())
                    .map(|&sequence| Enqueued {
                        event_id: event.id(),
                        sequence,
                    })
                    // The same id twice in one batch is caught by the unique constraint,
                    // so every event has a row; this only guards against a broken invariant.
                    .ok_or(Error::DuplicateEventId {
                        event_id: event.id(),
                    })
            })
            .collect()
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        if event.payload_bytes() > self.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                event_id: event.id(),
                size_bytes: event.payload_bytes(),
                max_bytes: self.config.max_payload_bytes,
            });
        }
        Ok(())
    }

    async fn lock_keys(&self, conn: &mut PgConnection, events: &[Event]) -> Result<()> {
        if self.config.key_ordering != KeyOrdering::AdvisoryLock {
            return Ok(());
        }
        let keys: Vec<&str> = events.iter().map(Event::partition_key).collect();
        sqlx::query(AssertSqlSafe(self.lock_keys_sql.as_str()))
            .bind(format!("outbox-relay:{}", self.config.schema))
            .bind(&keys)
            .execute(&mut *conn)
            .await
            .map_err(Error::database("locking partition keys"))?;
        Ok(())
    }

    fn insert_error(&self, error: sqlx::Error, events: &[Event]) -> Error {
        if let Some(pg) = error
            .as_database_error()
            .and_then(|db| db.try_downcast_ref::<PgDatabaseError>())
        {
            match pg.code() {
                "23505" if pg.constraint() == Some("outbox_event_id_key") => {
                    let event_id = duplicate_id_from_detail(pg.detail())
                        .or_else(|| events.first().map(Event::id))
                        .unwrap_or_default();
                    return Error::DuplicateEventId { event_id };
                }
                "42P01" | "3F000" => {
                    return Error::SchemaMissing {
                        schema: self.config.schema.to_string(),
                    };
                }
                _ => {}
            }
        }
        Error::Database {
            operation: "inserting into the outbox",
            source: error,
        }
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(OutboxConfig::default())
    }
}

fn headers_json(event: &Event) -> serde_json::Value {
    serde_json::Value::Object(
        event
            .headers()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// PostgreSQL reports `Key (event_id)=(<uuid>) already exists.`
fn duplicate_id_from_detail(detail: Option<&str>) -> Option<EventId> {
    let detail = detail?;
    let start = detail.find("=(")? + 2;
    let end = start + detail[start..].find(')')?;
    detail[start..end].parse().ok()
}

/// Write one event with the default configuration (schema `outbox`); see [`Outbox::enqueue`].
pub async fn enqueue(conn: &mut PgConnection, event: &Event) -> Result<Enqueued> {
    Outbox::default().enqueue(conn, event).await
}

/// Write several events with the default configuration; see [`Outbox::enqueue_all`].
pub async fn enqueue_all(conn: &mut PgConnection, events: &[Event]) -> Result<Vec<Enqueued>> {
    Outbox::default().enqueue_all(conn, events).await
}
