//! Where events come from: the polling source reads the outbox table.

pub mod lease;
pub mod polling;
pub mod wal;
