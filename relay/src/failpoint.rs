//! Crash points for tests: `failpoint!("wal.drain.page")` aborts the process
//! (like `kill -9`: nothing is flushed, settled or released) when the
//! environment variable `OUTBOX_RELAY_FAILPOINT` names that point.
//!
//! `OUTBOX_RELAY_FAILPOINT=wal.drain.page` aborts at the first hit,
//! `wal.drain.page:3` at the third. The points exist only when the relay crate
//! is built with the cargo feature `failpoints`; without it the macro expands
//! to nothing, so release builds carry no trace of them. The tests crate turns
//! the feature on (see `tests/src/daemon.rs`); because cargo unifies features,
//! a build of the whole workspace (which includes the tests crate) compiles
//! them into the `outbox-relay` binary too, inert unless the variable is set.
//! Release artifacts are built with `-p outbox-relay` (see the Dockerfile) and
//! carry none.
//!
//! Every point marks a step of a recovery protocol: the state machine in
//! [`crate::source::wal`] says what a crash at a `wal.*` point does; the
//! polling points are described in `source/polling/claims.rs`.

/// The environment variable naming the failpoint to crash at: `name` or `name:N`.
pub const FAILPOINT_ENV: &str = "OUTBOX_RELAY_FAILPOINT";

/// Every failpoint of the relay, for tests to iterate over.
pub const FAILPOINTS: &[&str] = &[
    "wal.leader.acquired",
    "wal.slot.creating",
    "wal.slot.created",
    "wal.drain.page",
    "wal.drain.finished",
    "wal.publish.confirmed",
    "wal.settle.deleted",
    "wal.position.recorded",
    "wal.recovery.dropped",
    "polling.claim",
    "polling.publish.confirmed",
    "polling.lease.handover",
];

/// Abort the process at a named step when the environment asks for it.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}
pub(crate) use failpoint;

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The armed point and the hit that aborts (1-based).
    struct Armed {
        name: String,
        at_hit: u64,
        hits: AtomicU64,
    }

    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let spec = std::env::var(super::FAILPOINT_ENV).ok()?;
                let (name, at_hit) = match spec.rsplit_once(':') {
                    Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                    None => (spec, 1),
                };
                Some(Armed {
                    name,
                    at_hit,
                    hits: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    /// Count a hit of `name`; abort at the armed one.
    pub(crate) fn hit(name: &str) {
        let Some(armed) = armed() else { return };
        if armed.name != name {
            return;
        }
        let hit = armed.hits.fetch_add(1, Ordering::SeqCst) + 1;
        if hit == armed.at_hit {
            eprintln!("failpoint {name} (hit {hit}): aborting the process");
            std::process::abort();
        }
    }
}

#[cfg(feature = "failpoints")]
pub(crate) use armed::hit;
