//! Ferry node agent: eBPF capture, SPIFFE identities, mutual TLS, HBONE tunnel, L4 policy.
//!
//! Module layering (imports only flow downwards in this list):
//! `heap` (the allocator), `identity`, `netns`, `admin` (metrics and admin protocol, no other Ferry
//! imports), `handoff` (passing listeners to a successor agent, no other Ferry imports) → `config` →
//! `policy`, `tls` → `capture` → `tunnel` → `kube` (the Kubernetes workload source, CNI requests;
//! uses only `admin` and `config`) → `daemon` → `cli`.
pub mod admin;
pub mod capture;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod handoff;
pub mod heap;
pub mod identity;
#[cfg(feature = "kubernetes")]
pub mod kube;
pub mod netns;
pub mod policy;
pub mod tls;
pub mod tunnel;
