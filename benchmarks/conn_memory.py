#!/usr/bin/env python3
"""Where one gateway connection's memory goes: tracemalloc around K real connections (issue 12).

    pip install ".[bench]"
    python benchmarks/conn_memory.py                 # K = 2,000; a few seconds

A gateway (default settings, standalone, uvloop) runs in this process with tracemalloc. A client
process opens K WebSocket connections over loopback (source address 127.0.0.2; blocking sockets, one
after the other), each doing the upgrade, `connect` and one `subscribe` of 3 of /matches/football/1..10
as benchmarks/load/loadgen.py does, and waits for its 3 `subscribed`. 100 connections opened first make
the subjects' own state, so that the difference of two snapshots taken around the K connections is
what the connections themselves hold. Printed and written to benchmarks/results/conn_memory.json:
bytes per connection by the line that allocated them (the transport's parts are allocated by uvloop
in C and show up at the event loop's line) and by block size, the sizes of the objects one connection
owns, and the RSS growth per connection (which tracemalloc's own bookkeeping inflates here: the
figure to quote is the loadgen's, without tracemalloc).

tracemalloc counts what Python's allocators hand out (objects, PyMem_* blocks, libuv's handles through
PyMem_RawMalloc); the kernel's socket memory is not in it (loadgen reports it from /proc/slabinfo).
Internal role: --role client (spawned by the orchestrator).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _procs import machine, require_installed_package, rss_bytes  # noqa: E402
from gateway_vs_websockets import mask_frame  # noqa: E402 (the raw client side of that benchmark)

SUBJECTS = 10
PER_CONNECTION = 3
WARM = 100


def client(port: int, k: int, src: str, first: int) -> None:
    """Open k connections, each subscribed to 3 subjects; print `ready`, hold them until stdin closes."""
    socks = []
    deadline = time.monotonic() + 120
    for i in range(first, first + k):
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0))
        subs = [{"subject": f"/matches/football/{(i + 3 * j) % SUBJECTS + 1}"} for j in range(PER_CONNECTION)]
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                  + mask_frame(0x1, b'{"op":"connect"}')
                  + mask_frame(0x1, json.dumps({"op": "subscribe", "subjects": subs}).encode()))
        buf = b""
        while buf.count(b'"subscribed"') < PER_CONNECTION:
            data = s.recv(65536)
            if not data or time.monotonic() > deadline:
                raise SystemExit(f"connection {i}: closed or too slow: {buf[-200:]!r}")
            buf += data
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()


async def open_clients(port: int, k: int, src: str, first: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--role", "client", "--port", str(port), "--connections", str(k),
        "--src", src, "--first", str(first), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 180)
    if line.strip() != b"ready":
        raise SystemExit(f"client process failed: {line!r}")
    return proc


def rss() -> int:
    return rss_bytes(os.getpid())["VmRSS"]


def _where(trace: tracemalloc.Traceback) -> str:
    frame = trace[0]
    return f"{os.path.relpath(frame.filename, os.path.dirname(os.path.dirname(frame.filename)))}:{frame.lineno}"


async def measure(k: int) -> dict:
    from gateway.config import Config, validate
    from gateway.server import Gateway

    gw = Gateway(validate(Config(port=0, node_id="conn-memory")))
    await gw.start()
    procs = [await open_clients(gw.port, WARM, "127.0.0.3", 0)]
    try:
        gc.collect()
        tracemalloc.start()
        before, rss0 = tracemalloc.take_snapshot(), rss()
        procs.append(await open_clients(gw.port, k, "127.0.0.2", WARM))
        await asyncio.sleep(0.5)  # the last replies flushed
        gc.collect()
        after, rss1 = tracemalloc.take_snapshot(), rss()
        tracemalloc.stop()
        assert len(gw.sessions) == WARM + k, len(gw.sessions)
        by_line = [{"where": _where(d.traceback), "bytes_per_connection": round(d.size_diff / k, 1),
                    "blocks_per_connection": round(d.count_diff / k, 2)}
                   for d in after.compare_to(before, "lineno") if abs(d.size_diff) >= 4 * k]
        sizes0 = collections.Counter((t.size, _where(t.traceback)) for t in before.traces)
        sizes1 = collections.Counter((t.size, _where(t.traceback)) for t in after.traces)
        by_block = [{"size": size, "where": where, "per_connection": round(n / k, 2)}
                    for (size, where), n in sorted((sizes1 - sizes0).items(), key=lambda kv: -kv[0][0] * kv[1])
                    if n >= k // 2]
        session = next(iter(gw.sessions))
        transport = session.transport
        own = [o for o in gc.get_referents(session) if type(o) in (tuple, set, dict, list, bytes, float)]
        objects = {"session": sys.getsizeof(session), "transport": sys.getsizeof(transport),
                   "transport_referents": {type(o).__name__: sys.getsizeof(o) for o in gc.get_referents(transport)
                                           if len(gc.get_referrers(o)) <= 2},
                   "session_containers": [f"{type(o).__name__} {sys.getsizeof(o)}" for o in own]}
        total = sum(d.size_diff for d in after.compare_to(before, "filename"))
        return {"connections": k, "subjects_per_connection": PER_CONNECTION,
                "traced_bytes_per_connection": round(total / k, 1),
                "rss_bytes_per_connection_with_tracemalloc": round((rss1 - rss0) / k),
                "by_line": by_line, "by_block": by_block, "objects": objects}
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
        await gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000, help="K connections measured (100..5000)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "conn_memory.json"))
    ap.add_argument("--role", choices=["client"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "client":
        return client(args.port, args.connections, args.src, args.first)
    if not 100 <= args.connections <= 5000:
        raise SystemExit("--connections: 100..5000 (one blocking client process)")
    require_installed_package()
    import uvloop

    result = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              **uvloop.run(measure(args.connections))}
    print(f"{result['connections']} connections, 3 subscriptions each: {result['traced_bytes_per_connection']} B "
          "per connection traced by tracemalloc")
    for row in result["by_line"]:
        print(f"  {row['bytes_per_connection']:8.1f} B  {row['blocks_per_connection']:5.2f} blocks  {row['where']}")
    print("blocks of one size allocated about once per connection (size, where, per connection):")
    for row in result["by_block"]:
        print(f"  {row['size']:5d} B  x{row['per_connection']:.2f}  {row['where']}")
    print("objects:", json.dumps(result["objects"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
