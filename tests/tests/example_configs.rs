//! The relay configurations under `examples/config/` (one per source x sink) load
//! through the relay's own parsing (`RawConfig`, unknown fields refused) and
//! validation, and each is the source and sink its name says; so they cannot rot
//! while the config evolves. No service is needed.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Toml};
use outbox_relay::RawConfig;
use outbox_relay::config::SinkConfig;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config")
}

/// Parse and validate one file as `outbox-relay run --config` does, without the
/// environment overrides (so the test sees the file alone).
fn validate(path: &Path) -> outbox_relay::RelayConfig {
    let text = std::fs::read_to_string(path).unwrap();
    let raw: RawConfig = Figment::from(Toml::string(&text))
        .extract()
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    raw.validate()
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn every_example_relay_config_is_valid_and_is_the_source_and_sink_it_names() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let (source, sink) = name.split_once('-').unwrap();
        let config = validate(&path);
        assert_eq!(
            config.wal.is_some(),
            source == "wal",
            "{name}: source must be {source}"
        );
        match (&config.sink, sink) {
            (SinkConfig::RabbitMq(_), "rabbitmq") | (SinkConfig::Kafka(_), "kafka") => {}
            (other, _) => panic!("{name}: the sink is {other:?}, the name says {sink}"),
        }
        assert!(
            config.ops_listen_addr.is_some(),
            "{name}: the examples serve /healthz (docker-compose.yml checks it)"
        );
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "polling-kafka",
            "polling-rabbitmq",
            "wal-kafka",
            "wal-rabbitmq"
        ],
        "one config per source x sink"
    );
}

#[test]
fn polling_and_wal_examples_use_different_schemas_so_a_pair_can_run_side_by_side() {
    let schema = |name: &str| {
        validate(&config_dir().join(format!("{name}.toml")))
            .database
            .schema
            .to_string()
    };
    assert_eq!(schema("polling-rabbitmq"), schema("polling-kafka"));
    assert_eq!(schema("wal-rabbitmq"), schema("wal-kafka"));
    assert_ne!(schema("polling-rabbitmq"), schema("wal-kafka"));
}
