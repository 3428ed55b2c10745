//! Administrative commands shared by the binary and tests: migrations, status,
//! and the dead-letter operations.
//!
//! "Dead letters" here covers both events moved to `outbox_dead_letter` (poison
//! policy `skip`) and events parked in the outbox holding their key (policy
//! `block`). Retrying is idempotent: a dead-lettered event re-enters the outbox
//! once (after every event of its key still pending), a blocked one is released
//! in place, so its key continues in order.

use chrono::{DateTime, Utc};
use outbox_core::SchemaName;
use sqlx::{AssertSqlSafe, PgPool};

use crate::error::{RelayError, Result};

/// Create the schema and apply every pending migration; safe to run repeatedly.
pub async fn migrate(pool: &PgPool, schema: &SchemaName) -> outbox_core::Result<()> {
    outbox_core::migrate(pool, schema).await
}

/// Versions of the migrations applied in `schema`, oldest first.
pub async fn applied_migrations(
    pool: &PgPool,
    schema: &SchemaName,
) -> outbox_core::Result<Vec<i64>> {
    let sql = format!(
        "select version from {} where success order by version",
        schema.qualify("_sqlx_migrations")
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .map_err(|source| outbox_core::Error::Database {
            operation: "reading applied migrations",
            source,
        })
}

/// Which dead letters an operation applies to; unset fields match everything.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterFilter {
    /// Only these event ids.
    pub event_ids: Vec<uuid::Uuid>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    pub aggregate_id: Option<String>,
    /// Only those that last failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only those that last failed before this time.
    pub until: Option<DateTime<Utc>>,
}

impl DeadLetterFilter {
    /// True when nothing narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.event_ids.is_empty()
            && self.event_type.is_none()
            && self.aggregate_type.is_none()
            && self.aggregate_id.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }
}

/// One event that could not be published.
///
/// `dead-letters list|show --json` print it with these field names (stable; new
/// fields may be added); `payload` and `headers` are embedded as JSON.
#[derive(Clone, Debug, sqlx::FromRow, serde::Serialize)]
pub struct DeadLetter {
    /// `dead-lettered` (in `outbox_dead_letter`) or `blocked` (parked in the outbox).
    pub status: String,
    /// Outbox sequence it had.
    pub sequence: i64,
    /// Event id.
    pub event_id: uuid::Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Partition key.
    pub partition_key: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The broker's last answer.
    pub last_error: String,
    /// First failure.
    pub first_failed_at: Option<DateTime<Utc>>,
    /// Last failure.
    pub last_failed_at: Option<DateTime<Utc>>,
    /// Payload as JSON text.
    #[serde(serialize_with = "embedded_json")]
    pub payload: String,
    /// Headers as JSON text.
    #[serde(serialize_with = "embedded_json")]
    pub headers: String,
}

/// JSON text written as the JSON value it holds (as a string if it does not parse).
fn embedded_json<S: serde::Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    match serde_json::from_str::<&serde_json::value::RawValue>(text) {
        Ok(raw) => raw.serialize(serializer),
        Err(_) => serializer.serialize_str(text),
    }
}

/// `column` where the relay can represent it (finite, before year 262143), else null:
/// rows written by other writers may hold `infinity`, and one row must never make
/// a listing fail.
fn representable_time(column: &str) -> String {
    format!(
        "case when isfinite({column}) and {column} < '262143-01-01 00:00:00+00'::timestamptz \
         then {column} end"
    )
}

fn dead_letters_sql(schema: &SchemaName) -> String {
    let outbox = schema.qualify("outbox");
    let dead = schema.qualify("outbox_dead_letter");
    let first = representable_time("first_failed_at");
    let last = representable_time("last_failed_at");
    format!(
        "select * from ( \
           select 'dead-lettered'::text as status, sequence, event_id, aggregate_type, aggregate_id, event_type, \
                  partition_key, attempts, last_error, {first} as first_failed_at, {last} as last_failed_at, \
                  payload::text as payload, headers::text as headers \
           from {dead} \
           union all \
           select 'blocked', sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, attempts, \
                  coalesce(last_error, ''), {first}, {last}, payload::text, headers::text \
           from {outbox} where published_at is null and available_at = 'infinity' \
         ) d \
         where (cardinality($1::uuid[]) = 0 or event_id = any($1)) \
           and ($2::text is null or event_type = $2) \
           and ($3::text is null or aggregate_type = $3) \
           and ($4::text is null or aggregate_id = $4) \
           and ($5::timestamptz is null or last_failed_at >= $5) \
           and ($6::timestamptz is null or last_failed_at < $6) \
           and ($8::text is null or strpos(lower(last_error), lower($8)) > 0) \
         order by last_failed_at, sequence \
         limit $7 offset $9"
    )
}

/// Dead-lettered and blocked events matching `filter`, oldest failure first.
pub async fn list_dead_letters(
    pool: &PgPool,
    schema: &SchemaName,
    filter: &DeadLetterFilter,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    let page = DeadLetterPage {
        filter: filter.clone(),
        error_contains: None,
        offset: 0,
        limit,
    };
    list_dead_letters_page(pool, schema, &page).await
}

/// One page of a dead-letter listing (the console's): the CLI's filter, a
/// case-insensitive search in the last error, and an offset.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterPage {
    /// Which dead letters.
    pub filter: DeadLetterFilter,
    /// Only those whose last error contains this text (ignoring case).
    pub error_contains: Option<String>,
    /// Skip this many (of the oldest failures).
    pub offset: i64,
    /// At most this many.
    pub limit: i64,
}

/// The dead letters of `page`, oldest failure first ([`list_dead_letters`] is page 0).
pub async fn list_dead_letters_page(
    pool: &PgPool,
    schema: &SchemaName,
    page: &DeadLetterPage,
) -> Result<Vec<DeadLetter>> {
    let filter = &page.filter;
    sqlx::query_as(AssertSqlSafe(dead_letters_sql(schema)))
        .bind(&filter.event_ids)
        .bind(&filter.event_type)
        .bind(&filter.aggregate_type)
        .bind(&filter.aggregate_id)
        .bind(filter.since)
        .bind(filter.until)
        .bind(page.limit)
        .bind(&page.error_contains)
        .bind(page.offset.max(0))
        .fetch_all(pool)
        .await
        .map_err(RelayError::database("listing dead letters"))
}

/// The route override (`destination` column) the writer gave a dead-lettered or
/// blocked event; `None` when it has none or no such event exists.
pub async fn dead_letter_destination(
    pool: &PgPool,
    schema: &SchemaName,
    event_id: uuid::Uuid,
) -> Result<Option<String>> {
    let outbox = schema.qualify("outbox");
    let dead = schema.qualify("outbox_dead_letter");
    let found: Option<Option<String>> = sqlx::query_scalar(AssertSqlSafe(format!(
        "select destination from {dead} where event_id = $1 \
         union all select destination from {outbox} where event_id = $1 limit 1"
    )))
    .bind(event_id)
    .fetch_optional(pool)
    .await
    .map_err(RelayError::database("reading a dead letter's destination"))?;
    Ok(found.flatten())
}

/// Publish the matching events again: dead-lettered ones re-enter the outbox,
/// blocked ones are released. Idempotent. Returns how many were retried.
/// Dead letters of malformed WAL messages stay (they are no event; purge them).
pub async fn retry_dead_letters(
    pool: &PgPool,
    schema: &SchemaName,
    filter: &DeadLetterFilter,
) -> Result<u64> {
    let outbox = schema.qualify("outbox");
    let dead = schema.qualify("outbox_dead_letter");
    // A malformed WAL message is no event: re-entering its record would publish it.
    let malformed = crate::source::wal::rows::MALFORMED_MESSAGE_EVENT_TYPE;
    let statements = [
        (
            format!(
                "update {outbox} set available_at = now(), attempts = 0, last_error = null, first_failed_at = null, \
                        last_failed_at = null \
                 where published_at is null and available_at = 'infinity' and event_id = any($1)"
            ),
            "releasing blocked events",
        ),
        (
            format!(
                "with moved as (delete from {dead} where event_id = any($1) and event_type <> '{malformed}' \
                        returning *) \
                 insert into {outbox} (event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, \
                                       payload, headers, created_at) \
                 select event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, payload, headers, \
                        created_at \
                 from moved order by sequence \
                 on conflict (event_id) do nothing"
            ),
            "re-entering dead-lettered events",
        ),
    ];
    apply_to_matching(pool, schema, filter, &statements).await
}

/// Delete the matching events for good: from the dead-letter table, and blocked
/// ones from the outbox (which releases their key). Returns how many.
pub async fn purge_dead_letters(
    pool: &PgPool,
    schema: &SchemaName,
    filter: &DeadLetterFilter,
) -> Result<u64> {
    let outbox = schema.qualify("outbox");
    let dead = schema.qualify("outbox_dead_letter");
    let statements = [
        (
            format!("delete from {dead} where event_id = any($1)"),
            "purging dead letters",
        ),
        (
            format!(
                "delete from {outbox} where published_at is null and available_at = 'infinity' and event_id = any($1)"
            ),
            "purging blocked events",
        ),
    ];
    apply_to_matching(pool, schema, filter, &statements).await
}

/// Run `statements` (each binding `$1` to the matching event ids) in one transaction;
/// returns the rows they changed together.
async fn apply_to_matching(
    pool: &PgPool,
    schema: &SchemaName,
    filter: &DeadLetterFilter,
    statements: &[(String, &'static str)],
) -> Result<u64> {
    let ids: Vec<uuid::Uuid> = list_dead_letters(pool, schema, filter, i64::MAX)
        .await?
        .into_iter()
        .map(|d| d.event_id)
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(RelayError::database("beginning a dead-letter change"))?;
    let mut changed = 0;
    for (sql, operation) in statements {
        changed += sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(RelayError::database(operation))?
            .rows_affected();
    }
    tx.commit()
        .await
        .map_err(RelayError::database("committing a dead-letter change"))?;
    Ok(changed)
}

/// A snapshot of one outbox for `outbox-relay status`.
///
/// `outbox-relay status --json` prints it as JSON with these field names (stable;
/// new fields may be added): `pending`, `oldest_pending_secs` (null when nothing is
/// pending), `retrying`, `blocked`, `dead_lettered`, `instances` (`[{"id",
/// "partitions", "source", "role"}]`), `slots` (`[{"name", "active", "lag_bytes", "retained_bytes",
/// "wal_status", "lifecycle", "drain": {"after", "upto"} | null}]`), `stalls`
/// (`{"long_transactions": [{"pid", "age_secs", "application_name", "state",
/// "wrote"}], "held_keys": [{"partition_key", "event_id", "reason", "attempts",
/// "last_error", "next_attempt_in_secs"}], "orphaned_leases": [{"owner",
/// "partitions", "expires_in_secs"}]}`), `pauses` (`[{"instance_group",
/// "paused_at", "paused_by", "reason"}]`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    /// Events not yet published.
    pub pending: i64,
    /// Age of the oldest pending event, in seconds.
    pub oldest_pending_secs: Option<f64>,
    /// Pending events waiting for a retry after a broker rejection.
    pub retrying: i64,
    /// Events parked by the `block` policy.
    pub blocked: i64,
    /// Events in the dead-letter table.
    pub dead_lettered: i64,
    /// Live relay instances with the number of partitions each holds.
    pub instances: Vec<RelayInstance>,
    /// Logical replication slots (pgoutput) of this database, for the WAL source.
    pub slots: Vec<SlotSummary>,
    /// What holds the relay back (long transactions, held keys, orphaned leases).
    pub stalls: crate::stalls::StallReport,
    /// Instance groups an operator paused (`outbox-relay pause`).
    pub pauses: Vec<crate::pause::Pause>,
}

/// A live relay instance of the schema (polling source: by its instance lease).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayInstance {
    /// The instance id (`[instance] id`, default host-pid-random).
    pub id: String,
    /// Work partitions it holds now (polling source).
    pub partitions: i64,
    /// `polling` or `wal`.
    pub source: String,
    /// `polling`; with the WAL source `leader` (streams the slot) or `standby`.
    pub role: String,
}

/// Progress of a WAL table drain: rows up to sequence `after` of `upto` are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DrainProgress {
    /// Highest settled sequence.
    pub after: i64,
    /// The drain's end (the table's highest sequence when the slot was created).
    pub upto: i64,
}

/// A pgoutput replication slot of the outbox's database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotSummary {
    /// Slot name.
    pub name: String,
    /// Whether a session streams from it now.
    pub active: bool,
    /// WAL written after its confirmed position, in bytes.
    pub lag_bytes: Option<i64>,
    /// WAL it keeps on the server, in bytes.
    pub retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// The WAL source's recorded lifecycle of the slot (`creating`, `draining`,
    /// `streaming`, `recovering`), if this schema's relay uses it.
    pub lifecycle: Option<String>,
    /// While `draining`: the drain's settled sequence and its end.
    pub drain: Option<DrainProgress>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pending events:      {}", self.pending)?;
        match self.oldest_pending_secs {
            Some(age) => writeln!(f, "oldest pending:      {age:.1} s")?,
            None => writeln!(f, "oldest pending:      -")?,
        }
        writeln!(f, "waiting for retry:   {}", self.retrying)?;
        writeln!(f, "blocked (key held):  {}", self.blocked)?;
        writeln!(f, "dead-lettered:       {}", self.dead_lettered)?;
        writeln!(f, "live relays:         {}", self.instances.len())?;
        for instance in &self.instances {
            match instance.source.as_str() {
                "wal" => writeln!(f, "  {}: WAL {}", instance.id, instance.role)?,
                _ => writeln!(f, "  {}: {} partitions", instance.id, instance.partitions)?,
            }
        }
        if !self.slots.is_empty() {
            writeln!(f, "replication slots:   {}", self.slots.len())?;
        }
        for slot in &self.slots {
            let bytes = |b: Option<i64>| b.map_or_else(|| "-".to_owned(), |b| format!("{b} bytes"));
            write!(
                f,
                "  {}: {}, lag {}, retained {}, wal_status {}",
                slot.name,
                if slot.active { "streaming" } else { "idle" },
                bytes(slot.lag_bytes),
                bytes(slot.retained_bytes),
                slot.wal_status.as_deref().unwrap_or("-")
            )?;
            if let Some(lifecycle) = &slot.lifecycle {
                write!(f, ", state {lifecycle}")?;
            }
            match slot.drain {
                Some(DrainProgress { after, upto }) => writeln!(
                    f,
                    " (table drain: rows up to sequence {after} of {upto} settled)"
                )?,
                None => writeln!(f)?,
            }
        }
        for pause in &self.pauses {
            writeln!(
                f,
                "PAUSED:              group {:?} since {} by {}{} (outbox-relay resume --group {})",
                pause.instance_group,
                pause.paused_at.to_rfc3339(),
                pause.paused_by,
                if pause.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", pause.reason)
                },
                pause.instance_group
            )?;
        }
        write!(f, "{}", self.stalls)
    }
}

/// Read the current [`Status`] of `schema`'s outbox; transactions open longer
/// than [`crate::stalls::LONG_TRANSACTION`] count as stalls.
pub async fn status(pool: &PgPool, schema: &SchemaName) -> Result<Status> {
    status_with(pool, schema, crate::stalls::LONG_TRANSACTION).await
}

/// [`status`] with transactions open longer than `long_transaction` reported as stalls.
pub async fn status_with(
    pool: &PgPool,
    schema: &SchemaName,
    long_transaction: std::time::Duration,
) -> Result<Status> {
    let outbox = schema.qualify("outbox");
    let dead = schema.qualify("outbox_dead_letter");
    let leases = schema.qualify("relay_lease");
    let (pending, oldest, retrying, blocked): (i64, Option<f64>, i64, i64) =
        sqlx::query_as(AssertSqlSafe(format!(
            // Infinite times (rows of other writers) cannot be subtracted; they have no age.
            "select count(*), extract(epoch from now() - min(created_at) filter (where isfinite(created_at)))::float8, \
                count(*) filter (where attempts > 0 and available_at <> 'infinity'), \
                count(*) filter (where available_at = 'infinity') \
         from {outbox} where published_at is null"
        )))
        .fetch_one(pool)
        .await
        .map_err(RelayError::database("reading outbox status"))?;
    let dead_lettered: i64 =
        sqlx::query_scalar(AssertSqlSafe(format!("select count(*) from {dead}")))
            .fetch_one(pool)
            .await
            .map_err(RelayError::database("counting dead letters"))?;
    let instances: Vec<(String, i64, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "select i.owner, count(p.name), 'polling', 'polling' from {leases} i \
         left join {leases} p on p.owner = i.owner and p.name like 'partition:%' and p.expires_at > now() \
         where i.name like 'instance:%' and i.expires_at > now() group by i.owner \
         union all \
         select owner, 0, 'wal', case when fencing_token = 1 then 'leader' else 'standby' end \
         from {leases} where name like 'wal-instance:%' and expires_at > now() \
         order by 1"
    )))
    .fetch_all(pool)
    .await
    .map_err(RelayError::database("reading relay leases"))?;
    type SlotRow = (
        String,
        bool,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let lifecycles = schema.qualify("relay_wal_slot");
    let slots: Vec<SlotRow> = sqlx::query_as(AssertSqlSafe(format!(
        "select s.slot_name::text, s.active, (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8, \
                (pg_current_wal_lsn() - s.restart_lsn)::int8, s.wal_status, w.state, w.drain_after, \
                w.drain_upto \
         from pg_replication_slots s left join {lifecycles} w on w.slot = s.slot_name::text \
         where s.plugin = 'pgoutput' and s.database = current_database() order by s.slot_name"
    )))
    .fetch_all(pool)
    .await
    .map_err(RelayError::database("reading replication slots"))?;
    let slots = slots
        .into_iter()
        .map(
            |(name, active, lag_bytes, retained_bytes, wal_status, lifecycle, after, upto)| {
                let drain = match (lifecycle.as_deref(), after, upto) {
                    (Some("draining"), Some(after), Some(upto)) => {
                        Some(DrainProgress { after, upto })
                    }
                    _ => None,
                };
                SlotSummary {
                    name,
                    active,
                    lag_bytes,
                    retained_bytes,
                    wal_status,
                    lifecycle,
                    drain,
                }
            },
        )
        .collect();
    Ok(Status {
        pending,
        oldest_pending_secs: oldest,
        retrying,
        blocked,
        dead_lettered,
        instances: instances
            .into_iter()
            .map(|(id, partitions, source, role)| RelayInstance {
                id,
                partitions,
                source,
                role,
            })
            .collect(),
        slots,
        stalls: crate::stalls::stall_report(pool, schema, long_transaction).await?,
        pauses: crate::pause::pauses(pool, schema).await?,
    })
}
