//! The dead-letter console (`/console` on the ops endpoint) against real
//! PostgreSQL and RabbitMQ with an in-process relay: a browser signs in, sees a
//! dead-lettered event, retries it after the route is fixed, and the consumer gets
//! it once; the token check; escaping of hostile rows; two tabs retrying one
//! event at the same moment publish it once.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::admin;
use outbox_relay::config::RawConsole;
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::browser::Browser;
use outbox_tests::console::{changed_of, csrf_of, request};
use outbox_tests::relay::{RunningRelay, raw_config};

const TOKEN: &str = "console-test-token-0123456789abcdef";
const HOSTILE: &str = "\"'><script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">";

/// A relay on `test`'s schema publishing to `rabbit`, poison events dead-lettered
/// after 2 attempts, with the console on a free local port (token `TOKEN` unless
/// `console` says otherwise).
async fn start_relay(
    test: &TestSchema,
    rabbit: &RabbitFixture,
    console: RawConsole,
) -> (RunningRelay, SocketAddr) {
    outbox_tests::init_tracing();
    let addr = outbox_tests::ops::free_local_addr();
    let mut raw = raw_config(test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(2);
    raw.ops.listen_addr = Some(addr.to_string());
    raw.console = console;
    let relay = RunningRelay::start(raw.validate().unwrap());
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox_tests::ops::http_get(addr, "/healthz")
        .await
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < until,
            "the ops endpoint did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (relay, addr)
}

fn with_token() -> RawConsole {
    RawConsole {
        enabled: Some(true),
        token: Some(TOKEN.into()),
        token_file: None,
    }
}

async fn wait_until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "{what} did not happen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn deliveries_of(rabbit: &RabbitFixture, id: uuid::Uuid) -> usize {
    let id = id.to_string();
    rabbit
        .received()
        .iter()
        .filter(|m| m.message_id == id)
        .count()
}

/// Where screenshots go: `<workspace>/target/console-screenshots/`.
fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

const BEARER: (&str, &str) = (
    "Authorization",
    "Bearer console-test-token-0123456789abcdef",
);

/// A dead letter written straight into the table, with `text` in every text field.
async fn insert_dead_letter(
    test: &TestSchema,
    sequence: i64,
    text: &str,
    payload: &serde_json::Value,
) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into {} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
         destination, payload, headers, created_at, attempts, last_error, first_failed_at, last_failed_at) \
         values ($1, $2, $3, $3, $3, $3, $3, $4, $5, now(), 3, $3, now(), now())",
        test.table("outbox_dead_letter")
    )))
    .bind(sequence)
    .bind(id)
    .bind(text)
    .bind(payload)
    .bind(serde_json::json!({ text: text, "x-evil": text }))
    .execute(&test.pool)
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_browser_sees_a_dead_letter_and_its_retry_after_the_fix_is_delivered_once() {
    let test = TestSchema::new().await;
    // Only `ok.#` is bound: `lost.event` is unroutable until the operator binds it.
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let (relay, addr) = start_relay(&test, &rabbit, with_token()).await;
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let lost = Event::builder("order", "42", "lost.event")
        .payload(&serde_json::json!({ "total": 12.5 }))
        .header("x-tenant", "acme")
        .build()
        .unwrap();
    let hostile = Event::builder("order", HOSTILE, format!("hostile.{HOSTILE}"))
        .payload(&serde_json::json!({ "note": format!("</pre>{HOSTILE}") }))
        .header("x-evil", HOSTILE)
        .build()
        .unwrap();
    let fine = Event::builder("order", "7", "ok.placed").build().unwrap();
    outbox
        .enqueue_all(
            &mut test.pool.acquire().await.unwrap(),
            &[lost.clone(), hostile.clone(), fine.clone()],
        )
        .await
        .unwrap();
    wait_until(
        "both poison events are dead-lettered",
        Duration::from_secs(60),
        async || {
            admin::status(&test.pool, &test.schema)
                .await
                .unwrap()
                .dead_lettered
                == 2
        },
    )
    .await;
    let lost_id = *lost.id().as_uuid();
    let hostile_id = *hostile.id().as_uuid();

    let browser = Browser::launch().await;
    // Phone width: the pages must work on a 390 px wide screen.
    let page = browser.new_page(390, 844, true).await;
    let base = format!("http://{addr}");
    page.navigate(&format!("{base}/console")).await;
    page.wait_for(
        "document.getElementById('token') !== null",
        Duration::from_secs(10),
    )
    .await;
    page.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('sign-in').click(); true",
        serde_json::json!(TOKEN)
    ))
    .await;
    page.wait_for(
        "document.querySelector('#dead-letters .value') !== null \
         && document.querySelector('#dead-letters .value').textContent === '2'",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        page.eval("document.querySelector('#slot-lag .value').textContent")
            .await,
        "n/a (polling source)"
    );
    let dir = screenshot_dir();
    let overview = dir.join("overview.png");
    page.screenshot(&overview).await;

    page.navigate(&format!("{base}/console/dead-letters")).await;
    page.wait_for(
        "document.querySelectorAll('tr[data-event-id]').length === 2",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        page.eval("typeof window.pwned").await,
        "undefined",
        "no script of the hostile event ran"
    );
    let list = dir.join("dead-letters.png");
    page.screenshot(&list).await;
    // The page's one script (under the CSP nonce) ticks every row, and unticks them.
    assert_eq!(
        page.eval(
            "document.getElementById('select-all').click(); \
             document.querySelectorAll('input.pick:checked').length"
        )
        .await,
        2
    );
    page.eval("document.getElementById('select-all').click(); true")
        .await;

    page.navigate(&format!("{base}/console/dead-letters/{hostile_id}"))
        .await;
    page.wait_for(
        "document.getElementById('payload') !== null",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(page.eval("typeof window.pwned").await, "undefined");
    let payload = page
        .eval("document.getElementById('payload').textContent")
        .await;
    assert!(
        payload
            .as_str()
            .unwrap()
            .contains("<script>window.pwned=1</script>"),
        "the hostile payload is shown as text: {payload}"
    );
    let detail = dir.join("detail.png");
    page.screenshot(&detail).await;
    println!(
        "console screenshots: {}, {}, {}",
        overview.display(),
        list.display(),
        detail.display()
    );

    // The operator fixes the route, then retries the event from the filtered list.
    rabbit.bind("lost.#").await;
    page.navigate(&format!(
        "{base}/console/dead-letters?event_type=lost.event"
    ))
    .await;
    page.wait_for(
        "document.querySelectorAll('tr[data-event-id]').length === 1",
        Duration::from_secs(20),
    )
    .await;
    page.eval(&format!(
        "document.querySelector('input.pick[value=\"{lost_id}\"]').checked = true; \
         document.getElementById('retry-selected').click(); true"
    ))
    .await;
    page.wait_for(
        "document.getElementById('confirm') !== null",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        deliveries_of(&rabbit, lost_id),
        0,
        "nothing happens before the confirmation"
    );
    page.eval("document.getElementById('confirm').click(); true")
        .await;
    page.wait_for(
        "document.getElementById('result') !== null \
         && document.getElementById('result').dataset.changed === '1'",
        Duration::from_secs(20),
    )
    .await;

    wait_until(
        "the retried event is delivered",
        Duration::from_secs(60),
        async || deliveries_of(&rabbit, lost_id) >= 1,
    )
    .await;
    wait_until(
        "the outbox is settled",
        Duration::from_secs(60),
        async || {
            let status = admin::status(&test.pool, &test.schema).await.unwrap();
            status.pending == 0 && status.dead_lettered == 1
        },
    )
    .await;
    // Retrying again (a stale tab) changes nothing.
    let confirm = request(
        addr,
        "POST",
        "/console/actions",
        &[BEARER],
        Some(&format!("action=retry&id={lost_id}")),
    )
    .await;
    assert_eq!(changed_of(&confirm.body), Some(0), "{}", confirm.body);
    assert_eq!(deliveries_of(&rabbit, lost_id), 1, "delivered exactly once");
    assert_eq!(deliveries_of(&rabbit, *fine.id().as_uuid()), 1);
    assert_eq!(deliveries_of(&rabbit, hostile_id), 0);
    drop(browser);
    relay.stop().await;
}

#[tokio::test]
async fn the_console_wants_the_token_and_same_origin_posts_with_the_csrf_token() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (relay, addr) = start_relay(&test, &rabbit, with_token()).await;

    let missing = request(addr, "GET", "/console", &[], None).await;
    assert_eq!(missing.status, 401);
    assert!(missing.body.contains("name=\"token\""), "the sign-in form");
    assert!(missing.header("www-authenticate").is_some());
    let wrong = request(
        addr,
        "GET",
        "/console",
        &[(
            "Authorization",
            "Bearer console-test-token-0123456789abcdeX",
        )],
        None,
    )
    .await;
    assert_eq!(wrong.status, 401);
    let short = request(
        addr,
        "GET",
        "/console/dead-letters",
        &[("Authorization", "Bearer c")],
        None,
    )
    .await;
    assert_eq!(short.status, 401);
    let right = request(addr, "GET", "/console", &[BEARER], None).await;
    assert_eq!(right.status, 200, "{}", right.body);
    assert!(right.body.contains("Overview"));
    assert!(
        right
            .header("content-security-policy")
            .is_some_and(|csp| csp.contains("default-src 'none'"))
    );
    let metrics = request(addr, "GET", "/metrics", &[], None).await;
    assert_eq!(metrics.status, 200, "the other endpoints need no token");

    // Signing in with the form.
    let refused = request(
        addr,
        "POST",
        "/console/login",
        &[],
        Some("token=wrong-token-wrong-token"),
    )
    .await;
    assert_eq!(refused.status, 401);
    assert!(refused.header("set-cookie").is_none());
    let signed_in = request(
        addr,
        "POST",
        "/console/login",
        &[],
        Some(&format!("token={TOKEN}")),
    )
    .await;
    assert_eq!(signed_in.status, 303);
    let cookie = signed_in.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is a session, not the token"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let list = request(
        addr,
        "GET",
        "/console/dead-letters",
        &[("Cookie", &session)],
        None,
    )
    .await;
    assert_eq!(list.status, 200);
    let forged = request(
        addr,
        "GET",
        "/console",
        &[("Cookie", "outbox_console_session=0000")],
        None,
    )
    .await;
    assert_eq!(forged.status, 401);

    // A POST with the session cookie needs the page's CSRF token and the same origin.
    let id = insert_dead_letter(&test, 1, "token.test", &serde_json::json!({})).await;
    let csrf = csrf_of(&list.body);
    let body = format!("action=purge&id={id}");
    let no_csrf = request(
        addr,
        "POST",
        "/console/actions",
        &[("Cookie", &session)],
        Some(&body),
    )
    .await;
    assert_eq!(no_csrf.status, 403);
    let foreign = request(
        addr,
        "POST",
        "/console/actions",
        &[("Cookie", &session), ("Origin", "http://evil.example")],
        Some(&format!("{body}&csrf={csrf}")),
    )
    .await;
    assert_eq!(foreign.status, 403);
    let no_auth = request(
        addr,
        "POST",
        "/console/actions",
        &[],
        Some(&format!("{body}&csrf={csrf}")),
    )
    .await;
    assert_eq!(no_auth.status, 401);
    assert_eq!(
        admin::status(&test.pool, &test.schema)
            .await
            .unwrap()
            .dead_lettered,
        1,
        "nothing was purged"
    );
    let origin = format!("http://{addr}");
    let purged = request(
        addr,
        "POST",
        "/console/actions",
        &[("Cookie", &session), ("Origin", &origin)],
        Some(&format!("{body}&csrf={csrf}")),
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.body);
    assert_eq!(changed_of(&purged.body), Some(1));
    assert_eq!(
        admin::status(&test.pool, &test.schema)
            .await
            .unwrap()
            .dead_lettered,
        0
    );
    let signed_out = request(
        addr,
        "POST",
        "/console/logout",
        &[("Cookie", &session), ("Origin", &origin)],
        Some(&format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(signed_out.status, 303);
    assert!(
        signed_out
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    relay.stop().await;

    // Off by default: no console at all.
    let (relay, addr) = start_relay(&test, &rabbit, RawConsole::default()).await;
    assert_eq!(
        request(addr, "GET", "/console", &[BEARER], None)
            .await
            .status,
        404
    );
    relay.stop().await;
}

#[tokio::test]
async fn hostile_rows_unknown_ids_malformed_filters_and_huge_payloads_are_safe() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (relay, addr) = start_relay(&test, &rabbit, with_token()).await;
    let hostile = insert_dead_letter(
        &test,
        1,
        HOSTILE,
        &serde_json::json!({ "note": format!("</pre>{HOSTILE}") }),
    )
    .await;
    let huge = insert_dead_letter(
        &test,
        2,
        "huge.event",
        &serde_json::json!({ "blob": "x".repeat(2 * 1024 * 1024) }),
    )
    .await;

    let assert_escaped = |what: &str, body: &str| {
        for raw in [
            "<script>window.pwned",
            "<img src=x",
            "</pre><script",
            "onerror=\"window",
        ] {
            assert!(!body.contains(raw), "{what}: {raw} unescaped");
        }
    };
    let list = request(addr, "GET", "/console/dead-letters", &[BEARER], None).await;
    assert_eq!(list.status, 200);
    assert_escaped("list", &list.body);
    assert!(
        list.body
            .contains("&lt;script&gt;window.pwned=1&lt;/script&gt;")
    );
    let detail = request(
        addr,
        "GET",
        &format!("/console/dead-letters/{hostile}"),
        &[BEARER],
        None,
    )
    .await;
    assert_eq!(detail.status, 200);
    assert_escaped("detail", &detail.body);
    assert!(detail.body.contains("x-evil"), "headers are shown");
    let filtered = request(
        addr,
        "GET",
        "/console/dead-letters?error=%3Cscript%3Ewindow.pwned%3D1&event_type=%22%3E%3Cimg%20src%3Dx",
        &[BEARER],
        None,
    )
    .await;
    assert_eq!(filtered.status, 200);
    assert_escaped("filtered list", &filtered.body);
    let confirm = request(
        addr,
        "POST",
        "/console/confirm",
        &[BEARER],
        Some(&format!("action=purge&id={hostile}")),
    )
    .await;
    assert_eq!(confirm.status, 200);
    assert_escaped("confirmation", &confirm.body);

    // Unknown and malformed ids, malformed filters.
    let no_page = request(addr, "GET", "/console/no-such-page", &[BEARER], None).await;
    assert_eq!(no_page.status, 404);
    let unknown = request(
        addr,
        "GET",
        &format!("/console/dead-letters/{}", uuid::Uuid::now_v7()),
        &[BEARER],
        None,
    )
    .await;
    assert_eq!(unknown.status, 404);
    let malformed = request(
        addr,
        "GET",
        "/console/dead-letters/%3Cscript%3Ex",
        &[BEARER],
        None,
    )
    .await;
    assert_eq!(malformed.status, 404);
    assert_escaped("malformed id", &malformed.body);
    let bad_filter = request(
        addr,
        "GET",
        "/console/dead-letters?since=%3Cscript%3Ewindow.pwned&page=zero",
        &[BEARER],
        None,
    )
    .await;
    assert_eq!(bad_filter.status, 400);
    assert!(
        bad_filter.body.contains("is not a time"),
        "the field and the fix are named"
    );
    assert_escaped("bad filter", &bad_filter.body);
    let bad_action = request(
        addr,
        "POST",
        "/console/actions",
        &[BEARER],
        Some("action=retry&id=%3Cscript%3E"),
    )
    .await;
    assert_eq!(bad_action.status, 400);
    assert_escaped("bad action", &bad_action.body);
    let nothing = request(
        addr,
        "POST",
        "/console/actions",
        &[BEARER],
        Some("action=purge"),
    )
    .await;
    assert_eq!(nothing.status, 400, "no selection never means everything");
    assert_eq!(
        admin::status(&test.pool, &test.schema)
            .await
            .unwrap()
            .dead_lettered,
        2
    );

    // A 2 MB payload is cut on the page.
    let big = request(
        addr,
        "GET",
        &format!("/console/dead-letters/{huge}"),
        &[BEARER],
        None,
    )
    .await;
    assert_eq!(big.status, 200);
    assert!(
        big.body.contains("Truncated: showing the first 65536 of"),
        "the cut is said"
    );
    assert!(big.body.len() < 200_000, "{} bytes", big.body.len());
    relay.stop().await;
}

#[tokio::test]
async fn two_tabs_retrying_one_event_at_once_publish_it_once() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (relay, addr) = start_relay(&test, &rabbit, with_token()).await;
    let id = insert_dead_letter(&test, 1, "order.placed", &serde_json::json!({ "n": 1 })).await;
    // The row's destination is its event type; route it to the fixture's exchange.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "update {} set destination = $1",
        test.table("outbox_dead_letter")
    )))
    .bind(&rabbit.exchange)
    .execute(&test.pool)
    .await
    .unwrap();
    let body = format!("action=retry&id={id}");
    let (first, second) = tokio::join!(
        request(addr, "POST", "/console/actions", &[BEARER], Some(&body)),
        request(addr, "POST", "/console/actions", &[BEARER], Some(&body)),
    );
    assert_eq!((first.status, second.status), (200, 200));
    let mut changed = [changed_of(&first.body), changed_of(&second.body)];
    changed.sort();
    assert_eq!(
        changed,
        [Some(0), Some(1)],
        "one retry wins, the other finds nothing"
    );
    wait_until(
        "the event is delivered",
        Duration::from_secs(60),
        async || deliveries_of(&rabbit, id) >= 1,
    )
    .await;
    wait_until(
        "the outbox is settled",
        Duration::from_secs(60),
        async || {
            let status = admin::status(&test.pool, &test.schema).await.unwrap();
            status.pending == 0 && status.dead_lettered == 0
        },
    )
    .await;
    assert_eq!(deliveries_of(&rabbit, id), 1, "published once");
    relay.stop().await;
}

/// Collects log lines of the current thread (a `#[tokio::test]` runs its tasks on it).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_action_is_logged_with_what_when_and_where_and_never_the_payload_or_token() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("outbox_relay=info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (relay, addr) = start_relay(&test, &rabbit, with_token()).await;
    let secret_payload = serde_json::json!({ "card": "PAYLOAD-SECRET-4111" });
    let id = insert_dead_letter(&test, 1, "logged.event", &secret_payload).await;
    let shown = request(
        addr,
        "GET",
        &format!("/console/dead-letters/{id}"),
        &[BEARER],
        None,
    )
    .await;
    assert!(
        shown.body.contains("PAYLOAD-SECRET-4111"),
        "the page shows it"
    );
    let purged = request(
        addr,
        "POST",
        "/console/actions",
        &[BEARER],
        Some(&format!("action=purge&id={id}")),
    )
    .await;
    assert_eq!(changed_of(&purged.body), Some(1));
    let wrong = request(
        addr,
        "POST",
        "/console/login",
        &[],
        Some("token=not-the-token-at-all"),
    )
    .await;
    assert_eq!(wrong.status, 401);
    relay.stop().await;
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let action = logs
        .lines()
        .find(|line| line.contains("console action"))
        .unwrap_or_else(|| panic!("no action logged in:\n{logs}"));
    for part in [
        "action=\"purge\"",
        &id.to_string(),
        "remote=127.0.0.1:",
        "at=",
        "changed=1",
    ] {
        assert!(action.contains(part), "{part} missing in {action}");
    }
    assert!(
        logs.contains("console sign-in with a wrong token"),
        "{logs}"
    );
    for secret in ["PAYLOAD-SECRET-4111", TOKEN, "not-the-token-at-all"] {
        assert!(!logs.contains(secret), "{secret} was logged");
    }
}

fn rows_in(page: &str) -> usize {
    page.matches("<tr data-event-id=").count()
}

#[tokio::test]
async fn filters_and_paging_narrow_the_list() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let (relay, addr) = start_relay(&test, &rabbit, with_token()).await;
    for sequence in 1..=51 {
        insert_dead_letter(&test, sequence, "page.event", &serde_json::json!({})).await;
    }
    let other = insert_dead_letter(&test, 100, "Other.Event", &serde_json::json!({})).await;
    let get = async |path: &str| {
        let response = request(addr, "GET", path, &[BEARER], None).await;
        assert_eq!(response.status, 200, "{path}: {}", response.body);
        response.body
    };
    let first = get("/console/dead-letters").await;
    assert_eq!(rows_in(&first), 50);
    assert!(first.contains("id=\"next\""), "a next page");
    let second = get("/console/dead-letters?page=2").await;
    assert_eq!(rows_in(&second), 2);
    assert!(!second.contains("id=\"next\"") && second.contains("id=\"prev\""));
    let by_type = get("/console/dead-letters?event_type=Other.Event").await;
    assert_eq!(rows_in(&by_type), 1);
    assert!(by_type.contains(&other.to_string()));
    let by_error = get("/console/dead-letters?error=other.EVENT").await;
    assert_eq!(rows_in(&by_error), 1, "error text matches ignoring case");
    let by_aggregate =
        get("/console/dead-letters?aggregate_type=page.event&aggregate_id=page.event").await;
    assert_eq!(rows_in(&by_aggregate), 50);
    let future = get("/console/dead-letters?since=2999-01-01T00:00").await;
    assert_eq!(rows_in(&future), 0);
    let past = get("/console/dead-letters?until=2000-01-01").await;
    assert_eq!(rows_in(&past), 0);
    let window = get("/console/dead-letters?since=2000-01-01&until=2999-01-01T00:00:00Z&event_type=page.event&page=2").await;
    assert_eq!(rows_in(&window), 1);
    assert!(
        window.contains("href=\"/console/dead-letters?since=2000-01-01&amp;until=2999-01-01T00%3A00%3A00Z&amp;event_type=page.event&amp;page=1\""),
        "the paging links keep the filters"
    );
    relay.stop().await;
}
