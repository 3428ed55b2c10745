//! Administrative commands shared by the binary and tests.

use outbox_core::SchemaName;
use sqlx::PgPool;

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
