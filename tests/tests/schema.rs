//! Migrations: idempotent, and confined to the configured schema.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use outbox_tests::{TestSchema, unique_schema};

async fn tables_in(pool: &sqlx::PgPool, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = $1 order by 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_are_idempotent_and_honour_the_schema_name() {
    let test = TestSchema::unmigrated().await;
    let other = unique_schema();

    outbox_relay::admin::migrate(&test.pool, &test.schema)
        .await
        .unwrap();
    let first = outbox_relay::admin::applied_migrations(&test.pool, &test.schema)
        .await
        .unwrap();
    // Running again changes nothing and does not fail.
    outbox_relay::admin::migrate(&test.pool, &test.schema)
        .await
        .unwrap();
    let second = outbox_relay::admin::applied_migrations(&test.pool, &test.schema)
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(first.len(), outbox_core::MIGRATOR.iter().count());

    let expected = [
        "_sqlx_migrations",
        "inbox",
        "outbox",
        "outbox_dead_letter",
        "relay_lease",
        "relay_pause",
        "relay_wal_slot",
    ];
    assert_eq!(tables_in(&test.pool, test.schema.as_str()).await, expected);

    // Nothing leaked into public or into a schema we did not ask for.
    let public = tables_in(&test.pool, "public").await;
    assert!(
        !public.iter().any(|t| expected.contains(&t.as_str())),
        "tables leaked into public: {public:?}"
    );
    assert!(tables_in(&test.pool, other.as_str()).await.is_empty());

    // A second schema in the same database gets its own independent copy.
    outbox_core::migrate(&test.pool, &other).await.unwrap();
    assert_eq!(tables_in(&test.pool, other.as_str()).await, expected);

    // Pooled connections were not left with a changed search_path.
    let search_path: String = sqlx::query_scalar("show search_path")
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert!(!search_path.contains(test.schema.as_str()), "{search_path}");
}

#[tokio::test]
async fn concurrent_migrations_of_one_schema_both_succeed() {
    let test = TestSchema::unmigrated().await;
    let (a, b) = tokio::join!(
        outbox_core::migrate(&test.pool, &test.schema),
        outbox_core::migrate(&test.pool, &test.schema)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(tables_in(&test.pool, test.schema.as_str()).await.len(), 7);
}
