//! The loop's own tests, fast and without services: an in-memory source and a
//! scripted sink, in paused time. Each checks a ledger rule where it matters,
//! inside the source's settle: nothing settled before its confirm, nothing
//! confirmed past an unfinished unit, a key's events in order and within the
//! sink's per-key allowance, a clean stop that leaves nothing delivered
//! unsettled, and admission bounded by the window.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::config::PoisonPolicy;
use crate::event::OutboxEvent;
use crate::pipeline::ledger::{AnyOrder, DonePrefix, Ledger, View};
use crate::route::{Route, Template};
use crate::sink::{Outcome, SinkError};
use crate::source::{Admission, LaneWork, Unit, Verdict, Window};

/// What happened, shared by the source, the sink and the test.
#[derive(Debug, Default)]
struct World {
    /// Sequences the broker confirmed, in confirm order.
    delivered: Vec<i64>,
    delivered_set: BTreeSet<i64>,
    dead_lettered: BTreeSet<i64>,
    settled: BTreeSet<i64>,
    /// Per key: sequences in publish order; publishes outstanding now and at most.
    published: HashMap<String, Vec<i64>>,
    outstanding: HashMap<String, usize>,
    most_outstanding: HashMap<String, usize>,
    /// Most events admitted and not settled at once.
    most_in_flight: usize,
    /// Units settled, in settle order (done-prefix view).
    settled_units: Vec<usize>,
}

type Shared = Arc<Mutex<World>>;

/// Per sequence, the outcomes to return before it is delivered.
type Script = HashMap<i64, VecDeque<fn() -> Outcome>>;

fn event(sequence: i64, key: &str) -> OutboxEvent {
    OutboxEvent {
        sequence,
        event_id: outbox_core::EventId::new(),
        aggregate_type: "order".into(),
        aggregate_id: key.into(),
        event_type: "order.placed".into(),
        partition_key: key.into(),
        destination: None,
        payload: b"{}".to_vec(),
        headers: Default::default(),
        created_at: chrono::Utc::now(),
        attempts: 0,
    }
}

/// A sink that confirms after a per-key delay and fails as scripted.
struct ScriptedSink {
    world: Shared,
    delay: HashMap<String, Duration>,
    /// Outcomes to return for a sequence, before it is delivered.
    script: Mutex<Script>,
    /// Events of one key it publishes at once within a run (1: one at a time).
    allowance: usize,
}

fn retry() -> Outcome {
    Outcome::Retry(SinkError::new("broker away"))
}

fn rejected() -> Outcome {
    Outcome::Rejected(SinkError::new("unroutable"))
}

impl Sink for ScriptedSink {
    async fn publish(&self, event: &OutboxEvent, _route: &Route) -> Outcome {
        let key = event.partition_key.clone();
        {
            let mut world = self.world.lock().unwrap();
            world
                .published
                .entry(key.clone())
                .or_default()
                .push(event.sequence);
            let now = {
                let outstanding = world.outstanding.entry(key.clone()).or_default();
                *outstanding += 1;
                *outstanding
            };
            let most = world.most_outstanding.entry(key.clone()).or_default();
            *most = (*most).max(now);
        }
        let delay = self
            .delay
            .get(&key)
            .copied()
            .unwrap_or(Duration::from_millis(3));
        tokio::time::sleep(delay).await;
        let scripted = self
            .script
            .lock()
            .unwrap()
            .get_mut(&event.sequence)
            .and_then(VecDeque::pop_front);
        let mut world = self.world.lock().unwrap();
        *world.outstanding.entry(key).or_default() -= 1;
        match scripted {
            Some(outcome) => outcome(),
            None => {
                world.delivered.push(event.sequence);
                world.delivered_set.insert(event.sequence);
                Outcome::Delivered
            }
        }
    }

    fn max_in_flight_per_key(&self) -> usize {
        self.allowance
    }

    /// Windows of `allowance` events published at once; a delivered prefix and the
    /// first failure (what follows a failure is reported as not delivered).
    async fn publish_run(&self, run: &[(&OutboxEvent, Route)]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(run.len());
        for window in run.chunks(self.allowance.max(1)) {
            let verdicts = futures_util::future::join_all(
                window
                    .iter()
                    .map(|(event, route)| self.publish(event, route)),
            )
            .await;
            for verdict in verdicts {
                let delivered = matches!(verdict, Outcome::Delivered);
                outcomes.push(verdict);
                if !delivered {
                    return outcomes;
                }
            }
        }
        outcomes
    }

    async fn close(&self) {}
}

/// Which ledger view and retry mode an in-memory source uses.
trait Mode: Send + Sync + 'static {
    type View: View + Default + Send;
    const RETRY: RetryMode;
    /// Settle by the view's rule, checking each settled event.
    fn settle(world: &mut World, ledger: &mut Ledger<Arc<MemUnit>, Self::View>);
}

struct Released;
impl Mode for Released {
    type View = AnyOrder;
    const RETRY: RetryMode = RetryMode::Release;
    /// Any order: only the delivered sequences of each unit.
    fn settle(world: &mut World, ledger: &mut Ledger<Arc<MemUnit>, AnyOrder>) {
        for (unit, sequences) in ledger.take_finished().units {
            settle_unit(world, &unit, &sequences);
        }
    }
}

struct InPlace;
impl Mode for InPlace {
    type View = DonePrefix;
    const RETRY: RetryMode = RetryMode::InPlace;
    /// The done prefix: every event of each unit finished.
    fn settle(world: &mut World, ledger: &mut Ledger<Arc<MemUnit>, DonePrefix>) {
        let mut units = 0;
        for done in ledger.done_prefix() {
            settle_unit(world, done.token, &done.token.sequences);
            units += 1;
        }
        ledger.pop_prefix(units);
    }
}

/// Nothing is settled that the broker did not confirm (or that went to the
/// dead-letter table).
fn settle_unit(world: &mut World, unit: &MemUnit, sequences: &[i64]) {
    for sequence in sequences {
        assert!(
            world.delivered_set.contains(sequence) || world.dead_lettered.contains(sequence),
            "sequence {sequence} settled before its confirm"
        );
        world.settled.insert(*sequence);
    }
    world.settled_units.push(unit.id);
}

#[derive(Debug)]
struct MemUnit {
    id: usize,
    sequences: Vec<i64>,
}

#[derive(Debug)]
struct MemItem(OutboxEvent);

impl lanes::Keyed for MemItem {
    fn key(&self) -> String {
        self.0.partition_key.clone()
    }
}

impl crate::source::LaneItem for MemItem {
    fn event(&self) -> Option<&OutboxEvent> {
        Some(&self.0)
    }
    fn sequence(&self) -> i64 {
        self.0.sequence
    }
}

struct MemLanes {
    world: Shared,
}

impl LaneWork for MemLanes {
    type Token = MemUnit;
    type Item = MemItem;
    async fn reject(&self, _: &MemUnit, item: &mut MemItem, _: &SinkError) -> Verdict {
        self.world
            .lock()
            .unwrap()
            .dead_lettered
            .insert(item.0.sequence);
        Verdict::DeadLettered
    }
    async fn dispose(&self, _: &MemUnit, _: &mut MemItem) -> Verdict {
        Verdict::DeadLettered
    }
    fn delivered(&self, _: &MemItem) {}
}

/// Units of `(sequence, key)` handed out in order; then nothing, forever.
struct MemSource<M> {
    units: VecDeque<Vec<(i64, &'static str)>>,
    next_id: usize,
    window: usize,
    world: Shared,
    lanes: Arc<MemLanes>,
    mode: PhantomData<M>,
}

impl<M: Mode> MemSource<M> {
    fn new(world: &Shared, window: usize, units: Vec<Vec<(i64, &'static str)>>) -> Self {
        MemSource {
            units: units.into(),
            next_id: 0,
            window,
            world: world.clone(),
            lanes: Arc::new(MemLanes {
                world: world.clone(),
            }),
            mode: PhantomData,
        }
    }
}

impl<M: Mode> Source for MemSource<M> {
    type Token = MemUnit;
    type Item = MemItem;
    type View = M::View;
    type Lanes = MemLanes;
    const RETRY: RetryMode = M::RETRY;
    const LANE_CHUNK: usize = 2;

    fn lane_work(&self) -> Arc<MemLanes> {
        self.lanes.clone()
    }

    fn window(&self) -> Window {
        Window {
            limit: self.window,
            refill_below: self.window,
        }
    }

    fn alarm(&self, _: bool) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    async fn check(&mut self, _: bool) -> Option<Stop> {
        None
    }

    async fn next(&mut self, _admission: Admission) -> Next<MemUnit, MemItem> {
        let Some(unit) = self.units.pop_front() else {
            return std::future::pending().await;
        };
        let id = self.next_id;
        self.next_id += 1;
        Next::Unit(Unit {
            token: MemUnit {
                id,
                sequences: unit.iter().map(|(sequence, _)| *sequence).collect(),
            },
            items: unit
                .into_iter()
                .map(|(sequence, key)| MemItem(event(sequence, key)))
                .collect(),
        })
    }

    fn settle_due(&self, ledger: &SourceLedger<Self>, _: bool) -> bool {
        let mut world = self.world.lock().unwrap();
        world.most_in_flight = world.most_in_flight.max(ledger.in_flight());
        false
    }

    async fn settle(&mut self, ledger: &mut SourceLedger<Self>, _: SettleWhen) -> Settled {
        M::settle(&mut self.world.lock().unwrap(), ledger);
        Settled::Done
    }

    async fn close(self, _: bool) {}
}

fn parts(
    world: &Shared,
    delay: &[(&str, u64)],
    script: Vec<(i64, fn() -> Outcome)>,
) -> Parts<ScriptedSink> {
    let mut scripted = Script::new();
    for (sequence, outcome) in script {
        scripted.entry(sequence).or_default().push_back(outcome);
    }
    let template = |text| Template::parse(text).expect("a valid template");
    Parts {
        sink: Arc::new(ScriptedSink {
            world: world.clone(),
            delay: delay
                .iter()
                .map(|(key, ms)| ((*key).to_owned(), Duration::from_millis(*ms)))
                .collect(),
            script: Mutex::new(scripted),
            allowance: 1,
        }),
        router: Router::new(template("events"), template("{partition_key}")),
        config: PipelineConfig {
            max_in_flight: 4,
            max_attempts: 3,
            retry_backoff_initial: Duration::from_millis(10),
            retry_backoff_max: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(30),
            poison_policy: PoisonPolicy::Skip,
            breaker_failure_threshold: 5,
        },
        stats: Arc::new(RelayStats::default()),
    }
}

/// Units of `per_unit` events each over `keys`, `count` of them.
fn units(count: i64, per_unit: i64, keys: &[&'static str]) -> Vec<Vec<(i64, &'static str)>> {
    (0..count)
        .map(|unit| {
            (0..per_unit)
                .map(|n| {
                    let sequence = unit * per_unit + n + 1;
                    (sequence, keys[(sequence as usize) % keys.len()])
                })
                .collect()
        })
        .collect()
}

/// Run `source` with `parts`; stop after `stop_after` (virtual time).
async fn run_until<S: Source>(
    source: S,
    parts: &Parts<ScriptedSink>,
    stop_after: Duration,
) -> SessionEnd {
    let (stop, mut shutdown) = watch::channel(false);
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(stop_after).await;
        let _ = stop.send(true);
        // Keep the sender until the loop ended.
        std::future::pending::<()>().await;
    });
    let end = run(source, parts, &mut shutdown).await;
    stopper.abort();
    end.expect("the loop ends without an error")
}

/// [`run_until`] with an in-memory source of `retry_mode` (its ledger view and retry).
async fn run_in_mode(
    retry_mode: RetryMode,
    world: &Shared,
    window: usize,
    units: Vec<Vec<(i64, &'static str)>>,
    parts: &Parts<ScriptedSink>,
    stop_after: Duration,
) -> SessionEnd {
    match retry_mode {
        RetryMode::Release => {
            run_until(
                MemSource::<Released>::new(world, window, units),
                parts,
                stop_after,
            )
            .await
        }
        RetryMode::InPlace => {
            run_until(
                MemSource::<InPlace>::new(world, window, units),
                parts,
                stop_after,
            )
            .await
        }
    }
}

fn assert_in_order(world: &World, allowance: usize) {
    for (key, published) in &world.published {
        // Retried in place, an event is published again before the next one: order holds.
        let mut first_seen = Vec::new();
        for sequence in published {
            if !first_seen.contains(sequence) {
                first_seen.push(*sequence);
            }
        }
        let mut sorted = first_seen.clone();
        sorted.sort_unstable();
        assert_eq!(first_seen, sorted, "key {key} published in commit order");
        assert!(
            world.most_outstanding[key] <= allowance,
            "key {key}: {} publishes outstanding, the sink allows {allowance}",
            world.most_outstanding[key]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_settled_before_it_is_delivered() {
    let world = Shared::default();
    // Broker trouble for 5, a rejection for 9: in release mode 5's lane stops
    // (5 and the rest of its key are released, never settled); 9 is dead-lettered.
    let parts = parts(&world, &[("b", 11)], vec![(5, retry), (9, rejected)]);
    let source = MemSource::<Released>::new(&world, 100, units(4, 3, &["a", "b", "c"]));
    let end = run_until(source, &parts, Duration::from_secs(2)).await;
    assert!(matches!(end, SessionEnd::Shutdown));
    let world = world.lock().unwrap();
    assert!(
        !world.settled.contains(&5),
        "a released event is not settled"
    );
    assert!(world.dead_lettered.contains(&9));
    for sequence in &world.settled {
        assert!(world.delivered_set.contains(sequence) || world.dead_lettered.contains(sequence));
    }
    assert_in_order(&world, 1);
}

#[tokio::test(start_paused = true)]
async fn a_position_is_confirmed_only_over_a_done_prefix() {
    let world = Shared::default();
    // Key "slow" holds the first unit for a long time; later units finish first.
    let parts = parts(&world, &[("slow", 500)], vec![]);
    let mut all = vec![vec![(1, "slow"), (2, "fast")]];
    all.extend((1..20).map(|n| vec![(2 * n + 1, "fast"), (2 * n + 2, "other")]));
    let source = MemSource::<InPlace>::new(&world, 1_000, all);
    run_until(source, &parts, Duration::from_secs(5)).await;
    let world = world.lock().unwrap();
    assert_eq!(
        world.settled_units,
        (0..20).collect::<Vec<_>>(),
        "units are settled in order, none before the slow first one"
    );
    assert_eq!(world.settled.len(), 40);
}

#[tokio::test(start_paused = true)]
async fn a_keys_events_never_overtake_each_other_and_never_exceed_the_sinks_allowance() {
    for retry_mode in [RetryMode::Release, RetryMode::InPlace] {
        let world = Shared::default();
        // Transient trouble and a rejection mid-key; retried in place or released.
        let parts = parts(
            &world,
            &[("a", 7), ("b", 2)],
            vec![(4, retry), (4, retry), (10, rejected)],
        );
        let all = units(10, 5, &["a", "b", "c"]);
        run_in_mode(retry_mode, &world, 20, all, &parts, Duration::from_secs(3)).await;
        assert_in_order(&world.lock().unwrap(), parts.sink.max_in_flight_per_key());
    }
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_overlaps_a_keys_events_is_never_given_more_than_its_allowance() {
    for retry_mode in [RetryMode::Release, RetryMode::InPlace] {
        let world = Shared::default();
        let mut parts = parts(
            &world,
            &[("a", 7), ("b", 2)],
            vec![(4, retry), (4, retry), (10, rejected)],
        );
        parts.sink = Arc::new(ScriptedSink {
            world: world.clone(),
            delay: [("a".to_owned(), Duration::from_millis(7))].into(),
            script: Mutex::new(
                [
                    (4, VecDeque::from([retry as fn() -> Outcome, retry])),
                    (10, VecDeque::from([rejected as fn() -> Outcome])),
                ]
                .into(),
            ),
            allowance: 3,
        });
        let all = units(10, 5, &["a", "b", "c"]);
        run_in_mode(retry_mode, &world, 20, all, &parts, Duration::from_secs(3)).await;
        let world = world.lock().unwrap();
        assert_in_order(&world, 3);
        assert!(
            world.most_outstanding.values().any(|most| *most > 1),
            "the sink's runs overlapped a key's events"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_clean_stop_leaves_no_delivered_row_behind() {
    for retry_mode in [RetryMode::Release, RetryMode::InPlace] {
        let world = Shared::default();
        let parts = parts(&world, &[("a", 40), ("b", 25)], vec![]);
        let all = units(30, 4, &["a", "b", "c", "d"]);
        // Stop while lanes are publishing: the grace lets them finish.
        let end = run_in_mode(
            retry_mode,
            &world,
            16,
            all,
            &parts,
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(end, SessionEnd::Shutdown));
        let world = world.lock().unwrap();
        assert!(
            !world.delivered.is_empty(),
            "{retry_mode:?}: something was published"
        );
        assert!(
            world.delivered.len() < 120,
            "{retry_mode:?}: the stop came while events were still to publish"
        );
        assert_eq!(
            world.settled, world.delivered_set,
            "{retry_mode:?}: every delivered event is settled, nothing else"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn admission_never_exceeds_the_window() {
    for window in [1, 7, 32] {
        let world = Shared::default();
        let parts = parts(&world, &[("a", 5)], vec![]);
        let per_unit = 3;
        let source = MemSource::<InPlace>::new(&world, window, units(40, per_unit, &["a", "b"]));
        run_until(source, &parts, Duration::from_secs(5)).await;
        let world = world.lock().unwrap();
        assert_eq!(
            world.settled.len(),
            120,
            "window {window}: everything went through"
        );
        assert!(
            world.most_in_flight < window + per_unit as usize,
            "window {window}: {} in flight; at most one unit beyond the window",
            world.most_in_flight
        );
    }
}
