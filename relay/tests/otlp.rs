//! The `otlp` feature: the daemon exports its spans to the collector named by
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, in the writer's trace. A small HTTP server in
//! the test plays the collector. Run with `cargo test -p outbox-relay --features
//! otlp --test otlp` (`.ci/run` does).

#![cfg(feature = "otlp")]
#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, polling_env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A collector that answers 200 to every request and keeps `(path, body)`.
async fn collector() -> (std::net::SocketAddr, Arc<Mutex<Vec<(String, Vec<u8>)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buffer = [0u8; 8192];
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buffer[..n]);
                    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if data.len() < end + 4 + length {
                        continue;
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let body = data[end + 4..end + 4 + length].to_vec();
                    kept.lock().unwrap().push((path, body));
                    data.drain(..end + 4 + length);
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_exports_its_publish_spans_over_otlp_in_the_writers_trace() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("order.placed").await;
    let (addr, received) = collector().await;
    let event = Event::builder("order", "o-1", "order.placed")
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .build()
        .unwrap();
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
    .enqueue(&mut test.pool.acquire().await.unwrap(), &event)
    .await
    .unwrap();

    let mut env = polling_env(&test, &rabbit.exchange);
    env.push((
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        format!("http://{addr}"),
    ));
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
    let binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"));
    let mut daemon = Daemon::start(&binary, &env, None);
    rabbit.wait_for_distinct(1, Duration::from_secs(30)).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", daemon.log_tail());

    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let requests = received.lock().unwrap().clone();
    assert!(
        requests.iter().any(|(path, body)| path == "/v1/traces"
            && body.windows(16).any(|w| w == trace_id.as_slice())),
        "a span in the writer's trace reached the collector: {:?}",
        requests
            .iter()
            .map(|(p, b)| (p, b.len()))
            .collect::<Vec<_>>()
    );
}
