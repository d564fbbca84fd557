use std::io;

use h2::Reason;

/// Why an HBONE connection or stream failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The HTTP/2 handshake failed: the peer is not an HTTP/2 (HBONE) peer, sent garbage, or went away.
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] h2::Error),
    /// The peer did not complete the HTTP/2 handshake in time.
    #[error("HTTP/2 handshake timed out after {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The peer sent no CONNECT within the time a new connection has for its first request.
    #[error("no CONNECT request within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// The HTTP/2 connection failed after the handshake.
    #[error("HTTP/2 connection error: {0}")]
    Connection(#[source] h2::Error),
    /// A CONNECT stream failed at the HTTP/2 level (other than a reset by the peer).
    #[error("HTTP/2 stream error: {0}")]
    Stream(#[source] h2::Error),
    /// The peer reset the stream (RST_STREAM) or the connection (GOAWAY) with this reason.
    #[error("stream reset by peer: {0}")]
    Reset(Reason),
    /// The connection sent no PING reply in time; it was dropped.
    #[error("keepalive PING unanswered for {0:?}")]
    KeepaliveTimeout(std::time::Duration),
    /// The target or client address could not be put into a request (not expected for socket addresses).
    #[error("invalid HBONE target: {0}")]
    InvalidTarget(String),
    /// The client connection is closed or going away: it accepts no new streams.
    #[error("HBONE connection is closed")]
    Closed,
    /// The peer answered the CONNECT with 401: authorization denied the connection.
    #[error("HBONE CONNECT denied (401)")]
    Denied,
    /// The peer answered 503: it could not reach the target.
    #[error("HBONE target unreachable (503)")]
    Unreachable,
    /// The peer answered 400: it considers the request malformed (e.g. the authority is not its address).
    #[error("HBONE CONNECT rejected as a bad request (400)")]
    BadRequest,
    /// The peer answered with another non-200 status.
    #[error("HBONE CONNECT failed with status {0}")]
    Status(u16),
    /// Reading from or writing to the local (TCP-like) side of a relay failed.
    #[error("TLS handshake with the peer failed: {0}")]
    Tls(String),

    #[error("local stream I/O error: {0}")]
    Io(#[from] io::Error),
}

impl TunnelError {
    /// Classifies an error of an established stream: a peer reset is reported as [`TunnelError::Reset`].
    pub(crate) fn from_stream(e: h2::Error) -> Self {
        match e.reason() {
            Some(reason) if e.is_remote() => TunnelError::Reset(reason),
            _ => TunnelError::Stream(e),
        }
    }

    /// The HTTP status this error carries, for errors that are an answer of the peer.
    pub fn status(&self) -> Option<u16> {
        match self {
            TunnelError::Denied => Some(401),
            TunnelError::Unreachable => Some(503),
            TunnelError::BadRequest => Some(400),
            TunnelError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// Turns an h2 stream error into an `io::Error` for the `AsyncRead`/`AsyncWrite` view of a stream,
/// keeping the h2 error as the source so callers can still inspect the reason.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => return io,
            None => return io::Error::other("HTTP/2 I/O error"),
        }
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
