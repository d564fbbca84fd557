//! Inbound plaintext: a connection from outside the mesh, steered by `sk_lookup` to the agent's socket
//! in the destination pod's netns. Its local address is the one the client dialled.
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{
    PodCtx,
    conn::{ConnRecord, Direction, Outcome},
    deliver,
    outbound::splice,
    reset,
};
use crate::{capture::Capture, config::InboundMode};

pub async fn handle_plaintext(
    capture: &Capture,
    pod: &PodCtx,
    mode: InboundMode,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let dst = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(pod = %pod.name, error = %e, "inbound connection without a local address");
            return;
        }
    };
    let mut rec = ConnRecord::new(Direction::Inbound, pod.name.clone(), peer, dst);
    match mode {
        InboundMode::Strict => {
            rec.route = "plaintext";
            reset(client);
            rec.finish(Outcome::Refused("plaintext inbound in strict mode".into()));
        }
        InboundMode::Permissive => {
            rec.route = "plaintext";
            let mut app = match deliver(capture, &pod.netns, dst).await {
                Ok(s) => s,
                Err(e) => {
                    reset(client);
                    return rec.finish(Outcome::Unreachable(e.to_string()));
                }
            };
            rec.finish(splice(&mut client, &mut app).await);
        }
    }
}
