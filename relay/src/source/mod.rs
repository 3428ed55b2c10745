//! Where events come from: the polling source reads the outbox table, the WAL
//! source tails a logical replication slot.

pub mod leader;
pub mod lease;
pub mod polling;
pub(crate) mod row;
pub mod wal;
pub mod wal_rows;
