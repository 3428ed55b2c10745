//! The inbox: exactly-once effects under concurrent duplicate deliveries.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use outbox_core::{Error, Inbox, Processed};
use outbox_tests::TestSchema;
use sqlx::PgConnection;

async fn effects_table(test: &TestSchema) -> String {
    let table = test.table("effects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {table} (message_id text not null, worker int not null)"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    table
}

async fn effect_count(test: &TestSchema, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
        .fetch_one(&test.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_duplicate_deliveries_from_two_pools_run_the_effect_once() {
    let test = TestSchema::new().await;
    let effects = effects_table(&test).await;
    // Two service instances: two pools.
    let pools = [TestSchema::pool(4).await, TestSchema::pool(4).await];
    let inbox = Inbox::new(test.schema.clone());
    let handler_runs = Arc::new(AtomicUsize::new(0));
    let message_id = uuid::Uuid::now_v7().to_string();
    let start = Arc::new(tokio::sync::Barrier::new(8));

    let mut deliveries = tokio::task::JoinSet::new();
    for worker in 0..8_i32 {
        let pool = pools[worker as usize % 2].clone();
        let inbox = inbox.clone();
        let effects = effects.clone();
        let message_id = message_id.clone();
        let handler_runs = handler_runs.clone();
        let start = start.clone();
        deliveries.spawn(async move {
            start.wait().await;
            inbox
                .process(
                    &pool,
                    "billing",
                    Some(&message_id),
                    async |conn: &mut PgConnection| {
                        handler_runs.fetch_add(1, Ordering::SeqCst);
                        // Hold the transaction open a little so the other deliveries pile up on it.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "insert into {effects} (message_id, worker) values ($1, $2)"
                        )))
                        .bind(&message_id)
                        .bind(worker)
                        .execute(conn)
                        .await
                        .map_err(|source| Error::Database {
                            operation: "test effect",
                            source,
                        })?;
                        Ok::<_, Error>(worker)
                    },
                )
                .await
        });
    }
    let mut handled = 0;
    let mut duplicates = 0;
    while let Some(result) = deliveries.join_next().await {
        match result.unwrap().unwrap() {
            Processed::Handled(_) => handled += 1,
            Processed::Duplicate => duplicates += 1,
        }
    }
    assert_eq!((handled, duplicates), (1, 7));
    assert_eq!(handler_runs.load(Ordering::SeqCst), 1);
    assert_eq!(effect_count(&test, &effects).await, 1);

    // The same id for another consumer is a different message to process.
    let other = inbox
        .process(
            &test.pool,
            "shipping",
            Some(&message_id),
            async |_: &mut PgConnection| Ok::<_, Error>(()),
        )
        .await
        .unwrap();
    assert_eq!(other, Processed::Handled(()));
}

#[tokio::test]
async fn a_missing_or_empty_message_id_is_refused_and_nothing_runs() {
    let test = TestSchema::new().await;
    let inbox = Inbox::new(test.schema.clone());
    for id in [None, Some("")] {
        let ran = AtomicUsize::new(0);
        let result = inbox
            .process(&test.pool, "billing", id, async |_: &mut PgConnection| {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(())
            })
            .await;
        assert!(
            matches!(result, Err(Error::MissingMessageId)),
            "{id:?}: {result:?}"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {}",
        test.table("inbox")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_failed_handler_records_nothing_so_redelivery_runs_it_again() {
    let test = TestSchema::new().await;
    let effects = effects_table(&test).await;
    let inbox = Inbox::new(test.schema.clone());

    #[derive(Debug)]
    enum HandlerError {
        Inbox(#[allow(dead_code)] Error),
        Business,
    }
    impl From<Error> for HandlerError {
        fn from(e: Error) -> Self {
            HandlerError::Inbox(e)
        }
    }

    let insert = format!("insert into {effects} (message_id, worker) values ('m-1', 0)");
    let failed = inbox
        .process(
            &test.pool,
            "billing",
            Some("m-1"),
            async |conn: &mut PgConnection| {
                sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                    .execute(conn)
                    .await
                    .unwrap();
                Err::<(), _>(HandlerError::Business)
            },
        )
        .await;
    assert!(matches!(failed, Err(HandlerError::Business)), "{failed:?}");
    assert_eq!(
        effect_count(&test, &effects).await,
        0,
        "the failed effect rolled back"
    );

    let retried = inbox
        .process(
            &test.pool,
            "billing",
            Some("m-1"),
            async |conn: &mut PgConnection| {
                sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                    .execute(conn)
                    .await
                    .unwrap();
                Ok::<_, HandlerError>("done")
            },
        )
        .await
        .unwrap();
    assert_eq!(retried, Processed::Handled("done"));
    let again = inbox
        .process(
            &test.pool,
            "billing",
            Some("m-1"),
            async |_: &mut PgConnection| Ok::<_, HandlerError>("done"),
        )
        .await
        .unwrap();
    assert!(again.is_duplicate());
    assert_eq!(effect_count(&test, &effects).await, 1);
}

#[tokio::test]
async fn record_joins_the_callers_transaction() {
    let test = TestSchema::new().await;
    let inbox = Inbox::new(test.schema.clone());
    let mut tx = test.pool.begin().await.unwrap();
    assert!(inbox.record(&mut tx, "c", Some("id-1")).await.unwrap());
    assert!(!inbox.record(&mut tx, "c", Some("id-1")).await.unwrap());
    tx.rollback().await.unwrap();
    // Rolled back with the caller's transaction: it is new again.
    let mut tx = test.pool.begin().await.unwrap();
    assert!(inbox.record(&mut tx, "c", Some("id-1")).await.unwrap());
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn retention_purges_only_ids_older_than_the_window() {
    let test = TestSchema::new().await;
    let inbox = Inbox::new(test.schema.clone());
    let table = test.table("inbox");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into {table} (consumer, message_id, received_at) values \
         ('c', 'old', now() - interval '3 days'), ('c', 'new', now() - interval '1 hour')"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let day = std::time::Duration::from_secs(86_400);
    let policy = outbox_core::InboxRetention::new(day * 2, day).unwrap();
    assert_eq!(inbox.purge(&test.pool, &policy).await.unwrap(), 1);
    let left: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select message_id from {table}"
    )))
    .fetch_all(&test.pool)
    .await
    .unwrap();
    assert_eq!(left, ["new"]);
}
