//! Unit tests of the RabbitMQ sink (no broker).

use super::*;

#[test]
fn urls_are_shown_without_the_password() {
    assert_eq!(
        mask_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
        "amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(mask_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    assert_eq!(mask_url("amqp://user@host"), "amqp://user@host");
    // An unencoded '@' in the password is masked as a whole.
    assert_eq!(mask_url("amqp://u:p@ss@host/v"), "amqp://u:***@host/v");
    let config = RabbitMqConfig {
        url: "amqps://relay:hunter22@mq.example:5671/prod".into(),
        app_id: "outbox-relay".into(),
        connect_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(5),
        declare_exchanges: vec![],
        tls_ca_file: None,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        max_in_flight_per_key: 1,
    };
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("hunter22") && shown.contains("relay:***@mq.example"),
        "{shown}"
    );
}

#[test]
fn only_a_close_about_what_the_client_sent_makes_its_events_suspects() {
    let hard = |e: AMQPHardError| {
        lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Hard(e),
            "FRAME_ERROR - type 2".into(),
        )))
    };
    for fault in [
        AMQPHardError::FRAMEERROR,
        AMQPHardError::SYNTAXERROR,
        AMQPHardError::COMMANDINVALID,
        AMQPHardError::UNEXPECTEDFRAME,
    ] {
        assert!(closed_for_what_the_client_sent(&hard(fault)).is_some());
    }
    // A broker restart or an outage is nobody's event's fault.
    assert!(closed_for_what_the_client_sent(&hard(AMQPHardError::CONNECTIONFORCED)).is_none());
    let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    assert!(closed_for_what_the_client_sent(&io).is_none());
}

#[test]
fn ip_hosts_survive_url_parsing() {
    let uri = parse_url("amqp://guest:guest@10.1.2.3:5673/%2f", "-").unwrap();
    assert_eq!(
        (uri.authority.host.as_str(), uri.authority.port),
        ("10.1.2.3", 5673)
    );
    let uri = parse_url("amqp://guest:guest@[::1]:5672/%2f", "-").unwrap();
    assert_eq!(uri.authority.host, "::1");
    let uri = parse_url("amqp://guest:guest@rabbit.internal/%2f", "-").unwrap();
    assert_eq!(uri.authority.host, "rabbit.internal");
    assert_eq!(uri.vhost, "/");
}

#[test]
fn bad_urls_are_refused_without_the_password() {
    let err = parse_url(
        "amqp://guest:topsecret@host:notaport/%2f",
        "amqp://guest:***@host:notaport/%2f",
    )
    .unwrap_err();
    assert!(!err.message.contains("topsecret"), "{err}");
    assert!(err.message.contains("expected amqp://"), "{err}");
}

#[test]
fn names_longer_than_an_amqp_short_string_are_the_events_fault() {
    let event = OutboxEvent {
        sequence: 7,
        event_id: outbox_core::EventId::new(),
        aggregate_type: "order".into(),
        aggregate_id: "42".into(),
        event_type: "order.placed".into(),
        partition_key: "order:42".into(),
        destination: None,
        payload: b"{}".to_vec(),
        headers: Default::default(),
        created_at: Utc::now(),
        attempts: 0,
    };
    let route = Route {
        destination: "orders".into(),
        key: "k".repeat(256),
    };
    let err = publication(&event, &route, &"app".into(), 0).err().unwrap();
    assert!(
        err.message.contains("routing key") && err.message.contains("256 bytes"),
        "{err}"
    );
    assert!(err.is_permanent(), "no retry can make it shorter");
}
