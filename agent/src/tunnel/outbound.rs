//! Outbound: a pod's captured connect, accepted on the agent's listener inside the pod's netns.
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{
    PodCtx,
    conn::{ConnRecord, Direction, Outcome},
    connect_in, reset,
};
use crate::config::OutboundUnknown;

pub async fn handle(
    pod: &PodCtx,
    policy: OutboundUnknown,
    mut app: TcpStream,
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
) {
    let Some(dst) = orig_dst else {
        // Fail closed: without its destination the connection cannot go anywhere correct.
        let rec = ConnRecord::new(Direction::Outbound, pod.name.clone(), peer, peer);
        reset(app);
        rec.finish(Outcome::Refused("original destination not found".into()));
        return;
    };
    let mut rec = ConnRecord::new(Direction::Outbound, pod.name.clone(), peer, dst);
    match policy {
        OutboundUnknown::Refuse => {
            rec.route = "refused";
            reset(app);
            rec.finish(Outcome::Refused("destination outside the mesh".into()));
        }
        OutboundUnknown::Passthrough => {
            rec.route = "passthrough";
            let mut upstream = match connect_in(&pod.netns, dst).await {
                Ok(s) => s,
                Err(e) => {
                    reset(app);
                    return rec.finish(Outcome::Unreachable(e.to_string()));
                }
            };
            rec.finish(splice(&mut app, &mut upstream).await);
        }
    }
}

/// Copies both ways with half-close carried through, and reports the byte counts.
pub async fn splice(app: &mut TcpStream, upstream: &mut TcpStream) -> Outcome {
    let _ = app.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(app, upstream).await {
        Ok((sent, received)) => Outcome::Closed { sent, received },
        Err(e) => Outcome::Error {
            sent: 0,
            received: 0,
            error: e.to_string(),
        },
    }
}
