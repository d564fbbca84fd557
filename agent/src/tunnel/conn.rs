//! One proxied connection's record: written to the access log when it closes.
use std::{net::SocketAddr, time::Instant};

use crate::admin::metrics::{ConnLabels, ConnTracker, Metrics, Reporter, SecurityPolicy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a connection ended, as the access log names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Bytes flowed and both sides closed.
    Closed { sent: u64, received: u64 },
    /// Refused by Ferry before any byte reached the destination.
    Refused(String),
    /// The destination could not be reached.
    Unreachable(String),
    /// Failed after being established.
    Error {
        sent: u64,
        received: u64,
        error: String,
    },
}

/// Who is at each end, as Istio's metrics label it.
#[derive(Clone, Debug, Default)]
pub struct Ends {
    pub src: Option<(String, String)>,
    pub src_principal: Option<String>,
    pub dst: Option<(String, String)>,
    pub dst_principal: Option<String>,
    pub mutual_tls: bool,
}

impl Ends {
    /// `namespace/name` split in two.
    pub fn workload(key: &str) -> Option<(String, String)> {
        key.split_once('/')
            .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
    }
}

pub struct ConnRecord {
    pub direction: Direction,
    /// `namespace/name` of the pod on this node.
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub route: &'static str,
    /// The identity at the other end, when the tunnel verified one.
    pub peer: Option<String>,
    /// The authorization decision, on the side that enforces it.
    pub decision: Option<String>,
    started: Instant,
    tracker: Option<ConnTracker>,
    ends: EndNames,
}

/// What the access log prints of [`Ends`] (source and destination workload as `namespace/name`,
/// source and destination principal), kept in one allocation: a record lives as long as its
/// connection, and four strings of their own, with the options around them, cost each connection
/// about 250 bytes more.
#[derive(Default)]
struct EndNames {
    /// The four names one after the other.
    text: Box<str>,
    /// Where the second, third and fourth name start.
    cuts: [usize; 3],
}

impl EndNames {
    fn new(ends: &Ends) -> Self {
        let mut text = String::new();
        let mut cuts = [0; 3];
        let workload = |text: &mut String, w: &Option<(String, String)>| {
            if let Some((ns, n)) = w {
                text.push_str(ns);
                text.push('/');
                text.push_str(n);
            }
        };
        workload(&mut text, &ends.src);
        cuts[0] = text.len();
        workload(&mut text, &ends.dst);
        cuts[1] = text.len();
        text.push_str(ends.src_principal.as_deref().unwrap_or(""));
        cuts[2] = text.len();
        text.push_str(ends.dst_principal.as_deref().unwrap_or(""));
        EndNames {
            text: text.into_boxed_str(),
            cuts,
        }
    }

    /// Source workload, destination workload, source principal, destination principal.
    fn names(&self) -> [&str; 4] {
        let [a, b, c] = self.cuts;
        [
            &self.text[..a],
            &self.text[a..b],
            &self.text[b..c],
            &self.text[c..],
        ]
    }
}

impl ConnRecord {
    pub fn new(direction: Direction, pod: String, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            direction,
            pod,
            src,
            dst,
            route: "",
            peer: None,
            decision: None,
            tracker: None,
            ends: EndNames::default(),
            started: Instant::now(),
        }
    }

    /// Counts the connection in Istio's TCP metrics from now until it finishes.
    pub fn track(&mut self, metrics: &Metrics, ends: &Ends) {
        let labels = ConnLabels {
            reporter: match self.direction {
                Direction::Outbound => Reporter::Source,
                Direction::Inbound => Reporter::Destination,
            },
            source_workload: ends.src.as_ref().map(|w| w.1.as_str()),
            source_workload_namespace: ends.src.as_ref().map(|w| w.0.as_str()),
            source_principal: ends.src_principal.as_deref(),
            destination_workload: ends.dst.as_ref().map(|w| w.1.as_str()),
            destination_workload_namespace: ends.dst.as_ref().map(|w| w.0.as_str()),
            destination_principal: ends.dst_principal.as_deref(),
            connection_security_policy: if ends.mutual_tls {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::None
            },
        };
        self.tracker = Some(metrics.track_conn(&labels));
        self.ends = EndNames::new(ends);
    }

    /// The live-table form of this connection.
    pub fn live(&self, policy: Option<super::conns::PolicyInput>) -> super::conns::NewConn<'_> {
        super::conns::NewConn {
            direction: self.direction,
            pod: &self.pod,
            src: self.src,
            dst: self.dst,
            route: self.route,
            peer: self.peer.clone(),
            policy,
        }
    }

    pub fn finish(self, outcome: Outcome) {
        let duration_ms = self.started.elapsed().as_millis() as u64;
        if let (
            Some(t),
            Outcome::Closed { sent, received } | Outcome::Error { sent, received, .. },
        ) = (&self.tracker, &outcome)
        {
            // Istio's "sent" is the response direction (destination to source) for both reporters.
            t.add_bytes(*received, *sent);
        }
        let (result, sent, received, reason) = match outcome {
            Outcome::Closed { sent, received } => ("closed", sent, received, String::new()),
            Outcome::Refused(r) => ("refused", 0, 0, r),
            Outcome::Unreachable(r) => ("unreachable", 0, 0, r),
            Outcome::Error {
                sent,
                received,
                error,
            } => ("error", sent, received, error),
        };
        let [src_workload, dst_workload, src_principal, dst_principal] = self.ends.names();
        tracing::info!(
            target: "ferry::access",
            direction = self.direction.as_str(),
            pod = %self.pod,
            src = %self.src,
            dst = %self.dst,
            route = self.route,
            peer_identity = self.peer.as_deref().unwrap_or(""),
            decision = self.decision.as_deref().unwrap_or(""),
            src_workload,
            dst_workload,
            src_principal,
            dst_principal,
            result,
            reason = %reason,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            "connection closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_names_come_back_as_given_also_when_missing() {
        let ends = Ends {
            src: Some(("shop".into(), "client".into())),
            src_principal: None,
            dst: Some(("shop".into(), "server".into())),
            dst_principal: Some("spiffe://cluster.local/ns/shop/sa/cart".into()),
            mutual_tls: true,
        };
        assert_eq!(
            EndNames::new(&ends).names(),
            [
                "shop/client",
                "shop/server",
                "",
                "spiffe://cluster.local/ns/shop/sa/cart"
            ]
        );
        assert_eq!(EndNames::new(&Ends::default()).names(), ["", "", "", ""]);
        assert_eq!(EndNames::default().names(), ["", "", "", ""]);
    }
}
