//! Operations: Prometheus metrics and health/readiness over HTTP, and the progress log line.

pub mod histogram;
pub mod http;
pub mod metrics;
pub(crate) mod progress;
