//! TLS and SASL against the real services, with the throwaway CA that
//! `scripts/dev-services` makes (`scripts/tls/make-certs`, in `OUTBOX_TEST_TLS_DIR`):
//!
//! * PostgreSQL with `sslmode=verify-full` and a client certificate: the role
//!   `outbox_tls` may only log in over TLS with its certificate (`pg_hba.conf`
//!   `hostssl … cert`, `hostnossl … reject`), so a relay that delivers events as
//!   `outbox_tls` proves that its pools **and** the WAL source's replication
//!   connection verify the server and present the certificate; `pg_stat_ssl`
//!   confirms it for every session.
//! * RabbitMQ over `amqps://` (port 5671), the broker's certificate verified against
//!   `rabbitmq.tls_ca_file` and its host name.
//! * Kafka over `SASL_SSL` with SCRAM-SHA-512 (the listener on `localhost:9094`).
//! * A wrong CA, host name or password fails at start with an error that names the
//!   setting to fix.
//!
//! The server certificate names only `localhost`: connecting to `127.0.0.1` with host
//! name verification must fail.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::event::OutboxEvent;
use outbox_relay::route::Route;
use outbox_relay::sink::kafka::{KafkaConfig, KafkaSink};
use outbox_relay::sink::rabbitmq::RabbitMqSink;
use outbox_relay::sink::{Outcome, Sink};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::kafka::{TopicConsumer, create_topic};
use outbox_tests::relay::{RunningRelay, raw_config, wait_for_empty_outbox};
use outbox_tests::wal::WalDatabase;
use sqlx::postgres::PgConnectOptions;

/// Longest wait for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(30);
/// Events each delivery test writes.
const EVENTS: usize = 20;

/// The directory of the test CA and certificates.
fn tls_dir() -> PathBuf {
    std::env::var_os("OUTBOX_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".local/state/outbox-relay/tls")
        })
}

fn tls_file(name: &str) -> String {
    let path = tls_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/dev-services (it makes the test CA)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// `database_url`'s database as the certificate-only role `outbox_tls`, over TLS to
/// `host` with `sslmode=verify-full`, trusting `ca` and presenting the client certificate.
fn tls_url(database_url: &str, host: &str, ca: &str) -> String {
    let options: PgConnectOptions = database_url.parse().unwrap();
    format!(
        "postgres://outbox_tls@{host}:{port}/{database}?sslmode=verify-full&sslrootcert={ca}\
         &sslcert={cert}&sslkey={key}",
        port = options.get_port(),
        database = options.get_database().unwrap_or("postgres"),
        ca = tls_file(ca),
        cert = tls_file("client.pem"),
        key = tls_file("client.key"),
    )
}

async fn enqueue_events(test: &TestSchema) {
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let events: Vec<Event> = (0..EVENTS)
        .map(|i| {
            Event::builder("order", format!("o-{}", i % 4), "order.placed")
                .payload(&serde_json::json!({ "n": i }))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
}

/// `(backend_type, ssl, client_dn)` of every session of `outbox_tls` in `database`.
async fn tls_sessions(test: &TestSchema, database: &str) -> Vec<(String, bool, Option<String>)> {
    sqlx::query_as(
        "select a.backend_type, s.ssl, s.client_dn
         from pg_stat_activity a join pg_stat_ssl s using (pid)
         where a.usename = 'outbox_tls' and a.datname = $1",
    )
    .bind(database)
    .fetch_all(&test.pool)
    .await
    .unwrap()
}

fn assert_all_verified(sessions: &[(String, bool, Option<String>)]) {
    assert!(
        !sessions.is_empty(),
        "the relay has no session as outbox_tls"
    );
    for (backend, ssl, client_dn) in sessions {
        assert!(ssl, "a {backend} session of outbox_tls is not encrypted");
        assert_eq!(
            client_dn.as_deref(),
            Some("/CN=outbox_tls"),
            "a {backend} session did not present the client certificate"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_polling_relay_connects_with_verify_full_and_a_client_certificate() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.database.url = Some(tls_url(&test.database_url, "localhost", "ca.pem"));
    let relay = RunningRelay::start(raw.validate().unwrap());

    enqueue_events(&test).await;
    rabbit.wait_for_distinct(EVENTS, DEADLINE).await;
    wait_for_empty_outbox(&test, DEADLINE).await;
    let database: PgConnectOptions = test.database_url.parse().unwrap();
    let sessions = tls_sessions(&test, database.get_database().unwrap_or("postgres")).await;
    relay.stop().await;
    assert_all_verified(&sessions);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wal_relay_streams_over_verify_full_with_a_client_certificate_on_every_connection() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.database.url = Some(tls_url(&db.test.database_url, "localhost", "ca.pem"));
    let relay = RunningRelay::start(raw.validate().unwrap());
    let until = tokio::time::Instant::now() + DEADLINE;
    while !db.walsender_streams().await {
        assert!(
            tokio::time::Instant::now() < until,
            "the WAL relay did not stream over TLS within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    enqueue_events(&db.test).await;
    rabbit.wait_for_distinct(EVENTS, DEADLINE).await;
    wait_for_empty_outbox(&db.test, DEADLINE).await;
    let sessions = tls_sessions(&db.test, &db.name).await;
    relay.stop().await;
    assert!(
        sessions
            .iter()
            .any(|(backend, _, _)| backend == "walsender"),
        "no replication connection of outbox_tls: {sessions:?}"
    );
    assert_all_verified(&sessions);
    db.cleanup().await;
}

/// Start a polling relay with `url` and return the start-up error.
async fn start_error(test: &TestSchema, url: String) -> String {
    let rabbit = RabbitFixture::new().await;
    let mut raw = raw_config(test, &rabbit.exchange);
    raw.database.url = Some(url);
    raw.database.connect_timeout_ms = Some(5_000);
    let config = raw.validate().unwrap();
    let run = outbox_relay::run(config, std::future::pending::<()>());
    match tokio::time::timeout(DEADLINE, run).await {
        Ok(Err(error)) => format!("{error:#}"),
        Ok(Ok(summary)) => panic!("the relay ran ({summary:?}) with a bad TLS setting"),
        Err(_) => panic!("the relay neither failed nor ran within {DEADLINE:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_or_host_name_for_postgresql_fails_at_start_naming_the_setting() {
    let test = TestSchema::new().await;

    let wrong_ca = start_error(
        &test,
        tls_url(&test.database_url, "localhost", "other-ca.pem"),
    )
    .await;
    assert!(wrong_ca.contains("sslrootcert"), "{wrong_ca}");

    let wrong_host = start_error(&test, tls_url(&test.database_url, "127.0.0.1", "ca.pem")).await;
    assert!(wrong_host.contains("host name"), "{wrong_host}");
}

/// The test AMQP url with `amqps://` on the TLS port and `host`.
fn amqps_url(host: &str) -> String {
    let port = std::env::var("OUTBOX_TEST_AMQPS_PORT").unwrap_or_else(|_| "5671".to_owned());
    let url = outbox_tests::amqp::amqp_url();
    let (userinfo, rest) = url
        .trim_start_matches("amqp://")
        .split_once('@')
        .expect("AMQP_URL has user:password@host");
    let vhost = rest.split_once('/').map_or("%2f", |(_, vhost)| vhost);
    format!("amqps://{userinfo}@{host}:{port}/{vhost}")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_polling_relay_publishes_over_amqps_verifying_the_brokers_certificate() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    let rabbitmq = raw.rabbitmq.as_mut().unwrap();
    rabbitmq.url = Some(amqps_url("localhost"));
    rabbitmq.tls_ca_file = Some(tls_file("ca.pem"));
    let relay = RunningRelay::start(raw.validate().unwrap());

    enqueue_events(&test).await;
    rabbit.wait_for_distinct(EVENTS, DEADLINE).await;
    wait_for_empty_outbox(&test, DEADLINE).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_or_host_name_for_rabbitmq_fails_at_start_naming_the_setting() {
    let config = |host: &str, ca: &str| {
        let test_config = outbox_relay::config::RawRabbitMq {
            url: Some(amqps_url(host)),
            exchange: Some("unused".into()),
            tls_ca_file: Some(tls_file(ca)),
            ..Default::default()
        };
        let mut raw = outbox_relay::config::RawConfig {
            sink: Some("rabbitmq".into()),
            rabbitmq: Some(test_config),
            ..Default::default()
        };
        raw.database.url = Some("postgres://unused@127.0.0.1/unused".into());
        match raw.validate().unwrap().sink {
            outbox_relay::config::SinkConfig::RabbitMq(config) => config,
            #[allow(unreachable_patterns)]
            other => panic!("not a RabbitMQ sink: {other:?}"),
        }
    };
    for (host, ca) in [("localhost", "other-ca.pem"), ("127.0.0.1", "ca.pem")] {
        let error = RabbitMqSink::connect(config(host, ca))
            .await
            .unwrap_err()
            .message;
        assert!(
            error.contains("rabbitmq.tls_ca_file"),
            "{host} with {ca}: {error}"
        );
        assert!(error.contains("host"), "{host} with {ca}: {error}");
        assert!(
            !error.contains("guest:guest"),
            "shows the password: {error}"
        );
    }
}

fn sasl_config(password: &str, ca: &str) -> KafkaConfig {
    let brokers = std::env::var("OUTBOX_TEST_KAFKA_SASL_BROKERS")
        .unwrap_or_else(|_| "localhost:9094".to_owned());
    let user = std::env::var("OUTBOX_TEST_KAFKA_SASL_USER").unwrap_or_else(|_| "outbox".to_owned());
    let mut config = KafkaConfig::new(brokers);
    config.extra = BTreeMap::from([
        ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
        ("sasl.mechanisms".to_owned(), "SCRAM-SHA-512".to_owned()),
        ("sasl.username".to_owned(), user),
        ("sasl.password".to_owned(), password.to_owned()),
        ("ssl.ca.location".to_owned(), tls_file(ca)),
        // localhost is also ::1, where the listener does not bind.
        ("broker.address.family".to_owned(), "v4".to_owned()),
    ]);
    config
}

fn sasl_password() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_SASL_PASSWORD")
        .unwrap_or_else(|_| "outbox-dev-password".to_owned())
}

fn kafka_event() -> OutboxEvent {
    OutboxEvent {
        sequence: 1,
        event_id: outbox_core::EventId::new(),
        aggregate_type: "order".into(),
        aggregate_id: "o-1".into(),
        event_type: "order.placed".into(),
        partition_key: "order:o-1".into(),
        destination: None,
        payload: br#"{"n":1}"#.to_vec(),
        headers: BTreeMap::new(),
        created_at: chrono::Utc::now(),
        attempts: 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kafka_sink_publishes_over_sasl_ssl_with_scram_sha_512() {
    let topic = create_topic(1).await;
    let consumer = TopicConsumer::start(&topic, 1);
    let sink = KafkaSink::connect(sasl_config(&sasl_password(), "ca.pem"))
        .await
        .unwrap();
    let event = kafka_event();
    let route = Route {
        destination: topic.clone(),
        key: event.partition_key.clone(),
    };
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match sink.publish(&event, &route).await {
            Outcome::Delivered => break,
            Outcome::Retry(error) if tokio::time::Instant::now() < until => {
                eprintln!("retrying: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("publish over SASL_SSL: {other:?}"),
        }
    }
    let received = consumer.wait_for(1, DEADLINE).await;
    assert_eq!(
        received[0].header("outbox-event-id"),
        Some(event.event_id.to_string())
    );
    sink.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_kafka_password_or_ca_fails_at_start_naming_the_setting() {
    let wrong_password = KafkaSink::connect(sasl_config("not-the-password", "ca.pem"))
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong_password.contains("sasl."), "{wrong_password}");
    assert!(
        !wrong_password.contains("not-the-password"),
        "the error shows the password: {wrong_password}"
    );

    let wrong_ca = KafkaSink::connect(sasl_config(&sasl_password(), "other-ca.pem"))
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong_ca.contains("ssl.ca.location"), "{wrong_ca}");
}
