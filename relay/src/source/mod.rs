//! Where events come from: the polling source claims rows of the outbox table
//! (`polling/`), the WAL source tails a logical replication slot (`wal/`).

pub mod polling;
pub(crate) mod row;
pub mod wal;
