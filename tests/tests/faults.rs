//! Fault injection (G2, G3, G6): broker outage, broker stall and database
//! connection loss under steady writes, through the TCP fault proxy. Each test
//! checks the three invariants with a consumer: nothing committed is missing,
//! first deliveries keep per-key order, duplicates stay within the in-flight window.
//!
//! The outage lasts `OUTBOX_TEST_OUTAGE_SECS` (default 5 s; `scripts/test-heavy` runs 60 s).

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::n_of;
use outbox_tests::amqp::{RabbitFixture, first_delivery_order_violations};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::ops::{free_local_addr, metric};
use outbox_tests::relay::{RunningRelay, raw_config, wait_for_empty_outbox};

fn outage() -> Duration {
    let secs = std::env::var("OUTBOX_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

/// Writes one event every few ms over `keys` keys until stopped; per key the payload
/// counter `n` increases in commit order (one writer).
struct SteadyWriter {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SteadyWriter {
    fn start(test: &TestSchema, keys: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicUsize::new(0));
        let outbox = Outbox::new(OutboxConfig {
            schema: test.schema.clone(),
            ..OutboxConfig::default()
        });
        let pool = test.pool.clone();
        let (stop_flag, count) = (stop.clone(), written.clone());
        let task = tokio::spawn(async move {
            let mut n = vec![0_i64; keys];
            let mut i = 0;
            while !stop_flag.load(Ordering::Relaxed) {
                let key = i % keys;
                n[key] += 1;
                let event = Event::builder("item", format!("k{key}"), "item.changed")
                    .payload(&serde_json::json!({ "n": n[key] }))
                    .build()
                    .unwrap();
                outbox
                    .enqueue(&mut pool.acquire().await.unwrap(), &event)
                    .await
                    .unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        SteadyWriter {
            stop,
            written,
            task,
        }
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.written.load(Ordering::Relaxed)
    }
}

async fn wait_for_metric(
    ops: SocketAddr,
    name: &str,
    what: &str,
    deadline: Duration,
    ok: impl Fn(f64) -> bool,
) {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = metric(ops, name).await
            && ok(value)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what} not seen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letters(test: &TestSchema) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {}",
        test.table("outbox_dead_letter")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

/// A relay whose RabbitMQ connection goes through a fault proxy, with its ops
/// endpoint on a free port and AMQP timeouts of `timeout_ms`.
async fn relay_through_amqp_proxy(
    test: &TestSchema,
    rabbit: &RabbitFixture,
    timeout_ms: u64,
) -> (FaultProxy, SocketAddr, RunningRelay) {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let ops = free_local_addr();
    let mut raw = raw_config(test, &rabbit.exchange);
    let rabbitmq = raw.rabbitmq.as_mut().unwrap();
    rabbitmq.url = Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    rabbitmq.publish_timeout_ms = Some(timeout_ms);
    rabbitmq.connect_timeout_ms = Some(timeout_ms);
    raw.ops.listen_addr = Some(ops.to_string());
    let relay = RunningRelay::start(raw.validate().unwrap());
    (proxy, ops, relay)
}

#[tokio::test]
async fn broker_outage_under_steady_writes_loses_nothing_and_dead_letters_nothing() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (proxy, ops, relay) = relay_through_amqp_proxy(&test, &rabbit, 2_000).await;
    let writer = SteadyWriter::start(&test, 50);
    rabbit.wait_for_distinct(200, Duration::from_secs(60)).await;

    proxy.cut();
    wait_for_metric(
        ops,
        "outbox_relay_circuit_breaker_state",
        "the breaker opening",
        Duration::from_secs(15),
        |v| v == 1.0,
    )
    .await;
    let claims_before = metric(ops, "outbox_relay_claim_queries_total")
        .await
        .unwrap();
    let leases_before = metric(ops, "outbox_relay_lease_rounds_total")
        .await
        .unwrap();
    let started = Instant::now();
    tokio::time::sleep(outage()).await; // the scenario: the broker stays down this long
    let elapsed = started.elapsed().as_secs_f64();
    let claims = metric(ops, "outbox_relay_claim_queries_total")
        .await
        .unwrap()
        - claims_before;
    let lease_rounds = metric(ops, "outbox_relay_lease_rounds_total")
        .await
        .unwrap()
        - leases_before;
    println!(
        "broker outage of {elapsed:.1} s: {claims} claim queries ({:.2}/s), {lease_rounds} lease rounds ({:.2}/s)",
        claims / elapsed,
        lease_rounds / elapsed
    );
    assert!(
        claims / elapsed < 3.0,
        "claim rate while the broker is down must stay bounded"
    );
    let delivered_at_restore = rabbit.distinct();

    proxy.restore();
    let restored = Instant::now();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while rabbit.distinct() <= delivered_at_restore {
        assert!(
            tokio::time::Instant::now() < until,
            "delivery did not resume within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "delivery resumed {:.2} s after the broker returned",
        restored.elapsed().as_secs_f64()
    );
    wait_for_metric(
        ops,
        "outbox_relay_circuit_breaker_state",
        "the breaker closing",
        Duration::from_secs(30),
        |v| v == 0.0,
    )
    .await;

    let written = writer.stop().await;
    rabbit
        .wait_for_distinct(written, Duration::from_secs(60))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(dead_letters(&test).await, 0, "an outage never dead-letters");
    let received = rabbit.received();
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    assert!(
        received.len() - rabbit.distinct() <= 500,
        "duplicates within the in-flight window"
    );
}

#[tokio::test]
async fn stalled_broker_connection_times_out_opens_the_breaker_and_loses_nothing() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (proxy, ops, relay) = relay_through_amqp_proxy(&test, &rabbit, 1_000).await;
    let writer = SteadyWriter::start(&test, 20);
    rabbit.wait_for_distinct(100, Duration::from_secs(60)).await;

    // Packets held, not refused: only timeouts can notice.
    proxy.stall();
    wait_for_metric(
        ops,
        "outbox_relay_circuit_breaker_state",
        "the breaker opening",
        Duration::from_secs(20),
        |v| v == 1.0,
    )
    .await;
    let failures = metric(ops, "outbox_relay_publish_failures_total")
        .await
        .unwrap();
    assert!(failures >= 1.0, "the publish timeout fired");
    proxy.resume();
    proxy.restore();

    let written = writer.stop().await;
    rabbit
        .wait_for_distinct(written, Duration::from_secs(60))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(first_delivery_order_violations(&rabbit.received(), n_of), 0);
}

#[tokio::test]
async fn database_connection_loss_under_load_is_survived_without_loss() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap())
        .await
        .unwrap();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.database.url = Some(format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        proxy.port(),
        outbox_tests::TEST_DATABASE
    ));
    raw.database.statement_timeout_ms = Some(2_000);
    raw.database.connect_timeout_ms = Some(2_000);
    let relay = RunningRelay::start(raw.validate().unwrap());
    // The writers reach PostgreSQL directly; only the relay's connections break.
    let writer = SteadyWriter::start(&test, 30);
    rabbit.wait_for_distinct(150, Duration::from_secs(60)).await;

    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await; // the scenario: PostgreSQL unreachable this long
    proxy.restore();

    let written = writer.stop().await;
    rabbit
        .wait_for_distinct(written, Duration::from_secs(90))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(60)).await;
    relay.stop().await;
    let received = rabbit.received();
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    assert_eq!(dead_letters(&test).await, 0);
}

#[tokio::test]
async fn ops_endpoint_serves_metrics_health_and_readiness() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let ops = free_local_addr();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.ops.listen_addr = Some(ops.to_string());
    let relay = RunningRelay::start(raw.validate().unwrap());
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let events: Vec<Event> = (0..10)
        .map(|i| Event::builder("a", i.to_string(), "e").build().unwrap())
        .collect();
    outbox
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();
    rabbit.wait_for_distinct(10, Duration::from_secs(30)).await;
    wait_for_metric(
        ops,
        "outbox_relay_events_published_total",
        "10 published",
        Duration::from_secs(30),
        |v| v == 10.0,
    )
    .await;
    wait_for_metric(
        ops,
        "outbox_relay_partitions_held",
        "partitions held",
        Duration::from_secs(10),
        |v| v == 16.0,
    )
    .await;
    let (status, body) = outbox_tests::ops::http_get(ops, "/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = outbox_tests::ops::http_get(ops, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = outbox_tests::ops::http_get(ops, "/metrics").await.unwrap();
    assert!(
        metrics.contains("# TYPE outbox_relay_outbox_pending_events gauge"),
        "{metrics}"
    );
    relay.stop().await;
}

/// Restarts the shared PostgreSQL server, so it cannot run beside other tests:
/// `scripts/test-heavy` runs it alone. The writer records each committed event id
/// in a ground-truth table in the same transaction, so "committed" is exact even
/// when a commit's reply is lost in the restart.
#[tokio::test]
#[ignore = "restarts the shared PostgreSQL server; run by scripts/test-heavy"]
async fn postgres_restart_under_load_loses_nothing() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let truth = test.table("committed_events");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {truth} (event_id uuid primary key)"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.database.connect_timeout_ms = Some(2_000);
    let relay = RunningRelay::start(raw.validate().unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, stop, truth) = (test.pool.clone(), stop.clone(), truth.clone());
        let outbox = Outbox::new(OutboxConfig {
            schema: test.schema.clone(),
            ..OutboxConfig::default()
        });
        tokio::spawn(async move {
            let mut n = [0_i64; 20];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = i % 20;
                let event = Event::builder("item", format!("k{key}"), "item.changed")
                    .payload(&serde_json::json!({ "n": n[key] + 1 }))
                    .build()
                    .unwrap();
                let attempt = async {
                    let mut tx = pool.begin().await?;
                    outbox
                        .enqueue(&mut tx, &event)
                        .await
                        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "insert into {truth} values ($1)"
                    )))
                    .bind(event.id().as_uuid())
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await
                };
                match attempt.await {
                    Ok(()) => {
                        n[key] += 1;
                        i += 1;
                    }
                    // Unknown outcome or server down: the ground-truth table decides; wait and go on.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    rabbit.wait_for_distinct(200, Duration::from_secs(60)).await;

    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .unwrap();
    let restarted = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .unwrap();
    assert!(restarted.success());
    tokio::time::sleep(Duration::from_secs(3)).await; // keep writing for a while after the restart
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let committed: Vec<uuid::Uuid> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select event_id from {truth}")))
            .fetch_all(&test.pool)
            .await
            .unwrap();
    rabbit
        .wait_for_distinct(committed.len(), Duration::from_secs(120))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(60)).await;
    relay.stop().await;
    let received: std::collections::HashSet<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    let missing = committed
        .iter()
        .filter(|id| !received.contains(&id.to_string()))
        .count();
    println!(
        "postgres restart: {} committed events, {missing} missing",
        committed.len()
    );
    assert_eq!(missing, 0);
    assert_eq!(first_delivery_order_violations(&rabbit.received(), n_of), 0);
}
