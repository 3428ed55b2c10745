//! `scripts/demo` (the README's first command) in CI: the same script, run on the
//! debug binaries cargo built for this test, with names of its own (database,
//! exchange, queue, topics, consumer group, slot, ops ports), so it runs next to
//! other tests and next to a user's demo.
//!
//! What it proves end to end: table-mode events reach RabbitMQ through the polling
//! relay and wal-message and table events reach Kafka through the WAL relay; each is
//! consumed exactly once through the inbox (the script checks the effect counts,
//! the empty outboxes and that nothing was dead-lettered); the relays exit on
//! SIGTERM and the consumers on their own; the script exits 0.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the whole demo may take (it takes about 5 s on debug binaries).
const DEADLINE: Duration = Duration::from_secs(240);

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn the_demo_delivers_every_event_once_through_both_brokers_and_shuts_down_cleanly() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_order-service"))
        .parent()
        .unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let log_path = std::env::temp_dir().join(format!("outbox-demo-test-{id}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(workspace_root().join("scripts/demo"))
        .current_dir(workspace_root())
        .env("OUTBOX_DEMO_BIN_DIR", bin_dir)
        .env(
            "OUTBOX_DEMO_RELAY_BIN",
            env!("CARGO_BIN_EXE_outbox-relay-demo"),
        )
        .env("OUTBOX_DEMO_DB", format!("outbox_demo_test_{id}"))
        .env("OUTBOX_DEMO_SUFFIX", format!("-test-{id}"))
        .env(
            "OUTBOX_DEMO_RABBITMQ_OPS",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "OUTBOX_DEMO_KAFKA_OPS",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("OUTBOX_DEMO_TIMEOUT_SECS", "120")
        .env("OUTBOX_DEMO_DROP_DB", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group: on a timeout the script and everything it started go.
        .process_group(0)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    match status {
        Some(status) if status.success() => {}
        Some(status) => panic!("scripts/demo failed ({status}):\n{output}"),
        None => panic!("scripts/demo did not finish within {DEADLINE:?}:\n{output}"),
    }
    assert!(
        output.contains("every event reached its consumer once"),
        "{output}"
    );
    assert!(output.contains("duplicates skipped:"), "{output}");
    // The script's logs (kept when it fails, for a look).
    let _ = std::fs::remove_dir_all(workspace_root().join(format!("target/demo-test-{id}")));
}
