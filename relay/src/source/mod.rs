//! Where events come from: the polling source reads the outbox table.

pub mod leader;
pub mod lease;
pub mod polling;
pub mod wal;
pub mod wal_rows;
