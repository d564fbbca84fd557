#!/usr/bin/env python3
"""Slow and hostile HBONE peers for Ferry's limit tests. Each mode prints one JSON line at the end.

  handshakes --connect IP:PORT --count N --hold S
      N TCP connections that start a TLS ClientHello and never finish it; waits up to S seconds for
      the server to close them and reports when each was closed.
  no-request --connect IP:PORT --cert C --key K --ca CA --hold S
      mutual TLS and the HTTP/2 preface, then nothing: reports when (and how) the server closed.
  big-header --connect IP:PORT --cert C --key K --ca CA --target IP:PORT --size N
      a CONNECT whose `baggage` header is N bytes, then a normal CONNECT on the same connection.

Built on the PyPI `h2` state machine and Python's `ssl`; shares no code with Ferry.
"""

import argparse
import json
import resource
import select
import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events

# A TLS record header announcing a 512-byte handshake message, and the start of a ClientHello.
PARTIAL_HELLO = bytes.fromhex("160301020001000200fc0303") + b"\x00" * 16


def addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n + 64), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def handshakes(args):
    raise_nofile(args.count)
    host, port = addr(args.connect)
    socks, connect_errors = [], 0
    start = time.monotonic()
    for _ in range(args.count):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
            s.sendall(PARTIAL_HELLO)
        except OSError:
            # Refused at once (reset before or during the send): closed by the server at time 0.
            connect_errors += 1
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
    opened_ms = int((time.monotonic() - start) * 1000)
    print(f"OPENED {len(socks)}", flush=True)
    closed_ms = [0] * connect_errors
    live = {s.fileno(): s for s in socks}
    poller = select.poll()
    for fd in live:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    deadline = start + args.hold
    while live and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            s = live.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                closed_ms.append(int((time.monotonic() - start) * 1000))
                poller.unregister(fd)
                del live[fd]
                s.close()
    print(json.dumps({
        "count": args.count,
        "opened_ms": opened_ms,
        "connect_errors": connect_errors,
        "closed_ms": sorted(closed_ms),
        "still_open": len(live),
    }), flush=True)


def tls_h2(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE: the server's identity is a URI SAN, not a host name
    ctx.load_verify_locations(args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(addr(args.connect), timeout=20)
    s = ctx.wrap_socket(raw)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def read_events(s, conn, timeout):
    s.settimeout(timeout)
    try:
        data = s.recv(65536)
    except socket.timeout:
        return None
    except (ConnectionResetError, ssl.SSLError, OSError):
        data = b""
    if not data:
        return "eof"
    events = conn.receive_data(data)
    out = conn.data_to_send()
    if out:
        try:
            s.sendall(out)
        except OSError:
            pass
    return events


def no_request(args):
    s, conn = tls_h2(args)
    start = time.monotonic()
    end, goaway = "timeout", None
    while time.monotonic() - start < args.hold:
        ev = read_events(s, conn, 1)
        if ev is None:
            continue
        if ev == "eof":
            end = "eof"
            break
        for e in ev:
            if isinstance(e, h2.events.ConnectionTerminated):
                goaway = int(e.error_code)
    print(json.dumps({"end": end, "goaway": goaway,
                      "elapsed_ms": int((time.monotonic() - start) * 1000)}), flush=True)


def request(s, conn, stream_id, target, size):
    headers = [(":method", "CONNECT"), (":authority", target)]
    if size:
        headers.append(("baggage", "x" * size))
    conn.send_headers(stream_id, headers)
    s.sendall(conn.data_to_send())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ev = read_events(s, conn, 1)
        if ev is None:
            continue
        if ev == "eof":
            return "eof"
        for e in ev:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id:
                return dict(e.headers).get(b":status", b"?").decode()
            if isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id:
                return f"reset:{int(e.error_code)}"
            if isinstance(e, h2.events.ConnectionTerminated):
                return f"goaway:{int(e.error_code)}"
    return "timeout"


def big_header(args):
    s, conn = tls_h2(args)
    first = request(s, conn, 1, args.target, args.size)
    second = None
    if not (first.startswith("goaway") or first == "eof"):
        second = request(s, conn, 3, args.target, 0)
    print(json.dumps({"first": first, "second": second}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["handshakes", "no-request", "big-header"])
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--hold", type=float, default=20)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--target")
    p.add_argument("--size", type=int, default=0)
    args = p.parse_args()
    {"handshakes": handshakes, "no-request": no_request, "big-header": big_header}[args.mode](args)


if __name__ == "__main__":
    main()
