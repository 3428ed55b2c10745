//! The RabbitMQ sink against a real broker: an event counts as delivered only when
//! RabbitMQ confirmed it and routed it to a queue; unroutable events and missing
//! exchanges are the event's own failure, and the sink keeps working after them.
//!
//! RabbitMQ comes from `scripts/dev-services` (or `docker compose up -d`); the url is
//! `AMQP_URL`, defaulting to the local broker. Every test uses its own exchanges and
//! queues (`test-…-<uuid>`), so tests run in parallel.
#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{SecondsFormat, TimeZone, Utc};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use outbox_core::EventId;
use outbox_relay::event::{OutboxEvent, wire};
use outbox_relay::route::Route;
use outbox_relay::sink::rabbitmq::{
    ExchangeDeclaration, ExchangeKind, RabbitMqConfig, RabbitMqSink,
};
use outbox_relay::sink::{Outcome, Sink};

const DEADLINE: Duration = Duration::from_secs(20);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn unique(what: &str) -> String {
    format!("test-{what}-{}", uuid::Uuid::new_v4().simple())
}

fn config(app_id: &str, exchanges: &[&str]) -> RabbitMqConfig {
    RabbitMqConfig {
        url: amqp_url(),
        app_id: app_id.to_owned(),
        connect_timeout: Duration::from_secs(10),
        publish_timeout: Duration::from_secs(15),
        declare_exchanges: exchanges
            .iter()
            .map(|name| ExchangeDeclaration {
                name: (*name).to_owned(),
                kind: ExchangeKind::Topic,
                durable: false,
            })
            .collect(),
        tls_ca_file: None,
        max_message_bytes: outbox_relay::sink::rabbitmq::DEFAULT_MAX_MESSAGE_BYTES,
        max_in_flight_per_key: 1,
    }
}

fn event(sequence: i64) -> OutboxEvent {
    OutboxEvent {
        sequence,
        event_id: EventId::new(),
        aggregate_type: "order".into(),
        aggregate_id: format!("o-{sequence}"),
        event_type: "order.placed".into(),
        partition_key: format!("order:o-{sequence}"),
        destination: None,
        payload: format!(r#"{{"order":{sequence},"total_cents":1999}}"#).into_bytes(),
        headers: [
            ("tenant".to_owned(), "acme".to_owned()),
            (
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
            ("correlation-id".to_owned(), format!("corr-{sequence}")),
        ]
        .into(),
        // Sub-second precision, so the microseconds on the wire are checked.
        created_at: Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap(),
        attempts: 0,
    }
}

fn route(exchange: &str) -> Route {
    Route {
        destination: exchange.to_owned(),
        key: "order.placed".to_owned(),
    }
}

/// The test's own view of the broker, through lapin directly.
struct Broker {
    _connection: Connection,
    channel: Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Broker {
    async fn new() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be running: start it with scripts/dev-services");
        let channel = connection.create_channel().await.unwrap();
        Broker {
            _connection: connection,
            channel,
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// A new queue bound to `exchange` with `binding`; it expires if a test dies before cleaning up.
    async fn bound_queue(&mut self, exchange: &str, binding: &str) -> String {
        let queue = unique("q");
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.queues.push(queue.clone());
        self.exchanges.push(exchange.to_owned());
        queue
    }

    /// A queue `queue` bound to `exchange` (every key) that holds at most `max_length`
    /// messages and nacks further publishes (`x-overflow = reject-publish`).
    async fn full_queue(&self, queue: &str, exchange: &str, max_length: i32) {
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongInt(max_length));
        arguments.insert("x-overflow".into(), long_string("reject-publish"));
        arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        self.channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
            .await
            .unwrap();
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// The next `n` messages of `queue`, or a panic at the deadline.
    async fn take(&self, queue: &str, n: usize) -> Vec<Delivery> {
        let mut consumer = self
            .channel
            .basic_consume(
                queue.into(),
                unique("consumer").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut deliveries = Vec::new();
        while deliveries.len() < n {
            let next = tokio::time::timeout(DEADLINE, consumer.next()).await;
            let delivery = next
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {n} messages arrived in {queue}",
                        deliveries.len()
                    )
                })
                .expect("consumer stream ended")
                .unwrap();
            deliveries.push(delivery);
        }
        deliveries
    }

    /// Wait until `queue` holds `expected` messages (panics at the deadline).
    async fn wait_for_count(&self, queue: &str, expected: u32) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let declared = self
                .channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let count = declared.message_count();
            if count == expected {
                return;
            }
            assert!(
                count < expected,
                "{queue} holds {count} messages, more than the {expected} published"
            );
            assert!(
                tokio::time::Instant::now() < until,
                "{queue} holds {count} of {expected} messages after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn clean_up(self, also_exchanges: &[&str]) {
        for queue in &self.queues {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let exchanges = self
            .exchanges
            .iter()
            .map(String::as_str)
            .chain(also_exchanges.iter().copied());
        for exchange in exchanges.collect::<HashSet<_>>() {
            let _ = self
                .channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes()))
}

fn assert_delivered(outcome: &Outcome) {
    assert!(
        matches!(outcome, Outcome::Delivered),
        "expected Delivered, got {outcome:?}"
    );
}

fn rejection(outcome: Outcome) -> String {
    match outcome {
        Outcome::Rejected(error) => error.message,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn published_event_arrives_with_all_properties() {
    let exchange = unique("x");
    let mut broker = Broker::new().await;
    let sink = RabbitMqSink::connect(config("relay-props", &[&exchange]))
        .await
        .unwrap();
    let queue = broker.bound_queue(&exchange, "order.#").await;
    let event = event(42);

    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_delivered(&sink.publish(&event, &route(&exchange)).await);
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let message = broker.take(&queue, 1).await.remove(0);
    let p = &message.properties;
    assert_eq!(message.data, event.payload);
    assert_eq!(message.exchange.as_str(), exchange);
    assert_eq!(message.routing_key.as_str(), "order.placed");
    assert_eq!(
        p.message_id().as_ref().unwrap().as_str(),
        event.event_id.to_string()
    );
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "order.placed");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "relay-props");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-42");
    let timestamp = p.timestamp().expect("timestamp is set");
    assert!(
        (before..=after).contains(&timestamp),
        "timestamp {timestamp} is the publish time"
    );

    let headers = p.headers().as_ref().expect("headers").inner();
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} is missing"))
    };
    assert_eq!(header("tenant"), &long_string("acme"));
    assert_eq!(
        header("traceparent"),
        &long_string("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(header("correlation-id"), &long_string("corr-42"));
    assert_eq!(
        header(wire::EVENT_ID),
        &long_string(&event.event_id.to_string())
    );
    assert_eq!(header(wire::EVENT_TYPE), &long_string("order.placed"));
    assert_eq!(header(wire::AGGREGATE_TYPE), &long_string("order"));
    assert_eq!(header(wire::AGGREGATE_ID), &long_string("o-42"));
    assert_eq!(header(wire::PARTITION_KEY), &long_string("order:o-42"));
    assert_eq!(
        header(wire::CREATED_AT),
        &long_string("2023-11-14T22:13:20.123456Z")
    );
    assert_eq!(
        header(wire::CREATED_AT),
        &long_string(
            &event
                .created_at
                .to_rfc3339_opts(SecondsFormat::Micros, true)
        )
    );
    assert_eq!(header(wire::SEQUENCE), &AMQPValue::LongLongInt(42));
    assert_eq!(
        headers.len(),
        10,
        "writer headers plus wire headers, nothing else: {headers:?}"
    );

    sink.close().await;
    broker.clean_up(&[]).await;
}

#[tokio::test]
async fn unroutable_event_is_rejected_not_delivered() {
    let exchange = unique("x");
    let sink = RabbitMqSink::connect(config("relay-unroutable", &[&exchange]))
        .await
        .unwrap();

    let reason = rejection(sink.publish(&event(1), &route(&exchange)).await);
    assert!(reason.contains("unroutable"), "{reason}");
    assert!(
        reason.contains(&exchange) && reason.contains("'order.placed'"),
        "{reason}"
    );
    assert!(reason.contains("312 NO_ROUTE"), "{reason}");
    // The channel is still good: the same verdict again, not a Retry.
    let reason = rejection(sink.publish(&event(2), &route(&exchange)).await);
    assert!(reason.contains("unroutable"), "{reason}");

    sink.close().await;
    Broker::new().await.clean_up(&[&exchange]).await;
}

#[tokio::test]
async fn missing_exchange_is_rejected_and_the_sink_keeps_working() {
    let good = unique("x");
    let missing = unique("missing");
    let mut broker = Broker::new().await;
    let sink = RabbitMqSink::connect(config("relay-missing", &[&good]))
        .await
        .unwrap();
    let queue = broker.bound_queue(&good, "#").await;

    let reason = rejection(sink.publish(&event(1), &route(&missing)).await);
    assert!(
        reason.contains(&format!("exchange '{missing}' does not exist")),
        "{reason}"
    );
    assert!(reason.contains("404"), "{reason}");

    let delivered = event(2);
    assert_delivered(&sink.publish(&delivered, &route(&good)).await);
    // Again after the good one: a closed channel never comes back into use.
    rejection(sink.publish(&event(3), &route(&missing)).await);
    assert_delivered(&sink.publish(&event(4), &route(&good)).await);

    let messages = broker.take(&queue, 2).await;
    assert_eq!(
        messages[0]
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        delivered.event_id.to_string()
    );
    broker.wait_for_count(&queue, 0).await;

    sink.close().await;
    broker.clean_up(&[]).await;
}

#[tokio::test]
async fn many_concurrent_publishes_are_all_confirmed() {
    const EVENTS: i64 = 2_000;
    let exchange = unique("x");
    let mut broker = Broker::new().await;
    let sink = Arc::new(
        RabbitMqSink::connect(config("relay-many", &[&exchange]))
            .await
            .unwrap(),
    );
    let queue = broker.bound_queue(&exchange, "#").await;

    let mut tasks = tokio::task::JoinSet::new();
    for sequence in 0..EVENTS {
        let sink = sink.clone();
        let route = route(&exchange);
        tasks.spawn(async move { sink.publish(&event(sequence), &route).await });
    }
    let mut delivered = 0;
    while let Some(outcome) = tasks.join_next().await {
        assert_delivered(&outcome.unwrap());
        delivered += 1;
    }
    assert_eq!(delivered, EVENTS);
    broker.wait_for_count(&queue, 2_000).await;

    sink.close().await;
    broker.clean_up(&[]).await;
}

/// Good, unroutable and misrouted events in flight at once: each gets its own verdict,
/// and exactly the good ones are in the queue. A sink that shared one channel between
/// concurrent publishes could attach a returned message to another event's confirm.
#[tokio::test]
async fn concurrent_good_and_bad_events_each_get_their_own_verdict() {
    const EACH: i64 = 100;
    let good = unique("x");
    let unbound = unique("x-unbound");
    let missing = unique("missing");
    let mut broker = Broker::new().await;
    let sink = Arc::new(
        RabbitMqSink::connect(config("relay-mixed", &[&good, &unbound]))
            .await
            .unwrap(),
    );
    let queue = broker.bound_queue(&good, "#").await;

    let mut tasks = tokio::task::JoinSet::new();
    for sequence in 0..EACH * 3 {
        let sink = sink.clone();
        let exchange = [&good, &unbound, &missing][(sequence % 3) as usize].clone();
        tasks.spawn(async move {
            let event = event(sequence);
            let outcome = sink.publish(&event, &route(&exchange)).await;
            (sequence % 3, event.event_id, outcome)
        });
    }
    let mut good_ids = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (kind, id, outcome) = joined.unwrap();
        match (kind, outcome) {
            (0, Outcome::Delivered) => {
                good_ids.insert(id.to_string());
            }
            (1, Outcome::Rejected(error)) if error.message.contains("unroutable") => {}
            (2, Outcome::Rejected(error)) if error.message.contains("does not exist") => {}
            (kind, outcome) => panic!("event of kind {kind} got {outcome:?}"),
        }
    }
    assert_eq!(good_ids.len(), EACH as usize);
    let arrived: HashSet<String> = broker
        .take(&queue, EACH as usize)
        .await
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(arrived, good_ids);
    broker.wait_for_count(&queue, 0).await;

    sink.close().await;
    broker.clean_up(&[&unbound]).await;
}

/// A queue that is full and rejects publishes makes RabbitMQ nack: the broker could not
/// take the event now, so it is retried (and never counted as delivered).
#[tokio::test]
async fn nacked_event_is_retried_not_delivered() {
    let exchange = unique("x");
    let queue = unique("q-full");
    let broker = Broker::new().await;
    let sink = RabbitMqSink::connect(config("relay-nack", &[&exchange]))
        .await
        .unwrap();
    broker.full_queue(&queue, &exchange, 1).await;

    assert_delivered(&sink.publish(&event(1), &route(&exchange)).await);
    match sink.publish(&event(2), &route(&exchange)).await {
        Outcome::Retry(error) => assert!(error.message.contains("nacked"), "{error}"),
        other => panic!("expected Retry after a nack, got {other:?}"),
    }
    broker.wait_for_count(&queue, 1).await;

    sink.close().await;
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    broker.clean_up(&[&exchange]).await;
}

#[tokio::test]
async fn connect_to_a_closed_port_fails_with_a_clear_error() {
    let config = RabbitMqConfig {
        url: "amqp://relay:not-for-logs@127.0.0.1:1/%2f".into(),
        ..config("relay-closed-port", &[])
    };
    let error = RabbitMqSink::connect(config).await.unwrap_err().message;
    assert!(error.contains("127.0.0.1:1"), "names the address: {error}");
    assert!(error.contains("refused"), "names the problem: {error}");
    assert!(
        error.contains("is RabbitMQ running"),
        "says what to check: {error}"
    );
    assert!(
        !error.contains("not-for-logs"),
        "never shows the password: {error}"
    );
}

#[tokio::test]
async fn wrong_password_fails_with_a_clear_error() {
    let url = amqp_url();
    let Some((userinfo, rest)) = url.split_once('@') else {
        panic!("AMQP_URL must contain user:password@")
    };
    let user = userinfo.rsplit_once(':').map_or(userinfo, |(user, _)| user);
    let config = RabbitMqConfig {
        url: format!("{user}:wrong-password-123@{rest}"),
        ..config("relay-bad-login", &[])
    };
    let error = RabbitMqSink::connect(config).await.unwrap_err().message;
    assert!(
        !error.contains("wrong-password-123"),
        "never shows the password: {error}"
    );
    assert!(error.contains("password"), "says what to check: {error}");
}

/// Close the sink's connection from the broker's side, with `rabbitmqctl` (env `RABBITMQCTL`).
/// Returns how many connections were closed, or `None` when `rabbitmqctl` cannot be run.
async fn close_connections_named(name: String) -> Option<usize> {
    tokio::task::spawn_blocking(move || {
        let ctl = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
        let listed = std::process::Command::new(&ctl)
            .args([
                "-q",
                "list_connections",
                "--no-table-headers",
                "pid",
                "client_properties",
            ])
            .output()
            .ok()
            .filter(|output| output.status.success())?;
        let wanted = format!(r#"{{"connection_name","{name}"}}"#);
        let pids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|line| line.contains(&wanted))
            .filter_map(|line| line.split('\t').next().map(str::to_owned))
            .collect();
        for pid in &pids {
            let closed = std::process::Command::new(&ctl)
                .args([
                    "-q",
                    "close_connection",
                    pid,
                    "test closes the relay's connection",
                ])
                .status()
                .unwrap();
            assert!(
                closed.success(),
                "rabbitmqctl close_connection {pid} failed"
            );
        }
        Some(pids.len())
    })
    .await
    .unwrap()
}

/// The broker drops the connection and forgets the (transient) exchange: the next
/// publishes are at worst a Retry, then the sink reconnects and declares the exchange again.
#[tokio::test]
async fn lost_connection_is_a_retry_and_the_sink_reconnects_and_redeclares() {
    let exchange = unique("x");
    let app_id = unique("relay-reconnect");
    let mut broker = Broker::new().await;
    let sink = RabbitMqSink::connect(config(&app_id, &[&exchange]))
        .await
        .unwrap();
    let queue = broker.bound_queue(&exchange, "#").await;
    let first = event(1);
    assert_delivered(&sink.publish(&first, &route(&exchange)).await);

    broker
        .channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    // No silent skip: this test needs rabbitmqctl (scripts/dev-services provides it;
    // with a broker in Docker, point RABBITMQCTL at a wrapper around `docker exec`).
    let closed = close_connections_named(format!("outbox-relay {app_id}"))
        .await
        .expect("rabbitmqctl must be runnable to close the relay's connection (set RABBITMQCTL)");
    assert_eq!(closed, 1, "the sink holds exactly one connection");

    // Re-declared on reconnect, without the binding that went with the old exchange: unroutable.
    let mut retries = 0;
    let reason = loop {
        match sink.publish(&event(2), &route(&exchange)).await {
            Outcome::Retry(error) => {
                retries += 1;
                assert!(
                    retries <= 3,
                    "still no reconnect after {retries} publishes: {error}"
                );
            }
            Outcome::Rejected(error) => break error.message,
            Outcome::Delivered => panic!("delivered to an exchange without bindings"),
        }
    };
    assert!(
        reason.contains("unroutable"),
        "the exchange was declared again: {reason}"
    );

    broker
        .channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let third = event(3);
    assert_delivered(&sink.publish(&third, &route(&exchange)).await);
    let ids: Vec<String> = broker
        .take(&queue, 2)
        .await
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        [first.event_id.to_string(), third.event_id.to_string()]
    );

    sink.close().await;
    broker.clean_up(&[]).await;
}

/// Publish `event(n)` with one extra header of `value_bytes` bytes.
async fn publish_with_header(
    sink: &RabbitMqSink,
    exchange: &str,
    n: i64,
    value_bytes: usize,
) -> Outcome {
    let mut e = event(n);
    e.headers.insert("filler".into(), "f".repeat(value_bytes));
    sink.publish(&e, &route(exchange)).await
}

#[tokio::test]
async fn headers_just_over_the_frame_size_are_a_permanent_rejection_and_just_under_are_delivered() {
    let mut broker = Broker::new().await;
    let exchange = unique("x");
    let sink = RabbitMqSink::connect(config("relay-frame-size", &[&exchange]))
        .await
        .unwrap();
    let queue = broker.bound_queue(&exchange, "#").await;
    let frame_max = broker._connection.configuration().frame_max() as usize;
    // Find the largest header that is sent: every answer on the way is Delivered
    // or a permanent rejection; a Retry would mean the broker closed the connection.
    let (mut fits, mut too_big) = (0, frame_max);
    let (mut n, mut delivered) = (0, 0);
    while too_big - fits > 1 {
        let middle = (fits + too_big) / 2;
        n += 1;
        match publish_with_header(&sink, &exchange, n, middle).await {
            Outcome::Delivered => {
                fits = middle;
                delivered += 1;
            }
            Outcome::Rejected(error) => {
                assert!(error.is_permanent(), "{error}");
                assert!(
                    error.message.contains("frame")
                        && error.message.contains(&frame_max.to_string()),
                    "{error}"
                );
                too_big = middle;
            }
            Outcome::Retry(error) => panic!("{middle}-byte header: the connection failed: {error}"),
        }
    }
    assert!(
        fits + 2048 > frame_max,
        "headers up to about the frame size are sent (largest sent: {fits} of {frame_max})"
    );
    // The connection survived all of it: an ordinary event is still delivered.
    assert!(matches!(
        sink.publish(&event(0), &route(&exchange)).await,
        Outcome::Delivered
    ));
    broker.wait_for_count(&queue, delivered + 1).await;
    sink.close().await;
    broker.clean_up(&[&exchange]).await;
}

/// The sink with `max_in_flight_per_key` events of a key outstanding on one channel.
async fn overlapping_sink(app_id: &str, exchange: &str) -> RabbitMqSink {
    RabbitMqSink::connect(RabbitMqConfig {
        max_in_flight_per_key: 64,
        ..config(app_id, &[exchange])
    })
    .await
    .unwrap()
}

/// With many of a key's events outstanding on one channel, each event still gets
/// its own verdict: a routed run arrives complete and in order, and a run stops at
/// the first unroutable event, with nothing behind it delivered.
#[tokio::test]
async fn a_run_with_many_in_flight_arrives_in_order_and_stops_at_an_unroutable_event() {
    let exchange = unique("x");
    let mut broker = Broker::new().await;
    let sink = overlapping_sink("relay-run", &exchange).await;
    assert_eq!(sink.max_in_flight_per_key(), 64);
    let queue = broker.bound_queue(&exchange, "order.placed").await;

    let events: Vec<OutboxEvent> = (1..=300).map(event).collect();
    let mut run: Vec<(&OutboxEvent, Route)> =
        events.iter().map(|e| (e, route(&exchange))).collect();
    // Event 201 goes where no queue is bound; the rest of the key follows it.
    run[200].1.key = "nobody.listens".to_owned();
    let outcomes = sink.publish_run(&run).await;
    assert_eq!(
        outcomes.len(),
        201,
        "a delivered prefix and the first failure"
    );
    for outcome in &outcomes[..200] {
        assert_delivered(outcome);
    }
    match &outcomes[200] {
        Outcome::Rejected(error) => assert!(error.message.contains("unroutable"), "{error}"),
        other => panic!("expected the unroutable event rejected, got {other:?}"),
    }
    let deliveries = broker.take(&queue, 200).await;
    let ids: Vec<String> = deliveries
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    let expected: Vec<String> = events[..200]
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    assert_eq!(ids, expected, "the prefix, in order");
    broker.wait_for_count(&queue, 0).await;

    // A whole window that routes nowhere fails at its first event.
    let lost: Vec<(&OutboxEvent, Route)> = events[200..]
        .iter()
        .map(|e| {
            (
                e,
                Route {
                    destination: exchange.clone(),
                    key: "nobody.listens".to_owned(),
                },
            )
        })
        .collect();
    let outcomes = sink.publish_run(&lost).await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert!(matches!(&outcomes[0], Outcome::Rejected(_)), "{outcomes:?}");
    sink.close().await;
    broker.clean_up(&[&exchange]).await;
}

/// A queue that is full and rejects publishes nacks a window's events: the run
/// reports the ones it took and the first nack, and nothing after it as delivered.
#[tokio::test]
async fn a_run_stops_at_the_first_nacked_event() {
    let exchange = unique("x");
    let queue = unique("q-full");
    let broker = Broker::new().await;
    let sink = overlapping_sink("relay-run-nack", &exchange).await;
    broker.full_queue(&queue, &exchange, 5).await;

    let events: Vec<OutboxEvent> = (1..=20).map(event).collect();
    let run: Vec<(&OutboxEvent, Route)> = events.iter().map(|e| (e, route(&exchange))).collect();
    let outcomes = sink.publish_run(&run).await;
    assert_eq!(
        outcomes.len(),
        6,
        "five taken, then the first nack: {outcomes:?}"
    );
    for outcome in &outcomes[..5] {
        assert_delivered(outcome);
    }
    match &outcomes[5] {
        Outcome::Retry(error) => assert!(error.message.contains("nacked"), "{error}"),
        other => panic!("expected Retry after a nack, got {other:?}"),
    }
    broker.wait_for_count(&queue, 5).await;
    sink.close().await;
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    broker.clean_up(&[&exchange]).await;
}
