//! Running relays inside a test: configuration with test-friendly timings, and
//! handles to stop one gracefully or kill it mid-flight.

use std::time::Duration;

use outbox_relay::RunSummary;
use outbox_relay::config::{
    RawConfig, RawDatabase, RawPipeline, RawPolling, RawRabbitMq, RelayConfig,
};

use crate::TestSchema;

/// A raw configuration for `test`'s schema publishing to `exchange`, with short
/// timings (poll 200 ms, lease 3 s) so takeovers happen quickly in tests.
pub fn raw_config(test: &TestSchema, exchange: &str) -> RawConfig {
    RawConfig {
        sink: Some("rabbitmq".into()),
        source: None,
        database: RawDatabase {
            url: Some(test.database_url.clone()),
            schema: Some(test.schema.to_string()),
            ..Default::default()
        },
        polling: RawPolling {
            poll_interval_ms: Some(200),
            lease_ms: Some(3_000),
            partitions: Some(16),
            ..Default::default()
        },
        pipeline: RawPipeline {
            retry_backoff_initial_ms: Some(50),
            retry_backoff_max_ms: Some(1_000),
            shutdown_grace_ms: Some(10_000),
            ..Default::default()
        },
        wal: None,
        kafka: None,
        rabbitmq: Some(RawRabbitMq {
            url: Some(crate::amqp::amqp_url()),
            exchange: Some(exchange.to_owned()),
            routing_key: Some("{event_type}".into()),
            publish_timeout_ms: Some(5_000),
            ..Default::default()
        }),
        instance: Default::default(),
        ops: Default::default(),
        inbox: None,
        console: Default::default(),
    }
}

/// A relay running in a background task.
pub struct RunningRelay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<outbox_relay::Result<RunSummary>>,
}

impl RunningRelay {
    /// Start a relay with `config`.
    pub fn start(config: RelayConfig) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(outbox_relay::run(config, async move {
            let _ = stopped.await;
        }));
        RunningRelay {
            stop: Some(stop),
            task,
        }
    }

    /// Ask for a graceful stop and wait for the summary.
    pub async fn stop(mut self) -> RunSummary {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .expect("relay stops within 60 s")
            .expect("relay task did not panic")
            .expect("relay ran without error")
    }

    /// Whether the relay stopped on its own (an error, or a panic).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Wait up to `deadline` for the relay to stop on its own and return its result;
    /// panics if it is still running then.
    pub async fn wait_for_exit(mut self, deadline: Duration) -> outbox_relay::Result<RunSummary> {
        let result = tokio::time::timeout(deadline, &mut self.task)
            .await
            .expect("the relay stops on its own within the deadline")
            .expect("relay task did not panic");
        drop(self.stop.take());
        result
    }

    /// Kill it mid-flight, like `kill -9`: nothing is settled or released.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// Count the rows still in the outbox of `test`.
pub async fn outbox_rows(test: &TestSchema) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {}",
        test.table("outbox")
    )))
    .fetch_one(&test.pool)
    .await
    .expect("count outbox rows")
}

/// Wait until the outbox of `test` is empty, or panic at the deadline.
pub async fn wait_for_empty_outbox(test: &TestSchema, deadline: Duration) {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let rows = outbox_rows(test).await;
        if rows == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{rows} rows still in the outbox after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
