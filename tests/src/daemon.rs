//! The real relay daemon as a child process, for tests that kill it (SIGKILL,
//! SIGTERM, a failpoint's abort) and start it again, and a ground truth of
//! committed events to check what reached the broker against.
//!
//! # Which binary
//!
//! The tests crate builds `outbox-relay-failpoints`: `relay/src/main.rs`
//! unchanged, linked against `outbox-relay` with the `failpoints` feature (see
//! `tests/Cargo.toml`). Cargo builds it before the integration tests and hands
//! its path to them as `env!("CARGO_BIN_EXE_outbox-relay-failpoints")`, so no
//! test runs cargo itself and no other build can overwrite it mid-run. Set
//! `OUTBOX_RELAY_BIN` to run another build instead (e.g. a release build).
//!
//! The daemon is configured by environment variables only
//! (`OUTBOX_RELAY__SECTION__KEY`), its logs go to a file per start, and the
//! tail of that file is printed when a test fails.
//!
//! # Ground truth
//!
//! [`GroundTruth`] writers commit each event together with its id in
//! `public.committed_events` and bump the key's counter row first, so the
//! payload counter `n` is the per-key commit order. [`GroundTruth::check`]
//! waits until every committed id arrived, then reports duplicates and the
//! per-key order of first deliveries.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use sqlx::PgPool;

use crate::TestSchema;
use crate::amqp::{RabbitFixture, Received};
use crate::wal::WalDatabase;

/// Exit status of a process ended by `std::process::abort` (SIGABRT).
pub const SIGABRT: i32 = 6;

/// The daemon binary: `OUTBOX_RELAY_BIN`, else `built` (pass
/// `env!("CARGO_BIN_EXE_outbox-relay-failpoints")`).
pub fn relay_binary(built: &str) -> PathBuf {
    std::env::var_os("OUTBOX_RELAY_BIN").map_or_else(|| PathBuf::from(built), PathBuf::from)
}

/// Environment of a daemon with the WAL source on `db`, publishing to RabbitMQ
/// `exchange`, with the production default `status_interval_ms` (10 s).
pub fn wal_env(db: &WalDatabase, exchange: &str) -> Vec<(String, String)> {
    let mut env = base_env(&db.test, exchange);
    env.extend(
        [
            ("SOURCE", "wal".to_owned()),
            ("WAL__SLOT", db.slot.clone()),
            ("WAL__PUBLICATION", db.publication.clone()),
            ("WAL__SLOT_BUSY_TIMEOUT_MS", "30000".to_owned()),
            ("WAL__LEADER_RETRY_MS", "200".to_owned()),
            ("WAL__MAX_IN_FLIGHT_EVENTS", "500".to_owned()),
        ]
        .map(|(k, v)| (format!("OUTBOX_RELAY__{k}"), v)),
    );
    env
}

/// Environment of a daemon with the polling source on `test`'s schema.
pub fn polling_env(test: &TestSchema, exchange: &str) -> Vec<(String, String)> {
    let mut env = base_env(test, exchange);
    env.extend(
        [
            ("POLLING__POLL_INTERVAL_MS", "200".to_owned()),
            ("POLLING__LEASE_MS", "3000".to_owned()),
            ("POLLING__PARTITIONS", "16".to_owned()),
            ("POLLING__BATCH_SIZE", "200".to_owned()),
        ]
        .map(|(k, v)| (format!("OUTBOX_RELAY__{k}"), v)),
    );
    env
}

fn base_env(test: &TestSchema, exchange: &str) -> Vec<(String, String)> {
    [
        ("SINK", "rabbitmq".to_owned()),
        ("DATABASE__URL", test.database_url.clone()),
        ("DATABASE__SCHEMA", test.schema.to_string()),
        ("DATABASE__CONNECT_TIMEOUT_MS", "5000".to_owned()),
        ("PIPELINE__RETRY_BACKOFF_INITIAL_MS", "50".to_owned()),
        ("PIPELINE__RETRY_BACKOFF_MAX_MS", "1000".to_owned()),
        ("PIPELINE__SHUTDOWN_GRACE_MS", "10000".to_owned()),
        ("RABBITMQ__URL", crate::amqp::amqp_url()),
        ("RABBITMQ__EXCHANGE", exchange.to_owned()),
        ("RABBITMQ__ROUTING_KEY", "{event_type}".to_owned()),
        ("RABBITMQ__PUBLISH_TIMEOUT_MS", "5000".to_owned()),
    ]
    .map(|(k, v)| (format!("OUTBOX_RELAY__{k}"), v))
    .into_iter()
    .collect()
}

/// Switch `env` to the Kafka sink: publish to `topic` on the shared broker. A polling
/// lease must outlast a delivery (message timeout plus 10 s): 12 s with a 1.5 s timeout.
pub fn use_kafka(env: &mut Vec<(String, String)>, topic: &str) {
    env.retain(|(k, _)| !k.starts_with("OUTBOX_RELAY__RABBITMQ__"));
    set(env, "SINK", "kafka");
    set(env, "KAFKA__BROKERS", crate::kafka::brokers());
    set(env, "KAFKA__TOPIC", topic);
    set(env, "KAFKA__MESSAGE_TIMEOUT_MS", "1500");
    if env
        .iter()
        .any(|(k, _)| k == "OUTBOX_RELAY__POLLING__LEASE_MS")
    {
        set(env, "POLLING__LEASE_MS", "12000");
    }
}

/// Set `key` (without the `OUTBOX_RELAY__` prefix) in `env`, replacing it.
pub fn set(env: &mut Vec<(String, String)>, key: &str, value: impl Into<String>) {
    let key = format!("OUTBOX_RELAY__{key}");
    env.retain(|(k, _)| *k != key);
    env.push((key, value.into()));
}

/// One run of the daemon.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Start `binary run` with `env`; with `failpoint` (`name` or `name:N`) it
    /// aborts at that point.
    pub fn start(binary: &Path, env: &[(String, String)], failpoint: Option<&str>) -> Self {
        let log = std::env::temp_dir().join(format!(
            "outbox-relay-daemon-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("create the daemon's log file");
        let mut command = Command::new(binary);
        command
            .arg("run")
            .env_remove("OUTBOX_RELAY_CONFIG")
            .env_remove(outbox_relay::failpoint::FAILPOINT_ENV)
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_DAEMON_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        if let Some(point) = failpoint {
            command.env(outbox_relay::failpoint::FAILPOINT_ENV, point);
        }
        let child = command.spawn().unwrap_or_else(|error| {
            panic!(
                "start the relay daemon {}: {error} (build it with cargo test -p outbox-tests)",
                binary.display()
            )
        });
        Daemon {
            child,
            log,
            exited: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (`TERM`, `KILL`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// `kill -9` and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if self.exited.is_none() {
            self.signal("KILL");
        }
        self.wait(Duration::from_secs(10)).await;
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status);
        }
        self.exited.is_none()
    }

    /// Wait until the process exits; panics with its log after `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if !self.running() {
                return self.exited.expect("exited");
            }
            if tokio::time::Instant::now() >= until {
                panic!(
                    "the relay daemon {} did not exit within {deadline:?}; log:\n{}",
                    self.pid(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until the daemon aborts at its failpoint; panics if it exits
    /// otherwise or runs past `deadline`.
    pub async fn wait_for_abort(&mut self, deadline: Duration) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.wait(deadline).await;
        assert_eq!(
            status.signal(),
            Some(SIGABRT),
            "the daemon should have aborted at its failpoint, it exited with {status}; log:\n{}",
            self.log_tail()
        );
    }

    /// The whole log of this run.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The last 40 lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("daemon log kept at {}", self.log.display());
        }
    }
}

/// The ground-truth table: one row per committed event, written in its transaction.
pub const TRUTH: &str = "public.committed_events";

/// Writers committing events with their ground truth; see the module docs.
pub struct GroundTruth {
    test_pool: PgPool,
    schema: outbox_core::SchemaName,
    counters: String,
    keys: usize,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<()>,
    wal_messages: bool,
}

/// What [`GroundTruth::check`] found.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// Events committed.
    pub committed: usize,
    /// Deliveries, duplicates included.
    pub deliveries: usize,
    /// Deliveries beyond the first of each event.
    pub duplicates: usize,
}

impl GroundTruth {
    /// Create the counter and ground-truth tables for `keys` keys.
    pub async fn new(test: &TestSchema, keys: usize) -> Self {
        let counters = crate::load::create_counters(test, keys).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create table {TRUTH} (event_id uuid primary key)"
        )))
        .execute(&test.pool)
        .await
        .expect("create the ground-truth table");
        GroundTruth {
            test_pool: test.pool.clone(),
            schema: test.schema.clone(),
            counters,
            keys,
            stop: Arc::new(AtomicBool::new(false)),
            committed: Arc::new(AtomicUsize::new(0)),
            tasks: tokio::task::JoinSet::new(),
            wal_messages: false,
        }
    }

    /// Writers started from now on write wal-message events
    /// (`pg_logical_emit_message`, no table row) instead of rows.
    pub fn write_wal_messages(&mut self) {
        self.wal_messages = true;
    }

    /// Commit a backlog of `count` events over the keys, 500 per transaction.
    pub async fn backlog(&self, count: usize) {
        let outbox = self.outbox();
        let mut done = 0;
        while done < count {
            let chunk = (count - done).min(500);
            let mut tx = self.test_pool.begin().await.expect("begin");
            let mut events = Vec::with_capacity(chunk);
            for i in 0..chunk {
                let key = (done + i) % self.keys;
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "update {} set n = n + 1 where key = $1 returning n",
                    self.counters
                )))
                .bind(key as i32)
                .fetch_one(&mut *tx)
                .await
                .expect("bump the key's counter");
                events.push(event(key, n));
            }
            outbox.enqueue_all(&mut tx, &events).await.expect("enqueue");
            let ids: Vec<uuid::Uuid> = events.iter().map(|e| *e.id().as_uuid()).collect();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "insert into {TRUTH} select unnest($1::uuid[])"
            )))
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .expect("record the ground truth");
            tx.commit().await.expect("commit");
            done += chunk;
            self.committed.fetch_add(chunk, Ordering::Relaxed);
        }
    }

    fn outbox(&self) -> Outbox {
        Outbox::new(OutboxConfig {
            schema: self.schema.clone(),
            ..OutboxConfig::default()
        })
    }

    /// Start `writers` writers, each committing one event per transaction and
    /// pausing `pause` between transactions, until [`GroundTruth::stop_writers`].
    pub async fn start_writers(&mut self, test: &TestSchema, writers: usize, pause: Duration) {
        let pool = test.connect(writers as u32).await;
        for writer in 0..writers {
            let (pool, counters, keys) = (pool.clone(), self.counters.clone(), self.keys);
            let (stop, committed, outbox) =
                (self.stop.clone(), self.committed.clone(), self.outbox());
            let wal_messages = self.wal_messages;
            self.tasks.spawn(async move {
                let mut i = 0_usize;
                while !stop.load(Ordering::Relaxed) {
                    let key = (writer * 31 + i * 7) % keys;
                    let attempt = async {
                        let mut tx = pool.begin().await?;
                        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                            "update {counters} set n = n + 1 where key = $1 returning n"
                        )))
                        .bind(key as i32)
                        .fetch_one(&mut *tx)
                        .await?;
                        let event = event(key, n);
                        let written = if wal_messages {
                            outbox_core::wal_message::emit(
                                &mut tx,
                                outbox_core::wal_message::DEFAULT_PREFIX,
                                &event,
                                1 << 20,
                            )
                            .await
                        } else {
                            outbox.enqueue(&mut tx, &event).await.map(|_| ())
                        };
                        written.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "insert into {TRUTH} values ($1)"
                        )))
                        .bind(event.id().as_uuid())
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await
                    };
                    match attempt.await {
                        Ok(()) => {
                            committed.fetch_add(1, Ordering::Relaxed);
                            i += 1;
                        }
                        // The ground-truth table decides what committed.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
    }

    /// Events known committed so far.
    pub fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stop the writers.
    pub async fn stop_writers(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(result) = self.tasks.join_next().await {
            result.expect("writer task");
        }
    }

    /// Ids of every committed event.
    pub async fn committed_ids(&self) -> Vec<uuid::Uuid> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select event_id from {TRUTH}")))
            .fetch_all(&self.test_pool)
            .await
            .expect("read the ground truth")
    }

    /// Wait until every committed event arrived at RabbitMQ (panics with the number
    /// missing after `deadline`); assert that only committed events arrived and that
    /// first deliveries keep per-key order.
    pub async fn check(&self, rabbit: &RabbitFixture, deadline: Duration) -> Delivery {
        self.check_seen(|| seen_on_rabbitmq(&rabbit.received()), deadline)
            .await
    }

    /// [`GroundTruth::check`] for messages read from Kafka.
    pub async fn check_kafka(
        &self,
        consumer: &crate::kafka::TopicConsumer,
        deadline: Duration,
    ) -> Delivery {
        self.check_seen(|| seen_on_kafka(&consumer.received()), deadline)
            .await
    }

    /// [`GroundTruth::check`] over deliveries in arrival order, from either broker.
    pub async fn check_seen(
        &self,
        mut deliveries: impl FnMut() -> Vec<Seen>,
        deadline: Duration,
    ) -> Delivery {
        let committed = self.committed_ids().await;
        let until = tokio::time::Instant::now() + deadline;
        let received = loop {
            let received = deliveries();
            let ids: HashSet<&str> = received.iter().map(|m| m.event_id.as_str()).collect();
            let missing = committed
                .iter()
                .filter(|id| !ids.contains(id.to_string().as_str()))
                .count();
            if missing == 0 {
                break received;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "G2: {missing} of {} committed events missing after {deadline:?}",
                committed.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            seen_order_violations(&received),
            0,
            "G3: per-key order of first deliveries"
        );
        let distinct = received
            .iter()
            .map(|m| m.event_id.as_str())
            .collect::<HashSet<_>>()
            .len();
        assert_eq!(
            distinct,
            committed.len(),
            "G1: only committed events arrive"
        );
        Delivery {
            committed: committed.len(),
            deliveries: received.len(),
            duplicates: received.len() - committed.len(),
        }
    }
}

/// One delivery as the checks see it, whichever broker it came from.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The event id (RabbitMQ `message_id`, Kafka `outbox-event-id`).
    pub event_id: String,
    /// The partition key.
    pub key: String,
    /// The payload counter: the per-key commit order.
    pub n: i64,
}

/// RabbitMQ deliveries as [`Seen`].
pub fn seen_on_rabbitmq(received: &[Received]) -> Vec<Seen> {
    received
        .iter()
        .map(|m| Seen {
            event_id: m.message_id.clone(),
            key: m
                .header("outbox-partition-key")
                .unwrap_or_default()
                .to_owned(),
            n: n_of(m),
        })
        .collect()
}

/// Kafka messages as [`Seen`].
pub fn seen_on_kafka(received: &[crate::kafka::Received]) -> Vec<Seen> {
    received
        .iter()
        .map(|m| Seen {
            event_id: m.header("outbox-event-id").unwrap_or_default(),
            key: m.key_text(),
            n: m.payload
                .as_deref()
                .and_then(|payload| serde_json::from_slice::<serde_json::Value>(payload).ok())
                .and_then(|payload| payload["n"].as_i64())
                .unwrap_or_default(),
        })
        .collect()
}

/// First deliveries per key whose counter does not increase.
pub fn seen_order_violations(received: &[Seen]) -> usize {
    let mut first = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut violations = 0;
    for m in received {
        if !first.insert(m.event_id.as_str()) {
            continue;
        }
        if let Some(&previous) = last.get(m.key.as_str())
            && m.n <= previous
        {
            violations += 1;
        }
        last.insert(m.key.as_str(), m.n);
    }
    violations
}

fn event(key: usize, n: i64) -> Event {
    Event::builder("item", format!("k{key}"), "item.changed")
        .payload(&serde_json::json!({ "n": n }))
        .build()
        .expect("a valid event")
}

/// The payload counter `n`; 0 for payloads that are not a test event's (hostile
/// rows: deeply nested JSON beyond serde_json's recursion limit, null, strings).
fn n_of(message: &Received) -> i64 {
    serde_json::from_slice::<serde_json::Value>(&message.body)
        .ok()
        .and_then(|payload| payload["n"].as_i64())
        .unwrap_or_default()
}

/// How many times each message id arrived.
pub fn delivery_counts(received: &[Received]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in received {
        *counts.entry(message.message_id.clone()).or_default() += 1;
    }
    counts
}

/// Event ids of the rows still in `test`'s outbox.
pub async fn outbox_event_ids(test: &TestSchema) -> Vec<uuid::Uuid> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select event_id from {}",
        test.table("outbox")
    )))
    .fetch_all(&test.pool)
    .await
    .expect("read the outbox")
}
