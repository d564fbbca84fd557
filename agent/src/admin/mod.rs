//! The agent's admin surface: Prometheus metrics, a tiny HTTP server for `/metrics`, `/healthz` and
//! `/readyz`, and the Unix socket the `ferry` CLI talks to. It imports nothing else of Ferry but
//! identity-free types, so every other module can record metrics.
pub mod api;
pub mod http;
pub mod metrics;
pub mod socket;

pub use http::{AdminState, DEFAULT_ADDR, serve};
pub use metrics::Metrics;
