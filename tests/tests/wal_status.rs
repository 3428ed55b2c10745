//! `outbox-relay status` with the WAL source lists the running relays: one leader
//! streaming the slot and its standbys (it used to say "live relays: 0").

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::process::Command;
use std::time::Duration;

use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, relay_binary, set, wal_env};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_wal_leader_and_its_standby() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let binary = relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"));
    let mut daemons = Vec::new();
    for id in ["wal-relay-a", "wal-relay-b"] {
        let mut env = wal_env(&db, &rabbit.exchange);
        set(&mut env, "INSTANCE__ID", id);
        daemons.push(Daemon::start(&binary, &env, None));
    }
    let status = || {
        let output = Command::new(&binary)
            .args(["status", "--json", "--schema", db.test.schema.as_str()])
            .env("OUTBOX_RELAY__DATABASE__URL", &db.test.database_url)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let roles = |status: &serde_json::Value| {
        let mut roles: Vec<(String, String, String)> = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_owned(),
                    i["source"].as_str().unwrap().to_owned(),
                    i["role"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        roles.sort();
        roles
    };
    wait_until(
        "a leader and a standby announce themselves",
        Duration::from_secs(60),
        async || {
            let roles = roles(&status());
            roles.len() == 2
                && roles.iter().all(|(_, source, _)| source == "wal")
                && roles.iter().filter(|(_, _, role)| role == "leader").count() == 1
                && roles
                    .iter()
                    .filter(|(_, _, role)| role == "standby")
                    .count()
                    == 1
        },
    )
    .await;
    for daemon in &mut daemons {
        daemon.signal("TERM");
    }
    for daemon in &mut daemons {
        daemon.wait(Duration::from_secs(30)).await;
    }
    wait_until(
        "stopped relays leave the list",
        Duration::from_secs(10),
        async || roles(&status()).is_empty(),
    )
    .await;
    db.cleanup().await;
}
