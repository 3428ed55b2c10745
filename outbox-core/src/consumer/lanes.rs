//! Per-key lanes: a key's messages are handed out in arrival order, and only while
//! none of that key's messages is in a running batch or waiting out a retry backoff;
//! different keys go into batches side by side.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

/// One key's messages that are not in a running batch.
struct Lane<T> {
    waiting: VecDeque<T>,
    /// A batch holds messages of this key: nothing more of it may start.
    busy: bool,
    /// The key's first message waits out a retry backoff until then.
    not_before: Option<Instant>,
    /// The key is in `ready` (idle, no backoff, something waiting).
    queued: bool,
}

/// Messages per key, and which keys may start now.
pub(crate) struct KeyLanes<T> {
    lanes: HashMap<String, Lane<T>>,
    /// Keys whose next message may start now, oldest first.
    ready: VecDeque<String>,
    /// Messages held: waiting here or in a running batch.
    held: usize,
    /// Lanes waiting out a backoff (most of the time none: [`KeyLanes::wake`] is free).
    backoffs: usize,
}

impl<T> KeyLanes<T> {
    pub(crate) fn new() -> Self {
        KeyLanes {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            held: 0,
            backoffs: 0,
        }
    }

    /// Add a newly received message of `key` behind the key's earlier ones.
    pub(crate) fn push(&mut self, key: &str, item: T) {
        self.held += 1;
        let lane = match self.lanes.get_mut(key) {
            Some(lane) => lane,
            None => self.lanes.entry(key.to_owned()).or_insert(Lane {
                waiting: VecDeque::new(),
                busy: false,
                not_before: None,
                queued: false,
            }),
        };
        lane.waiting.push_back(item);
        if !lane.busy && lane.not_before.is_none() && !lane.queued {
            lane.queued = true;
            self.ready.push_back(key.to_owned());
        }
    }

    /// Up to `max` messages that may start now: whole runs of consecutive messages
    /// per key, in order, keys oldest-ready first. Their keys become busy until
    /// [`KeyLanes::finish`].
    pub(crate) fn take_batch(&mut self, max: usize) -> Vec<(String, T)> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            lane.queued = false;
            lane.busy = true;
            while batch.len() < max {
                match lane.waiting.pop_front() {
                    Some(item) => batch.push((key.clone(), item)),
                    None => break,
                }
            }
        }
        batch
    }

    /// The batch that held messages of `key` is over: `returned` (not settled, in
    /// order) go back to the front of the key's lane; with `not_before` the key waits
    /// until then. `settled` is how many of the key's messages left for good.
    pub(crate) fn finish(
        &mut self,
        key: &str,
        returned: Vec<T>,
        not_before: Option<Instant>,
        settled: usize,
    ) {
        self.held = self.held.saturating_sub(settled);
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        lane.busy = false;
        for item in returned.into_iter().rev() {
            lane.waiting.push_front(item);
        }
        if lane.waiting.is_empty() {
            self.lanes.remove(key);
            return;
        }
        if lane.not_before.is_none() && not_before.is_some() {
            self.backoffs += 1;
        }
        lane.not_before = not_before;
        if not_before.is_none() && !lane.queued {
            lane.queued = true;
            self.ready.push_back(key.to_owned());
        }
    }

    /// Keys whose backoff is over become ready; returns the earliest backoff still
    /// running, for the caller's timer.
    pub(crate) fn wake(&mut self, now: Instant) -> Option<Instant> {
        if self.backoffs == 0 {
            return None;
        }
        let mut earliest: Option<Instant> = None;
        for (key, lane) in &mut self.lanes {
            let Some(at) = lane.not_before else {
                continue;
            };
            if at <= now {
                lane.not_before = None;
                self.backoffs = self.backoffs.saturating_sub(1);
                if !lane.busy && !lane.queued {
                    lane.queued = true;
                    self.ready.push_back(key.clone());
                }
            } else {
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        earliest
    }

    /// True when some key may start now.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Messages that may start now, counted up to `max`.
    pub(crate) fn ready_count(&self, max: usize) -> usize {
        let mut count = 0;
        for key in &self.ready {
            if let Some(lane) = self.lanes.get(key) {
                count += lane.waiting.len();
            }
            if count >= max {
                return max;
            }
        }
        count
    }

    /// Messages held: waiting here or in a running batch.
    #[cfg_attr(not(feature = "rdkafka"), allow(dead_code))]
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Every waiting message (none of a running batch), for shutdown.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.ready.clear();
        let mut all = Vec::new();
        for lane in self.lanes.values_mut() {
            self.held = self.held.saturating_sub(lane.waiting.len());
            all.extend(lane.waiting.drain(..));
        }
        self.lanes.retain(|_, lane| lane.busy);
        self.backoffs = 0;
        all
    }
}

/// The earlier of two optional wake-up times (`None` when neither is set).
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn items(batch: Vec<(String, i32)>) -> Vec<i32> {
        batch.into_iter().map(|(_, item)| item).collect()
    }

    #[test]
    fn a_batch_takes_each_ready_key_s_messages_in_order_and_the_key_waits_for_it() {
        let mut lanes = KeyLanes::new();
        lanes.push("a", 1);
        lanes.push("a", 2);
        lanes.push("b", 10);
        lanes.push("a", 3);
        assert_eq!(lanes.held(), 4);
        assert_eq!(items(lanes.take_batch(10)), [1, 2, 3, 10]);
        // Busy keys: later messages wait for the batch.
        lanes.push("a", 4);
        assert!(lanes.take_batch(10).is_empty());
        lanes.finish("b", Vec::new(), None, 1);
        assert!(lanes.take_batch(10).is_empty(), "a is still in the batch");
        lanes.finish("a", Vec::new(), None, 3);
        assert_eq!(items(lanes.take_batch(10)), [4]);
        lanes.finish("a", Vec::new(), None, 1);
        assert_eq!(lanes.held(), 0);
    }

    #[test]
    fn a_batch_stops_at_its_limit_and_the_rest_of_the_key_stays_in_order() {
        let mut lanes = KeyLanes::new();
        for n in 1..=5 {
            lanes.push("a", n);
        }
        assert_eq!(lanes.ready_count(100), 5);
        assert_eq!(lanes.ready_count(2), 2);
        assert_eq!(items(lanes.take_batch(2)), [1, 2]);
        lanes.finish("a", Vec::new(), None, 2);
        assert_eq!(items(lanes.take_batch(10)), [3, 4, 5]);
    }

    #[test]
    fn returned_messages_go_back_in_front_and_a_backoff_holds_the_whole_key() {
        let mut lanes = KeyLanes::new();
        for n in 1..=3 {
            lanes.push("a", n);
        }
        lanes.push("b", 10);
        assert_eq!(items(lanes.take_batch(10)), [1, 2, 3, 10]);
        lanes.push("a", 4);
        // 1 handled, 2 failed (retry later), 3 did not run.
        let now = Instant::now();
        let later = now + Duration::from_millis(100);
        lanes.finish("a", vec![2, 3], Some(later), 1);
        lanes.finish("b", Vec::new(), None, 1);
        assert_eq!(lanes.held(), 3);
        assert!(lanes.take_batch(10).is_empty(), "a waits out its backoff");
        assert_eq!(lanes.wake(now), Some(later));
        assert_eq!(lanes.wake(later), None);
        assert_eq!(items(lanes.take_batch(10)), [2, 3, 4]);
    }

    #[test]
    fn drain_returns_the_waiting_messages_but_not_those_of_running_batches() {
        let mut lanes = KeyLanes::new();
        lanes.push("a", 1);
        assert_eq!(items(lanes.take_batch(10)), [1]);
        lanes.push("a", 2);
        lanes.push("b", 3);
        let mut drained = lanes.drain();
        drained.sort();
        assert_eq!(drained, [2, 3]);
        assert_eq!(lanes.held(), 1);
        assert!(!lanes.has_ready());
    }
}
