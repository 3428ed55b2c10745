//! The relay daemon on a large backlog: CPU seconds per 100,000 events and peak RSS
//! (VmHWM). Polling drains a backlog written first; the WAL source streams events
//! written while it runs (100 transactions of 10,000), which is its own path.
//! Not part of `bench all` (a 1,000,000-event drain takes minutes on 2 cores).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, Usage};
use crate::fixture::World;
use crate::table::{Report, Section, thousands};
use crate::{Ctx, Sink, Source};

/// How often the daemon's memory and the outbox are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Longest the whole drain may take.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Rows per writer transaction while the WAL relay streams.
const STREAM_TX_ROWS: usize = 10_000;
/// The target.
const TARGET_MIB: f64 = 64.0;

/// Drain `ctx.rss_events` with `source` → `sink` once and add the section to `report`.
pub(crate) async fn run(
    ctx: &Ctx,
    report: &mut Report,
    source: Source,
    sink: Sink,
) -> anyhow::Result<()> {
    let world = World::create(ctx, Some(sink)).await?;
    let result = measure(ctx, &world, source).await;
    world.cleanup(ctx).await;
    let (secs, usage) = result?;
    let events = ctx.rss_events as f64;
    let peak_mib = usage.peak_rss_kib as f64 / 1024.0;
    let mut section = Section::new(
        "6. Relay daemon on a large backlog",
        &[
            "source",
            "sink",
            "events",
            "seconds",
            "events/s",
            "CPU s per 100,000 events",
            "peak RSS (MiB)",
            "target",
            "",
        ],
    );
    section.row(vec![
        source.name().into(),
        sink.name().into(),
        thousands(events),
        format!("{secs:.1}"),
        thousands(events / secs),
        format!("{:.2}", usage.cpu_secs / events * 100_000.0),
        format!("{peak_mib:.1}"),
        "≤ 64 MiB".into(),
        if peak_mib <= TARGET_MIB {
            "met".into()
        } else {
            "**missed**".into()
        },
    ]);
    section.note(match source {
        Source::Polling => format!(
            "`bench rss`: a {}-event backlog over 1,000 keys written first, then the daemon (relay \
             defaults) until the outbox is empty. One run. CPU: the daemon's user + system time \
             from /proc/<pid>/stat; peak RSS: VmHWM from /proc/<pid>/status.",
            thousands(events)
        ),
        Source::Wal => format!(
            "`bench rss --source wal`: the daemon streams from its slot first, then {} events are \
             written in transactions of {}, timed from the first write until the outbox is empty \
             (writes included). One run.",
            thousands(events),
            thousands(STREAM_TX_ROWS as f64)
        ),
    });
    println!(
        "bench: rss: the relay daemon moved {} events in {secs:.1} s; peak RSS {peak_mib:.1} MiB",
        thousands(events)
    );
    report.add(section)
}

async fn measure(ctx: &Ctx, world: &World, source: Source) -> anyhow::Result<(f64, Usage)> {
    if source == Source::Polling {
        world.load_backlog(ctx, 0, ctx.rss_events, 1_000).await?;
    }
    let mut daemon = Daemon::start(&ctx.relay_bin, &world.relay_env(ctx, source))?;
    if source == Source::Wal {
        world.wait_ready(ctx, source, &mut daemon).await?;
    }
    let written = AtomicBool::new(source == Source::Polling);
    let started = Instant::now();
    let writer = async {
        if source == Source::Wal {
            for start in (0..ctx.rss_events).step_by(STREAM_TX_ROWS) {
                let rows = STREAM_TX_ROWS.min(ctx.rss_events - start);
                world.load_backlog(ctx, start, rows, 1_000).await?;
            }
            written.store(true, Ordering::Relaxed);
        }
        anyhow::Ok(())
    };
    let sampler = async {
        let mut last = Usage::default();
        loop {
            let now = daemon.usage();
            if now.peak_rss_kib > 0 {
                last = now;
            }
            if written.load(Ordering::Relaxed) && world.outbox_rows(ctx).await? == 0 {
                return anyhow::Ok((started.elapsed().as_secs_f64(), last));
            }
            if !daemon.running() {
                return Err(daemon.ended_early("during the drain"));
            }
            anyhow::ensure!(
                started.elapsed() < TIMEOUT,
                "not drained within {TIMEOUT:?}"
            );
            tokio::time::sleep(SAMPLE_INTERVAL).await;
        }
    };
    let (wrote, sampled) = tokio::join!(writer, sampler);
    let stopped = daemon.stop().await;
    wrote?;
    let (secs, last) = sampled?;
    let at_stop = stopped?;
    // The usage read just before SIGTERM is the latest; keep the larger peak.
    let usage = Usage {
        cpu_secs: at_stop.cpu_secs.max(last.cpu_secs),
        peak_rss_kib: at_stop.peak_rss_kib.max(last.peak_rss_kib),
    };
    Ok((secs, usage))
}
