//! Kafka side of the tests: a fresh topic per test, a consumer that records every
//! message (partition, offset, key, headers, payload) in arrival order, and the
//! Java client's default partitioner to check where keys land.
//!
//! The broker is `KAFKA_BROKERS` (default `127.0.0.1:9092`, the Apache Kafka node that
//! `scripts/dev-services` starts). The consumer reads with a manual partition
//! assignment from the beginning of every partition and commits nothing: it needs
//! no consumer group, so a test never waits for a group rebalance.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;

/// How long the helpers wait for the broker before they give up.
const BROKER_DEADLINE: Duration = Duration::from_secs(20);

/// Bootstrap servers of the Kafka-protocol broker under test.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A topic name no other test uses: `test-<uuid>`.
pub fn unique_topic() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// Create topic `test-<uuid>` with `partitions` partitions (replication factor 1)
/// and wait until the broker's metadata shows all of them; returns its name.
pub async fn create_topic(partitions: i32) -> String {
    create_topic_on(&brokers(), partitions).await
}

/// [`create_topic`] on the broker at `brokers`.
pub async fn create_topic_on(brokers: &str, partitions: i32) -> String {
    create_topic_with(brokers, partitions, &[]).await
}

/// [`create_topic_on`] with topic configs (`max.message.bytes`, …).
pub async fn create_topic_with(brokers: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let topic = unique_topic();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client config is valid");
    let options = AdminOptions::new().operation_timeout(Some(BROKER_DEADLINE));
    let results = admin
        .create_topics(
            &[configs.iter().fold(
                NewTopic::new(&topic, partitions, TopicReplication::Fixed(1)),
                |new, (key, value)| new.set(key, value),
            )],
            &options,
        )
        .await
        .expect("Kafka broker must be running: start it with scripts/dev-services");
    for result in results {
        if let Err((name, code)) = result {
            panic!("creating topic {name} with {partitions} partitions: {code}");
        }
    }
    let deadline = tokio::time::Instant::now() + BROKER_DEADLINE;
    loop {
        let seen = partition_count_on(brokers, &topic).await;
        if seen == Some(partitions) {
            return topic;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "topic {topic}: metadata shows {seen:?} partitions, not {partitions}, within {BROKER_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The number of partitions the broker's metadata shows for `topic`, `None` if it
/// does not know the topic.
pub async fn partition_count(topic: &str) -> Option<i32> {
    partition_count_on(&brokers(), topic).await
}

/// [`partition_count`] on the broker at `brokers`.
pub async fn partition_count_on(brokers: &str, topic: &str) -> Option<i32> {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("consumer config is valid");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic), BROKER_DEADLINE)
            .expect("metadata from the Kafka broker");
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX))
    })
    .await
    .expect("metadata task")
}

/// One message as the consumer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// Every header in wire order (a name may repeat); `None` is a null value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The value, if any.
    pub payload: Option<Vec<u8>>,
    /// The record timestamp in milliseconds since the epoch, if set.
    pub timestamp_ms: Option<i64>,
}

impl Received {
    /// The key as text (lossy).
    pub fn key_text(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    /// The last value of header `name` as text (lossy), like Java's `lastHeader`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| {
                String::from_utf8_lossy(value.as_deref().unwrap_or_default()).into_owned()
            })
    }

    /// How many headers are named `name`.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(key, _)| key == name).count()
    }
}

/// A consumer of every partition of one topic, from the beginning, recording each
/// message in arrival order (per partition, arrival order is offset order).
pub struct TopicConsumer {
    /// The topic read.
    pub topic: String,
    received: Arc<Mutex<Vec<Received>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl TopicConsumer {
    /// Start reading partitions `0..partitions` of `topic` from the beginning.
    pub fn start(topic: &str, partitions: i32) -> Self {
        Self::start_on(&brokers(), topic, partitions)
    }

    /// [`TopicConsumer::start`] on the broker at `brokers`.
    pub fn start_on(brokers: &str, topic: &str, partitions: i32) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // Required by librdkafka's consumer API; no group is joined (manual assign, no commits).
            .set(
                "group.id",
                format!("test-reader-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .expect("consumer config is valid");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("valid partition offset");
        }
        consumer.assign(&assignment).expect("assign partitions");
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (sink, error_sink) = (received.clone(), errors.clone());
        let task = tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(message) => {
                        let headers = message
                            .headers()
                            .map(|headers| {
                                headers
                                    .iter()
                                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let record = Received {
                            partition: message.partition(),
                            offset: message.offset(),
                            key: message.key().map(<[u8]>::to_vec),
                            headers,
                            payload: message.payload().map(<[u8]>::to_vec),
                            timestamp_ms: message.timestamp().to_millis(),
                        };
                        sink.lock().expect("consumer lock").push(record);
                    }
                    // Transient fetch errors are logged by librdkafka and retried; keep them for diagnosis.
                    Err(error) => error_sink
                        .lock()
                        .expect("consumer lock")
                        .push(error.to_string()),
                }
            }
        });
        TopicConsumer {
            topic: topic.to_owned(),
            received,
            errors,
            task,
        }
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("consumer lock").clone()
    }

    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        self.received.lock().expect("consumer lock").len()
    }

    /// Errors the consumer saw so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("consumer lock").clone()
    }

    /// Wait until at least `count` messages arrived, or panic at the deadline.
    pub async fn wait_for(&self, count: usize, deadline: Duration) -> Vec<Received> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let have = self.count();
            if have >= count {
                return self.received();
            }
            assert!(
                tokio::time::Instant::now() < until,
                "only {have} of {count} messages arrived on {} within {deadline:?} (consumer errors: {:?})",
                self.topic,
                self.errors()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TopicConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Kafka's `Utils.murmur2`: the 32-bit MurmurHash2 (seed `0x9747b28c`) of the
/// Java client, as a signed Java `int`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    // Java hashes an int length; keys are far below 2 GiB, and truncation matches Java's cast.
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner (and librdkafka's
/// `murmur2` / `murmur2_random` for non-empty keys) picks for `key`:
/// `toPositive(murmur2(key)) % partitions`.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// How long a private broker may take to start (a JVM, on a 2-core machine running
/// other tests).
const PRIVATE_BROKER_START_DEADLINE: Duration = Duration::from_secs(120);

/// An Apache Kafka node of one test's own (`scripts/kafka/broker`: broker and KRaft
/// controller in one JVM, small heap, fresh storage in a temporary directory), on free
/// ports: a test can stop it (SIGSTOP: connections stall, nothing is lost) and let it go
/// on (SIGCONT) without disturbing other tests. Killed and its storage removed when dropped.
pub struct PrivateBroker {
    /// `127.0.0.1:<port>`.
    pub brokers: String,
    data_dir: std::path::PathBuf,
    child: std::process::Child,
}

impl PrivateBroker {
    /// Start a private Kafka node and wait until it answers metadata requests.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`PrivateBroker::start`] with extra `server.properties` lines (`key=value`; a
    /// `listeners+=…` line adds a listener, see `scripts/kafka/broker`).
    pub async fn start_with(extra_properties: &[&str]) -> Self {
        let port = crate::ops::free_local_addr().port();
        let controller_port = crate::ops::free_local_addr().port();
        let brokers = format!("127.0.0.1:{port}");
        let data_dir = std::env::temp_dir().join(format!(
            "outbox-kafka-{port}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&data_dir).expect("create the private broker's directory");
        let log = std::fs::File::create(data_dir.with_extension("log"))
            .expect("create the private broker's log file");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka/broker");
        let child = std::process::Command::new(script)
            .arg(&data_dir)
            .arg(port.to_string())
            .arg(controller_port.to_string())
            .arg("--")
            .args(extra_properties)
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log)
            .spawn()
            .expect("start scripts/kafka/broker (a JDK is needed: run scripts/dev-services)");
        let broker = PrivateBroker {
            brokers,
            data_dir,
            child,
        };
        let deadline = tokio::time::Instant::now() + PRIVATE_BROKER_START_DEADLINE;
        loop {
            if tokio::net::TcpStream::connect(&broker.brokers)
                .await
                .is_ok()
                && broker_answers(&broker.brokers).await
            {
                return broker;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "private Kafka did not answer on {} within {PRIVATE_BROKER_START_DEADLINE:?} (log: {})",
                broker.brokers,
                broker.data_dir.with_extension("log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} the private Kafka");
    }

    /// Stop the broker process (SIGSTOP): it neither answers nor refuses.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let it go on (SIGCONT), with everything it stored.
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(self.data_dir.with_extension("log"));
    }
}

/// Whether the broker at `brokers` answers a metadata request with at least one broker.
async fn broker_answers(brokers: &str) -> bool {
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        let Ok(consumer) = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create::<rdkafka::consumer::BaseConsumer>()
        else {
            return false;
        };
        consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok_and(|metadata| !metadata.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}

/// The payload counter `n` of a test event.
pub fn n_of(message: &Received) -> i64 {
    let payload: serde_json::Value =
        serde_json::from_slice(message.payload.as_deref().expect("a payload"))
            .expect("a JSON payload");
    payload["n"].as_i64().expect("a payload with a counter n")
}

/// Distinct events (by `outbox-event-id`) among the received messages.
pub fn distinct(received: &[Received]) -> usize {
    received
        .iter()
        .filter_map(|m| m.header("outbox-event-id"))
        .collect::<HashSet<_>>()
        .len()
}

/// First deliveries per key whose `n` does not increase (the first five are printed).
pub fn order_violations(received: &[Received]) -> usize {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut violations = 0;
    for m in received {
        if !seen.insert(
            m.header("outbox-event-id")
                .expect("an outbox-event-id header"),
        ) {
            continue;
        }
        let n = n_of(m);
        if let Some(&previous) = last.get(&m.key_text())
            && n <= previous
        {
            violations += 1;
            if violations <= 5 {
                eprintln!(
                    "order violation on key {}: {n} first-delivered after {previous}",
                    m.key_text()
                );
            }
        }
        last.insert(m.key_text(), n);
    }
    violations
}

/// Wait until `want` distinct events arrived, or panic at the deadline; returns all received.
pub async fn wait_distinct(
    consumer: &TopicConsumer,
    want: usize,
    deadline: Duration,
) -> Vec<Received> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let received = consumer.received();
        let have = distinct(&received);
        if have >= want {
            return received;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "only {have} of {want} distinct events within {deadline:?} (consumer errors: {:?})",
            consumer.errors()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `count` events of one key (`account:hot`), in commit order, the one at `big_at`
/// with a 2 MiB payload (over Kafka's default limit); and that one's id.
pub fn hot_key_events(
    count: usize,
    big_at: usize,
) -> (Vec<outbox_core::Event>, outbox_core::EventId) {
    let events: Vec<outbox_core::Event> = (0..count)
        .map(|n| {
            let blob = if n == big_at {
                "x".repeat(2 * 1024 * 1024)
            } else {
                String::new()
            };
            outbox_core::Event::builder("account", "hot", "account.changed")
                .payload(&serde_json::json!({ "n": n, "blob": blob }))
                .build()
                .expect("a valid event")
        })
        .collect();
    let big = events[big_at.min(count - 1)].id();
    (events, big)
}

/// The first deliveries in `received` are exactly `events` without `skipped`, in
/// their order (duplicates may repeat an earlier event; none may go ahead).
pub fn assert_first_deliveries_are(
    received: &[Received],
    events: &[outbox_core::Event],
    skipped: outbox_core::EventId,
) {
    let mut seen = HashSet::new();
    let first_deliveries: Vec<String> = received
        .iter()
        .filter_map(|m| m.header("outbox-event-id"))
        .filter(|id| seen.insert(id.clone()))
        .collect();
    let expected: Vec<String> = events
        .iter()
        .filter(|e| e.id() != skipped)
        .map(|e| e.id().to_string())
        .collect();
    assert!(
        !first_deliveries.contains(&skipped.to_string()),
        "the skipped event reached the topic"
    );
    assert_eq!(
        first_deliveries.len(),
        expected.len(),
        "every event once (first deliveries)"
    );
    assert!(
        first_deliveries == expected,
        "first deliveries out of commit order (first difference at {:?})",
        first_deliveries
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2
        let java = [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in java {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
        // librdkafka's rdmurmur2.c unit test (values verified against the Java client).
        let librdkafka = [
            (&b"kafka"[..], 0xd067_cf64_u32),
            (b"giberish123456789", 0x8f55_2b0c),
            (b"1234", 0x9fc9_7b14),
            (b"234", 0xe7c0_09ca),
            (b"34", 0x8739_30da),
            (b"4", 0x5a4b_5ca1),
            (b"PreAmbleWillBeRemoved,ThePrePartThatIs", 0x7842_4f1c),
            (b"reAmbleWillBeRemoved,ThePrePartThatIs", 0x4a62_b377),
            (b"eAmbleWillBeRemoved,ThePrePartThatIs", 0xe0e4_e09e),
            (b"AmbleWillBeRemoved,ThePrePartThatIs", 0x62b8_b43f),
            (b"", 0x106e_08d9),
        ];
        for (key, expected) in librdkafka {
            assert_eq!(
                murmur2(key),
                expected as i32,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn java_partition_is_the_positive_hash_modulo_partitions() {
        // murmur2("foobar") = -790332482; & 0x7fffffff = 1357151166.
        assert_eq!(java_partition(b"foobar", 6), 1_357_151_166 % 6);
        assert_eq!(java_partition(b"abc", 1), 0);
        for key in ["a", "order:1", "order:42", "customer:x"] {
            let p = java_partition(key.as_bytes(), 6);
            assert!((0..6).contains(&p), "{key} -> {p}");
        }
    }
}
