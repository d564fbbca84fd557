#!/usr/bin/env python3
"""Load for `cargo xtask soak`: many concurrent connections, each carrying its own bytes.

  server --port P
      echoes every connection's bytes until EOF, then closes; prints `listening`.
  client --to IP:PORT --count N --bytes B --go FILE
      opens N connections (a 1-byte round trip on each proves it is carried end to end) and keeps them
      all open; prints `OPEN {json}`; waits until FILE exists; then, on all N at once, sends B bytes of
      a pattern unique to the connection, reads the echo back and compares, half-closes and reads to
      EOF; prints `DONE {json}` with the counts of intact and failed connections.

asyncio, one process: the load generator's own cost stays out of the agents' figures.
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pattern(i, n):
    seed = f"conn-{i:06d}-".encode()
    return (seed * (n // len(seed) + 1))[:n]


async def serve(port):
    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


async def client(args):
    host, port = args.to.rsplit(":", 1)
    port = int(port)
    start = time.monotonic()
    gate = asyncio.Semaphore(256)
    conns = [None] * args.count
    errors = []

    async def open_one(i):
        async with gate:
            for attempt in range(3):
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                    w.write(b"h")
                    await w.drain()
                    if await asyncio.wait_for(r.readexactly(1), 30) != b"h":
                        raise ValueError("bad round trip")
                    conns[i] = (r, w)
                    return
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                    if attempt == 2:
                        errors.append(f"{i}: {type(e).__name__}: {e}")
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(open_one(i) for i in range(args.count)))
    opened = sum(c is not None for c in conns)
    print("OPEN " + json.dumps({"open": opened, "failed": len(errors),
                                 "errors": errors[:5],
                                 "elapsed_ms": int((time.monotonic() - start) * 1000)}), flush=True)
    while not os.path.exists(args.go):
        await asyncio.sleep(0.1)

    start = time.monotonic()
    xfer = asyncio.Semaphore(2048)
    bad = []

    async def carry(i):
        r, w = conns[i]
        want = pattern(i, args.bytes)
        async with xfer:
            try:
                w.write(want)
                await w.drain()
                got = await asyncio.wait_for(r.readexactly(len(want)), 60)
                w.write_eof()
                rest = await asyncio.wait_for(r.read(), 60)
                w.close()
                if got != want or rest:
                    bad.append(f"{i}: bytes differ")
                    return False
                return True
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                bad.append(f"{i}: {type(e).__name__}: {e}")
                return False

    results = await asyncio.gather(*(carry(i) for i in range(args.count) if conns[i] is not None))
    print("DONE " + json.dumps({"intact": sum(results), "failed": len(results) - sum(results),
                                 "errors": bad[:5], "bytes_each": args.bytes,
                                 "elapsed_ms": int((time.monotonic() - start) * 1000)}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--to")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--bytes", type=int, default=16384)
    p.add_argument("--go")
    args = p.parse_args()
    raise_nofile()
    if args.mode == "server":
        asyncio.run(serve(args.port))
    else:
        asyncio.run(client(args))


if __name__ == "__main__":
    sys.exit(main())
