//! Each topic's `max.message.bytes`, read from the brokers (DescribeConfigs) and
//! cached, so an event over a topic's own limit is rejected before it is sent, with
//! a reason that names that limit.
//!
//! The sink's `max_message_bytes` stays the upper bound for every topic; a topic
//! configured lower than it lowers the bound for that topic only. A broker that does
//! not answer DescribeConfigs (an old or restricted one: ACLs can deny it) leaves
//! `max_message_bytes` as the only check; the broker's own `MESSAGE_TOO_LARGE` is
//! still a rejection of the event then.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

/// How long a topic's limit is trusted before it is read again (a raised limit is
/// picked up within this time).
const LIMIT_TTL: Duration = Duration::from_secs(300);
/// After a lookup that got no answer, how long the configured limit alone is used.
const UNANSWERED_TTL: Duration = Duration::from_secs(30);
/// Longest wait for one DescribeConfigs answer.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes a one-record batch adds to key, value and headers in Kafka's record format
/// v2: the batch header (61) and the record's length fields (at most about 40), plus
/// [`PER_HEADER_OVERHEAD_BYTES`] per header.
pub(crate) const BATCH_OVERHEAD_BYTES: usize = 101;
/// Length fields of one record header (two varints).
pub(crate) const PER_HEADER_OVERHEAD_BYTES: usize = 10;

/// A topic's limit as the broker reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TopicLimit {
    /// The topic's `max.message.bytes`: the largest record batch it accepts.
    MaxMessageBytes(usize),
    /// The broker did not say (no answer, no such topic yet, or the entry is missing).
    Unknown,
}

/// Cached `max.message.bytes` per topic.
pub(crate) struct TopicLimits {
    admin: Option<AdminClient<DefaultClientContext>>,
    cache: RwLock<HashMap<String, (Instant, TopicLimit)>>,
    lookup: tokio::sync::Mutex<()>,
}

impl TopicLimits {
    /// An admin client with the producer's connection settings (`client`); `None`
    /// when it cannot be created, which leaves only the configured limit.
    pub(crate) fn new(client: &ClientConfig) -> Self {
        let admin = match client.create::<AdminClient<DefaultClientContext>>() {
            Ok(admin) => Some(admin),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot create a Kafka admin client to read topics' max.message.bytes; \
                     only max_message_bytes is checked before sending"
                );
                None
            }
        };
        TopicLimits {
            admin,
            cache: RwLock::new(HashMap::new()),
            lookup: tokio::sync::Mutex::new(()),
        }
    }

    /// `topic`'s limit: from the cache, or asked of the brokers (one lookup at a time).
    pub(crate) async fn limit(&self, topic: &str) -> TopicLimit {
        if let Some(limit) = self.cached(topic) {
            return limit;
        }
        let _one_lookup = self.lookup.lock().await;
        if let Some(limit) = self.cached(topic) {
            return limit;
        }
        let (limit, ttl) = match self.describe(topic).await {
            Some(bytes) => (TopicLimit::MaxMessageBytes(bytes), LIMIT_TTL),
            None => (TopicLimit::Unknown, UNANSWERED_TTL),
        };
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        cache.retain(|_, (until, _)| *until > now);
        cache.insert(topic.to_owned(), (now + ttl, limit));
        limit
    }

    fn cached(&self, topic: &str) -> Option<TopicLimit> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .get(topic)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, limit)| *limit)
    }

    async fn describe(&self, topic: &str) -> Option<usize> {
        let admin = self.admin.as_ref()?;
        let options = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
        let resource = [ResourceSpecifier::Topic(topic)];
        let described = tokio::time::timeout(
            DESCRIBE_TIMEOUT,
            admin.describe_configs(&resource, &options),
        )
        .await;
        let results = match described {
            Ok(Ok(results)) => results,
            Ok(Err(error)) => {
                tracing::debug!(topic, %error, "DescribeConfigs failed; using max_message_bytes");
                return None;
            }
            Err(_) => {
                tracing::debug!(topic, "DescribeConfigs timed out; using max_message_bytes");
                return None;
            }
        };
        let resource = results.into_iter().next()?.ok()?;
        let value = resource.get("max.message.bytes")?.value.as_deref()?;
        parse_limit(value)
    }
}

/// A `max.message.bytes` value, if it is a positive number of bytes.
fn parse_limit(value: &str) -> Option<usize> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|bytes| *bytes > 0)
}

/// The batch size of a one-record batch with `record_bytes` of key, value and
/// header names and values, and `headers` headers.
pub(crate) fn batch_bytes(record_bytes: usize, headers: usize) -> usize {
    record_bytes + BATCH_OVERHEAD_BYTES + headers * PER_HEADER_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_positive_byte_counts() {
        assert_eq!(parse_limit("1048588"), Some(1_048_588));
        assert_eq!(parse_limit(" 20000 "), Some(20_000));
        assert_eq!(parse_limit("0"), None);
        assert_eq!(parse_limit("-1"), None);
        assert_eq!(parse_limit("big"), None);
    }

    #[test]
    fn a_batch_adds_its_header_and_the_length_fields_of_each_header() {
        assert_eq!(batch_bytes(1_000, 0), 1_101);
        assert_eq!(batch_bytes(1_000, 7), 1_171);
    }
}
