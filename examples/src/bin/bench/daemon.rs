//! The relay daemon (the release `outbox-relay` binary) as a child process, configured
//! by `OUTBOX_RELAY__*` environment variables only, so its CPU time and peak RSS are
//! its own (read from `/proc/<pid>`).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How long the daemon has to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// CPU time and memory of the daemon, from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    /// User plus system CPU seconds.
    pub(crate) cpu_secs: f64,
    /// Peak resident set (VmHWM), in KiB.
    pub(crate) peak_rss_kib: u64,
}

/// One run of the daemon.
pub(crate) struct Daemon {
    child: Child,
    log: PathBuf,
    exited: bool,
}

impl Daemon {
    /// Start `binary run` with `env` (keys without the `OUTBOX_RELAY__` prefix).
    pub(crate) fn start(binary: &Path, env: &[(String, String)]) -> anyhow::Result<Daemon> {
        let log = std::env::temp_dir().join(format!(
            "outbox-bench-relay-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the daemon's log {}", log.display()))?;
        let mut command = Command::new(binary);
        command.arg("run");
        // Only the bench's settings: nothing inherited from the shell's relay config.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTBOX_RELAY") {
                command.env_remove(key);
            }
        }
        command
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .envs(env.iter().map(|(k, v)| (format!("OUTBOX_RELAY__{k}"), v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let child = command.spawn().with_context(|| {
            format!(
                "starting the relay daemon {} (build it: cargo build --release -p outbox-relay)",
                binary.display()
            )
        })?;
        Ok(Daemon {
            child,
            log,
            exited: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub(crate) fn running(&mut self) -> bool {
        if !self.exited && matches!(self.child.try_wait(), Ok(Some(_))) {
            self.exited = true;
        }
        !self.exited
    }

    /// CPU and peak RSS so far; zero once it exited.
    pub(crate) fn usage(&self) -> Usage {
        read_usage(self.pid()).unwrap_or_default()
    }

    /// An error for a daemon that stopped by itself, with the end of its log.
    pub(crate) fn ended_early(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "the relay daemon exited early ({what}); end of its log:\n{}",
            self.log_tail()
        )
    }

    /// SIGTERM, wait for the exit (SIGKILL after [`STOP_TIMEOUT`]); the usage just before.
    pub(crate) async fn stop(mut self) -> anyhow::Result<Usage> {
        let usage = self.usage();
        if self.running() {
            signal(self.pid(), "TERM")?;
        }
        let started = Instant::now();
        while self.running() {
            if started.elapsed() > STOP_TIMEOUT {
                signal(self.pid(), "KILL")?;
                let _ = self.child.wait();
                anyhow::bail!(
                    "the relay daemon did not stop within {STOP_TIMEOUT:?} of SIGTERM; end of its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Kept on request, to read what the daemon logged during a measurement.
        if std::env::var_os("OUTBOX_BENCH_KEEP_LOG").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
        Ok(usage)
    }

    /// The last 30 lines of its log (the relay logs ids and counts, never payloads).
    pub(crate) fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill(1)")?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, else 100).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .filter(|&ticks: &f64| ticks > 0.0)
            .unwrap_or(100.0)
    })
}

fn read_usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_rss_kib = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0);
    Some(Usage {
        cpu_secs: (utime + stime) / clock_ticks(),
        peak_rss_kib,
    })
}
