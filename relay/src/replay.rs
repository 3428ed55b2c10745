//! `outbox-relay replay`: publish retained events again for a consumer that lost
//! them. Only rows kept after publishing (`settle = "mark"`, `published_at` set)
//! can be replayed; unpublished rows are the relay's own work and never touched.
//!
//! Events keep their original event id (consumers with an inbox skip the ones
//! they already processed) and carry an [`REPLAY_HEADER`] naming the replay run.
//! They are read in outbox order page by page; within a page the keys publish
//! concurrently, each key one event at a time, so a key's events are replayed in
//! their original order. A key whose event the broker refuses stops there: its
//! later events are not replayed ahead of it, and the report names it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use outbox_core::SchemaName;
use sqlx::{AssertSqlSafe, PgPool};

use crate::event::OutboxEvent;
use crate::route::Router;
use crate::sink::{Outcome, Sink};
use crate::source::row::{CREATED_AT_COLUMNS, ClaimRow};
use crate::{RelayError, Result};

/// Header added to every replayed message: the replay run's id.
pub const REPLAY_HEADER: &str = "outbox-replay";
/// Rows read per page.
const PAGE: i64 = 500;
/// Publishes of one event the broker could not take (outage, timeout) before the replay gives up.
const BROKER_ATTEMPTS: u32 = 5;

/// Which retained events to replay; unset fields do not narrow the selection.
#[derive(Clone, Debug, Default)]
pub struct ReplaySelection {
    /// Events created at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Events created before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    pub aggregate_id: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
}

impl ReplaySelection {
    /// True when nothing narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.since.is_none()
            && self.until.is_none()
            && self.aggregate_type.is_none()
            && self.aggregate_id.is_none()
            && self.event_type.is_none()
    }
}

/// What a replay did (or, with a dry run, would do).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    /// The id in every replayed message's [`REPLAY_HEADER`] (empty for a dry run).
    pub replay_id: String,
    /// Retained events the selection matched.
    pub selected: u64,
    /// Distinct partition keys among them.
    pub keys: u64,
    /// Events the broker confirmed.
    pub published: u64,
    /// Keys stopped at an event the broker refused, with that event and the reason.
    pub failed: Vec<ReplayFailure>,
}

/// A key whose replay stopped.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayFailure {
    /// The partition key.
    pub partition_key: String,
    /// The event the broker refused or could not take.
    pub event_id: String,
    /// Why.
    pub error: String,
}

fn where_clause() -> &'static str {
    "o.published_at is not null \
     and ($1::timestamptz is null or o.created_at >= $1) \
     and ($2::timestamptz is null or o.created_at < $2) \
     and ($3::text is null or o.aggregate_type = $3) \
     and ($4::text is null or o.aggregate_id = $4) \
     and ($5::text is null or o.event_type = $5)"
}

fn bind_selection<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    selection: &'q ReplaySelection,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(selection.since)
        .bind(selection.until)
        .bind(&selection.aggregate_type)
        .bind(&selection.aggregate_id)
        .bind(&selection.event_type)
}

/// Count the retained events `selection` matches and their keys.
pub async fn count(
    pool: &PgPool,
    schema: &SchemaName,
    selection: &ReplaySelection,
) -> Result<ReplayReport> {
    let outbox = schema.qualify("outbox");
    let sql = format!(
        "select count(*), count(distinct o.partition_key) from {outbox} o where {}",
        where_clause()
    );
    let (selected, keys): (i64, i64) =
        bind_selection(sqlx::query_as(AssertSqlSafe(sql)), selection)
            .fetch_one(pool)
            .await
            .map_err(RelayError::database("counting retained events to replay"))?;
    Ok(ReplayReport {
        selected: u64::try_from(selected).unwrap_or_default(),
        keys: u64::try_from(keys).unwrap_or_default(),
        ..ReplayReport::default()
    })
}

/// Publish the retained events `selection` matches through `sink`, to the route
/// `router` gives them or to `destination` when set, `concurrency` keys at a time.
pub async fn replay<S: Sink>(
    pool: &PgPool,
    schema: &SchemaName,
    selection: &ReplaySelection,
    sink: &S,
    router: &Router,
    destination: Option<&str>,
    concurrency: usize,
) -> Result<ReplayReport> {
    let mut report = count(pool, schema, selection).await?;
    report.replay_id = uuid::Uuid::now_v7().to_string();
    let outbox = schema.qualify("outbox");
    let sql = format!(
        "select o.sequence, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, \
         o.partition_key, o.destination, o.payload::text as payload, o.headers, {CREATED_AT_COLUMNS}, \
         o.attempts, 0::int8 as partition \
         from {outbox} o where {} and o.sequence > $6 order by o.sequence limit $7",
        where_clause()
    );
    let mut stopped_keys: BTreeMap<String, ()> = BTreeMap::new();
    let mut after = i64::MIN;
    loop {
        let rows: Vec<ClaimRow> =
            bind_selection(sqlx::query_as(AssertSqlSafe(sql.as_str())), selection)
                .bind(after)
                .bind(PAGE)
                .fetch_all(pool)
                .await
                .map_err(RelayError::database("reading retained events to replay"))?;
        let Some(last) = rows.last().map(ClaimRow::sequence) else {
            break;
        };
        after = last;
        // The page's events per key, in outbox order; keys stopped earlier stay stopped.
        let mut lanes: BTreeMap<String, Vec<OutboxEvent>> = BTreeMap::new();
        for row in rows {
            let claimed = row.into_claimed()?;
            if claimed.undecodable.is_some() {
                continue; // never published, so never replayed
            }
            let mut event = claimed.event;
            if stopped_keys.contains_key(&event.partition_key) {
                continue;
            }
            event
                .headers
                .insert(REPLAY_HEADER.to_owned(), report.replay_id.clone());
            if let Some(to) = destination {
                event.destination = Some(to.to_owned());
            }
            lanes
                .entry(event.partition_key.clone())
                .or_default()
                .push(event);
        }
        let results: Vec<(u64, Option<ReplayFailure>)> =
            futures_util::stream::iter(lanes.into_values())
                .map(|events| replay_key(sink, router, events))
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        for (published, failure) in results {
            report.published += published;
            if let Some(failure) = failure {
                stopped_keys.insert(failure.partition_key.clone(), ());
                report.failed.push(failure);
            }
        }
    }
    Ok(report)
}

/// Publish one key's events in order; stop at the first the broker refuses.
async fn replay_key<S: Sink>(
    sink: &S,
    router: &Router,
    events: Vec<OutboxEvent>,
) -> (u64, Option<ReplayFailure>) {
    let mut published = 0;
    for event in events {
        let route = router.route(&event);
        let mut attempt = 0;
        let failure = loop {
            attempt += 1;
            match sink.publish(&event, &route).await {
                Outcome::Delivered => break None,
                Outcome::Rejected(error) => break Some(error.message),
                Outcome::Retry(error) if attempt >= BROKER_ATTEMPTS => {
                    break Some(format!(
                        "the broker did not take it after {attempt} tries: {error}"
                    ));
                }
                Outcome::Retry(_) => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                }
            }
        };
        match failure {
            None => published += 1,
            Some(error) => {
                return (
                    published,
                    Some(ReplayFailure {
                        partition_key: event.partition_key,
                        event_id: event.event_id.to_string(),
                        error,
                    }),
                );
            }
        }
    }
    (published, None)
}

/// Replay with the sink of `config` (connected for this run and closed after it).
pub async fn run(
    config: &crate::RelayConfig,
    selection: &ReplaySelection,
    destination: Option<&str>,
) -> Result<ReplayReport> {
    let pool = crate::connect_pool(&config.database, 2).await?;
    let (schema, router, concurrency) = (
        &config.database.schema,
        &config.router,
        config.pipeline.max_in_flight,
    );
    let run = Run {
        pool: &pool,
        schema,
        selection,
        router,
        destination,
        concurrency,
    };
    match &config.sink {
        #[cfg(feature = "rabbitmq")]
        crate::config::SinkConfig::RabbitMq(sink_config) => {
            run.with(crate::sink::rabbitmq::RabbitMqSink::connect(sink_config.clone()).await?)
                .await
        }
        #[cfg(feature = "kafka")]
        crate::config::SinkConfig::Kafka(sink_config) => {
            run.with(crate::sink::kafka::KafkaSink::connect(sink_config.clone()).await?)
                .await
        }
    }
}

/// One replay's inputs, run with whichever sink the configuration names.
struct Run<'a> {
    pool: &'a PgPool,
    schema: &'a SchemaName,
    selection: &'a ReplaySelection,
    router: &'a Router,
    destination: Option<&'a str>,
    concurrency: usize,
}

impl Run<'_> {
    /// Replay through `sink`, then close it.
    async fn with<S: Sink>(self, sink: S) -> Result<ReplayReport> {
        let report = replay(
            self.pool,
            self.schema,
            self.selection,
            &sink,
            self.router,
            self.destination,
            self.concurrency,
        )
        .await;
        sink.close().await;
        report
    }
}
