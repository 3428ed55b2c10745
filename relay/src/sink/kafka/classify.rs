//! What a Kafka error means for an event (retry, reject, permanent), and the
//! messages that name the broker's reply and what to check.

use super::*;

/// What the sink makes of a librdkafka error; see [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classification {
    /// The event itself cannot be published as it is (too large, invalid record,
    /// no such topic or partition, not authorized): [`Outcome::Rejected`].
    Rejected,
    /// Broker or network trouble, a full local queue, or anything not known to be
    /// permanent: [`Outcome::Retry`].
    Retry,
    /// No delivery report within `message_timeout`. A missing topic (auto-creation
    /// off) looks exactly like this, so the sink looks the topic up: rejected if the
    /// broker says it does not exist, retried otherwise.
    TimedOut,
    /// The producer instance failed fatally and can publish nothing more: the sink
    /// replaces it and the event is retried.
    ProducerFailed,
}

/// Classify a librdkafka error from enqueuing a record or from its delivery report.
///
/// | librdkafka error | classification |
/// |---|---|
/// | `MessageSizeTooLarge`, `InvalidMessageSize`, `MessageBatchTooLarge` (record list too large) | rejected |
/// | `InvalidRecord`, `InvalidMessage` (corrupt), `UnsupportedForMessageFormat`, `PolicyViolation` | rejected |
/// | `UnknownTopicOrPartition`, `UnknownTopic`, `UnknownPartition`, `InvalidTopic` | rejected |
/// | `TopicAuthorizationFailed`, `InvalidArgument` | rejected |
/// | `MessageTimedOut` | timed out (topic looked up) |
/// | `Fatal` | producer failed (replaced, retried) |
/// | `QueueFull`, `BrokerTransportFailure`, `AllBrokersDown`, `LeaderNotAvailable`, `NotLeaderForPartition`, `RequestTimedOut`, `NotEnoughReplicas`, purges, authentication, anything else | retry |
pub fn classify(error: &KafkaError) -> Classification {
    use RDKafkaErrorCode as Code;
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        // A dropped producer, a failed flush or anything not tied to this record.
        _ => return Classification::Retry,
    };
    match code {
        Code::MessageSizeTooLarge
        | Code::InvalidMessageSize
        | Code::MessageBatchTooLarge
        | Code::InvalidRecord
        | Code::InvalidMessage
        | Code::UnsupportedForMessageFormat
        | Code::PolicyViolation
        | Code::UnknownTopicOrPartition
        | Code::UnknownTopic
        | Code::UnknownPartition
        | Code::InvalidTopic
        | Code::TopicAuthorizationFailed
        | Code::InvalidArgument => Classification::Rejected,
        Code::MessageTimedOut => Classification::TimedOut,
        // The idempotent producer's identity is no longer accepted (librdkafka raises these
        // as fatal after an epoch bump the broker refuses): only a new producer recovers.
        Code::Fatal
        | Code::ProducerFenced
        | Code::InvalidProducerEpoch
        | Code::OutOfOrderSequenceNumber
        | Code::UnknownProducerId
        | Code::InvalidProducerIdMapping => Classification::ProducerFailed,
        _ => Classification::Retry,
    }
}

/// Whether a rejection is about the record itself (its size or format), which no
/// retry can change; a missing topic or a permission can be fixed by an operator,
/// so those count attempts.
pub(super) fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        error,
        KafkaError::MessageProduction(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::InvalidMessage
                | Code::UnsupportedForMessageFormat
                | Code::InvalidTopic
        )
    )
}

pub(super) fn oversize_message(
    record: &Record<'_>,
    topic: &str,
    max_message_bytes: usize,
) -> String {
    format!(
        "event is {} bytes (key {}, payload {}, headers {}), over the maximum message size of \
         {max_message_bytes} bytes (max_message_bytes / the topic's max.message.bytes); it was \
         not sent to topic '{topic}': make the event smaller (e.g. publish a reference to the \
         data instead of the data), or raise max_message_bytes together with the topic's \
         max.message.bytes and the brokers' message.max.bytes",
        record.size, record.key_bytes, record.payload_bytes, record.header_bytes
    )
}

pub(super) fn topic_oversize_message(
    record: &Record<'_>,
    batch: usize,
    topic: &str,
    topic_max: usize,
) -> String {
    format!(
        "event is {} bytes (key {}, payload {}, headers {}; {batch} bytes as a record batch), \
         over topic '{topic}''s max.message.bytes of {topic_max} bytes (read from the brokers); \
         it was not sent: make the event smaller (e.g. publish a reference to the data instead \
         of the data), or raise the topic's max.message.bytes",
        record.size, record.key_bytes, record.payload_bytes, record.header_bytes
    )
}

/// The message of an error that [`classify`] calls [`Classification::Rejected`].
pub(super) fn rejected_message(
    error: &KafkaError,
    topic: &str,
    record: &Record<'_>,
    config: &KafkaConfig,
) -> String {
    use RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge) => {
            format!(
                "Kafka refused the event for topic '{topic}' as too large ({error}); it is {} \
                 bytes: raise the topic's max.message.bytes, or lower max_message_bytes (now {}) \
                 to the topic's limit minus {FRAMING_ALLOWANCE_BYTES} so such events are \
                 rejected before sending",
                record.size, config.max_message_bytes
            )
        }
        Some(Code::UnknownTopicOrPartition | Code::UnknownTopic) => format!(
            "topic '{topic}' does not exist on the brokers {} ({error}); create it (topic \
             auto-creation is off on this cluster) or fix the route",
            config.brokers
        ),
        Some(Code::UnknownPartition) => format!(
            "topic '{topic}' has no partition {} ({error}); fix explicit_partition or add \
             partitions to the topic",
            config
                .explicit_partition
                .map_or_else(|| "chosen by the partitioner".to_owned(), |p| p.to_string())
        ),
        Some(Code::TopicAuthorizationFailed) => format!(
            "not authorized to write to topic '{topic}' ({error}); grant the relay's principal \
             WRITE on the topic, or fix the route"
        ),
        Some(Code::InvalidTopic) => format!(
            "Kafka says '{topic}' is not a valid topic name ({error}); fix the route's topic \
             template or the event's destination"
        ),
        _ => format!(
            "Kafka refused the event for topic '{topic}' ({error}); the record itself is the \
             problem (check the topic's policies and message format version)"
        ),
    }
}

/// The message of an error that [`classify`] calls [`Classification::Retry`].
pub(super) fn retry_message(error: &KafkaError, topic: &str, brokers: &str) -> String {
    use RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::QueueFull) => format!(
            "the Kafka producer's local queue is full ({error}); the event for topic '{topic}' \
             will be published again after a backoff (raise queue.buffering.max.messages / \
             queue.buffering.max.kbytes in extra if this persists)"
        ),
        Some(
            Code::Authentication
            | Code::SaslAuthenticationFailed
            | Code::ClusterAuthorizationFailed
            | Code::SSL,
        ) => format!(
            "publishing to topic '{topic}' failed: {error}; check the credentials and \
             security.protocol / sasl.* / ssl.* settings in extra (the idempotent producer \
             also needs IDEMPOTENT_WRITE on the cluster for older brokers); the event will be \
             published again"
        ),
        _ => format!(
            "publishing to topic '{topic}' failed: {error}; librdkafka keeps reconnecting to \
             the brokers {brokers} and the event will be published again"
        ),
    }
}

/// The reason of a failed broker check, with what to check.
pub(super) fn connect_hint(error: &KafkaError, last_client_error: Option<&str>) -> String {
    // The metadata request may fail with a transport error before librdkafka reports
    // the TLS or SASL failure itself: the broker's last error text says which.
    let last = last_client_error.unwrap_or_default();
    let what = if last.contains("certificate verify failed") {
        "the broker's certificate is not signed by the CA in ssl.ca.location (or the system \
         trust store when unset), or its name does not match the host in brokers: check \
         ssl.ca.location in extra"
    } else if last.contains("SASL authentication") || last.contains("Authentication failed") {
        "check the sasl.* credentials in extra"
    } else {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                "check the sasl.* credentials in extra"
            }
            Some(RDKafkaErrorCode::SSL) => {
                "check security.protocol and the ssl.* settings in extra"
            }
            _ => {
                "is Kafka running, are the hosts and ports in brokers right and reachable (firewall, \
             DNS, advertised listeners), and do security.protocol / sasl.* / ssl.* in extra match \
             the listener?"
            }
        }
    };
    match last_client_error {
        Some(last) => format!("{error} (last broker error: {last}); {what}"),
        None => format!("{error}; {what}"),
    }
}
