//! The handoff conversation's transport: a Unix `SOCK_SEQPACKET` socket, one JSON message per packet,
//! descriptors riding on the packet they belong to as `SCM_RIGHTS`.
//!
//! `SOCK_SEQPACKET` rather than a stream: every message arrives whole, with its descriptors, so no
//! framing is needed and descriptors can never be attributed to the wrong message.
use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

use super::{HandoffError, ListenerKind, Node};

/// Bumped when the conversation changes incompatibly; both sides must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message: a pod key and its listeners' kinds are far smaller.
const MAX_MESSAGE: usize = 64 * 1024;

/// More descriptors than any pod has (two families × three kinds): a message carrying more is refused.
const MAX_FDS: usize = 16;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Successor → predecessor: asks for the listeners of its node.
    Hello { version: u32, node: Node },
    /// Predecessor → successor: one pod's listeners; the descriptors ride on this packet, in the
    /// order of `listeners`.
    Pod {
        key: String,
        netns_cookie: u64,
        listeners: Vec<ListenerKind>,
    },
    /// Predecessor → successor: every pod was sent.
    Done { pods: usize },
    /// Successor → predecessor: the successor accepts on the listeners now; the predecessor stops.
    Taken { pods: usize },
    /// Either side: the handoff is off; the predecessor keeps serving.
    Refused { reason: String },
}

/// One end of a handoff conversation (blocking, with timeouts on both directions).
pub struct Conn {
    fd: OwnedFd,
}

fn seqpacket() -> Result<OwnedFd, nix::Error> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

impl Conn {
    /// Connects to a predecessor's handoff socket. `Ok(None)`: nobody answers there (no file, or a
    /// file left by an agent that died), so there is no predecessor.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Option<Self>, HandoffError> {
        let addr = UnixAddr::new(path).map_err(|e| HandoffError::io(path, "naming", e))?;
        let fd = seqpacket().map_err(|e| HandoffError::io(path, "creating a socket for", e))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
            Err(e) => return Err(HandoffError::io(path, "connecting to", e)),
        }
        let conn = Self { fd };
        conn.set_timeout(timeout)
            .map_err(|e| HandoffError::io(path, "setting timeouts on", e))?;
        Ok(Some(conn))
    }

    /// Wraps an accepted connection.
    pub fn accepted(fd: OwnedFd, timeout: Duration) -> Result<Self, nix::Error> {
        let conn = Self { fd };
        conn.set_timeout(timeout)?;
        Ok(conn)
    }

    fn set_timeout(&self, timeout: Duration) -> Result<(), nix::Error> {
        let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        socket::setsockopt(&self.fd, sockopt::SendTimeout, &tv)
    }

    pub fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
        let body = serde_json::to_vec(msg).map_err(|e| HandoffError::Protocol(e.to_string()))?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(&body)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(HandoffError::Send)?;
        Ok(())
    }

    /// Receives one message and the descriptors that came with it (already owned, close-on-exec).
    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(HandoffError::Recv)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(HandoffError::Recv)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us; nothing
                // else knows them, so each gets exactly one owner here.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        let len = msg.bytes;
        if truncated {
            return Err(HandoffError::Protocol(
                "a message or its descriptors were truncated".into(),
            ));
        }
        if len == 0 {
            return Err(HandoffError::Protocol(
                "the other agent closed the connection".into(),
            ));
        }
        let message = serde_json::from_slice(&buf[..len])
            .map_err(|e| HandoffError::Protocol(format!("bad message: {e}")))?;
        Ok((message, fds))
    }
}

/// A listening handoff socket.
pub fn listen(path: &Path) -> Result<OwnedFd, HandoffError> {
    let addr = UnixAddr::new(path).map_err(|e| HandoffError::io(path, "naming", e))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| HandoffError::io(path, "creating a socket for", e))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| HandoffError::io(path, "binding", e))?;
    socket::listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| HandoffError::io(path, "listening on", e))?;
    Ok(fd)
}

/// Accepts one connection on a non-blocking listening socket; the connection itself blocks.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, nix::Error> {
    let fd = socket::accept4(listener.as_fd().as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
