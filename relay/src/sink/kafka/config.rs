//! The sink's settings and the librdkafka client configuration made from them.

use super::*;

/// How the Kafka sink connects and publishes.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]` (`bootstrap.servers`).
    pub brokers: String,
    /// The producer's `client.id`, shown in broker logs and quotas, e.g. `outbox-relay`.
    pub client_id: String,
    /// librdkafka partitioner, one of [`PARTITIONERS`]; default [`DEFAULT_PARTITIONER`]
    /// (Java-compatible). Ignored for events sent to `explicit_partition`.
    pub partitioner: String,
    /// Bound on one delivery including librdkafka's retries (`message.timeout.ms`,
    /// a.k.a. `delivery.timeout.ms`); a delivery that takes longer is retried by the relay.
    /// Must be at least 1 ms; keep it well below the relay's lease.
    pub message_timeout: Duration,
    /// Largest event in bytes (key + payload + header names and values), default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]. Larger events are rejected without being sent.
    /// Keep it at most the topic's `max.message.bytes` (Kafka's default 1,048,588)
    /// minus [`FRAMING_ALLOWANCE_BYTES`].
    pub max_message_bytes: usize,
    /// Send every event to this partition instead of partitioning by key.
    pub explicit_partition: Option<i32>,
    /// Events of one key in flight at once (enqueued, delivery report not yet read),
    /// 1 to [`MAX_IN_FLIGHT_PER_KEY_CEILING`], default [`DEFAULT_MAX_IN_FLIGHT_PER_KEY`].
    /// 1 publishes a key's next event only after its predecessor's report.
    pub max_in_flight_per_key: usize,
    /// Further librdkafka producer settings passed through as they are, e.g.
    /// `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
    /// `ssl.ca.location`, `compression.type`. Settings that would break the sink's
    /// guarantees (`enable.idempotence=false`, `acks` other than `all`, …) and
    /// settings that have a field above are refused by [`KafkaSink::connect`].
    /// Values of secret-looking keys (passwords, keys, tokens, JAAS) are never printed.
    pub extra: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A configuration for `brokers` with every other setting at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            client_id: "outbox-relay".to_owned(),
            partitioner: DEFAULT_PARTITIONER.to_owned(),
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            explicit_partition: None,
            max_in_flight_per_key: DEFAULT_MAX_IN_FLIGHT_PER_KEY,
            extra: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(key, value)| (key.as_str(), shown_value(key, value)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("partitioner", &self.partitioner)
            .field("message_timeout", &self.message_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("explicit_partition", &self.explicit_partition)
            .field("max_in_flight_per_key", &self.max_in_flight_per_key)
            .field("extra", &extra)
            .finish()
    }
}

/// The librdkafka settings for `config`, after refusing settings that would break
/// the sink's guarantees. Pure: no I/O.
pub(super) fn client_config(config: &KafkaConfig) -> Result<ClientConfig, SinkError> {
    let error = |message: String| SinkError::new(format!("invalid Kafka settings: {message}"));
    let invalid = |message: String| Err(error(message));
    if config.brokers.trim().is_empty() {
        return invalid("brokers is empty; set it to host:port[,host:port…]".into());
    }
    if !PARTITIONERS.contains(&config.partitioner.as_str()) {
        return invalid(format!(
            "partitioner '{}' is unknown; use one of {} ({DEFAULT_PARTITIONER} places keys where \
             Java clients do)",
            config.partitioner,
            PARTITIONERS.join(", ")
        ));
    }
    let timeout_ms = config.message_timeout.as_millis();
    if timeout_ms == 0 || timeout_ms > i32::MAX as u128 {
        return invalid(format!(
            "message_timeout {:?} is out of range; use 1 ms to 24 days (default {:?})",
            config.message_timeout, DEFAULT_MESSAGE_TIMEOUT
        ));
    }
    if config.max_message_bytes == 0 || config.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
        return invalid(format!(
            "max_message_bytes {} is out of range; use 1 to {MAX_MESSAGE_BYTES_CEILING} \
             (default {DEFAULT_MAX_MESSAGE_BYTES}) and at most the topic's max.message.bytes",
            config.max_message_bytes
        ));
    }
    if let Some(partition) = config.explicit_partition
        && partition < 0
    {
        return invalid(format!(
            "explicit_partition {partition} is negative; partitions are numbered from 0"
        ));
    }
    if !(1..=MAX_IN_FLIGHT_PER_KEY_CEILING).contains(&config.max_in_flight_per_key) {
        return invalid(format!(
            "max_in_flight_per_key {} is out of range; use 1 to {MAX_IN_FLIGHT_PER_KEY_CEILING} \
             (default {DEFAULT_MAX_IN_FLIGHT_PER_KEY}; 1 waits for each event's report)",
            config.max_in_flight_per_key
        ));
    }
    check_extra(&config.extra).map_err(error)?;

    let mut client = ClientConfig::new();
    for (key, value) in &config.extra {
        client.set(key.trim(), value.as_str());
    }
    client
        .set("bootstrap.servers", config.brokers.as_str())
        .set("client.id", config.client_id.as_str())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "max.in.flight.requests.per.connection",
            MAX_IN_FLIGHT_PER_CONNECTION.to_string(),
        )
        .set("partitioner", config.partitioner.as_str())
        .set("message.timeout.ms", timeout_ms.to_string())
        .set(
            "message.max.bytes",
            (config.max_message_bytes + FRAMING_ALLOWANCE_BYTES).to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Info);
    if !config.extra.keys().any(|key| is_compression_key(key)) {
        client.set("compression.type", "none");
    }
    // librdkafka waits 5 ms for a batch to fill by default. The relay publishes one
    // event per key at a time, so a busy key paid that wait for every event (one key
    // moved about 160 events/s); 1 ms keeps batching for many keys.
    if !config
        .extra
        .keys()
        .any(|key| matches!(key.trim(), "linger.ms" | "queue.buffering.max.ms"))
    {
        client.set("linger.ms", DEFAULT_LINGER_MS);
    }
    Ok(client)
}

/// librdkafka's `linger.ms` unless `extra` sets it: how long a partition's batch
/// may wait for more events before it is sent.
pub(super) const DEFAULT_LINGER_MS: &str = "1";

/// Refuse `extra` settings that would break a guarantee or that a field owns.
pub(super) fn check_extra(extra: &BTreeMap<String, String>) -> Result<(), String> {
    for (raw_key, raw_value) in extra {
        let key = raw_key.trim().to_ascii_lowercase();
        let value = raw_value.trim().to_ascii_lowercase();
        let field = match key.as_str() {
            "bootstrap.servers" | "metadata.broker.list" => Some("brokers"),
            "client.id" => Some("client_id"),
            "partitioner" => Some("partitioner"),
            "message.timeout.ms" | "delivery.timeout.ms" => Some("message_timeout"),
            "message.max.bytes" => Some("max_message_bytes"),
            _ => None,
        };
        if let Some(field) = field {
            return Err(format!(
                "extra sets {raw_key}, which the sink derives from {field}: set {field} instead"
            ));
        }
        let refused = match key.as_str() {
            // librdkafka reads "true", "t" and "1" as true.
            "enable.idempotence" => (!matches!(value.as_str(), "true" | "t" | "1")).then_some(
                "the sink needs the idempotent producer so that librdkafka's retries neither \
                 duplicate nor reorder a key's events",
            ),
            "acks" | "request.required.acks" => (value != "all" && value != "-1").then_some(
                "the sink needs acks=all so that a delivered event survives the loss of the \
                 partition leader",
            ),
            "max.in.flight.requests.per.connection" | "max.in.flight" => value
                .parse::<u32>()
                .map_or(true, |n| n == 0 || n > MAX_IN_FLIGHT_PER_CONNECTION)
                .then_some(
                    "the idempotent producer keeps per-partition order only with 1 to 5 \
                     requests in flight",
                ),
            "transactional.id" => Some(
                "the sink publishes with an idempotent, non-transactional producer; \
                 transactions are not supported",
            ),
            "queuing.strategy" => (value != "fifo")
                .then_some("only the fifo queuing strategy keeps a key's events in order"),
            _ => None,
        };
        if let Some(reason) = refused {
            return Err(format!(
                "extra sets {raw_key}={}, which is refused: {reason}; remove it",
                shown_value(raw_key, raw_value)
            ));
        }
    }
    Ok(())
}

pub(super) fn is_compression_key(key: &str) -> bool {
    matches!(
        key.trim().to_ascii_lowercase().as_str(),
        "compression.type" | "compression.codec"
    )
}

/// Whether a librdkafka setting's value may be secret. Masks too much rather than
/// too little: passwords, secrets, tokens, JAAS and OAUTHBEARER configs, keys and PEMs.
pub(super) fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        "credential",
        "key",
        "pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| key.contains(word))
}

pub(super) fn shown_value<'a>(key: &str, value: &'a str) -> &'a str {
    if is_sensitive(key) { "***" } else { value }
}

/// Kafka's topic name rules: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(super) fn check_topic_name(topic: &str) -> Result<(), String> {
    let problem = if topic.is_empty() {
        Some("is empty")
    } else if topic.len() > MAX_TOPIC_NAME_BYTES {
        Some("is longer than 249 characters")
    } else if topic == "." || topic == ".." {
        Some("is '.' or '..'")
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("has characters other than a-z, A-Z, 0-9, '.', '_' and '-'")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => {
            let start: String = topic.chars().take(60).collect();
            Err(format!(
                "topic name '{start}' {problem}, which Kafka does not allow; fix the route's \
                 topic template or the event's destination"
            ))
        }
    }
}
