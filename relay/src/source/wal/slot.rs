//! The replication slot: what a start finds (healthy, to create, lost), its
//! durable lifecycle and recorded position (see "State machine" in the module
//! docs of `source::wal`), and the slot monitor.

use super::*;

/// What [`WalSource::start`] found.
#[derive(Debug)]
#[must_use = "a lost slot must be recovered from, and a ready source read from"]
// Returned once per start and destructured at once: boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum WalStart {
    /// The slot is healthy (or was just created); the source streams from the
    /// recorded confirmed position.
    Ready(WalSource),
    /// The slot existed before and is gone or invalidated: events may be missing
    /// from the WAL. Recover from the table, see [`SlotLost`].
    SlotLost(SlotLost),
}

/// A slot that existed before and is now gone, invalidated or moved: the source
/// did not create a new one. Recover with [`SlotLost::recreate_slot`], then
/// re-publish every row left in the outbox table, then stream.
#[derive(Debug)]
pub struct SlotLost {
    /// The last position recorded as confirmed: everything before it reached the broker.
    pub last_confirmed_lsn: Lsn,
    /// What happened to the slot.
    pub reason: SlotLossReason,
    pub(super) config: WalSourceConfig,
    pub(super) pool: PgPool,
}

/// What happened to a lost slot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotLossReason {
    /// The slot no longer exists (dropped by hand, or lost with a failover).
    Dropped,
    /// The slot exists but PostgreSQL invalidated it (`wal_status = 'lost'`:
    /// `max_slot_wal_keep_size` exceeded, or a recovery conflict).
    Invalidated {
        /// PostgreSQL's `wal_status` or `invalidation_reason`.
        detail: String,
    },
    /// The slot's confirmed position is ahead of anything this relay confirmed:
    /// it was advanced or re-created by someone else.
    MovedAhead {
        /// The slot's `confirmed_flush_lsn`.
        slot_confirmed_lsn: Lsn,
    },
}

impl fmt::Display for SlotLossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotLossReason::Dropped => f.write_str("the slot was dropped"),
            SlotLossReason::Invalidated { detail } => {
                write!(f, "the slot was invalidated ({detail})")
            }
            SlotLossReason::MovedAhead { slot_confirmed_lsn } => write!(
                f,
                "the slot was advanced or re-created by someone else (it is at {slot_confirmed_lsn})"
            ),
        }
    }
}

impl SlotLost {
    /// Drop what is left of the old slot, create a new one at the current WAL
    /// position, record that position and start streaming from it.
    ///
    /// Events committed before the new slot's start are not in its stream: after
    /// this returns, re-publish every row still in the outbox table (in sequence
    /// order) and settle them *before* publishing what
    /// [`WalSource::next_transaction`] returns, so each key stays in order.
    /// (Re-publishing before this call as well is fine, but not enough: rows
    /// committed in between would be missed.)
    pub async fn recreate_slot(self) -> Result<WalSource> {
        let SlotLost {
            config,
            pool,
            reason,
            last_confirmed_lsn,
        } = self;
        let sql = WalSql::new(&config);
        tracing::warn!(
            slot = %config.slot, %reason, %last_confirmed_lsn,
            "re-creating the lost replication slot at the current WAL position"
        );
        let (start, drain) = recover_slot(&pool, &config, &sql).await?;
        WalSource::open(config, pool, sql, start, drain, true).await
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// The walsender streaming from it, if any.
    pub active_pid: Option<i32>,
    /// Position confirmed to the server.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot still needs.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL written after the confirmed position.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL the slot keeps on disk (from `restart_lsn`).
    pub retained_bytes: Option<i64>,
}

/// Reads a slot's lag and state over ordinary SQL; cheap to clone, usable from
/// a metrics task while the source streams.
#[derive(Debug, Clone)]
pub struct SlotMonitor {
    pub(super) pool: PgPool,
    pub(super) slot: String,
    pub(super) timeout: Duration,
}

impl SlotMonitor {
    /// The slot's state, or `None` when it does not exist.
    pub async fn status(&self) -> Result<Option<SlotStatus>> {
        type Row = (
            Option<i32>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        );
        let row: Option<Row> = db_call(
            "reading the replication slot's status",
            self.timeout,
            sqlx::query_as(SLOT_STATUS_SQL)
                .bind(&self.slot)
                .fetch_optional(&self.pool),
        )
        .await?;
        Ok(row.map(
            |(active_pid, confirmed, restart, wal_status, lag_bytes, retained_bytes)| SlotStatus {
                active_pid,
                confirmed_flush_lsn: confirmed.and_then(|s| s.parse().ok()),
                restart_lsn: restart.and_then(|s| s.parse().ok()),
                wal_status,
                lag_bytes,
                retained_bytes,
            },
        ))
    }

    /// Bytes of WAL written after the slot's confirmed position
    /// (`pg_current_wal_lsn() - confirmed_flush_lsn`), or `None` without a slot.
    pub async fn lag_bytes(&self) -> Result<Option<i64>> {
        Ok(self.status().await?.and_then(|s| s.lag_bytes))
    }
}

/// A slot as the startup checks need it.
pub(super) struct SlotRow {
    pub(super) plugin: Option<String>,
    pub(super) slot_type: String,
    pub(super) database: Option<String>,
    pub(super) in_this_database: bool,
    pub(super) confirmed: Option<Lsn>,
    pub(super) invalidation: Option<String>,
}

pub(super) enum SlotState {
    /// `adopted`: the slot had no recorded position (made by an operator, or the
    /// relay crashed right after creating it); its start is recorded now.
    Healthy {
        resume_from: Lsn,
        drain: Option<DrainRange>,
        adopted: bool,
    },
    Missing,
    Lost {
        reason: SlotLossReason,
        last: Lsn,
    },
    /// A recovery from a lost slot was interrupted: finish it.
    Recovering,
}

pub(super) async fn slot_row(pool: &PgPool, config: &WalSourceConfig) -> Result<Option<SlotRow>> {
    type Row = (
        Option<String>,
        String,
        Option<String>,
        Option<bool>,
        Option<String>,
        Option<String>,
        bool,
        Option<String>,
    );
    let row: Option<Row> = db_call(
        "looking up the replication slot",
        config.db_timeout(),
        sqlx::query_as(SLOT_SQL)
            .bind(&config.slot)
            .fetch_optional(pool),
    )
    .await?;
    Ok(row.map(
        |(plugin, slot_type, database, ours, confirmed, wal_status, conflicting, reason)| {
            let invalidation = reason
                .or_else(|| conflicting.then(|| "conflicting with recovery".to_owned()))
                .or_else(|| {
                    (wal_status.as_deref() == Some("lost"))
                        .then(|| "wal_status = 'lost'".to_owned())
                });
            SlotRow {
                plugin,
                slot_type,
                database,
                in_this_database: ours == Some(true),
                confirmed: confirmed.and_then(|s| s.parse().ok()),
                invalidation,
            }
        },
    ))
}

/// The slot's lifecycle row in `<schema>.relay_wal_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lifecycle {
    Creating,
    Draining(DrainRange),
    Streaming,
    Recovering,
}

pub(super) async fn read_lifecycle(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<Option<Lifecycle>> {
    let row: Option<(String, i64, i64)> = db_call(
        "reading the slot's recorded state",
        config.db_timeout(),
        sqlx::query_as(AssertSqlSafe(sql.read_state.as_str()))
            .bind(&config.slot)
            .fetch_optional(pool),
    )
    .await?;
    Ok(row.and_then(|(state, after, upto)| match state.as_str() {
        "creating" => Some(Lifecycle::Creating),
        "draining" => Some(Lifecycle::Draining(DrainRange { after, upto })),
        "streaming" => Some(Lifecycle::Streaming),
        "recovering" => Some(Lifecycle::Recovering),
        _ => None,
    }))
}

/// Run a lifecycle statement on (slot) or, `with_position_row`, (slot, position row).
pub(super) async fn write_lifecycle(
    pool: &PgPool,
    config: &WalSourceConfig,
    operation: &'static str,
    query: &str,
    with_position_row: bool,
) -> Result<()> {
    let mut statement = sqlx::query(AssertSqlSafe(query)).bind(&config.slot);
    if with_position_row {
        statement = statement.bind(config.position_row_name());
    }
    db_call(operation, config.db_timeout(), statement.execute(pool)).await?;
    Ok(())
}

/// Record `position` as the confirmed one and start the drain of every row the
/// table holds now (one statement, so both or neither are durable). Returns the
/// drain, `None` when the table is empty (the state is then `streaming`).
pub(super) async fn record_start(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
    position: Lsn,
) -> Result<Option<DrainRange>> {
    let value = position.to_i64().ok_or_else(|| WalError::Decode {
        lsn: position,
        problem: "LSN beyond i64".to_owned(),
    })?;
    let upto: i64 = db_call(
        "recording the new slot's start and the drain",
        config.db_timeout(),
        sqlx::query_scalar(AssertSqlSafe(sql.record_start.as_str()))
            .bind(&config.slot)
            .bind(config.position_row_name())
            .bind(value)
            .fetch_one(pool),
    )
    .await?;
    Ok((upto > 0).then_some(DrainRange { after: 0, upto }))
}

/// Start a drain of every row the table holds now, keeping the recorded position.
pub(super) async fn start_drain(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<Option<DrainRange>> {
    let upto: i64 = db_call(
        "recording a drain of the outbox table",
        config.db_timeout(),
        sqlx::query_scalar(AssertSqlSafe(sql.start_drain.as_str()))
            .bind(&config.slot)
            .fetch_one(pool),
    )
    .await?;
    Ok((upto > 0).then_some(DrainRange { after: 0, upto }))
}

/// The recorded confirmed position; `None` when never recorded (a 0/0 that a
/// relay before migration 0003 could record counts as never recorded).
pub(super) async fn read_position(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<Option<Lsn>> {
    let recorded: Option<i64> = db_call(
        "reading the recorded WAL position",
        config.db_timeout(),
        sqlx::query_scalar(AssertSqlSafe(sql.read_position.as_str()))
            .bind(config.position_row_name())
            .fetch_optional(pool),
    )
    .await?;
    Ok(recorded
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .map(Lsn))
}

/// Decide from the recorded lifecycle, the recorded position and the slot
/// itself what this start does; see "State machine" in the module docs.
pub(super) async fn inspect_slot(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<SlotState> {
    let lifecycle = read_lifecycle(pool, config, sql).await?;
    if lifecycle == Some(Lifecycle::Recovering) {
        return Ok(SlotState::Recovering);
    }
    let recorded = read_position(pool, config, sql).await?;
    let Some(slot) = slot_ready(pool, config).await? else {
        return Ok(match (lifecycle, recorded) {
            // Never created, or the creation did not get through.
            (None, None) | (Some(Lifecycle::Creating), _) => SlotState::Missing,
            (_, last) => SlotState::Lost {
                reason: SlotLossReason::Dropped,
                last: last.unwrap_or_default(),
            },
        });
    };
    let wrong = |problem: String| WalError::Slot {
        slot: config.slot.clone(),
        problem,
        fix: "configure a slot name of its own for this outbox (wal.slot); the relay creates it"
            .to_owned(),
    };
    if slot.slot_type != "logical" || slot.plugin.as_deref() != Some("pgoutput") {
        return Err(wrong(format!(
            "is a {} slot with plugin {:?}, the WAL source needs a logical pgoutput slot",
            slot.slot_type,
            slot.plugin.as_deref().unwrap_or("none")
        )));
    }
    if !slot.in_this_database {
        return Err(wrong(format!(
            "belongs to database {:?}, not the one of the database URL",
            slot.database.as_deref().unwrap_or("none")
        )));
    }
    if let Some(detail) = slot.invalidation {
        return Ok(SlotState::Lost {
            reason: SlotLossReason::Invalidated { detail },
            last: recorded.or(slot.confirmed).unwrap_or_default(),
        });
    }
    // slot_ready() waited for the position of a slot still being created.
    let slot_confirmed = slot.confirmed.unwrap_or_default();
    match (lifecycle, recorded) {
        // Our own creation that crashed before it was recorded, or a slot made
        // by an operator: adopt it. Rows already in the table may not be in its
        // stream: drain them.
        (Some(Lifecycle::Creating), _) | (_, None) => {
            tracing::info!(slot = %config.slot, position = %slot_confirmed, "adopting a replication slot without a recorded position");
            let drain = record_start(pool, config, sql, slot_confirmed).await?;
            Ok(SlotState::Healthy {
                resume_from: slot_confirmed,
                drain,
                adopted: true,
            })
        }
        // Positions are recorded before they are reported, so a slot of ours is never ahead.
        (_, Some(last)) if slot_confirmed > last => Ok(SlotState::Lost {
            reason: SlotLossReason::MovedAhead {
                slot_confirmed_lsn: slot_confirmed,
            },
            last,
        }),
        (Some(Lifecycle::Draining(drain)), Some(last)) => Ok(SlotState::Healthy {
            resume_from: last,
            drain: (drain.after < drain.upto).then_some(drain),
            adopted: false,
        }),
        (Some(Lifecycle::Streaming), Some(last)) => Ok(SlotState::Healthy {
            resume_from: last,
            drain: None,
            adopted: false,
        }),
        // A position recorded by a relay before migration 0003: whether its
        // drain finished is unknown, so drain what the table holds once.
        (None, Some(last)) => Ok(SlotState::Healthy {
            resume_from: last,
            drain: start_drain(pool, config, sql).await?,
            adopted: false,
        }),
        (Some(Lifecycle::Recovering), Some(_)) => Ok(SlotState::Recovering),
    }
}

/// The slot, once it has a confirmed position: a slot that another session
/// is still creating (a relay killed while creating it leaves its backend
/// running) has none yet; it is waited for up to `slot_busy_timeout`.
pub(super) async fn slot_ready(pool: &PgPool, config: &WalSourceConfig) -> Result<Option<SlotRow>> {
    let began = Instant::now();
    loop {
        let slot = slot_row(pool, config).await?;
        match slot {
            Some(row) if row.confirmed.is_none() && row.invalidation.is_none() => {
                let waited = began.elapsed();
                if waited >= config.slot_busy_timeout {
                    return Err(WalError::SlotBusy {
                        slot: config.slot.clone(),
                        pid: None,
                        waited_ms: millis(waited),
                    });
                }
                tracing::info!(slot = %config.slot, "the replication slot is still being created by another session; waiting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return Ok(other),
        }
    }
}

/// Create the permanent pgoutput slot and record its start as the confirmed
/// position, with the drain of the rows the table holds.
///
/// `creating` is recorded first: a crash after the server made the slot and
/// before its start is recorded leaves a slot the next start adopts.
pub(super) async fn create_slot(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<(Lsn, Option<DrainRange>)> {
    write_lifecycle(
        pool,
        config,
        "recording that the slot is being created",
        &sql.set_creating,
        false,
    )
    .await?;
    failpoint!("wal.slot.creating");
    tracing::info!(slot = %config.slot, "creating the replication slot (waits for running transactions)");
    let created = tokio::time::timeout(
        SLOT_CREATE_TIMEOUT,
        sqlx::query_scalar::<_, String>(CREATE_SLOT_SQL)
            .bind(&config.slot)
            .fetch_one(pool),
    )
    .await;
    let start: Lsn = match created {
        Ok(Ok(lsn)) => lsn.parse().map_err(|problem| WalError::Slot {
            slot: config.slot.clone(),
            problem,
            fix: "report this as a bug".to_owned(),
        })?,
        Ok(Err(error)) => {
            let fix = match sqlstate(&error).as_deref() {
                Some("53400") => {
                    "raise max_replication_slots (needs a restart) or drop unused slots".to_owned()
                }
                Some("42710") => {
                    "another relay created it at the same moment; start again".to_owned()
                }
                _ => "check the role's REPLICATION attribute and max_replication_slots".to_owned(),
            };
            return Err(WalError::Slot {
                slot: config.slot.clone(),
                problem: format!("cannot be created: {error}"),
                fix,
            });
        }
        Err(_) => {
            return Err(WalError::DatabaseTimeout {
                operation: "creating the replication slot (a long-running transaction blocks it)",
                timeout_ms: millis(SLOT_CREATE_TIMEOUT),
            });
        }
    };
    failpoint!("wal.slot.created");
    let drain = record_start(pool, config, sql, start).await?;
    tracing::info!(slot = %config.slot, %start, drain_upto = drain.map(|d| d.upto), "created the replication slot");
    Ok((start, drain))
}

/// Recover from a lost slot: record `recovering`, drop what is left of the old
/// slot, forget its position (state `creating`), create a new one.
pub(super) async fn recover_slot(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<(Lsn, Option<DrainRange>)> {
    write_lifecycle(
        pool,
        config,
        "recording the slot's recovery",
        &sql.set_recovering,
        false,
    )
    .await?;
    if slot_row(pool, config).await?.is_some() {
        db_call(
            "dropping the lost replication slot",
            config.db_timeout(),
            sqlx::query(DROP_SLOT_SQL).bind(&config.slot).execute(pool),
        )
        .await?;
    }
    failpoint!("wal.recovery.dropped");
    write_lifecycle(
        pool,
        config,
        "forgetting the lost slot's position",
        &sql.forget_position,
        true,
    )
    .await?;
    create_slot(pool, config, sql).await
}

pub(super) async fn write_position(
    pool: &PgPool,
    config: &WalSourceConfig,
    query: &str,
    lsn: Lsn,
) -> Result<()> {
    let value = lsn.to_i64().ok_or_else(|| WalError::Decode {
        lsn,
        problem: "LSN beyond i64".to_owned(),
    })?;
    db_call(
        "recording the confirmed WAL position",
        config.db_timeout(),
        sqlx::query(AssertSqlSafe(query))
            .bind(config.position_row_name())
            .bind(value)
            .execute(pool),
    )
    .await?;
    Ok(())
}
