//! One batch of messages in one inbox transaction: record the ids, run each
//! first-time message's handler, forget the ids of messages that did not complete,
//! commit.
//!
//! A batch first runs **optimistically**: no savepoints, one round trip per
//! handler. When every handler succeeds (the usual case) that is the whole cost.
//! When one fails, or a handler returned `Ok` but left the transaction failed, the
//! transaction is rolled back and the batch runs again **guarded**: each message in
//! a savepoint of its own, so a failing handler rolls back only its message and the
//! others commit. The handler that failed in the optimistic run is not run again
//! when the transaction was sound right before it: its failure is taken as it was.
//! So the handlers before a failing one run twice (their first effects were rolled
//! back with the optimistic transaction); the failing one runs once per attempt.

use std::collections::{HashMap, HashSet};

use sqlx::PgConnection;

use super::{Handler, HandlerError, Outcome, Pending, Processor};
use crate::error::Error;

/// Savepoint of the message being handled inside a guarded batch transaction.
const SAVEPOINT: &str = "savepoint outbox_consumer_message";
/// The handler succeeded: keep its effects. Fails if it left the transaction failed.
const RELEASE_SAVEPOINT: &str = "release savepoint outbox_consumer_message";
/// The previous handler succeeded and the next one starts, in one round trip.
const RELEASE_AND_SAVEPOINT: &str =
    "release savepoint outbox_consumer_message; savepoint outbox_consumer_message";
/// The handler failed: undo only its effects.
const ROLLBACK_TO_SAVEPOINT: &str = "rollback to savepoint outbox_consumer_message";
/// Fails when a handler left the optimistic transaction failed.
const CHECK_TRANSACTION: &str = "select 1";

/// How a batch transaction runs its handlers.
enum Mode {
    /// No savepoints; any failure sends the batch to a guarded run.
    Optimistic,
    /// A savepoint per message. `known` is the failure an optimistic run saw (the
    /// message's index in the batch and its error), taken as it is when the
    /// transaction was sound right before that message.
    Guarded {
        known: Option<(usize, HandlerError)>,
    },
}

/// What one try of a batch came to.
enum Tried {
    /// The transaction committed: one outcome per message.
    Committed(Vec<Outcome>),
    /// The optimistic run failed and was rolled back; run guarded, with the failure seen.
    Guard(Option<(usize, HandlerError)>),
}

/// Where a message id stands within one batch transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IdState {
    Done,
    Failed,
}

/// Whether a message of the batch is not run: `NotRun` behind a failed message of its
/// key (or a failed copy of itself), `Duplicate` when processed before; `None` to run it.
fn skip<T>(
    pending: &Pending<T>,
    blocked: &HashSet<String>,
    states: &HashMap<String, IdState>,
    first: &HashSet<String>,
) -> Option<Outcome> {
    let Ok(message) = &pending.message else {
        return Some(Outcome::NotRun);
    };
    let id = message.meta.event_id.as_str();
    let state = states.get(id).copied();
    if blocked.contains(&pending.key) || state == Some(IdState::Failed) {
        Some(Outcome::NotRun)
    } else if state == Some(IdState::Done) || !first.contains(id) {
        Some(Outcome::Duplicate)
    } else {
        None
    }
}

async fn savepoint(tx: &mut PgConnection) -> Result<(), Error> {
    sqlx::raw_sql(SAVEPOINT)
        .execute(&mut *tx)
        .await
        .map_err(Error::database("starting a message's savepoint"))?;
    Ok(())
}

/// A batch transaction under way: what the inbox said and what each message came to.
struct Run<'b, T> {
    batch: &'b mut [Pending<T>],
    outcomes: Vec<Option<Outcome>>,
    /// Ids recorded by this transaction: first-time messages.
    first: HashSet<String>,
    /// Keys behind a failed message: the rest of them does not run.
    blocked: HashSet<String>,
    states: HashMap<String, IdState>,
}

impl<T> Run<'_, T> {
    /// Mark the message at `index` done or failed by id.
    fn set_state(&mut self, index: usize, state: IdState) {
        if let Ok(message) = &self.batch[index].message {
            self.states.insert(message.meta.event_id.clone(), state);
        }
    }

    fn skip(&self, index: usize) -> Option<Outcome> {
        skip(&self.batch[index], &self.blocked, &self.states, &self.first)
    }

    /// Whether the message at `index` has its outcome without running its handler:
    /// it failed before the transaction (the rest of its key then waits for it), or
    /// it is skipped (see [`skip`]).
    fn settled_without_running(&mut self, index: usize) -> bool {
        if self.outcomes[index].is_some() {
            self.blocked.insert(self.batch[index].key.clone());
            return true;
        }
        match self.skip(index) {
            Some(skip) => {
                self.outcomes[index] = Some(skip);
                true
            }
            None => false,
        }
    }

    /// Ids recorded by this transaction whose message did not complete.
    fn unfinished(&self) -> Vec<&str> {
        self.first
            .iter()
            .map(String::as_str)
            .filter(|id| self.states.get(*id) != Some(&IdState::Done))
            .collect()
    }

    fn finish(self) -> Vec<Outcome> {
        self.outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::NotRun))
            .collect()
    }
}

impl<H: Handler> Processor<H> {
    /// Run `batch` in one transaction until it commits; a failure of the database
    /// (not of a handler) reruns the whole batch after `database_retry`, without
    /// limit and without counting attempts, until `stopping` says to give up.
    pub(crate) async fn run_batch<T>(
        &self,
        batch: &mut [Pending<T>],
        stopping: &tokio::sync::watch::Receiver<bool>,
    ) -> Vec<Outcome> {
        let mut mode = Mode::Optimistic;
        loop {
            let error = match self.try_batch(batch, mode).await {
                Ok(Tried::Committed(outcomes)) => return outcomes,
                Ok(Tried::Guard(known)) => {
                    mode = Mode::Guarded { known };
                    continue;
                }
                Err(error) => error,
            };
            mode = Mode::Optimistic;
            tracing::warn!(
                consumer = %self.config.name,
                messages = batch.len(),
                %error,
                retry_in_ms = self.config.database_retry.as_millis() as u64,
                "the inbox database failed; retrying the batch"
            );
            let mut stopping = stopping.clone();
            tokio::select! {
                _ = tokio::time::sleep(self.config.database_retry) => {}
                _ = stopping.wait_for(|stop| *stop) => {
                    return batch.iter().map(|_| Outcome::Abandoned).collect();
                }
            }
        }
    }

    /// One transaction over `batch` in `mode`.
    async fn try_batch<T>(&self, batch: &mut [Pending<T>], mode: Mode) -> Result<Tried, Error> {
        let mut outcomes: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        let mut ids: Vec<&str> = Vec::with_capacity(batch.len());
        for (pending, outcome) in batch.iter().zip(outcomes.iter_mut()) {
            let checked = match &pending.message {
                Ok(message) => crate::inbox::check_message_id(&message.meta.event_id)
                    .map(|()| message.meta.event_id.as_str())
                    .map_err(|error| error.to_string()),
                Err(reason) => Err(reason.clone()),
            };
            match checked {
                Ok(id) => ids.push(id),
                // Retrying cannot give a message an id: it is dead-lettered.
                Err(reason) => *outcome = Some(Outcome::Failed(HandlerError::permanent(reason))),
            }
        }
        if ids.is_empty() {
            return Ok(Tried::Committed(
                outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or(Outcome::NotRun))
                    .collect(),
            ));
        }
        let name = self.config.name.as_str();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(Error::database("beginning the inbox transaction"))?;
        let first = self.inbox.record_many(&mut tx, name, &ids).await?;
        drop(ids);
        let mut run = Run {
            batch,
            outcomes,
            first,
            blocked: HashSet::new(),
            states: HashMap::new(),
        };
        match mode {
            Mode::Optimistic => {
                if let Some(known) = self.run_optimistic(&mut tx, &mut run).await? {
                    // Dropping the transaction would roll it back too, but later.
                    let _ = tx.rollback().await;
                    return Ok(Tried::Guard(known));
                }
            }
            Mode::Guarded { known } => self.run_guarded(&mut tx, &mut run, known).await?,
        }
        let unfinished = run.unfinished();
        if !unfinished.is_empty() {
            self.inbox.forget(&mut tx, name, &unfinished).await?;
        }
        tx.commit()
            .await
            .map_err(Error::database("committing the inbox transaction"))?;
        Ok(Tried::Committed(run.finish()))
    }

    /// Every handler without savepoints. `Some` when the batch must run guarded:
    /// with the failure seen, or `None` when a handler left the transaction failed.
    async fn run_optimistic<T>(
        &self,
        tx: &mut PgConnection,
        run: &mut Run<'_, T>,
    ) -> Result<Option<Option<(usize, HandlerError)>>, Error> {
        let mut ran = false;
        for index in 0..run.batch.len() {
            if run.settled_without_running(index) {
                continue;
            }
            match self.handle(tx, &mut run.batch[index]).await {
                Some(Ok(())) => {
                    ran = true;
                    run.set_state(index, IdState::Done);
                    run.outcomes[index] = Some(Outcome::Handled);
                }
                Some(Err(error)) => return Ok(Some(Some((index, error)))),
                None => {}
            }
        }
        if ran {
            match sqlx::raw_sql(CHECK_TRANSACTION).execute(&mut *tx).await {
                Ok(_) => {}
                // A handler returned Ok on a failed transaction: find it, guarded.
                Err(error) if error.as_database_error().is_some() => return Ok(Some(None)),
                Err(error) => {
                    return Err(Error::database("checking the inbox transaction")(error));
                }
            }
        }
        Ok(None)
    }

    /// Every handler in a savepoint of its own.
    async fn run_guarded<T>(
        &self,
        tx: &mut PgConnection,
        run: &mut Run<'_, T>,
        mut known: Option<(usize, HandlerError)>,
    ) -> Result<(), Error> {
        // The message whose handler succeeded last; its savepoint is still open.
        let mut open: Option<usize> = None;
        for index in 0..run.batch.len() {
            if run.settled_without_running(index) {
                continue;
            }
            // Whether the transaction was sound right before this message.
            let mut sound = true;
            match open.take() {
                // One round trip: keep the previous handler's effects, open this one's savepoint.
                Some(previous) => {
                    match sqlx::raw_sql(RELEASE_AND_SAVEPOINT).execute(&mut *tx).await {
                        Ok(_) => {}
                        Err(error) if error.as_database_error().is_some() => {
                            sound = false;
                            self.failed_release(tx, run, previous, error).await?;
                            if let Some(skip) = run.skip(index) {
                                run.outcomes[index] = Some(skip);
                                continue;
                            }
                            savepoint(tx).await?;
                        }
                        Err(error) => {
                            return Err(Error::database("releasing a message's savepoint")(error));
                        }
                    }
                }
                None => savepoint(tx).await?,
            }
            let seen = match known.take() {
                Some((at, error)) if at == index && sound => Some(error),
                other => {
                    known = other;
                    None
                }
            };
            let result = match seen {
                Some(error) => Some(Err(error)),
                None => self.handle(tx, &mut run.batch[index]).await,
            };
            match result {
                Some(Ok(())) => {
                    open = Some(index);
                    run.set_state(index, IdState::Done);
                    run.outcomes[index] = Some(Outcome::Handled);
                }
                Some(Err(error)) => {
                    sqlx::raw_sql(ROLLBACK_TO_SAVEPOINT)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::database("rolling back a failed handler"))?;
                    run.blocked.insert(run.batch[index].key.clone());
                    run.set_state(index, IdState::Failed);
                    run.outcomes[index] = Some(Outcome::Failed(error));
                }
                None => {}
            }
        }
        if let Some(previous) = open.take() {
            match sqlx::raw_sql(RELEASE_SAVEPOINT).execute(&mut *tx).await {
                Ok(_) => {}
                Err(error) if error.as_database_error().is_some() => {
                    self.failed_release(tx, run, previous, error).await?;
                }
                Err(error) => {
                    return Err(Error::database("releasing a message's savepoint")(error));
                }
            }
        }
        Ok(())
    }

    /// Run the handler of `pending` on `tx`, in its span; `None` when the message
    /// cannot be run at all (it is settled by the outcome already given).
    async fn handle<T>(
        &self,
        tx: &mut PgConnection,
        pending: &mut Pending<T>,
    ) -> Option<Result<(), HandlerError>> {
        let failures = pending.failures;
        let message = pending.message.as_mut().ok()?;
        message.attempt = failures + 1;
        let span = self.span(&message.meta);
        use tracing::Instrument;
        Some(self.handler.handle(message, tx).instrument(span).await)
    }

    /// The handler of message `previous` returned `Ok` but left the transaction
    /// failed (it swallowed an error), so releasing its savepoint failed with
    /// `error`: roll the savepoint back and count a failed run. Committing a failed
    /// transaction would silently roll back the whole batch.
    async fn failed_release<T>(
        &self,
        tx: &mut PgConnection,
        run: &mut Run<'_, T>,
        previous: usize,
        error: sqlx::Error,
    ) -> Result<(), Error> {
        sqlx::raw_sql(ROLLBACK_TO_SAVEPOINT)
            .execute(&mut *tx)
            .await
            .map_err(Error::database("rolling back a failed handler"))?;
        let pending = &run.batch[previous];
        let event_id = pending
            .message
            .as_ref()
            .map(|m| m.meta.event_id.as_str())
            .unwrap_or("");
        run.outcomes[previous] = Some(Outcome::Failed(HandlerError::transient(format!(
            "the handler of event {event_id} returned Ok but left its transaction failed: {error}"
        ))));
        run.blocked.insert(pending.key.clone());
        run.set_state(previous, IdState::Failed);
        Ok(())
    }
}
