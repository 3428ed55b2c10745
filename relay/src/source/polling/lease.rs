//! Partition leases: how several relay instances share one outbox.
//!
//! Every row belongs to one of `partitions` work partitions by the hash of its
//! partition key, so all events of a key are in one partition. An instance only
//! reads rows of partitions it holds a lease on, so a key is in flight in at most
//! one instance. Leases expire: a crashed instance's partitions are taken over
//! within about one lease period. Each change of owner increments the lease's
//! fencing token, and settling checks the token, so an instance that was paused
//! past its lease cannot settle work it no longer owns (it can only cause
//! duplicates, which at-least-once delivery allows).
//!
//! Instances announce themselves with an `instance:<id>` row; each aims for a
//! fair share, `ceil(partitions / live instances)`, taking free or expired
//! partitions and releasing extra ones between batches.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_core::SchemaName;
use sqlx::{AssertSqlSafe, PgPool};

use crate::config::ConfigError;
use crate::error::{Result, db_call};

/// The partitions this instance holds, with their fencing tokens.
pub type Owned = BTreeMap<u32, i64>;

/// Lease bookkeeping of one relay instance.
#[derive(Debug)]
pub struct PartitionLeases {
    instance_id: String,
    partitions: u32,
    lease: Duration,
    sql: LeaseSql,
}

#[derive(Debug)]
struct LeaseSql {
    seed: String,
    meta: String,
    heartbeat: String,
    renew: String,
    live_instances: String,
    acquire: String,
    release: String,
    leave: String,
    release_all: String,
}

fn partition_name(partition: u32) -> String {
    format!("partition:{partition}")
}

fn parse_partition(name: &str) -> Option<u32> {
    name.strip_prefix("partition:")?.parse().ok()
}

impl PartitionLeases {
    /// Leases of `instance_id` over `partitions` partitions of `schema`'s outbox.
    pub fn new(schema: &SchemaName, instance_id: String, partitions: u32, lease: Duration) -> Self {
        let t = schema.qualify("relay_lease");
        PartitionLeases {
            instance_id,
            partitions,
            lease,
            sql: LeaseSql {
                seed: format!(
                    "insert into {t} (name) select 'partition:' || g from generate_series(0, $1 - 1) g \
                     on conflict do nothing"
                ),
                // An upsert that rewrites the row with its own value: it waits for a
                // concurrent first insert to commit and returns the committed count. (An
                // insert that does nothing on conflict, unioned with a select, returned no
                // row when two relays started at once: the select's snapshot predates the
                // other relay's commit.)
                meta: format!(
                    "insert into {t} as l (name, fencing_token) values ('meta:partitions', $1) \
                     on conflict (name) do update set fencing_token = l.fencing_token \
                     returning fencing_token"
                ),
                heartbeat: format!(
                    "insert into {t} (name, owner, expires_at) values ('instance:' || $1, $1, now() + make_interval(secs => $2)) \
                     on conflict (name) do update set owner = excluded.owner, expires_at = excluded.expires_at"
                ),
                renew: format!(
                    "update {t} l set expires_at = now() + make_interval(secs => $2) \
                     from unnest($3::text[], $4::bigint[]) as held(name, token) \
                     where l.name = held.name and l.fencing_token = held.token and l.owner = $1 \
                     returning l.name"
                ),
                live_instances: format!(
                    "select count(*) from {t} where name like 'instance:%' and expires_at > now()"
                ),
                acquire: format!(
                    "update {t} set owner = $1, fencing_token = fencing_token + 1, expires_at = now() + make_interval(secs => $2) \
                     where name in (select name from {t} \
                                    where name like 'partition:%' and (owner is null or expires_at < now()) \
                                    order by expires_at, name limit $3 for update skip locked) \
                     returning name, fencing_token"
                ),
                release: format!(
                    "update {t} set owner = null, expires_at = '-infinity' where owner = $1 and name = any($2)"
                ),
                leave: format!("delete from {t} where name = 'instance:' || $1"),
                release_all: format!(
                    "update {t} set owner = null, expires_at = '-infinity' where owner = $1 and name like 'partition:%'"
                ),
            },
        }
    }

    /// Name of this instance.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Create the partition rows and check that every relay uses the same partition count.
    pub async fn register(&self, pool: &PgPool) -> Result<()> {
        let recorded: i64 = db_call(
            "checking the partition count",
            self.db_timeout(),
            sqlx::query_scalar(AssertSqlSafe(self.sql.meta.as_str()))
                .bind(i64::from(self.partitions))
                .fetch_one(pool),
        )
        .await?;
        if recorded != i64::from(self.partitions) {
            return Err(ConfigError {
                field: "polling.partitions".into(),
                problem: format!(
                    "is {} but the relays of this schema use {recorded}",
                    self.partitions
                ),
                fix: format!(
                    "use {recorded} on every relay; to change it, stop all relays, then delete the rows \
                     'meta:partitions' and 'partition:%' from relay_lease"
                ),
            }
            .into());
        }
        db_call(
            "creating partition leases",
            self.db_timeout(),
            sqlx::query(AssertSqlSafe(self.sql.seed.as_str()))
                .bind(i64::from(self.partitions))
                .execute(pool),
        )
        .await?;
        Ok(())
    }

    /// Heartbeat, renew held leases (dropping lost ones) and take free partitions up
    /// to the fair share. Returns the partitions now held and the fair share.
    pub async fn maintain(&self, pool: &PgPool, owned: &Owned) -> Result<(Owned, usize)> {
        let lease_secs = self.lease.as_secs_f64();
        db_call(
            "sending the instance heartbeat",
            self.db_timeout(),
            sqlx::query(AssertSqlSafe(self.sql.heartbeat.as_str()))
                .bind(&self.instance_id)
                .bind(lease_secs)
                .execute(pool),
        )
        .await?;

        let names: Vec<String> = owned.keys().map(|&p| partition_name(p)).collect();
        let tokens: Vec<i64> = owned.values().copied().collect();
        let renewed: Vec<String> = db_call(
            "renewing partition leases",
            self.db_timeout(),
            sqlx::query_scalar(AssertSqlSafe(self.sql.renew.as_str()))
                .bind(&self.instance_id)
                .bind(lease_secs)
                .bind(&names)
                .bind(&tokens)
                .fetch_all(pool),
        )
        .await?;
        let mut held: Owned = renewed
            .iter()
            .filter_map(|name| parse_partition(name))
            .filter_map(|p| owned.get(&p).map(|&token| (p, token)))
            .collect();
        if held.len() < owned.len() {
            let lost: Vec<u32> = owned
                .keys()
                .filter(|p| !held.contains_key(p))
                .copied()
                .collect();
            tracing::warn!(instance = %self.instance_id, ?lost, "partition leases lost to another relay");
        }

        let live: i64 = db_call(
            "counting live relays",
            self.db_timeout(),
            sqlx::query_scalar(AssertSqlSafe(self.sql.live_instances.as_str())).fetch_one(pool),
        )
        .await?;
        let live = live.max(1) as usize;
        let fair = (self.partitions as usize).div_ceil(live);
        if held.len() < fair {
            let rows: Vec<(String, i64)> = db_call(
                "acquiring partition leases",
                self.db_timeout(),
                sqlx::query_as(AssertSqlSafe(self.sql.acquire.as_str()))
                    .bind(&self.instance_id)
                    .bind(lease_secs)
                    .bind((fair - held.len()) as i64)
                    .fetch_all(pool),
            )
            .await?;
            if !rows.is_empty() {
                tracing::info!(instance = %self.instance_id, acquired = rows.len(), held = held.len() + rows.len(), fair, "acquired partition leases");
            }
            held.extend(
                rows.into_iter()
                    .filter_map(|(name, token)| Some((parse_partition(&name)?, token))),
            );
        }
        Ok((held, fair))
    }

    /// Give back `partitions` so other instances can take them (call with nothing in flight).
    pub async fn release(&self, pool: &PgPool, partitions: &[u32]) -> Result<()> {
        let names: Vec<String> = partitions.iter().map(|&p| partition_name(p)).collect();
        db_call(
            "releasing partition leases",
            self.db_timeout(),
            sqlx::query(AssertSqlSafe(self.sql.release.as_str()))
                .bind(&self.instance_id)
                .bind(&names)
                .execute(pool),
        )
        .await?;
        tracing::info!(instance = %self.instance_id, released = partitions.len(), "released partition leases");
        Ok(())
    }

    /// Release everything and remove this instance's heartbeat (graceful shutdown).
    pub async fn leave(&self, pool: &PgPool) -> Result<()> {
        for (sql, operation) in [
            (&self.sql.release_all, "releasing partition leases"),
            (&self.sql.leave, "removing the instance heartbeat"),
        ] {
            db_call(
                operation,
                self.db_timeout(),
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(&self.instance_id)
                    .execute(pool),
            )
            .await?;
        }
        Ok(())
    }

    fn db_timeout(&self) -> Duration {
        (self.lease / 2).max(Duration::from_secs(1))
    }

    /// How long a lease lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }
}
