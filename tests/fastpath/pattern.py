"""A byte stream that checks itself, for the fast-path tests.

Every byte at stream offset i is i % 251 (251 is prime, so a repeated, lost or reordered run of bytes
shows unless its length is a multiple of 251; the total catches those).

  server PORT [--rcvbuf N] [--pause-every K --pause S] [--stall-at BYTES --stall S]
      Accepts connections one after another; reads each to its end in 32 KiB reads (pausing S seconds
      every K reads, or once for S seconds after BYTES), checks every byte, and answers
      "<bytes received> <first offset that differs, or -1>". Prints "listening" once bound.
  client HOST PORT BYTES [--pause-at BYTES --go FILE]
      Sends a few small writes 20 ms apart (the agent joins a pair at a quiet moment after its
      first 5 ms), then the rest of BYTES; with --pause-at, prints PAUSED at that offset and waits
      for FILE to exist. Then half-closes and prints "RESULT <the server's answer>".
"""
import os
import socket
import sys
import time

PRIME = 251
CHUNK = 262144
PATTERN = bytes(range(PRIME)) * (CHUNK // PRIME + 2)


def opt(name, default=None, kind=int):
    if name in sys.argv:
        return kind(sys.argv[sys.argv.index(name) + 1])
    return default


def expected(at, n):
    return PATTERN[at % PRIME : at % PRIME + n]


def server(port):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rcvbuf = opt("--rcvbuf")
    if rcvbuf:
        l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    l.bind(("0.0.0.0", port))
    l.listen(16)
    print("listening", flush=True)
    every, pause = opt("--pause-every"), opt("--pause", 0.0, float)
    stall_at, stall = opt("--stall-at"), opt("--stall", 0.0, float)
    while True:
        c, _ = l.accept()
        n, bad, reads, stalled = 0, -1, 0, False
        while True:
            b = c.recv(32768)
            if not b:
                break
            if bad < 0 and b != expected(n, len(b)):
                want = expected(n, len(b))
                bad = n + next(i for i in range(len(b)) if b[i] != want[i])
            n += len(b)
            reads += 1
            if every and reads % every == 0:
                time.sleep(pause)
            if stall_at is not None and n >= stall_at and not stalled:
                stalled = True
                time.sleep(stall)
        c.sendall(f"{n} {bad}".encode())
        c.close()


def client(host, port, total):
    pause_at, go = opt("--pause-at"), opt("--go", kind=str)
    s = socket.create_connection((host, port))
    sent = 0

    def send(upto):
        nonlocal sent
        while sent < upto:
            k = min(CHUNK, upto - sent)
            s.sendall(expected(sent, k))
            sent += k

    for i in range(1, 6):
        send(min(i * 1024, total))
        time.sleep(0.02)
    if pause_at is not None:
        send(pause_at)
        print("PAUSED", flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
    send(total)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(100)
        if not b:
            break
        got += b
    print("RESULT", got.decode(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
