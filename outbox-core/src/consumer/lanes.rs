//! Per-key lanes: messages of one partition key are handed out one at a time, in
//! arrival order; different keys run concurrently.

use std::collections::{HashMap, VecDeque};

/// Messages waiting behind the one that runs, per key.
pub(crate) struct KeyLanes<T> {
    /// Keys with a running message, and what waits behind it.
    running: HashMap<String, VecDeque<T>>,
    /// Messages held (running or waiting).
    held: usize,
}

impl<T> KeyLanes<T> {
    pub(crate) fn new() -> Self {
        KeyLanes {
            running: HashMap::new(),
            held: 0,
        }
    }

    /// Add a message of `key`; returns it when it may start now (its key was idle).
    pub(crate) fn push(&mut self, key: &str, item: T) -> Option<T> {
        self.held += 1;
        match self.running.get_mut(key) {
            Some(waiting) => {
                waiting.push_back(item);
                None
            }
            None => {
                self.running.insert(key.to_owned(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The running message of `key` is done; returns the next one of that key to start.
    pub(crate) fn finish(&mut self, key: &str) -> Option<T> {
        self.held = self.held.saturating_sub(1);
        let waiting = self.running.get_mut(key)?;
        match waiting.pop_front() {
            Some(next) => Some(next),
            None => {
                self.running.remove(key);
                None
            }
        }
    }

    /// Messages running or waiting.
    pub(crate) fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_runs_one_message_at_a_time_in_arrival_order_and_keys_run_side_by_side() {
        let mut lanes = KeyLanes::new();
        assert_eq!(lanes.push("a", 1), Some(1));
        assert_eq!(lanes.push("a", 2), None);
        assert_eq!(lanes.push("b", 10), Some(10));
        assert_eq!(lanes.push("a", 3), None);
        assert_eq!(lanes.held(), 4);
        assert_eq!(lanes.finish("a"), Some(2));
        assert_eq!(lanes.finish("b"), None);
        assert_eq!(lanes.finish("a"), Some(3));
        assert_eq!(lanes.finish("a"), None);
        assert_eq!(lanes.held(), 0);
        // The key is idle again: its next message starts at once.
        assert_eq!(lanes.push("a", 4), Some(4));
    }
}
