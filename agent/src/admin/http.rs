//! A minimal HTTP/1.1 server for the admin endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! Hand-written on tokio rather than pulling hyper into the agent for three GET routes. It only has to
//! serve Prometheus and kubelet probes, so it reads one request head per connection, answers, and closes
//! (`Connection: close`); request bodies are never read. Every client is bounded in head size, time and
//! count, so a slow or hostile local client cannot stall the probes the kubelet relies on.
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Where the admin server listens unless configured otherwise: Istio's agent port, loopback only,
/// since metrics name workloads and identities.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);

/// What the admin endpoints report; implemented by the daemon.
pub trait AdminState: Send + Sync {
    /// The `/metrics` body, in the Prometheus text exposition format.
    fn metrics(&self) -> String;
    /// `Ok` once the agent can carry traffic; otherwise why not, which `/readyz` returns with a 503.
    fn ready(&self) -> Result<(), String>;
}

/// Bounds on each client.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head (request line and headers, with the blank line) accepted.
    pub max_head: usize,
    /// Time a client has to send its whole request head.
    pub head_timeout: Duration,
    /// Time a client has to take the whole response.
    pub write_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8 * 1024,
            head_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` completes, with the default [`Limits`].
pub async fn serve(listener: TcpListener, state: Arc<dyn AdminState>, shutdown: impl Future) {
    serve_with_limits(listener, state, shutdown, Limits::default()).await
}

/// [`serve`] with explicit limits. On shutdown it stops accepting and aborts connections in progress:
/// they are single short exchanges, and a prober retries.
pub async fn serve_with_limits(
    listener: TcpListener,
    state: Arc<dyn AdminState>,
    shutdown: impl Future,
    limits: Limits,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    // A permit per connection, released when its task ends, however it ends.
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(joined) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = joined {
                    tracing::warn!(error = %e, "admin connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        // Best effort, never waiting on a client: the socket buffer takes this.
                        let _ = stream.try_write(&busy_response());
                        continue;
                    };
                    let state = state.clone();
                    let limits = limits.clone();
                    conns.spawn(async move {
                        handle(stream, &*state, &limits).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Typically EMFILE: retrying at once would spin while nothing frees descriptors.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    conns.shutdown().await;
}

fn busy_response() -> Vec<u8> {
    Response::text(503, "too many admin connections\n").encode(false)
}

async fn handle(mut stream: TcpStream, state: &dyn AdminState, limits: &Limits) {
    let response = match timeout(limits.head_timeout, read_head(&mut stream, limits.max_head)).await
    {
        Err(_) => Response::text(408, "request head not received in time\n"),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::Io(e))) => {
            tracing::debug!(error = %e, "admin request read failed");
            return;
        }
        Ok(Err(HeadError::TooLarge)) => Response::text(431, "request head too large\n"),
        Ok(Ok(head)) => respond(&head, state),
    };
    let bytes = response.encode(!response.head_only);
    match timeout(limits.write_timeout, stream.write_all(&bytes)).await {
        Ok(Ok(())) => linger(stream).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "admin response write failed"),
        Err(_) => tracing::debug!("admin client did not take the response in time"),
    }
}

/// Closes gracefully: closing a socket with unread input (a body, or the rest of an oversized head)
/// makes the kernel send a reset, which can destroy the response before the client reads it. So send
/// FIN first and discard what the client still sends, within bounds.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout(Duration::from_secs(1), drain).await;
}

#[derive(Debug)]
enum HeadError {
    /// The client closed before sending a whole head: nothing to answer.
    Closed,
    TooLarge,
    Io(io::Error),
}

/// Reads up to and including the blank line that ends the request head, never more than `max` bytes.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024.min(max));
    let mut chunk = [0u8; 1024];
    loop {
        let room = max.saturating_sub(head.len());
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        let want = room.min(chunk.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        // Rescan a few bytes before the new data, since the terminator may straddle two reads.
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head[scan_from..]) {
            head.truncate(scan_from + end);
            return Ok(head);
        }
    }
}

/// The length of the head within `buf` (through its terminating blank line), if complete. Bare `\n`
/// line ends are accepted, as RFC 9112 allows a recipient to.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Answer to HEAD: headers as for GET, no body.
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
            allow: false,
        }
    }

    fn encode(&self, with_body: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "",
        };
        let allow = if self.allow {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len(),
        )
        .into_bytes();
        if with_body {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Routes one request head. Headers are not needed by any route, so only the request line is parsed.
fn respond(head: &[u8], state: &dyn AdminState) -> Response {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text(400, "bad request line\n");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request line\n");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Response::text(400, "bad method\n");
    }
    if !target.starts_with('/') {
        return Response::text(400, "bad request target\n");
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => {
            return Response::text(505, "only HTTP/1.x is served\n");
        }
        _ => return Response::text(400, "bad HTTP version\n"),
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Response::text(405, "only GET and HEAD are served\n");
            r.allow = true;
            return r;
        }
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let mut response = match path {
        "/metrics" => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Response::text(200, state.metrics())
        },
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => match state.ready() {
            Ok(()) => Response::text(200, "ready\n"),
            Err(reason) => Response::text(503, format!("not ready: {reason}\n")),
        },
        _ => Response::text(404, "not found\n"),
    };
    response.head_only = head_only;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;
    use tokio::sync::oneshot;

    struct TestState {
        ready: Mutex<Result<(), String>>,
    }

    const METRICS_BODY: &str = "# TYPE t counter\nt{a=\"b\"} 3\n";

    impl AdminState for TestState {
        fn metrics(&self) -> String {
            METRICS_BODY.to_string()
        }
        fn ready(&self) -> Result<(), String> {
            self.ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    struct Server {
        addr: SocketAddr,
        state: Arc<TestState>,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(TestState {
            ready: Mutex::new(Ok(())),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with_limits(listener, state.clone(), stopped, limits));
        Server {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Sends `raw`, reads until the server closes, and parses the response strictly.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
        let run = async {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(raw).await.expect("write");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read");
            out
        };
        let out = timeout(Duration::from_secs(5), run)
            .await
            .expect("server answers in time");
        parse_reply(&out)
    }

    fn parse_reply(out: &[u8]) -> Reply {
        let text = String::from_utf8(out.to_vec()).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("complete head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"));
        let status = parts
            .next()
            .expect("status")
            .parse()
            .expect("numeric status");
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(": ").expect("header line");
                (n.to_string(), v.to_string())
            })
            .collect();
        let reply = Reply {
            status,
            headers,
            body: body.to_string(),
        };
        assert_eq!(reply.header("Connection"), Some("close"));
        reply
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let reply = exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        let len: usize = reply
            .header("Content-Length")
            .expect("Content-Length")
            .parse()
            .expect("numeric length");
        assert_eq!(len, reply.body.len(), "Content-Length matches the body");
        reply
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_state_text() {
        let s = start(Limits::default()).await;
        let r = get(s.addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, METRICS_BODY);
        assert_eq!(
            r.header("Content-Type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let r = get(s.addr, "/metrics?name[]=t").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, METRICS_BODY);
    }

    #[tokio::test]
    async fn healthz_is_ok() {
        let s = start(Limits::default()).await;
        let r = get(s.addr, "/healthz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        // HTTP/1.0 and bare LF line ends are served too.
        let r = exchange(s.addr, b"GET /healthz HTTP/1.0\n\n").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    }

    #[tokio::test]
    async fn readyz_follows_state() {
        let s = start(Limits::default()).await;
        let r = get(s.addr, "/readyz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

        *s.state.ready.lock().expect("lock") = Err("certificates not loaded".into());
        let r = get(s.addr, "/readyz").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "not ready: certificates not loaded\n");
        // Liveness does not depend on readiness.
        assert_eq!(get(s.addr, "/healthz").await.status, 200);

        *s.state.ready.lock().expect("lock") = Ok(());
        assert_eq!(get(s.addr, "/readyz").await.status, 200);
    }

    #[tokio::test]
    async fn unknown_path_is_404_and_other_methods_405() {
        let s = start(Limits::default()).await;
        let r = get(s.addr, "/metricsx").await;
        assert_eq!(r.status, 404);
        assert_eq!(get(s.addr, "/").await.status, 404);

        let r = exchange(
            s.addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("Allow"), Some("GET, HEAD"));

        let r = exchange(s.addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("Content-Length"),
            Some(METRICS_BODY.len().to_string().as_str())
        );
        assert_eq!(r.body, "", "HEAD has no body");
    }

    #[tokio::test]
    async fn garbage_requests_get_400_and_the_server_survives() {
        let s = start(Limits::default()).await;
        let cases: &[(&[u8], u16)] = &[
            (b"\x00\xff\xfe\xfd garbage\r\n\r\n", 400),
            (b"\r\n\r\n", 400),
            (b"GET\r\n\r\n", 400),
            (b"GET /healthz\r\n\r\n", 400),
            (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
            (b"GET /healthz HTTP/1.1 extra\r\n\r\n", 400),
            (b"get /healthz HTTP/1.1\r\n\r\n", 400),
            (b"GET healthz HTTP/1.1\r\n\r\n", 400),
            (b"GET /healthz FTP/1.1\r\n\r\n", 400),
            (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n", 400),
        ];
        for (raw, status) in cases {
            let r = exchange(s.addr, raw).await;
            assert_eq!(r.status, *status, "{:?}", String::from_utf8_lossy(raw));
        }
        // Clients that go away mid-head get no answer and harm nothing.
        for raw in [&b""[..], b"GET /hea", b"GET /healthz HTTP/1.1\r\nHost"] {
            let mut c = TcpStream::connect(s.addr).await.expect("connect");
            c.write_all(raw).await.expect("write");
            drop(c);
        }
        assert_eq!(get(s.addr, "/healthz").await.status, 200);
    }

    #[tokio::test]
    async fn oversized_head_is_refused() {
        let s = start(Limits::default()).await;
        let big = format!(
            "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(16 * 1024)
        );
        let r = exchange(s.addr, big.as_bytes()).await;
        assert_eq!(r.status, 431);

        // A head just within the limit is served: the limit is on the head, not on one read.
        let prefix = "GET /healthz HTTP/1.1\r\nX-Pad: ";
        let pad = 8 * 1024 - prefix.len() - 4;
        let fits = format!("{prefix}{}\r\n\r\n", "a".repeat(pad));
        assert_eq!(fits.len(), 8 * 1024);
        assert_eq!(exchange(s.addr, fits.as_bytes()).await.status, 200);
        let over = format!("{prefix}{}\r\n\r\n", "a".repeat(pad + 1));
        assert_eq!(exchange(s.addr, over.as_bytes()).await.status, 431);
    }

    #[tokio::test]
    async fn slow_client_does_not_block_others() {
        let s = start(Limits {
            head_timeout: Duration::from_secs(30),
            ..Limits::default()
        })
        .await;
        let mut slow = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(s.addr).await.expect("connect");
            c.write_all(b"GET /heal").await.expect("write");
            slow.push(c);
        }
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(get(s.addr, "/healthz").await.status, 200);
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(slow);
    }

    #[tokio::test]
    async fn slow_client_times_out_with_408() {
        let s = start(Limits {
            head_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let mut c = TcpStream::connect(s.addr).await.expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .expect("server closes after the head timeout")
            .expect("read");
        assert_eq!(parse_reply(&out).status, 408);
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_get_503_then_recover() {
        let s = start(Limits {
            max_connections: 2,
            head_timeout: Duration::from_secs(30),
            ..Limits::default()
        })
        .await;
        let mut holders = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(s.addr).await.expect("connect");
            c.write_all(b"GET /").await.expect("write");
            holders.push(c);
        }
        // The holders are accepted in order before the next connection is.
        let mut c = TcpStream::connect(s.addr).await.expect("connect");
        let mut out = Vec::new();
        timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .expect("refused at once")
            .expect("read");
        assert_eq!(parse_reply(&out).status, 503);

        drop(holders);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = exchange(s.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "slots never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let mut s = start(Limits::default()).await;
        assert_eq!(get(s.addr, "/healthz").await.status, 200);
        // A connection in progress must not hold shutdown up.
        let mut pending = TcpStream::connect(s.addr).await.expect("connect");
        pending.write_all(b"GET /").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;

        s.stop
            .take()
            .expect("sender")
            .send(())
            .expect("server running");
        timeout(Duration::from_secs(5), &mut s.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve did not panic");
        assert!(TcpStream::connect(s.addr).await.is_err(), "listener closed");
        let mut out = Vec::new();
        let n = timeout(Duration::from_secs(5), pending.read_to_end(&mut out))
            .await
            .expect("pending connection closed");
        assert!(n.is_err() || out.is_empty(), "no response after shutdown");
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b"\r\n"), Some(2));
        assert_eq!(head_end(b""), None);
    }
}
