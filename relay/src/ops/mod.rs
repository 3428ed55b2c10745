//! Operations: Prometheus metrics and health/readiness over HTTP.

pub mod http;
pub mod metrics;
