#!/usr/bin/env python3
"""Minimal, independent HBONE peer (HTTP/2 CONNECT, as Istio ambient's ztunnel speaks it on port 15008).

It shares no code with Ferry: it is built on the PyPI `h2` state machine, so Ferry's client and server
are checked against a second implementation of the wire format, not against themselves.

Server mode: answers CONNECT with 200 and echoes the stream's bytes (END_STREAM from the client is
answered with END_STREAM after the echo), 401 for --deny targets, 503 for --unreachable targets, 400 for
a non-CONNECT method, :scheme/:path on a CONNECT, a missing or non-`ip:port` authority, or an authority
IP not in --local-ip (when given). Each request is logged on stdout as
`REQUEST method=.. authority=.. forwarded=.. status=..`; the first line is `LISTENING <port>`. Each
request is also logged as one JSON line, `SEEN {...}`: every header as received (pseudo-headers
included, in order), whether the HEADERS frame ended the stream, the client's SETTINGS and connection
window at that moment, the TCP peer, and (with TLS) the connection's `tls` facts. A failed TLS
handshake is logged as `TLS_ERROR <reason>`.

Client mode: sends one CONNECT (or a deliberately bad request), sends the payload, half-closes, reads
until the server's END_STREAM, and prints `STATUS <n>`, `RESET <code>`, `SENT <n>`, `RECEIVED <n>`,
`ECHO_MATCH <true|false>`, `BODY <repr>`. With TLS it first prints `TLS {...}` (JSON, the facts of the
handshake, the server's URI SANs among them); TLS failures print `TLS_ERROR <reason>` and other
connection failures `CONNECTION_ERROR <reason>`, with exit status 3.

Plain TCP by default. --cert/--key/--ca switch to TLS 1.3 with ALPN h2 (mutual when --ca is given on
the server and --cert/--key on the client); SPIFFE identity checks are left to the integrating test,
which gets the peer's URI SANs in the `TLS`/`SEEN` JSON lines.
"""

import argparse
import ipaddress
import json
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

MIB = 1024 * 1024
# What ztunnel (and Ferry) advertise.
CLIENT_SETTINGS = {
    h2.settings.SettingCodes.ENABLE_PUSH: 0,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 * MIB,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 * MIB,
    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
}
SERVER_SETTINGS = dict(CLIENT_SETTINGS)
SERVER_SETTINGS[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 200
del SERVER_SETTINGS[h2.settings.SettingCodes.ENABLE_PUSH]
CONNECTION_WINDOW = 16 * MIB
DEFAULT_WINDOW = 65535
IO_TIMEOUT = 20.0
SNI = {}  # id(ssl socket) -> server name the client sent (server side)


def log(line):
    print(line, flush=True)


def parse_addr(text):
    """`ip:port` or `[v6]:port` -> (ipaddress, port); raises ValueError otherwise."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad IPv6 authority {text!r}")
        ip = ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"no port in {text!r}")
        ip = ipaddress.IPv4Address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return ip, int(port)


def format_addr(ip, port):
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def tls_context(args, server_side):
    """None for plain TCP. The one place to change for TLS: the socket is wrapped right after accept
    or connect, before any HTTP/2 byte."""
    if not args.cert and not args.ca:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    if args.ca:
        ctx.load_verify_locations(args.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        # HBONE clients send no SNI; record what arrives so a test can check it.
        def record_sni(ssl_sock, server_name, _ctx):
            SNI[id(ssl_sock)] = server_name

        ctx.sni_callback = record_sni
    else:
        # SPIFFE certificates carry URI SANs only; host name checks do not apply (and no SNI is sent).
        ctx.check_hostname = False
        if not args.ca:
            ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_facts(sock, side):
    """What a TLS connection negotiated and who the peer is, as a JSON-able dict."""
    cert = sock.getpeercert() or {}
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    cipher = sock.cipher()
    facts = {
        "side": side,
        "version": sock.version(),
        "alpn": sock.selected_alpn_protocol(),
        "cipher": cipher[0] if cipher else None,
        "peer_uris": uris,
        "peer_cert": bool(cert),
    }
    if side == "server":
        facts["sni"] = SNI.pop(id(sock), None)
    return facts


class Peer:
    """A socket plus an h2 state machine, with per-stream outbound queues sent within flow control."""

    def __init__(self, sock, client_side, validate):
        self.sock = sock
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_inbound_headers=validate,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.outbound = {}  # stream id -> [bytearray, end_stream]

    def start(self, settings):
        self.conn.initiate_connection()
        self.conn.update_settings(settings)
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.flush()

    def queue(self, stream_id, data, end):
        entry = self.outbound.setdefault(stream_id, [bytearray(), False])
        entry[0] += data
        entry[1] = entry[1] or end

    def pump(self):
        for stream_id in list(self.outbound):
            buf, end = self.outbound[stream_id]
            try:
                while buf:
                    window = self.conn.local_flow_control_window(stream_id)
                    n = min(window, self.conn.max_outbound_frame_size, len(buf))
                    if n <= 0:
                        break
                    self.conn.send_data(stream_id, bytes(buf[:n]))
                    del buf[:n]
                if not buf and end:
                    self.conn.end_stream(stream_id)
                    del self.outbound[stream_id]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.outbound.pop(stream_id, None)
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def receive(self):
        data = self.sock.recv(65536)
        if not data:
            return None
        return self.conn.receive_data(data)


# ----------------------------------------------------------------------------------------------- server


def decide(headers, args):
    method = headers.get(":method")
    if method != "CONNECT" or ":scheme" in headers or ":path" in headers:
        return 400
    try:
        ip, port = parse_addr(headers.get(":authority", ""))
    except ValueError:
        return 400
    if args.local_ip and ip not in args.local_ip:
        return 400
    target = format_addr(ip, port)
    if target in args.deny:
        return 401
    if target in args.unreachable:
        return 503
    return 200


def setting_name(code):
    try:
        return h2.settings.SettingCodes(code).name
    except ValueError:
        return str(int(code))


def serve_connection(sock, args, tls=None, tcp_peer=None):
    peer = Peer(sock, client_side=False, validate=False)
    try:
        peer.start(SERVER_SETTINGS)
        open_streams = set()
        client_settings = {}
        while True:
            events = peer.receive()
            if events is None:
                break
            for event in events:
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    for code, change in event.changed_settings.items():
                        client_settings[setting_name(code)] = change.new_value
                elif isinstance(event, h2.events.RequestReceived):
                    headers = dict(event.headers)
                    status = decide(headers, args)
                    log(
                        f"REQUEST method={headers.get(':method')} authority={headers.get(':authority')} "
                        f"forwarded={headers.get('forwarded')} status={status}"
                    )
                    seen = {
                        "stream": event.stream_id,
                        "headers": [[k, v] for k, v in event.headers],
                        "end_stream": event.stream_ended is not None,
                        "status": status,
                        "settings": dict(client_settings),
                        "conn_window": peer.conn.outbound_flow_control_window,
                        "tcp_peer": tcp_peer,
                        "tls": tls,
                    }
                    log(f"SEEN {json.dumps(seen, sort_keys=True)}")
                    peer.conn.send_headers(
                        event.stream_id, [(":status", str(status))], end_stream=status != 200
                    )
                    if status == 200:
                        open_streams.add(event.stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    peer.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                    if event.stream_id in open_streams:
                        peer.queue(event.stream_id, event.data, False)
                elif isinstance(event, h2.events.StreamEnded):
                    if event.stream_id in open_streams:
                        peer.queue(event.stream_id, b"", True)
                        open_streams.discard(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    open_streams.discard(event.stream_id)
                    peer.outbound.pop(event.stream_id, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            peer.pump()
    except (OSError, h2.exceptions.ProtocolError, ssl.SSLError) as e:
        log(f"CONNECTION_ERROR {type(e).__name__}: {e}")
    finally:
        sock.close()


def run_server(args):
    listener = socket.create_server(parse_listen(args.listen))
    ctx = tls_context(args, server_side=True)
    log(f"LISTENING {listener.getsockname()[1]}")
    while True:
        sock, _ = listener.accept()
        sock.settimeout(IO_TIMEOUT)
        threading.Thread(target=serve_tls_or_plain, args=(sock, ctx, args), daemon=True).start()


def serve_tls_or_plain(sock, ctx, args):
    tcp_peer = format_addr(*addr_of(sock.getpeername()))
    tls = None
    if ctx is not None:
        try:
            sock = ctx.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log(f"TLS_ERROR {e}")
            sock.close()
            return
        tls = tls_facts(sock, "server")
    serve_connection(sock, args, tls, tcp_peer)


def addr_of(sockaddr):
    ip = ipaddress.ip_address(sockaddr[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, sockaddr[1]


def parse_listen(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# ----------------------------------------------------------------------------------------------- client


def payload(args):
    if args.message is not None:
        return args.message.encode()
    return bytes((i * 7 + i // 251) % 256 for i in range(args.size))


def request_headers(args):
    method = args.method
    headers = [(":method", method)]
    if args.authority is not None:
        authority = args.authority
    else:
        authority = args.target
    if authority != "":
        headers.append((":authority", authority))
    if method != "CONNECT" or args.scheme_path:
        headers += [(":scheme", "http"), (":path", "/")]
    if args.forwarded:
        ip, port = parse_addr(args.forwarded)
        headers.append(("forwarded", f'for="{format_addr(ip, port)}"'))
    return headers


def run_client(args):
    """Exit status 0, or 3 when TLS or the connection failed (after printing why)."""
    sock = None
    try:
        host, port = parse_listen(args.connect)
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        ctx = tls_context(args, server_side=False)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=None)
            log(f"TLS {json.dumps(tls_facts(sock, 'client'), sort_keys=True)}")
        client_exchange(sock, args)
    except ssl.SSLError as e:
        log(f"TLS_ERROR {e}")
        return 3
    except (OSError, h2.exceptions.ProtocolError) as e:
        log(f"CONNECTION_ERROR {type(e).__name__}: {e}")
        return 3
    finally:
        if sock is not None:
            sock.close()
    return 0


def client_exchange(sock, args):
    bad = args.method != "CONNECT" or args.scheme_path or args.authority is not None
    peer = Peer(sock, client_side=True, validate=not bad)
    peer.start(CLIENT_SETTINGS)
    stream_id = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(stream_id, request_headers(args), end_stream=False)
    peer.flush()
    data = payload(args)
    received = bytearray()
    status = None
    done = False
    while not done:
        events = peer.receive()
        if events is None:
            log("EOF")
            break
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[":status"])
                log(f"STATUS {status}")
                if status == 200:
                    peer.queue(stream_id, data, True)
            elif isinstance(event, h2.events.DataReceived):
                peer.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                received += event.data
            elif isinstance(event, h2.events.StreamEnded):
                done = True
            elif isinstance(event, h2.events.StreamReset):
                log(f"RESET {int(event.error_code)}")
                done = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                log(f"GOAWAY {int(event.error_code)}")
                done = True
        peer.pump()
    if status == 200:
        log(f"SENT {len(data)}")
        log(f"RECEIVED {len(received)}")
        log(f"ECHO_MATCH {'true' if bytes(received) == data else 'false'}")
        if args.message is not None:
            log(f"BODY {bytes(received)!r}")
    try:
        peer.conn.close_connection()
        peer.flush()
    except (OSError, h2.exceptions.ProtocolError):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    server = sub.add_parser("server")
    server.add_argument("--listen", default="127.0.0.1:0")
    server.add_argument("--deny", action="append", default=[], help="target ip:port answered 401")
    server.add_argument(
        "--unreachable", action="append", default=[], help="target ip:port answered 503"
    )
    server.add_argument(
        "--local-ip",
        action="append",
        default=[],
        type=ipaddress.ip_address,
        help="accepted authority IPs (others get 400); all when not given",
    )
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True, help="HBONE server ip:port")
    client.add_argument("--target", default="127.0.0.1:80", help="CONNECT authority ip:port")
    client.add_argument("--forwarded", help="original client ip:port for the forwarded header")
    client.add_argument("--size", type=int, default=0, help="payload bytes to send and expect back")
    client.add_argument("--message", help="payload text (instead of --size)")
    client.add_argument("--method", default="CONNECT", help="bad-request test: another method")
    client.add_argument("--authority", help="bad-request test: raw :authority ('' to omit it)")
    client.add_argument(
        "--scheme-path", action="store_true", help="bad-request test: add :scheme and :path"
    )
    for p in (server, client):
        p.add_argument("--cert", help="PEM certificate chain: enables TLS 1.3 + ALPN h2")
        p.add_argument("--key", help="PEM private key for --cert")
        p.add_argument("--ca", help="PEM roots to verify the peer with")
    args = parser.parse_args()
    if args.mode == "server":
        args.deny = {format_addr(*parse_addr(t)) for t in args.deny}
        args.unreachable = {format_addr(*parse_addr(t)) for t in args.unreachable}
        run_server(args)
        return 0
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
