//! Starting, reconnecting and configuring the replication session of a
//! [`WalSource`], and the accessors around it.

use super::*;

/// Streams committed outbox events from a logical replication slot; see the module docs.
pub struct WalSource {
    pub(super) config: WalSourceConfig,
    pub(super) pool: PgPool,
    pub(super) sql: WalSql,
    pub(super) client: ReplicationClient,
    pub(super) relations: HashMap<u32, RelationKind>,
    pub(super) open: Option<OpenTransaction>,
    pub(super) broken: bool,
    /// Highest transaction end the caller confirmed.
    pub(super) confirmed: Lsn,
    /// End of the last transaction with events handed out.
    pub(super) last_event_end: Lsn,
    /// Highest position (keepalive, or end of a transaction without events) that
    /// may be confirmed once everything handed out is confirmed.
    pub(super) idle: Lsn,
    /// Recorded in the position row and handed to the client for reporting.
    pub(super) reported: Lsn,
    pub(super) server_wal_end: Lsn,
    pub(super) last_flush: Instant,
    pub(super) created_slot: bool,
    /// Rows of the table to publish before the stream (durable in `relay_wal_slot`).
    pub(super) drain: Option<DrainRange>,
    /// A transaction decoded but not yet returned (its call was cancelled).
    pub(super) ready: Option<WalTransaction>,
}

impl fmt::Debug for WalSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalSource")
            .field("slot", &self.config.slot)
            .field("positions", &self.positions())
            .field("broken", &self.broken)
            .field("created_slot", &self.created_slot)
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(super) enum RelationKind {
    Outbox(std::result::Result<OutboxColumns, String>),
    Other,
}

#[derive(Debug)]
pub(super) struct OpenTransaction {
    pub(super) xid: u32,
    pub(super) events: Vec<OutboxEvent>,
    pub(super) row_sequences: Vec<i64>,
    pub(super) undecodable: Vec<Undecodable>,
}

impl WalSource {
    /// Check the server and the publication, create what is missing (publication
    /// first, then a permanent pgoutput slot), and start streaming from the
    /// recorded confirmed position; or report that the slot was lost.
    ///
    /// Errors name the fix: `wal_level` not `logical`, a role without
    /// `REPLICATION`, a publication that does not publish inserts of
    /// `<schema>.outbox` (or filters its rows or columns), a slot of another
    /// plugin or database. A slot another session streams from is waited for up
    /// to `slot_busy_timeout`.
    pub async fn start(config: WalSourceConfig) -> Result<WalStart> {
        config.validate()?;
        let pool = connect_pool(&config).await?;
        let sql = WalSql::new(&config);
        check_server(&pool, &config, &sql).await?;
        ensure_publication(&pool, &config, &sql).await?;
        match inspect_slot(&pool, &config, &sql).await? {
            SlotState::Healthy {
                resume_from,
                drain,
                adopted,
            } => Ok(WalStart::Ready(
                WalSource::open(config, pool, sql, resume_from, drain, adopted).await?,
            )),
            SlotState::Missing => {
                let (start, drain) = create_slot(&pool, &config, &sql).await?;
                Ok(WalStart::Ready(
                    WalSource::open(config, pool, sql, start, drain, true).await?,
                ))
            }
            SlotState::Recovering => {
                tracing::warn!(slot = %config.slot, "finishing an interrupted recovery of the lost replication slot");
                let (start, drain) = recover_slot(&pool, &config, &sql).await?;
                Ok(WalStart::Ready(
                    WalSource::open(config, pool, sql, start, drain, true).await?,
                ))
            }
            SlotState::Lost { reason, last } => {
                tracing::error!(
                    slot = %config.slot, %reason, last_confirmed_lsn = %last,
                    "replication slot lost: events after the last confirmed position may be missing from the WAL; \
                     recover from the outbox table"
                );
                Ok(WalStart::SlotLost(SlotLost {
                    last_confirmed_lsn: last,
                    reason,
                    config,
                    pool,
                }))
            }
        }
    }

    pub(super) async fn open(
        config: WalSourceConfig,
        pool: PgPool,
        sql: WalSql,
        resume_from: Lsn,
        drain: Option<DrainRange>,
        created_slot: bool,
    ) -> Result<Self> {
        let client = start_streaming(&config, resume_from).await?;
        tracing::info!(slot = %config.slot, %resume_from, "streaming from the replication slot");
        Ok(WalSource {
            config,
            pool,
            sql,
            client,
            relations: HashMap::new(),
            open: None,
            broken: false,
            confirmed: resume_from,
            last_event_end: resume_from,
            idle: resume_from,
            reported: resume_from,
            server_wal_end: resume_from,
            last_flush: Instant::now(),
            created_slot,
            drain,
            ready: None,
        })
    }

    /// Restart the stream after an error: record the confirmed position (if the
    /// database answers), check the slot again and stream from the recorded
    /// position. Transactions handed out but not confirmed are sent again.
    pub async fn reconnect(&mut self) -> Result<()> {
        // After a decode error the old session still holds the slot: end it first.
        self.broken = true;
        if self.client.is_running()
            && tokio::time::timeout(self.config.connect_timeout, self.client.shutdown())
                .await
                .is_err()
        {
            self.client.abort();
        }
        if let Err(error) = self.record_position(self.flush_target()).await {
            tracing::warn!(%error, "could not record the confirmed position before reconnecting");
        }
        let resume_from = match inspect_slot(&self.pool, &self.config, &self.sql).await? {
            SlotState::Healthy { resume_from, .. } => resume_from,
            SlotState::Missing | SlotState::Recovering => {
                return Err(WalError::SlotLost {
                    slot: self.config.slot.clone(),
                    last_confirmed_lsn: self.reported,
                });
            }
            SlotState::Lost { last, .. } => {
                return Err(WalError::SlotLost {
                    slot: self.config.slot.clone(),
                    last_confirmed_lsn: last,
                });
            }
        };
        self.client = start_streaming(&self.config, resume_from).await?;
        self.relations.clear();
        self.open = None;
        self.ready = None;
        self.broken = false;
        self.reported = self.reported.max(resume_from);
        self.confirmed = self.confirmed.max(resume_from);
        self.last_event_end = self.last_event_end.max(resume_from);
        self.last_flush = Instant::now();
        tracing::info!(slot = %self.config.slot, %resume_from, "replication stream reconnected");
        Ok(())
    }

    /// Bytes of WAL written after the slot's confirmed position, or `None` without a slot.
    pub async fn slot_lag_bytes(&self) -> Result<Option<i64>> {
        self.monitor().lag_bytes().await
    }

    /// A handle that reads the slot's lag and state from another task.
    pub fn monitor(&self) -> SlotMonitor {
        SlotMonitor {
            pool: self.pool.clone(),
            slot: self.config.slot.clone(),
            timeout: self.config.db_timeout(),
        }
    }

    /// The positions the source tracks.
    pub fn positions(&self) -> WalPositions {
        WalPositions {
            confirmed: self.confirmed,
            reported: self.reported,
            received: self.last_event_end,
            server_wal_end: self.server_wal_end,
        }
    }

    /// True when this source created its slot (first start, or
    /// [`SlotLost::recreate_slot`]) or adopted one without a recorded position: rows already in the outbox table committed
    /// before the slot's start and are not in the stream. Publish and settle them
    /// from the table before what [`WalSource::next_transaction`] returns.
    pub fn created_slot(&self) -> bool {
        self.created_slot
    }

    /// The rows of the outbox table to publish (and settle) before what
    /// [`WalSource::next_transaction`] returns: those with
    /// `after < sequence <= upto` still in the table. Set after the slot was
    /// created, adopted or re-created, and on every start until
    /// [`WalSource::record_drain`] recorded the drain as finished.
    pub fn drain(&self) -> Option<DrainRange> {
        self.drain
    }

    /// Record the drain's progress: every drained row up to sequence `after`
    /// is settled (deleted). With `finished`, the whole drain is settled and
    /// the slot's state becomes `streaming`; a restart then drains no more.
    pub async fn record_drain(&mut self, after: i64, finished: bool) -> Result<()> {
        db_call(
            "recording the drain's progress",
            self.config.db_timeout(),
            sqlx::query(AssertSqlSafe(self.sql.drain_progress.as_str()))
                .bind(&self.config.slot)
                .bind(after)
                .bind(finished)
                .execute(&self.pool),
        )
        .await?;
        if finished {
            self.drain = None;
            tracing::info!(slot = %self.config.slot, "table drain settled; the slot streams everything from now on");
        } else if let Some(drain) = &mut self.drain {
            drain.after = drain.after.max(after);
        }
        Ok(())
    }

    /// The settings the source runs with.
    pub fn config(&self) -> &WalSourceConfig {
        &self.config
    }
}

/// Connect the replication session and start streaming at `resume_from`,
/// waiting out a slot another session still holds.
pub(super) async fn start_streaming(
    config: &WalSourceConfig,
    resume_from: Lsn,
) -> Result<ReplicationClient> {
    let began = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let replication = replication_config(config, resume_from)?;
        let mut client = ReplicationClient::connect(replication)
            .await
            .map_err(WalError::replication("connecting for replication"))?;
        let error = match tokio::time::timeout(config.connect_timeout, client.wait_started()).await
        {
            Ok(Ok(())) => return Ok(client),
            Ok(Err(error)) => error,
            Err(_) => {
                client.abort();
                return Err(WalError::ReplicationTimeout {
                    timeout_ms: millis(config.connect_timeout),
                });
            }
        };
        let message = error.to_string();
        // 55006 object_in_use: "replication slot … is active for PID …".
        if sqlstate_in(&message) != Some("55006") {
            return Err(WalError::replication("starting replication")(error));
        }
        let waited = began.elapsed();
        if waited >= config.slot_busy_timeout {
            return Err(WalError::SlotBusy {
                slot: config.slot.clone(),
                pid: busy_pid(&message),
                waited_ms: millis(waited),
            });
        }
        tracing::info!(
            slot = %config.slot, pid = ?busy_pid(&message),
            "replication slot is in use by another session; waiting for it"
        );
        tokio::time::sleep(backoff.min(config.slot_busy_timeout.saturating_sub(waited))).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

pub(super) fn replication_config(
    config: &WalSourceConfig,
    resume_from: Lsn,
) -> Result<ReplicationConfig> {
    let options = config.connect_options()?;
    let url = options.to_url_lossy();
    let password = url.password().map(percent_decode).unwrap_or_default();
    let host = match options.get_socket() {
        Some(socket) => socket.to_string_lossy().into_owned(),
        None => options.get_host().to_owned(),
    };
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let file_of = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| certificate_file(name, &value))
            .transpose()
    };
    let root_cert = file_of("sslrootcert")?;
    let mut tls = match options.get_ssl_mode() {
        PgSslMode::Disable => TlsConfig::disabled(),
        PgSslMode::Allow | PgSslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::default()
        },
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa => TlsConfig::verify_ca(root_cert),
        PgSslMode::VerifyFull => TlsConfig::verify_full(root_cert),
    };
    // The replication connection presents the same client certificate as the pools.
    match (file_of("sslcert")?, file_of("sslkey")?) {
        (Some(cert), Some(key)) => tls = tls.with_client_cert(cert, key),
        (None, None) => {}
        _ => {
            return Err(WalError::InvalidConfig {
                field: "database.url",
                problem: "it sets only one of sslcert and sslkey".into(),
                fix: "a client certificate needs both: set sslcert=<file> and sslkey=<file>".into(),
            });
        }
    }
    Ok(ReplicationConfig::new(
        host,
        options.get_username(),
        password,
        database,
        config.slot.as_str(),
        config.publication.as_str(),
    )
    .with_port(options.get_port())
    .with_tls(tls)
    // The server skips what committed before the start; the initial report is the
    // recorded position, so the slot never moves back or past it.
    .with_start_lsn(resume_from.to_pgwire())
    .with_ack_lsn(resume_from.to_pgwire())
    .with_status_interval(config.status_interval)
    .with_wakeup_interval(config.status_interval)
    .with_buffer_size(config.buffer_messages)
    .with_options(REPLICATION_SESSION_OPTIONS)
    .with_application_name(format!("outbox-relay-wal:{}", config.slot)))
}

/// The file a certificate setting of the database URL names. sqlx writes a file as
/// `file: <path>` in the URLs it builds; a certificate given inline (PEM in the URL)
/// cannot be handed to the replication client.
pub(super) fn certificate_file(setting: &str, value: &str) -> Result<std::path::PathBuf> {
    let path = value.strip_prefix("file: ").unwrap_or(value);
    if path.starts_with("-----BEGIN") {
        return Err(WalError::InvalidConfig {
            field: "database.url",
            problem: format!("it gives {setting} inline (PEM text)"),
            fix: format!(
                "the WAL source's replication connection needs a file: set \
                 {setting}=<path to a PEM file>"
            ),
        });
    }
    Ok(std::path::PathBuf::from(path))
}
