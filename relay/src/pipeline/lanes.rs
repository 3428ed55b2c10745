//! Per-key lanes: one FIFO queue per partition key across units, and at most
//! one task per key publishing from it, in order, through
//! [`crate::sink::Sink::publish_run`], so a key's events never overtake each
//! other and never have more in flight than the sink's
//! [`crate::sink::Sink::max_in_flight_per_key`]. Different keys run side by
//! side; the tasks themselves take the `max_in_flight` permit.
//!
//! A task gets up to `chunk` of its key's queued items at a time and reports
//! back ([`Lanes::finished`]); the key's next chunk starts only then. A lane
//! that stops (polling: broker trouble or a retried rejection) drops the rest
//! of its key with [`Lanes::release`], so nothing behind the stopped event is
//! published before it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};

/// Something that travels in a key's lane.
pub(crate) trait Keyed {
    /// The lane: the event's partition key.
    fn key(&self) -> String;
}

/// Per-key queues and the lane tasks publishing them.
#[derive(Debug)]
pub(crate) struct Lanes<I> {
    queued: HashMap<String, VecDeque<I>>,
    /// Keys with a running task.
    busy: HashSet<String>,
    /// Keys with queued items and no running task.
    ready: Vec<String>,
    tasks: JoinSet<()>,
    /// The key of each running task, to free it if the task fails.
    task_keys: HashMap<Id, String>,
    /// Items handed to one task at a time.
    chunk: usize,
}

impl<I: Keyed + Send + 'static> Lanes<I> {
    /// Lanes whose tasks take up to `chunk` items of their key at a time.
    pub(crate) fn new(chunk: usize) -> Self {
        Lanes {
            queued: HashMap::new(),
            busy: HashSet::new(),
            ready: Vec::new(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            chunk: chunk.max(1),
        }
    }

    /// Queue `item` behind the earlier items of its key.
    pub(crate) fn add(&mut self, item: I) {
        let key = item.key();
        let queue = self.queued.entry(key.clone()).or_default();
        if queue.is_empty() && !self.busy.contains(&key) {
            self.ready.push(key);
        }
        queue.push_back(item);
    }

    /// Start a task for every key that has queued items and none running:
    /// `run(key, items)` with the key's next chunk, in queue order.
    pub(crate) fn spawn_ready<F, Fut>(&mut self, mut run: F)
    where
        F: FnMut(String, Vec<I>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for key in std::mem::take(&mut self.ready) {
            let Some(queue) = self.queued.get_mut(&key) else {
                continue;
            };
            let take = queue.len().min(self.chunk);
            let items: Vec<I> = queue.drain(..take).collect();
            if queue.is_empty() {
                self.queued.remove(&key);
            }
            if items.is_empty() {
                continue;
            }
            self.busy.insert(key.clone());
            let handle = self.tasks.spawn(run(key.clone(), items));
            self.task_keys.insert(handle.id(), key);
        }
    }

    /// `key`'s task reported its chunk: its next chunk may start. True when the
    /// key has nothing left (no task, nothing queued).
    pub(crate) fn finished(&mut self, key: &str) -> bool {
        self.busy.remove(key);
        if self.queued.contains_key(key) {
            self.ready.push(key.to_owned());
            false
        } else {
            true
        }
    }

    /// Drop everything still queued for `key`, in order: its lane stopped, and
    /// nothing behind the stopped item may go first. The source sends them again.
    pub(crate) fn release(&mut self, key: &str) -> Vec<I> {
        self.ready.retain(|ready| ready != key);
        self.queued.remove(key).map(Vec::from).unwrap_or_default()
    }

    /// Reap finished tasks; the key and error of each that failed (panicked, or
    /// aborted) without reporting: its key is free again, its items are lost.
    pub(crate) fn reap(&mut self) -> Vec<(String, JoinError)> {
        let mut failed = Vec::new();
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            match joined {
                Ok((id, ())) => {
                    self.task_keys.remove(&id);
                }
                Err(error) => {
                    if let Some(key) = self.task_keys.remove(&error.id()) {
                        self.busy.remove(&key);
                        failed.push((key, error));
                    }
                }
            }
        }
        failed
    }

    /// Whether no task runs (reaped tasks only: call [`Lanes::reap`] first).
    pub(crate) fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Tasks running (or finished and not reaped yet).
    pub(crate) fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Abort every task at its next await; their results never come.
    pub(crate) fn abort_all(&mut self) {
        self.tasks.abort_all();
    }

    /// Abort every task and wait for them to end; nothing runs afterwards.
    pub(crate) async fn shutdown(&mut self) {
        self.tasks.shutdown().await;
        self.task_keys.clear();
        self.busy.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Item(&'static str, u32);

    impl Keyed for Item {
        fn key(&self) -> String {
            self.0.to_owned()
        }
    }

    /// What a scripted sink saw: publishes in order, and per key the most
    /// publishes outstanding at once.
    #[derive(Debug, Default)]
    struct Seen {
        published: Vec<Item>,
        outstanding: HashMap<&'static str, usize>,
        most_outstanding: HashMap<&'static str, usize>,
    }

    async fn publish(seen: Arc<Mutex<Seen>>, item: Item, confirm_after: Duration) {
        {
            let mut seen = seen.lock().unwrap();
            let outstanding = seen.outstanding.entry(item.0).or_default();
            *outstanding += 1;
            let now = *outstanding;
            let most = seen.most_outstanding.entry(item.0).or_default();
            *most = (*most).max(now);
            seen.published.push(item.clone());
        }
        tokio::time::sleep(confirm_after).await;
        *seen.lock().unwrap().outstanding.entry(item.0).or_default() -= 1;
    }

    #[tokio::test(start_paused = true)]
    async fn a_keys_events_never_overtake_each_other_and_never_exceed_the_sinks_allowance() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut lanes = Lanes::new(2);
        // Three units, interleaving two keys; key b confirms slower than key a.
        for unit in 0..3 {
            lanes.add(Item("a", unit * 2));
            lanes.add(Item("b", unit * 2));
            lanes.add(Item("a", unit * 2 + 1));
        }
        let spawn = |lanes: &mut Lanes<Item>| {
            lanes.spawn_ready(|key, items| {
                let (seen, done_tx) = (seen.clone(), done_tx.clone());
                async move {
                    for item in items {
                        let delay = if item.0 == "b" { 7 } else { 3 };
                        publish(seen.clone(), item, Duration::from_millis(delay)).await;
                    }
                    let _ = done_tx.send(key);
                }
            })
        };
        spawn(&mut lanes);
        assert_eq!(lanes.running(), 2, "one task per key, keys side by side");
        let mut idle_keys = 0;
        while idle_keys < 2 {
            let key = done_rx.recv().await.unwrap();
            if lanes.finished(&key) {
                idle_keys += 1;
            }
            spawn(&mut lanes);
            assert!(lanes.reap().is_empty());
        }
        let seen = seen.lock().unwrap();
        for key in ["a", "b"] {
            let order: Vec<u32> = seen
                .published
                .iter()
                .filter(|item| item.0 == key)
                .map(|item| item.1)
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(order, sorted, "key {key} published in queue order");
            assert_eq!(
                seen.most_outstanding[key], 1,
                "key {key}: never more than the sink's per-key allowance (1) in flight"
            );
        }
        assert_eq!(seen.published.len(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lane_drops_the_rest_of_its_key() {
        let mut lanes = Lanes::new(1);
        for n in 0..3 {
            lanes.add(Item("a", n));
        }
        lanes.add(Item("b", 0));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        lanes.spawn_ready(|key, _items| {
            let done_tx = done_tx.clone();
            async move {
                let _ = done_tx.send(key);
            }
        });
        // a's first chunk stopped (say, broker trouble): the rest of a goes back.
        let mut reported = vec![done_rx.recv().await.unwrap(), done_rx.recv().await.unwrap()];
        reported.sort();
        assert_eq!(reported, ["a", "b"]);
        assert_eq!(lanes.release("a"), [Item("a", 1), Item("a", 2)]);
        assert!(lanes.finished("a"), "nothing of a is left to publish");
        assert!(lanes.finished("b"));
        let mut spawned = Vec::new();
        lanes.spawn_ready(|key, _items| {
            spawned.push(key);
            async {}
        });
        assert!(
            spawned.is_empty(),
            "no later event of a goes before the stopped one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_lane_frees_its_key() {
        let mut lanes = Lanes::new(8);
        lanes.add(Item("a", 0));
        lanes.spawn_ready(|_key, _items| std::future::pending::<()>());
        lanes.abort_all();
        let mut failed = Vec::new();
        while !lanes.is_idle() {
            tokio::task::yield_now().await;
            failed.extend(lanes.reap().into_iter().map(|(key, _)| key));
        }
        assert_eq!(failed, ["a"]);
        lanes.add(Item("a", 1));
        let mut spawned = Vec::new();
        lanes.spawn_ready(|key, items| {
            spawned.push((key, items));
            async {}
        });
        assert_eq!(spawned.len(), 1, "the key runs again after its task ended");
    }
}
