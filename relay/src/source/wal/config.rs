//! Settings of the WAL source and their checks.

use super::*;

/// Settings of a [`WalSource`].
#[derive(Clone)]
pub struct WalSourceConfig {
    /// PostgreSQL URL; the role needs the `REPLICATION` attribute (or superuser).
    pub database_url: String,
    /// Schema of the outbox tables.
    pub schema: SchemaName,
    /// Name of the logical replication slot (`a-z`, `0-9`, `_`; unique in the cluster).
    pub slot: String,
    /// Name of the publication on `<schema>.outbox` (`a-z`, `0-9`, `_`).
    pub publication: String,
    /// Prefix of wal-message events (default [`DEFAULT_MESSAGE_PREFIX`]).
    pub message_prefix: String,
    /// Interval of standby status updates and of recording the confirmed position.
    pub status_interval: Duration,
    /// Timeout of connecting and of starting replication.
    pub connect_timeout: Duration,
    /// How long [`WalSource::start`] waits while another session streams from the slot.
    pub slot_busy_timeout: Duration,
    /// Undecoded replication messages buffered ahead of decoding (one row each).
    pub buffer_messages: usize,
}

impl WalSourceConfig {
    /// Settings with the defaults for everything but the connection, schema, slot and publication.
    pub fn new(
        database_url: impl Into<String>,
        schema: SchemaName,
        slot: impl Into<String>,
        publication: impl Into<String>,
    ) -> Self {
        WalSourceConfig {
            database_url: database_url.into(),
            schema,
            slot: slot.into(),
            publication: publication.into(),
            message_prefix: DEFAULT_MESSAGE_PREFIX.to_owned(),
            status_interval: Duration::from_millis(DEFAULT_STATUS_INTERVAL_MS),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            slot_busy_timeout: Duration::from_millis(DEFAULT_SLOT_BUSY_TIMEOUT_MS),
            buffer_messages: DEFAULT_BUFFER_MESSAGES,
        }
    }

    /// Check the settings without connecting.
    pub fn validate(&self) -> Result<()> {
        check_identifier("wal.slot", &self.slot)?;
        check_identifier("wal.publication", &self.publication)?;
        if self.message_prefix.is_empty() || self.message_prefix.contains('\0') {
            return Err(invalid(
                "wal.message_prefix",
                "must not be empty or contain NUL",
                format!("use the writers' prefix, by default {DEFAULT_MESSAGE_PREFIX:?}"),
            ));
        }
        for (field, value) in [
            ("wal.status_interval_ms", self.status_interval),
            ("wal.connect_timeout_ms", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be positive", "set it to at least 1"));
            }
        }
        if self.buffer_messages == 0 {
            return Err(invalid(
                "wal.buffer_messages",
                "must be positive",
                format!("leave the default {DEFAULT_BUFFER_MESSAGES}"),
            ));
        }
        self.connect_options()?;
        Ok(())
    }

    /// Name of the lease (in `relay_lease`) or advisory lock that elects the one
    /// relay instance streaming from this slot: `wal:<slot>`.
    pub fn leader_lease_name(&self) -> String {
        format!("wal:{}", self.slot)
    }

    /// Name of the `relay_lease` row recording the confirmed position: `wal-confirmed:<slot>`.
    pub fn position_row_name(&self) -> String {
        format!("wal-confirmed:{}", self.slot)
    }

    pub(super) fn connect_options(&self) -> Result<PgConnectOptions> {
        // The error is not shown: it may quote the URL, password included.
        self.database_url.parse::<PgConnectOptions>().map_err(|_| {
            invalid(
                "database.url",
                "cannot be parsed",
                "use postgres://user:password@host:port/database",
            )
        })
    }

    pub(super) fn db_timeout(&self) -> Duration {
        self.connect_timeout.max(MIN_DB_TIMEOUT)
    }
}

impl fmt::Debug for WalSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalSourceConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("schema", &self.schema)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("message_prefix", &self.message_prefix)
            .field("status_interval", &self.status_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("slot_busy_timeout", &self.slot_busy_timeout)
            .field("buffer_messages", &self.buffer_messages)
            .finish()
    }
}

pub(super) fn invalid(
    field: &'static str,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> WalError {
    WalError::InvalidConfig {
        field,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Slot and publication names go into SQL and replication commands as text,
/// so they are plain lowercase identifiers (slot names must be anyway).
pub(super) fn check_identifier(field: &'static str, name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a plain identifier"),
            "use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit",
        ))
    }
}

/// The URL with its password replaced, for logs and `Debug`.
pub(super) fn redact_url(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some(scheme_end) = redacted.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = redacted[authority_start..]
            .find(['/', '?'])
            .map_or(redacted.len(), |i| i + authority_start);
        if let Some(at) = redacted[authority_start..authority_end].rfind('@') {
            let userinfo = &redacted[authority_start..authority_start + at];
            if let Some(colon) = userinfo.find(':') {
                redacted.replace_range(authority_start + colon + 1..authority_start + at, "***");
            }
        }
    }
    if let Some(start) = redacted.find("password=") {
        let value_start = start + "password=".len();
        let value_end = redacted[value_start..]
            .find('&')
            .map_or(redacted.len(), |i| i + value_start);
        redacted.replace_range(value_start..value_end, "***");
    }
    redacted
}
