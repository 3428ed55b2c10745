//! Pipeline isolation: a slow destination holds only its own keys. The relay
//! publishes to real RabbitMQ through a sink wrapper that delays every publish to
//! one exchange (test instrumentation, like the fault proxy), so one route is slow
//! while another is fast.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::config::SinkConfig;
use outbox_relay::event::OutboxEvent;
use outbox_relay::route::Route;
use outbox_relay::sink::rabbitmq::RabbitMqSink;
use outbox_relay::sink::{Outcome, Sink};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::relay::{raw_config, wait_for_empty_outbox};

/// Delays every publish to `slow_exchange` by `delay`, then publishes for real.
struct SlowRoute {
    inner: RabbitMqSink,
    slow_exchange: String,
    delay: Duration,
}

impl Sink for SlowRoute {
    async fn publish(&self, event: &OutboxEvent, route: &Route) -> Outcome {
        if route.destination == self.slow_exchange {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.publish(event, route).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[tokio::test]
async fn a_slow_destination_does_not_hold_back_other_destinations() {
    let test = TestSchema::new().await;
    let fast = RabbitFixture::new().await;
    let slow = RabbitFixture::new().await;
    let mut raw = raw_config(&test, &fast.exchange);
    // A window of 100 events: 500 fast events need several claims while the 20 slow ones are in flight.
    raw.polling.batch_size = Some(100);
    let config = raw.validate().unwrap();
    let SinkConfig::RabbitMq(sink_config) = config.sink.clone() else {
        panic!("raw_config configures RabbitMQ");
    };
    let sink = SlowRoute {
        inner: RabbitMqSink::connect(sink_config).await.unwrap(),
        slow_exchange: slow.exchange.clone(),
        delay: Duration::from_secs(5),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(outbox_relay::run_with_sink(config, sink, stopped));

    // Slow events first: a batch-at-a-time relay would make every later batch of fast
    // events wait for the slow ones.
    let mut events: Vec<Event> = (0..20)
        .map(|i| {
            Event::builder("report", i.to_string(), "report.ready")
                .destination(slow.exchange.as_str())
                .build()
                .unwrap()
        })
        .collect();
    events.extend((0..500).map(|i| {
        Event::builder("item", (i % 50).to_string(), "item.changed")
            .build()
            .unwrap()
    }));
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    outbox
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();

    // All fast events arrive while every slow publish is still waiting out its delay.
    fast.wait_for_distinct(500, Duration::from_secs(4)).await;
    assert_eq!(slow.count(), 0, "the slow route has not delivered yet");
    slow.wait_for_distinct(20, Duration::from_secs(30)).await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    let summary = relay.await.unwrap().unwrap();
    assert_eq!(summary.published, 520);
}
