//! The configuration as written (`Raw*`), before validation; `Debug` masks passwords.

use serde::Deserialize;

use super::redact_url;

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
    /// Purging the consumers' inbox ids (`[inbox]`; unset: the relay leaves the inbox alone).
    pub inbox: Option<RawInbox>,
    /// The dead-letter console on the ops endpoint.
    #[serde(default)]
    pub console: RawConsole,
}

/// `[inbox]`: the relay deletes processed-message ids older than the retention.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbox {
    /// Schema of the `inbox` table (default: `database.schema`).
    pub schema: Option<String>,
    /// Keep ids this long, in milliseconds; required in this section.
    pub retention_ms: Option<u64>,
    /// The longest time after which a message may still be delivered again
    /// (default 7 days, Kafka's default topic retention); the retention must not be shorter.
    pub redelivery_horizon_ms: Option<u64>,
}

/// `[console]`; its `Debug` hides the token.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    /// Serve the dead-letter console under `/console` on the ops endpoint (default false).
    pub enabled: Option<bool>,
    /// Bearer token the console asks for; better set as `OUTBOX_RELAY__CONSOLE__TOKEN`.
    pub token: Option<String>,
    /// File holding the bearer token (read at start; surrounding whitespace ignored).
    pub token_file: Option<String>,
}

/// `[ops]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOps {
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint, e.g. `0.0.0.0:9187`; unset: none.
    pub listen_addr: Option<String>,
    /// How often the outbox gauges (backlog, oldest age, dead letters) are sampled
    /// from PostgreSQL, in milliseconds (default 15000).
    pub sample_interval_ms: Option<u64>,
    /// A progress line is logged this often while events flow, in milliseconds
    /// (default 30000; 0: never).
    pub progress_interval_ms: Option<u64>,
}

/// `[database]`; its `Debug` masks the password of the url.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// PostgreSQL URL.
    pub url: Option<String>,
    /// A file holding the PostgreSQL URL (a Docker or Kubernetes secret), read at start.
    pub url_file: Option<String>,
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
    /// A file holding the AMQP URL (a Docker or Kubernetes secret), read at start.
    pub url_file: Option<String>,
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
    /// Events of one key published before their confirms (default 1).
    pub max_in_flight_per_key: Option<usize>,
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
    /// Events of one key in flight at once (default 64; 1 waits for each report).
    pub max_in_flight_per_key: Option<usize>,
    /// Further librdkafka settings (security.protocol, sasl.*, ssl.*), passed through.
    #[serde(default)]
    pub extra: std::collections::BTreeMap<String, String>,
    /// librdkafka settings whose values are read from files at start, e.g.
    /// `"sasl.password" = "/run/secrets/kafka-password"`.
    #[serde(default)]
    pub extra_files: std::collections::BTreeMap<String, String>,
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
    /// The instance group this relay belongs to, for `outbox-relay pause --group`
    /// (default `default`).
    pub group: Option<String>,
    /// How long to wait at start for PostgreSQL and the broker to answer before
    /// giving up; unset: wait as long as it takes (logging every attempt).
    pub startup_timeout_ms: Option<u64>,
}

impl std::fmt::Debug for RawDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDatabase")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_file", &self.url_file)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for RawConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConsole")
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl std::fmt::Debug for RawRabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRabbitMq")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_file", &self.url_file)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("app_id", &self.app_id)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_in_flight_per_key", &self.max_in_flight_per_key)
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
            .field("max_in_flight_per_key", &self.max_in_flight_per_key)
            .field("extra (values hidden)", &extra)
            .field("extra_files", &self.extra_files)
            .finish()
    }
}
