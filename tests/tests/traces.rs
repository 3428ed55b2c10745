//! A trace continues from the writer through the relay to the consumer: the
//! relay's `publish` span of an event and the consumer helper's `outbox.consume`
//! span are children of the span the writer enqueued it in (its `traceparent`
//! header), in a tracing-opentelemetry subscriber. One test per binary: it
//! installs the global subscriber.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::relay::{RunningRelay, raw_config};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_publish_span_is_a_child_of_the_writers_span() {
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-tests")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("order.placed").await;
    let (event, trace_id, writer_span_id) = {
        let span = tracing::info_span!("place_order");
        let _entered = span.enter();
        let context = span.context();
        let writer = context.span().span_context().clone();
        let event = Event::builder("order", "o-1", "order.placed")
            .payload(&serde_json::json!({ "total": 1 }))
            .build()
            .unwrap();
        (event, writer.trace_id(), writer.span_id())
    };
    assert!(event.headers().contains_key("traceparent"));
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
    .enqueue(&mut test.pool.acquire().await.unwrap(), &event)
    .await
    .unwrap();

    // A second queue on the exchange, consumed through the inbox by the helper.
    let connection = lapin::Connection::connect(
        &outbox_tests::amqp::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("traces-{}", uuid::Uuid::new_v4().simple());
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            rabbit.exchange.as_str().into(),
            "order.placed".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();

    let relay = RunningRelay::start(raw_config(&test, &rabbit.exchange).validate().unwrap());
    rabbit.wait_for_distinct(1, Duration::from_secs(30)).await;
    relay.stop().await;

    let (handled_tx, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = outbox_core::consumer::amqp::AmqpConsumer::new(
        test.pool.clone(),
        outbox_core::Inbox::new(test.schema.clone()),
        outbox_core::consumer::ConsumerConfig::new("traces"),
        Recorder(handled_tx),
    );
    let until_handled = async move {
        let _ = tokio::time::timeout(Duration::from_secs(30), handled_rx.recv()).await;
    };
    let stats = consumer.run(&channel, &queue, until_handled).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    assert_eq!(stats.handled, 1, "{stats:?}");
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let publish = spans
        .iter()
        .find(|span| span.name == "publish")
        .unwrap_or_else(|| {
            panic!(
                "a publish span: {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(
        publish.span_context.trace_id(),
        trace_id,
        "the writer's trace"
    );
    assert_eq!(
        publish.parent_span_id, writer_span_id,
        "a child of the writer's span"
    );
    let attribute = |key: &str| {
        publish
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    assert_eq!(attribute("messaging.system").as_deref(), Some("rabbitmq"));
    assert_eq!(
        attribute("messaging.message.id"),
        Some(event.id().to_string())
    );

    let consume = spans
        .iter()
        .find(|span| span.name == "outbox.consume")
        .expect("the consumer helper's span");
    assert_eq!(
        consume.span_context.trace_id(),
        trace_id,
        "the writer's trace"
    );
    assert_eq!(
        consume.parent_span_id, writer_span_id,
        "a child of the writer's span"
    );
}

/// Reports each handled message.
struct Recorder(tokio::sync::mpsc::UnboundedSender<String>);

impl outbox_core::consumer::Handler for Recorder {
    async fn handle(
        &self,
        message: &outbox_core::consumer::Message,
        _conn: &mut sqlx::PgConnection,
    ) -> Result<(), outbox_core::consumer::HandlerError> {
        let _ = self.0.send(message.meta.event_id.clone());
        Ok(())
    }
}
