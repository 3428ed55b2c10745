//! The validated settings of each section.

use std::time::Duration;

use outbox_core::SchemaName;

use super::redact_url;

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

/// Validated `[inbox]` settings: which inbox the relay purges, and how far back it keeps ids.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    /// Schema of the `inbox` table.
    pub schema: SchemaName,
    /// The retention window (never shorter than the redelivery horizon).
    pub retention: outbox_core::InboxRetention,
}

/// Where the console's bearer token comes from; its `Debug` hides the value.
#[derive(Clone, PartialEq, Eq)]
pub enum ConsoleToken {
    /// Given in the configuration (`console.token`, e.g. from `OUTBOX_RELAY__CONSOLE__TOKEN`).
    Value(String),
    /// Read from this file when the relay starts (`console.token_file`).
    File(std::path::PathBuf),
}

impl std::fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleToken::Value(_) => f.write_str("Value(***)"),
            ConsoleToken::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Validated console settings (present only when `console.enabled = true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// The bearer token; `None` only when the ops endpoint is bound to a loopback address.
    pub token: Option<ConsoleToken>,
}
