//! Ferry node agent: eBPF capture, SPIFFE identities, mutual TLS, HBONE tunnel, L4 policy.
//!
//! Module layering (imports only flow downwards in this list):
//! `config`, `netns` → `identity` → `tls` → `capture` → `tunnel` → `agent` → `cli`.
pub mod identity;
pub mod tls;
pub mod tunnel;
