//! The outbox relay: moves committed outbox events from PostgreSQL to a broker.
//!
//! This crate is the library behind the `outbox-relay` binary, so tests and
//! embedders can drive it in-process. Today it provides the administrative
//! commands; the publishing pipeline (polling and WAL sources, RabbitMQ and
//! Kafka sinks) is being built.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
//! outbox_relay::admin::migrate(&pool, &"outbox".parse()?).await?;
//! # Ok(()) }
//! ```

pub mod admin;
