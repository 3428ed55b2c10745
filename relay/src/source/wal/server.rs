//! Start-up checks of the server (wal_level, role, table) and the publication, with the SQL they run.

use super::*;

#[derive(Debug)]
pub(super) struct WalSql {
    pub(super) read_position: String,
    pub(super) advance_position: String,
    pub(super) outbox: String,
    pub(super) create_publication: String,
    pub(super) read_state: String,
    pub(super) set_creating: String,
    pub(super) set_recovering: String,
    pub(super) forget_position: String,
    pub(super) record_start: String,
    pub(super) start_drain: String,
    pub(super) drain_progress: String,
}

impl WalSql {
    pub(super) fn new(config: &WalSourceConfig) -> Self {
        let leases = config.schema.qualify("relay_lease");
        let outbox = config.schema.qualify("outbox");
        let slots = config.schema.qualify("relay_wal_slot");
        WalSql {
            read_position: format!("select fencing_token from {leases} where name = $1"),
            // Positions only move forward, whichever instance writes.
            advance_position: format!(
                "insert into {leases} as l (name, fencing_token, expires_at) values ($1, $2, 'infinity') \
                 on conflict (name) do update set fencing_token = greatest(l.fencing_token, excluded.fencing_token)"
            ),
            read_state: format!(
                "select state, drain_after, drain_upto from {slots} where slot = $1"
            ),
            // $1 slot, $2 position row.
            set_creating: format!(
                "insert into {slots} (slot, state) values ($1, 'creating') \
                 on conflict (slot) do update set state = 'creating', drain_after = 0, drain_upto = 0, \
                   changed_at = now()"
            ),
            set_recovering: format!(
                "insert into {slots} (slot, state) values ($1, 'recovering') \
                 on conflict (slot) do update set state = 'recovering', changed_at = now()"
            ),
            forget_position: format!(
                "with forgotten as (delete from {leases} where name = $2) \
                 insert into {slots} (slot, state) values ($1, 'creating') \
                 on conflict (slot) do update set state = 'creating', drain_after = 0, drain_upto = 0, \
                   changed_at = now()"
            ),
            // The position and the drain in one statement: both are durable, or neither.
            record_start: format!(
                "with recorded as ( \
                   insert into {leases} as l (name, fencing_token, expires_at) values ($2, $3, 'infinity') \
                   on conflict (name) do update set fencing_token = excluded.fencing_token) \
                 insert into {slots} (slot, state, drain_after, drain_upto) \
                 select $1, case when coalesce(max(sequence), 0) > 0 then 'draining' else 'streaming' end, \
                        0, coalesce(max(sequence), 0) from {outbox} \
                 on conflict (slot) do update set state = excluded.state, drain_after = 0, \
                   drain_upto = excluded.drain_upto, changed_at = now() \
                 returning drain_upto"
            ),
            start_drain: format!(
                "insert into {slots} (slot, state, drain_after, drain_upto) \
                 select $1, case when coalesce(max(sequence), 0) > 0 then 'draining' else 'streaming' end, \
                        0, coalesce(max(sequence), 0) from {outbox} \
                 on conflict (slot) do update set state = excluded.state, drain_after = 0, \
                   drain_upto = excluded.drain_upto, changed_at = now() \
                 returning drain_upto"
            ),
            drain_progress: format!(
                "update {slots} set drain_after = greatest(drain_after, $2), \
                   state = case when $3 then 'streaming' else state end, changed_at = now() \
                 where slot = $1"
            ),
            create_publication: format!(
                "create publication \"{}\" for table {outbox} with (publish = 'insert')",
                config.publication
            ),
            outbox,
        }
    }
}

pub(super) async fn connect_pool(config: &WalSourceConfig) -> Result<PgPool> {
    let options = config
        .connect_options()?
        .application_name("outbox-relay-wal")
        .disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(config.connect_timeout)
        .connect_with(options)
        .await
        .map_err(WalError::database(
            "connecting to PostgreSQL (check the database URL and that the server is up)",
        ))
}

pub(super) async fn check_server(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<()> {
    let timeout = config.db_timeout();
    let wal_level: String = db_call(
        "reading wal_level",
        timeout,
        sqlx::query_scalar(WAL_LEVEL_SQL).fetch_one(pool),
    )
    .await?;
    check_wal_level(&wal_level)?;
    let (role, may_replicate): (String, bool) = db_call(
        "reading the role's attributes",
        timeout,
        sqlx::query_as(ROLE_SQL).fetch_one(pool),
    )
    .await?;
    if !may_replicate {
        return Err(WalError::ReplicationNotPermitted { role });
    }
    let table: Option<String> = db_call(
        "looking up the outbox table",
        timeout,
        sqlx::query_scalar(TABLE_SQL)
            .bind(&sql.outbox)
            .fetch_one(pool),
    )
    .await?;
    if table.is_none() {
        return Err(outbox_core::Error::SchemaMissing {
            schema: config.schema.to_string(),
        }
        .into());
    }
    Ok(())
}

pub(super) fn check_wal_level(wal_level: &str) -> Result<()> {
    if wal_level == "logical" {
        Ok(())
    } else {
        Err(WalError::WalLevel {
            actual: wal_level.to_owned(),
        })
    }
}

/// Create the publication if it is missing; otherwise check that it publishes
/// every insert into the outbox table with every column.
pub(super) async fn ensure_publication(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<()> {
    let timeout = config.db_timeout();
    let publication = &config.publication;
    let outbox = format!("{}.outbox", config.schema);
    let problem = |problem: String, fix: String| WalError::Publication {
        publication: publication.clone(),
        problem,
        fix,
    };
    let mut publishes_insert: Option<bool> = db_call(
        "looking up the publication",
        timeout,
        sqlx::query_scalar(PUBLICATION_SQL)
            .bind(publication)
            .fetch_optional(pool),
    )
    .await?;
    if publishes_insert.is_none() {
        let created = tokio::time::timeout(
            timeout,
            sqlx::query(AssertSqlSafe(sql.create_publication.as_str())).execute(pool),
        )
        .await;
        match created {
            Ok(Ok(_)) => {
                tracing::info!(%publication, table = %outbox, "created the publication");
                publishes_insert = Some(true);
            }
            // Another instance created it at the same moment: check what it is.
            Ok(Err(error)) if sqlstate(&error).as_deref() == Some("42710") => {
                publishes_insert = db_call(
                    "looking up the publication",
                    timeout,
                    sqlx::query_scalar(PUBLICATION_SQL)
                        .bind(publication)
                        .fetch_optional(pool),
                )
                .await?;
            }
            Ok(Err(error)) => {
                return Err(problem(
                    format!("does not exist and cannot be created: {error}"),
                    format!(
                        "create it as the owner of the outbox table: \
                         CREATE PUBLICATION \"{publication}\" FOR TABLE {outbox} WITH (publish = 'insert')"
                    ),
                ));
            }
            Err(_) => {
                return Err(WalError::DatabaseTimeout {
                    operation: "creating the publication",
                    timeout_ms: millis(timeout),
                });
            }
        }
    }
    if publishes_insert != Some(true) {
        return Err(problem(
            "does not publish inserts".to_owned(),
            format!("run ALTER PUBLICATION \"{publication}\" SET (publish = 'insert')"),
        ));
    }
    let table: Option<serde_json::Value> = db_call(
        "checking the publication's tables",
        timeout,
        sqlx::query_scalar(PUBLICATION_TABLE_SQL)
            .bind(publication)
            .bind(config.schema.as_str())
            .fetch_optional(pool),
    )
    .await?;
    let Some(table) = table else {
        return Err(problem(
            format!("exists but does not include the outbox table {outbox}"),
            format!(
                "run ALTER PUBLICATION \"{publication}\" ADD TABLE {outbox}, or configure a publication \
                 that includes it (a new name is created automatically)"
            ),
        ));
    };
    if let Some(filter) = table.get("rowfilter").and_then(|f| f.as_str()) {
        return Err(problem(
            format!(
                "filters the rows of {outbox} (WHERE {filter}): filtered events would never be published"
            ),
            format!("run ALTER PUBLICATION \"{publication}\" SET TABLE {outbox}"),
        ));
    }
    if let Some(columns) = table.get("attnames").and_then(|c| c.as_array()) {
        let published: Vec<&str> = columns.iter().filter_map(|c| c.as_str()).collect();
        let required = [
            "sequence",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "partition_key",
            "payload",
            "created_at",
            "destination",
            "headers",
        ];
        if let Some(missing) = required.iter().find(|c| !published.contains(c)) {
            return Err(problem(
                format!("publishes a column list of {outbox} without {missing:?}"),
                format!("run ALTER PUBLICATION \"{publication}\" SET TABLE {outbox}"),
            ));
        }
    }
    Ok(())
}
