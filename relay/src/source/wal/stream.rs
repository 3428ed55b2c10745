//! Reading the stream: transactions in commit order, confirming and recording
//! positions, decoding pgoutput messages into events.

use super::*;

/// The events of one committed transaction, in the order it wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct WalTransaction {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: pass it to [`WalSource::confirm`].
    pub end_lsn: Lsn,
    /// Transaction id.
    pub xid: u32,
    /// When it committed (server time).
    pub commit_time: DateTime<Utc>,
    /// Its outbox events, table rows and wal-message events in write order.
    pub events: Vec<OutboxEvent>,
    /// Outbox sequences of the events that are table rows: delete those rows
    /// once the transaction is confirmed (wal-message events have no row).
    pub row_sequences: Vec<i64>,
    /// Changes with the outbox's marks that cannot become events, in write
    /// order: dead-letter each (it is never published), then confirm the
    /// transaction as usual, so the slot moves past them.
    pub undecodable: Vec<Undecodable>,
}

/// A change in the stream that looks like an outbox event and cannot be one.
/// Anyone who can write the outbox table or connect (any role may call
/// `pg_logical_emit_message`) can produce these: they must never stop the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Undecodable {
    /// An outbox row with a value no event can carry (an infinite `created_at`).
    /// Its row stays in the table until it is moved to the dead-letter table as it
    /// is (raw values kept); it is not in [`WalTransaction::row_sequences`].
    Row {
        /// The row's outbox sequence.
        sequence: i64,
        /// The row's event id.
        event_id: EventId,
        /// The row's partition key.
        partition_key: String,
        /// Why it cannot be published.
        reason: String,
    },
    /// A transactional logical decoding message with the outbox prefix whose
    /// content is not an event document (bad bytes, unknown version, invalid
    /// JSON, missing or empty fields).
    Message(MalformedMessage),
}

/// A logical decoding message with the outbox prefix that is not an event; see
/// [`Undecodable::Message`]. Its content is kept for the dead-letter table only:
/// never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct MalformedMessage {
    /// The message record's position (its end LSN, as for wal-message events).
    pub lsn: Lsn,
    /// The message's prefix.
    pub prefix: String,
    /// The raw content, as emitted.
    pub content: Vec<u8>,
    /// Why it is not an event.
    pub reason: String,
}

impl fmt::Debug for MalformedMessage {
    // The content is whatever anyone emitted: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MalformedMessage")
            .field("lsn", &self.lsn)
            .field("prefix", &self.prefix)
            .field("content_bytes", &self.content.len())
            .finish_non_exhaustive()
    }
}

/// Positions the source tracks, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPositions {
    /// Highest transaction end the caller confirmed.
    pub confirmed: Lsn,
    /// Highest position recorded and handed to the replication connection for reporting.
    pub reported: Lsn,
    /// End of the last transaction with events handed out.
    pub received: Lsn,
    /// Latest WAL position the server reported in a keepalive.
    pub server_wal_end: Lsn,
}

/// Rows of the outbox table that a slot's stream cannot carry: those with
/// `after < sequence <= upto` still in the table committed before the slot started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainRange {
    /// Every drained row up to this sequence is settled.
    pub after: i64,
    /// The outbox's high-water mark when the slot started.
    pub upto: i64,
}

impl WalSource {
    /// The next committed transaction with outbox events, in commit order;
    /// `None` when the stream ended cleanly.
    ///
    /// Transactions without outbox events (other tables, rolled back work) are
    /// skipped. While waiting, the confirmed position is recorded and reported
    /// every `status_interval`, so keep calling this (or [`WalSource::flush`])
    /// while the outbox is idle.
    ///
    /// Cancel safe: dropping the future loses nothing; a transaction that was
    /// partly received stays buffered. After an error, call [`WalSource::reconnect`].
    pub async fn next_transaction(&mut self) -> Result<Option<WalTransaction>> {
        if self.broken {
            return Err(WalError::NeedsReconnect);
        }
        // A transaction completed by a call that was cancelled while flushing.
        if let Some(transaction) = self.ready.take() {
            return Ok(Some(transaction));
        }
        loop {
            let flush_at = self.last_flush + self.config.status_interval;
            let received = tokio::select! {
                biased;
                received = self.client.recv() => received,
                () = tokio::time::sleep_until(flush_at), if self.flush_pending() => {
                    self.flush_quietly().await;
                    continue;
                }
            };
            let event = match received {
                Ok(Some(event)) => event,
                Ok(None) => {
                    self.broken = true;
                    return Ok(None);
                }
                Err(error) => {
                    self.broken = true;
                    return Err(WalError::replication("streaming")(error));
                }
            };
            let transaction = match self.handle(event) {
                Ok(transaction) => transaction,
                Err(error) => {
                    self.broken = true;
                    return Err(error);
                }
            };
            // Under steady traffic the timer branch above never wins. The
            // transaction is kept in `ready` across the flush's await: if this
            // call is cancelled there, the next one returns it (cancel safety).
            if self.flush_pending() && Instant::now() >= flush_at {
                self.ready = transaction;
                self.flush_quietly().await;
                if let Some(transaction) = self.ready.take() {
                    return Ok(Some(transaction));
                }
            } else if let Some(transaction) = transaction {
                return Ok(Some(transaction));
            }
        }
    }

    /// Every event of the transactions up to and including the one ending at
    /// `end_lsn` ([`WalTransaction::end_lsn`]) was confirmed by the broker.
    ///
    /// Cheap, no I/O: the position is recorded and reported within
    /// `status_interval` while [`WalSource::next_transaction`] or
    /// [`WalSource::flush`] runs. A position beyond the last transaction handed
    /// out is capped to it.
    pub fn confirm(&mut self, end_lsn: Lsn) {
        let lsn = if end_lsn > self.last_event_end {
            tracing::warn!(
                slot = %self.config.slot, %end_lsn, received = %self.last_event_end,
                "confirm beyond the last transaction handed out; capped"
            );
            self.last_event_end
        } else {
            end_lsn
        };
        self.confirmed = self.confirmed.max(lsn);
    }

    /// Record the confirmed position now and hand it to the replication
    /// connection, which reports it within `status_interval`. Returns the position.
    pub async fn flush(&mut self) -> Result<Lsn> {
        let target = self.flush_target();
        if target > self.reported {
            self.record_position(target).await?;
            failpoint!("wal.position.recorded");
            self.client.update_applied_lsn(target.to_pgwire());
            self.reported = target;
        }
        self.last_flush = Instant::now();
        Ok(self.reported)
    }

    /// Flush, close the stream, and make sure the slot knows the position.
    /// Returns the position.
    ///
    /// The replication client reports a position at most every
    /// `status_interval` and not when it closes; rather than wait for its next
    /// report, the stream is closed at once and the slot moved to the recorded
    /// position with `pg_replication_slot_advance` (a restart resumes from the
    /// recorded position either way; the slot's position only decides how much
    /// WAL the server keeps meanwhile).
    pub async fn shutdown(mut self) -> Result<Lsn> {
        // Close the stream even when the position cannot be recorded (database
        // going down): an open walsender would hold up the server's shutdown.
        let flushed = self.flush().await;
        match tokio::time::timeout(self.config.connect_timeout, self.client.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "replication stream ended with an error"),
            Err(_) => {
                tracing::debug!("replication stream did not close in time");
                self.client.abort();
            }
        }
        let flushed = flushed?;
        if self.client.metrics().last_applied_lsn() < flushed.to_pgwire() {
            self.advance_slot(flushed).await;
        }
        Ok(flushed)
    }

    /// Move the (now idle) slot's confirmed position to `to`, waiting briefly for
    /// the walsender of the closed stream to go. Best effort: a failure only
    /// means the server keeps some WAL until the next start confirms it.
    pub(super) async fn advance_slot(&self, to: Lsn) {
        let deadline = Instant::now() + self.config.connect_timeout;
        loop {
            let state: Result<Option<(bool, bool)>> = db_call(
                "reading the slot before advancing it",
                self.config.db_timeout(),
                sqlx::query_as(
                    "select active, coalesce(confirmed_flush_lsn < $2::pg_lsn, false) \
                     from pg_replication_slots where slot_name = $1",
                )
                .bind(&self.config.slot)
                .bind(to.to_string())
                .fetch_optional(&self.pool),
            )
            .await;
            match state {
                Ok(Some((false, true))) => {
                    let advanced: Result<Option<String>> = db_call(
                        "advancing the slot",
                        self.config.db_timeout(),
                        sqlx::query_scalar(
                            "select end_lsn::text from pg_replication_slot_advance($1, $2::pg_lsn)",
                        )
                        .bind(&self.config.slot)
                        .bind(to.to_string())
                        .fetch_optional(&self.pool),
                    )
                    .await;
                    match advanced {
                        Ok(_) => {
                            tracing::debug!(slot = %self.config.slot, position = %to, "slot advanced to the confirmed position")
                        }
                        Err(error) => {
                            tracing::debug!(%error, "could not advance the slot; the next start confirms the position")
                        }
                    }
                    return;
                }
                Ok(Some((true, true))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(_) => return,
                Err(error) => {
                    tracing::debug!(%error, "could not read the slot; the next start confirms the position");
                    return;
                }
            }
        }
    }

    /// The position that may be reported: what the caller confirmed, or an idle
    /// position past it once everything handed out is confirmed.
    pub(super) fn flush_target(&self) -> Lsn {
        let target = if self.confirmed >= self.last_event_end {
            self.confirmed.max(self.idle)
        } else {
            self.confirmed
        };
        target.max(self.reported)
    }

    pub(super) fn flush_pending(&self) -> bool {
        self.flush_target() > self.reported
    }

    /// Flushing again later is safe: a failed recording only delays reporting.
    pub(super) async fn flush_quietly(&mut self) {
        if let Err(error) = self.flush().await {
            self.last_flush = Instant::now();
            tracing::warn!(slot = %self.config.slot, %error, "could not record the confirmed position; retrying");
        }
    }

    pub(super) async fn record_position(&self, lsn: Lsn) -> Result<()> {
        write_position(&self.pool, &self.config, &self.sql.advance_position, lsn).await
    }

    pub(super) fn handle(&mut self, event: ReplicationEvent) -> Result<Option<WalTransaction>> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => {
                if self.open.is_some() {
                    return Err(WalError::Decode {
                        lsn: Lsn::from_pgwire(final_lsn),
                        problem: "Begin inside an open transaction".to_owned(),
                    });
                }
                self.open = Some(OpenTransaction {
                    xid,
                    events: Vec::new(),
                    row_sequences: Vec::new(),
                    undecodable: Vec::new(),
                });
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => self.handle_data(Lsn::from_pgwire(wal_start), &data)?,
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix != self.config.message_prefix {
                    return Ok(None);
                }
                let lsn = Lsn::from_pgwire(lsn);
                if !transactional {
                    tracing::warn!(
                        %lsn, %prefix,
                        "ignoring a non-transactional WAL message: it is delivered even when its transaction \
                         rolls back; writers must use pg_logical_emit_message(true, …) (outbox_core::wal_message::emit)"
                    );
                    return Ok(None);
                }
                let decode_error = |problem: String| WalError::Decode { lsn, problem };
                let sequence = lsn
                    .to_i64()
                    .ok_or_else(|| decode_error("LSN beyond i64".to_owned()))?;
                let open = self
                    .open
                    .as_mut()
                    .ok_or_else(|| decode_error("WAL message outside a transaction".to_owned()))?;
                let decoded = match outbox_core::wal_message::decode(&content) {
                    Ok(decoded) => decoded,
                    Err(error) => {
                        // The reason can quote the content: it goes to the dead-letter table only.
                        tracing::warn!(
                            %lsn, %prefix, content_bytes = content.len(),
                            "a WAL message with the outbox prefix is not an event; dead-lettering it"
                        );
                        open.undecodable.push(Undecodable::Message(MalformedMessage {
                            reason: format!(
                                "the WAL message at LSN {lsn} with prefix {prefix:?} ({} bytes) cannot be \
                                 published: {error}; its raw content is in payload.wal_message \
                                 (content_base64, and content_text when it is UTF-8)",
                                content.len()
                            ),
                            lsn,
                            prefix,
                            content: content.to_vec(),
                        }));
                        return Ok(None);
                    }
                };
                open.events.push(OutboxEvent {
                    sequence,
                    event_id: decoded.event_id,
                    aggregate_type: decoded.aggregate_type,
                    aggregate_id: decoded.aggregate_id,
                    event_type: decoded.event_type,
                    partition_key: decoded.partition_key,
                    destination: decoded.destination,
                    payload: decoded.payload,
                    headers: decoded.headers,
                    created_at: decoded.created_at,
                    attempts: 0,
                });
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                let commit_lsn = Lsn::from_pgwire(lsn);
                let end_lsn = Lsn::from_pgwire(end_lsn);
                let open = self.open.take().ok_or_else(|| WalError::Decode {
                    lsn: commit_lsn,
                    problem: "Commit without Begin".to_owned(),
                })?;
                if open.events.is_empty() && open.undecodable.is_empty() {
                    self.idle = self.idle.max(end_lsn);
                    return Ok(None);
                }
                self.last_event_end = self.last_event_end.max(end_lsn);
                return Ok(Some(WalTransaction {
                    commit_lsn,
                    end_lsn,
                    xid: open.xid,
                    commit_time: pg_time(commit_time_micros),
                    events: open.events,
                    row_sequences: open.row_sequences,
                    undecodable: open.undecodable,
                }));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = Lsn::from_pgwire(wal_end);
                self.server_wal_end = self.server_wal_end.max(wal_end);
                // Everything up to the keepalive was sent before it; with no transaction
                // open, nothing unsent commits before this position.
                if self.open.is_none() {
                    self.idle = self.idle.max(wal_end);
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(None)
    }

    pub(super) fn handle_data(&mut self, lsn: Lsn, data: &[u8]) -> Result<()> {
        let decode_error = |problem: String| WalError::Decode { lsn, problem };
        match data.first() {
            Some(&pgoutput::RELATION) => {
                let relation = pgoutput::parse_relation(data).map_err(decode_error)?;
                let kind = if relation.namespace == self.config.schema.as_str()
                    && relation.name == "outbox"
                {
                    RelationKind::Outbox(OutboxColumns::new(&relation))
                } else {
                    RelationKind::Other
                };
                let Relation { oid, .. } = relation;
                self.relations.insert(oid, kind);
            }
            Some(&pgoutput::INSERT) => {
                let (oid, values) = pgoutput::parse_insert(data).map_err(decode_error)?;
                let columns = match self.relations.get(&oid) {
                    Some(RelationKind::Outbox(Ok(columns))) => columns,
                    Some(RelationKind::Outbox(Err(problem))) => {
                        return Err(decode_error(problem.clone()));
                    }
                    Some(RelationKind::Other) => return Ok(()),
                    None => {
                        return Err(decode_error(format!(
                            "Insert into relation {oid} before its Relation message"
                        )));
                    }
                };
                let (event, undecodable) = columns.event(&values).map_err(decode_error)?;
                let open = self
                    .open
                    .as_mut()
                    .ok_or_else(|| decode_error("Insert outside a transaction".to_owned()))?;
                match undecodable {
                    None => {
                        open.row_sequences.push(event.sequence);
                        open.events.push(event);
                    }
                    Some(reason) => open.undecodable.push(Undecodable::Row {
                        sequence: event.sequence,
                        event_id: event.event_id,
                        partition_key: event.partition_key,
                        reason,
                    }),
                }
            }
            // Type, Origin, and Update/Delete/Truncate of a publication that publishes
            // more than inserts: nothing the outbox needs.
            _ => {}
        }
        Ok(())
    }
}
