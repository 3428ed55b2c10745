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

use crate::route::Router;

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

/// Default interval of the sampled outbox gauges, in milliseconds.
pub const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 15_000;
/// Default interval of the progress log line, in milliseconds.
pub const DEFAULT_PROGRESS_INTERVAL_MS: u64 = 30_000;
/// Shortest console token accepted, in characters: the token guards retry and purge.
pub const MIN_CONSOLE_TOKEN_CHARS: usize = 16;

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

mod raw;
mod redact;
mod secrets;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use raw::{
    RawConfig, RawConsole, RawDatabase, RawExchange, RawInbox, RawInstance, RawKafka, RawOps,
    RawPipeline, RawPolling, RawRabbitMq, RawWal,
};
pub use redact::{redact_url, scrub_password};
pub use sections::{
    ConsoleConfig, ConsoleToken, DatabaseConfig, InboxConfig, OverBudget, PipelineConfig,
    PoisonPolicy, PollingConfig, SettleMode, SinkConfig, WalConfig,
};
pub use validate::DEFAULT_REDELIVERY_HORIZON_MS;
#[cfg(feature = "kafka")]
use validate::validate_kafka;
#[cfg(feature = "rabbitmq")]
use validate::validate_rabbitmq;
use validate::{
    default_instance_id, ms, validate_console, validate_database, validate_inbox,
    validate_listen_addr, validate_pipeline, validate_polling, validate_wal,
};

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
    /// The instance group (`instance.group`), paused and resumed together.
    pub instance_group: String,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere: `host:port`
    /// with an IP address or a host name.
    pub ops_listen_addr: Option<String>,
    /// How often the outbox gauges are sampled from PostgreSQL (`ops.sample_interval_ms`).
    pub ops_sample_interval: Duration,
    /// How often a progress line is logged while events flow; `None`: never.
    pub progress_interval: Option<Duration>,
    /// The inbox the relay purges, if any (`[inbox]`).
    pub inbox: Option<InboxConfig>,
    /// Longest wait at start for PostgreSQL and the broker; `None`: no limit.
    pub startup_timeout: Option<Duration>,
    /// The dead-letter console under `/console` of the ops endpoint; `None`: off.
    pub console: Option<ConsoleConfig>,
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
        let this = self.read_secret_files()?;
        this.validate_sections()
    }

    fn validate_sections(self) -> Result<RelayConfig, ConfigError> {
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
        let instance_group = match self.instance.group {
            None => crate::pause::DEFAULT_GROUP.to_owned(),
            Some(group) if !group.is_empty() && group.len() <= 200 => group,
            Some(_) => {
                return Err(invalid(
                    "instance.group",
                    "must be 1 to 200 characters",
                    "name the group of relays paused together, or leave it unset",
                ));
            }
        };
        let ops_sample_interval = ms(
            "ops.sample_interval_ms",
            self.ops.sample_interval_ms,
            DEFAULT_SAMPLE_INTERVAL_MS,
            100,
            3_600_000,
        )?;
        let progress_interval = match self.ops.progress_interval_ms {
            Some(0) => None,
            value => Some(ms(
                "ops.progress_interval_ms",
                value,
                DEFAULT_PROGRESS_INTERVAL_MS,
                1_000,
                86_400_000,
            )?),
        };
        let console = validate_console(self.console, ops_listen_addr.as_deref())?;
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
        let inbox = match self.inbox {
            None => None,
            Some(raw) => Some(validate_inbox(raw, &database)?),
        };
        Ok(RelayConfig {
            inbox,
            database,
            polling,
            pipeline,
            wal,
            sink,
            router,
            instance_id,
            instance_group,
            ops_listen_addr,
            ops_sample_interval,
            progress_interval,
            startup_timeout,
            console,
        })
    }
}
