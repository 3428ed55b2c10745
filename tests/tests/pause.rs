//! `outbox-relay pause` / `resume` through the real daemons: every relay of the
//! instance group stops taking events (in-flight ones finish) shortly after the
//! pause, `/readyz` and the metrics say so, events keep accumulating, and after
//! `resume` everything written is delivered — nothing lost. Both sources.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, polling_env, relay_binary, set, wal_env};
use outbox_tests::ops::{free_local_addr, http_get};
use outbox_tests::wal::WalDatabase;

fn admin(test: &TestSchema, args: &[&str]) -> serde_json::Value {
    let output = Command::new(relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints")))
        .args(args)
        .args(["--json", "--schema", test.schema.as_str()])
        .env("OUTBOX_RELAY__DATABASE__URL", &test.database_url)
        .env_remove("OUTBOX_RELAY_CONFIG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Writers: one event every 10 ms until `stop`; returns how many were written.
fn start_writer(
    test: &TestSchema,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let written = Arc::new(AtomicUsize::new(0));
    let (pool, schema, count) = (test.pool.clone(), test.schema.clone(), written.clone());
    let task = tokio::spawn(async move {
        let outbox = Outbox::new(OutboxConfig {
            schema,
            ..OutboxConfig::default()
        });
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let event = Event::builder("doc", (i % 5).to_string(), "doc.saved")
                .payload(&serde_json::json!({ "n": i }))
                .build()
                .unwrap();
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &event).await.unwrap();
            tx.commit().await.unwrap();
            count.fetch_add(1, Ordering::Relaxed);
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (task, written)
}

async fn pause_and_resume(
    test: &TestSchema,
    rabbit: &RabbitFixture,
    envs: Vec<Vec<(String, String)>>,
) {
    let binary = relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"));
    let ops = free_local_addr();
    let mut daemons: Vec<Daemon> = envs
        .into_iter()
        .enumerate()
        .map(|(i, mut env)| {
            if i == 0 {
                set(&mut env, "OPS__LISTEN_ADDR", ops.to_string());
            }
            Daemon::start(&binary, &env, None)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, written) = start_writer(test, stop.clone());
    rabbit.wait_for_distinct(50, Duration::from_secs(60)).await;

    let paused = admin(test, &["pause", "--reason", "broker maintenance"]);
    assert_eq!(paused["instance_group"], "default");
    let paused_at = Instant::now();
    // Deliveries stop: nothing new arrives for 2 s (in-flight events may finish first).
    let mut last_count = rabbit.count();
    let mut last_change = Instant::now();
    while last_change.elapsed() < Duration::from_secs(2) {
        assert!(
            paused_at.elapsed() < Duration::from_secs(20),
            "deliveries never stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count = rabbit.count();
        if count != last_count {
            (last_count, last_change) = (count, Instant::now());
        }
    }
    let stopped_after = last_change.saturating_duration_since(paused_at);
    let written_while_paused = written.load(Ordering::Relaxed);
    assert!(
        written_while_paused > last_count,
        "writers kept writing while paused ({written_while_paused} written, {last_count} delivered)"
    );
    let (code, body) = http_get(ops, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("paused"), "{body}");
    let (_, metrics) = http_get(ops, "/metrics").await.unwrap();
    assert!(
        metrics.contains("outbox_relay_paused 1\n"),
        "the paused gauge"
    );
    let status = admin(test, &["status"]);
    assert_eq!(
        status["pauses"][0]["reason"], "broker maintenance",
        "{status}"
    );

    let resumed = admin(test, &["resume"]);
    assert_eq!(resumed["resumed"], true);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let total = written.load(Ordering::Relaxed);
    rabbit
        .wait_for_distinct(total, Duration::from_secs(60))
        .await;
    for daemon in &mut daemons {
        daemon.signal("TERM");
    }
    for daemon in &mut daemons {
        let status = daemon.wait(Duration::from_secs(30)).await;
        assert!(status.success(), "{}", daemon.log_tail());
    }
    println!(
        "pause: deliveries stopped {} ms after the pause command returned; {total} written, all delivered after resume",
        stopped_after.as_millis()
    );
    assert!(
        stopped_after < Duration::from_secs(3),
        "publishing stopped {stopped_after:?} after the pause (relays read it every 500 ms)"
    );
    assert_eq!(rabbit.distinct(), total, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_stops_both_polling_relays_and_resume_delivers_everything() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    let env = polling_env(&test, &rabbit.exchange);
    pause_and_resume(&test, &rabbit, vec![env.clone(), env]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_stops_the_wal_relay_and_resume_delivers_everything() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    let env = wal_env(&db, &rabbit.exchange);
    pause_and_resume(&db.test, &rabbit, vec![env]).await;
    db.cleanup().await;
}
