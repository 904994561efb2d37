#!/usr/bin/env python3
"""RSS per idle, connected, subscribed WebSocket connection: the real gateway vs a websockets server.

    cd /work/main && python setup.py build_ext --inplace -q
    python benchmarks/memory_per_conn.py           # ~1-2 minutes on 2 cores (bounded: 8 minutes)

Servers (each started fresh for every repetition, standalone, on 127.0.0.1):

  gateway      `python -m gateway serve --port 0` exactly as operated (default flags: heartbeat 15 s,
               1 MiB limits, picows + fanout)
  websockets   a plain websockets (asyncio API, uvloop, default settings) broadcast server speaking
               the same subset of the protocol: answers connect with connected, subscribe with
               subscribed, and keeps one set of connections per subject

Clients: separate processes (<= 5000 connections each: the open-files limit is 20k per process),
raw asyncio sockets doing the HTTP upgrade, then a masked `connect` frame, then a masked
`subscribe` to one of 100 subjects; they answer pings with pongs and otherwise stay idle.

For N = 0, 5000, 15000 connections (grown in that order in the same server) the server's VmRSS is
read from /proc once it has settled; reported: (RSS_N - RSS_0) / N, the marginal
(RSS_15000 - RSS_5000) / 10000, and an extrapolation to 1M connections. Repeated --repeats times
(median). Output: benchmarks/results/memory_per_conn.json.
Internal roles: --role clients|ws-server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time

from _procs import HOST, Child, StdinLines, machine, reply, rss_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_JSON = os.path.join(HERE, "results", "memory_per_conn.json")
CLIENTS_MAX = 5000        # connections per client process
SUBJECTS = 100
RUN_BUDGET = 8 * 60
TARGET_BYTES = 2048       # the gateway's target per idle subscribed connection
ONE_MILLION = 1_000_000
FDS_PER_PROCESS = 19_000  # what one process can serve under the 20k open-files limit


# ---------------------------------------------------------------------------------------------------
# Client processes

def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.3)."""
    key = os.urandom(4)
    n = len(payload)
    if n <= 125:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n <= 0xFFFF:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    if n:
        m = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")
    return head + key + payload


class IdleClient(asyncio.Protocol):
    """upgrade -> connect -> subscribe, then idle; answers pings."""

    HS, CONNECTING, SUBSCRIBING, READY, DONE = range(5)

    def __init__(self, port: int, subject: str, ready: asyncio.Future, stats: dict) -> None:
        self.port = port
        self.subject = subject
        self.ready = ready
        self.stats = stats
        self.state = self.HS
        self.buf = b""
        self.tr: asyncio.Transport | None = None

    def connection_made(self, tr) -> None:
        self.tr = tr
        tr.write(f"GET /ws HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())

    def _fail(self, why: str) -> None:
        self.state = self.DONE
        if not self.ready.done():
            self.ready.set_result(why)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.state == self.HS:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                return self._fail(f"upgrade refused: {self.buf[:40]!r}")
            self.buf = self.buf[end + 4:]
            self.state = self.CONNECTING
            self.tr.write(mask_frame(0x1, b'{"op":"connect","client":"memory_per_conn/1"}'))
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, head = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, head = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < head + n:
                return
            payload = self.buf[head:head + n]
            self.buf = self.buf[head + n:]
            self._frame(b0 & 0x0F, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:
            self.stats["pings"] += 1
            self.tr.write(mask_frame(0xA, payload))
        elif opcode == 0x8:
            self.stats["closed_by_server"] += 1
            self._fail("closed by the server")
        elif opcode == 0x1:
            op = json.loads(payload).get("op")
            if self.state == self.CONNECTING and op == "connected":
                self.state = self.SUBSCRIBING
                self.tr.write(mask_frame(0x1, json.dumps(
                    {"op": "subscribe", "subjects": [{"subject": self.subject}]}).encode()))
            elif self.state == self.SUBSCRIBING and op == "subscribed":
                self.state = self.READY
                if not self.ready.done():
                    self.ready.set_result(None)
            elif op == "error":
                self._fail(f"error: {payload[:120]!r}")
            else:
                self.stats["other_frames"] += 1

    def connection_lost(self, exc) -> None:
        self.stats["lost"] += 1
        self._fail(f"connection lost: {exc!r}")


async def clients_main() -> None:
    loop = asyncio.get_running_loop()
    ctl = StdinLines()
    await ctl.open()
    stats = {"pings": 0, "lost": 0, "closed_by_server": 0, "other_frames": 0}
    held: list = []
    reply({"pid": os.getpid()})
    sem = asyncio.Semaphore(200)

    async def one(port: int, idx: int, timeout: float):
        async with sem:
            ready = loop.create_future()
            subject = f"/bench/room/{idx % SUBJECTS}"
            tr, proto = await loop.create_connection(lambda: IdleClient(port, subject, ready, stats), HOST, port)
            held.append(proto)
            why = await asyncio.wait_for(ready, timeout)
            return why

    while True:
        cmd = await ctl.next()
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "open":
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(one(cmd["port"], cmd["first"] + i, cmd["timeout"]) for i in range(cmd["n"])),
                return_exceptions=True)
            errors = [repr(r) if isinstance(r, BaseException) else r for r in results if r is not None]
            reply({"ready": sum(1 for p in held if p.state == IdleClient.READY), "errors": len(errors),
                   "first_error": errors[0] if errors else None, "seconds": time.monotonic() - t0})
        elif cmd["op"] == "status":
            reply({"ready": sum(1 for p in held if p.state == IdleClient.READY), **stats})
    for p in held:
        if p.tr is not None:
            p.tr.abort()


# ---------------------------------------------------------------------------------------------------
# The websockets comparison server

async def ws_server_main() -> None:
    import secrets  # noqa: PLC0415

    from websockets.asyncio.server import serve  # noqa: PLC0415

    subs: dict[str, set] = {}

    async def handler(ws) -> None:
        mine: list[str] = []
        try:
            async for message in ws:
                req = json.loads(message)
                op = req.get("op")
                if op == "connect":
                    await ws.send(json.dumps({"op": "connected", "session": secrets.token_hex(8),
                                              "server": "websockets", "heartbeat_ms": 20000, "version": 1}))
                elif op == "subscribe":
                    for entry in req.get("subjects", []):
                        subject = entry["subject"]
                        subs.setdefault(subject, set()).add(ws)
                        mine.append(subject)
                        await ws.send(json.dumps({"op": "subscribed", "subject": subject, "epoch": "e",
                                                  "seq": 0, "recovered": False}))
        finally:
            for subject in mine:
                subs[subject].discard(ws)

    server = await serve(handler, HOST, 0, backlog=4096)  # websockets' defaults otherwise
    port = server.sockets[0].getsockname()[1]
    print(f"websockets serving on http://{HOST}:{port}/", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------------
# Orchestrator

def start_server(kind: str, env: dict, logfile) -> tuple[Child, int]:
    if kind == "gateway":
        argv = [sys.executable, "-m", "gateway", "serve", "--port", "0"]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "--role", "ws-server"]
    srv = Child(argv, env=env, name=kind, stderr=logfile, cwd=ROOT)
    line = srv.readline(60).decode()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        raise RuntimeError(f"{kind}: unexpected first line {line!r}")
    return srv, int(m.group(1))


def settled_rss(pid: int) -> dict:
    """VmRSS once two readings 0.5 s apart agree within 64 KiB (at most ~5 s), median of 3 readings."""
    last = rss_bytes(pid)["VmRSS"]
    for _ in range(10):
        time.sleep(0.5)
        now = rss_bytes(pid)["VmRSS"]
        if abs(now - last) < 65536:
            break
        last = now
    readings = []
    for _ in range(3):
        readings.append(rss_bytes(pid))
        time.sleep(0.2)
    return {k: statistics.median(r[k] for r in readings) for k in readings[0]}


def measure(kind: str, ns: list[int], env: dict, deadline: float) -> dict:
    """One fresh server, grown through ns; -> {N: rss dict}."""
    with tempfile.TemporaryFile() as log:
        srv, port = start_server(kind, env, log)
        clients: list[Child] = []
        try:
            time.sleep(1.0)
            out = {"0": settled_rss(srv.pid)}
            held = 0
            n_procs = -(-max(ns) // CLIENTS_MAX)
            for _ in range(n_procs):
                c = Child([sys.executable, os.path.abspath(__file__), "--role", "clients"], env=env, name="clients")
                c.recv(60)
                clients.append(c)
            per_proc = [0] * n_procs
            for n in ns:
                if time.monotonic() > deadline:
                    raise TimeoutError("run budget exceeded")
                # fill the client processes in order, <= CLIENTS_MAX each
                want, asked = n - held, []
                for i, c in enumerate(clients):
                    take = min(want, CLIENTS_MAX - per_proc[i])
                    if take > 0:
                        c.send({"op": "open", "port": port, "first": held, "n": take, "timeout": 120})
                        asked.append(c)
                        per_proc[i] += take
                        held += take
                        want -= take
                answers = [c.recv(180) for c in asked]
                ready = sum(c.call({"op": "status"})["ready"] for c in clients)
                if ready != n or any(a["errors"] for a in answers):
                    bad = next((a["first_error"] for a in answers if a["errors"]), None)
                    log.seek(0)
                    raise RuntimeError(f"{kind}: {ready} of {n} connections subscribed ({bad}); "
                                       f"server log tail: {log.read()[-800:]!r}")
                out[str(n)] = settled_rss(srv.pid)
                out[str(n)]["connect_seconds"] = max(a["seconds"] for a in answers)
            status = [c.call({"op": "status"}) for c in clients]
            out["client_status"] = {k: sum(s[k] for s in status) for k in status[0]}
            if out["client_status"]["lost"] or out["client_status"]["closed_by_server"]:
                raise RuntimeError(f"{kind}: connections were lost while idle: {out['client_status']}")
            return out
        finally:
            for c in clients:
                c.stop()
            srv.stop(term=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["clients", "ws-server"])
    ap.add_argument("--ns", default="5000,15000", help="connection counts after N=0 (default 5000,15000)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh servers per kind (median; default 3)")
    args = ap.parse_args()
    if args.role:
        import uvloop  # noqa: PLC0415

        uvloop.run(clients_main() if args.role == "clients" else ws_server_main())
        return 0

    from tqdm import tqdm  # noqa: PLC0415

    started = time.monotonic()
    deadline = started + RUN_BUDGET
    ns = sorted(int(x) for x in args.ns.split(","))
    kinds = ["gateway", "websockets"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    runs: dict = {k: [] for k in kinds}
    with tqdm(total=len(kinds) * args.repeats, desc="memory_per_conn", unit="server") as bar:
        for rep in range(args.repeats):
            for kind in kinds:
                bar.set_postfix_str(f"{kind} #{rep + 1}: 0 -> {' -> '.join(map(str, ns))} connections")
                runs[kind].append(measure(kind, ns, env, deadline))
                bar.update()

    summary: dict = {}
    for kind in kinds:
        rows = runs[kind]
        s: dict = {"rss0_bytes": statistics.median(r["0"]["VmRSS"] for r in rows)}
        for n in ns:
            s[f"rss_{n}_bytes"] = statistics.median(r[str(n)]["VmRSS"] for r in rows)
            s[f"per_conn_{n}"] = statistics.median((r[str(n)]["VmRSS"] - r["0"]["VmRSS"]) / n for r in rows)
            s[f"anon_per_conn_{n}"] = statistics.median((r[str(n)]["RssAnon"] - r["0"]["RssAnon"]) / n for r in rows)
        lo, hi = ns[0], ns[-1]
        s["marginal_per_conn"] = statistics.median(
            (r[str(hi)]["VmRSS"] - r[str(lo)]["VmRSS"]) / (hi - lo) for r in rows)
        per = s[f"per_conn_{hi}"]
        procs = -(-ONE_MILLION // FDS_PER_PROCESS)
        s["extrapolated_1M"] = {
            "per_conn_used": per,
            "one_process_bytes": s["rss0_bytes"] + per * ONE_MILLION,
            "processes_at_19k_conns": procs,
            "sharded_bytes": procs * s["rss0_bytes"] + per * ONE_MILLION,
        }
        summary[kind] = s
    g, w = summary["gateway"], summary["websockets"]
    hi = ns[-1]
    doc = {
        "config": {"ns": [0, *ns], "repeats": args.repeats, "subjects": SUBJECTS, "clients_per_process": CLIENTS_MAX,
                   **machine(), "seconds": round(time.monotonic() - started, 1)},
        "summary": summary,
        "target": {"per_conn_bytes_max": TARGET_BYTES, "gateway_per_conn": g[f"per_conn_{hi}"],
                   "met": g[f"per_conn_{hi}"] <= TARGET_BYTES,
                   "websockets_over_gateway": w[f"per_conn_{hi}"] / g[f"per_conn_{hi}"]},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
    with open(RESULTS_JSON, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)

    print(f"\n{'server':<12}{'RSS_0':>10}" + "".join(f"{'RSS_' + str(n):>12}{'/conn':>9}" for n in ns)
          + f"{'marginal':>10}{'1M conns':>11}")
    for kind in kinds:
        s = summary[kind]
        cells = "".join(f"{s[f'rss_{n}_bytes'] / 2**20:>10.1f}MB{s[f'per_conn_{n}']:>8,.0f}B" for n in ns)
        print(f"{kind:<12}{s['rss0_bytes'] / 2**20:>8.1f}MB{cells}{s['marginal_per_conn']:>9,.0f}B"
              f"{s['extrapolated_1M']['one_process_bytes'] / 2**30:>9.2f}GiB")
    print(f"\ngateway per idle subscribed connection: {g[f'per_conn_{hi}']:,.0f} B "
          f"(target <= {TARGET_BYTES} B: {'met' if doc['target']['met'] else 'NOT met'}); "
          f"websockets uses {doc['target']['websockets_over_gateway']:.1f}x as much")
    print(f"written: {os.path.relpath(RESULTS_JSON)} ({doc['config']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
