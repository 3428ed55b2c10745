//! Machine facts and service versions, read at run time from the machine and the
//! running services themselves.

use crate::Ctx;
use crate::table::Section;

/// What the figures were measured on.
pub(crate) async fn facts(ctx: &Ctx) -> Section {
    let mut section = Section::new("Machine and services", &["what", "value"]);
    section.row(vec![
        "date (UTC)".into(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M").to_string(),
    ]);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    section.row(vec!["cores".into(), format!("{cores} ({})", cpu_model())]);
    section.row(vec!["RAM".into(), mem_total()]);
    for (what, sql) in [
        ("PostgreSQL", "show server_version"),
        ("synchronous_commit", "show synchronous_commit"),
        ("wal_level", "show wal_level"),
    ] {
        let value = sqlx::query_scalar::<_, String>(sql)
            .fetch_one(&ctx.pool)
            .await
            .unwrap_or_else(|error| format!("unknown ({error})"));
        section.row(vec![what.into(), value]);
    }
    section.row(vec!["RabbitMQ".into(), rabbitmq_version().await]);
    section.row(vec!["Apache Kafka".into(), kafka_version()]);
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    section.row(vec!["librdkafka (relay and bench)".into(), librdkafka]);
    section.row(vec![
        "relay".into(),
        format!(
            "{} (the release daemon, a child process of the bench)",
            std::env::current_dir()
                .ok()
                .and_then(|dir| ctx.relay_bin.strip_prefix(dir).ok())
                .unwrap_or(&ctx.relay_bin)
                .display()
        ),
    ]);
    section
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "model unknown".to_owned())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        )
}

/// The running node's version, from `rabbitmq-diagnostics server_version`.
async fn rabbitmq_version() -> String {
    let run = tokio::task::spawn_blocking(|| {
        std::process::Command::new("timeout")
            .args(["30", "rabbitmq-diagnostics", "-q", "server_version"])
            .stdin(std::process::Stdio::null())
            .output()
    });
    match run.await {
        Ok(Ok(output)) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            text.lines()
                .map(str::trim)
                .rfind(|line| !line.is_empty())
                .unwrap_or("unknown")
                .to_owned()
        }
        Ok(Ok(output)) => format!(
            "unknown (rabbitmq-diagnostics exited with {})",
            output.status
        ),
        Ok(Err(error)) => format!("unknown (rabbitmq-diagnostics: {error})"),
        Err(error) => format!("unknown ({error})"),
    }
}

/// The running broker's version: the `kafka-server-<version>.jar` on the class path of
/// the `kafka.Kafka` process (the Kafka protocol does not carry the broker's release).
fn kafka_version() -> String {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return "unknown (no /proc)".to_owned();
    };
    for entry in entries.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        if !args.iter().any(|arg| arg == "kafka.Kafka") {
            continue;
        }
        let Some(classpath) = args
            .iter()
            .position(|arg| arg == "-cp" || arg == "-classpath")
            .and_then(|i| args.get(i + 1))
        else {
            continue;
        };
        for part in classpath.split(':') {
            if let Some(version) = jar_version(part) {
                return version;
            }
        }
    }
    "unknown (no kafka.Kafka process seen)".to_owned()
}

/// `4.1.1` from a class path entry: `…/kafka-server-4.1.1.jar` or `…/kafka-4.1.1/*`.
fn jar_version(entry: &str) -> Option<String> {
    let dir = entry.strip_suffix("/*").unwrap_or(entry);
    let path = std::path::Path::new(dir);
    if path.is_dir() {
        for jar in std::fs::read_dir(path).ok()?.flatten() {
            let name = jar.file_name().to_string_lossy().into_owned();
            if let Some(version) = name
                .strip_prefix("kafka-server-")
                .and_then(|rest| rest.strip_suffix(".jar"))
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
            {
                return Some(version.to_owned());
            }
        }
        return None;
    }
    let name = path.file_name()?.to_string_lossy().into_owned();
    name.strip_prefix("kafka-server-")
        .and_then(|rest| rest.strip_suffix(".jar"))
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
}
