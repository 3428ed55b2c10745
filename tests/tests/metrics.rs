//! The README's metrics reference is what `/metrics` serves: every documented
//! metric is there for its source, the counters move as events flow, and the
//! latency histograms count one observation per published event. Runs the real
//! daemon with each source; each test owns its schema (or database) and exchange.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::net::SocketAddr;
use std::time::Duration;

use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, polling_env, relay_binary, set, wal_env};
use outbox_tests::ops::{free_local_addr, http_get};
use outbox_tests::wal::WalDatabase;

/// `(name, source)` of every row of the README's metrics table.
fn documented() -> Vec<(String, String)> {
    let readme = include_str!("../../README.md");
    let table = readme
        .split_once("### Metrics reference")
        .expect("the README has a metrics reference")
        .1;
    table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells
                .get(1)?
                .strip_prefix("`outbox_relay_")?
                .strip_suffix('`')?;
            Some((format!("outbox_relay_{name}"), (*cells.get(3)?).to_owned()))
        })
        .collect()
}

/// The samples of `/metrics` by metric name (histogram series under their base name).
async fn scrape(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

fn typed(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Start a daemon with `env` serving ops on a free port; publish 2 × 30 events and
/// check the documented metrics of `source` (`polling` or `wal`).
async fn check_metrics(
    test: &TestSchema,
    rabbit: &RabbitFixture,
    mut env: Vec<(String, String)>,
    source: &str,
) {
    let addr = free_local_addr();
    set(&mut env, "OPS__LISTEN_ADDR", addr.to_string());
    set(&mut env, "OPS__SAMPLE_INTERVAL_MS", "200");
    let binary = relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"));
    let mut daemon = Daemon::start(&binary, &env, None);

    outbox_tests::enqueue_docs(test, 30, 7).await;
    rabbit.wait_for_distinct(30, Duration::from_secs(60)).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut first = scrape(addr).await;
    while value(&first, "outbox_relay_events_published_total") != Some(30.0)
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        first = scrape(addr).await;
    }
    outbox_tests::enqueue_docs(test, 30, 7).await;
    rabbit.wait_for_distinct(60, Duration::from_secs(60)).await;
    let mut second = scrape(addr).await;
    while (value(&second, "outbox_relay_events_published_total") != Some(60.0)
        || value(&second, "outbox_relay_outbox_pending_events") != Some(0.0))
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        second = scrape(addr).await;
    }
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        daemon.log_tail()
    );

    let served = typed(&second);
    let documented = documented();
    assert!(documented.len() >= 25, "the table parsed: {documented:?}");
    for (name, sources) in &documented {
        if sources == "both" || sources == source {
            assert!(
                served.contains(name),
                "{name} ({sources}) is served with the {source} source"
            );
        } else if sources == "wal" {
            assert!(
                !served.contains(name),
                "{name} is WAL-only, not served with {source}"
            );
        }
    }
    for name in &served {
        assert!(
            documented.iter().any(|(d, _)| d == name),
            "{name} is served but not in the README's metrics reference"
        );
    }
    // Moving with the events, and one latency observation per published event.
    assert_eq!(
        value(&first, "outbox_relay_events_published_total"),
        Some(30.0)
    );
    assert_eq!(
        value(&second, "outbox_relay_events_published_total"),
        Some(60.0)
    );
    assert_eq!(
        value(&second, "outbox_relay_commit_to_confirm_seconds_count"),
        Some(60.0)
    );
    assert_eq!(
        value(
            &second,
            "outbox_relay_commit_to_confirm_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(60.0)
    );
    assert!(value(&second, "outbox_relay_publish_duration_seconds_count").unwrap() >= 60.0);
    assert!(value(&second, "outbox_relay_commit_to_confirm_seconds_sum").unwrap() > 0.0);
    assert!(
        second.contains(&format!(
            "outbox_relay_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "build info"
    );
    assert_eq!(
        value(&second, "outbox_relay_outbox_pending_events"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_served_and_moves_with_the_polling_source() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    let env = polling_env(&test, &rabbit.exchange);
    check_metrics(&test, &rabbit, env, "polling").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_served_and_moves_with_the_wal_source() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    let env = wal_env(&db, &rabbit.exchange);
    check_metrics(&db.test, &rabbit, env, "wal").await;
    db.cleanup().await;
}
