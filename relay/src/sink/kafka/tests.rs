//! Unit tests of the Kafka sink (no broker).

use super::*;

fn event() -> OutboxEvent {
    OutboxEvent {
        sequence: 42,
        event_id: outbox_core::EventId::new(),
        aggregate_type: "order".into(),
        aggregate_id: "7".into(),
        event_type: "order.placed".into(),
        partition_key: "order:7".into(),
        destination: None,
        payload: br#"{"total":1}"#.to_vec(),
        headers: [
            ("tenant".to_owned(), "acme".to_owned()),
            (wire::SEQUENCE.to_owned(), "forged".to_owned()),
        ]
        .into(),
        created_at: chrono::TimeZone::timestamp_opt(&Utc, 1_700_000_000, 123_456_789).unwrap(),
        attempts: 0,
    }
}

fn route() -> Route {
    Route {
        destination: "orders".into(),
        key: "order:7".into(),
    }
}

#[test]
fn errors_are_classified_as_the_events_fault_or_transient() {
    use Classification::*;
    use RDKafkaErrorCode as Code;
    let produce = KafkaError::MessageProduction;
    for code in [
        Code::MessageSizeTooLarge,
        Code::MessageBatchTooLarge,
        Code::InvalidRecord,
        Code::UnknownTopicOrPartition,
        Code::UnknownTopic,
        Code::UnknownPartition,
        Code::InvalidTopic,
        Code::TopicAuthorizationFailed,
    ] {
        assert_eq!(classify(&produce(code)), Rejected, "{code:?}");
    }
    for code in [
        Code::QueueFull,
        Code::BrokerTransportFailure,
        Code::AllBrokersDown,
        Code::LeaderNotAvailable,
        Code::NotLeaderForPartition,
        Code::RequestTimedOut,
        Code::NotEnoughReplicas,
        Code::PurgeQueue,
        Code::PurgeInflight,
        Code::SaslAuthenticationFailed,
        Code::Unknown,
    ] {
        assert_eq!(classify(&produce(code)), Retry, "{code:?}");
    }
    assert_eq!(classify(&produce(Code::MessageTimedOut)), TimedOut);
    for code in [
        Code::Fatal,
        Code::ProducerFenced,
        Code::InvalidProducerEpoch,
        Code::OutOfOrderSequenceNumber,
        Code::UnknownProducerId,
    ] {
        assert_eq!(classify(&produce(code)), ProducerFailed, "{code:?}");
    }
    assert_eq!(classify(&KafkaError::Canceled), Retry);
    assert_eq!(
        classify(&KafkaError::Flush(Code::MessageSizeTooLarge)),
        Retry,
        "only errors about this record reject it"
    );
}

#[test]
fn records_carry_the_wire_headers_once_and_count_every_byte() {
    let event = event();
    let record = record_of(&event, &route());
    let value = |name: &str| {
        let found: Vec<_> = record.headers.iter().filter(|(n, _)| *n == name).collect();
        assert_eq!(found.len(), 1, "{name} appears once");
        found[0].1.to_string()
    };
    assert_eq!(value("tenant"), "acme");
    assert_eq!(value(wire::EVENT_ID), event.event_id.to_string());
    assert_eq!(value(wire::SEQUENCE), "42");
    assert_eq!(value(wire::CREATED_AT), "2023-11-14T22:13:20.123456Z");
    assert_eq!(value(wire::PARTITION_KEY), "order:7");
    let headers: usize = record.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    assert_eq!(record.size, "order:7".len() + event.payload.len() + headers);
    assert_eq!(record.header_bytes, headers);
}

#[test]
fn settings_that_break_guarantees_are_refused() {
    let with = |key: &str, value: &str| {
        let mut config = KafkaConfig::new("127.0.0.1:9092");
        config.extra.insert(key.into(), value.into());
        client_config(&config).map(|_| ()).map_err(|e| e.message)
    };
    let err = with("enable.idempotence", "false").unwrap_err();
    assert!(
        err.contains("enable.idempotence") && err.contains("idempotent"),
        "{err}"
    );
    assert!(with("acks", "1").unwrap_err().contains("acks=all"));
    assert!(with("request.required.acks", "0").is_err());
    assert!(with("max.in.flight.requests.per.connection", "6").is_err());
    assert!(with("transactional.id", "x").is_err());
    assert!(with("queuing.strategy", "lifo").is_err());
    assert!(
        with("message.max.bytes", "5000000")
            .unwrap_err()
            .contains("max_message_bytes")
    );
    assert!(
        with("partitioner", "random")
            .unwrap_err()
            .contains("set partitioner")
    );
    assert!(with("acks", "all").is_ok());
    assert!(with("enable.idempotence", "true").is_ok());
    assert!(with("security.protocol", "sasl_ssl").is_ok());
    assert!(with("sasl.password", "hunter22").is_ok());
}

#[test]
fn producer_settings_follow_the_config() {
    let mut config = KafkaConfig::new("k1:9092,k2:9092");
    config.max_message_bytes = 2_000_000;
    config.message_timeout = Duration::from_millis(7_500);
    config
        .extra
        .insert("compression.type".into(), "zstd".into());
    let client = client_config(&config).unwrap();
    assert_eq!(client.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
    assert_eq!(client.get("enable.idempotence"), Some("true"));
    assert_eq!(client.get("acks"), Some("all"));
    assert_eq!(
        client.get("max.in.flight.requests.per.connection"),
        Some("5")
    );
    assert_eq!(client.get("partitioner"), Some("murmur2_random"));
    assert_eq!(client.get("message.timeout.ms"), Some("7500"));
    assert_eq!(client.get("message.max.bytes"), Some("2016384"));
    assert_eq!(client.get("compression.type"), Some("zstd"));
    assert_eq!(
        client_config(&KafkaConfig::new("k:9092"))
            .unwrap()
            .get("compression.type"),
        Some("none")
    );
    let mut bad = KafkaConfig::new("k:9092");
    bad.partitioner = "murmur3".into();
    assert!(client_config(&bad).is_err());
    bad = KafkaConfig::new("k:9092");
    bad.message_timeout = Duration::ZERO;
    assert!(client_config(&bad).is_err());
    bad = KafkaConfig::new(" ");
    assert!(client_config(&bad).is_err());
}

#[test]
fn secrets_are_never_shown() {
    let mut config = KafkaConfig::new("k:9092");
    for (key, value) in [
        ("sasl.password", "hunter22"),
        ("ssl.key.password", "keypass1"),
        ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----abc"),
        ("sasl.oauthbearer.client.secret", "s3cr3t"),
        ("sasl.jaas.config", "password=\"jaaspw\""),
        ("sasl.username", "relay"),
    ] {
        config.extra.insert(key.into(), value.into());
    }
    let shown = format!("{config:?}");
    for secret in ["hunter22", "keypass1", "PRIVATE", "s3cr3t", "jaaspw"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("relay"), "{shown}");
    config.extra.insert("acks".into(), "1".into());
    config
        .extra
        .insert("enable.idempotence".into(), "false".into());
    let err = client_config(&config).unwrap_err();
    assert!(!err.message.contains("hunter22"), "{err}");
}

#[test]
fn topic_names_follow_kafkas_rules() {
    assert!(check_topic_name("orders.v1_x-y").is_ok());
    assert!(check_topic_name("").is_err());
    assert!(check_topic_name("..").is_err());
    assert!(check_topic_name("a/b").is_err());
    assert!(check_topic_name(&"t".repeat(250)).is_err());
}

#[test]
fn a_certificate_failure_behind_a_transport_error_names_ssl_ca_location() {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let error = KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure);
    let hint = super::classify::connect_hint(
        &error,
        Some(
            "sasl_ssl://localhost:9094/bootstrap: error:0A000086:SSL routines::certificate verify failed",
        ),
    );
    assert!(hint.contains("ssl.ca.location"), "{hint}");
    let hint = super::classify::connect_hint(&error, None);
    assert!(hint.contains("is Kafka running"), "{hint}");
}
