//! Configuration: a TOML file, overridden by `OUTBOX_RELAY__SECTION__KEY`
//! environment variables, validated into a [`RelayConfig`] by a pure function
//! that names the bad field and the fix.
//!
//! ```toml
//! sink = "rabbitmq"
//!
//! [database]
//! url = "postgres://relay@db/app"      # or OUTBOX_RELAY__DATABASE__URL
//! schema = "outbox"
//!
//! [polling]
//! batch_size = 500
//! poll_interval_ms = 250
//!
//! [rabbitmq]
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//! exchange = "{aggregate_type}"
//! routing_key = "{event_type}"
//! ```

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use outbox_core::SchemaName;
use serde::Deserialize;

use crate::route::{Router, Template};

/// Prefix of environment overrides; `__` separates sections: `OUTBOX_RELAY__DATABASE__URL`.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY__";

/// Default rows claimed per batch.
pub const DEFAULT_BATCH_SIZE: usize = 1_000;
/// Default longest wait between claims when the outbox is idle, in milliseconds
/// (while events flow the relay polls every few milliseconds).
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 250;
/// Default number of work partitions the relays of one schema share.
pub const DEFAULT_PARTITIONS: u32 = 64;
/// Default partition lease, in milliseconds: a dead relay's work moves within about this long.
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Default number of keys publishing at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Default attempts of an event the broker rejects before it is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default first retry delay, in milliseconds.
pub const DEFAULT_RETRY_BACKOFF_INITIAL_MS: u64 = 500;
/// Default longest retry delay, in milliseconds.
pub const DEFAULT_RETRY_BACKOFF_MAX_MS: u64 = 30_000;
/// Default time to finish in-flight work after a shutdown signal, in milliseconds.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 20_000;
/// Default timeout of one broker publish (until its confirm), in milliseconds.
pub const DEFAULT_PUBLISH_TIMEOUT_MS: u64 = 10_000;
/// Default timeout of connecting to a broker or PostgreSQL, in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Default PostgreSQL statement timeout, in milliseconds.
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 30_000;
/// Default retention of published rows when `settle = "mark"`, in milliseconds (one day).
pub const DEFAULT_PUBLISHED_RETENTION_MS: u64 = 86_400_000;

/// An invalid setting: which one, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {problem}; {fix}")]
pub struct ConfigError {
    /// Dotted path of the setting, e.g. `polling.batch_size`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

fn invalid(field: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The configuration as written, before validation. Units are in the names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `rabbitmq` (or `kafka` when built with that sink).
    pub sink: Option<String>,
    /// `polling` (default) or `wal`.
    pub source: Option<String>,
    /// PostgreSQL settings.
    #[serde(default)]
    pub database: RawDatabase,
    /// Polling source settings.
    #[serde(default)]
    pub polling: RawPolling,
    /// Pipeline settings.
    #[serde(default)]
    pub pipeline: RawPipeline,
    /// WAL source settings (with `source = "wal"`).
    pub wal: Option<RawWal>,
    /// RabbitMQ sink settings.
    pub rabbitmq: Option<RawRabbitMq>,
    /// Kafka sink settings.
    pub kafka: Option<RawKafka>,
    /// This instance.
    #[serde(default)]
    pub instance: RawInstance,
    /// Metrics and health endpoint.
    #[serde(default)]
    pub ops: RawOps,
}

/// `[ops]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOps {
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint, e.g. `0.0.0.0:9187`; unset: none.
    pub listen_addr: Option<String>,
}

/// `[database]`; its `Debug` masks the password of the url.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// PostgreSQL URL.
    pub url: Option<String>,
    /// Schema of the outbox tables.
    pub schema: Option<String>,
    /// Connections for settling and dead-lettering (claiming has its own).
    pub pool_size: Option<u32>,
    /// Connect timeout.
    pub connect_timeout_ms: Option<u64>,
    /// Statement timeout set on every connection.
    pub statement_timeout_ms: Option<u64>,
}

/// `[polling]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolling {
    /// Rows claimed per batch.
    pub batch_size: Option<usize>,
    /// Longest wait between claims when idle.
    pub poll_interval_ms: Option<u64>,
    /// Work partitions shared by all relays of the schema.
    pub partitions: Option<u32>,
    /// Partition lease duration.
    pub lease_ms: Option<u64>,
    /// `delete` (default) or `mark`.
    pub settle: Option<String>,
    /// With `mark`: how long published rows are kept.
    pub published_retention_ms: Option<u64>,
}

/// `[wal]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWal {
    /// Replication slot (default `outbox_relay_<schema>`; unique in the cluster).
    pub slot: Option<String>,
    /// Publication on `<schema>.outbox` (default `outbox_relay_<schema>`).
    pub publication: Option<String>,
    /// Prefix of wal-message events (default `outbox`, as the writer's).
    pub message_prefix: Option<String>,
    /// Interval of standby status updates and of recording the confirmed position.
    pub status_interval_ms: Option<u64>,
    /// How long to wait for a slot another session still streams from (rolling restarts).
    pub slot_busy_timeout_ms: Option<u64>,
    /// How often a standby tries to become the leader.
    pub leader_retry_ms: Option<u64>,
    /// Claimed-but-unconfirmed events at most (default: `polling.batch_size`).
    pub max_in_flight_events: Option<usize>,
    /// How often the slot's lag and retained WAL are sampled.
    pub lag_sample_interval_ms: Option<u64>,
    /// WAL the slot may hold back before `over_budget` applies, in bytes; unset: no budget.
    pub retained_wal_budget_bytes: Option<u64>,
    /// `warn` (default) or `fallback-polling` (drop the slot and poll the table).
    pub over_budget: Option<String>,
}

/// `[pipeline]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    /// Keys publishing at once.
    pub max_in_flight: Option<usize>,
    /// Attempts before dead-lettering an event the broker rejects.
    pub max_attempts: Option<u32>,
    /// First retry delay.
    pub retry_backoff_initial_ms: Option<u64>,
    /// Longest retry delay.
    pub retry_backoff_max_ms: Option<u64>,
    /// Time to finish in-flight work after a shutdown signal.
    pub shutdown_grace_ms: Option<u64>,
    /// `skip` (dead-letter a poison event, its key continues) or `block` (hold its key).
    pub poison_policy: Option<String>,
    /// Consecutive failed rounds that open the circuit breaker.
    pub breaker_failure_threshold: Option<u32>,
}

/// `[rabbitmq]`; its `Debug` masks the password of the url.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRabbitMq {
    /// AMQP URL.
    pub url: Option<String>,
    /// Exchange template.
    pub exchange: Option<String>,
    /// Routing-key template.
    pub routing_key: Option<String>,
    /// `app_id` property.
    pub app_id: Option<String>,
    /// Connect timeout.
    pub connect_timeout_ms: Option<u64>,
    /// Publish-until-confirm timeout.
    pub publish_timeout_ms: Option<u64>,
    /// Largest payload sent, in bytes (the broker's `max_message_size`, default 16 MiB);
    /// larger events are dead-lettered at the first attempt.
    pub max_message_bytes: Option<usize>,
    /// Exchanges to declare at start.
    #[serde(default)]
    pub declare_exchanges: Vec<RawExchange>,
    /// PEM file of the CA that signed the broker's certificate (amqps).
    pub tls_ca_file: Option<String>,
}

/// `[kafka]`; its `Debug` shows the names of the `extra` settings, not their values.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: Option<String>,
    /// Topic template.
    pub topic: Option<String>,
    /// Message-key template (default `{partition_key}`: per-key order is per-partition order).
    pub key: Option<String>,
    /// Producer `client.id`.
    pub client_id: Option<String>,
    /// librdkafka partitioner (default `murmur2_random`, as Java clients).
    pub partitioner: Option<String>,
    /// Bound on one delivery including librdkafka's own retries.
    pub message_timeout_ms: Option<u64>,
    /// Largest event accepted (key + payload + headers), in bytes.
    pub max_message_bytes: Option<usize>,
    /// Send every event to this partition.
    pub partition: Option<i32>,
    /// Further librdkafka settings (security.protocol, sasl.*, ssl.*), passed through.
    #[serde(default)]
    pub extra: std::collections::BTreeMap<String, String>,
}

/// `[[rabbitmq.declare_exchanges]]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExchange {
    /// Exchange name.
    pub name: String,
    /// `topic` (default), `direct`, `fanout` or `headers`.
    pub kind: Option<String>,
    /// Survives a broker restart (default true).
    pub durable: Option<bool>,
}

/// `[instance]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    /// Name of this relay instance in leases and logs (default: host-pid-random).
    pub id: Option<String>,
    /// How long to wait at start for PostgreSQL and the broker to answer before
    /// giving up; unset: wait as long as it takes (logging every attempt).
    pub startup_timeout_ms: Option<u64>,
}

/// How published rows are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleMode {
    /// Delete the row once the broker confirmed it.
    Delete,
    /// Set `published_at` and delete it after the retention period.
    Mark {
        /// How long published rows are kept.
        retention: Duration,
    },
}

/// Validated PostgreSQL settings; its `Debug` masks the password of the url.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// PostgreSQL URL.
    pub url: String,
    /// Schema of the outbox tables.
    pub schema: SchemaName,
    /// Connections for settling and dead-lettering.
    pub pool_size: u32,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Statement timeout.
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

impl std::fmt::Debug for RawDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDatabase")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for RawRabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRabbitMq")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("app_id", &self.app_id)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("declare_exchanges", &self.declare_exchanges)
            .finish()
    }
}

impl std::fmt::Debug for RawKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: Vec<&str> = self.extra.keys().map(String::as_str).collect();
        f.debug_struct("RawKafka")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("client_id", &self.client_id)
            .field("partitioner", &self.partitioner)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("partition", &self.partition)
            .field("extra (values hidden)", &extra)
            .finish()
    }
}

/// `url` with the password of its userinfo and any `password=` parameter replaced
/// by `***`, for logs, `Debug` and summaries. Masks too much rather than too
/// little: everything between the first `:` of the userinfo and its last `@`.
pub fn redact_url(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some(scheme_end) = redacted.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = redacted[authority_start..]
            .find(['/', '?', '#'])
            .map_or(redacted.len(), |i| i + authority_start);
        // An unencoded '@' or '/' in the password: the userinfo ends at the last '@'.
        let authority_end = redacted[authority_start..]
            .rfind('@')
            .map_or(authority_end, |at| {
                authority_end.max(authority_start + at + 1)
            });
        if let Some(at) = redacted[authority_start..authority_end].rfind('@') {
            let userinfo = &redacted[authority_start..authority_start + at];
            if let Some(colon) = userinfo.find(':') {
                redacted.replace_range(authority_start + colon + 1..authority_start + at, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(found) = redacted[from..].to_ascii_lowercase().find("password=") {
        let value_start = from + found + "password=".len();
        let value_end = redacted[value_start..]
            .find('&')
            .map_or(redacted.len(), |i| i + value_start);
        redacted.replace_range(value_start..value_end, "***");
        from = value_start + 3;
    }
    redacted
}

/// The password of `url`'s userinfo, as written (still percent-encoded).
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password).filter(|p| !p.is_empty())
}

/// `text` (a library's error message) with `url`'s password, raw and
/// percent-decoded, replaced by `***`. Passwords shorter than four characters
/// are left alone: replacing them would garble the message.
pub fn scrub_password(text: &str, url: &str) -> String {
    let mut text = text.replace(url, &redact_url(url));
    if let Some(password) = url_password(url) {
        let decoded = percent_decode(password);
        for secret in [password, decoded.as_str()] {
            if secret.len() >= 4 {
                text = text.replace(secret, "***");
            }
        }
    }
    text
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Validated polling-source settings.
#[derive(Clone, Debug)]
pub struct PollingConfig {
    /// Rows claimed per batch.
    pub batch_size: usize,
    /// Longest wait between claims when idle (the adaptive poll backs off to it).
    pub poll_interval: Duration,
    /// Work partitions.
    pub partitions: u32,
    /// Partition lease duration.
    pub lease: Duration,
    /// How published rows are settled.
    pub settle: SettleMode,
}

/// Validated pipeline settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Keys publishing at once.
    pub max_in_flight: usize,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// First retry delay.
    pub retry_backoff_initial: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
    /// Time to finish in-flight work after a shutdown signal.
    pub shutdown_grace: Duration,
    /// What happens to an event that used up its attempts.
    pub poison_policy: PoisonPolicy,
    /// Consecutive failed rounds that open the circuit breaker.
    pub breaker_failure_threshold: u32,
}

/// What happens to an event the broker keeps rejecting, once it used up its attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// Move it to the dead-letter table; its key continues with the next event.
    Skip,
    /// Keep it in the outbox, parked, and hold its key until an operator retries
    /// it (`outbox-relay dead-letters retry`); other keys flow.
    Block,
}

/// What the WAL source does when its slot holds back more WAL than the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverBudget {
    /// Log a warning (once a minute) and keep streaming.
    Warn,
    /// Stop streaming, drop the slot (PostgreSQL frees the WAL) and relay from the
    /// table with the polling source for the rest of the run. Table-mode events
    /// are all still rows, so nothing of them is lost; wal-message events not yet
    /// relayed are gone with the slot.
    FallbackPolling,
}

/// Validated WAL-source settings.
#[derive(Clone, Debug)]
pub struct WalConfig {
    /// Replication slot.
    pub slot: String,
    /// Publication on `<schema>.outbox`.
    pub publication: String,
    /// Prefix of wal-message events.
    pub message_prefix: String,
    /// Interval of standby status updates.
    pub status_interval: Duration,
    /// Wait for a busy slot.
    pub slot_busy_timeout: Duration,
    /// How often a standby tries to become the leader.
    pub leader_retry: Duration,
    /// Received-but-unconfirmed events at most before the stream is paused.
    pub max_in_flight_events: usize,
    /// How often lag is sampled.
    pub lag_sample_interval: Duration,
    /// Retained-WAL budget in bytes.
    pub retained_wal_budget_bytes: Option<u64>,
    /// What happens over the budget.
    pub over_budget: OverBudget,
}

impl WalConfig {
    /// The settings of the [`crate::source::wal::WalSource`] for `database`.
    pub fn source_config(&self, database: &DatabaseConfig) -> crate::source::wal::WalSourceConfig {
        let mut config = crate::source::wal::WalSourceConfig::new(
            database.url.clone(),
            database.schema.clone(),
            self.slot.clone(),
            self.publication.clone(),
        );
        config.message_prefix = self.message_prefix.clone();
        config.status_interval = self.status_interval;
        config.connect_timeout = database.connect_timeout;
        config.slot_busy_timeout = self.slot_busy_timeout;
        config
    }
}

/// Which sink to publish to, with its settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum SinkConfig {
    /// RabbitMQ.
    #[cfg(feature = "rabbitmq")]
    RabbitMq(crate::sink::rabbitmq::RabbitMqConfig),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(crate::sink::kafka::KafkaConfig),
}

/// The validated configuration of one relay instance.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// PostgreSQL.
    pub database: DatabaseConfig,
    /// Polling source.
    pub polling: PollingConfig,
    /// Pipeline.
    pub pipeline: PipelineConfig,
    /// The WAL source, when `source = "wal"`; `None`: the polling source.
    pub wal: Option<WalConfig>,
    /// Sink.
    pub sink: SinkConfig,
    /// Event → destination and key.
    pub router: Router,
    /// Name of this instance.
    pub instance_id: String,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere: `host:port`
    /// with an IP address or a host name.
    pub ops_listen_addr: Option<String>,
    /// Longest wait at start for PostgreSQL and the broker; `None`: no limit.
    pub startup_timeout: Option<Duration>,
}

impl RelayConfig {
    /// One line for `--check-config`: source, sink, and the hosts it will talk to,
    /// with every password masked.
    pub fn summary(&self) -> String {
        let source = match &self.wal {
            None => "polling".to_owned(),
            Some(wal) => format!("wal (slot {}, publication {})", wal.slot, wal.publication),
        };
        let sink = match &self.sink {
            #[cfg(feature = "rabbitmq")]
            SinkConfig::RabbitMq(rabbitmq) => format!("rabbitmq at {}", redact_url(&rabbitmq.url)),
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(kafka) => format!("kafka at {}", kafka.brokers),
        };
        format!(
            "source {source}, sink {sink}, database {} (schema {}), ops endpoint {}, \
             batch {}, partitions {}, lease {} ms, in-flight {}, max attempts {}, poison policy {:?}",
            redact_url(&self.database.url),
            self.database.schema,
            self.ops_listen_addr.as_deref().unwrap_or("off"),
            self.polling.batch_size,
            self.polling.partitions,
            self.polling.lease.as_millis(),
            self.pipeline.max_in_flight,
            self.pipeline.max_attempts,
            self.pipeline.poison_policy,
        )
    }
}

impl RawConfig {
    /// Read a TOML file (if given) and apply `OUTBOX_RELAY__…` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<RawConfig, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                    "pass the path of a relay.toml (see relay.example.toml)",
                ));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        figment.extract().map_err(|e| {
            let field = e.path.join(".");
            invalid(
                if field.is_empty() { "config" } else { &field },
                e.to_string(),
                "check the spelling and type against relay.example.toml",
            )
        })
    }

    /// Check every setting and resolve defaults.
    pub fn validate(self) -> Result<RelayConfig, ConfigError> {
        let database = validate_database(self.database)?;
        let polling = validate_polling(self.polling)?;
        let pipeline = validate_pipeline(self.pipeline)?;
        let wal = match self.source.as_deref().unwrap_or("polling") {
            "polling" => {
                if self.wal.is_some() {
                    return Err(invalid(
                        "wal",
                        "is set but source is \"polling\"",
                        "set source = \"wal\", or remove the [wal] section",
                    ));
                }
                None
            }
            "wal" => {
                if pipeline.poison_policy == PoisonPolicy::Block {
                    return Err(invalid(
                        "pipeline.poison_policy",
                        "\"block\" cannot be used with source = \"wal\": a blocked event would hold the slot's \
                         confirmed position, and PostgreSQL would keep WAL without bound",
                        "use poison_policy = \"skip\" (dead-letter table) with the WAL source, or the polling source",
                    ));
                }
                if let SettleMode::Mark { .. } = polling.settle {
                    return Err(invalid(
                        "polling.settle",
                        "\"mark\" cannot be used with source = \"wal\": the WAL source deletes a row once \
                         its transaction is confirmed",
                        "remove polling.settle (or set \"delete\") with the WAL source",
                    ));
                }
                Some(validate_wal(
                    self.wal.unwrap_or_default(),
                    &database,
                    polling.batch_size,
                )?)
            }
            other => {
                return Err(invalid(
                    "source",
                    format!("unknown source {other:?}"),
                    "use \"polling\" or \"wal\"",
                ));
            }
        };
        let sink_name = self.sink.as_deref().unwrap_or("rabbitmq");
        if self.kafka.is_some() && sink_name != "kafka" {
            return Err(invalid(
                "kafka",
                format!("is set but sink is {sink_name:?}"),
                "set sink = \"kafka\", or remove the [kafka] section",
            ));
        }
        if self.rabbitmq.is_some() && sink_name != "rabbitmq" {
            return Err(invalid(
                "rabbitmq",
                format!("is set but sink is {sink_name:?}"),
                "set sink = \"rabbitmq\", or remove the [rabbitmq] section",
            ));
        }
        let (sink, router) = match sink_name {
            #[cfg(feature = "rabbitmq")]
            "rabbitmq" => validate_rabbitmq(self.rabbitmq.unwrap_or_default())?,
            #[cfg(feature = "kafka")]
            "kafka" => validate_kafka(self.kafka.unwrap_or_default(), polling.lease)?,
            other => {
                return Err(invalid(
                    "sink",
                    format!("unknown or not compiled-in sink {other:?}"),
                    "use \"rabbitmq\" or \"kafka\"",
                ));
            }
        };
        let instance_id = match self.instance.id {
            Some(id) => {
                if id.is_empty() || id.len() > 200 {
                    return Err(invalid(
                        "instance.id",
                        "must be 1 to 200 characters",
                        "choose a shorter name or leave it unset",
                    ));
                }
                id
            }
            None => default_instance_id(),
        };
        let ops_listen_addr = match self.ops.listen_addr.as_deref() {
            None | Some("") => None,
            Some(addr) => Some(validate_listen_addr(addr)?),
        };
        let startup_timeout = match self.instance.startup_timeout_ms {
            None => None,
            Some(ms_value) => Some(ms(
                "instance.startup_timeout_ms",
                Some(ms_value),
                0,
                1_000,
                86_400_000,
            )?),
        };
        Ok(RelayConfig {
            database,
            polling,
            pipeline,
            wal,
            sink,
            router,
            instance_id,
            ops_listen_addr,
            startup_timeout,
        })
    }
}

/// `host:port` where the host is an IP address (IPv6 in brackets) or a host name;
/// names are resolved when the endpoint is bound.
fn validate_listen_addr(addr: &str) -> Result<String, ConfigError> {
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

fn ms(
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

fn validate_database(raw: RawDatabase) -> Result<DatabaseConfig, ConfigError> {
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

fn validate_polling(raw: RawPolling) -> Result<PollingConfig, ConfigError> {
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

fn validate_wal(
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

fn validate_pipeline(raw: RawPipeline) -> Result<PipelineConfig, ConfigError> {
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
fn validate_rabbitmq(raw: RawRabbitMq) -> Result<(SinkConfig, Router), ConfigError> {
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
    };
    Ok((
        SinkConfig::RabbitMq(config),
        Router::new(exchange_template, key_template),
    ))
}

#[cfg(feature = "kafka")]
fn validate_kafka(raw: RawKafka, lease: Duration) -> Result<(SinkConfig, Router), ConfigError> {
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
    config.extra = raw.extra;
    Ok((
        SinkConfig::Kafka(config),
        Router::new(topic_template, key_template),
    ))
}

fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

#[cfg(test)]
mod tests {
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
}
