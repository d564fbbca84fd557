//! The agent's Prometheus metrics: Istio's standard TCP metrics plus Ferry's own, under `ferry_`.
//!
//! [`Metrics`] owns its [`Registry`] (no process-global registry), so tests and several agents in one
//! process never see each other's series. Callers use typed methods; label vectors are built only here,
//! which keeps label names and orders in one place.
//!
//! # Cardinality
//! Every label value comes from a bounded set: fixed enums, workloads and identities known to this
//! node, or policy names from configuration. Ports, IP addresses and other per-connection values are
//! never labels: each distinct value would create a series that lives until the agent restarts,
//! and a scan of the node's address space would exhaust Prometheus. The test
//! `no_label_is_a_port_or_address` enforces that for every family registered here.
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The value Istio reports for a label whose value is not known.
pub const UNKNOWN: &str = "unknown";

/// Which end of the connection this agent is, in Istio's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The agent on the client's node (outbound).
    Source,
    /// The agent on the server's node (inbound).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn direction(self) -> Direction {
        match self {
            Reporter::Source => Direction::Outbound,
            Reporter::Destination => Direction::Inbound,
        }
    }
}

/// Istio's `connection_security_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// Carried over mutual TLS (HBONE).
    MutualTls,
    /// Plaintext, e.g. to a destination outside the mesh.
    None,
}

impl SecurityPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        }
    }
}

/// The labels of one proxied TCP connection, as Istio names them.
///
/// `None` (or an empty string) is reported as `"unknown"`, as Istio does. Principals are SPIFFE IDs as
/// Istio reports them, e.g. `spiffe://cluster.local/ns/default/sa/web`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLabels<'a> {
    pub reporter: Reporter,
    pub source_workload: Option<&'a str>,
    pub source_workload_namespace: Option<&'a str>,
    pub source_principal: Option<&'a str>,
    pub destination_workload: Option<&'a str>,
    pub destination_workload_namespace: Option<&'a str>,
    pub destination_principal: Option<&'a str>,
    pub connection_security_policy: SecurityPolicy,
}

/// The label names of Istio's TCP metrics, in the order [`ConnLabels::values`] fills them.
const ISTIO_TCP_LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

impl ConnLabels<'_> {
    fn values(&self) -> [&str; 10] {
        fn or_unknown(v: Option<&str>) -> &str {
            match v {
                Some(s) if !s.is_empty() => s,
                _ => UNKNOWN,
            }
        }
        [
            self.reporter.as_str(),
            or_unknown(self.source_workload),
            or_unknown(self.source_workload_namespace),
            or_unknown(self.source_principal),
            or_unknown(self.destination_workload),
            or_unknown(self.destination_workload_namespace),
            or_unknown(self.destination_principal),
            // Ferry proxies L4 only; Istio's ztunnel reports exactly these two for TCP.
            "tcp",
            "-",
            self.connection_security_policy.as_str(),
        ]
    }
}

/// Direction of a connection or handshake relative to this node's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What policy evaluation decided for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Allowed and logged by an audit rule.
    Audit,
    /// A dry-run policy would have allowed; enforcement did not use it.
    DryRunAllow,
    /// A dry-run policy would have denied; enforcement did not use it.
    DryRunDeny,
}

impl Decision {
    pub const ALL: [Decision; 5] = [
        Decision::Allow,
        Decision::Deny,
        Decision::Audit,
        Decision::DryRunAllow,
        Decision::DryRunDeny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Audit => "audit",
            Decision::DryRunAllow => "dry_run_allow",
            Decision::DryRunDeny => "dry_run_deny",
        }
    }
}

/// Which configuration source was reloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigKind {
    Workloads,
    Policies,
    Node,
}

impl ConfigKind {
    pub const ALL: [ConfigKind; 3] = [
        ConfigKind::Workloads,
        ConfigKind::Policies,
        ConfigKind::Node,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConfigKind::Workloads => "workloads",
            ConfigKind::Policies => "policies",
            ConfigKind::Node => "node",
        }
    }
}

/// Why an inbound HBONE connection was refused before any stream was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedReason {
    /// The TLS handshake failed (bad certificate, protocol version, garbage).
    Tls,
    /// The peer did not negotiate the HBONE ALPN.
    Alpn,
    /// The peer's certificate carried no acceptable SPIFFE identity.
    Identity,
    /// The peer did not finish the handshake in time.
    Timeout,
    /// Too many unfinished handshakes (from this peer, or in total): closed before reading anything.
    Overloaded,
    /// The peer finished the handshakes but sent no CONNECT in time.
    RequestTimeout,
}

impl RefusedReason {
    pub const ALL: [RefusedReason; 6] = [
        RefusedReason::Tls,
        RefusedReason::Alpn,
        RefusedReason::Identity,
        RefusedReason::Timeout,
        RefusedReason::Overloaded,
        RefusedReason::RequestTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusedReason::Tls => "tls",
            RefusedReason::Alpn => "alpn",
            RefusedReason::Identity => "identity",
            RefusedReason::Timeout => "timeout",
            RefusedReason::Overloaded => "overloaded",
            RefusedReason::RequestTimeout => "request_timeout",
        }
    }
}

fn result_str(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

/// Reads absolute per-event totals (e.g. from the eBPF counters map) when Prometheus scrapes.
pub type CaptureSource = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// All of the agent's metrics. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    /// Every registered family's descriptor, so tests can check label names of families that have no
    /// series yet.
    descs: Vec<Desc>,

    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,

    policy_decisions: IntCounterVec,
    tls_handshake: HistogramVec,
    cert_expiry: GaugeVec,
    capture_source: Arc<RwLock<Option<CaptureSource>>>,
    config_reloads: IntCounterVec,
    pool_connections: IntGauge,
    pool_streams: IntGauge,
    plaintext_refused: IntCounter,
    hbone_refused: IntCounterVec,
    hbone_pending_handshakes: IntGauge,
    active_connections: IntGaugeVec,
    kube_api_connected: IntGauge,
    kube_api_disconnects: IntCounter,
}

/// Handshakes take around a millisecond on a quiet loopback and seconds when a peer or the CPU is
/// overloaded; the buckets span both, and the handshake timeout.
const TLS_HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let mut descs = Vec::new();
        let mut reg = |c: Box<dyn Collector>| {
            descs.extend(c.desc().into_iter().cloned());
            // Names and labels are constants of this file: a failure is a bug here, which every test
            // constructing `Metrics` would catch; no runtime input reaches this.
            registry
                .register(c)
                .expect("metric definitions are valid and unique");
        };
        fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
        }

        let tcp_opened = counter_vec(
            "istio_tcp_connections_opened_total",
            "Total TCP connections opened.",
            &ISTIO_TCP_LABELS,
        );
        let tcp_closed = counter_vec(
            "istio_tcp_connections_closed_total",
            "Total TCP connections closed.",
            &ISTIO_TCP_LABELS,
        );
        let tcp_sent = counter_vec(
            "istio_tcp_sent_bytes_total",
            "Bytes sent during response (destination to source) of TCP connections.",
            &ISTIO_TCP_LABELS,
        );
        let tcp_received = counter_vec(
            "istio_tcp_received_bytes_total",
            "Bytes received during request (source to destination) of TCP connections.",
            &ISTIO_TCP_LABELS,
        );
        let policy_decisions = counter_vec(
            "ferry_policy_decisions_total",
            "Connection policy decisions, by decision and deciding policy (namespace/name, or none).",
            &["decision", "policy"],
        );
        let tls_handshake = HistogramVec::new(
            HistogramOpts::new(
                "ferry_tls_handshake_seconds",
                "Duration of mutual TLS handshakes of HBONE connections.",
            )
            .buckets(TLS_HANDSHAKE_BUCKETS.to_vec()),
            &["direction", "result"],
        )
        .expect("valid histogram definition");
        let cert_expiry = GaugeVec::new(
            Opts::new(
                "ferry_certificate_expiry_timestamp_seconds",
                "Expiry (notAfter, Unix seconds) of the certificate held for each workload identity.",
            ),
            &["identity"],
        )
        .expect("valid gauge definition");
        let config_reloads = counter_vec(
            "ferry_config_reloads_total",
            "Configuration reloads, by configuration and result.",
            &["config", "result"],
        );
        let pool_connections = IntGauge::new(
            "ferry_pool_connections",
            "Outbound HBONE connections held in the pool.",
        )
        .expect("valid gauge definition");
        let pool_streams = IntGauge::new(
            "ferry_pool_streams",
            "Active HBONE streams on pooled connections.",
        )
        .expect("valid gauge definition");
        let plaintext_refused = IntCounter::new(
            "ferry_inbound_plaintext_refused_total",
            "Inbound plaintext connections to a mesh workload refused by strict mutual TLS.",
        )
        .expect("valid counter definition");
        let hbone_refused = counter_vec(
            "ferry_hbone_refused_total",
            "Inbound HBONE connections refused during the handshake, by reason class.",
            &["reason"],
        );
        let hbone_pending_handshakes = IntGauge::new(
            "ferry_hbone_pending_handshakes",
            "Inbound HBONE connections whose TLS handshake has not finished yet.",
        )
        .expect("valid gauge definition");
        let active_connections = IntGaugeVec::new(
            Opts::new(
                "ferry_active_connections",
                "Proxied connections currently open, by direction.",
            ),
            &["direction"],
        )
        .expect("valid gauge definition");
        let kube_api_connected = IntGauge::new(
            "ferry_kube_api_connected",
            "1 while the Kubernetes pod and namespace watches are connected, 0 while the agent serves \
             the last known state (only with a kubernetes workload source).",
        )
        .expect("valid gauge definition");
        let kube_api_disconnects = IntCounter::new(
            "ferry_kube_api_disconnects_total",
            "Times the Kubernetes API connection was lost.",
        )
        .expect("valid counter definition");
        let capture_source = Arc::new(RwLock::new(None));
        let capture = CaptureCollector::new(capture_source.clone());

        reg(Box::new(tcp_opened.clone()));
        reg(Box::new(tcp_closed.clone()));
        reg(Box::new(tcp_sent.clone()));
        reg(Box::new(tcp_received.clone()));
        reg(Box::new(policy_decisions.clone()));
        reg(Box::new(tls_handshake.clone()));
        reg(Box::new(cert_expiry.clone()));
        reg(Box::new(capture));
        reg(Box::new(config_reloads.clone()));
        reg(Box::new(pool_connections.clone()));
        reg(Box::new(pool_streams.clone()));
        reg(Box::new(plaintext_refused.clone()));
        reg(Box::new(hbone_refused.clone()));
        reg(Box::new(hbone_pending_handshakes.clone()));
        reg(Box::new(active_connections.clone()));
        reg(Box::new(kube_api_connected.clone()));
        reg(Box::new(kube_api_disconnects.clone()));

        // Series of fixed label sets exist from the start at zero, so `rate()` and absence alerts work
        // from the first scrape instead of from the first event.
        for d in Direction::ALL {
            active_connections.with_label_values(&[d.as_str()]);
            for ok in [true, false] {
                tls_handshake.with_label_values(&[d.as_str(), result_str(ok)]);
            }
        }
        for c in ConfigKind::ALL {
            for ok in [true, false] {
                config_reloads.with_label_values(&[c.as_str(), result_str(ok)]);
            }
        }
        for r in RefusedReason::ALL {
            hbone_refused.with_label_values(&[r.as_str()]);
        }

        Metrics {
            registry,
            descs,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            policy_decisions,
            tls_handshake,
            cert_expiry,
            capture_source,
            config_reloads,
            pool_connections,
            pool_streams,
            plaintext_refused,
            hbone_refused,
            hbone_pending_handshakes,
            active_connections,
            kube_api_connected,
            kube_api_disconnects,
        }
    }

    /// Records the Kubernetes API connection going up or down (a loss counts once).
    pub fn kube_api(&self, connected: bool) {
        let was = self.kube_api_connected.get() == 1;
        self.kube_api_connected.set(i64::from(connected));
        if was && !connected {
            self.kube_api_disconnects.inc();
        }
    }

    /// Counts a connection as opened (Istio's opened counter and Ferry's active gauge).
    pub fn conn_opened(&self, labels: &ConnLabels) {
        self.tcp_opened.with_label_values(&labels.values()).inc();
        self.active(labels.reporter).inc();
    }

    /// Counts a connection as closed. Call exactly once per [`Metrics::conn_opened`], with the same
    /// labels, or the active gauge drifts; [`Metrics::track_conn`] does that pairing itself.
    pub fn conn_closed(&self, labels: &ConnLabels) {
        self.tcp_closed.with_label_values(&labels.values()).inc();
        self.active(labels.reporter).dec();
    }

    /// Adds bytes that flowed since the last call. Istio counts bytes as they flow, so call this
    /// periodically on long connections as well as at close.
    ///
    /// As in Istio, for both reporters `sent` is the response direction (destination to source) and
    /// `received` the request direction (source to destination).
    pub fn add_bytes(&self, labels: &ConnLabels, sent: u64, received: u64) {
        let values = labels.values();
        if sent > 0 {
            self.tcp_sent.with_label_values(&values).inc_by(sent);
        }
        if received > 0 {
            self.tcp_received
                .with_label_values(&values)
                .inc_by(received);
        }
    }

    /// Counts a connection as opened and returns a handle that adds its bytes without label lookups
    /// and counts it closed when dropped, so no error path can forget the close.
    pub fn track_conn(&self, labels: &ConnLabels) -> ConnTracker {
        let values = labels.values();
        self.conn_opened(labels);
        ConnTracker {
            sent: self.tcp_sent.with_label_values(&values),
            received: self.tcp_received.with_label_values(&values),
            closed: self.tcp_closed.with_label_values(&values),
            active: self.active(labels.reporter),
        }
    }

    fn active(&self, reporter: Reporter) -> IntGauge {
        self.active_connections
            .with_label_values(&[reporter.direction().as_str()])
    }

    /// Counts one policy decision; `policy` is the deciding policy as `namespace/name`, `None` when no
    /// policy applied (the default action).
    pub fn policy_decision(&self, decision: Decision, policy: Option<&str>) {
        let policy = match policy {
            Some(p) if !p.is_empty() => p,
            _ => "none",
        };
        self.policy_decisions
            .with_label_values(&[decision.as_str(), policy])
            .inc();
    }

    /// Drops a deleted policy's series, so removed policies do not accumulate for the agent's life.
    pub fn forget_policy(&self, policy: &str) {
        for d in Decision::ALL {
            // Absent series are not an error worth reporting: the policy may never have decided.
            let _ = self
                .policy_decisions
                .remove_label_values(&[d.as_str(), policy]);
        }
    }

    /// Records a finished TLS handshake of an HBONE connection.
    pub fn tls_handshake(&self, direction: Direction, ok: bool, duration: Duration) {
        self.tls_handshake
            .with_label_values(&[direction.as_str(), result_str(ok)])
            .observe(duration.as_secs_f64());
    }

    /// Sets the expiry (notAfter, Unix seconds) of the certificate held for `identity` (a SPIFFE ID).
    pub fn set_certificate_expiry(&self, identity: &str, not_after_unix: i64) {
        self.cert_expiry
            .with_label_values(&[identity])
            .set(not_after_unix as f64);
    }

    /// Removes an identity's expiry series once the node no longer holds its certificate, so an alert on
    /// "expires soon" does not fire for a workload that left.
    pub fn remove_certificate(&self, identity: &str) {
        // Removing an identity never set is harmless.
        let _ = self.cert_expiry.remove_label_values(&[identity]);
    }

    /// Installs the reader of capture event totals (`ferry_capture_events_total{event}`). It runs at
    /// every scrape and must return absolute, monotonically growing totals per event name from a fixed
    /// set of names (the kernel's counters); it must be quick, as the scrape waits for it.
    pub fn set_capture_source(&self, source: CaptureSource) {
        let mut slot = self
            .capture_source
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(source);
    }

    /// Counts one configuration reload attempt.
    pub fn config_reload(&self, config: ConfigKind, ok: bool) {
        self.config_reloads
            .with_label_values(&[config.as_str(), result_str(ok)])
            .inc();
    }

    /// Sets the pool's current number of connections and of active streams.
    pub fn set_pool(&self, connections: u64, streams: u64) {
        self.pool_connections.set(clamp_i64(connections));
        self.pool_streams.set(clamp_i64(streams));
    }

    /// Counts one inbound plaintext connection refused because the workload requires mutual TLS.
    pub fn inbound_plaintext_refused(&self) {
        self.plaintext_refused.inc();
    }

    /// Counts one inbound HBONE connection refused during its handshake.
    pub fn hbone_refused(&self, reason: RefusedReason) {
        self.hbone_refused
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Sets the number of inbound TLS handshakes under way.
    pub fn set_pending_handshakes(&self, n: u32) {
        self.hbone_pending_handshakes.set(i64::from(n));
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Only a malformed family fails, which the typed API cannot build; a scrape still gets the
        // families encoded before it rather than nothing.
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Every family's name and label names (constant and variable), including families with no series.
    pub fn label_names(&self) -> Vec<(String, Vec<String>)> {
        self.descs
            .iter()
            .map(|d| {
                let mut labels: Vec<String> = d
                    .const_label_pairs
                    .iter()
                    .map(|p| p.name().to_string())
                    .collect();
                labels.extend(d.variable_labels.iter().cloned());
                (d.fq_name.clone(), labels)
            })
            .collect()
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One open connection's Istio counters, resolved once. Dropping it counts the connection closed.
pub struct ConnTracker {
    sent: IntCounter,
    received: IntCounter,
    closed: IntCounter,
    active: IntGauge,
}

impl ConnTracker {
    /// Adds bytes that flowed since the last call; see [`Metrics::add_bytes`] for the directions.
    pub fn add_bytes(&self, sent: u64, received: u64) {
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }
}

impl Drop for ConnTracker {
    fn drop(&mut self) {
        self.closed.inc();
        self.active.dec();
    }
}

/// `ferry_capture_events_total`: a counter family whose values are read from the source at scrape time.
/// prometheus 0.14 counters only grow by increments, and copying kernel totals into them would need a
/// reset-then-add that a concurrent scrape could observe as a counter reset.
struct CaptureCollector {
    desc: Desc,
    source: Arc<RwLock<Option<CaptureSource>>>,
}

const CAPTURE_EVENTS: &str = "ferry_capture_events_total";
const CAPTURE_HELP: &str = "Capture events counted by the eBPF programs, by event.";

impl CaptureCollector {
    fn new(source: Arc<RwLock<Option<CaptureSource>>>) -> Self {
        let desc = Desc::new(
            CAPTURE_EVENTS.to_string(),
            CAPTURE_HELP.to_string(),
            vec!["event".to_string()],
            Default::default(),
        )
        .expect("valid capture descriptor");
        CaptureCollector { desc, source }
    }
}

impl Collector for CaptureCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let slot = self
            .source
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(source) = slot.as_ref() else {
            return Vec::new();
        };
        // A BTreeMap merges duplicate names (one series per label set is required) and sorts the output.
        let mut totals = BTreeMap::new();
        for (event, total) in source() {
            *totals.entry(event).or_insert(0u64) += total;
        }
        if totals.is_empty() {
            return Vec::new();
        }
        let metrics = totals
            .into_iter()
            .map(|(event, total)| {
                let mut label = proto::LabelPair::default();
                label.set_name("event".to_string());
                label.set_value(event);
                let mut counter = proto::Counter::default();
                counter.set_value(total as f64);
                let mut m = proto::Metric::from_label(vec![label]);
                m.set_counter(counter);
                m
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(CAPTURE_EVENTS.to_string());
        family.set_help(CAPTURE_HELP.to_string());
        family.set_field_type(MetricType::COUNTER);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// One sample line of the text exposition format.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses the exposition text strictly: a line that is not a comment and not a well-formed sample
    /// fails the test, so encoding bugs cannot hide behind substring matches.
    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line has a type");
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            samples.push(parse_sample(line));
        }
        (samples, types)
    }

    fn parse_sample(line: &str) -> Sample {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = line[..name_end].to_string();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            loop {
                let (start, c) = chars.next().unwrap_or_else(|| panic!("unclosed: {line}"));
                if c == '}' {
                    rest = &body[start + 1..];
                    break;
                }
                if c == ',' {
                    continue;
                }
                let eq = body[start..]
                    .find("=\"")
                    .unwrap_or_else(|| panic!("label without value: {line}"));
                let key = body[start..start + eq].to_string();
                for _ in 0..eq + 1 {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            other => panic!("bad escape {other:?} in {line}"),
                        },
                        Some(c) => value.push(c),
                        None => panic!("unterminated value: {line}"),
                    }
                }
                assert!(
                    labels.insert(key, value).is_none(),
                    "duplicate label: {line}"
                );
            }
        }
        let value_text = rest.trim();
        let value = value_text
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value {value_text:?} in {line:?}"));
        Sample {
            name,
            labels,
            value,
        }
    }

    /// The value of the one sample with exactly this name and label set.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(found.len() <= 1, "duplicate series {name} {labels:?}");
        found.first().map(|s| s.value)
    }

    fn series_count(samples: &[Sample], name: &str) -> usize {
        samples.iter().filter(|s| s.name == name).count()
    }

    fn client_labels() -> ConnLabels<'static> {
        ConnLabels {
            reporter: Reporter::Source,
            source_workload: Some("web"),
            source_workload_namespace: Some("shop"),
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/web"),
            destination_workload: Some("db"),
            destination_workload_namespace: Some("data"),
            destination_principal: Some("spiffe://cluster.local/ns/data/sa/db"),
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    fn client_series() -> Vec<(&'static str, &'static str)> {
        vec![
            ("reporter", "source"),
            ("source_workload", "web"),
            ("source_workload_namespace", "shop"),
            ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
            ("destination_workload", "db"),
            ("destination_workload_namespace", "data"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/data/sa/db",
            ),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]
    }

    fn unknown_server_labels() -> ConnLabels<'static> {
        ConnLabels {
            reporter: Reporter::Destination,
            source_workload: None,
            source_workload_namespace: Some(""),
            source_principal: None,
            destination_workload: Some("db"),
            destination_workload_namespace: Some("data"),
            destination_principal: None,
            connection_security_policy: SecurityPolicy::None,
        }
    }

    fn unknown_server_series() -> Vec<(&'static str, &'static str)> {
        vec![
            ("reporter", "destination"),
            ("source_workload", "unknown"),
            ("source_workload_namespace", "unknown"),
            ("source_principal", "unknown"),
            ("destination_workload", "db"),
            ("destination_workload_namespace", "data"),
            ("destination_principal", "unknown"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "none"),
        ]
    }

    #[test]
    fn istio_tcp_series_carry_istio_labels_and_values() {
        let m = Metrics::new();
        let client = client_labels();
        let server = unknown_server_labels();
        m.conn_opened(&client);
        m.conn_opened(&client);
        m.conn_opened(&server);
        m.add_bytes(&client, 100, 40);
        m.add_bytes(&client, 5, 0);
        m.add_bytes(&server, 0, 7);
        m.conn_closed(&client);

        let (s, types) = parse(&m.encode());
        let c = client_series();
        let u = unknown_server_series();
        assert_eq!(
            value(&s, "istio_tcp_connections_opened_total", &c),
            Some(2.0)
        );
        assert_eq!(
            value(&s, "istio_tcp_connections_closed_total", &c),
            Some(1.0)
        );
        assert_eq!(value(&s, "istio_tcp_sent_bytes_total", &c), Some(105.0));
        assert_eq!(value(&s, "istio_tcp_received_bytes_total", &c), Some(40.0));
        assert_eq!(
            value(&s, "istio_tcp_connections_opened_total", &u),
            Some(1.0)
        );
        assert_eq!(value(&s, "istio_tcp_connections_closed_total", &u), None);
        assert_eq!(value(&s, "istio_tcp_received_bytes_total", &u), Some(7.0));
        // Zero increments create no series.
        assert_eq!(value(&s, "istio_tcp_sent_bytes_total", &u), None);
        assert_eq!(series_count(&s, "istio_tcp_connections_opened_total"), 2);
        for name in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            assert_eq!(
                types.get(name).map(String::as_str),
                Some("counter"),
                "{name}"
            );
        }
        let active = |d| value(&s, "ferry_active_connections", &[("direction", d)]);
        assert_eq!(active("outbound"), Some(1.0));
        assert_eq!(active("inbound"), Some(1.0));
        assert_eq!(types["ferry_active_connections"], "gauge");
    }

    #[test]
    fn tracker_adds_bytes_and_closes_on_drop() {
        let m = Metrics::new();
        let tracker = m.track_conn(&client_labels());
        tracker.add_bytes(10, 20);
        tracker.add_bytes(1, 2);
        let (s, _) = parse(&m.encode());
        let c = client_series();
        assert_eq!(
            value(&s, "istio_tcp_connections_opened_total", &c),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "istio_tcp_connections_closed_total", &c),
            Some(0.0)
        );
        assert_eq!(
            value(&s, "ferry_active_connections", &[("direction", "outbound")]),
            Some(1.0)
        );

        drop(tracker);
        let (s, _) = parse(&m.encode());
        assert_eq!(
            value(&s, "istio_tcp_connections_closed_total", &c),
            Some(1.0)
        );
        assert_eq!(value(&s, "istio_tcp_sent_bytes_total", &c), Some(11.0));
        assert_eq!(value(&s, "istio_tcp_received_bytes_total", &c), Some(22.0));
        assert_eq!(
            value(&s, "ferry_active_connections", &[("direction", "outbound")]),
            Some(0.0)
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        let mut labels = client_labels();
        labels.source_workload = Some("we\"ird\\na\nme");
        m.conn_opened(&labels);
        let (s, _) = parse(&m.encode());
        let mut want = client_series();
        want[1] = ("source_workload", "we\"ird\\na\nme");
        assert_eq!(
            value(&s, "istio_tcp_connections_opened_total", &want),
            Some(1.0)
        );
    }

    #[test]
    fn policy_decisions_by_decision_and_policy() {
        let m = Metrics::new();
        m.policy_decision(Decision::Allow, Some("shop/allow-web"));
        m.policy_decision(Decision::Allow, Some("shop/allow-web"));
        m.policy_decision(Decision::Deny, None);
        m.policy_decision(Decision::DryRunDeny, Some("shop/lockdown"));
        m.policy_decision(Decision::Audit, Some(""));
        let (s, types) = parse(&m.encode());
        let d = |decision, policy| {
            value(
                &s,
                "ferry_policy_decisions_total",
                &[("decision", decision), ("policy", policy)],
            )
        };
        assert_eq!(d("allow", "shop/allow-web"), Some(2.0));
        assert_eq!(d("deny", "none"), Some(1.0));
        assert_eq!(d("dry_run_deny", "shop/lockdown"), Some(1.0));
        assert_eq!(d("audit", "none"), Some(1.0));
        assert_eq!(series_count(&s, "ferry_policy_decisions_total"), 4);
        assert_eq!(types["ferry_policy_decisions_total"], "counter");

        m.forget_policy("shop/allow-web");
        let (s, _) = parse(&m.encode());
        assert_eq!(series_count(&s, "ferry_policy_decisions_total"), 3);
        assert_eq!(
            value(
                &s,
                "ferry_policy_decisions_total",
                &[("decision", "allow"), ("policy", "shop/allow-web")]
            ),
            None
        );
    }

    #[test]
    fn tls_handshake_histogram() {
        let m = Metrics::new();
        m.tls_handshake(Direction::Inbound, true, Duration::from_millis(3));
        m.tls_handshake(Direction::Inbound, true, Duration::from_millis(30));
        m.tls_handshake(Direction::Outbound, false, Duration::from_secs(2));
        let (s, types) = parse(&m.encode());
        assert_eq!(types["ferry_tls_handshake_seconds"], "histogram");
        let h = |suffix: &str, dir, result, le: Option<&str>| {
            let mut labels = vec![("direction", dir), ("result", result)];
            if let Some(le) = le {
                labels.push(("le", le));
            }
            value(&s, &format!("ferry_tls_handshake_seconds{suffix}"), &labels)
        };
        assert_eq!(h("_count", "inbound", "ok", None), Some(2.0));
        let sum = h("_sum", "inbound", "ok", None).expect("sum");
        assert!((sum - 0.033).abs() < 1e-9, "{sum}");
        assert_eq!(h("_bucket", "inbound", "ok", Some("0.0025")), Some(0.0));
        assert_eq!(h("_bucket", "inbound", "ok", Some("0.005")), Some(1.0));
        assert_eq!(h("_bucket", "inbound", "ok", Some("0.05")), Some(2.0));
        assert_eq!(h("_bucket", "inbound", "ok", Some("+Inf")), Some(2.0));
        assert_eq!(h("_count", "outbound", "error", None), Some(1.0));
        assert_eq!(h("_bucket", "outbound", "error", Some("1")), Some(0.0));
        assert_eq!(h("_bucket", "outbound", "error", Some("2.5")), Some(1.0));
        // Pre-created, still zero.
        assert_eq!(h("_count", "outbound", "ok", None), Some(0.0));
        assert_eq!(h("_count", "inbound", "error", None), Some(0.0));
    }

    #[test]
    fn certificate_expiry_set_and_removed() {
        let m = Metrics::new();
        let a = "spiffe://cluster.local/ns/shop/sa/web";
        let b = "spiffe://cluster.local/ns/data/sa/db";
        m.set_certificate_expiry(a, 1_700_000_000);
        m.set_certificate_expiry(a, 1_700_086_400);
        m.set_certificate_expiry(b, 1_800_000_000);
        let name = "ferry_certificate_expiry_timestamp_seconds";
        let (s, types) = parse(&m.encode());
        assert_eq!(types[name], "gauge");
        assert_eq!(value(&s, name, &[("identity", a)]), Some(1_700_086_400.0));
        assert_eq!(value(&s, name, &[("identity", b)]), Some(1_800_000_000.0));

        m.remove_certificate(a);
        m.remove_certificate("spiffe://cluster.local/ns/never/sa/set");
        let (s, _) = parse(&m.encode());
        assert_eq!(value(&s, name, &[("identity", a)]), None);
        assert_eq!(value(&s, name, &[("identity", b)]), Some(1_800_000_000.0));
        assert_eq!(series_count(&s, name), 1);
    }

    #[test]
    fn capture_events_read_at_scrape_time() {
        let m = Metrics::new();
        let name = "ferry_capture_events_total";
        let (s, _) = parse(&m.encode());
        assert_eq!(series_count(&s, name), 0, "no source, no family");

        let redirected = Arc::new(AtomicU64::new(5));
        let r = redirected.clone();
        m.set_capture_source(Box::new(move || {
            vec![
                ("redirected".to_string(), r.load(Ordering::Relaxed)),
                ("passed".to_string(), 9),
            ]
        }));
        let (s, types) = parse(&m.encode());
        assert_eq!(types[name], "counter");
        assert_eq!(value(&s, name, &[("event", "redirected")]), Some(5.0));
        assert_eq!(value(&s, name, &[("event", "passed")]), Some(9.0));

        // Absolute totals: the next scrape shows the kernel's new total, not a sum of readings.
        redirected.store(12, Ordering::Relaxed);
        let (s, _) = parse(&m.encode());
        assert_eq!(value(&s, name, &[("event", "redirected")]), Some(12.0));
        assert_eq!(series_count(&s, name), 2);
    }

    #[test]
    fn capture_source_duplicate_names_merge() {
        let m = Metrics::new();
        m.set_capture_source(Box::new(|| {
            vec![("drop".to_string(), 2), ("drop".to_string(), 3)]
        }));
        let (s, _) = parse(&m.encode());
        assert_eq!(
            value(&s, "ferry_capture_events_total", &[("event", "drop")]),
            Some(5.0)
        );
        assert_eq!(series_count(&s, "ferry_capture_events_total"), 1);
    }

    #[test]
    fn reloads_pool_refusals() {
        let m = Metrics::new();
        m.config_reload(ConfigKind::Policies, true);
        m.config_reload(ConfigKind::Policies, true);
        m.config_reload(ConfigKind::Workloads, false);
        m.set_pool(3, 17);
        m.set_pool(2, 11);
        m.inbound_plaintext_refused();
        m.inbound_plaintext_refused();
        m.inbound_plaintext_refused();
        m.hbone_refused(RefusedReason::Alpn);
        m.hbone_refused(RefusedReason::Timeout);
        m.hbone_refused(RefusedReason::Timeout);
        m.hbone_refused(RefusedReason::Overloaded);
        m.set_pending_handshakes(7);

        let (s, types) = parse(&m.encode());
        let reload = |config, result| {
            value(
                &s,
                "ferry_config_reloads_total",
                &[("config", config), ("result", result)],
            )
        };
        assert_eq!(reload("policies", "ok"), Some(2.0));
        assert_eq!(reload("workloads", "error"), Some(1.0));
        assert_eq!(reload("node", "ok"), Some(0.0));
        assert_eq!(series_count(&s, "ferry_config_reloads_total"), 6);
        assert_eq!(value(&s, "ferry_pool_connections", &[]), Some(2.0));
        assert_eq!(value(&s, "ferry_pool_streams", &[]), Some(11.0));
        assert_eq!(types["ferry_pool_connections"], "gauge");
        assert_eq!(types["ferry_pool_streams"], "gauge");
        assert_eq!(
            value(&s, "ferry_inbound_plaintext_refused_total", &[]),
            Some(3.0)
        );
        assert_eq!(types["ferry_inbound_plaintext_refused_total"], "counter");
        let refused = |r| value(&s, "ferry_hbone_refused_total", &[("reason", r)]);
        assert_eq!(refused("alpn"), Some(1.0));
        assert_eq!(refused("timeout"), Some(2.0));
        assert_eq!(refused("tls"), Some(0.0));
        assert_eq!(refused("identity"), Some(0.0));
        assert_eq!(refused("overloaded"), Some(1.0));
        assert_eq!(refused("request_timeout"), Some(0.0));
        assert_eq!(series_count(&s, "ferry_hbone_refused_total"), 6);
        assert_eq!(value(&s, "ferry_hbone_pending_handshakes", &[]), Some(7.0));
        assert_eq!(types["ferry_hbone_pending_handshakes"], "gauge");
    }

    /// Whether a label name denotes a per-connection network value.
    fn is_network_label(name: &str) -> bool {
        const FORBIDDEN: &[&str] = &[
            "ip",
            "ips",
            "ipv4",
            "ipv6",
            "port",
            "ports",
            "sport",
            "dport",
            "addr",
            "address",
            "addresses",
            "saddr",
            "daddr",
            "cidr",
            "endpoint",
            "socket",
        ];
        name.to_ascii_lowercase()
            .split(['_', '-', '.'])
            .any(|token| FORBIDDEN.contains(&token))
    }

    #[test]
    fn no_label_is_a_port_or_address() {
        // The checker itself must catch the obvious offenders, and not Istio's `reporter`/`principal`.
        for bad in [
            "destination_port",
            "source_ip",
            "peer_address",
            "dst_addr",
            "Port",
        ] {
            assert!(is_network_label(bad), "{bad}");
        }
        for fine in ["reporter", "source_principal", "description", "policy"] {
            assert!(!is_network_label(fine), "{fine}");
        }

        let m = Metrics::new();
        let families = m.label_names();
        let names: Vec<&str> = families.iter().map(|(n, _)| n.as_str()).collect();
        for expected in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
            "ferry_policy_decisions_total",
            "ferry_tls_handshake_seconds",
            "ferry_certificate_expiry_timestamp_seconds",
            "ferry_capture_events_total",
            "ferry_config_reloads_total",
            "ferry_pool_connections",
            "ferry_pool_streams",
            "ferry_inbound_plaintext_refused_total",
            "ferry_hbone_refused_total",
            "ferry_hbone_pending_handshakes",
            "ferry_active_connections",
            "ferry_kube_api_connected",
            "ferry_kube_api_disconnects_total",
        ] {
            assert!(names.contains(&expected), "{expected} not registered");
        }
        assert_eq!(families.len(), 17);
        for (family, labels) in &families {
            for label in labels {
                assert!(
                    !is_network_label(label),
                    "{family} has network label {label}"
                );
            }
        }
        let istio = families
            .iter()
            .find(|(n, _)| n == "istio_tcp_sent_bytes_total")
            .map(|(_, l)| l.clone());
        assert_eq!(
            istio,
            Some(ISTIO_TCP_LABELS.iter().map(|l| l.to_string()).collect())
        );
    }

    #[test]
    fn every_line_of_a_full_scrape_parses() {
        let m = Metrics::new();
        m.conn_opened(&client_labels());
        m.set_capture_source(Box::new(|| vec![("x".to_string(), 1)]));
        m.set_certificate_expiry("spiffe://a/ns/b/sa/c", 1);
        let text = m.encode();
        let (s, types) = parse(&text);
        // Each sample belongs to a declared family (histogram samples by their base name).
        for sample in &s {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| sample.name.strip_suffix(suffix))
                .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
                .unwrap_or(&sample.name);
            assert!(types.contains_key(base), "undeclared {}", sample.name);
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_lost_api_connection_counts_once_per_loss() {
        let m = Metrics::new();
        let value = |name: &str| {
            m.encode()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
                .unwrap_or_default()
        };
        m.kube_api(false);
        assert_eq!(
            value("ferry_kube_api_disconnects_total"),
            "0",
            "never connected"
        );
        m.kube_api(true);
        assert_eq!(value("ferry_kube_api_connected"), "1");
        m.kube_api(false);
        m.kube_api(false);
        assert_eq!(value("ferry_kube_api_connected"), "0");
        assert_eq!(value("ferry_kube_api_disconnects_total"), "1");
    }
}
