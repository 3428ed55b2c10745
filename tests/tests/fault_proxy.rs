//! The fault proxy against real services: through it PostgreSQL and RabbitMQ work as
//! usual, and each fault does what the resilience tests rely on: a stall holds a query
//! open without failing it, a cut breaks open connections and refuses new ones until
//! restored, latency slows every round trip.
//!
//! PostgreSQL and RabbitMQ come from `scripts/dev-services` (or `docker compose up -d`);
//! the urls are `OUTBOX_TEST_DATABASE_URL` and `AMQP_URL`, defaulting to the local
//! services. Every test starts its own proxy, so tests run in parallel.
#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection as AmqpConnection, ConnectionProperties, Event};
use outbox_tests::amqp::amqp_url;
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::server_url;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::time::{Instant, timeout};

/// Upper bound for anything that should happen "promptly"; generous so a loaded CI
/// machine does not fail the test, while a hang still does.
const DEADLINE: Duration = Duration::from_secs(10);

/// How long a stalled query must stay unanswered to count as held.
const STALL_PROBE: Duration = Duration::from_secs(1);

async fn resolve(host: &str, port: u16) -> SocketAddr {
    tokio::net::lookup_host((host, port))
        .await
        .unwrap()
        .next()
        .unwrap()
}

/// A proxy in front of the PostgreSQL under test, and options that connect through it.
/// The options leave `statement_timeout` unset, so only the proxy decides how long a
/// query hangs.
async fn postgres_proxy() -> (FaultProxy, PgConnectOptions) {
    let direct: PgConnectOptions = server_url().parse().unwrap();
    let upstream = resolve(direct.get_host(), direct.get_port()).await;
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let options = direct
        .host("127.0.0.1")
        .port(proxy.port())
        .database("postgres")
        .disable_statement_logging();
    (proxy, options)
}

async fn connect(options: &PgConnectOptions) -> PgConnection {
    timeout(DEADLINE, PgConnection::connect_with(options))
        .await
        .expect("connecting through the proxy timed out")
        .unwrap()
}

async fn select_one(connection: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select 1").fetch_one(connection).await
}

#[tokio::test]
async fn a_stall_holds_a_query_open_until_resume() {
    let (proxy, options) = postgres_proxy().await;
    let mut connection = connect(&options).await;
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);

    proxy.stall();
    {
        // The same query future throughout: dropping it mid-flight would leave the
        // connection waiting for a reply to a query nobody awaits.
        let mut query = std::pin::pin!(select_one(&mut connection));
        assert!(
            timeout(STALL_PROBE, query.as_mut()).await.is_err(),
            "a query completed through a stalled proxy"
        );
        assert_eq!(proxy.connections(), 1, "a stall must not close connections");

        proxy.resume();
        let answer = timeout(DEADLINE, query)
            .await
            .expect("the held query did not complete after resume()");
        assert_eq!(answer.unwrap(), 1);
    }
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);
    connection.close().await.unwrap();
}

#[tokio::test]
async fn a_connection_opened_during_a_stall_is_held_until_resume() {
    let (proxy, options) = postgres_proxy().await;

    proxy.stall();
    let mut connecting = std::pin::pin!(PgConnection::connect_with(&options));
    assert!(
        timeout(STALL_PROBE, connecting.as_mut()).await.is_err(),
        "a connection completed its startup through a stalled proxy"
    );
    assert_eq!(proxy.total_accepted(), 1, "a stalled proxy still accepts");

    proxy.resume();
    let mut connection = timeout(DEADLINE, connecting)
        .await
        .expect("the held connection did not complete after resume()")
        .unwrap();
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);
    connection.close().await.unwrap();
}

#[tokio::test]
async fn a_cut_breaks_open_connections_and_refuses_new_ones_until_restore() {
    let (proxy, options) = postgres_proxy().await;
    let mut connection = connect(&options).await;
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);

    proxy.cut();
    let broken = timeout(DEADLINE, select_one(&mut connection))
        .await
        .expect("a query on a cut connection neither failed nor completed");
    assert!(
        broken.is_err(),
        "a query succeeded on a cut connection: {broken:?}"
    );
    let refused = timeout(DEADLINE, PgConnection::connect_with(&options))
        .await
        .expect("connecting through a cut proxy neither failed nor completed");
    assert!(refused.is_err(), "connected through a cut proxy");
    wait_until("the cut connection is closed", || proxy.connections() == 0).await;

    proxy.restore();
    let mut connection = connect(&options).await;
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(
        proxy.total_accepted(),
        3,
        "first, refused and restored connections"
    );
    connection.close().await.unwrap();
}

#[tokio::test]
async fn latency_delays_every_round_trip() {
    const LATENCY: Duration = Duration::from_millis(200);
    let (proxy, options) = postgres_proxy().await;
    let mut connection = connect(&options).await;
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);

    proxy.set_latency(LATENCY);
    let started = Instant::now();
    let answer = timeout(DEADLINE, select_one(&mut connection))
        .await
        .expect("a delayed query did not complete");
    let took = started.elapsed();
    assert_eq!(answer.unwrap(), 1);
    assert!(
        took >= LATENCY,
        "a query took {took:?} with {LATENCY:?} latency"
    );

    proxy.set_latency(Duration::ZERO);
    assert_eq!(
        timeout(DEADLINE, select_one(&mut connection))
            .await
            .unwrap()
            .unwrap(),
        1
    );
    connection.close().await.unwrap();
}

#[tokio::test]
async fn large_transfers_pass_through_intact_and_in_order_under_latency() {
    const BYTES: usize = 8 * 1024 * 1024;
    let (proxy, options) = postgres_proxy().await;
    let mut connection = connect(&options).await;
    // Small enough per chunk that the whole transfer stays well inside the deadline.
    proxy.set_latency(Duration::from_millis(5));

    let sent: String = (0..BYTES)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let (length, digest): (i32, String) = timeout(
        DEADLINE,
        sqlx::query_as("select length($1::text), md5($1::text)")
            .bind(&sent)
            .fetch_one(&mut connection),
    )
    .await
    .expect("a large upload did not complete")
    .unwrap();
    assert_eq!(usize::try_from(length).unwrap(), BYTES);

    let received: String = timeout(
        DEADLINE,
        sqlx::query_scalar("select $1::text")
            .bind(&sent)
            .fetch_one(&mut connection),
    )
    .await
    .expect("a large round trip did not complete")
    .unwrap();
    assert!(received == sent, "bytes changed or reordered in transit");
    let echoed: String = sqlx::query_scalar("select md5($1::text)")
        .bind(&received)
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(echoed, digest);
    connection.close().await.unwrap();
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections_and_its_port() {
    let (proxy, options) = postgres_proxy().await;
    let mut connection = connect(&options).await;
    assert_eq!(select_one(&mut connection).await.unwrap(), 1);

    drop(proxy);
    let broken = timeout(DEADLINE, select_one(&mut connection))
        .await
        .expect("a query through a dropped proxy neither failed nor completed");
    assert!(broken.is_err(), "a query succeeded through a dropped proxy");
    let refused = timeout(DEADLINE, PgConnection::connect_with(&options))
        .await
        .expect("connecting to a dropped proxy neither failed nor completed");
    assert!(refused.is_err(), "connected to a dropped proxy");
}

#[tokio::test]
async fn a_cut_breaks_an_amqp_connection() {
    let mut uri: AMQPUri = amqp_url().parse().unwrap();
    let upstream = resolve(&uri.authority.host, uri.authority.port).await;
    let proxy = FaultProxy::start(upstream).await.unwrap();
    uri.authority.host = "127.0.0.1".to_owned();
    uri.authority.port = proxy.port();

    let connection = timeout(
        DEADLINE,
        AmqpConnection::connect_uri(uri, ConnectionProperties::default()),
    )
    .await
    .expect("connecting to RabbitMQ through the proxy timed out")
    .unwrap();
    let mut events = connection.events_listener();
    connection.create_channel().await.unwrap();
    assert!(connection.status().connected());

    proxy.cut();
    let error = timeout(DEADLINE, async {
        loop {
            match events.next().await {
                Some(Event::Error(error)) => return error,
                Some(_) => {}
                None => panic!("the event stream ended without an error"),
            }
        }
    })
    .await
    .expect("the AMQP connection did not notice the cut");
    assert!(
        !connection.status().connected(),
        "connection still reports connected after: {error}"
    );
    assert!(connection.create_channel().await.is_err());
}

/// Polls `condition` until it holds, failing the test after [`DEADLINE`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let waited = timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}
