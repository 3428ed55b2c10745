//! Where the outbox lives: the schema name and the embedded migrations.

use std::fmt;
use std::str::FromStr;

use sqlx::{Connection, PgPool};

use crate::error::{Error, Result};

/// The migrations in the repository's `migrations/` folder.
///
/// The files use unqualified names; run them through [`migrate`], which points
/// `search_path` at the chosen schema, rather than with `MIGRATOR.run` directly
/// (that would create the tables in whatever schema the connection's
/// `search_path` names first).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Default schema of the outbox, inbox and relay tables.
pub const DEFAULT_SCHEMA: &str = "outbox";

/// A validated PostgreSQL schema name: 1 to 63 bytes of `a-z`, `0-9` and `_`,
/// not starting with a digit, not `pg_*`.
///
/// Identifiers cannot be bound as query parameters, so this strict form is what
/// makes it safe to put the name into SQL text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validate a schema name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && !name.starts_with("pg_")
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(SchemaName(name))
        } else {
            Err(Error::InvalidSchemaName { name })
        }
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"name"."table"`, for SQL text.
    pub fn qualify(&self, table: &str) -> String {
        format!("\"{}\".\"{table}\"", self.0)
    }

    /// The channel relays LISTEN on, where the opt-in insert trigger notifies: `"<schema>.outbox"`.
    pub fn notify_channel(&self) -> String {
        format!("{}.outbox", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        SchemaName(DEFAULT_SCHEMA.to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SchemaName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SchemaName::new(s)
    }
}

/// Create `schema` if needed and apply every pending migration in it.
///
/// Idempotent: applied migrations are recorded in `<schema>._sqlx_migrations`,
/// so each schema keeps its own history. Concurrent calls are serialized by the
/// migrator's advisory lock.
pub async fn migrate(pool: &PgPool, schema: &SchemaName) -> Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(Error::database("acquiring a connection to migrate"))?;
    let result = migrate_on(&mut conn, schema).await;
    // The connection's search_path was changed; never hand it back to the pool.
    let conn = conn.detach();
    let _ = conn.close().await;
    result
}

async fn migrate_on(conn: &mut sqlx::PgConnection, schema: &SchemaName) -> Result<()> {
    // `create schema if not exists` races with itself; serialize per schema. The
    // session lock goes away with the connection, which migrate() closes.
    sqlx::query("select pg_advisory_lock(hashtext('outbox-relay:migrate'), hashtext($1))")
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await
        .map_err(Error::database("locking the schema for migration"))?;
    let create = format!("create schema if not exists \"{schema}\"");
    sqlx::raw_sql(sqlx::AssertSqlSafe(create))
        .execute(&mut *conn)
        .await
        .map_err(Error::database("creating the outbox schema"))?;
    // pg_catalog stays implicitly first; nothing else may be found by accident.
    let search_path = format!("set search_path to \"{schema}\"");
    sqlx::raw_sql(sqlx::AssertSqlSafe(search_path))
        .execute(&mut *conn)
        .await
        .map_err(Error::database("setting search_path for migrations"))?;
    MIGRATOR
        .run(&mut *conn)
        .await
        .map_err(|source| Error::Migrate {
            schema: schema.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["outbox", "a", "_x", "tenant_42", &"s".repeat(63)] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Outbox",
            "a-b",
            "a\"b",
            "pg_temp",
            &"s".repeat(64),
            "a b",
        ] {
            assert!(SchemaName::new(bad).is_err(), "{bad}");
        }
    }
}
