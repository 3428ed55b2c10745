//! The ledger: every unit a source admitted (a polling claim, a WAL
//! transaction, a page of the table drain), in source order, and what became of
//! each of its events. A source settles from it through one of two views, fixed
//! by the ledger's type:
//!
//! * [`AnyOrder`] (polling): whatever finished is settled, in any order. Each
//!   claim's rows are fenced by the lease tokens it was claimed under, so one
//!   unit's settle never waits for another's. A key whose lane finished stays
//!   out of new claims until the settle that follows ([`Settlement::keys`]):
//!   freed earlier, a re-claim could publish its later rows while its delivered
//!   rows are still in the table.
//! * [`DonePrefix`] (WAL): only the contiguous prefix of units whose every
//!   event was delivered or dead-lettered is settled, because confirming a
//!   position confirms everything before it.
//!
//! Rules for both (unit tests below): an event is settled only once it was
//! delivered (or dead-lettered: then there is nothing left to settle of it); an
//! event whose lane was aborted or released is never counted as delivered. Events
//! count against the in-flight window from admission until their unit is settled,
//! finished or not, so the window bounds what a crash can send twice.

use std::collections::BTreeMap;

/// A unit's place in the ledger: units are numbered in admission (source) order.
pub(crate) type UnitId = u64;

/// How one event left its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// The broker confirmed it: settle it.
    Delivered,
    /// It is in the dead-letter table: nothing to publish, its key moves on.
    DeadLettered,
    /// Its lane stopped before delivering it (broker trouble, a rejection retried
    /// later, a lost lease): not delivered; the source sends it again later (a
    /// polling row is claimed again). Never done for [`DonePrefix`].
    Released,
}

/// Settle whatever finished, in any order (the polling source).
#[derive(Debug, Default)]
pub(crate) struct AnyOrder {
    /// Keys whose lane finished since the last settle: free them after it.
    keys: Vec<String>,
    /// Finished events not settled yet.
    finished: usize,
    /// Delivered events not settled yet.
    delivered: usize,
}

/// Settle only the contiguous prefix of done units (the WAL source).
#[derive(Debug, Default)]
pub(crate) struct DonePrefix;

#[derive(Debug)]
struct Entry<T> {
    token: T,
    events: usize,
    /// Sequences delivered and not handed to a settle yet.
    delivered: Vec<i64>,
    /// Every event delivered, settled or not.
    delivered_total: u64,
    dead_lettered: usize,
    released: usize,
    /// Finished events already handed to a settle (any-order view).
    settled: usize,
}

impl<T> Entry<T> {
    fn finished(&self) -> usize {
        self.delivered_total as usize + self.dead_lettered + self.released
    }

    /// Every event delivered or dead-lettered.
    fn done(&self) -> bool {
        self.delivered_total as usize + self.dead_lettered >= self.events
    }
}

/// Units in source order and the outcome of each of their events; `V` is the
/// settle view, [`AnyOrder`] or [`DonePrefix`].
#[derive(Debug)]
pub(crate) struct Ledger<T, V> {
    next: UnitId,
    units: BTreeMap<UnitId, Entry<T>>,
    /// Events admitted and not yet settled.
    in_flight: usize,
    view: V,
}

impl<T, V: Default> Default for Ledger<T, V> {
    fn default() -> Self {
        Ledger {
            next: 0,
            units: BTreeMap::new(),
            in_flight: 0,
            view: V::default(),
        }
    }
}

impl<T, V> Ledger<T, V> {
    /// Admit a unit of `events` events (0 for a marker such as the end of the
    /// drain); returns its id for [`Ledger::finish`].
    pub(crate) fn admit(&mut self, token: T, events: usize) -> UnitId {
        let id = self.next;
        self.next += 1;
        self.units.insert(
            id,
            Entry {
                token,
                events,
                delivered: Vec::new(),
                delivered_total: 0,
                dead_lettered: 0,
                released: 0,
                settled: 0,
            },
        );
        self.in_flight += events;
        id
    }

    /// Events admitted and not yet settled: what the window limits.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether nothing is admitted and unsettled.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// `events` events of `unit` will never finish (their lane task died): they
    /// leave the window now; their source sends them again.
    pub(crate) fn abandon(&mut self, unit: UnitId, events: usize) {
        let Some(entry) = self.units.get_mut(&unit) else {
            return;
        };
        let events = events.min(entry.events - entry.finished());
        entry.released += events;
        entry.settled += events;
        self.in_flight -= events;
        if entry.settled >= entry.events {
            self.units.remove(&unit);
        }
    }

    /// Record how the event `sequence` of `unit` left its lane.
    pub(crate) fn finish(&mut self, unit: UnitId, sequence: i64, finished: Finished)
    where
        V: View,
    {
        let Some(entry) = self.units.get_mut(&unit) else {
            tracing::error!(unit, "a lane finished an event of an unknown unit");
            return;
        };
        if entry.finished() >= entry.events {
            tracing::error!(unit, "a lane finished more events than its unit has");
            return;
        }
        match finished {
            Finished::Delivered => {
                entry.delivered_total += 1;
                if V::KEEPS_SEQUENCES {
                    entry.delivered.push(sequence);
                }
            }
            Finished::DeadLettered => entry.dead_lettered += 1,
            Finished::Released => entry.released += 1,
        }
        self.view.finished(finished);
    }

    /// The lane of `key` finished (nothing of it is queued or running).
    pub(crate) fn lane_finished(&mut self, key: String)
    where
        V: View,
    {
        self.view.lane_finished(key);
    }

    /// Keys whose lanes finished and wait for a settle before they are free.
    pub(crate) fn finished_lanes(&self) -> usize
    where
        V: View,
    {
        self.view.finished_lanes()
    }
}

/// What a view counts as events finish.
pub(crate) trait View {
    /// Whether settling needs the sequences of delivered events (else their count).
    const KEEPS_SEQUENCES: bool;
    /// An event of some unit finished.
    fn finished(&mut self, finished: Finished);
    /// A key's lane finished: the any-order view keeps it out of claims until the next settle.
    fn lane_finished(&mut self, key: String);
    /// Keys whose lanes finished since the last settle.
    fn finished_lanes(&self) -> usize;
}

impl View for AnyOrder {
    const KEEPS_SEQUENCES: bool = true;
    fn finished(&mut self, finished: Finished) {
        self.finished += 1;
        if finished == Finished::Delivered {
            self.delivered += 1;
        }
    }
    fn lane_finished(&mut self, key: String) {
        self.keys.push(key);
    }
    fn finished_lanes(&self) -> usize {
        self.keys.len()
    }
}

impl View for DonePrefix {
    const KEEPS_SEQUENCES: bool = false;
    fn finished(&mut self, _: Finished) {}
    fn lane_finished(&mut self, _: String) {}
    fn finished_lanes(&self) -> usize {
        0
    }
}

/// What an any-order settle takes: per unit, the sequences delivered since the
/// last settle; and the keys to free once they are settled.
#[derive(Debug)]
pub(crate) struct Settlement<T> {
    /// `(token, delivered sequences)` of each unit with delivered events, in unit order.
    pub(crate) units: Vec<(T, Vec<i64>)>,
    /// Keys whose lanes finished: back into claims only after the settle statement.
    pub(crate) keys: Vec<String>,
}

impl<T: Clone> Ledger<T, AnyOrder> {
    /// Events finished (delivered, dead-lettered or released) since the last settle.
    pub(crate) fn finished_unsettled(&self) -> usize {
        self.view.finished
    }

    /// Events delivered since the last settle.
    pub(crate) fn delivered_unsettled(&self) -> usize {
        self.view.delivered
    }

    /// Take everything finished for the settle: the delivered sequences per unit
    /// and the keys to free after it. The finished events leave the window.
    pub(crate) fn take_finished(&mut self) -> Settlement<T> {
        let mut units = Vec::new();
        let mut emptied = Vec::new();
        for (&id, entry) in self.units.iter_mut() {
            let newly = entry.finished() - entry.settled;
            if newly == 0 {
                continue;
            }
            entry.settled += newly;
            self.in_flight -= newly;
            if !entry.delivered.is_empty() {
                units.push((entry.token.clone(), std::mem::take(&mut entry.delivered)));
            }
            if entry.settled >= entry.events {
                emptied.push(id);
            }
        }
        for id in emptied {
            self.units.remove(&id);
        }
        self.view.finished = 0;
        self.view.delivered = 0;
        Settlement {
            units,
            keys: std::mem::take(&mut self.view.keys),
        }
    }
}

/// A unit of the done prefix.
#[derive(Debug)]
pub(crate) struct DoneUnit<'a, T> {
    /// What settling it needs.
    pub(crate) token: &'a T,
    /// Its events the broker confirmed (the rest were dead-lettered).
    pub(crate) delivered: u64,
}

impl<T> Ledger<T, DonePrefix> {
    /// The contiguous prefix of units whose every event was delivered or
    /// dead-lettered, in source order; it stops at the first unit that is not.
    pub(crate) fn done_prefix(&self) -> impl Iterator<Item = DoneUnit<'_, T>> {
        self.units
            .values()
            .take_while(|entry| entry.done())
            .map(|entry| DoneUnit {
                token: &entry.token,
                delivered: entry.delivered_total,
            })
    }

    /// The first `units` units were settled: they leave the ledger and the
    /// window. Stops early at a unit that is not done.
    pub(crate) fn pop_prefix(&mut self, units: usize) {
        for _ in 0..units {
            let Some(entry) = self.units.first_entry() else {
                return;
            };
            if !entry.get().done() {
                tracing::error!("a settle tried to pass a unit that is not done");
                return;
            }
            self.in_flight -= entry.remove().events;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Polling = Ledger<&'static str, AnyOrder>;
    type Wal = Ledger<&'static str, DonePrefix>;

    #[test]
    fn nothing_is_settled_before_it_is_delivered() {
        let mut ledger = Polling::default();
        let claim = ledger.admit("fences", 3);
        let settlement = ledger.take_finished();
        assert!(settlement.units.is_empty(), "nothing finished yet");
        assert_eq!(ledger.in_flight(), 3);
        ledger.finish(claim, 1, Finished::Delivered);
        ledger.finish(claim, 2, Finished::Released);
        ledger.finish(claim, 3, Finished::DeadLettered);
        ledger.lane_finished("k".into());
        let settlement = ledger.take_finished();
        assert_eq!(
            settlement.units,
            vec![("fences", vec![1])],
            "only the delivered sequence is settled"
        );
        assert_eq!(ledger.in_flight(), 0);
        assert!(ledger.is_empty());

        let mut ledger = Wal::default();
        let tx = ledger.admit("tx", 2);
        ledger.finish(tx, 1, Finished::Delivered);
        assert_eq!(
            ledger.done_prefix().count(),
            0,
            "one event is still at the broker"
        );
        ledger.finish(tx, 2, Finished::Delivered);
        let done: Vec<_> = ledger.done_prefix().collect();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].delivered, 2);
    }

    #[test]
    fn a_position_is_confirmed_only_over_a_done_prefix() {
        let mut ledger = Wal::default();
        let a = ledger.admit("a", 2);
        let b = ledger.admit("b", 1);
        let c = ledger.admit("c", 0);
        ledger.finish(b, 3, Finished::Delivered);
        assert_eq!(ledger.done_prefix().count(), 0, "a is not done: b waits");
        ledger.finish(a, 1, Finished::Delivered);
        ledger.finish(a, 2, Finished::DeadLettered);
        let done: Vec<&str> = ledger.done_prefix().map(|unit| *unit.token).collect();
        assert_eq!(done, ["a", "b", "c"], "the empty marker joins the prefix");
        assert_eq!(
            ledger.done_prefix().map(|unit| unit.delivered).sum::<u64>(),
            2,
            "the dead-lettered event is not counted as delivered"
        );
        assert_eq!(
            ledger.in_flight(),
            3,
            "finished events fill the window until settled"
        );
        ledger.pop_prefix(3);
        assert_eq!(ledger.in_flight(), 0);
        let d = ledger.admit("d", 1);
        assert_eq!(d, c + 1, "ids keep counting after a pop");
    }

    #[test]
    fn a_released_event_never_completes_the_prefix() {
        let mut ledger = Wal::default();
        let a = ledger.admit("a", 1);
        ledger.admit("b", 0);
        ledger.finish(a, 1, Finished::Released);
        assert_eq!(ledger.done_prefix().count(), 0, "abort is not delivery");
        ledger.pop_prefix(2);
        assert_eq!(
            ledger.in_flight(),
            1,
            "nothing popped past an unfinished unit"
        );
    }

    #[test]
    fn a_key_stays_out_of_claims_until_its_rows_are_settled() {
        let mut ledger = Polling::default();
        let claim = ledger.admit("fences", 2);
        ledger.finish(claim, 1, Finished::Delivered);
        ledger.finish(claim, 2, Finished::Delivered);
        ledger.lane_finished("k".into());
        assert_eq!(ledger.finished_lanes(), 1, "k is held until the settle");
        let settlement = ledger.take_finished();
        assert_eq!(
            settlement.keys,
            ["k"],
            "k is freed by the settle that takes its rows"
        );
        assert_eq!(settlement.units, vec![("fences", vec![1, 2])]);
        assert_eq!(ledger.finished_lanes(), 0);
    }

    #[test]
    fn settling_in_any_order_takes_each_claim_under_its_own_fences() {
        let mut ledger = Polling::default();
        let first = ledger.admit("first", 2);
        let second = ledger.admit("second", 1);
        ledger.finish(second, 9, Finished::Delivered);
        ledger.finish(first, 1, Finished::Delivered);
        assert_eq!(ledger.finished_unsettled(), 2);
        assert_eq!(ledger.delivered_unsettled(), 2);
        let settlement = ledger.take_finished();
        assert_eq!(
            settlement.units,
            vec![("first", vec![1]), ("second", vec![9])],
            "a later claim settles while an earlier one is still publishing"
        );
        assert_eq!(ledger.in_flight(), 1, "the unfinished event still counts");
        ledger.finish(first, 2, Finished::Delivered);
        assert_eq!(ledger.take_finished().units, vec![("first", vec![2])]);
        assert!(ledger.is_empty());
    }

    #[test]
    fn an_abandoned_lane_leaves_the_window_without_being_settled() {
        let mut ledger = Polling::default();
        let claim = ledger.admit("fences", 3);
        ledger.finish(claim, 1, Finished::Delivered);
        ledger.abandon(claim, 2);
        assert_eq!(
            ledger.in_flight(),
            1,
            "the delivered event waits for its settle"
        );
        assert_eq!(ledger.take_finished().units, vec![("fences", vec![1])]);
        assert!(ledger.is_empty());
    }

    #[test]
    fn admission_never_exceeds_the_window() {
        // A source admits while `in_flight() < window`; a unit may overshoot once.
        let window = 10;
        let mut ledger = Wal::default();
        let mut open = Vec::new();
        let mut peak = 0;
        for round in 0..200_u64 {
            while ledger.in_flight() < window {
                let events = 1 + (round % 4) as usize;
                open.push((ledger.admit("tx", events), events));
                peak = peak.max(ledger.in_flight());
            }
            // Finish the oldest unit, settle the prefix.
            let (unit, events) = open.remove(0);
            for n in 0..events {
                ledger.finish(unit, n as i64, Finished::Delivered);
            }
            let done = ledger.done_prefix().count();
            ledger.pop_prefix(done);
        }
        assert!(
            peak < window + 4,
            "peak {peak}: at most one unit beyond the window"
        );
    }

    #[test]
    fn a_dead_lettered_event_lets_its_key_and_the_prefix_move_on() {
        let mut ledger = Wal::default();
        let poison = ledger.admit("poison", 1);
        let later = ledger.admit("later", 1);
        ledger.finish(later, 2, Finished::Delivered);
        ledger.finish(poison, 1, Finished::DeadLettered);
        let done: Vec<&str> = ledger.done_prefix().map(|unit| *unit.token).collect();
        assert_eq!(
            done,
            ["poison", "later"],
            "the dead letter does not hold the prefix"
        );

        let mut ledger = Polling::default();
        let claim = ledger.admit("fences", 2);
        ledger.finish(claim, 1, Finished::DeadLettered);
        ledger.finish(claim, 2, Finished::Delivered);
        ledger.lane_finished("k".into());
        let settlement = ledger.take_finished();
        assert_eq!(
            settlement.units,
            vec![("fences", vec![2])],
            "its row moved already"
        );
        assert_eq!(settlement.keys, ["k"]);
    }

    #[test]
    fn the_grace_abort_settles_only_delivered_events() {
        // Lanes aborted at the end of the grace period never report: their
        // events stay unfinished, and only what was delivered is settled.
        let mut ledger = Polling::default();
        let claim = ledger.admit("fences", 3);
        ledger.finish(claim, 1, Finished::Delivered);
        ledger.lane_finished("delivered".into());
        let settlement = ledger.take_finished();
        assert_eq!(settlement.units, vec![("fences", vec![1])]);
        assert_eq!(ledger.in_flight(), 2, "the aborted events are not settled");

        let mut ledger = Wal::default();
        let first = ledger.admit("first", 1);
        let aborted = ledger.admit("aborted", 1);
        let after = ledger.admit("after", 1);
        ledger.finish(first, 1, Finished::Delivered);
        ledger.finish(after, 3, Finished::Delivered);
        let _ = aborted;
        let done: Vec<&str> = ledger.done_prefix().map(|unit| *unit.token).collect();
        assert_eq!(
            done,
            ["first"],
            "nothing is confirmed past the aborted unit"
        );
    }
}
