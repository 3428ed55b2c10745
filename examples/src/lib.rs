//! Shared pieces of the examples: the order service's own table.

use sqlx::PgPool;

/// Schema of the example order service's business tables.
pub const SHOP_SCHEMA: &str = "shop";

/// Create the order service's `shop.orders` table if it is missing.
pub async fn create_shop_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "create schema if not exists shop;
         create table if not exists shop.orders (
             id          bigint generated always as identity primary key,
             customer    text not null,
             total_cents bigint not null,
             status      text not null,
             version     bigint not null default 1,
             updated_at  timestamptz not null default now()
         );",
    )
    .execute(pool)
    .await?;
    Ok(())
}
