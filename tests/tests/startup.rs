//! Start-up: a relay that starts before PostgreSQL or the broker answers waits
//! for them (retrying with backoff, `/healthz` up and `/readyz` 503 meanwhile)
//! instead of exiting, and delivers once they answer; an ops address that cannot
//! be bound stops it with the cause; host names work in `ops.listen_addr`.
//! Relays started together on a new schema all register the same partition count.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::net::SocketAddr;
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::{RabbitFixture, amqp_url};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::ops::{free_local_addr, http_get};
use outbox_tests::relay::{RunningRelay, raw_config, wait_for_empty_outbox};
use outbox_tests::wait_until;

const DEADLINE: Duration = Duration::from_secs(30);

/// `host:port` of `url` (a postgres:// or amqp:// URL).
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split(['/', '?']).next().unwrap();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, hp)| hp)
        .to_owned()
}

/// `url` pointing at `proxy` instead of its service.
fn through(url: &str, proxy: &FaultProxy) -> String {
    url.replacen(&host_port(url), &proxy.addr().to_string(), 1)
}

async fn proxy_for(url: &str) -> FaultProxy {
    let upstream: SocketAddr = tokio::net::lookup_host(host_port(url))
        .await
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .unwrap();
    FaultProxy::start(upstream).await.unwrap()
}

async fn enqueue(test: &TestSchema, count: usize) {
    let events: Vec<Event> = (0..count)
        .map(|i| {
            Event::builder("doc", i.to_string(), "ok.start")
                .build()
                .unwrap()
        })
        .collect();
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
    .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
    .await
    .unwrap();
}

/// While the relay waits: it keeps trying (the proxy sees new connections), it has
/// not exited, `/healthz` answers 200 and `/readyz` 503.
async fn assert_waiting(relay: &RunningRelay, proxy: &FaultProxy, ops: SocketAddr) {
    wait_until("three connection attempts", DEADLINE, async || {
        assert!(!relay.is_finished(), "the relay exited instead of waiting");
        proxy.total_accepted() >= 3
    })
    .await;
    assert!(!relay.is_finished(), "the relay exited instead of waiting");
    let health = http_get(ops, "/healthz").await;
    assert_eq!(health.map(|(status, _)| status), Some(200));
    let ready = http_get(ops, "/readyz").await.unwrap();
    assert_eq!(ready.0, 503, "{}", ready.1);
}

#[tokio::test]
async fn a_relay_started_before_postgres_answers_waits_for_it_and_then_delivers() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    enqueue(&test, 20).await;
    let proxy = proxy_for(&test.database_url).await;
    proxy.cut();
    let ops = free_local_addr();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.database.url = Some(through(&test.database_url, &proxy));
    raw.database.connect_timeout_ms = Some(500);
    raw.ops.listen_addr = Some(ops.to_string());
    let relay = RunningRelay::start(raw.validate().unwrap());
    assert_waiting(&relay, &proxy, ops).await;

    proxy.restore();
    rabbit.wait_for_distinct(20, DEADLINE).await;
    wait_for_empty_outbox(&test, DEADLINE).await;
    wait_until("/readyz says ready", DEADLINE, async || {
        http_get(ops, "/readyz").await.map(|(status, _)| status) == Some(200)
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_started_before_rabbitmq_answers_waits_for_it_and_then_delivers() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    enqueue(&test, 20).await;
    let proxy = proxy_for(&amqp_url()).await;
    proxy.cut();
    let ops = free_local_addr();
    let mut raw = raw_config(&test, &rabbit.exchange);
    if let Some(rabbitmq) = raw.rabbitmq.as_mut() {
        rabbitmq.url = Some(through(&amqp_url(), &proxy));
        rabbitmq.connect_timeout_ms = Some(500);
    }
    raw.ops.listen_addr = Some(ops.to_string());
    let relay = RunningRelay::start(raw.validate().unwrap());
    assert_waiting(&relay, &proxy, ops).await;

    proxy.restore();
    rabbit.wait_for_distinct(20, DEADLINE).await;
    wait_for_empty_outbox(&test, DEADLINE).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_ops_address_that_cannot_be_bound_stops_the_relay_with_the_cause() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.ops.listen_addr = Some(addr.to_string());
    let relay = RunningRelay::start(raw.validate().unwrap());
    let error = relay.wait_for_exit(DEADLINE).await.unwrap_err().to_string();
    assert!(
        error.contains(&addr.to_string()) && error.contains("ops.listen_addr"),
        "{error}"
    );
    assert!(
        error.to_lowercase().contains("in use"),
        "names the cause: {error}"
    );
}

#[tokio::test]
async fn host_names_work_in_the_ops_listen_addr() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let port = free_local_addr().port();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.ops.listen_addr = Some(format!("localhost:{port}"));
    let relay = RunningRelay::start(raw.validate().unwrap());
    let candidates: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", port))
        .await
        .unwrap()
        .collect();
    wait_until("/healthz answers on localhost", DEADLINE, async || {
        for addr in &candidates {
            if http_get(*addr, "/healthz").await.map(|(status, _)| status) == Some(200) {
                return true;
            }
        }
        false
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn the_start_up_wait_can_be_limited_and_the_error_names_the_cause() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let proxy = proxy_for(&test.database_url).await;
    proxy.cut();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.database.url = Some(through(&test.database_url, &proxy));
    raw.database.connect_timeout_ms = Some(500);
    raw.instance.startup_timeout_ms = Some(2_000);
    let relay = RunningRelay::start(raw.validate().unwrap());
    let error = relay.wait_for_exit(DEADLINE).await.unwrap_err().to_string();
    assert!(
        error.contains("PostgreSQL") && error.contains("startup_timeout_ms"),
        "{error}"
    );
    assert!(
        error.contains(&proxy.addr().to_string()),
        "names where it tried: {error}"
    );
}

/// Several polling relays started at the same moment on a schema no relay has
/// used yet all register: each reads the partition count the first one recorded
/// (two daemons started together once failed with "no rows returned" while
/// checking the partition count).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_starting_together_on_a_new_schema_all_register_the_same_partition_count() {
    use outbox_relay::source::polling::lease::PartitionLeases;
    for round in 0..5 {
        let test = TestSchema::new().await;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let starts: Vec<_> = (0..8)
            .map(|i| {
                let (pool, schema, barrier) =
                    (test.pool.clone(), test.schema.clone(), barrier.clone());
                tokio::spawn(async move {
                    let leases = PartitionLeases::new(
                        &schema,
                        format!("relay-{i}"),
                        16,
                        Duration::from_secs(10),
                    );
                    barrier.wait().await;
                    leases.register(&pool).await
                })
            })
            .collect();
        for start in starts {
            let registered = start.await.unwrap();
            assert!(
                registered.is_ok(),
                "round {round}: a relay failed to register: {registered:?}"
            );
        }
        let partitions: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from {} where name like 'partition:%'",
            test.schema.qualify("relay_lease")
        )))
        .fetch_one(&test.pool)
        .await
        .unwrap();
        assert_eq!(partitions, 16);
    }
}
