//! Headless Chromium driven over the Chrome DevTools Protocol, for the console's
//! end-to-end test: a minimal client (JSON commands over one websocket, flat
//! sessions per page) instead of a CDP crate with generated bindings.
//!
//! The browser is Debian's `chromium` (installed by `scripts/dev-services`), or
//! `OUTBOX_TEST_CHROMIUM`. As root it needs `--no-sandbox`; `--headless=new`,
//! `--disable-gpu` and `--disable-dev-shm-usage` make it run without a display,
//! GPU or a large /dev/shm. It picks a free debugging port
//! (`--remote-debugging-port=0`) and writes it to `DevToolsActivePort` in its
//! profile directory, which is fresh per launch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// The flags Chromium needs to run headless here (as root, in a container).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-sync",
    "--mute-audio",
    "--remote-debugging-port=0",
];

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Value>>>>;
type Writer = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// The Chromium binary: `OUTBOX_TEST_CHROMIUM`, else the first of `chromium`,
/// `chromium-browser`, `google-chrome` on `PATH`.
pub fn chromium_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("OUTBOX_TEST_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .map(|name| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A running headless Chromium; killed when dropped.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    writer: Arc<Mutex<Writer>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
}

/// One tab, attached with its own session.
pub struct Page {
    session: String,
    writer: Arc<Mutex<Writer>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

async fn send(
    writer: &Mutex<Writer>,
    pending: &Pending,
    next_id: &AtomicU64,
    session: Option<&str>,
    method: &str,
    params: Value,
) -> Value {
    match try_send(writer, pending, next_id, session, method, params).await {
        Ok(result) => result,
        Err(error) => panic!("Chromium refused {method}: {error}"),
    }
}

/// [`send`], returning the protocol error (e.g. the page navigated meanwhile)
/// instead of panicking on it.
async fn try_send(
    writer: &Mutex<Writer>,
    pending: &Pending,
    next_id: &AtomicU64,
    session: Option<&str>,
    method: &str,
    params: Value,
) -> Result<Value, Value> {
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    pending.lock().expect("pending lock").insert(id, tx);
    let mut command = json!({ "id": id, "method": method, "params": params });
    if let Some(session) = session {
        command["sessionId"] = json!(session);
    }
    writer
        .lock()
        .await
        .send(Message::text(command.to_string()))
        .await
        .unwrap_or_else(|e| panic!("sending {method} to Chromium: {e}"));
    let response = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .unwrap_or_else(|_| panic!("Chromium did not answer {method} within 30 s"))
        .unwrap_or_else(|_| panic!("Chromium closed the connection during {method}"));
    if let Some(error) = response.get("error") {
        return Err(error.clone());
    }
    Ok(response["result"].clone())
}

impl Browser {
    /// Start Chromium and connect to it; panics with the fix if it is not installed.
    pub async fn launch() -> Browser {
        let binary = chromium_binary().expect(
            "no chromium on PATH: scripts/dev-services installs Debian's chromium (or set OUTBOX_TEST_CHROMIUM)",
        );
        let profile = std::env::temp_dir().join(format!(
            "outbox-console-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&profile).expect("create the Chromium profile directory");
        let log = std::fs::File::create(profile.join("chromium.log")).expect("Chromium log file");
        let child = Command::new(&binary)
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let port_file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Chromium did not open its DevTools port within 60 s; log: {}",
                std::fs::read_to_string(profile.join("chromium.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("connecting to Chromium's DevTools at {url}: {e}"));
        let (writer, mut reader) = socket.split();
        let pending: Pending = Arc::default();
        let dispatch = pending.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = reader.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                // Events have no id; only command responses are awaited.
                if let Some(id) = value.get("id").and_then(Value::as_u64)
                    && let Some(tx) = dispatch.lock().expect("pending lock").remove(&id)
                {
                    let _ = tx.send(value);
                }
            }
        });
        Browser {
            child,
            profile,
            writer: Arc::new(Mutex::new(writer)),
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            reader,
        }
    }

    /// A new tab of `width` × `height` CSS pixels (`mobile`: phone emulation).
    pub async fn new_page(&self, width: u32, height: u32, mobile: bool) -> Page {
        let target = send(
            &self.writer,
            &self.pending,
            &self.next_id,
            None,
            "Target.createTarget",
            json!({ "url": "about:blank" }),
        )
        .await;
        let attached = send(
            &self.writer,
            &self.pending,
            &self.next_id,
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        )
        .await;
        let page = Page {
            session: attached["sessionId"]
                .as_str()
                .expect("a session id")
                .to_owned(),
            writer: self.writer.clone(),
            pending: self.pending.clone(),
            next_id: self.next_id.clone(),
        };
        page.command("Page.enable", json!({})).await;
        page.command(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Page {
    /// Send a DevTools command to this tab; its result.
    pub async fn command(&self, method: &str, params: Value) -> Value {
        send(
            &self.writer,
            &self.pending,
            &self.next_id,
            Some(&self.session),
            method,
            params,
        )
        .await
    }

    /// Open `url` and wait until the document has loaded.
    pub async fn navigate(&self, url: &str) {
        let result = self.command("Page.navigate", json!({ "url": url })).await;
        assert!(
            result.get("errorText").is_none(),
            "navigating to {url}: {result}"
        );
        self.wait_for(
            &format!(
                "document.readyState === 'complete' && location.href.startsWith({})",
                json!(url)
            ),
            Duration::from_secs(30),
        )
        .await;
    }

    /// The value of the JavaScript expression `expression` in the page.
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating {expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Wait until `condition` (JavaScript) is true in a loaded document, or panic with
    /// the page's text at the deadline.
    pub async fn wait_for(&self, condition: &str, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        let expression = format!(
            "(() => {{ try {{ return document.readyState === 'complete' && !!({condition}); }} \
             catch (e) {{ return false; }} }})()"
        );
        loop {
            // While a form post navigates, the old document's context is gone and
            // Chromium refuses the evaluation: that only means "not yet".
            let result = try_send(
                &self.writer,
                &self.pending,
                &self.next_id,
                Some(&self.session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await
            .unwrap_or(Value::Null);
            if result["result"]["value"] == json!(true) {
                return;
            }
            if tokio::time::Instant::now() >= until {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "{condition} did not become true within {deadline:?}; the page says: {text}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Save a PNG screenshot of the whole page to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let shot = self
            .command(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot directory");
        }
        std::fs::write(path, data).expect("write the screenshot");
    }
}
