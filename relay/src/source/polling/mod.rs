//! The polling source: reads committed outbox rows of the partitions this
//! instance leases, in sequence order, and settles them after the broker confirmed.
//!
//! No transaction or row lock is held while events are at the broker: claiming
//! is one read, settling one write. Exclusivity comes from the partition leases
//! (see [`lease`]), and every write is fenced by the lease tokens the
//! batch was claimed under.

mod claims;
pub mod lease;
mod wakeup;

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{AssertSqlSafe, PgPool};

use crate::config::{PoisonPolicy, RelayConfig, SettleMode};
use crate::error::{Result, db_call};
use crate::event::OutboxEvent;
use crate::source::polling::lease::Owned;
pub use crate::source::row::ClaimedEvent;
use crate::source::row::{CREATED_AT_COLUMNS, ClaimRow};
pub(crate) use claims::PollingClaims;
pub use wakeup::Wakeup;

/// Events claimed together, with the lease tokens they were claimed under.
#[derive(Debug, Default)]
pub struct Batch {
    /// Events in sequence order.
    pub events: Vec<ClaimedEvent>,
    /// The leases held when the batch was claimed.
    pub fences: Owned,
}

/// What became of an event the broker rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionVerdict {
    /// It will be retried after a backoff; its key waits.
    WillRetry {
        /// Failed attempts so far.
        attempts: i32,
    },
    /// It used up its attempts and moved to the dead-letter table; its key continues.
    DeadLettered,
    /// It used up its attempts and is parked in the outbox (policy `block`): its key
    /// waits until an operator retries it.
    Blocked,
    /// This instance no longer holds the partition; the new owner decides.
    NotOwned,
}

/// Reads and settles outbox rows.
#[derive(Debug)]
pub struct PollingSource {
    claim_pool: PgPool,
    settle_pool: PgPool,
    listener: Option<PgListener>,
    channel: String,
    instance_id: String,
    partitions: u32,
    batch_size: usize,
    poll_interval: Duration,
    db_timeout: Duration,
    poison_policy: PoisonPolicy,
    sql: SourceSql,
}

#[derive(Debug)]
struct SourceSql {
    claim: String,
    settle: String,
    reject: String,
    park: String,
    dead_letter: String,
}

/// Partition of a row, as SQL over `o.key_hash` with `$n` the partition count.
fn partition_expr(n: &str) -> String {
    format!("mod(o.key_hash::bigint + 2147483648, {n})")
}

impl PollingSource {
    /// A source for `config`, claiming with `claim_pool` and writing with `settle_pool`.
    pub async fn new(claim_pool: PgPool, settle_pool: PgPool, config: RelayConfig) -> Result<Self> {
        let schema = &config.database.schema;
        let settle = config.polling.settle;
        let outbox = schema.qualify("outbox");
        let leases = schema.qualify("relay_lease");
        let dead = schema.qualify("outbox_dead_letter");
        // $2 partitions, $3 tokens, $4 owner: only partitions still held with the same token.
        let fence = format!(
            "fence as (select f.p from unnest($2::int8[], $3::int8[]) as f(p, token) \
                       join {leases} l on l.name = 'partition:' || f.p and l.fencing_token = f.token and l.owner = $4 \
                       for share of l)"
        );
        let part = partition_expr("$5");
        let settle_sql = match settle {
            SettleMode::Delete => format!(
                "with {fence} delete from {outbox} o \
                 where o.sequence = any($1::int8[]) and {part} in (select p from fence) returning o.sequence"
            ),
            SettleMode::Mark { .. } => format!(
                "with {fence} update {outbox} o set published_at = now() \
                 where o.sequence = any($1::int8[]) and {part} in (select p from fence) returning o.sequence"
            ),
        };
        let claim_part = partition_expr("$1");
        let sql = SourceSql {
            claim: format!(
                "select o.sequence, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, o.partition_key, \
                        o.destination, o.payload::text as payload, o.headers, {CREATED_AT_COLUMNS}, o.attempts, \
                        {claim_part}::int8 as partition \
                 from {outbox} o \
                 where o.published_at is null and o.available_at <= now() \
                   and {claim_part} = any($2::int8[]) \
                   and o.partition_key <> all($4::text[]) \
                   and not exists (select 1 from {outbox} e \
                                   where e.partition_key = o.partition_key and e.published_at is null \
                                     and e.attempts > 0 and e.sequence < o.sequence and e.available_at > now()) \
                 order by o.sequence \
                 limit $3"
            ),
            settle: settle_sql,
            reject: format!(
                "with {fence} update {outbox} o set attempts = least(greatest(o.attempts, 0), 2147483646) + 1, last_error = $6, \
                        first_failed_at = coalesce(o.first_failed_at, now()), last_failed_at = now(), \
                        available_at = now() + make_interval(secs => $7) \
                 where o.sequence = $1 and {part} in (select p from fence) returning o.attempts"
            ),
            park: format!(
                "with {fence} update {outbox} o set attempts = least(greatest(o.attempts, 0), 2147483646) + 1, last_error = $6, \
                        first_failed_at = coalesce(o.first_failed_at, now()), last_failed_at = now(), \
                        available_at = 'infinity' \
                 where o.sequence = $1 and {part} in (select p from fence) returning o.attempts"
            ),
            dead_letter: format!(
                "with {fence}, moved as (delete from {outbox} o where o.sequence = $1 and {part} in (select p from fence) returning o.*) \
                 insert into {dead} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, \
                                     payload, headers, created_at, attempts, last_error, first_failed_at, last_failed_at) \
                 select sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, \
                        payload, headers, created_at, least(greatest(attempts, 0), 2147483646) + 1, $6, coalesce(first_failed_at, now()), now() from moved \
                 on conflict (event_id) do update set sequence = excluded.sequence, attempts = excluded.attempts, \
                        last_error = excluded.last_error, last_failed_at = excluded.last_failed_at, dead_lettered_at = now() \
                 returning sequence"
            ),
        };
        let channel = schema.notify_channel();
        let listener = match PgListener::connect_with(&claim_pool).await {
            Ok(mut listener) => match listener.listen(&channel).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; falling back to interval polling");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot open a LISTEN connection; falling back to interval polling");
                None
            }
        };
        Ok(PollingSource {
            claim_pool,
            settle_pool,
            listener,
            channel,
            instance_id: config.instance_id.clone(),
            partitions: config.polling.partitions,
            batch_size: config.polling.batch_size,
            poll_interval: config.polling.poll_interval,
            db_timeout: config.database.statement_timeout + Duration::from_secs(5),
            poison_policy: config.pipeline.poison_policy,
            sql,
        })
    }

    /// Largest number of rows one claim returns.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Take the LISTEN connection out, so the claim loop can wait on it while lanes share the source.
    pub fn take_wakeup(&mut self) -> Wakeup {
        Wakeup {
            idle_waits: 0,
            deadline: None,
            listener: self.listener.take(),
            channel: self.channel.clone(),
            poll_interval: self.poll_interval,
        }
    }

    /// Read the next batch: unpublished, available rows of held partitions, in sequence
    /// order, skipping every key whose earlier event waits for a retry.
    ///
    /// Keys in `busy` (still publishing or settling) are skipped.
    pub async fn claim(
        &self,
        owned: &Owned,
        limit: Option<usize>,
        busy: &[String],
    ) -> Result<Batch> {
        if owned.is_empty() {
            return Ok(Batch::default());
        }
        let partitions: Vec<i64> = owned.keys().map(|&p| i64::from(p)).collect();
        let limit = limit.unwrap_or(self.batch_size).min(self.batch_size);
        let rows: Vec<ClaimRow> = db_call(
            "claiming outbox rows",
            self.db_timeout,
            sqlx::query_as(AssertSqlSafe(self.sql.claim.as_str()))
                .bind(i64::from(self.partitions))
                .bind(&partitions)
                .bind(limit as i64)
                .bind(busy)
                .fetch_all(&self.claim_pool),
        )
        .await?;
        let events = rows
            .into_iter()
            .map(ClaimRow::into_claimed)
            .collect::<Result<_>>()?;
        Ok(Batch {
            events,
            fences: owned.clone(),
        })
    }

    fn fence_arrays(fences: &Owned) -> (Vec<i64>, Vec<i64>) {
        (
            fences.keys().map(|&p| i64::from(p)).collect(),
            fences.values().copied().collect(),
        )
    }

    /// Settle events the broker confirmed; returns the sequences actually settled
    /// (fewer when a lease was lost: the new owner republishes those).
    pub async fn settle(&self, fences: &Owned, sequences: &[i64]) -> Result<Vec<i64>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let (partitions, tokens) = Self::fence_arrays(fences);
        db_call(
            "settling published rows",
            self.db_timeout,
            sqlx::query_scalar(AssertSqlSafe(self.sql.settle.as_str()))
                .bind(sequences)
                .bind(&partitions)
                .bind(&tokens)
                .bind(&self.instance_id)
                .bind(i64::from(self.partitions))
                .fetch_all(&self.settle_pool),
        )
        .await
    }

    /// Record that the broker rejected `event`; dead-letter it once it used up
    /// `max_attempts`, or at once when the rejection is `permanent` (no retry can
    /// help). Policy `block` parks it instead of dead-lettering it.
    pub async fn reject(
        &self,
        fences: &Owned,
        event: &OutboxEvent,
        error: &str,
        max_attempts: u32,
        backoff: Duration,
        permanent: bool,
    ) -> Result<RejectionVerdict> {
        let (partitions, tokens) = Self::fence_arrays(fences);
        let final_attempt = permanent || i64::from(event.attempts) + 1 >= i64::from(max_attempts);
        if final_attempt && self.poison_policy == PoisonPolicy::Skip {
            let moved: Option<i64> = db_call(
                "moving an event to the dead-letter table",
                self.db_timeout,
                sqlx::query_scalar(AssertSqlSafe(self.sql.dead_letter.as_str()))
                    .bind(event.sequence)
                    .bind(&partitions)
                    .bind(&tokens)
                    .bind(&self.instance_id)
                    .bind(i64::from(self.partitions))
                    .bind(error)
                    .fetch_optional(&self.settle_pool),
            )
            .await?;
            return Ok(match moved {
                Some(_) => RejectionVerdict::DeadLettered,
                None => RejectionVerdict::NotOwned,
            });
        }
        let (sql, operation) = if final_attempt {
            (&self.sql.park, "parking a poison event")
        } else {
            (&self.sql.reject, "recording a failed attempt")
        };
        let mut query = sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
            .bind(event.sequence)
            .bind(&partitions)
            .bind(&tokens)
            .bind(&self.instance_id)
            .bind(i64::from(self.partitions))
            .bind(error);
        if !final_attempt {
            query = query.bind(backoff.as_secs_f64());
        }
        let attempts: Option<i32> = db_call(
            operation,
            self.db_timeout,
            query.fetch_optional(&self.settle_pool),
        )
        .await?;
        Ok(match attempts {
            None => RejectionVerdict::NotOwned,
            Some(_) if final_attempt => RejectionVerdict::Blocked,
            Some(attempts) => RejectionVerdict::WillRetry { attempts },
        })
    }
}
