//! Unit tests of the WAL units' done-prefix settle (no server).

use super::*;
use crate::pipeline::ledger::Finished;

fn admit(
    ledger: &mut WalLedger,
    end_lsn: Option<Lsn>,
    events: usize,
    rows: Vec<i64>,
    drain: Option<DrainMark>,
) -> u64 {
    let unit = WalUnit {
        end_lsn,
        rows,
        drain,
    };
    ledger.admit(Arc::new(unit), events)
}

fn finish(ledger: &mut WalLedger, unit: u64, delivered: bool) {
    let finished = if delivered {
        Finished::Delivered
    } else {
        Finished::DeadLettered
    };
    ledger.finish(unit, 0, finished);
}

#[test]
fn done_prefix_stops_at_the_first_unfinished_unit() {
    let mut ledger = WalLedger::default();
    let a = admit(&mut ledger, Some(Lsn(10)), 2, vec![1, 2], None);
    let b = admit(&mut ledger, Some(Lsn(20)), 1, vec![3], None);
    let c = admit(&mut ledger, Some(Lsn(30)), 1, vec![], None);
    assert_eq!(ledger.in_flight(), 4);
    finish(&mut ledger, b, true);
    finish(&mut ledger, c, false);
    assert_eq!(done_prefix(&ledger).units, 0, "a is not done");
    finish(&mut ledger, a, true);
    assert_eq!(done_prefix(&ledger).units, 0);
    finish(&mut ledger, a, true);
    let prefix = done_prefix(&ledger);
    assert_eq!(prefix.units, 3);
    assert_eq!(prefix.rows, vec![1, 2, 3]);
    assert_eq!(prefix.end_lsn, Some(Lsn(30)));
    assert_eq!(
        prefix.delivered, 3,
        "the dead-lettered event is not counted as published"
    );
    assert_eq!(
        ledger.in_flight(),
        4,
        "finished events fill the window until they are settled"
    );
    ledger.pop_prefix(prefix.units);
    assert_eq!(ledger.in_flight(), 0);
    let d = admit(&mut ledger, Some(Lsn(40)), 1, vec![4], None);
    assert_eq!(d, 3, "unit indexes keep counting after a pop");
    finish(&mut ledger, d, true);
    assert_eq!(done_prefix(&ledger).end_lsn, Some(Lsn(40)));
}

#[test]
fn the_drain_is_recorded_finished_only_with_every_page_before_it_settled() {
    let mut ledger = WalLedger::default();
    let first = admit(&mut ledger, None, 2, vec![5, 10], Some(DrainMark::Page(10)));
    let second = admit(&mut ledger, None, 1, vec![20], Some(DrainMark::Page(20)));
    admit(&mut ledger, None, 0, Vec::new(), Some(DrainMark::Finished));
    let streamed = admit(&mut ledger, Some(Lsn(99)), 1, vec![30], None);
    finish(&mut ledger, second, true);
    finish(&mut ledger, streamed, true);
    let prefix = done_prefix(&ledger);
    assert_eq!(prefix.units, 0, "the first page is not settled yet");
    assert!(!prefix.drain_finished);
    finish(&mut ledger, first, true);
    finish(&mut ledger, first, true);
    let prefix = done_prefix(&ledger);
    assert_eq!(prefix.units, 4);
    assert_eq!(prefix.drain_after, Some(20));
    assert!(prefix.drain_finished);
    assert_eq!(prefix.end_lsn, Some(Lsn(99)));
    ledger.pop_prefix(prefix.units);

    let mut ledger = WalLedger::default();
    let page = admit(&mut ledger, None, 1, vec![10], Some(DrainMark::Page(10)));
    admit(&mut ledger, None, 1, vec![20], Some(DrainMark::Page(20)));
    finish(&mut ledger, page, true);
    let prefix = done_prefix(&ledger);
    assert_eq!(
        prefix.drain_after,
        Some(10),
        "progress stops at the first unsettled page"
    );
    assert!(!prefix.drain_finished);
}

#[test]
fn drain_units_confirm_no_position() {
    let mut ledger = WalLedger::default();
    let page = admit(&mut ledger, None, 1, vec![7], None);
    finish(&mut ledger, page, true);
    let prefix = done_prefix(&ledger);
    assert_eq!(prefix.end_lsn, None);
    assert_eq!(prefix.rows, vec![7]);
}
