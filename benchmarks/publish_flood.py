#!/usr/bin/env python3
"""What one publishing flooder costs another client: its ping round trip, side by side in one run.

    python benchmarks/publish_flood.py [--seconds 6] [--pings 1000]

A gateway process (standalone engine, uvloop) is started per phase; a prober connection sends
`{"op":"ping","id":k}` and waits for its `pong`, one at a time (--pings of them, 1 ms apart), and the
round trip of each is recorded. Phases:

  idle        no other client;
  flood       a flooder process on its own connection sends fire-and-forget publishes as fast as its
              socket takes them, with the gateway's default --publish-rate (1000/s, burst 2000): over
              its rate it gets `rate_limited` and its socket is not read until its next token;
  flood-off   the same flooder with --publish-rate 0 (no limit): what it cost before the limit.

Reported per phase: the prober's RTT p50/p90/p99/max (ms), the gateway's CPU time per second of the
phase, and what the flooder got (publishes written by it, errors received). Results go to
benchmarks/results/publish_flood.json. Every loop is bounded in count and time; children are stopped
by their own pid.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "load")]  # benchmarks/: _procs; benchmarks/load/: loadgen
from loadgen import ws_client_frame  # noqa: E402 (after the sys.path insert above)

from _procs import machine, proc_cpu_seconds, require_installed_package  # noqa: E402

HOST = "127.0.0.1"
ROOT = os.path.dirname(HERE)


def text(obj: dict) -> bytes:
    return ws_client_frame(json.dumps(obj, separators=(",", ":")).encode())


def open_ws(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed during the upgrade")
        buf += chunk
    if not buf.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {buf[:80]!r}")
    rest = buf.split(b"\r\n\r\n", 1)[1]
    sock.sendall(text({"op": "connect", "client": "publish_flood/1"}))
    while b'"connected"' not in rest:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed before connected")
        rest += chunk
    return sock


def flooder(port: int, seconds: float) -> None:
    """Child: publish as fast as the socket takes it for `seconds`; print one JSON line of counts."""
    sock = open_ws(port)
    batch = b"".join(text({"op": "publish", "subject": "/flood/1", "content": f"m{i}"}) for i in range(100))
    counts = {"sent": 0, "errors": 0, "bytes_in": 0}
    stop = threading.Event()

    def drain() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            counts["bytes_in"] += len(chunk)
            counts["errors"] += chunk.count(b'"rate_limited"')

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(batch)  # blocks while the gateway does not read us: that is the point
        except TimeoutError:
            continue
        except OSError:
            break
        counts["sent"] += 100
    stop.set()
    reader.join(1.0)
    sock.close()
    print(json.dumps(counts), flush=True)


def probe(port: int, pings: int, max_seconds: float) -> list[float]:
    """Ping round trips in ms, one at a time, 1 ms apart."""
    sock = open_ws(port)
    sock.settimeout(5)
    rtts = []
    buf = b""
    deadline = time.monotonic() + max_seconds
    for k in range(pings):
        if time.monotonic() > deadline:
            break
        want = f'"id":{k}'.encode()
        t0 = time.perf_counter()
        sock.sendall(text({"op": "ping", "id": k}))
        while want not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the prober was closed")
            buf += chunk
        rtts.append((time.perf_counter() - t0) * 1000)
        buf = buf[buf.index(want) + len(want):]
        time.sleep(0.001)
    sock.close()
    return rtts


def start_gateway(extra: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0", "--log-level", "error",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/")
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"gateway did not start: {line!r}")
    return proc, int(m.group(1))


def phase(name: str, gateway_flags: list[str], flood: bool, args: argparse.Namespace) -> dict:
    gw, port = start_gateway(gateway_flags)
    child = None
    try:
        if flood:
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--flooder", str(port),
                                      "--seconds", str(args.seconds + 2)], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # the flood is on before the first ping
        cpu0, t0 = proc_cpu_seconds(gw.pid), time.monotonic()
        rtts = probe(port, args.pings, args.seconds)
        cpu = (proc_cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - t0)
        got = {}
        if child is not None:
            out, _ = child.communicate(timeout=args.seconds + 30)
            got = json.loads(out.strip().splitlines()[-1])
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        gw.terminate()
        gw.wait(10)
    q = statistics.quantiles(rtts, n=100)
    row = {"phase": name, "pings": len(rtts), "rtt_ms_p50": round(q[49], 3), "rtt_ms_p90": round(q[89], 3),
           "rtt_ms_p99": round(q[98], 3), "rtt_ms_max": round(max(rtts), 3), "gateway_cpu_per_s": round(cpu, 3),
           "flooder": got}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="longest a phase's probing lasts")
    ap.add_argument("--pings", type=int, default=1000)
    ap.add_argument("--flooder", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flooder is not None:
        return flooder(args.flooder, args.seconds)
    rows = [phase("idle", [], False, args),
            phase("flood", [], True, args),
            phase("flood-off", ["--publish-rate", "0"], True, args)]
    out = {"machine": machine(), "args": vars(args), "rows": rows,
           "ratio_p50_flood_vs_idle": round(rows[1]["rtt_ms_p50"] / rows[0]["rtt_ms_p50"], 2),
           "ratio_p50_flood_off_vs_idle": round(rows[2]["rtt_ms_p50"] / rows[0]["rtt_ms_p50"], 2)}
    path = os.path.join(ROOT, "benchmarks", "results", "publish_flood.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
