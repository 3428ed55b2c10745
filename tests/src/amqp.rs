//! RabbitMQ side of the tests: a fresh exchange and queue per test, and a
//! consumer that records every delivery in arrival order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

/// URL of the RabbitMQ under test.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// One message as the consumer saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// AMQP `message_id` (the event id).
    pub message_id: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// AMQP `type`.
    pub kind: Option<String>,
    /// AMQP `app_id` (tests give each relay its own).
    pub app_id: Option<String>,
    /// Every header, string-valued or integer-valued, as text.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// Whole property set, for property assertions.
    pub properties: lapin::BasicProperties,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

/// The counter `n` in a test event's JSON payload.
pub fn n_of(message: &Received) -> i64 {
    message.json()["n"]
        .as_i64()
        .expect("a payload with a counter n")
}

fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// A fresh topic exchange with one queue bound to `binding`, and a running consumer.
pub struct RabbitFixture {
    /// The exchange's name.
    pub exchange: String,
    /// The queue's name.
    pub queue: String,
    received: Arc<Mutex<Vec<Received>>>,
    _connection: Connection,
}

impl RabbitFixture {
    /// Exchange `test-<uuid>` and queue bound with `#` (everything).
    pub async fn new() -> Self {
        Self::with_binding("#").await
    }

    /// Exchange `test-<uuid>` and a queue bound with `binding`.
    pub async fn with_binding(binding: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let exchange = format!("test-x-{id}");
        let queue = format!("test-q-{id}");
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be running: start it with scripts/dev-services");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: false,
                    durable: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("test-consumer-{id}").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let properties = delivery.properties.clone();
                let headers = properties
                    .headers()
                    .as_ref()
                    .map(|table| {
                        table
                            .inner()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), header_text(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                let message = Received {
                    message_id: properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    kind: properties.kind().as_ref().map(|s| s.as_str().to_owned()),
                    app_id: properties.app_id().as_ref().map(|s| s.as_str().to_owned()),
                    headers,
                    body: delivery.data,
                    properties,
                };
                sink.lock().expect("consumer lock").push(message);
            }
        });
        RabbitFixture {
            exchange,
            queue,
            received,
            _connection: connection,
        }
    }

    /// Also route `binding` to the queue (an operator fixing a route).
    pub async fn bind(&self, binding: &str) {
        let channel = self._connection.create_channel().await.expect("channel");
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
        let _ = channel.close(200, "bound".into()).await;
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("consumer lock").clone()
    }

    /// Number of deliveries so far (duplicates included).
    pub fn count(&self) -> usize {
        self.received.lock().expect("consumer lock").len()
    }

    /// Number of distinct message ids so far.
    pub fn distinct(&self) -> usize {
        let received = self.received.lock().expect("consumer lock");
        received
            .iter()
            .map(|m| m.message_id.as_str())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Wait until `distinct` different message ids arrived, or panic at the deadline.
    pub async fn wait_for_distinct(&self, distinct: usize, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let have = self.distinct();
            if have >= distinct {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "only {have} of {distinct} distinct messages arrived within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Check the per-key order of first deliveries: for each key (header
/// `outbox-partition-key`), the values `order_of(message)` of first deliveries
/// must increase. Returns the number of violations, with examples printed.
pub fn first_delivery_order_violations(
    received: &[Received],
    order_of: impl Fn(&Received) -> i64,
) -> usize {
    let mut seen = HashSet::new();
    let mut last_by_key: HashMap<String, i64> = HashMap::new();
    let mut violations = 0;
    for message in received {
        if !seen.insert(message.message_id.clone()) {
            continue;
        }
        let key = message
            .header("outbox-partition-key")
            .unwrap_or_default()
            .to_owned();
        let value = order_of(message);
        if let Some(&previous) = last_by_key.get(&key)
            && value <= previous
        {
            violations += 1;
            if violations <= 5 {
                eprintln!("order violation on key {key}: {value} first-delivered after {previous}");
            }
        }
        last_by_key.insert(key, value);
    }
    violations
}

/// An order event with a payload, a trace context, a correlation id and a custom
/// header: what [`assert_detailed_order_message`] checks on the wire.
pub fn detailed_order_event() -> outbox_core::Event {
    outbox_core::Event::builder("order", "2", "order.placed")
        .payload(&serde_json::json!({ "order_id": 2, "total_cents": 1999 }))
        .header("schema-version", "3")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("correlation-id", "req-77")
        .build()
        .expect("a valid event")
}

/// Check every AMQP property and header the relay sets for
/// [`detailed_order_event`], published with outbox sequence `sequence`.
pub fn assert_detailed_order_message(
    message: &Received,
    event: &outbox_core::Event,
    sequence: i64,
) {
    let p = &message.properties;
    assert_eq!(message.routing_key, "order.placed");
    assert_eq!(message.kind.as_deref(), Some("order.placed"));
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(message.app_id.as_deref(), Some("outbox-relay"));
    assert!(p.timestamp().is_some(), "publish timestamp set");
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some("req-77")
    );
    assert_eq!(
        message.json(),
        serde_json::json!({ "order_id": 2, "total_cents": 1999 })
    );
    assert_eq!(message.header("schema-version"), Some("3"));
    assert_eq!(
        message.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        message.header("outbox-event-id"),
        Some(event.id().to_string().as_str())
    );
    assert_eq!(message.header("outbox-event-type"), Some("order.placed"));
    assert_eq!(message.header("outbox-aggregate-type"), Some("order"));
    assert_eq!(message.header("outbox-aggregate-id"), Some("2"));
    assert_eq!(message.header("outbox-partition-key"), Some("order:2"));
    assert_eq!(
        message.header("outbox-sequence"),
        Some(sequence.to_string().as_str()),
        "the outbox sequence of the row"
    );
    let created_at = chrono::DateTime::parse_from_rfc3339(
        message
            .header("outbox-created-at")
            .expect("an outbox-created-at header"),
    )
    .expect("an RFC 3339 time");
    assert_eq!(created_at, event.created_at());
}
