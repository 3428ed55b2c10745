//! Write loads shared by the relay tests.

use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};

use crate::TestSchema;

/// Create the per-key counter table the concurrent writers lock (the "aggregate rows").
pub async fn create_counters(test: &TestSchema, keys: usize) -> String {
    let counters = test.table("counters");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {counters} (key int primary key, n bigint not null default 0); \
         insert into {counters} (key) select generate_series(0, {keys} - 1);"
    )))
    .execute(&test.pool)
    .await
    .expect("create the counter table");
    counters
}

/// `writers` concurrent writers enqueue `events` events over `keys` keys; each
/// transaction bumps its key's counter row (locking the aggregate, as the writer's
/// order rule asks), enqueues an event carrying the counter as `n`, sleeps 0-3 ms
/// and commits. Per key, `n` is the commit order. Call [`create_counters`] first.
pub async fn run_counter_writers(
    test: &TestSchema,
    counters: &str,
    writers: usize,
    events: usize,
    keys: usize,
) {
    let pool = test.connect(writers as u32).await;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let (pool, counters) = (pool.clone(), counters.to_owned());
        let outbox = Outbox::new(OutboxConfig {
            schema: test.schema.clone(),
            ..OutboxConfig::default()
        });
        tasks.spawn(async move {
            for i in 0..events / writers {
                let key = (writer * 31 + i * 7) % keys;
                let mut tx = pool.begin().await.expect("begin");
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "update {counters} set n = n + 1 where key = $1 returning n"
                )))
                .bind(key as i32)
                .fetch_one(&mut *tx)
                .await
                .expect("bump the key's counter");
                let event = Event::builder("item", format!("k{key}"), "item.changed")
                    .payload(&serde_json::json!({ "n": n }))
                    .build()
                    .expect("valid event");
                outbox.enqueue(&mut tx, &event).await.expect("enqueue");
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..4))).await;
                tx.commit().await.expect("commit");
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("writer task");
    }
}

/// Enqueue a backlog of `count` events over `keys` keys, 1,000 per transaction; per
/// key the payload counter `n` follows the outbox order.
pub async fn enqueue_backlog(test: &TestSchema, count: usize, keys: usize) {
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let mut n_by_key = vec![0_i64; keys];
    for chunk_start in (0..count).step_by(1_000) {
        let events: Vec<Event> = (chunk_start..(chunk_start + 1_000).min(count))
            .map(|i| {
                let key = i % keys;
                n_by_key[key] += 1;
                Event::builder("item", format!("k{key}"), "item.changed")
                    .payload(&serde_json::json!({ "n": n_by_key[key] }))
                    .build()
                    .expect("valid event")
            })
            .collect();
        let mut tx = test.pool.begin().await.expect("begin");
        outbox.enqueue_all(&mut tx, &events).await.expect("enqueue");
        tx.commit().await.expect("commit");
    }
}
