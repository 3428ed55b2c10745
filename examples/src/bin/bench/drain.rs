//! Throughput runs: per run, the limits, the hand-written poller and the relay
//! daemon draining a backlog per source × sink × key shape, so that every ratio
//! is taken within one run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;
use crate::fixture::{BrokerCount, World};
use crate::limits::{self, Limits};
use crate::stats::Summary;
use crate::table::{Report, Section, fixed, rate, thousands, verdict};
use crate::{Ctx, Sink, Source, poller};

/// Key shapes of the drains.
pub(crate) const KEY_SHAPES: [usize; 3] = [1_000, 10, 1];
/// How often the outbox is counted while a relay drains it.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for the first settled row (daemon start, slot creation, first batch).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Which parts a throughput run measures besides the limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parts {
    pub(crate) poller: bool,
    pub(crate) drains: bool,
}

/// One drain of one run.
#[derive(Clone, Copy, Debug)]
struct Drained {
    rate: f64,
    /// Whether the time bound ended it before the outbox was empty.
    bounded: bool,
    backlog: usize,
    cpu_per_100k: Option<f64>,
    peak_rss_mib: f64,
}

type Shape = (Source, Sink, usize);

/// Run `ctx.runs` throughput runs and add their sections to `report`.
pub(crate) async fn run(ctx: &Ctx, report: &mut Report, parts: Parts) -> anyhow::Result<()> {
    let mut limits: Vec<Limits> = Vec::new();
    let mut pollers: Vec<Option<f64>> = Vec::new();
    let mut drains: BTreeMap<Shape, Vec<Option<Drained>>> = BTreeMap::new();
    for run in 0..ctx.runs {
        println!("bench: throughput run {}/{}", run + 1, ctx.runs);
        limits.push(limits::measure(ctx).await);
        if parts.poller && ctx.sinks.contains(&Sink::Rabbitmq) {
            let rate = match poller::once(ctx).await {
                Ok(rate) => {
                    println!("bench: hand-written poller: {rate:.0} events/s");
                    Some(rate)
                }
                Err(error) => {
                    eprintln!("bench: hand-written poller failed: {error:#}");
                    None
                }
            };
            pollers.push(rate);
        }
        if !parts.drains {
            continue;
        }
        for &source in &ctx.sources {
            for &sink in &ctx.sinks {
                for keys in KEY_SHAPES {
                    let drained = match once(ctx, source, sink, keys).await {
                        Ok(drained) => {
                            println!(
                                "bench: drain {} -> {} over {keys} keys: {:.0} events/s{}",
                                source.name(),
                                sink.name(),
                                drained.rate,
                                if drained.bounded {
                                    " (time-bounded)"
                                } else {
                                    ""
                                }
                            );
                            Some(drained)
                        }
                        Err(error) => {
                            eprintln!(
                                "bench: drain {} -> {} over {keys} keys failed: {error:#}",
                                source.name(),
                                sink.name()
                            );
                            None
                        }
                    };
                    drains
                        .entry((source, sink, keys))
                        .or_default()
                        .push(drained);
                }
            }
        }
    }
    report.add(limits_section(ctx, &limits))?;
    if parts.drains {
        report.add(drain_section(ctx, &limits, &drains))?;
    }
    if parts.poller && !pollers.is_empty() {
        report.add(poller_section(ctx, &limits, &pollers))?;
    }
    if parts.drains {
        report.add(cost_section(&drains))?;
    }
    Ok(())
}

/// Drain one backlog with the daemon: rows settled per second, from the first settled
/// row (so the daemon's start and a new slot's creation are not counted) until the
/// outbox is empty or `ctx.drain_secs` passed.
async fn once(ctx: &Ctx, source: Source, sink: Sink, keys: usize) -> anyhow::Result<Drained> {
    let world = World::create(ctx, Some(sink)).await?;
    let result = drain_world(ctx, &world, source, keys).await;
    world.cleanup(ctx).await;
    result
}

async fn drain_world(
    ctx: &Ctx,
    world: &World,
    source: Source,
    keys: usize,
) -> anyhow::Result<Drained> {
    let backlog = if keys >= 1_000 {
        ctx.backlog
    } else {
        ctx.backlog_hot
    };
    world.load_backlog(ctx, 0, backlog, keys).await?;
    let counter = BrokerCount::open(ctx, world).await?;
    let result = drain_counted(ctx, world, source, backlog, &counter).await;
    counter.close().await;
    result
}

async fn drain_counted(
    ctx: &Ctx,
    world: &World,
    source: Source,
    backlog: usize,
    counter: &BrokerCount,
) -> anyhow::Result<Drained> {
    let mut daemon = Daemon::start(&ctx.relay_bin, &world.relay_env(ctx, source))?;
    let started = Instant::now();
    let bound = Duration::from_secs(ctx.drain_secs);
    let mut first: Option<(Instant, u64)> = None;
    let (end, arrived) = loop {
        let arrived = counter.count().await?;
        let now = Instant::now();
        if arrived >= backlog as u64 {
            break (now, arrived);
        }
        match first {
            None if arrived > 0 => first = Some((now, arrived)),
            None => anyhow::ensure!(
                started.elapsed() < START_TIMEOUT,
                "nothing reached the broker within {START_TIMEOUT:?}"
            ),
            Some((t0, _)) if now - t0 >= bound => break (now, arrived),
            Some(_) => {}
        }
        if !daemon.running() {
            return Err(daemon.ended_early(&format!("{arrived} of {backlog} published")));
        }
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    };
    let usage = daemon.stop().await?;
    // A backlog published before the second sample: time it from the daemon's start.
    let (t0, n0) = first.unwrap_or((started, 0));
    let secs = (end - t0).as_secs_f64().max(1e-3);
    Ok(Drained {
        rate: arrived.saturating_sub(n0) as f64 / secs,
        bounded: arrived < backlog as u64,
        backlog,
        cpu_per_100k: (arrived > 0).then(|| usage.cpu_secs / arrived as f64 * 100_000.0),
        peak_rss_mib: usage.peak_rss_kib as f64 / 1024.0,
    })
}

fn limits_section(ctx: &Ctx, limits: &[Limits]) -> Section {
    let mut section = Section::new(
        "1. Limits of this machine (same runs as the drains)",
        &["limit", "per second, median (min–max)", "how"],
    );
    let summary = |f: fn(&Limits) -> Option<f64>| {
        Summary::of(&limits.iter().filter_map(f).collect::<Vec<_>>())
    };
    if ctx.sinks.contains(&Sink::Rabbitmq) {
        section.row(vec![
            "RabbitMQ publish with confirms".into(),
            rate(summary(|l| l.rabbitmq)),
            format!(
                "lapin, durable queue, persistent `mandatory` messages, the relay's headers and \
                 {}-byte payloads; {} confirms outstanding over {} channels (the relay's in-flight limit)",
                ctx.payload_bytes, ctx.window, ctx.limit_channels
            ),
        ]);
    }
    if ctx.sinks.contains(&Sink::Kafka) {
        section.row(vec![
            "Kafka produce".into(),
            rate(summary(|l| l.kafka)),
            format!(
                "rdkafka, `enable.idempotence=true`, `acks=all`, the relay's producer settings, \
                 1,000 keys over {} partitions; {} delivery reports outstanding",
                crate::fixture::KAFKA_PARTITIONS,
                ctx.window
            ),
        ]);
    }
    section.row(vec![
        "PostgreSQL claim-and-delete".into(),
        rate(summary(|l| l.postgres)),
        format!(
            "one connection: `select … order by sequence limit {} for update skip locked`, \
             `delete … where sequence = any($1)`, commit",
            ctx.batch_size
        ),
    ]);
    section.note(format!(
        "Runs: {}; each limit at most {} s. A run is the limits, then the poller and the drains.",
        limits.len(),
        limits::LIMIT_SECS
    ));
    section
}

fn poller_section(ctx: &Ctx, limits: &[Limits], pollers: &[Option<f64>]) -> Section {
    let mut section = Section::new(
        "5. Hand-written poller (reference)",
        &["what", "events/s", "÷ RabbitMQ limit (same run)"],
    );
    let rates: Vec<f64> = pollers.iter().flatten().copied().collect();
    let ratios: Vec<f64> = pollers
        .iter()
        .zip(limits)
        .filter_map(|(rate, limit)| Some(rate.as_ref()? / limit.rabbitmq?))
        .collect();
    section.row(vec![
        format!(
            "`select … for update skip locked limit {}`, publish all with confirms on one channel, \
             delete, commit (RabbitMQ, 1,000 keys)",
            ctx.batch_size
        ),
        rate(Summary::of(&rates)),
        fixed(Summary::of(&ratios), 2),
    ]);
    section.note(format!(
        "The {}-event backlog, time-bounded to {} s, as the drains.",
        thousands(ctx.backlog as f64),
        ctx.drain_secs
    ));
    section
}

fn drain_section(
    ctx: &Ctx,
    limits: &[Limits],
    drains: &BTreeMap<Shape, Vec<Option<Drained>>>,
) -> Section {
    let mut section = Section::new(
        "2. Drain of a backlog by the relay daemon",
        &[
            "source",
            "sink",
            "keys",
            "events/s",
            "÷ broker limit",
            "÷ 1,000-key rate",
            "measured",
            "target",
            "",
        ],
    );
    for &source in &ctx.sources {
        for &sink in &ctx.sinks {
            let wide = drains.get(&(source, sink, 1_000));
            for keys in KEY_SHAPES {
                let Some(runs) = drains.get(&(source, sink, keys)) else {
                    continue;
                };
                let rates: Vec<f64> = runs.iter().flatten().map(|d| d.rate).collect();
                let to_limit: Vec<f64> = runs
                    .iter()
                    .zip(limits)
                    .filter_map(|(d, l)| Some(d.as_ref()?.rate / l.of(sink)?))
                    .collect();
                let to_wide: Vec<f64> = match wide {
                    Some(wide) if keys != 1_000 => runs
                        .iter()
                        .zip(wide)
                        .filter_map(|(d, w)| Some(d.as_ref()?.rate / w.as_ref()?.rate))
                        .collect(),
                    _ => Vec::new(),
                };
                let backlog = runs.iter().flatten().map(|d| d.backlog).max().unwrap_or(0);
                let bounded = runs.iter().flatten().filter(|d| d.bounded).count();
                let measured = if bounded > 0 {
                    format!(
                        "first {} s of a {}-event backlog ({bounded} of {} runs time-bounded)",
                        ctx.drain_secs,
                        thousands(backlog as f64),
                        rates.len()
                    )
                } else {
                    format!("{}-event backlog until empty", thousands(backlog as f64))
                };
                let (target, met) = match (keys, sink) {
                    (1_000, _) => (
                        "≥ 0.9 × limit",
                        verdict(Summary::of(&to_limit), |r| r >= 0.9),
                    ),
                    (1, Sink::Kafka) => (
                        "≥ 0.5 × 1,000 keys",
                        verdict(Summary::of(&to_wide), |r| r >= 0.5),
                    ),
                    (1, Sink::Rabbitmq) => (
                        "≥ 0.25 × 1,000 keys",
                        verdict(Summary::of(&to_wide), |r| r >= 0.25),
                    ),
                    _ => ("", String::new()),
                };
                section.row(vec![
                    source.name().into(),
                    sink.name().into(),
                    thousands(keys as f64),
                    rate(Summary::of(&rates)),
                    fixed(Summary::of(&to_limit), 2),
                    fixed(Summary::of(&to_wide), 2),
                    measured,
                    target.into(),
                    met,
                ]);
            }
        }
    }
    section.note(
        "Messages that reached the broker per second (queue depth, or the sum of the topic's \
         high watermarks, sampled every 50 ms), from the first arrival, so the daemon's start \
         and a new slot's creation are left out. The WAL rows \
         are the table drain of a new slot (rows written before the slot existed), not its stream. \
         Relay defaults: batch 1,000, in-flight 256, 64 partitions. Ratios are taken within each run.",
    );
    section
}

fn cost_section(drains: &BTreeMap<Shape, Vec<Option<Drained>>>) -> Section {
    let mut section = Section::new(
        "6a. Relay daemon cost during the 1,000-key drains",
        &[
            "source",
            "sink",
            "CPU s per 100,000 events",
            "peak RSS (MiB)",
        ],
    );
    for (&(source, sink, keys), runs) in drains {
        if keys != 1_000 {
            continue;
        }
        let cpu: Vec<f64> = runs
            .iter()
            .flatten()
            .filter_map(|d| d.cpu_per_100k)
            .collect();
        let rss: Vec<f64> = runs.iter().flatten().map(|d| d.peak_rss_mib).collect();
        section.row(vec![
            source.name().into(),
            sink.name().into(),
            fixed(Summary::of(&cpu), 2),
            fixed(Summary::of(&rss), 1),
        ]);
    }
    section.note(
        "The daemon's own user + system CPU from /proc/<pid>/stat over its whole run (start \
         included) divided by the events it published; VmHWM from /proc/<pid>/status. The \
         1,000,000-event figure is `bench rss`.",
    );
    section
}
