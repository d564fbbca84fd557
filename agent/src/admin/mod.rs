//! The agent's admin surface: Prometheus metrics and a tiny HTTP server for `/metrics`, `/healthz` and
//! `/readyz`. It imports nothing else of Ferry, so every other module can record metrics.
pub mod http;
pub mod metrics;

pub use http::{AdminState, DEFAULT_ADDR, serve};
pub use metrics::Metrics;
