use super::*;

fn raw() -> RawConfig {
    RawConfig {
        database: RawDatabase {
            url: Some("postgres://postgres@127.0.0.1/app".into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn debug_output_never_shows_a_password() {
    let mut c = raw();
    c.database.url =
        Some("postgres://relay:db-Secret-1@db.internal:5432/app?sslmode=require".into());
    c.rabbitmq = Some(RawRabbitMq {
        url: Some("amqp://relay:mq-Secret-2@mq.internal:5672/%2f".into()),
        ..Default::default()
    });
    let shown = format!("{c:?}");
    let config = c.validate().unwrap();
    let shown = format!("{shown} {config:?} {:?}", config.database);
    for secret in ["db-Secret-1", "mq-Secret-2"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("relay:***@db.internal:5432/app"), "{shown}");
    let mut k = raw();
    k.kafka = Some(RawKafka {
        extra: [("sasl.password".to_owned(), "kafka-Secret-3".to_owned())].into(),
        ..Default::default()
    });
    assert!(!format!("{k:?}").contains("kafka-Secret-3"));
    assert_eq!(
        redact_url("postgres://u:p@ss/w@host/db?password=x&sslmode=y"),
        "postgres://u:***@host/db?password=***&sslmode=y"
    );
    assert_eq!(redact_url("postgres://host/db"), "postgres://host/db");
}

#[test]
fn a_section_of_the_other_sink_or_source_is_an_error() {
    let mut c = raw();
    c.kafka = Some(RawKafka::default());
    let e = c.validate().unwrap_err();
    assert_eq!(e.field, "kafka");
    assert!(e.fix.contains("sink = \"kafka\""), "{e}");
    let mut c = raw();
    c.sink = Some("kafka".into());
    c.rabbitmq = Some(RawRabbitMq::default());
    assert_eq!(c.validate().unwrap_err().field, "rabbitmq");
    let mut c = raw();
    c.sink = Some("kafka".into());
    c.kafka = Some(RawKafka::default());
    c.validate().unwrap();
    for bad in ["kafka:notaport", ",", "kafka-1:9092,:9092"] {
        let mut c = raw();
        c.sink = Some("kafka".into());
        c.kafka = Some(RawKafka {
            brokers: Some(bad.into()),
            ..Default::default()
        });
        assert_eq!(c.validate().unwrap_err().field, "kafka.brokers", "{bad}");
    }
    for ok in [
        "kafka-1:9092,kafka-2:9093",
        "SSL://kafka:9093",
        "[::1]:9092",
        "kafka",
    ] {
        let mut c = raw();
        c.sink = Some("kafka".into());
        c.kafka = Some(RawKafka {
            brokers: Some(ok.into()),
            ..Default::default()
        });
        c.validate().unwrap();
    }
}

#[test]
fn listen_addr_takes_ip_addresses_and_host_names() {
    for ok in [
        "127.0.0.1:9187",
        "[::1]:9187",
        "localhost:9187",
        "relay-0.ops.svc:80",
    ] {
        let mut c = raw();
        c.ops.listen_addr = Some(ok.into());
        assert_eq!(c.validate().unwrap().ops_listen_addr.as_deref(), Some(ok));
    }
    for bad in [
        "localhost",
        "localhost:http",
        ":9187",
        "a b:1",
        "host:70000",
    ] {
        let mut c = raw();
        c.ops.listen_addr = Some(bad.into());
        assert_eq!(c.validate().unwrap_err().field, "ops.listen_addr", "{bad}");
    }
}

#[test]
fn urls_are_parsed_at_validation_and_errors_hide_the_password() {
    let mut c = raw();
    c.database.url = Some("postgres://u:Secret-pw-1@host:notaport/db".into());
    let e = c.validate().unwrap_err();
    assert_eq!(e.field, "database.url");
    assert!(!e.to_string().contains("Secret-pw-1"), "{e}");
    let mut c = raw();
    c.rabbitmq = Some(RawRabbitMq {
        url: Some("amqp://u:Secret-pw-2@host:notaport/%2f".into()),
        ..Default::default()
    });
    let e = c.validate().unwrap_err();
    assert_eq!(e.field, "rabbitmq.url");
    assert!(!e.to_string().contains("Secret-pw-2"), "{e}");
    assert_eq!(
        scrub_password(
            "auth failed for S%40cret1 / S@cret1",
            "postgres://u:S%40cret1@h/d"
        ),
        "auth failed for *** / ***"
    );
}

#[test]
fn the_summary_names_source_sink_and_hosts_without_secrets() {
    let mut c = raw();
    c.database.url = Some("postgres://relay:Secret-3@db.internal:5432/app".into());
    c.rabbitmq = Some(RawRabbitMq {
        url: Some("amqp://relay:Secret-4@mq.internal:5672/%2f".into()),
        ..Default::default()
    });
    let summary = c.validate().unwrap().summary();
    assert!(
        summary.contains("source polling")
            && summary.contains("sink rabbitmq at amqp://relay:***@mq.internal:5672/%2f")
            && summary.contains("db.internal:5432"),
        "{summary}"
    );
    assert!(!summary.contains("Secret"), "{summary}");
}

#[test]
fn defaults_validate() {
    let config = raw().validate().unwrap();
    assert_eq!(config.polling.batch_size, DEFAULT_BATCH_SIZE);
    assert_eq!(config.database.schema.as_str(), "outbox");
    assert_eq!(config.polling.settle, SettleMode::Delete);
}

#[test]
fn errors_name_the_field_and_the_fix() {
    let mut c = raw();
    c.database.url = None;
    let e = c.validate().unwrap_err();
    assert_eq!(e.field, "database.url");
    assert!(e.to_string().contains("OUTBOX_RELAY__DATABASE__URL"), "{e}");

    let mut c = raw();
    c.polling.batch_size = Some(0);
    assert_eq!(c.validate().unwrap_err().field, "polling.batch_size");

    let mut c = raw();
    c.rabbitmq = Some(RawRabbitMq {
        exchange: Some("{nope}".into()),
        ..Default::default()
    });
    assert_eq!(c.validate().unwrap_err().field, "rabbitmq.exchange");

    let mut c = raw();
    c.pipeline.retry_backoff_initial_ms = Some(10_000);
    c.pipeline.retry_backoff_max_ms = Some(100);
    assert_eq!(
        c.validate().unwrap_err().field,
        "pipeline.retry_backoff_max_ms"
    );

    let mut c = raw();
    c.sink = Some("carrier-pigeon".into());
    assert_eq!(c.validate().unwrap_err().field, "sink");
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    let dir = std::env::temp_dir().join(format!("relay-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.toml");
    std::fs::write(&path, "[polling]\nbatch_sise = 10\n").unwrap();
    let e = RawConfig::load(Some(&path)).unwrap_err();
    assert!(e.to_string().contains("batch_sise"), "{e}");
    let missing = RawConfig::load(Some(&dir.join("nope.toml"))).unwrap_err();
    assert_eq!(missing.field, "--config");
}

#[test]
fn wal_source_settings_default_and_validate() {
    let mut c = raw();
    c.source = Some("wal".into());
    let config = c.validate().unwrap();
    let wal = config.wal.expect("source = wal gives WAL settings");
    assert_eq!(wal.slot, "outbox_relay_outbox");
    assert_eq!(wal.publication, "outbox_relay_outbox");
    assert_eq!(wal.max_in_flight_events, DEFAULT_BATCH_SIZE);
    assert_eq!(wal.over_budget, OverBudget::Warn);
    assert!(
        raw().validate().unwrap().wal.is_none(),
        "polling by default"
    );

    let wal_config = |wal: RawWal| {
        let mut c = raw();
        c.source = Some("wal".into());
        c.wal = Some(wal);
        c.validate()
    };
    let e = wal_config(RawWal {
        slot: Some("Bad-Slot".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "wal.slot");
    let e = wal_config(RawWal {
        over_budget: Some("fallback-polling".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "wal.over_budget");
    let e = wal_config(RawWal {
        retained_wal_budget_bytes: Some(1 << 30),
        over_budget: Some("panic".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "wal.over_budget");
    let ok = wal_config(RawWal {
        retained_wal_budget_bytes: Some(1 << 30),
        over_budget: Some("fallback-polling".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ok.wal.unwrap().over_budget, OverBudget::FallbackPolling);

    let mut c = raw();
    c.source = Some("wal".into());
    c.pipeline.poison_policy = Some("block".into());
    let e = c.validate().unwrap_err();
    assert_eq!(e.field, "pipeline.poison_policy");
    assert!(e.fix.contains("skip"), "{e}");

    let mut c = raw();
    c.wal = Some(RawWal::default());
    assert_eq!(
        c.validate().unwrap_err().field,
        "wal",
        "[wal] without source = wal"
    );

    let mut c = raw();
    c.source = Some("logs".into());
    assert_eq!(c.validate().unwrap_err().field, "source");
}

#[test]
fn the_example_file_validates_with_either_source() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let polling: RawConfig = Figment::from(Toml::string(&text)).extract().unwrap();
    polling.validate().unwrap();
    // Uncomment the [wal] section and switch the source.
    let wal_text: String = text
        .lines()
        .map(|line| {
            let uncommented = line.strip_prefix("# ").unwrap_or(line);
            if uncommented.starts_with("[wal]")
                || (uncommented.contains(" = ")
                    && !uncommented.starts_with('#')
                    && line.starts_with("# ")
                    && text_section_is_wal(&text, line))
            {
                uncommented.to_owned()
            } else if line.starts_with("source = ") {
                "source = \"wal\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let wal: RawConfig = Figment::from(Toml::string(&wal_text)).extract().unwrap();
    let config = wal.validate().unwrap();
    let wal = config.wal.unwrap();
    assert_eq!(wal.retained_wal_budget_bytes, Some(10_737_418_240));
}

/// Whether a commented line lies between `# [wal]` and the next section.
fn text_section_is_wal(text: &str, line: &str) -> bool {
    let mut in_wal = false;
    for l in text.lines() {
        if l.starts_with("# [wal]") {
            in_wal = true;
        } else if l.starts_with('[') {
            in_wal = false;
        }
        if l == line {
            return in_wal;
        }
    }
    false
}

fn with_console(
    listen_addr: Option<&str>,
    console: RawConsole,
) -> Result<RelayConfig, ConfigError> {
    let mut c = raw();
    c.ops.listen_addr = listen_addr.map(str::to_owned);
    c.console = console;
    c.validate()
}

#[test]
fn console_is_off_by_default_and_needs_the_ops_endpoint() {
    assert_eq!(raw().validate().unwrap().console, None);
    let error = with_console(
        None,
        RawConsole {
            enabled: Some(true),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(error.field, "console.enabled");
    assert!(error.fix.contains("ops.listen_addr"), "{error}");
    let error = with_console(
        Some("127.0.0.1:9187"),
        RawConsole {
            token: Some("a-token-that-is-long-enough".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(error.field, "console.enabled");
}

#[test]
fn console_needs_a_token_unless_bound_to_loopback() {
    let enabled = || RawConsole {
        enabled: Some(true),
        ..Default::default()
    };
    for local in ["127.0.0.1:9187", "[::1]:9187", "localhost:9187"] {
        let config = with_console(Some(local), enabled()).unwrap();
        assert_eq!(
            config.console,
            Some(ConsoleConfig { token: None }),
            "{local}"
        );
    }
    for public in ["0.0.0.0:9187", "[::]:9187", "relay.internal:9187"] {
        let error = with_console(Some(public), enabled()).unwrap_err();
        assert_eq!(error.field, "console.token", "{public}");
        assert!(
            error.fix.contains("OUTBOX_RELAY__CONSOLE__TOKEN"),
            "{error}"
        );
    }
    let config = with_console(
        Some("0.0.0.0:9187"),
        RawConsole {
            token_file: Some("/run/secrets/console".into()),
            ..enabled()
        },
    )
    .unwrap();
    assert_eq!(
        config.console,
        Some(ConsoleConfig {
            token: Some(ConsoleToken::File("/run/secrets/console".into()))
        })
    );
}

#[test]
fn console_token_is_checked_and_never_shown() {
    let secret = "console-Secret-4-long-enough";
    let raw_console = RawConsole {
        enabled: Some(true),
        token: Some(secret.into()),
        ..Default::default()
    };
    let shown = format!("{raw_console:?}");
    let config = with_console(Some("127.0.0.1:9187"), raw_console).unwrap();
    let shown = format!("{shown} {config:?}");
    assert!(!shown.contains(secret), "{shown}");
    let short = with_console(
        Some("127.0.0.1:9187"),
        RawConsole {
            enabled: Some(true),
            token: Some("short".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(short.field, "console.token");
    assert!(!short.to_string().contains("short\""), "{short}");
    let both = with_console(
        Some("127.0.0.1:9187"),
        RawConsole {
            enabled: Some(true),
            token: Some(secret.into()),
            token_file: Some("/run/secrets/console".into()),
        },
    )
    .unwrap_err();
    assert_eq!(both.field, "console.token_file");
}

#[test]
fn kafka_max_in_flight_per_key_out_of_range_names_the_field_and_the_default() {
    for bad in [0, 10_001] {
        let mut c = raw();
        c.sink = Some("kafka".into());
        c.kafka = Some(RawKafka {
            max_in_flight_per_key: Some(bad),
            ..Default::default()
        });
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "kafka.max_in_flight_per_key", "{bad}");
        assert!(e.fix.contains("default 64"), "{e}");
    }
    let mut c = raw();
    c.sink = Some("kafka".into());
    c.kafka = Some(RawKafka {
        max_in_flight_per_key: Some(1),
        ..Default::default()
    });
    c.validate().unwrap();
}
