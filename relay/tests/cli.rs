//! The `outbox-relay` binary itself: no secret (database or broker password) and
//! no payload or header value ever reaches its output, not in `--help`, not in
//! errors, not in logs at `RUST_LOG=trace`, through failed logins, unroutable
//! messages and dead-lettering.
//!
//! Runs the real binary that cargo builds for these tests, against the services
//! of `scripts/dev-services`; each test owns its schema and exchange.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::{RabbitFixture, amqp_url};
use sqlx::AssertSqlSafe;

const DB_PASSWORD: &str = "pgMarker7Qx";
const MQ_PASSWORD: &str = "mqMarker8Zy";
const PAYLOAD_MARKER: &str = "payloadMarker9Xw";
const HEADER_MARKER: &str = "headerMarker5Wv";

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

/// Every way a marker could show up in a log line: as text, and as the byte list
/// a `Debug` of a `Vec<u8>` prints.
fn leaks(output: &str, markers: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for marker in markers {
        let bytes = format!("{:?}", marker.as_bytes());
        let bytes = bytes.trim_start_matches('[').trim_end_matches(']');
        if output.contains(marker) {
            found.push(format!("{marker} as text"));
        }
        if output.contains(bytes) {
            found.push(format!("{marker} as bytes"));
        }
    }
    found
}

/// `url` with its password replaced by `password`.
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host) = match rest.rsplit_once('@') {
        Some((userinfo, host)) => (
            userinfo.split_once(':').map_or(userinfo, |(user, _)| user),
            host,
        ),
        None => ("postgres", rest),
    };
    format!("{scheme}://{user}:{password}@{host}")
}

/// A unique temporary directory for one test's files.
fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A relay process whose stdout and stderr go to one file.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary())
            .args(args)
            .env("RUST_LOG", "trace")
            .env_remove("OUTBOX_RELAY__DATABASE__URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// SIGTERM, then wait up to 30 s for the exit (SIGKILL after that); the whole output.
    fn stop(mut self) -> String {
        if !self.exited() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let until = Instant::now() + Duration::from_secs(30);
            while !self.exited() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !self.exited() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        self.output()
    }
}

/// Wait until `condition` holds, up to `deadline`.
async fn wait_until(deadline: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < until {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn write_config(dir: &Path, test: &TestSchema, amqp: &str, exchange: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        "sink = \"rabbitmq\"\n\
         [database]\nurl = \"{db}\"\nschema = \"{schema}\"\n\
         [polling]\npoll_interval_ms = 200\nlease_ms = 3000\npartitions = 4\n\
         [pipeline]\nmax_attempts = 1\nretry_backoff_initial_ms = 50\nretry_backoff_max_ms = 500\n\
         [rabbitmq]\nurl = \"{amqp}\"\nexchange = \"{exchange}\"\nrouting_key = \"{{event_type}}\"\n\
         connect_timeout_ms = 2000\n",
        db = with_password(&test.database_url, DB_PASSWORD),
        schema = test.schema,
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn help_never_shows_the_database_url_from_the_environment() {
    let url = format!("postgres://relay:{DB_PASSWORD}@db.internal:5432/app");
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["migrate", "--help"],
        &["status", "--help"],
        &["dead-letters", "--help"],
        &["dead-letters", "list", "--help"],
        &["dead-letters", "show", "--help"],
        &["dead-letters", "retry", "--help"],
        &["dead-letters", "purge", "--help"],
    ] {
        let output = Command::new(binary())
            .args(args)
            .env("OUTBOX_RELAY__DATABASE__URL", &url)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{args:?}: {text}");
        assert!(
            !text.contains(DB_PASSWORD) && !text.contains("db.internal"),
            "{args:?} shows the url: {text}"
        );
    }
}

#[test]
fn admin_errors_never_show_the_database_password() {
    // Nothing listens on port 1: the connection fails.
    let url = format!("postgres://relay:{DB_PASSWORD}@127.0.0.1:1/app");
    for args in [&["status"][..], &["migrate"], &["dead-letters", "list"]] {
        let output = Command::new(binary())
            .args(args)
            .env("OUTBOX_RELAY__DATABASE__URL", &url)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.status.success(), "{args:?}: {text}");
        assert!(text.contains("error"), "{args:?}: {text}");
        assert!(
            !text.contains(DB_PASSWORD),
            "{args:?} shows the password: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_at_trace_level_never_logs_a_password_a_payload_or_a_header_value() {
    let test = TestSchema::new().await;
    // No queue is bound for `ok.secret`: every event is returned unroutable, then dead-lettered.
    let rabbit = RabbitFixture::with_binding("nothing.binds.this").await;
    let events: Vec<Event> = (0..3)
        .map(|i| {
            Event::builder("doc", i.to_string(), "ok.secret")
                .payload(&serde_json::json!({ "card": PAYLOAD_MARKER }))
                .header("x-note", HEADER_MARKER)
                .build()
                .unwrap()
        })
        .collect();
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
    .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
    .await
    .unwrap();
    let dir = temp_dir();

    // A wrong broker password: the login fails (and is reported) without showing it.
    let wrong = with_password(&amqp_url(), MQ_PASSWORD);
    let config = write_config(&dir, &test, &wrong, &rabbit.exchange);
    let mut daemon = Daemon::start(
        &dir,
        "wrong-password",
        &["run", "--config", config.to_str().unwrap()],
    );
    let reported = wait_until(Duration::from_secs(30), async || {
        daemon.exited() || daemon.output().contains("password in the url")
    })
    .await;
    let wrong_password_output = daemon.stop();
    assert!(
        reported,
        "the failed login is reported: {wrong_password_output}"
    );

    // The right password: every event is unroutable and dead-lettered.
    let config = write_config(&dir, &test, &amqp_url(), &rabbit.exchange);
    let daemon = Daemon::start(
        &dir,
        "dead-letter",
        &["run", "--config", config.to_str().unwrap()],
    );
    let dead = test.table("outbox_dead_letter");
    let all_dead = wait_until(Duration::from_secs(60), async || {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!("select count(*) from {dead}")))
            .fetch_one(&test.pool)
            .await
            .unwrap();
        count == 3
    })
    .await;
    let run_output = daemon.stop();
    assert!(
        all_dead,
        "the events are dead-lettered: {}",
        &run_output[run_output.len().saturating_sub(4000)..]
    );
    assert!(
        run_output.contains("dead-lettered"),
        "the daemon logged the dead-lettering: {run_output}"
    );

    let output = format!("{wrong_password_output}\n{run_output}");
    let found = leaks(
        &output,
        &[DB_PASSWORD, MQ_PASSWORD, PAYLOAD_MARKER, HEADER_MARKER],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found.is_empty(),
        "found {found:?} in the output; lines: {:?}",
        output
            .lines()
            .filter(|line| !leaks(
                line,
                &[DB_PASSWORD, MQ_PASSWORD, PAYLOAD_MARKER, HEADER_MARKER]
            )
            .is_empty())
            .map(|line| line.chars().take(300).collect::<String>())
            .take(5)
            .collect::<Vec<_>>()
    );
}

#[test]
fn check_config_names_source_sink_and_hosts_but_no_secret() {
    let dir = temp_dir();
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"postgres://relay:{DB_PASSWORD}@db.internal:5432/app\"\n\
             [rabbitmq]\nurl = \"amqp://relay:{MQ_PASSWORD}@mq.internal:5672/%2f\"\n"
        ),
    )
    .unwrap();
    let output = Command::new(binary())
        .args(["run", "--check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    for expected in [
        "source polling",
        "sink rabbitmq",
        "mq.internal:5672",
        "db.internal:5432",
    ] {
        assert!(text.contains(expected), "{expected:?} missing: {text}");
    }
    assert!(
        leaks(&text, &[DB_PASSWORD, MQ_PASSWORD]).is_empty(),
        "{text}"
    );

    // A URL that does not parse is refused by the dry run, without the password.
    std::fs::write(
        &path,
        format!("[database]\nurl = \"postgres://relay:{DB_PASSWORD}@db.internal:notaport/app\"\n"),
    )
    .unwrap();
    let output = Command::new(binary())
        .args(["run", "--check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success());
    assert!(text.contains("database.url"), "{text}");
    assert!(!text.contains(DB_PASSWORD), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connections_tries_each_connection_and_names_the_failing_one_without_secrets() {
    let test = TestSchema::new().await;
    let dir = temp_dir();
    let check = |path: &Path| {
        let output = Command::new(binary())
            .args(["run", "--check-config", "--check-connections", "--config"])
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };

    let good = write_config(&dir, &test, &amqp_url(), "unused");
    let (ok, text) = check(&good);
    assert!(ok, "{text}");
    assert!(
        text.contains("PostgreSQL at") && text.contains("RabbitMQ at"),
        "{text}"
    );
    let answered = text
        .lines()
        .filter(|line| {
            (line.starts_with("PostgreSQL at") || line.starts_with("RabbitMQ at"))
                && line.ends_with(": connected")
        })
        .count();
    assert_eq!(answered, 2, "{text}");

    let bad = write_config(
        &dir,
        &test,
        &with_password(&amqp_url(), MQ_PASSWORD),
        "unused",
    );
    let (ok, text) = check(&bad);
    assert!(!ok, "a refused broker login passed the check: {text}");
    assert!(text.contains("password"), "says what to check: {text}");
    assert!(
        leaks(&text, &[DB_PASSWORD, MQ_PASSWORD]).is_empty(),
        "{text}"
    );
}
