//! The consumer examples end on every path, promptly and with the right exit code:
//! timeout with nothing expected (once a 100% CPU spin that never exited), timeout
//! before the expected count (exit 1 with a message), SIGTERM and Ctrl-C (exit 0),
//! and an unreachable database or broker (exit 1 naming it). Each test owns its
//! database, queue and topic; the services come from `scripts/dev-services`.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

/// Longest a consumer may take to exit after its stop condition.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

fn server_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of the test's own, dropped at the end.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn new() -> TestDatabase {
        let name = format!("examples_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server_url()).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = server_url();
        let (base, query) = base.split_once('?').unwrap_or((&base, ""));
        let root = &base[..base.rfind('/').unwrap()];
        let url = if query.is_empty() {
            format!("{root}/{name}")
        } else {
            format!("{root}/{name}?{query}")
        };
        TestDatabase { name, url }
    }

    async fn drop_it(self) {
        let mut admin = PgConnection::connect(&server_url()).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop database if exists {} with (force)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

fn rabbitmq(db: &TestDatabase, queue: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rabbitmq-consumer"));
    command
        .env("DATABASE_URL", &db.url)
        .args(["--queue", queue, "--exchange", &format!("{queue}-exchange")])
        .args(args);
    command
}

fn kafka(db: &TestDatabase, topic: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kafka-consumer"));
    command
        .env("DATABASE_URL", &db.url)
        .args(["--topic", topic, "--group", topic, "--partitions", "1"])
        .args(args);
    command
}

fn spawn(mut command: Command) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for `child` to exit within `deadline` (killed and a failure otherwise).
fn finish(mut child: Child, deadline: Duration) -> (Output, Duration) {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), started.elapsed());
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "did not exit within {deadline:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Run `setup` (a `--setup-only` command) to completion.
fn setup(mut command: Command) {
    let output = command.arg("--setup-only").output().unwrap();
    assert!(output.status.success(), "setup: {}", stderr(&output));
}

/// Spawn `command` and wait until it prints that it is consuming (its signal
/// handlers are in place then); its stdout lines come through the receiver.
fn spawn_consuming(mut command: Command) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead as _;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + EXIT_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(": consuming ") => return (child, lines),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("the consumer never said it was consuming within {EXIT_DEADLINE:?}");
            }
        }
    }
}

/// Signal `child`, wait (with a deadline) for it to exit; its status and the rest of stdout.
fn stop_with(
    mut child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    name: &str,
) -> (std::process::ExitStatus, String) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > EXIT_DEADLINE {
            let _ = child.kill();
            panic!("SIG{name}: did not exit within {EXIT_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.iter().collect();
    (status, rest.join("\n"))
}

#[tokio::test]
async fn rabbitmq_consumer_exits_at_its_timeout_on_ctrl_c_and_on_sigterm() {
    let db = TestDatabase::new().await;
    let queue = format!("examples-{}", suffix());
    setup(rabbitmq(&db, &queue, &[]));

    // Nothing expected: the timeout ends it, exit 0, without spinning.
    let child = spawn(rabbitmq(
        &db,
        &queue,
        &["--expect", "0", "--timeout-secs", "1"],
    ));
    let (output, took) = finish(child, EXIT_DEADLINE);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Expected messages that never come: exit 1, saying so.
    let child = spawn(rabbitmq(
        &db,
        &queue,
        &["--expect", "5", "--timeout-secs", "1"],
    ));
    let (output, _) = finish(child, EXIT_DEADLINE);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("before 5 messages were handled"),
        "{}",
        stderr(&output)
    );

    for signal_name in ["TERM", "INT"] {
        let (child, lines) = spawn_consuming(rabbitmq(&db, &queue, &[]));
        let (status, stdout) = stop_with(child, lines, signal_name);
        assert!(status.success(), "SIG{signal_name}: {status}");
        assert!(
            stdout.contains("handled 0 exactly once"),
            "SIG{signal_name}: {stdout}"
        );
    }
    db.drop_it().await;
}

#[tokio::test]
async fn rabbitmq_consumer_reports_an_unreachable_database_or_broker() {
    let db = TestDatabase::new().await;
    let queue = format!("examples-{}", suffix());
    let mut command = rabbitmq(&db, &queue, &[]);
    command.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere");
    let (output, _) = finish(spawn(command), EXIT_DEADLINE);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("connecting to PostgreSQL"),
        "{}",
        stderr(&output)
    );

    let (output, _) = finish(
        spawn(rabbitmq(
            &db,
            &queue,
            &["--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"],
        )),
        EXIT_DEADLINE,
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("connecting to RabbitMQ"),
        "{}",
        stderr(&output)
    );
    db.drop_it().await;
}

#[tokio::test]
async fn kafka_consumer_creates_its_topics_and_exits_at_its_timeout_and_on_sigterm() {
    let db = TestDatabase::new().await;
    let topic = format!("examples-{}", suffix());
    // Creating topics that exist already is fine: run the setup twice.
    setup(kafka(&db, &topic, &[]));
    setup(kafka(&db, &topic, &[]));

    let (output, took) = finish(
        spawn(kafka(&db, &topic, &["--timeout-secs", "1"])),
        EXIT_DEADLINE,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(took < Duration::from_secs(15), "took {took:?}");

    let (output, _) = finish(
        spawn(kafka(
            &db,
            &topic,
            &["--expect", "3", "--timeout-secs", "1"],
        )),
        EXIT_DEADLINE,
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));

    let (child, lines) = spawn_consuming(kafka(&db, &topic, &[]));
    let (status, stdout) = stop_with(child, lines, "TERM");
    assert!(status.success(), "SIGTERM: {status}");
    assert!(stdout.contains("handled 0 exactly once"), "{stdout}");
    db.drop_it().await;
}
