//! Operations: Prometheus metrics, health/readiness and the dead-letter console over HTTP.

pub mod console;
pub mod http;
pub mod metrics;
