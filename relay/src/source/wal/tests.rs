//! Unit tests of the WAL source (no server).

use super::*;

#[test]
fn lsn_text_round_trips() {
    let lsn: Lsn = "16/B374D848".parse().unwrap();
    assert_eq!(lsn.0, 0x16_B374_D848);
    assert_eq!(lsn.to_string(), "16/B374D848");
    assert_eq!(Lsn::ZERO.to_string(), "0/0");
    assert!("16B374D848".parse::<Lsn>().is_err());
    assert!("x/1".parse::<Lsn>().is_err());
}

#[test]
fn wal_level_error_names_the_fix() {
    assert!(check_wal_level("logical").is_ok());
    let err = check_wal_level("replica").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ALTER SYSTEM SET wal_level = logical"),
        "{text}"
    );
    assert!(text.contains("restart"), "{text}");
    let relay: crate::error::RelayError = err.into();
    assert!(
        matches!(relay, crate::error::RelayError::Config(_)),
        "{relay}"
    );
}

#[test]
fn names_that_go_into_sql_are_plain_identifiers() {
    let mut config = WalSourceConfig::new(
        "postgres://u@localhost/db",
        SchemaName::default(),
        "s_1",
        "p",
    );
    assert!(config.validate().is_ok());
    for bad in ["", "Slot", "a-b", "a\"b", "1a", "a b", &"s".repeat(64)] {
        config.slot = bad.to_owned();
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                WalError::InvalidConfig {
                    field: "wal.slot",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
    config.slot = "s".to_owned();
    config.publication = "p'; drop".to_owned();
    assert!(config.validate().is_err());
    config.publication = "p".to_owned();
    config.message_prefix = String::new();
    assert!(config.validate().is_err());
}

#[test]
fn passwords_never_show_in_debug_output() {
    let config = WalSourceConfig::new(
        "postgres://relay:s3cr%40t@db:5432/app?sslmode=require&password=other",
        SchemaName::default(),
        "s",
        "p",
    );
    let text = format!("{config:?}");
    assert!(!text.contains("s3cr"), "{text}");
    assert!(!text.contains("other"), "{text}");
    assert!(text.contains("relay:***@db:5432/app"), "{text}");
}

#[test]
fn replication_settings_come_from_the_url() {
    let config = WalSourceConfig::new(
        "postgres://relay:s3cr%40t@db.example:6543/app?sslmode=disable",
        SchemaName::default(),
        "slot_a",
        "pub_a",
    );
    let replication = replication_config(&config, Lsn(42)).unwrap();
    assert_eq!(replication.host, "db.example");
    assert_eq!(replication.port, 6543);
    assert_eq!(replication.user, "relay");
    assert_eq!(replication.password, "s3cr@t");
    assert_eq!(replication.database, "app");
    assert_eq!(replication.slot, "slot_a");
    assert_eq!(replication.start_lsn.0, 42);
    assert_eq!(replication.ack_lsn.map(|l| l.0), Some(42));
    assert_eq!(replication.tls.mode, pgwire_replication::SslMode::Disable);
}

#[test]
fn the_replication_connection_verifies_with_the_urls_ca_and_client_certificate() {
    let config = WalSourceConfig::new(
        "postgres://relay@db.example/app?sslmode=verify-full&sslrootcert=/tls/ca.pem\
         &sslcert=/tls/client.pem&sslkey=/tls/client.key",
        SchemaName::default(),
        "slot_a",
        "pub_a",
    );
    let tls = replication_config(&config, Lsn(42)).unwrap().tls;
    assert_eq!(tls.mode, pgwire_replication::SslMode::VerifyFull);
    let path = |p: &str| Some(std::path::PathBuf::from(p));
    assert_eq!(tls.ca_pem_path, path("/tls/ca.pem"));
    assert_eq!(tls.client_cert_pem_path, path("/tls/client.pem"));
    assert_eq!(tls.client_key_pem_path, path("/tls/client.key"));

    let half = WalSourceConfig::new(
        "postgres://relay@db.example/app?sslmode=require&sslcert=/tls/client.pem",
        SchemaName::default(),
        "slot_a",
        "pub_a",
    );
    let error = replication_config(&half, Lsn(42)).unwrap_err().to_string();
    assert!(error.contains("sslcert and sslkey"), "{error}");
}

#[test]
fn replication_errors_are_classified_by_sqlstate() {
    let server = |m: &str| WalError::replication("streaming")(PgWireError::Server(m.to_owned()));
    assert!(
        server("terminating connection due to administrator command (SQLSTATE 57P01)")
            .is_retryable()
    );
    assert!(
        !server("no pg_hba.conf entry for replication connection (SQLSTATE 28000)").is_retryable()
    );
    assert!(!server("publication \"p\" does not exist (SQLSTATE 42704)").is_retryable());
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    assert!(WalError::replication("streaming")(PgWireError::from(io)).is_retryable());
    assert_eq!(sqlstate_in("x (SQLSTATE 55006)"), Some("55006"));
    assert_eq!(sqlstate_in("no code"), None);
}

#[test]
fn busy_pid_is_read_from_the_server_message() {
    assert_eq!(
        busy_pid("replication slot \"s\" is active for PID 4242 (SQLSTATE 55006)"),
        Some(4242)
    );
    assert_eq!(busy_pid("other"), None);
}
