//! One pure function per section: raw settings in, validated settings or the
//! error that names the field and the fix out.
//!
//! Over 600 lines on purpose: most of it is the error texts (field, problem, fix)
//! next to the check they belong to; each function stays short.

use std::time::Duration;

use outbox_core::SchemaName;

use super::*;
use crate::route::{Router, Template};

/// `host:port` where the host is an IP address (IPv6 in brackets) or a host name;
/// names are resolved when the endpoint is bound.
pub(super) fn validate_listen_addr(addr: &str) -> Result<String, ConfigError> {
    let bad = |problem: String| {
        invalid(
            "ops.listen_addr",
            problem,
            "use host:port, e.g. 0.0.0.0:9187, [::]:9187 or localhost:9187",
        )
    };
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(addr.to_owned());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad(format!("{addr:?} has no port")));
    };
    if port.parse::<u16>().is_err() {
        return Err(bad(format!("{port:?} in {addr:?} is not a port number")));
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !name_ok {
        return Err(bad(format!(
            "{host:?} in {addr:?} is not a host name or IP address"
        )));
    }
    Ok(addr.to_owned())
}

pub(super) fn ms(
    field: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if !(min..=max).contains(&value) {
        return Err(invalid(
            field,
            format!("{value} ms is out of range"),
            format!("use {min} to {max} ms (default {default})"),
        ));
    }
    Ok(Duration::from_millis(value))
}

pub(super) fn validate_database(raw: RawDatabase) -> Result<DatabaseConfig, ConfigError> {
    let url = raw.url.ok_or_else(|| {
        invalid(
            "database.url",
            "is not set",
            "set it in the file or as OUTBOX_RELAY__DATABASE__URL=postgres://user@host/db",
        )
    })?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            "database.url",
            "is not a postgres:// URL",
            "use postgres://user:password@host:5432/database",
        ));
    }
    if let Err(error) = url.parse::<sqlx::postgres::PgConnectOptions>() {
        return Err(invalid(
            "database.url",
            format!(
                "{} does not parse: {}",
                redact_url(&url),
                scrub_password(&error.to_string(), &url)
            ),
            "use postgres://user:password@host:5432/database (percent-encode special characters)",
        ));
    }
    let schema = SchemaName::new(
        raw.schema
            .unwrap_or_else(|| outbox_core::schema::DEFAULT_SCHEMA.to_owned()),
    )
    .map_err(|e| {
        invalid(
            "database.schema",
            e.to_string(),
            "use the schema the writers use (default outbox)",
        )
    })?;
    let pool_size = raw.pool_size.unwrap_or(4);
    if !(1..=64).contains(&pool_size) {
        return Err(invalid(
            "database.pool_size",
            format!("{pool_size} is out of range"),
            "use 1 to 64 (default 4)",
        ));
    }
    Ok(DatabaseConfig {
        url,
        schema,
        pool_size,
        connect_timeout: ms(
            "database.connect_timeout_ms",
            raw.connect_timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS,
            100,
            300_000,
        )?,
        statement_timeout: ms(
            "database.statement_timeout_ms",
            raw.statement_timeout_ms,
            DEFAULT_STATEMENT_TIMEOUT_MS,
            100,
            3_600_000,
        )?,
    })
}

pub(super) fn validate_polling(raw: RawPolling) -> Result<PollingConfig, ConfigError> {
    let batch_size = raw.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if !(1..=10_000).contains(&batch_size) {
        return Err(invalid(
            "polling.batch_size",
            format!("{batch_size} is out of range"),
            "use 1 to 10000 (default 1000)",
        ));
    }
    let partitions = raw.partitions.unwrap_or(DEFAULT_PARTITIONS);
    if !(1..=4096).contains(&partitions) {
        return Err(invalid(
            "polling.partitions",
            format!("{partitions} is out of range"),
            "use 1 to 4096 (default 64), the same on every relay of the schema",
        ));
    }
    let lease = ms(
        "polling.lease_ms",
        raw.lease_ms,
        DEFAULT_LEASE_MS,
        1_000,
        3_600_000,
    )?;
    let settle = match raw.settle.as_deref().unwrap_or("delete") {
        "delete" => {
            if raw.published_retention_ms.is_some() {
                return Err(invalid(
                    "polling.published_retention_ms",
                    "only applies to settle = \"mark\"",
                    "remove it, or set settle = \"mark\"",
                ));
            }
            SettleMode::Delete
        }
        "mark" => SettleMode::Mark {
            retention: ms(
                "polling.published_retention_ms",
                raw.published_retention_ms,
                DEFAULT_PUBLISHED_RETENTION_MS,
                1_000,
                365 * 86_400_000,
            )?,
        },
        other => {
            return Err(invalid(
                "polling.settle",
                format!("unknown mode {other:?}"),
                "use \"delete\" or \"mark\"",
            ));
        }
    };
    Ok(PollingConfig {
        batch_size,
        poll_interval: ms(
            "polling.poll_interval_ms",
            raw.poll_interval_ms,
            DEFAULT_POLL_INTERVAL_MS,
            10,
            600_000,
        )?,
        partitions,
        lease,
        settle,
    })
}

pub(super) fn validate_wal(
    raw: RawWal,
    database: &DatabaseConfig,
    batch_size: usize,
) -> Result<WalConfig, ConfigError> {
    let default_name = format!("outbox_relay_{}", database.schema.as_str().to_lowercase());
    let max_in_flight_events = raw.max_in_flight_events.unwrap_or(batch_size);
    if !(1..=100_000).contains(&max_in_flight_events) {
        return Err(invalid(
            "wal.max_in_flight_events",
            format!("{max_in_flight_events} is out of range"),
            "use 1 to 100000 (default: polling.batch_size)",
        ));
    }
    let over_budget = match raw.over_budget.as_deref().unwrap_or("warn") {
        "warn" => OverBudget::Warn,
        "fallback-polling" => OverBudget::FallbackPolling,
        other => {
            return Err(invalid(
                "wal.over_budget",
                format!("unknown action {other:?}"),
                "use \"warn\" or \"fallback-polling\"",
            ));
        }
    };
    if raw.over_budget.is_some() && raw.retained_wal_budget_bytes.is_none() {
        return Err(invalid(
            "wal.over_budget",
            "is set without a budget",
            "set wal.retained_wal_budget_bytes too, or remove over_budget",
        ));
    }
    if raw.retained_wal_budget_bytes == Some(0) {
        return Err(invalid(
            "wal.retained_wal_budget_bytes",
            "must be positive",
            "use a size in bytes, e.g. 10737418240 for 10 GiB, or leave it unset",
        ));
    }
    let config = WalConfig {
        slot: raw.slot.unwrap_or_else(|| default_name.clone()),
        publication: raw.publication.unwrap_or(default_name),
        message_prefix: raw
            .message_prefix
            .unwrap_or_else(|| crate::source::wal::DEFAULT_MESSAGE_PREFIX.to_owned()),
        status_interval: ms(
            "wal.status_interval_ms",
            raw.status_interval_ms,
            crate::source::wal::DEFAULT_STATUS_INTERVAL_MS,
            10,
            600_000,
        )?,
        slot_busy_timeout: ms(
            "wal.slot_busy_timeout_ms",
            raw.slot_busy_timeout_ms,
            crate::source::wal::DEFAULT_SLOT_BUSY_TIMEOUT_MS,
            0,
            3_600_000,
        )?,
        leader_retry: ms(
            "wal.leader_retry_ms",
            raw.leader_retry_ms,
            1_000,
            10,
            600_000,
        )?,
        max_in_flight_events,
        lag_sample_interval: ms(
            "wal.lag_sample_interval_ms",
            raw.lag_sample_interval_ms,
            5_000,
            10,
            3_600_000,
        )?,
        retained_wal_budget_bytes: raw.retained_wal_budget_bytes,
        over_budget,
    };
    config
        .source_config(database)
        .validate()
        .map_err(|error| match error {
            crate::source::wal::WalError::InvalidConfig {
                field,
                problem,
                fix,
            } => invalid(field, problem, fix),
            other => invalid("wal", other.to_string(), "check the [wal] section"),
        })?;
    Ok(config)
}

pub(super) fn validate_pipeline(raw: RawPipeline) -> Result<PipelineConfig, ConfigError> {
    let max_in_flight = raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    if !(1..=10_000).contains(&max_in_flight) {
        return Err(invalid(
            "pipeline.max_in_flight",
            format!("{max_in_flight} is out of range"),
            "use 1 to 10000 (default 256)",
        ));
    }
    let max_attempts = raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=1000).contains(&max_attempts) {
        return Err(invalid(
            "pipeline.max_attempts",
            format!("{max_attempts} is out of range"),
            "use 1 to 1000 (default 5)",
        ));
    }
    let initial = ms(
        "pipeline.retry_backoff_initial_ms",
        raw.retry_backoff_initial_ms,
        DEFAULT_RETRY_BACKOFF_INITIAL_MS,
        1,
        3_600_000,
    )?;
    let max = ms(
        "pipeline.retry_backoff_max_ms",
        raw.retry_backoff_max_ms,
        DEFAULT_RETRY_BACKOFF_MAX_MS,
        1,
        86_400_000,
    )?;
    if max < initial {
        return Err(invalid(
            "pipeline.retry_backoff_max_ms",
            "is smaller than retry_backoff_initial_ms",
            "make the maximum at least the initial delay",
        ));
    }
    let poison_policy = match raw.poison_policy.as_deref().unwrap_or("skip") {
        "skip" => PoisonPolicy::Skip,
        "block" => PoisonPolicy::Block,
        other => {
            return Err(invalid(
                "pipeline.poison_policy",
                format!("unknown policy {other:?}"),
                "use \"skip\" or \"block\"",
            ));
        }
    };
    let breaker_failure_threshold = raw.breaker_failure_threshold.unwrap_or(3);
    if !(1..=1000).contains(&breaker_failure_threshold) {
        return Err(invalid(
            "pipeline.breaker_failure_threshold",
            format!("{breaker_failure_threshold} is out of range"),
            "use 1 to 1000 (default 3)",
        ));
    }
    Ok(PipelineConfig {
        max_in_flight,
        max_attempts,
        retry_backoff_initial: initial,
        retry_backoff_max: max,
        shutdown_grace: ms(
            "pipeline.shutdown_grace_ms",
            raw.shutdown_grace_ms,
            DEFAULT_SHUTDOWN_GRACE_MS,
            0,
            3_600_000,
        )?,
        poison_policy,
        breaker_failure_threshold,
    })
}

#[cfg(feature = "rabbitmq")]
pub(super) fn validate_rabbitmq(raw: RawRabbitMq) -> Result<(SinkConfig, Router), ConfigError> {
    use crate::sink::rabbitmq::{ExchangeDeclaration, ExchangeKind, RabbitMqConfig};
    let url = raw
        .url
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(invalid(
            "rabbitmq.url",
            "is not an amqp:// or amqps:// URL",
            "use amqp://user:password@host:5672/vhost",
        ));
    }
    if let Err(error) = crate::sink::rabbitmq::parse_url(&url, &redact_url(&url)) {
        return Err(invalid(
            "rabbitmq.url",
            error.message,
            "use amqp://user:password@host:5672/vhost",
        ));
    }
    let exchange = raw
        .exchange
        .unwrap_or_else(|| "{aggregate_type}".to_owned());
    let routing_key = raw.routing_key.unwrap_or_else(|| "{event_type}".to_owned());
    let exchange_template = Template::parse(&exchange)
        .map_err(|e| invalid("rabbitmq.exchange", e.to_string(), "fix the template"))?;
    let key_template = Template::parse(&routing_key)
        .map_err(|e| invalid("rabbitmq.routing_key", e.to_string(), "fix the template"))?;
    let mut declare_exchanges = Vec::new();
    for (i, exchange) in raw.declare_exchanges.into_iter().enumerate() {
        let field = format!("rabbitmq.declare_exchanges[{i}]");
        if exchange.name.is_empty()
            || exchange.name.len() > 255
            || exchange.name.starts_with("amq.")
        {
            return Err(invalid(
                &format!("{field}.name"),
                format!("{:?} cannot be declared", exchange.name),
                "use 1 to 255 characters, not starting with the reserved amq. prefix",
            ));
        }
        let kind = match exchange.kind.as_deref().unwrap_or("topic") {
            "topic" => ExchangeKind::Topic,
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => {
                return Err(invalid(
                    &format!("{field}.kind"),
                    format!("unknown kind {other:?}"),
                    "use topic, direct, fanout or headers",
                ));
            }
        };
        declare_exchanges.push(ExchangeDeclaration {
            name: exchange.name,
            kind,
            durable: exchange.durable.unwrap_or(true),
        });
    }
    let config = RabbitMqConfig {
        url,
        app_id: raw.app_id.unwrap_or_else(|| "outbox-relay".to_owned()),
        connect_timeout: ms(
            "rabbitmq.connect_timeout_ms",
            raw.connect_timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS,
            100,
            300_000,
        )?,
        publish_timeout: ms(
            "rabbitmq.publish_timeout_ms",
            raw.publish_timeout_ms,
            DEFAULT_PUBLISH_TIMEOUT_MS,
            100,
            300_000,
        )?,
        declare_exchanges,
        tls_ca_file: match raw.tls_ca_file {
            Some(path) if path.trim().is_empty() => {
                return Err(invalid(
                    "rabbitmq.tls_ca_file",
                    "is empty",
                    "set it to the PEM file of the CA that signed the broker's certificate, or \
                     leave it out to use the system's trust store",
                ));
            }
            Some(path) => Some(std::path::PathBuf::from(path)),
            None => None,
        },
        max_message_bytes: match raw.max_message_bytes {
            None => crate::sink::rabbitmq::DEFAULT_MAX_MESSAGE_BYTES,
            // RabbitMQ's own ceiling for max_message_size is 512 MiB.
            Some(max @ 1..=536_870_912) => max,
            Some(other) => {
                return Err(invalid(
                    "rabbitmq.max_message_bytes",
                    format!("{other} is out of range"),
                    "use the broker's max_message_size: 1 to 536870912 (default 16777216)",
                ));
            }
        },
        max_in_flight_per_key: match raw.max_in_flight_per_key {
            None => 1,
            Some(n @ 1..=crate::sink::rabbitmq::MAX_IN_FLIGHT_PER_KEY_CEILING) => n,
            Some(other) => {
                return Err(invalid(
                    "rabbitmq.max_in_flight_per_key",
                    format!("{other} is out of range"),
                    "use 1 to 10000 (default 1: each event after its predecessor's confirm; more \
                     only where no queue rejects publishes, e.g. x-overflow = reject-publish)",
                ));
            }
        },
    };
    Ok((
        SinkConfig::RabbitMq(config),
        Router::new(exchange_template, key_template),
    ))
}

#[cfg(feature = "kafka")]
pub(super) fn validate_kafka(
    raw: RawKafka,
    lease: Duration,
) -> Result<(SinkConfig, Router), ConfigError> {
    use crate::sink::kafka::{KafkaConfig, PARTITIONERS};
    let brokers = raw.brokers.unwrap_or_else(|| "127.0.0.1:9092".to_owned());
    if brokers.trim().is_empty() {
        return Err(invalid(
            "kafka.brokers",
            "is empty",
            "list the bootstrap servers as host:port[,host:port]",
        ));
    }
    for broker in brokers.split(',').map(str::trim) {
        let address = broker.split_once("://").map_or(broker, |(_, rest)| rest);
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') => (host, Some(port)),
            _ => (address, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return Err(invalid(
                "kafka.brokers",
                format!("{broker:?} is not host:port"),
                "list the bootstrap servers as host:port[,host:port], e.g. kafka-1:9092,kafka-2:9092",
            ));
        }
    }
    let topic = raw.topic.unwrap_or_else(|| "{aggregate_type}".to_owned());
    let key = raw.key.unwrap_or_else(|| "{partition_key}".to_owned());
    let topic_template = Template::parse(&topic)
        .map_err(|e| invalid("kafka.topic", e.to_string(), "fix the template"))?;
    let key_template = Template::parse(&key)
        .map_err(|e| invalid("kafka.key", e.to_string(), "fix the template"))?;
    let mut config = KafkaConfig::new(brokers);
    if let Some(client_id) = raw.client_id {
        config.client_id = client_id;
    }
    if let Some(partitioner) = raw.partitioner {
        if !PARTITIONERS.contains(&partitioner.as_str()) {
            return Err(invalid(
                "kafka.partitioner",
                format!("unknown partitioner {partitioner:?}"),
                format!(
                    "use one of {} (murmur2_random places keys as Java clients do)",
                    PARTITIONERS.join(", ")
                ),
            ));
        }
        config.partitioner = partitioner;
    }
    config.message_timeout = ms(
        "kafka.message_timeout_ms",
        raw.message_timeout_ms,
        10_000,
        100,
        600_000,
    )?;
    // A delivery may take message_timeout plus the sink's margin; the partition lease must outlast it.
    if config.message_timeout + Duration::from_secs(10) >= lease {
        return Err(invalid(
            "kafka.message_timeout_ms",
            format!(
                "{} ms plus 10 s of margin is not below polling.lease_ms ({} ms)",
                config.message_timeout.as_millis(),
                lease.as_millis()
            ),
            "lower kafka.message_timeout_ms or raise polling.lease_ms, or another relay may take over events still being delivered",
        ));
    }
    if let Some(max) = raw.max_message_bytes {
        if !(1..=crate::sink::kafka::MAX_MESSAGE_BYTES_CEILING).contains(&max) {
            return Err(invalid(
                "kafka.max_message_bytes",
                format!("{max} is out of range"),
                "use at most the topic's max.message.bytes minus 16 KiB (default 1000000)",
            ));
        }
        config.max_message_bytes = max;
    }
    if let Some(partition) = raw.partition {
        if partition < 0 {
            return Err(invalid(
                "kafka.partition",
                "must not be negative",
                "use a partition number from 0, or leave it unset",
            ));
        }
        config.explicit_partition = Some(partition);
    }
    if let Some(per_key) = raw.max_in_flight_per_key {
        if !(1..=crate::sink::kafka::MAX_IN_FLIGHT_PER_KEY_CEILING).contains(&per_key) {
            return Err(invalid(
                "kafka.max_in_flight_per_key",
                format!("{per_key} is out of range"),
                "use 1 to 10000 (default 64; 1 publishes a key's next event only after its predecessor's delivery report)",
            ));
        }
        config.max_in_flight_per_key = per_key;
    }
    config.extra = raw.extra;
    Ok((
        SinkConfig::Kafka(config),
        Router::new(topic_template, key_template),
    ))
}

pub(super) fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

/// The default redelivery horizon of `[inbox]`: 7 days.
pub const DEFAULT_REDELIVERY_HORIZON_MS: u64 = 7 * 86_400_000;

pub(super) fn validate_inbox(
    raw: RawInbox,
    database: &DatabaseConfig,
) -> Result<InboxConfig, ConfigError> {
    let schema = match raw.schema {
        None => database.schema.clone(),
        Some(name) => SchemaName::new(name).map_err(|error| {
            invalid(
                "inbox.schema",
                error.to_string(),
                "use the schema the consumers' Inbox uses",
            )
        })?,
    };
    let Some(retention_ms) = raw.retention_ms else {
        return Err(invalid(
            "inbox.retention_ms",
            "is missing: an [inbox] section purges ids older than it",
            "set retention_ms (at least the redelivery horizon), or remove [inbox]",
        ));
    };
    let horizon = raw
        .redelivery_horizon_ms
        .unwrap_or(DEFAULT_REDELIVERY_HORIZON_MS);
    let retention = outbox_core::InboxRetention::new(
        Duration::from_millis(retention_ms),
        Duration::from_millis(horizon),
    )
    .map_err(|_| {
        invalid(
            "inbox.retention_ms",
            format!(
                "{retention_ms} ms is shorter than inbox.redelivery_horizon_ms ({horizon} ms): \
                 a duplicate arriving after its id was purged would run its handler again"
            ),
            "raise retention_ms, or lower redelivery_horizon_ms if redeliveries end sooner \
             (lease, broker and consumer-group retention)",
        )
    })?;
    Ok(InboxConfig { schema, retention })
}

/// Whether `addr` (a validated `ops.listen_addr`) only accepts local connections.
fn is_loopback_addr(addr: &str) -> bool {
    if let Ok(socket) = addr.parse::<std::net::SocketAddr>() {
        return socket.ip().is_loopback();
    }
    addr.rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

/// `[console]`: off unless `enabled = true`; it needs the ops endpoint, and a token
/// unless that endpoint is bound to a loopback address.
pub(super) fn validate_console(
    raw: RawConsole,
    ops_listen_addr: Option<&str>,
) -> Result<Option<ConsoleConfig>, ConfigError> {
    if raw.enabled != Some(true) {
        if raw.token.is_some() || raw.token_file.is_some() {
            return Err(invalid(
                "console.enabled",
                "is not true but a console token is set",
                "set console.enabled = true, or remove console.token / console.token_file",
            ));
        }
        return Ok(None);
    }
    let Some(addr) = ops_listen_addr else {
        return Err(invalid(
            "console.enabled",
            "the console is served by the ops endpoint, which is off",
            "set ops.listen_addr, e.g. 127.0.0.1:9187 (or disable the console)",
        ));
    };
    let token = match (raw.token, raw.token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "console.token_file",
                "is set together with console.token",
                "keep one: the token file, or OUTBOX_RELAY__CONSOLE__TOKEN",
            ));
        }
        (Some(token), None) => {
            let token = token.trim().to_owned();
            if token.chars().count() < MIN_CONSOLE_TOKEN_CHARS {
                return Err(invalid(
                    "console.token",
                    format!("is shorter than {MIN_CONSOLE_TOKEN_CHARS} characters"),
                    "use a long random token, e.g. the output of `openssl rand -hex 32`",
                ));
            }
            Some(ConsoleToken::Value(token))
        }
        (None, Some(path)) => {
            if path.trim().is_empty() {
                return Err(invalid(
                    "console.token_file",
                    "is empty",
                    "set it to the path of a file holding the token, or remove it",
                ));
            }
            Some(ConsoleToken::File(std::path::PathBuf::from(path)))
        }
        (None, None) => None,
    };
    if token.is_none() && !is_loopback_addr(addr) {
        return Err(invalid(
            "console.token",
            format!(
                "is not set while the ops endpoint listens on {addr}, which is not a loopback address"
            ),
            "set console.token_file or OUTBOX_RELAY__CONSOLE__TOKEN, or bind ops.listen_addr to 127.0.0.1",
        ));
    }
    Ok(Some(ConsoleConfig { token }))
}
