//! Where events come from: the polling source claims rows of the outbox table
//! (`polling/`), the WAL source tails a logical replication slot (`wal/`).
//!
//! Both implement [`Source`], the one relay loop's view of a source
//! (`crate::pipeline::run`). The contract:
//!
//! * **Order.** [`Source::next`] yields units (a polling claim, a WAL
//!   transaction, a page of the table drain) in source order; within a key,
//!   events come in commit order. The loop puts them in per-key lanes.
//! * **Settle.** Nothing is settled unless the ledger says it was delivered or
//!   dead-lettered. [`Source::settle`] takes what the ledger shows finished
//!   through the source's view of it ([`Source::View`]): polling any finished
//!   event ([`AnyOrder`](crate::pipeline::ledger::AnyOrder)), WAL only the
//!   contiguous done prefix ([`DonePrefix`](crate::pipeline::ledger::DonePrefix)).
//! * **Retry.** What a lane does when the broker is in trouble is the source's
//!   named [`RetryMode`]; what becomes of an event the broker refused is the
//!   source's [`LaneWork::reject`] (attempts live on the row for polling, in the
//!   lane and on the row for WAL).
//! * **Cancel safety.** The loop races [`Source::next`] and [`Source::alarm`]
//!   against lane results and the settle tick: both must be cancel-safe (a
//!   source keeps a started read and resumes it). Settling and closing are
//!   awaited outside any `select!`.

pub mod polling;
pub(crate) mod row;
pub mod wal;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::event::OutboxEvent;
use crate::pipeline::lanes::Keyed;
use crate::pipeline::ledger::{Ledger, View};
use crate::sink::SinkError;

/// What a lane does when the broker or the network is in trouble
/// ([`Outcome::Retry`](crate::sink::Outcome::Retry)): each source's explicit choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryMode {
    /// The lane stops and the rest of its key is released: the source hands the
    /// events over again later (polling: the rows stay and are claimed again).
    /// The circuit breaker gates admission and is fed once per settle round.
    Release,
    /// The event is retried in place with backoff; its key waits. The circuit
    /// breaker gates every publish and is fed by every outcome (WAL: the stream
    /// cannot hand an event over again without a restart).
    InPlace,
}

/// How a session of a source ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown requested; everything possible was settled.
    Shutdown,
    /// The retained-WAL budget was exceeded with `over_budget = "fallback-polling"`.
    Fallback,
    /// Something went wrong that a new session can get past.
    Restart(String),
}

/// How the loop ends after a [`Stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Stop admitting; lanes get this long, then the last settle.
    Drain(Duration),
    /// Abort the lanes at once, without a last settle (the session is unusable).
    Abort,
}

/// Why and how the loop stops.
#[derive(Debug)]
pub(crate) struct Stop {
    /// What the loop returns (an error is one no new session can get past).
    pub(crate) end: Result<SessionEnd>,
    /// Whether in-flight lanes finish first.
    pub(crate) ending: Ending,
}

impl Stop {
    /// Drain for `grace`, then end with `end`.
    pub(crate) fn drain(end: Result<SessionEnd>, grace: Duration) -> Stop {
        Stop {
            end,
            ending: Ending::Drain(grace),
        }
    }

    /// Abort at once and restart for `reason`.
    pub(crate) fn abort(reason: impl Into<String>) -> Stop {
        Stop {
            end: Ok(SessionEnd::Restart(reason.into())),
            ending: Ending::Abort,
        }
    }
}

/// An admitted unit: events in source order, and what settling them needs.
#[derive(Debug)]
pub(crate) struct Unit<T, I> {
    /// The lease fences of a claim, or a WAL end position and row sequences.
    pub(crate) token: T,
    /// Its items (events, or changes that are no event), in source order.
    pub(crate) items: Vec<I>,
}

/// What [`Source::next`] found.
#[derive(Debug)]
pub(crate) enum Next<T, I> {
    /// A unit to admit (it may be empty: a marker that settles in order).
    Unit(Unit<T, I>),
    /// Nothing for now (a claim found no rows).
    Idle,
    /// The source cannot go on.
    End(Stop),
}

/// The room the loop gives [`Source::next`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Admission {
    /// Events the window still has room for (at least 1).
    pub(crate) room: usize,
    /// The circuit breaker is half-open: admit one event, to probe the broker.
    pub(crate) probe: bool,
    /// No lane task runs.
    pub(crate) lanes_idle: bool,
    /// No lane runs and nothing finished waits for a settle.
    pub(crate) quiet: bool,
    /// Keys a probe should skip (they failed earlier probes).
    pub(crate) skip_keys: Vec<String>,
}

/// A source's in-flight window: admit while fewer than `refill_below` events
/// are admitted and not settled, at most `limit` in all (one unit may exceed it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) limit: usize,
    pub(crate) refill_below: usize,
}

/// When the loop asks for a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SettleWhen {
    /// [`Source::settle_due`] said so after lane results.
    Due,
    /// The settle tick (about every 20 ms); `ending` while the loop drains.
    Tick { ending: bool },
    /// The last settle, after the lanes ended.
    Last,
}

/// What a settle did.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Nothing was due.
    Nothing,
    /// A settle round ran (the loop feeds the release-mode breaker after it).
    Done,
    /// It failed; the source tries again later.
    Failed,
    /// The source cannot go on (the server shuts down, the leader lock is lost).
    Stop(Stop),
}

/// Something that travels in a key's lane.
pub(crate) trait LaneItem: Keyed + Send + 'static {
    /// The event to publish; `None` for a change that is no event, which the
    /// source disposes of without publishing ([`LaneWork::dispose`]).
    fn event(&self) -> Option<&OutboxEvent>;
    /// Its sequence, for the ledger's any-order view.
    fn sequence(&self) -> i64;
}

/// What a lane does with an event the broker refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It is in the dead-letter table: its key moves on.
    DeadLettered,
    /// Publish it again after this delay; its key waits (retry in place).
    RetryAfter(Duration),
    /// The lane stops here: this event and the rest of the key are handed over
    /// again later. `transient`: recording the rejection failed (database trouble).
    Release { transient: bool },
}

/// The part of a source that lane tasks share.
pub(crate) trait LaneWork: Send + Sync + 'static {
    /// The unit's token, as the lane sees it.
    type Token: Send + Sync + 'static;
    /// What travels in a lane.
    type Item: LaneItem;
    /// The broker refused `item`'s event with `error`.
    fn reject(
        &self,
        token: &Self::Token,
        item: &mut Self::Item,
        error: &SinkError,
    ) -> impl Future<Output = Verdict> + Send;
    /// Dispose of a change that is no event (dead-letter it as it is).
    fn dispose(
        &self,
        token: &Self::Token,
        item: &mut Self::Item,
    ) -> impl Future<Output = Verdict> + Send;
    /// The broker confirmed `item` (called once per delivered event, after its run).
    fn delivered(&self, item: &Self::Item);
}

/// The ledger a source settles from.
pub(crate) type SourceLedger<S> = Ledger<Arc<<S as Source>::Token>, <S as Source>::View>;

/// Where events come from, and where their outcomes go back to.
pub(crate) trait Source: Send {
    /// What settling a unit needs: the lease fences of a claim, or a WAL end
    /// position and row sequences.
    type Token: Send + Sync + 'static;
    /// What travels in a lane.
    type Item: LaneItem;
    /// The ledger's settle view: any order, or the done prefix.
    type View: View + Default + Send;
    /// The part of the source its lanes share.
    type Lanes: LaneWork<Token = Self::Token, Item = Self::Item>;
    /// Broker trouble: release the lane, or retry in place.
    const RETRY: RetryMode;
    /// Items handed to one lane task at a time.
    const LANE_CHUNK: usize;

    /// The shared part for the lane tasks.
    fn lane_work(&self) -> Arc<Self::Lanes>;
    /// The in-flight window.
    fn window(&self) -> Window;
    /// Ready when the source needs a look whatever the room
    /// ([`Source::check`]); never ready for a source without such duties.
    /// Owns what it waits on (cancel-safe by construction).
    fn alarm(&self, ending: bool) -> impl Future<Output = ()> + Send + 'static;
    /// The alarm rang: whether the source must stop.
    fn check(&mut self, ending: bool) -> impl Future<Output = Option<Stop>> + Send;
    /// The next unit, or why there is none. Cancel-safe.
    fn next(
        &mut self,
        admission: Admission,
    ) -> impl Future<Output = Next<Self::Token, Self::Item>> + Send;
    /// Whether a settle is due now (checked after lane results).
    fn settle_due(&self, ledger: &SourceLedger<Self>, lanes_idle: bool) -> bool
    where
        Self: Sized;
    /// Settle what the ledger shows finished, by this source's order rule.
    fn settle(
        &mut self,
        ledger: &mut SourceLedger<Self>,
        when: SettleWhen,
    ) -> impl Future<Output = Settled> + Send
    where
        Self: Sized;
    /// Record positions, release leases or the stream; once, after the last
    /// settle. `graceful`: the loop drained (else it aborted or failed).
    fn close(self, graceful: bool) -> impl Future<Output = ()> + Send;
}
