//! Latency from `COMMIT` returning to the consumer receiving, at offered rates, per
//! source × sink. Writers (`outbox_core` enqueue, one event per transaction) and the
//! consumer run in this process, so both times come from one monotonic clock; the
//! relay is the daemon.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use outbox_core::{Event, Outbox, OutboxConfig};

use crate::daemon::Daemon;
use crate::fixture::{KAFKA_PARTITIONS, World};
use crate::stats::{Percentiles, Summary};
use crate::table::{Report, Section, fixed, rate, verdict};
use crate::{Ctx, Sink, Source};

/// Offered rates, events/s, with the writer connections that share each.
const RATES: [(u32, usize); 2] = [(1_000, 4), (5_000, 16)];
/// Partition keys the writers spread over.
const KEYS: u64 = 100;
/// Pause between the relay being ready and the first write.
const WARMUP: Duration = Duration::from_secs(1);
/// Longest wait for the last deliveries of a phase.
const STRAGGLER_WAIT: Duration = Duration::from_secs(10);

/// One phase of one run.
#[derive(Clone, Copy, Debug)]
struct Phase {
    achieved: f64,
    latency: Percentiles,
    missing: usize,
}

type Key = (Source, Sink, u32);

/// Run `ctx.runs` latency runs and add the section to `report`.
pub(crate) async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let mut phases: BTreeMap<Key, Vec<Phase>> = BTreeMap::new();
    let mut floors: BTreeMap<Sink, Vec<Phase>> = BTreeMap::new();
    for run in 0..ctx.runs {
        println!("bench: latency run {}/{}", run + 1, ctx.runs);
        for &sink in &ctx.sinks {
            match broker_alone(ctx, sink).await {
                Ok(phase) => {
                    println!(
                        "bench: latency of {} alone at {}/s: p50 {:.1} p95 {:.1} p99 {:.1} max {:.1} ms ({} missing)",
                        sink.name(),
                        RATES[0].0,
                        phase.latency.p50,
                        phase.latency.p95,
                        phase.latency.p99,
                        phase.latency.max,
                        phase.missing
                    );
                    floors.entry(sink).or_default().push(phase);
                }
                Err(error) => {
                    eprintln!("bench: latency of {} alone failed: {error:#}", sink.name())
                }
            }
        }
        for &source in &ctx.sources {
            for &sink in &ctx.sinks {
                match once(ctx, source, sink).await {
                    Ok(measured) => {
                        for (offered, phase) in measured {
                            println!(
                                "bench: latency {} -> {} at {offered}/s: p50 {:.1} p95 {:.1} p99 {:.1} max {:.1} ms ({:.0}/s achieved, {} missing)",
                                source.name(),
                                sink.name(),
                                phase.latency.p50,
                                phase.latency.p95,
                                phase.latency.p99,
                                phase.latency.max,
                                phase.achieved,
                                phase.missing
                            );
                            phases
                                .entry((source, sink, offered))
                                .or_default()
                                .push(phase);
                        }
                    }
                    Err(error) => eprintln!(
                        "bench: latency {} -> {} failed: {error:#}",
                        source.name(),
                        sink.name()
                    ),
                }
            }
        }
    }
    report.add(section(ctx, &phases, &floors))
}

fn section(
    ctx: &Ctx,
    phases: &BTreeMap<Key, Vec<Phase>>,
    floors: &BTreeMap<Sink, Vec<Phase>>,
) -> Section {
    let mut section = Section::new(
        "3. Latency, COMMIT returned → consumer received (ms)",
        &[
            "source",
            "sink",
            "offered/s",
            "achieved/s",
            "p50",
            "p95",
            "p99",
            "max",
            "missing",
            "target (p99 at 1,000/s)",
            "",
        ],
    );
    for (&(source, sink, offered), runs) in phases {
        let pick = |f: fn(&Phase) -> f64| Summary::of(&runs.iter().map(f).collect::<Vec<_>>());
        let p99 = pick(|p| p.latency.p99);
        let target = match (offered, source, sink) {
            (1_000, Source::Polling, _) => Some(15.0),
            (1_000, Source::Wal, Sink::Rabbitmq) => Some(5.0),
            (1_000, Source::Wal, Sink::Kafka) => Some(10.0),
            _ => None,
        };
        section.row(vec![
            source.name().into(),
            sink.name().into(),
            offered.to_string(),
            rate(pick(|p| p.achieved)),
            fixed(pick(|p| p.latency.p50), 1),
            fixed(pick(|p| p.latency.p95), 1),
            fixed(p99, 1),
            fixed(pick(|p| p.latency.max), 1),
            runs.iter().map(|p| p.missing).sum::<usize>().to_string(),
            target.map_or_else(String::new, |t| format!("≤ {t} ms")),
            target.map_or_else(String::new, |t| verdict(p99, |v| v <= t)),
        ]);
    }
    for (&sink, runs) in floors {
        let pick = |f: fn(&Phase) -> f64| Summary::of(&runs.iter().map(f).collect::<Vec<_>>());
        section.row(vec![
            "(broker alone)".into(),
            sink.name().into(),
            RATES[0].0.to_string(),
            rate(pick(|p| p.achieved)),
            fixed(pick(|p| p.latency.p50), 1),
            fixed(pick(|p| p.latency.p95), 1),
            fixed(pick(|p| p.latency.p99), 1),
            fixed(pick(|p| p.latency.max), 1),
            runs.iter().map(|p| p.missing).sum::<usize>().to_string(),
            String::new(),
            String::new(),
        ]);
    }
    section.note(
        "(broker alone): the same consumer fed by a publisher in this process at the same \
         schedule, with no relay and no PostgreSQL: lapin publishing persistent `mandatory` \
         messages with the relay's properties on a confirm channel (confirms awaited apart), or \
         an idempotent `acks=all` rdkafka producer with the relay's settings (`linger.ms=1`), \
         the time taken just before the publish. It is the floor the broker, the client \
         libraries and this machine's scheduler put under any relay's latency.",
    );
    section.note(format!(
        "One event per transaction through `Outbox::enqueue`, {KEYS} keys, {}-byte payloads; \
         {} s at 1,000/s (4 writer connections) then {} s at 5,000/s (16) on one daemon with relay \
         defaults. The consumer is a plain lapin consumer (auto-ack) on the durable queue, or an \
         rdkafka consumer assigned every partition (`fetch.wait.max.ms=5`). Percentiles are \
         nearest-rank over each run; the figure is the median of the runs' percentiles.",
        ctx.payload_bytes, ctx.latency_secs, ctx.latency_secs_fast
    ));
    section
}

/// Arrivals by event index, from the consumer task.
struct Consumer {
    stop: tokio::sync::oneshot::Sender<()>,
    distinct: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<anyhow::Result<HashMap<u64, Instant>>>,
}

impl Consumer {
    async fn finish(self) -> anyhow::Result<HashMap<u64, Instant>> {
        let _ = self.stop.send(());
        self.task.await.context("the consumer task panicked")?
    }
}

fn record(first: &mut HashMap<u64, Instant>, distinct: &AtomicUsize, payload: &[u8], at: Instant) {
    let index = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|body| body["i"].as_u64());
    if let Some(i) = index
        && first.insert(i, at).is_none()
    {
        distinct.fetch_add(1, Ordering::Relaxed);
    }
}

async fn once(ctx: &Ctx, source: Source, sink: Sink) -> anyhow::Result<Vec<(u32, Phase)>> {
    let world = World::create(ctx, Some(sink)).await?;
    let result = measure(ctx, &world, source, sink).await;
    world.cleanup(ctx).await;
    result
}

async fn measure(
    ctx: &Ctx,
    world: &World,
    source: Source,
    sink: Sink,
) -> anyhow::Result<Vec<(u32, Phase)>> {
    let consumer = match sink {
        Sink::Rabbitmq => rabbitmq_consumer(ctx, &world.destination).await?,
        Sink::Kafka => kafka_consumer(ctx, &world.destination)?,
    };
    let mut daemon = Daemon::start(&ctx.relay_bin, &world.relay_env(ctx, source))?;
    let measured = async {
        world.wait_ready(ctx, source, &mut daemon).await?;
        tokio::time::sleep(WARMUP).await;
        let outbox = Outbox::new(OutboxConfig {
            schema: world.schema.clone(),
            ..OutboxConfig::default()
        });
        let mut written = Vec::new();
        let mut first = 0_u64;
        for (offered, writers) in RATES {
            let secs = if offered >= 5_000 {
                ctx.latency_secs_fast
            } else {
                ctx.latency_secs
            };
            let commits = write(ctx, &outbox, first, offered, secs, writers).await?;
            first += u64::from(offered) * secs;
            let deadline = Instant::now() + STRAGGLER_WAIT;
            let expected = written
                .iter()
                .map(|(_, c): &(u32, Commits)| c.times.len())
                .sum::<usize>()
                + commits.times.len();
            while consumer.distinct.load(Ordering::Relaxed) < expected && Instant::now() < deadline
            {
                if !daemon.running() {
                    return Err(daemon.ended_early("while writers wrote"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            written.push((offered, commits));
        }
        anyhow::Ok(written)
    }
    .await;
    let arrivals = consumer.finish().await;
    let stopped = daemon.stop().await;
    let written = measured?;
    let arrivals = arrivals?;
    stopped?;
    Ok(written
        .into_iter()
        .filter_map(|(offered, commits)| Some((offered, phase(&commits, &arrivals)?)))
        .collect())
}

/// Latencies of `commits` by their arrivals; `None` when nothing was committed.
fn phase(commits: &Commits, arrivals: &HashMap<u64, Instant>) -> Option<Phase> {
    let mut latencies = Vec::with_capacity(commits.times.len());
    let mut missing = 0;
    for &(i, committed) in &commits.times {
        match arrivals.get(&i) {
            // Signed: a delivery can beat the writer's clock read after COMMIT returned.
            Some(&arrived) => latencies.push(match arrived.checked_duration_since(committed) {
                Some(d) => d.as_secs_f64() * 1e3,
                None => -(committed.duration_since(arrived).as_secs_f64() * 1e3),
            }),
            None => missing += 1,
        }
    }
    Some(Phase {
        achieved: commits.times.len() as f64 / commits.elapsed.as_secs_f64().max(1e-9),
        latency: Percentiles::of(&mut latencies)?,
        missing,
    })
}

/// The broker alone at the lowest offered rate: a publisher in this process, no
/// relay and no PostgreSQL, into the same consumer.
async fn broker_alone(ctx: &Ctx, sink: Sink) -> anyhow::Result<Phase> {
    let world = World::create(ctx, Some(sink)).await?;
    let result = async {
        let consumer = match sink {
            Sink::Rabbitmq => rabbitmq_consumer(ctx, &world.destination).await?,
            Sink::Kafka => kafka_consumer(ctx, &world.destination)?,
        };
        tokio::time::sleep(WARMUP).await;
        let (rate, _) = RATES[0];
        let published = match sink {
            Sink::Rabbitmq => publish_on_schedule(ctx, &world.destination, rate).await,
            Sink::Kafka => produce_on_schedule(ctx, &world.destination, rate).await,
        };
        let expected = published.as_ref().map_or(0, |p| p.times.len());
        let deadline = Instant::now() + STRAGGLER_WAIT;
        while consumer.distinct.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let arrivals = consumer.finish().await;
        let published = published?;
        phase(&published, &arrivals?).context("nothing was published")
    }
    .await;
    world.cleanup(ctx).await;
    result
}

/// Publish `rate × latency_secs` messages to `exchange` on a fixed schedule, taking
/// the time just before each publish; confirms are awaited apart.
async fn publish_on_schedule(ctx: &Ctx, exchange: &str, rate: u32) -> anyhow::Result<Commits> {
    use lapin::options::BasicPublishOptions;
    let (connection, channel) = crate::limits::confirm_channel(ctx).await?;
    let pad = "x".repeat(ctx.payload_bytes);
    let total = u64::from(rate) * ctx.latency_secs;
    let (confirms_tx, mut confirms_rx) = tokio::sync::mpsc::unbounded_channel();
    let confirmer = tokio::spawn(async move {
        while let Some(confirm) = confirms_rx.recv().await {
            match confirm.await? {
                lapin::Confirmation::Ack(None) => {}
                other => anyhow::bail!("RabbitMQ did not confirm a message: {other:?}"),
            }
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    let start = tokio::time::Instant::from_std(started);
    let period = 1.0 / f64::from(rate);
    let mut times = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 * period)).await;
        let (body, properties) = crate::limits::amqp_message(i as usize, &pad);
        let at = Instant::now();
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "latency.measured".into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                properties,
            )
            .await?;
        times.push((i, at));
        let _ = confirms_tx.send(confirm);
    }
    let elapsed = started.elapsed();
    drop(confirms_tx);
    confirmer.await.context("the confirm task panicked")??;
    let _ = connection.close(200, "done".into()).await;
    Ok(Commits { times, elapsed })
}

/// Produce `rate × latency_secs` messages to `topic` on a fixed schedule with the
/// relay's producer settings, taking the time just before each send.
async fn produce_on_schedule(ctx: &Ctx, topic: &str, rate: u32) -> anyhow::Result<Commits> {
    use rdkafka::producer::FutureRecord;
    let producer = crate::limits::producer(&ctx.kafka_brokers)?;
    let pad = "x".repeat(ctx.payload_bytes);
    let total = u64::from(rate) * ctx.latency_secs;
    // Warm up first (metadata, the idempotent producer's id), as the relay is before
    // its first event: one message of an index the consumer does not count.
    let warmup = serde_json::json!({ "warmup": true }).to_string();
    match producer
        .send(
            FutureRecord::<[u8], [u8]>::to(topic).payload(warmup.as_bytes()),
            Duration::from_secs(10),
        )
        .await
    {
        Ok(_) => {}
        Err((error, _)) => anyhow::bail!("producing the warm-up message to Kafka: {error}"),
    }
    let started = Instant::now();
    let start = tokio::time::Instant::from_std(started);
    let period = 1.0 / f64::from(rate);
    let mut times = Vec::with_capacity(total as usize);
    let mut reports = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 * period)).await;
        let body = serde_json::json!({ "i": i, "pad": &pad }).to_string();
        let key = (i % KEYS).to_string();
        let at = Instant::now();
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(body.as_bytes());
        match producer.send_result(record) {
            Ok(report) => reports.push(report),
            Err((error, _)) => anyhow::bail!("producing to Kafka: {error}"),
        }
        times.push((i, at));
    }
    let elapsed = started.elapsed();
    for report in reports {
        match report.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => anyhow::bail!("Kafka did not take a message: {error}"),
            Err(_) => anyhow::bail!("the Kafka producer dropped a delivery report"),
        }
    }
    Ok(Commits { times, elapsed })
}

/// What the writers committed: per event index, when COMMIT returned.
struct Commits {
    times: Vec<(u64, Instant)>,
    elapsed: Duration,
}

/// Commit `rate × secs` events from index `first`, one per transaction, on schedule.
async fn write(
    ctx: &Ctx,
    outbox: &Outbox,
    first: u64,
    rate: u32,
    secs: u64,
    writers: usize,
) -> anyhow::Result<Commits> {
    let total = u64::from(rate) * secs;
    let pad: Arc<str> = "x".repeat(ctx.payload_bytes).into();
    let mut connections = Vec::new();
    for _ in 0..writers {
        connections.push(ctx.pool.acquire().await?);
    }
    let started = Instant::now();
    let start = tokio::time::Instant::from_std(started);
    let period = 1.0 / f64::from(rate);
    let mut tasks = tokio::task::JoinSet::new();
    for (writer, mut connection) in (0..writers as u64).zip(connections) {
        let (outbox, pad) = (outbox.clone(), pad.clone());
        tasks.spawn(async move {
            let mut times = Vec::new();
            for n in (writer..total).step_by(writers) {
                tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 * period)).await;
                let i = first + n;
                let event = Event::builder("latency", (i % KEYS).to_string(), "latency.measured")
                    .payload(&serde_json::json!({ "i": i, "pad": &*pad }))
                    .build()?;
                let mut tx = sqlx::Connection::begin(&mut *connection).await?;
                outbox.enqueue(&mut tx, &event).await?;
                tx.commit().await?;
                times.push((i, Instant::now()));
            }
            anyhow::Ok(times)
        });
    }
    let mut times = Vec::with_capacity(total as usize);
    while let Some(result) = tasks.join_next().await {
        times.extend(result.context("a writer panicked")??);
    }
    Ok(Commits {
        times,
        elapsed: started.elapsed(),
    })
}

async fn rabbitmq_consumer(ctx: &Ctx, queue: &str) -> anyhow::Result<Consumer> {
    let connection =
        lapin::Connection::connect(&ctx.amqp_url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "outbox-bench-latency".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let distinct = Arc::new(AtomicUsize::new(0));
    let counter = distinct.clone();
    let task = tokio::spawn(async move {
        let _connection = connection;
        let mut first = HashMap::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                delivery = deliveries.next() => match delivery {
                    Some(delivery) => {
                        let at = Instant::now();
                        let delivery = delivery?;
                        record(&mut first, &counter, &delivery.data, at);
                    }
                    None => anyhow::bail!("the RabbitMQ consumer was cancelled"),
                },
            }
        }
        Ok(first)
    });
    Ok(Consumer {
        stop,
        distinct,
        task,
    })
}

fn kafka_consumer(ctx: &Ctx, topic: &str) -> anyhow::Result<Consumer> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    // Fetch at once: the consumer's fetch wait would otherwise add up to 500 ms.
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", ctx.kafka_brokers.as_str())
        .set("group.id", format!("{topic}-latency"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut partitions = rdkafka::TopicPartitionList::new();
    for partition in 0..KAFKA_PARTITIONS {
        partitions.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let distinct = Arc::new(AtomicUsize::new(0));
    let counter = distinct.clone();
    let task = tokio::spawn(async move {
        let mut first = HashMap::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                message = consumer.recv() => {
                    let at = Instant::now();
                    let message = message.context("reading from Kafka")?;
                    record(&mut first, &counter, message.payload().unwrap_or_default(), at);
                }
            }
        }
        Ok(first)
    });
    Ok(Consumer {
        stop,
        distinct,
        task,
    })
}
