//! The Kafka sink against a real Kafka-protocol broker: an event counts as delivered
//! only on its delivery report; keys land on the partition a Java client would pick
//! and keep their order; an oversized event is rejected without being sent while
//! other events flow; a wrong address or an unsafe setting fails at start.
//!
//! The broker comes from `scripts/dev-services` (Apache Kafka) or `docker compose up -d`;
//! its address is `KAFKA_BROKERS`, defaulting to `127.0.0.1:9092`. Every test uses
//! its own topics (`test-<uuid>`), so tests run in parallel.
#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, TimeZone, Utc};
use futures_util::future::join_all;
use outbox_core::EventId;
use outbox_relay::event::{OutboxEvent, wire};
use outbox_relay::route::Route;
use outbox_relay::sink::kafka::{KafkaConfig, KafkaSink};
use outbox_relay::sink::{Outcome, Sink};
use outbox_tests::kafka::{
    Received, TopicConsumer, brokers, create_topic, create_topic_with, java_partition, unique_topic,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn config() -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers());
    config.client_id = "outbox-relay-test".into();
    config
}

async fn sink() -> KafkaSink {
    KafkaSink::connect(config()).await.unwrap()
}

fn event(sequence: i64, aggregate_id: &str) -> OutboxEvent {
    OutboxEvent {
        sequence,
        event_id: EventId::new(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.to_owned(),
        event_type: "order.placed".into(),
        partition_key: format!("order:{aggregate_id}"),
        destination: None,
        payload: format!(r#"{{"order":"{aggregate_id}","sequence":{sequence}}}"#).into_bytes(),
        headers: [
            ("tenant".to_owned(), "acme".to_owned()),
            (
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
        ]
        .into(),
        // Sub-second precision, so the microseconds on the wire are checked.
        created_at: Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap(),
        attempts: 0,
    }
}

/// The route the pipeline gives Kafka events: the partition key is the message key.
fn route(topic: &str, event: &OutboxEvent) -> Route {
    Route {
        destination: topic.to_owned(),
        key: event.partition_key.clone(),
    }
}

/// Publish like the pipeline does for one key: one at a time, again after a Retry.
async fn publish_until_settled(sink: &KafkaSink, event: &OutboxEvent, route: &Route) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match sink.publish(event, route).await {
            Outcome::Delivered => return,
            Outcome::Retry(error) => {
                assert!(
                    Instant::now() < deadline,
                    "event {} still retried after {DEADLINE:?}: {error}",
                    event.sequence
                );
                eprintln!("retrying event {}: {error}", event.sequence);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Outcome::Rejected(error) => panic!("event {} rejected: {error}", event.sequence),
        }
    }
}

fn expect_rejected(outcome: Outcome) -> String {
    match outcome {
        Outcome::Rejected(error) => error.message,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_with_key_headers_and_payload_on_the_partition_a_java_client_picks() {
    const PARTITIONS: i32 = 6;
    const KEYS: i64 = 200;
    let topic = create_topic(PARTITIONS).await;
    let consumer = TopicConsumer::start(&topic, PARTITIONS);
    let sink = sink().await;

    let events: Vec<OutboxEvent> = (1..=KEYS).map(|i| event(i, &format!("o-{i}"))).collect();
    let before_ms = Utc::now().timestamp_millis();
    let routes: Vec<Route> = events.iter().map(|e| route(&topic, e)).collect();
    let outcomes = join_all(events.iter().zip(&routes).map(|(e, r)| sink.publish(e, r))).await;
    let after_ms = Utc::now().timestamp_millis();
    for (event, outcome) in events.iter().zip(&outcomes) {
        assert!(
            matches!(outcome, Outcome::Delivered),
            "event {}: {outcome:?}",
            event.sequence
        );
    }

    let received = consumer.wait_for(events.len(), DEADLINE).await;
    let by_id: HashMap<String, &Received> = received
        .iter()
        .map(|m| (m.header(wire::EVENT_ID).unwrap(), m))
        .collect();
    assert_eq!(by_id.len(), events.len(), "each event arrives once");
    for event in &events {
        let message = by_id[&event.event_id.to_string()];
        let key = event.partition_key.as_bytes();
        assert_eq!(message.key.as_deref(), Some(key));
        assert_eq!(
            message.partition,
            java_partition(key, PARTITIONS),
            "key {} is not on the partition a Java client would choose",
            event.partition_key
        );
        assert_eq!(message.payload.as_deref(), Some(event.payload.as_slice()));
        let expected = [
            (wire::EVENT_ID, event.event_id.to_string()),
            (wire::EVENT_TYPE, "order.placed".to_owned()),
            (wire::AGGREGATE_TYPE, "order".to_owned()),
            (wire::AGGREGATE_ID, event.aggregate_id.clone()),
            (wire::PARTITION_KEY, event.partition_key.clone()),
            (
                wire::CREATED_AT,
                event
                    .created_at
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
            (wire::SEQUENCE, event.sequence.to_string()),
            ("tenant", "acme".to_owned()),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
        ];
        for (name, value) in expected {
            assert_eq!(message.header_count(name), 1, "header {name}");
            assert_eq!(
                message.header(name).as_deref(),
                Some(value.as_str()),
                "header {name}"
            );
        }
        assert_eq!(message.headers.len(), 9, "{:?}", message.headers);
        // The Kafka timestamp is the publish time; the event time travels in a header.
        let timestamp = message.timestamp_ms.unwrap();
        assert!(
            (before_ms..=after_ms).contains(&timestamp),
            "timestamp {timestamp} outside the publish window {before_ms}..={after_ms}"
        );
    }
    assert_eq!(
        received
            .iter()
            .map(|m| m.partition)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        PARTITIONS as usize,
        "200 keys spread over all partitions"
    );

    sink.close().await;
    let late = event(KEYS + 1, "late");
    let outcome = sink.publish(&late, &route(&topic, &late)).await;
    assert!(
        matches!(&outcome, Outcome::Retry(e) if e.message.contains("closed")),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn per_key_order_holds_for_5000_events_over_100_keys_published_concurrently() {
    const PARTITIONS: i32 = 6;
    const KEYS: i64 = 100;
    const PER_KEY: i64 = 50;
    let topic = create_topic(PARTITIONS).await;
    let consumer = TopicConsumer::start(&topic, PARTITIONS);
    let sink = Arc::new(sink().await);

    // Sequence numbers interleave keys, as in an outbox written by many transactions.
    let started = Instant::now();
    let lanes = (0..KEYS).map(|k| {
        let sink = sink.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for n in 0..PER_KEY {
                let event = event(n * KEYS + k + 1, &format!("k{k}"));
                publish_until_settled(&sink, &event, &route(&topic, &event)).await;
            }
        })
    });
    for lane in join_all(lanes).await {
        lane.unwrap();
    }
    let published = started.elapsed();
    let total = (KEYS * PER_KEY) as usize;
    let received = consumer.wait_for(total, DEADLINE).await;
    eprintln!(
        "published {total} events over {KEYS} keys in {published:?} ({:.0}/s); all consumed after {:?}",
        total as f64 / published.as_secs_f64(),
        started.elapsed()
    );

    let mut by_key: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for message in &received {
        by_key.entry(message.key_text()).or_default().push(message);
    }
    assert_eq!(by_key.len(), KEYS as usize);
    for (key, mut messages) in by_key {
        let partition = messages[0].partition;
        assert!(
            messages.iter().all(|m| m.partition == partition),
            "key {key} spread over several partitions"
        );
        assert_eq!(partition, java_partition(key.as_bytes(), PARTITIONS));
        messages.sort_by_key(|m| m.offset);
        // First deliveries in offset order must follow sequence order; a duplicate may
        // only repeat an earlier event.
        let mut last = 0;
        let mut first_deliveries = 0;
        for message in messages {
            let sequence: i64 = message.header(wire::SEQUENCE).unwrap().parse().unwrap();
            if sequence > last {
                last = sequence;
                first_deliveries += 1;
            }
        }
        assert_eq!(
            first_deliveries, PER_KEY,
            "key {key}: first deliveries out of sequence order (or missing)"
        );
    }
    sink.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_event_is_rejected_without_being_sent_while_other_events_deliver() {
    let topic = create_topic(3).await;
    let consumer = TopicConsumer::start(&topic, 3);
    let sink = Arc::new(sink().await);

    let mut big = event(1, "big");
    big.payload = vec![b'x'; 2 * 1024 * 1024];
    let others: Vec<OutboxEvent> = (2..=101).map(|i| event(i, &format!("o-{i}"))).collect();

    let rejection = {
        let (sink, topic, big) = (sink.clone(), topic.clone(), big.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = sink.publish(&big, &route(&topic, &big)).await;
            (outcome, started.elapsed())
        })
    };
    let routes: Vec<Route> = others.iter().map(|e| route(&topic, e)).collect();
    let outcomes = join_all(others.iter().zip(&routes).map(|(e, r)| sink.publish(e, r))).await;
    let (outcome, took) = rejection.await.unwrap();
    let message = expect_rejected(outcome);
    eprintln!("rejected in {took:?}: {message}");
    assert!(
        message.contains("over the maximum message size of 1000000 bytes")
            && message.contains("max_message_bytes")
            && message.contains(&format!("payload {}", 2 * 1024 * 1024))
            && message.contains(&topic),
        "{message}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the rejection must not wait for the broker ({took:?})"
    );
    for outcome in &outcomes {
        assert!(matches!(outcome, Outcome::Delivered), "{outcome:?}");
    }

    // A later event of the big one's key lands on the same partition; once it has
    // arrived, the big one would have arrived before it had it been sent.
    let sentinel = event(102, "big");
    publish_until_settled(&sink, &sentinel, &route(&topic, &sentinel)).await;
    let received = consumer.wait_for(others.len() + 1, DEADLINE).await;
    let ids: Vec<String> = received
        .iter()
        .map(|m| m.header(wire::EVENT_ID).unwrap())
        .collect();
    assert!(ids.contains(&sentinel.event_id.to_string()));
    assert!(
        !ids.contains(&big.event_id.to_string()),
        "the oversized event reached the topic"
    );
    assert!(
        received
            .iter()
            .all(|m| m.payload.as_ref().unwrap().len() < 1000)
    );
    assert_eq!(received.len(), others.len() + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_over_the_topics_own_max_message_bytes_is_rejected_before_it_is_sent() {
    // The sink's max_message_bytes is 1,000,000; this topic takes at most 2,000 bytes,
    // which the sink learns from the brokers (DescribeConfigs).
    let topic = create_topic_with(&brokers(), 1, &[("max.message.bytes", "2000")]).await;
    let consumer = TopicConsumer::start(&topic, 1);
    let sink = sink().await;
    let mut big = event(1, "o-1");
    big.payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2_500)).into_bytes();
    let message = expect_rejected(sink.publish(&big, &route(&topic, &big)).await);
    assert!(
        message.contains(&format!(
            "topic '{topic}''s max.message.bytes of 2000 bytes"
        )),
        "{message}"
    );

    let small = event(2, "o-2");
    publish_until_settled(&sink, &small, &route(&topic, &small)).await;
    let received = consumer.wait_for(1, DEADLINE).await;
    assert_eq!(
        received[0].header(wire::EVENT_ID),
        Some(small.event_id.to_string())
    );
    // Nothing else arrives: the big event was never sent.
    let sentinel = event(3, "o-3");
    publish_until_settled(&sink, &sentinel, &route(&topic, &sentinel)).await;
    let received = consumer.wait_for(2, DEADLINE).await;
    assert_eq!(received.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_for_a_missing_topic_is_rejected_as_the_events_own_failure() {
    // The dev broker runs with auto.create.topics.enable=false (as most production
    // clusters do): librdkafka holds the record until message_timeout, then the sink
    // asks the broker whether the topic exists.
    let mut config = config();
    config.message_timeout = Duration::from_secs(2);
    let sink = KafkaSink::connect(config).await.unwrap();
    let topic = unique_topic();
    let event = event(1, "o-1");
    let started = Instant::now();
    let message = expect_rejected(sink.publish(&event, &route(&topic, &event)).await);
    eprintln!("rejected after {:?}: {message}", started.elapsed());
    assert!(
        message.contains(&format!("topic '{topic}' does not exist")),
        "{message}"
    );

    // The timed-out record left the idempotent producer usable for other topics.
    let existing = create_topic(1).await;
    let consumer = TopicConsumer::start(&existing, 1);
    publish_until_settled(&sink, &event, &route(&existing, &event)).await;
    consumer.wait_for(1, DEADLINE).await;

    let message = expect_rejected(
        sink.publish(
            &event,
            &Route {
                destination: "no/slashes".into(),
                key: "k".into(),
            },
        )
        .await,
    );
    assert!(message.contains("does not allow"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_partition_receives_every_event_and_a_missing_one_is_rejected() {
    let topic = create_topic(4).await;
    let consumer = TopicConsumer::start(&topic, 4);
    let mut config = config();
    config.explicit_partition = Some(2);
    let sink = KafkaSink::connect(config).await.unwrap();
    let events: Vec<OutboxEvent> = (1..=20).map(|i| event(i, &format!("o-{i}"))).collect();
    for event in &events {
        publish_until_settled(&sink, event, &route(&topic, event)).await;
    }
    let received = consumer.wait_for(events.len(), DEADLINE).await;
    assert!(received.iter().all(|m| m.partition == 2), "{received:?}");

    let mut config = self::config();
    config.explicit_partition = Some(7);
    config.message_timeout = Duration::from_secs(2);
    let sink = KafkaSink::connect(config).await.unwrap();
    let started = Instant::now();
    let message = expect_rejected(sink.publish(&events[0], &route(&topic, &events[0])).await);
    eprintln!("rejected after {:?}: {message}", started.elapsed());
    assert!(
        message.contains("partition") && message.contains('7'),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_to_a_closed_port_fails_at_start_naming_the_brokers() {
    // A port that was just free: nothing listens on it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let address = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let error = KafkaSink::connect(KafkaConfig::new(&address))
        .await
        .unwrap_err();
    eprintln!("failed after {:?}: {error}", started.elapsed());
    assert!(
        error
            .message
            .contains(&format!("cannot reach the Kafka brokers {address}"))
            && error.message.contains("is Kafka running"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn extra_settings_that_would_break_guarantees_are_refused() {
    for (key, value, says) in [
        ("enable.idempotence", "false", "idempotent producer"),
        ("acks", "1", "acks=all"),
        ("max.in.flight.requests.per.connection", "10", "1 to 5"),
    ] {
        let mut config = config();
        config.extra.insert(key.into(), value.into());
        let started = Instant::now();
        let error = KafkaSink::connect(config).await.unwrap_err();
        assert!(
            error.message.contains(&format!("{key}={value}")) && error.message.contains(says),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused before any I/O"
        );
    }
    // Pass-through settings that keep the guarantees are accepted.
    let mut config = config();
    config
        .extra
        .insert("enable.idempotence".into(), "true".into());
    config.extra.insert("linger.ms".into(), "1".into());
    KafkaSink::connect(config).await.unwrap().close().await;
}

/// A run of one key has many events in flight and reports a delivered prefix and
/// the first failure; the events behind an oversized one are never sent, so
/// nothing of the key goes ahead of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_stops_at_an_oversized_event_and_nothing_behind_it_is_delivered() {
    let topic = create_topic(3).await;
    let consumer = TopicConsumer::start(&topic, 3);
    let sink = sink().await;
    assert!(
        sink.max_in_flight_per_key() > 1,
        "the default overlaps a key's events"
    );
    let mut events: Vec<OutboxEvent> = (1..=300).map(|n| event(n, "hot")).collect();
    events[200].payload = vec![b'x'; 2 * 1024 * 1024];
    let run: Vec<(&OutboxEvent, Route)> = events.iter().map(|e| (e, route(&topic, e))).collect();

    let outcomes = sink.publish_run(&run).await;
    assert_eq!(
        outcomes.len(),
        201,
        "a delivered prefix and the first failure"
    );
    assert!(
        outcomes[..200]
            .iter()
            .all(|o| matches!(o, Outcome::Delivered)),
        "{:?}",
        outcomes
            .iter()
            .position(|o| !matches!(o, Outcome::Delivered))
    );
    let message = expect_rejected(outcomes.into_iter().nth(200).unwrap());
    assert!(message.contains("max_message_bytes"), "{message}");

    // A later event of the key: once it has arrived, anything sent before it has too.
    let sentinel = event(301, "hot");
    publish_until_settled(&sink, &sentinel, &route(&topic, &sentinel)).await;
    let received = consumer.wait_for(201, DEADLINE).await;
    let sequences: Vec<i64> = received
        .iter()
        .map(|m| m.header(wire::SEQUENCE).unwrap().parse().unwrap())
        .collect();
    let expected: Vec<i64> = (1..=200).chain([301]).collect();
    assert_eq!(
        sequences, expected,
        "the prefix in order, then the sentinel; nothing after the oversized event"
    );
    sink.close().await;
}
