//! HBONE client, server and relay over loopback TCP.
mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferry::tunnel::{
    ClientConfig, CopyStats, HboneClient, HboneStream, Keepalive, ServerConfig, TunnelError,
};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn client_addr() -> SocketAddr {
    SocketAddr::from(([10, 1, 2, 3], 45678))
}

/// Writes `data` and half-closes while reading everything back.
async fn round_trip(stream: HboneStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write to HBONE stream");
        w.shutdown().await.expect("shutdown HBONE stream");
    });
    let mut back = Vec::new();
    within("read echo", r.read_to_end(&mut back))
        .await
        .expect("read from HBONE stream");
    within("writer", writer).await.expect("writer task");
    back
}

async fn echo_through_stream(len: usize) {
    let harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;
    let stream = within("connect", client.connect(echo, client_addr()))
        .await
        .expect("CONNECT to echo");
    let data = pattern(len, 7);
    let back = round_trip(stream, data.clone()).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

#[tokio::test]
async fn one_byte_intact() {
    echo_through_stream(1).await;
}

#[tokio::test]
async fn sixty_four_kib_intact() {
    echo_through_stream(64 * 1024).await;
}

#[tokio::test]
async fn eight_mib_intact() {
    echo_through_stream(8 * 1024 * 1024).await;
}

/// The client side relays an app's TCP socket (as the agent does), with counters both ways.
#[tokio::test]
async fn relay_from_app_socket_counts_bytes() {
    let mut harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;
    let app_listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let app_addr = app_listener.local_addr().expect("addr");
    let stats = Arc::new(CopyStats::new());
    let relay_stats = stats.clone();
    let relay = tokio::spawn(async move {
        let (captured, _) = app_listener.accept().await.expect("accept app");
        let stream = client.connect(echo, client_addr()).await.expect("CONNECT");
        stream.relay(captured, relay_stats).await
    });
    let len = 8 * 1024 * 1024 + 17;
    let data = pattern(len, 3);
    let app = TcpStream::connect(app_addr).await.expect("app connect");
    let (mut r, mut w) = app.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.expect("app write");
        w.shutdown().await.expect("app shutdown");
    });
    let mut back = Vec::new();
    within("app read", r.read_to_end(&mut back))
        .await
        .expect("app read");
    writer.await.expect("writer");
    assert!(back == data, "relayed bytes differ");
    let outcome = within("relay", relay)
        .await
        .expect("task")
        .expect("relay ok");
    assert_eq!((outcome.sent, outcome.received), (len as u64, len as u64));
    assert_eq!((stats.sent(), stats.received()), (len as u64, len as u64));
    // The server side counted the same bytes, from its point of view.
    let server_side = within("server relay", harness.relays.recv())
        .await
        .expect("relay report")
        .expect("server relay ok");
    assert_eq!(
        (server_side.sent, server_side.received),
        (len as u64, len as u64)
    );
}

#[tokio::test]
async fn client_half_close_still_receives_reply() {
    let harness = Harness::start().await;
    let upstream = reply_after_eof_upstream().await;
    let client = harness.client().await;
    let mut stream = client
        .connect(upstream, client_addr())
        .await
        .expect("CONNECT");
    stream.write_all(&pattern(100_000, 1)).await.expect("write");
    stream.shutdown().await.expect("END_STREAM");
    let mut reply = String::new();
    within("reply", stream.read_to_string(&mut reply))
        .await
        .expect("read reply");
    assert_eq!(reply, "got 100000");
}

#[tokio::test]
async fn server_half_close_still_receives_client_data() {
    let harness = Harness::start().await;
    let (upstream, mut received) = speak_first_upstream(b"hello, then FIN").await;
    let client = harness.client().await;
    let mut stream = client
        .connect(upstream, client_addr())
        .await
        .expect("CONNECT");
    let mut greeting = Vec::new();
    within("greeting", stream.read_to_end(&mut greeting))
        .await
        .expect("read greeting");
    assert_eq!(greeting, b"hello, then FIN");
    // The upstream's FIN reached us as EOF; our direction must still be open.
    let late = pattern(300_000, 9);
    stream.write_all(&late).await.expect("write after peer EOF");
    stream.shutdown().await.expect("END_STREAM");
    let got = within("upstream data", received.recv())
        .await
        .expect("upstream report");
    assert!(got == late, "data sent after the peer's half-close differs");
}

#[tokio::test]
async fn status_mapping_and_request_fields() {
    let denied: SocketAddr = "[fd00::1]:8080".parse().expect("addr");
    let mut harness = Harness::start_with(HarnessOptions {
        denied: HashSet::from([denied]),
        expected_local_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ..HarnessOptions::default()
    })
    .await;
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;

    let ok = client.connect(echo, client_addr()).await.expect("200");
    assert_eq!(ok.target(), echo);
    let req = harness.requests.recv().await.expect("request");
    assert_eq!(req.target, echo);
    assert_eq!(req.forwarded_for, Some(client_addr()));
    drop(ok);

    // 401: the handler denies; the IPv6 forms are parsed back intact on the way.
    let v6_client: SocketAddr = "[fd00::2]:1234".parse().expect("addr");
    let harness_v6 = Harness::start_with(HarnessOptions {
        denied: HashSet::from([denied]),
        ..HarnessOptions::default()
    })
    .await;
    let mut harness_v6 = harness_v6;
    let client_v6 = harness_v6.client().await;
    let e = client_v6
        .connect(denied, v6_client)
        .await
        .expect_err("denied");
    assert!(matches!(e, TunnelError::Denied), "{e:?}");
    assert_eq!(e.status(), Some(401));
    let req = harness_v6.requests.recv().await.expect("request");
    assert_eq!((req.target, req.forwarded_for), (denied, Some(v6_client)));

    // 503: nothing listens at the target.
    let e = client
        .connect(closed_port().await, client_addr())
        .await
        .expect_err("unreachable");
    assert!(matches!(e, TunnelError::Unreachable), "{e:?}");

    // 400: the authority is not the address the connection arrived on.
    let elsewhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), echo.port());
    let e = client
        .connect(elsewhere, client_addr())
        .await
        .expect_err("not local");
    assert!(matches!(e, TunnelError::BadRequest), "{e:?}");

    // The connection still serves streams after refusals.
    let again = client
        .connect(echo, client_addr())
        .await
        .expect("200 again");
    assert_eq!(round_trip(again, b"x".to_vec()).await, b"x");
}

/// Bytes sent behind the CONNECT request reach the target ahead of the stream's own, once; on a
/// refused stream they go nowhere and the connection carries on.
#[tokio::test]
async fn early_data_arrives_first_and_a_refusal_drops_it() {
    let denied: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let harness = Harness::start_with(HarnessOptions {
        denied: HashSet::from([denied]),
        ..HarnessOptions::default()
    })
    .await;
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;
    let e = client
        .connect_with_early_data(denied, client_addr(), Bytes::from_static(b"refused "))
        .await
        .expect_err("denied");
    assert!(matches!(e, TunnelError::Denied), "{e:?}");
    let stream = client
        .connect_with_early_data(echo, client_addr(), Bytes::from_static(b"early "))
        .await
        .expect("200 with early data");
    let back = round_trip(stream, b"and the rest".to_vec()).await;
    assert_eq!(String::from_utf8_lossy(&back), "early and the rest");
}

/// Sends a raw request with h2 directly (shapes our client never produces) and returns the status.
async fn raw_status(addr: SocketAddr, request: Request<()>) -> Result<StatusCode, h2::Error> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut send = send.ready().await?;
    let (response, _body) = send.send_request(request, false)?;
    Ok(response.await?.status())
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let harness = Harness::start().await;
    let get = Request::builder()
        .method(Method::GET)
        .uri("http://127.0.0.1:80/")
        .body(())
        .expect("request");
    assert_eq!(
        raw_status(harness.addr, get).await.expect("GET"),
        StatusCode::BAD_REQUEST
    );
    for authority in ["example.com:80", "127.0.0.1", "127.0.0.1:0"] {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .expect("request");
        assert_eq!(
            raw_status(harness.addr, req).await.expect(authority),
            StatusCode::BAD_REQUEST,
            "{authority}"
        );
    }
    // A CONNECT with :scheme/:path cannot be sent with h2 (it strips them); peer.py covers it.
}

/// A status other than the four HBONE ones surfaces as `Status(n)`.
#[tokio::test]
async fn other_status_is_reported() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (sock, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(sock).await.expect("handshake");
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            let _ = respond.send_response(response, true);
        }
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let client = HboneClient::handshake_with(tcp, client_config())
        .await
        .expect("handshake");
    let e = client
        .connect(client_addr(), client_addr())
        .await
        .expect_err("502");
    assert!(matches!(e, TunnelError::Status(502)), "{e:?}");
}

#[tokio::test]
async fn garbage_and_http1_end_their_connection_only() {
    let mut harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;
    let mut good = client.connect(echo, client_addr()).await.expect("CONNECT");
    good.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    within("echo before", good.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(&buf, b"before");

    let inputs: [&[u8]; 3] = [
        b"\x00\xff\x13garbage that is not an HTTP/2 preface at all\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        // The right preface, then a frame header announcing an absurd length.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x04\x00\x00\x00\x00\x00",
    ];
    for input in inputs {
        let mut raw = TcpStream::connect(harness.addr).await.expect("connect");
        let peer = raw.local_addr().expect("addr");
        raw.write_all(input).await.expect("write garbage");
        // The server closes: reading ends (EOF, or a reset after its GOAWAY) instead of hanging.
        let mut sink = Vec::new();
        let _ = within("server closes", raw.read_to_end(&mut sink)).await;
        let r = harness.result_for(peer).await;
        assert!(r.is_err(), "serve_connection returned {r:?} for {input:?}");
    }

    // The good connection and its stream were not affected.
    good.write_all(b"after").await.expect("write");
    good.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    within("echo after", good.read_to_end(&mut rest))
        .await
        .expect("read");
    assert_eq!(rest, b"after");
    assert!(client.is_ready());
}

#[tokio::test]
async fn silent_peer_times_out_in_handshake() {
    let mut harness = Harness::start_with(HarnessOptions {
        config: ServerConfig {
            handshake_timeout: Duration::from_millis(200),
            keepalive: None,
            ..ServerConfig::default()
        },
        ..HarnessOptions::default()
    })
    .await;
    let raw = TcpStream::connect(harness.addr).await.expect("connect");
    let r = harness.result_for(raw.local_addr().expect("addr")).await;
    assert!(matches!(r, Err(TunnelError::HandshakeTimeout(_))), "{r:?}");
}

#[tokio::test]
async fn connection_cut_mid_transfer_ends_both_sides() {
    let mut harness = Harness::start().await;
    let (echo, mut echo_ends) = echo_upstream().await;
    let proxy = CutProxy::start(harness.addr).await;
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let client = HboneClient::handshake_with(tcp, client_config())
        .await
        .expect("handshake");
    let mut stream = client.connect(echo, client_addr()).await.expect("CONNECT");
    stream.write_all(&pattern(1024, 1)).await.expect("write");
    let mut buf = vec![0u8; 1024];
    within("first echo", stream.read_exact(&mut buf))
        .await
        .expect("read");

    proxy.cut();

    // Client side: the stream reports an error or EOF, and the connection ends.
    let mut rest = Vec::new();
    let read = within("client read after cut", stream.read_to_end(&mut rest)).await;
    assert!(read.is_err() || rest.is_empty(), "{read:?}");
    within("client connection end", client.closed()).await;
    assert!(client.is_closed() && !client.is_ready());
    let e = client
        .connect(echo, client_addr())
        .await
        .expect_err("closed client");
    assert!(matches!(e, TunnelError::Closed), "{e:?}");

    // Server side: the connection ends (a TCP close between frames is the peer's way to end it, so
    // either result), its relay fails, and the upstream socket is released.
    let _ended = within("server result", harness.results.recv())
        .await
        .expect("result");
    let relay = within("server relay", harness.relays.recv())
        .await
        .expect("relay report");
    assert!(relay.is_err(), "{relay:?}");
    // Either way it ended (EOF or error), the upstream connection must be gone, not hang.
    let _ended = within("upstream released", echo_ends.recv())
        .await
        .expect("echo report");
}

/// The peer resets one stream: our relay stops both directions and the upstream is released.
#[tokio::test]
async fn stream_reset_aborts_relay() {
    let mut harness = Harness::start().await;
    let (echo, mut echo_ends) = echo_upstream().await;
    let tcp = TcpStream::connect(harness.addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .body(())
        .expect("request");
    let (response, mut body) = send.send_request(request, false).expect("send");
    let response = within("response", response).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    body.send_data(Bytes::from_static(b"ping"), false)
        .expect("data");
    let mut recv = response.into_body();
    let echoed = within("echo", recv.data())
        .await
        .expect("data")
        .expect("ok");
    assert_eq!(&echoed[..], b"ping");
    body.send_reset(h2::Reason::CANCEL);
    let relay = within("relay end", harness.relays.recv())
        .await
        .expect("report");
    assert!(
        relay.is_err(),
        "a reset stream must not look like a clean end: {relay:?}"
    );
    // Either way it ended (EOF or error), the upstream connection must be gone, not hang.
    let _ended = within("upstream released", echo_ends.recv())
        .await
        .expect("echo report");
}

/// The upstream resets its TCP connection: the client sees the stream reset, not a clean EOF.
#[tokio::test]
async fn upstream_error_resets_stream() {
    let harness = Harness::start().await;
    let rst = upstream(|sock| async move {
        let _ = sock.set_zero_linger();
        let mut sock = sock;
        let mut buf = [0u8; 4];
        let _ = sock.read_exact(&mut buf).await;
        drop(sock); // linger 0: RST
    })
    .await;
    let client = harness.client().await;
    let mut stream = client.connect(rst, client_addr()).await.expect("CONNECT");
    stream.write_all(b"boom").await.expect("write");
    let mut rest = Vec::new();
    let e = within("stream ends", stream.read_to_end(&mut rest))
        .await
        .expect_err("the stream must be reset, not ended cleanly");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}");
}

#[tokio::test]
async fn unanswered_ping_closes_client() {
    let (ours, theirs) = tokio::io::duplex(1024 * 1024);
    // The server completes the handshake but is never polled again: PINGs go unanswered.
    let server = tokio::spawn(async move { h2::server::handshake(theirs).await });
    let config = ClientConfig {
        keepalive: Some(Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(150),
        }),
        ..ClientConfig::default()
    };
    let client = HboneClient::handshake_with(ours, config)
        .await
        .expect("handshake");
    let _server_conn = server.await.expect("task").expect("server handshake");
    within("keepalive closes", client.closed()).await;
    assert!(client.is_closed());
}

#[tokio::test]
async fn answered_ping_keeps_client_open() {
    let (ours, theirs) = tokio::io::duplex(1024 * 1024);
    tokio::spawn(async move {
        let mut conn = h2::server::handshake(theirs)
            .await
            .expect("server handshake");
        while conn.accept().await.is_some() {}
    });
    let config = ClientConfig {
        keepalive: Some(Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(150),
        }),
        ..ClientConfig::default()
    };
    let client = HboneClient::handshake_with(ours, config)
        .await
        .expect("handshake");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(client.is_ready(), "answered PINGs must keep the connection");
}

#[tokio::test]
async fn server_advertises_hbone_settings() {
    let harness = Harness::start().await;
    let client = harness.client().await;
    // SETTINGS arrive with the first exchange; a stream guarantees they were processed.
    let e = client
        .connect(closed_port().await, client_addr())
        .await
        .expect_err("503");
    assert!(matches!(e, TunnelError::Unreachable));
    assert_eq!(client.peer_max_streams(), 200);
}

fn limited(config: ServerConfig) -> HarnessOptions {
    HarnessOptions {
        config: ServerConfig {
            keepalive: None,
            ..config
        },
        ..HarnessOptions::default()
    }
}

/// A peer that finishes the HTTP/2 handshake and then never asks for anything is dropped after the
/// request timeout; a peer whose first CONNECT came in time may stay idle longer (pooled connections).
#[tokio::test]
async fn a_connection_without_a_connect_is_dropped_after_the_request_timeout() {
    let mut harness = Harness::start_with(limited(ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    }))
    .await;
    let tcp = TcpStream::connect(harness.addr).await.expect("connect");
    let local = tcp.local_addr().expect("addr");
    let (_send, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let started = std::time::Instant::now();
    let r = harness.result_for(local).await;
    assert!(matches!(r, Err(TunnelError::RequestTimeout(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The client sees its connection end.
    within("client connection end", conn)
        .await
        .expect("join")
        .ok();

    // A client whose first stream came in time, idle for three request timeouts, still gets through.
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;
    let first = client.connect(echo, client_addr()).await.expect("200");
    assert_eq!(round_trip(first, b"one".to_vec()).await, b"one");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let second = client
        .connect(echo, client_addr())
        .await
        .expect("200 later");
    assert_eq!(round_trip(second, b"two".to_vec()).await, b"two");
}

/// A CONNECT over the header limit gets 431 (its stream refused) while the same connection keeps
/// carrying well-formed CONNECTs; one far over it (h2's abuse bound) ends that connection only.
#[tokio::test]
async fn oversized_headers_are_refused_and_others_are_served() {
    let harness = Harness::start_with(limited(ServerConfig {
        h2: ferry::tunnel::H2Settings {
            max_header_list_size: 4096,
            ..Default::default()
        },
        ..ServerConfig::default()
    }))
    .await;
    let (echo, _) = echo_upstream().await;
    let connect = |baggage: usize| {
        Request::builder()
            .method(Method::CONNECT)
            .uri(echo.to_string())
            .header("baggage", "x".repeat(baggage))
            .body(())
            .expect("request")
    };
    let tcp = TcpStream::connect(harness.addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let (response, _body) = send.send_request(connect(6000), false).expect("send");
    match within("oversized answer", response).await {
        Ok(r) => assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
    }
    let mut send = send.ready().await.expect("still ready");
    let (response, _body) = send.send_request(connect(10), false).expect("send");
    let r = within("normal answer", response).await.expect("response");
    assert_eq!(r.status(), StatusCode::OK);

    let (response, _body) = send.send_request(connect(256 * 1024), false).expect("send");
    let e = within("abusive answer", response)
        .await
        .expect_err("the connection goes away");
    assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e}");
    within("connection end", conn).await.expect("join").ok();
    // Another connection is served as before.
    let client = harness.client().await;
    let s = client.connect(echo, client_addr()).await.expect("200");
    assert_eq!(round_trip(s, b"after".to_vec()).await, b"after");
}

/// Streams that open and never send count against the advertised per-connection limit: a fourth
/// stream waits until one of three held ones ends.
#[tokio::test]
async fn streams_past_the_limit_wait_for_a_free_one() {
    let harness = Harness::start_with(limited(ServerConfig {
        max_concurrent_streams: 3,
        ..ServerConfig::default()
    }))
    .await;
    let (echo, _) = echo_upstream().await;
    let client = harness.client().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(client.connect(echo, client_addr()).await.expect("200"));
    }
    assert_eq!(client.peer_max_streams(), 3);
    let tcp = TcpStream::connect(harness.addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);
    // The limit is per connection: another connection is not held up by those three streams.
    let mut send = send.ready().await.expect("ready");
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .body(())
        .expect("request");
    let (response, _body) = send.send_request(req, false).expect("send");
    assert_eq!(
        within("other connection", response)
            .await
            .expect("response")
            .status(),
        StatusCode::OK
    );
    let fourth = client.connect(echo, client_addr());
    tokio::pin!(fourth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fourth)
            .await
            .is_err(),
        "a fourth stream on the connection was served while three were open"
    );
    let first = held.pop().expect("held");
    assert_eq!(round_trip(first, b"free".to_vec()).await, b"free");
    let fourth = within("fourth stream", fourth).await.expect("200");
    assert_eq!(round_trip(fourth, b"4".to_vec()).await, b"4");
}
