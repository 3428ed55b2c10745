//! Operations: Prometheus metrics, health/readiness and the dead-letter console over
//! HTTP, and the progress log line.

pub mod console;
pub mod histogram;
pub mod http;
pub mod metrics;
pub(crate) mod progress;
