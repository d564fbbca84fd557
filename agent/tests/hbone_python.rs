//! Conformance against an independent HBONE implementation: `tests/hbone/peer.py` (PyPI `h2`).
//! Skipped, with the reason printed, when python3 or its h2 module is missing.
mod common;

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use ferry::tunnel::HboneClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/hbone/peer.py")
}

/// `Some(reason)` when the Python peer cannot run here.
async fn skip_reason() -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import h2, sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)",
        ])
        .output()
        .await;
    match out {
        Err(e) => Some(format!("python3 not runnable: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "python3 lacks the h2 module (pip install h2): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

macro_rules! require_python {
    () => {
        if let Some(reason) = skip_reason().await {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
            return;
        }
    };
}

struct PyServer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    addr: SocketAddr,
}

impl PyServer {
    async fn start(args: &[&str]) -> PyServer {
        let mut child = Command::new("python3")
            .arg(peer_script())
            .arg("server")
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn peer.py server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = within("LISTENING line", lines.next_line())
            .await
            .expect("read stdout")
            .expect("peer.py exited early");
        let port: u16 = first
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        PyServer {
            child,
            lines,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    async fn next_request(&mut self) -> String {
        loop {
            let line = within("REQUEST line", self.lines.next_line())
                .await
                .expect("read stdout")
                .expect("peer.py exited");
            if line.starts_with("REQUEST ") {
                return line;
            }
        }
    }

    async fn client(&self) -> HboneClient {
        let tcp = TcpStream::connect(self.addr)
            .await
            .expect("connect to peer.py");
        HboneClient::handshake_with(tcp, client_config())
            .await
            .expect("handshake with peer.py")
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn rust_client_against_python_server() {
    require_python!();
    let mut py = PyServer::start(&[
        "--deny",
        "127.0.0.1:1001",
        "--unreachable",
        "127.0.0.1:1002",
        "--local-ip",
        "127.0.0.1",
        "--local-ip",
        "fd00::1",
    ])
    .await;
    let client = py.client().await;
    let from: SocketAddr = "10.1.2.3:4567".parse().expect("addr");

    let target: SocketAddr = "127.0.0.1:7001".parse().expect("addr");
    let stream = within("CONNECT", client.connect(target, from))
        .await
        .expect("200 from peer.py");
    assert_eq!(
        py.next_request().await,
        "REQUEST method=CONNECT authority=127.0.0.1:7001 forwarded=for=\"10.1.2.3:4567\" status=200"
    );
    let data = pattern(3 * 1024 * 1024 + 5, 11);
    let (mut r, mut w) = tokio::io::split(stream);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.expect("write");
        w.shutdown().await.expect("END_STREAM");
    });
    let mut back = Vec::new();
    within("echo", r.read_to_end(&mut back))
        .await
        .expect("read echo");
    writer.await.expect("writer");
    assert!(
        back == data,
        "peer.py echo differs ({} bytes back)",
        back.len()
    );

    let v6_target: SocketAddr = "[fd00::1]:8080".parse().expect("addr");
    let v6_from: SocketAddr = "[fd00::2]:999".parse().expect("addr");
    let mut s = client.connect(v6_target, v6_from).await.expect("IPv6 200");
    assert_eq!(
        py.next_request().await,
        "REQUEST method=CONNECT authority=[fd00::1]:8080 forwarded=for=\"[fd00::2]:999\" status=200"
    );
    s.shutdown().await.expect("END_STREAM");
    let mut nothing = Vec::new();
    within("empty echo", s.read_to_end(&mut nothing))
        .await
        .expect("EOF");
    assert!(nothing.is_empty());

    for (target, status) in [
        ("127.0.0.1:1001", 401),
        ("127.0.0.1:1002", 503),
        ("127.0.0.2:80", 400),
    ] {
        let e = client
            .connect(target.parse().expect("addr"), from)
            .await
            .expect_err(target);
        assert_eq!(e.status(), Some(status), "{target}: {e:?}");
    }
}

struct PyClientRun {
    lines: Vec<String>,
}

impl PyClientRun {
    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

async fn run_py_client(args: &[&str]) -> PyClientRun {
    let out = within(
        "peer.py client",
        Command::new("python3")
            .arg(peer_script())
            .arg("client")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run peer.py client");
    assert!(
        out.status.success(),
        "peer.py client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PyClientRun {
        lines: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
    }
}

#[tokio::test]
async fn python_client_against_rust_server() {
    require_python!();
    let denied: SocketAddr = "127.0.0.1:1001".parse().expect("addr");
    let mut harness = Harness::start_with(HarnessOptions {
        denied: HashSet::from([denied]),
        expected_local_ip: Some(LOCALHOST),
        ..HarnessOptions::default()
    })
    .await;
    let (echo, _) = echo_upstream().await;
    let server = harness.addr.to_string();
    let echo_s = echo.to_string();

    let run = run_py_client(&[
        "--connect",
        &server,
        "--target",
        &echo_s,
        "--forwarded",
        "10.1.2.3:4567",
        "--size",
        "2000000",
    ])
    .await;
    for line in [
        "STATUS 200",
        "SENT 2000000",
        "RECEIVED 2000000",
        "ECHO_MATCH true",
    ] {
        assert!(run.has(line), "missing {line:?} in {:?}", run.lines);
    }
    let req = harness.requests.recv().await.expect("request");
    assert_eq!(req.target, echo);
    assert_eq!(
        req.forwarded_for,
        Some("10.1.2.3:4567".parse().expect("addr"))
    );
    let relay = within("relay", harness.relays.recv())
        .await
        .expect("report")
        .expect("relay ok");
    assert_eq!((relay.sent, relay.received), (2_000_000, 2_000_000));

    let run = run_py_client(&[
        "--connect",
        &server,
        "--target",
        &echo_s,
        "--message",
        "hello",
    ])
    .await;
    assert!(run.has("BODY b'hello'"), "{:?}", run.lines);

    let denied_s = denied.to_string();
    let unreachable = closed_port().await.to_string();
    let not_local = format!("127.0.0.2:{}", echo.port());
    let statuses: [(&[&str], &str); 6] = [
        (&["--target", &denied_s], "STATUS 401"),
        (&["--target", &unreachable], "STATUS 503"),
        (&["--target", &not_local], "STATUS 400"),
        (&["--method", "GET"], "STATUS 400"),
        (&["--authority", "example.com:80"], "STATUS 400"),
        (&["--authority", ""], "STATUS 400"),
    ];
    for (extra, expected) in statuses {
        let mut args = vec!["--connect", server.as_str()];
        args.extend_from_slice(extra);
        let run = run_py_client(&args).await;
        assert!(
            run.has(expected),
            "{extra:?}: expected {expected:?}, got {:?}",
            run.lines
        );
    }
    // :scheme/:path on a CONNECT is malformed HTTP/2: h2 resets the stream with PROTOCOL_ERROR (1).
    let run = run_py_client(&["--connect", &server, "--target", &echo_s, "--scheme-path"]).await;
    assert!(run.has("RESET 1"), "{:?}", run.lines);
}
