"""A retransmitted segment that overlaps bytes already received, injected into a joined connection.

`server`: accepts one connection, answers each b"a" with b"b", and once the peer is quiet for 2 s prints
what it received as JSON. `client`: (in a netns with TCP timestamps off, so a hand-made segment without
them is valid) connects, exchanges a byte each way for a while (long enough for the agent to join the
two sockets in the kernel), then sends OLD bytes "o" and, once they are acknowledged, injects through a
raw socket one segment that starts OLD bytes before the connection's next sequence number — repeating
them — and carries NEW bytes "n" after them, as a TCP retransmission combining acknowledged and new
data would. TCP must deliver the NEW bytes once and the repeated head not at all. With a third argument,
the client prints EXCHANGED after the exchange and waits for that file to exist before going on.
"""
import json
import os
import socket
import struct
import sys
import time

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_REPAIR_OFF_NO_WP = -1
OLD, NEW = 700, 300


def server(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1)
    print("listening", flush=True)
    c, _ = ls.accept()
    c.settimeout(2.0)
    got = bytearray()
    while True:
        try:
            b = c.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        got += b
        c.sendall(b"b" * b.count(b"a"))
    print("RECEIVED " + json.dumps({
        "a": got.count(b"a"), "o": got.count(b"o"), "n": got.count(b"n"), "len": len(got),
    }), flush=True)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def seq_of(sock, queue):
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
        return struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)


def peer_of(local):
    """The connection's real peer (the agent's socket), from /proc/net/tcp: the capture may have
    rewritten where the app connected to."""
    want = "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(local[0]))[0], local[1])
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if f[1] == want and f[3] == "01":
            ip, port = f[2].split(":")
            return socket.inet_ntoa(struct.pack("<I", int(ip, 16))), int(port, 16)
    raise SystemExit("connection not found in /proc/net/tcp")


def client(to, port, hold=None):
    with open("/proc/sys/net/ipv4/tcp_timestamps", "w") as f:
        f.write("0")
    s = socket.create_connection((to, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(60):
        s.sendall(b"a")
        assert s.recv(1) == b"b"
        time.sleep(0.01)
    if hold:
        print("EXCHANGED", flush=True)
        deadline = time.time() + 20
        while not os.path.exists(hold) and time.time() < deadline:
            time.sleep(0.01)
    s.sendall(b"o" * OLD)
    time.sleep(0.3)
    local = s.getsockname()
    peer = peer_of(local)
    seq = seq_of(s, TCP_SEND_QUEUE)
    ack = seq_of(s, TCP_RECV_QUEUE)
    payload = b"o" * OLD + b"n" * NEW
    tcp = struct.pack("!HHIIBBHHH", local[1], peer[1], (seq - OLD) & 0xFFFFFFFF, ack,
                      5 << 4, 0x18, 65535, 0, 0) + payload
    pseudo = socket.inet_aton(local[0]) + socket.inet_aton(peer[0]) + struct.pack(
        "!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP,
                     0, socket.inet_aton(local[0]), socket.inet_aton(peer[0]))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.sendto(ip + tcp, (peer[0], 0))
    print("INJECTED " + json.dumps({"local": local, "peer": peer, "seq": seq, "ack": ack}), flush=True)
    time.sleep(3)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
