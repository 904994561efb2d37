#!/usr/bin/env python3
"""The gateway against a plain `websockets.broadcast` server, measured from outside in one run:
memory per idle subscribed connection and server CPU time per delivered message.

    pip install ".[bench]"   # the package with its compiled fanout; the benchmarks never import the checkout
    python benchmarks/gateway_vs_websockets.py          # 3-5 minutes on 2 cores (bounded: 8 minutes)
    python benchmarks/gateway_vs_websockets.py --quick  # one server of each kind, N=5000, ~30 s

Servers (both kinds started fresh for every repetition and run side by side, standalone, on
127.0.0.1, and treated as black boxes: only the command line, the listening socket, GET /healthz
and ../shared/PROTOCOL.md are used):

  gateway      `python -m gateway serve --port 0` exactly as operated (default flags; GATEWAY_*
               variables are removed from its environment so that the standalone engine runs)
  websockets   a plain websockets server (asyncio API, uvloop, default settings) speaking the same
               subset of the protocol: connect -> connected, subscribe -> subscribed, unsubscribe ->
               unsubscribed, publish -> `msg` {subject, content, epoch, seq, prev, ts} to every
               subscriber with one `websockets.broadcast()` call (seq 1, 2, 3 ... per subject), then an
               `ack` when the publish carries an id

The server being measured is pinned to CPU 0; the other server, the client processes and this
orchestrator to CPU 1.

Clients: separate processes (<= 5000 connections each: the open-files limit is 20k per process),
raw asyncio sockets written from the protocol: HTTP upgrade, masked `connect`, masked `subscribe` to
one of 100 "room" subjects; they answer pings with pongs. The port is found from the server's
listening socket in /proc, not from its output.

For N = 0, 5000, 15000 connections per server (grown in that order in the same servers):

1. Memory. With every connection idle and subscribed to its room only, the server's VmRSS is read
   once it has settled. Reported: (RSS_N - RSS_0) / N, the marginal (RSS_15000 - RSS_5000) / 10000
   and an extrapolation to 1M connections. This is the same state as the former memory_per_conn.py
   measured, so its numbers stay comparable.
2. CPU per delivery. Then --rounds delivery phases per server (default 1), alternating between the
   two servers (A B, then B A in the next round or repetition) so that each pair of neighbouring
   phases meets the same machine. In a
   phase every connection of that server also subscribes to a fresh subject `/bench/all/n<N>r<i>a<j>`
   (fresh, so no snapshot is involved). A publisher connection, also a raw client of
   the protocol, publishes --messages messages (default 20) to it, each with an `id`. The pace is
   closed-loop: message k+1 is published only after the `ack` of k has arrived and every client
   process has counted k messages on each of its connections. Clients check every `msg`: the epoch
   is the one of `subscribed`, seq = previous + 1 and prev = previous seq; gaps, repeats, reordering,
   epoch changes and prev mismatches are counted as errors. Reported: the server's CPU
   (utime + stime from /proc/<pid>/stat) from just before the first publish until every client has
   every message, divided by N x messages deliveries, in µs; also the same minus the server's idle
   CPU rate (measured for 1 s just before), deliveries/s over that wall time (closed loop, so it
   includes the clients' own work), N / the median publish->ack time (the server's own fan-out
   rate: PROTOCOL.md has the standalone gateway ack once the message is "stored and fanned out",
   and the websockets server acks after broadcast() returns), the clients' CPU per delivery, and
   the share of the machine that other processes used meanwhile. Afterwards every connection
   unsubscribes from the subject again, so that the next memory reading sees idle connections
   with one subscription only.
   Before a phase the script waits (<= 2 s) for an idle machine; a phase during which other
   processes used more than 10 % of the machine is run once more (with a fresh subject) if the rest
   of the run still looks like ending within 5 minutes, and the less disturbed attempt is kept.

All of it is repeated --repeats times (default 3) with fresh servers, the order of the kinds
alternating; tables show medians over all phases, and the websockets/gateway ratios are given as
ratio of medians | median of the ratios of neighbouring phases.
Output: benchmarks/results/gateway_vs_websockets.json.
Internal roles: --role clients|ws-server.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _procs import (
    HOST,
    Child,
    StdinLines,
    machine,
    machine_busy_seconds,
    proc_cpu_seconds,
    reply,
    require_installed_package,
    rss_bytes,
    wait_quiet,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_JSON = os.path.join(HERE, "results", "gateway_vs_websockets.json")
CLIENTS_MAX = 5000        # connections per client process
SUBJECTS = 100            # room subjects the idle connections are spread over
RUN_BUDGET = 8 * 60
SOFT_BUDGET = 5 * 60      # disturbed phases are re-run only while the run looks like ending within this
TARGET_BYTES = 2048       # the gateway's target per idle subscribed connection
ONE_MILLION = 1_000_000
FDS_PER_PROCESS = 19_000  # what one process can serve under the 20k open-files limit
SERVER_CPU, OTHER_CPU = 0, 1
IDLE_WINDOW = 1.0         # seconds of idle server CPU measured before each delivery phase
MSG_TIMEOUT = 60.0        # per published message: ack + every client has it
DISTURBED = 0.10          # a delivery phase during which other processes used more of the machine is re-run
MAX_ATTEMPTS = 2          # ... at most this many times in all (when the budget allows); the less disturbed is kept
ERROR_KEYS = ("seq_gap", "seq_missed", "seq_backwards", "prev_mismatch", "epoch_change",
              "snapshot_mismatch", "msg_unsubscribed", "error_frames")


# ---------------------------------------------------------------------------------------------------
# Raw WebSocket client side (from ../shared/PROTOCOL.md and RFC 6455 only)

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


def upgrade_request(port: int) -> bytes:
    return (f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def parse_frames(buf: bytes):
    """-> ([(opcode, payload)], rest) for the complete unmasked server frames at the start of buf."""
    out, pos, size = [], 0, len(buf)
    while size - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        n, head = b1 & 0x7F, 2
        if n == 126:
            if size - pos < 4:
                break
            n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            if size - pos < 10:
                break
            n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        if size - pos < head + n:
            break
        out.append((b0 & 0x0F, buf[pos + head:pos + head + n]))
        pos += head + n
    return out, buf[pos:]


class Tally:
    """Counters of one client process, with awaitable thresholds."""

    def __init__(self) -> None:
        self.c: collections.Counter = collections.Counter()
        self.waiters: list = []
        self.first_error: str | None = None

    def add(self, key: str, k: int = 1) -> None:
        self.c[key] += k
        if self.waiters:
            for w in list(self.waiters):
                if self.c[w[0]] >= w[1] and not w[2].done():
                    w[2].set_result(None)
                    self.waiters.remove(w)

    def error(self, key: str, why: str, k: int = 1) -> None:
        if self.first_error is None:
            self.first_error = why[:300]
        self.add(key, k)

    async def wait(self, key: str, target: int, timeout: float) -> bool:
        if self.c[key] >= target:
            return True
        w = (key, target, asyncio.get_running_loop().create_future())
        self.waiters.append(w)
        try:
            await asyncio.wait_for(w[2], timeout)
            return True
        except TimeoutError:
            if w in self.waiters:
                self.waiters.remove(w)
            return False


class BenchClient(asyncio.Protocol):
    """upgrade -> connect -> subscribe to its room; then idle (answers pings) and, on command,
    subscribes to / unsubscribes from the delivery subject and checks every `msg` it gets."""

    HS, CONNECTING, SUBSCRIBING, READY, DONE = range(5)

    def __init__(self, port: int, subject: str, ready: asyncio.Future, tally: Tally) -> None:
        self.port = port
        self.subject = subject
        self.ready = ready
        self.tally = tally
        self.state = self.HS
        self.buf = b""
        self.tr: asyncio.Transport | None = None
        self.pos: dict = {}  # subject -> [epoch, last seq], from `subscribed` on

    def connection_made(self, tr) -> None:
        self.tr = tr
        tr.write(upgrade_request(self.port))

    def _fail(self, why: str) -> None:
        self.state = self.DONE
        if not self.ready.done():
            self.ready.set_result(why)

    def send(self, obj) -> None:
        self.tr.write(mask_frame(0x1, json.dumps(obj).encode()))

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
            self.tr.write(mask_frame(0x1, b'{"op":"connect","client":"gateway_vs_websockets/1"}'))
        frames, self.buf = parse_frames(self.buf)
        for opcode, payload in frames:
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        t = self.tally
        if opcode == 0x9:
            t.add("pings")
            self.tr.write(mask_frame(0xA, payload))
            return
        if opcode == 0x8:
            t.add("closed_by_server")
            return self._fail(f"closed by the server: {payload[:60]!r}")
        if opcode != 0x1:
            t.add("other_frames")
            return
        m = json.loads(payload)
        op = m.get("op")
        if op == "msg":
            return self._msg(m, len(payload))
        if self.state == self.CONNECTING and op == "connected":
            self.state = self.SUBSCRIBING
            self.send({"op": "subscribe", "subjects": [{"subject": self.subject}]})
        elif self.state == self.SUBSCRIBING and op == "subscribed":
            self.pos[m["subject"]] = [m["epoch"], m["seq"]]
            self.state = self.READY
            if not self.ready.done():
                self.ready.set_result(None)
        elif op == "subscribed":
            self.pos[m["subject"]] = [m["epoch"], m["seq"]]
            t.add("subscribed")
        elif op == "unsubscribed":
            self.pos.pop(m["subject"], None)
            t.add("unsubscribed")
        elif op == "hb":
            t.add("hb")
        elif op == "error":
            t.error("error_frames", f"error frame: {payload[:200]!r}")
            if self.state != self.READY:
                self._fail(f"error: {payload[:120]!r}")
        else:
            t.add("other_frames")

    def _msg(self, m: dict, size: int) -> None:
        t = self.tally
        subject = m["subject"]
        p = self.pos.get(subject)
        if p is None:
            return t.error("msg_unsubscribed", f"msg of a subject not subscribed: {m}")
        seq = m["seq"]
        if m.get("snapshot"):
            if seq != p[1] or m["epoch"] != p[0]:
                t.error("snapshot_mismatch", f"snapshot {m['epoch']}/{seq} after subscribed {p}")
            t.add("snapshots")
            return
        if m["epoch"] != p[0]:
            t.error("epoch_change", f"{subject}: epoch {m['epoch']} after {p[0]}")
            p[0], p[1] = m["epoch"], seq
        else:
            last = p[1]
            if seq <= last:
                return t.error("seq_backwards", f"{subject}: seq {seq} after {last}")
            if seq != last + 1:
                t.error("seq_gap", f"{subject}: seq {seq} after {last}")
                t.add("seq_missed", seq - last - 1)
            elif "prev" in m and m["prev"] != last:
                t.error("prev_mismatch", f"{subject}: seq {seq} prev {m['prev']} after {last}")
            p[1] = seq
        t.add("msg_bytes", size)
        t.add("msgs")

    def connection_lost(self, exc) -> None:
        self.tally.add("lost")
        self._fail(f"connection lost: {exc!r}")


async def clients_main() -> None:
    loop = asyncio.get_running_loop()
    ctl = StdinLines()
    await ctl.open()
    tally = Tally()
    held: list[BenchClient] = []
    phase = {"msgs0": 0, "conns": 0}
    reply({"pid": os.getpid()})
    sem = asyncio.Semaphore(200)

    async def one(port: int, idx: int, timeout: float):
        async with sem:
            ready = loop.create_future()
            subject = f"/bench/room/{idx % SUBJECTS}"
            _, proto = await loop.create_connection(lambda: BenchClient(port, subject, ready, tally), HOST, port)
            held.append(proto)
            return await asyncio.wait_for(ready, timeout)

    def ready_conns() -> list[BenchClient]:
        return [p for p in held if p.state == BenchClient.READY]

    def status() -> dict:
        return {"ready": len(ready_conns()), **tally.c, "first_error": tally.first_error}

    while True:
        cmd = await ctl.next()
        op = cmd["op"]
        if op == "quit":
            break
        if op == "open":
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(one(cmd["port"], cmd["first"] + i, cmd["timeout"]) for i in range(cmd["n"])),
                return_exceptions=True)
            errors = [repr(r) if isinstance(r, BaseException) else r for r in results if r is not None]
            reply({"ready": len(ready_conns()), "errors": len(errors),
                   "first_error": errors[0] if errors else None, "seconds": time.monotonic() - t0})
        elif op in ("subscribe", "unsubscribe"):
            t0 = time.monotonic()
            conns = ready_conns()
            key = op + "d"
            target = tally.c[key] + len(conns)
            for p in conns:
                p.send({"op": "subscribe", "subjects": [{"subject": cmd["subject"]}]} if op == "subscribe"
                       else {"op": "unsubscribe", "subjects": [cmd["subject"]]})
            ok = await tally.wait(key, target, cmd["timeout"])
            if op == "subscribe":
                phase.update(msgs0=tally.c["msgs"], conns=len(conns))
            reply({"ok": ok, "conns": len(conns), key: tally.c[key] - (target - len(conns)),
                   "seconds": time.monotonic() - t0})
        elif op == "wait":  # until each phase connection has counted cmd["k"] messages
            ok = await tally.wait("msgs", phase["msgs0"] + cmd["k"] * phase["conns"], cmd["timeout"])
            reply({"ok": ok, "msgs": tally.c["msgs"] - phase["msgs0"], "expected": cmd["k"] * phase["conns"]})
        elif op == "status":
            reply(status())
    for p in held:
        if p.tr is not None:
            p.tr.abort()


class BlockingWS:
    """The publisher: a blocking raw-socket client of the protocol, used by the orchestrator."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(upgrade_request(port))
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._read(deadline)
        if not buf.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"publisher: upgrade refused: {buf[:60]!r}")
        self.buf = buf.split(b"\r\n\r\n", 1)[1]
        self.frames: collections.deque = collections.deque()

    def _read(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("publisher: no answer in time")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("publisher: connection closed by the server")
        return chunk

    def send(self, obj) -> None:
        self.sock.sendall(mask_frame(0x1, json.dumps(obj).encode()))

    def recv(self, timeout: float) -> dict:
        """The next protocol message (pings are answered on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.frames:
                opcode, payload = self.frames.popleft()
                if opcode == 0x9:
                    self.sock.sendall(mask_frame(0xA, payload))
                elif opcode == 0x8:
                    raise RuntimeError(f"publisher: closed by the server: {payload[:60]!r}")
                elif opcode == 0x1:
                    return json.loads(payload)
            self.buf += self._read(deadline)
            frames, self.buf = parse_frames(self.buf)
            self.frames.extend(frames)

    def expect(self, op: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(0.001, deadline - time.monotonic()))
            if m.get("op") == op:
                return m
            if m.get("op") == "error":
                raise RuntimeError(f"publisher: {m}")

    def close(self) -> None:
        try:
            self.sock.sendall(mask_frame(0x8, (1000).to_bytes(2, "big")))
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------------------------------
# The websockets comparison server

async def ws_server_main() -> None:
    import secrets  # noqa: PLC0415

    from websockets.asyncio.server import broadcast, serve  # noqa: PLC0415

    epoch = secrets.token_hex(4)
    subs: dict[str, set] = {}
    seqs: dict[str, int] = {}
    latest: dict[str, dict] = {}  # subject -> its latest msg (the snapshot)

    def dumps(obj) -> str:
        return json.dumps(obj, separators=(",", ":"))

    async def handler(ws) -> None:
        mine: list[str] = []
        connected = False
        try:
            async for message in ws:
                try:
                    req = json.loads(message)
                    op = req.get("op")
                except (ValueError, AttributeError):
                    await ws.send(dumps({"op": "error", "code": "bad_request", "message": "bad JSON"}))
                    continue
                if not connected:
                    if op != "connect":
                        await ws.send(dumps({"op": "error", "code": "not_connected", "message": "connect first"}))
                        await ws.close(1008)
                        return
                    connected = True
                    await ws.send(dumps({"op": "connected", "session": secrets.token_hex(8),
                                         "server": "websockets", "heartbeat_ms": 20000, "version": 1}))
                elif op == "subscribe":
                    for entry in req.get("subjects", []):
                        subject = entry["subject"]
                        subs.setdefault(subject, set()).add(ws)
                        if subject not in mine:
                            mine.append(subject)
                        await ws.send(dumps({"op": "subscribed", "subject": subject, "epoch": epoch,
                                             "seq": seqs.get(subject, 0), "recovered": False}))
                        if subject in latest:
                            await ws.send(dumps({**latest[subject], "snapshot": True}))
                elif op == "unsubscribe":
                    for subject in req.get("subjects", []):
                        subs.get(subject, set()).discard(ws)
                        if subject in mine:
                            mine.remove(subject)
                        await ws.send(dumps({"op": "unsubscribed", "subject": subject}))
                elif op == "publish":
                    subject = req["subject"]
                    seq = seqs.get(subject, 0) + 1
                    seqs[subject] = seq
                    msg = {"op": "msg", "subject": subject, "content": req["content"], "epoch": epoch,
                           "seq": seq, "prev": seq - 1, "ts": int(time.time() * 1000)}
                    latest[subject] = msg
                    broadcast(subs.get(subject, ()), dumps(msg))
                    if "id" in req:
                        await ws.send(dumps({"op": "ack", "id": req["id"], "subject": subject,
                                             "epoch": epoch, "seq": seq}))
                elif op == "ping":
                    await ws.send(dumps({"op": "pong", "id": req.get("id")}))
                else:
                    await ws.send(dumps({"op": "error", "code": "bad_request", "message": f"unknown op {op!r}"}))
        finally:
            for subject in mine:
                subs[subject].discard(ws)

    server = await serve(handler, HOST, 0, backlog=4096)  # websockets' defaults otherwise
    port = server.sockets[0].getsockname()[1]
    print(f"websockets serving on http://{HOST}:{port}/", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------------
# Orchestrator

def pin(pid: int, cpu: int | None) -> None:
    """Pin every thread of pid to one CPU (no-op when cpu is None)."""
    if cpu is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            pass


def listening_port(pid: int, timeout: float) -> int:
    """The TCP port pid listens on, from /proc (its socket fds matched with /proc/<pid>/net/tcp)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            for table in ("tcp", "tcp6"):
                with open(f"/proc/{pid}/net/{table}", encoding="ascii") as fh:
                    next(fh)
                    for line in fh:
                        f = line.split()
                        if f[3] == "0A" and f[9] in inodes:  # LISTEN
                            return int(f[1].rsplit(":", 1)[1], 16)
        except (OSError, StopIteration):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"pid {pid} listens on no TCP port after {timeout} s")


def healthz_ok(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            c.request("GET", "/healthz")
            last = c.getresponse().status
            c.close()
            if last == 200:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"GET /healthz on port {port}: {last!r} after {timeout} s")


class Server:
    def __init__(self, kind: str, env: dict, log, cpu: int | None) -> None:
        if kind == "gateway":
            argv = [sys.executable, "-P", "-m", "gateway", "serve", "--port", "0"]  # -P: not the checkout (cwd)
            env = {k: v for k, v in env.items() if not k.startswith("GATEWAY_")}
        else:
            argv = [sys.executable, os.path.abspath(__file__), "--role", "ws-server"]
        self.log = log
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=ROOT)
        self.pid = self.proc.pid
        try:
            self.port = listening_port(self.pid, 60)
            if kind == "gateway":
                healthz_ok(self.port, 60)
        except Exception:
            self.stop()
            raise
        pin(self.pid, cpu)

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-800:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(6)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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


def deliver(srv: Server, clients: list[Child], n: int, messages: int, deadline: float, subject: str) -> dict:
    """The CPU-per-delivery phase at n connections (see the module docstring)."""
    for c in clients:
        c.send({"op": "subscribe", "subject": subject, "timeout": 120})
    subs = [c.recv(150) for c in clients]
    conns = sum(s["conns"] for s in subs)
    if conns != n or not all(s["ok"] for s in subs):
        raise RuntimeError(f"only {sum(s['subscribed'] for s in subs)} of {n} connections subscribed to {subject}")
    pub = BlockingWS(srv.port)
    try:
        pub.send({"op": "connect", "client": "gateway_vs_websockets-publisher/1"})
        pub.expect("connected", 30)
        time.sleep(0.3)
        cpu_a, t_a = proc_cpu_seconds(srv.pid), time.monotonic()
        time.sleep(IDLE_WINDOW)
        idle_rate = (proc_cpu_seconds(srv.pid) - cpu_a) / (time.monotonic() - t_a)

        pids = [srv.pid, *(c.pid for c in clients)]
        cpu0 = {p: proc_cpu_seconds(p) for p in pids}
        own0, busy0, t0 = sum(os.times()[:2]), machine_busy_seconds(), time.monotonic()
        acks, epoch = [], None
        for k in range(1, messages + 1):
            if time.monotonic() > deadline:
                raise TimeoutError("run budget exceeded during a delivery phase")
            ts = time.monotonic()
            pub.send({"op": "publish", "subject": subject, "content": f"score {k}-0, minute {k}", "id": k})
            ack = pub.expect("ack", MSG_TIMEOUT)
            acks.append(time.monotonic() - ts)
            if ack.get("id") != k or ack.get("seq") != k or (epoch is not None and ack.get("epoch") != epoch):
                raise RuntimeError(f"unexpected ack for publish {k}: {ack}")
            epoch = ack["epoch"]
            for c in clients:
                c.send({"op": "wait", "k": k, "timeout": MSG_TIMEOUT})
            waits = [c.recv(MSG_TIMEOUT + 30) for c in clients]
            if not all(w["ok"] for w in waits):
                status = [c.call({"op": "status"}) for c in clients]
                raise RuntimeError(f"message {k} of {messages} did not reach every connection in {MSG_TIMEOUT} s: "
                                   f"{sum(w['msgs'] for w in waits)} of {sum(w['expected'] for w in waits)} "
                                   f"counted; clients: {status}")
        t1 = time.monotonic()
        cpu1 = {p: proc_cpu_seconds(p) for p in pids}
        own1, busy1 = sum(os.times()[:2]), machine_busy_seconds()
    finally:
        pub.close()
    wall = t1 - t0
    deliveries = n * messages
    server_cpu = cpu1[srv.pid] - cpu0[srv.pid]
    clients_cpu = sum(cpu1[p] - cpu0[p] for p in pids[1:])
    foreign = (busy1 - busy0) - server_cpu - clients_cpu - (own1 - own0)
    for c in clients:
        c.send({"op": "unsubscribe", "subject": subject, "timeout": 120})
    unsubs = [c.recv(150) for c in clients]
    if not all(u["ok"] for u in unsubs):
        raise RuntimeError(f"unsubscribe from {subject}: {unsubs}")
    return {
        "n": n, "subject": subject, "messages": messages, "deliveries": deliveries, "seconds": wall,
        "server_cpu_seconds": server_cpu,
        "cpu_us_per_delivery": server_cpu / deliveries * 1e6,
        "idle_cpu_per_second": idle_rate,
        "cpu_us_per_delivery_minus_idle": (server_cpu - idle_rate * wall) / deliveries * 1e6,
        "deliveries_per_s": deliveries / wall,
        "clients_cpu_us_per_delivery": clients_cpu / deliveries * 1e6,
        "foreign_cpu_share": max(0.0, foreign) / (wall * (os.cpu_count() or 1)),
        "ack_ms_median": statistics.median(acks) * 1e3,
        "fanout_per_s_by_ack": n / statistics.median(acks),
        "subscribe_seconds": max(s["seconds"] for s in subs),
    }


class Side:
    """One server under test with its own client processes."""

    def __init__(self, kind: str, env: dict, n_procs: int, pinned: bool) -> None:
        self.kind = kind
        self.pinned = pinned
        self.log = tempfile.TemporaryFile()
        self.srv = Server(kind, env, self.log, SERVER_CPU if pinned else None)
        self.clients: list[Child] = []
        self.per_proc = [0] * n_procs
        self.held = 0
        self.out: dict = {"deliveries": {}}
        for _ in range(n_procs):
            c = Child([sys.executable, os.path.abspath(__file__), "--role", "clients"], env=env, name="clients")
            c.recv(60)
            pin(c.pid, OTHER_CPU if pinned else None)
            self.clients.append(c)

    def grow(self, n: int) -> None:
        """Open connections up to n in all, filling the client processes in order (<= CLIENTS_MAX each)."""
        want, asked = n - self.held, []
        for i, c in enumerate(self.clients):
            take = min(want, CLIENTS_MAX - self.per_proc[i])
            if take > 0:
                c.send({"op": "open", "port": self.srv.port, "first": self.held, "n": take, "timeout": 120})
                asked.append(c)
                self.per_proc[i] += take
                self.held += take
                want -= take
        answers = [c.recv(180) for c in asked]
        ready = sum(c.call({"op": "status"})["ready"] for c in self.clients)
        if ready != n or any(a["errors"] for a in answers):
            bad = next((a["first_error"] for a in answers if a["errors"]), None)
            raise RuntimeError(f"{self.kind}: {ready} of {n} connections subscribed ({bad}); "
                               f"server log tail: {self.srv.log_tail()!r}")
        self.out[str(n)] = settled_rss(self.srv.pid)
        self.out[str(n)]["connect_seconds"] = max(a["seconds"] for a in answers)

    def active(self) -> list[Child]:
        return [c for c, k in zip(self.clients, self.per_proc) if k]

    def finish(self) -> dict:
        status = [c.call({"op": "status"}) for c in self.clients]
        total = collections.Counter()
        for s in status:
            total.update({k: v for k, v in s.items() if isinstance(v, int)})
        self.out["client_status"] = dict(total)
        self.out["client_first_error"] = next((s["first_error"] for s in status if s.get("first_error")), None)
        if total["lost"] or total["closed_by_server"]:
            raise RuntimeError(f"{self.kind}: connections were lost: {self.out['client_status']}; "
                               f"server log tail: {self.srv.log_tail()!r}")
        return self.out

    def stop(self) -> None:
        for c in self.clients:
            c.stop()
        self.srv.stop()
        self.log.close()


def measure(kinds: list[str], ns: list[int], messages: int, rounds: int, env: dict, deadline: float,
            pinned: bool, bar, steps_left) -> dict:
    """Fresh servers of both kinds, side by side, grown through ns: at every N, the RSS of each, then
    `rounds` delivery phases per server, alternating (A B, B A, ...), with the idle server moved off
    the measured server's CPU. A disturbed phase is re-run only if the rest of the run would still
    fit in SOFT_BUDGET (steps_left() -> steps still to do, mean seconds per step so far)."""
    sides: dict[str, Side] = {}
    try:
        n_procs = -(-max(ns) // CLIENTS_MAX)
        for kind in kinds:
            bar.set_postfix_str(f"starting {kind}")
            sides[kind] = Side(kind, env, n_procs, pinned)
        time.sleep(1.0)
        for side in sides.values():
            side.out["0"] = settled_rss(side.srv.pid)
        for n in ns:
            for kind, side in sides.items():
                if time.monotonic() > deadline:
                    raise TimeoutError("run budget exceeded")
                bar.set_postfix_str(f"{kind}: {n} connections, RSS")
                side.grow(n)
                side.out["deliveries"][str(n)] = []
                bar.update()
            for rnd in range(rounds):
                for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                    side = sides[kind]
                    if pinned:  # the measured server alone on its CPU; the other one waits with the clients
                        for other in sides.values():
                            pin(other.srv.pid, SERVER_CPU if other is side else OTHER_CPU)
                    bar.set_postfix_str(f"{kind}: {messages} messages to {n} connections, round {rnd + 1}")
                    attempts = []
                    for attempt in range(MAX_ATTEMPTS):
                        t_attempt = time.monotonic()
                        quiet = wait_quiet(limit=0.15, max_wait=2.0)
                        r = deliver(side.srv, side.active(), n, messages, deadline, f"/bench/all/n{n}r{rnd}a{attempt}")
                        r["machine_busy_before"] = quiet
                        attempts.append(r)
                        left, per_step = steps_left()
                        spare = deadline - RUN_BUDGET + SOFT_BUDGET - time.monotonic() - left * per_step
                        if r["foreign_cpu_share"] <= DISTURBED or spare < 1.5 * (time.monotonic() - t_attempt):
                            break
                        bar.set_postfix_str(f"{kind}: {messages} messages to {n} connections, again (disturbed)")
                    best = min(attempts, key=lambda a: a["foreign_cpu_share"])
                    best["attempts_foreign_cpu_share"] = [a["foreign_cpu_share"] for a in attempts]
                    best["rss_after"] = rss_bytes(side.srv.pid)["VmRSS"]
                    side.out["deliveries"][str(n)].append(best)
                    bar.update()
        return {kind: side.finish() for kind, side in sides.items()}
    finally:
        for side in sides.values():
            side.stop()


def ratio_pair(w: list[float], g: list[float]) -> dict:
    """websockets / gateway; nan where a measurement is 0 (too few deliveries for the 10 ms CPU clock)."""
    mw, mg = statistics.median(w), statistics.median(g)
    paired = [a / b for a, b in zip(w, g) if b]
    return {"of_medians": mw / mg if mg else float("nan"),
            "median_of_paired": statistics.median(paired) if paired else float("nan")}


def main() -> int:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["clients", "ws-server"])
    ap.add_argument("--ns", default=None, help="connection counts after N=0 (default 5000,15000; --quick: 5000)")
    ap.add_argument("--repeats", type=int, default=None, help="fresh servers per kind (median; default 3, --quick 1)")
    ap.add_argument("--messages", type=int, default=None,
                    help="messages published per delivery phase (default 20, --quick 10)")
    ap.add_argument("--rounds", type=int, default=1, help="delivery phases per server and N (default 1)")
    ap.add_argument("--quick", action="store_true", help="one server per kind, N=5000, 10 messages")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and the clients to CPUs")
    args = ap.parse_args()
    if args.role:
        import uvloop  # noqa: PLC0415

        uvloop.run(clients_main() if args.role == "clients" else ws_server_main())
        return 0
    ns_arg = args.ns or ("5000" if args.quick else "5000,15000")
    repeats = args.repeats or (1 if args.quick else 3)
    messages = args.messages or (10 if args.quick else 20)
    rounds = args.rounds
    if not 1 <= messages <= 1000:
        ap.error("--messages must be in 1..1000")

    from tqdm import tqdm  # noqa: PLC0415

    started = time.monotonic()
    deadline = started + RUN_BUDGET
    ns = sorted(int(x) for x in ns_arg.split(","))
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {OTHER_CPU})
    kinds = ["gateway", "websockets"]
    env = dict(os.environ)
    mach = machine()
    busy0, wall0, own0 = machine_busy_seconds(), time.monotonic(), sum(os.times()[:4])
    runs: dict = {k: [] for k in kinds}
    total_steps = repeats * len(ns) * len(kinds) * (1 + rounds)

    def steps_left() -> tuple[int, float]:
        done = bar.n + 1  # the step under way is nearly done when this is asked
        return total_steps - done, (time.monotonic() - started) / done

    incomplete = None
    with tqdm(total=total_steps, desc="gateway_vs_websockets", unit="step", dynamic_ncols=True) as bar:
        for rep in range(repeats):
            order = kinds if rep % 2 == 0 else kinds[::-1]
            try:
                outs = measure(order, ns, messages, rounds, env, deadline, pinned, bar, steps_left)
            except TimeoutError as exc:  # the budget: keep the repetitions that are complete, if any
                if not rep:
                    raise
                incomplete = f"repetition {rep + 1} of {repeats} abandoned: {exc}"
                break
            for kind, out in outs.items():
                runs[kind].append(out)
    if incomplete:
        print(f"\nWARNING: {incomplete}; the results cover {len(runs['gateway'])} repetitions")
    # os.times()[2:4] holds the CPU of every child started (and reaped) since: servers and clients
    foreign = (machine_busy_seconds() - busy0) - (sum(os.times()[:4]) - own0)
    mach["foreign_cpu_share"] = round(max(0.0, foreign) / ((time.monotonic() - wall0) * (os.cpu_count() or 1)), 3)

    summary: dict = {}
    for kind in kinds:
        rows = runs[kind]
        s: dict = {"rss0_bytes": statistics.median(r["0"]["VmRSS"] for r in rows)}
        for n in ns:
            s[f"rss_{n}_bytes"] = statistics.median(r[str(n)]["VmRSS"] for r in rows)
            s[f"per_conn_{n}"] = statistics.median((r[str(n)]["VmRSS"] - r["0"]["VmRSS"]) / n for r in rows)
            s[f"anon_per_conn_{n}"] = statistics.median((r[str(n)]["RssAnon"] - r["0"]["RssAnon"]) / n for r in rows)
        lo, hi = ns[0], ns[-1]
        if hi > lo:
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
        s["deliveries"] = {}
        for n in ns:
            ph = [p for r in rows for p in r["deliveries"][str(n)]]
            s["deliveries"][str(n)] = {
                key: statistics.median(p[key] for p in ph)
                for key in ("cpu_us_per_delivery", "cpu_us_per_delivery_minus_idle", "deliveries_per_s",
                            "clients_cpu_us_per_delivery", "idle_cpu_per_second", "foreign_cpu_share",
                            "ack_ms_median", "fanout_per_s_by_ack", "seconds")}
        st = collections.Counter()
        for r in rows:
            st.update(r["client_status"])
        s["client_errors"] = {k: st[k] for k in ERROR_KEYS}
        s["lost_connections"] = st["lost"] + st["closed_by_server"]
        s["msg_payload_bytes_mean"] = st["msg_bytes"] / max(1, st["msgs"])
        s["first_error"] = next((r["client_first_error"] for r in rows if r["client_first_error"]), None)
        summary[kind] = s
    g = summary["gateway"]
    hi = ns[-1]
    comparison: dict = {"memory_per_conn": {str(n): ratio_pair([(r[str(n)]["VmRSS"] - r["0"]["VmRSS"]) / n
                                                                for r in runs["websockets"]],
                                                               [(r[str(n)]["VmRSS"] - r["0"]["VmRSS"]) / n
                                                                for r in runs["gateway"]]) for n in ns},
                        "cpu_per_delivery": {}, "cpu_per_delivery_minus_idle": {}, "deliveries_per_s": {},
                        "fanout_per_s_by_ack": {}}
    for n in ns:
        for name, key in (("cpu_per_delivery", "cpu_us_per_delivery"),
                          ("cpu_per_delivery_minus_idle", "cpu_us_per_delivery_minus_idle"),
                          ("deliveries_per_s", "deliveries_per_s"),
                          ("fanout_per_s_by_ack", "fanout_per_s_by_ack")):
            # phases in (repetition, round) order on both sides, so zip() pairs neighbouring phases
            comparison[name][str(n)] = ratio_pair(
                [p[key] for r in runs["websockets"] for p in r["deliveries"][str(n)]],
                [p[key] for r in runs["gateway"] for p in r["deliveries"][str(n)]])
    import websockets  # noqa: PLC0415

    doc = {
        "config": {"ns": [0, *ns], "repeats": repeats, "repeats_done": len(runs["gateway"]),
                   "incomplete": incomplete, "rounds": rounds, "messages_per_phase": messages,
                   "subjects": SUBJECTS,
                   "clients_per_process": CLIENTS_MAX, "pinned": pinned, "server_cpu": SERVER_CPU if pinned else None,
                   "idle_window_s": IDLE_WINDOW, **mach, "websockets_version": websockets.__version__,
                   "seconds": round(time.monotonic() - started, 1)},
        "definitions": {
            "per_conn_N": "(VmRSS at N idle connections subscribed to one room subject - VmRSS at 0) / N",
            "cpu_us_per_delivery": "server utime+stime from the first publish until every client counted every "
                                   "message, / (N x messages)",
            "cpu_us_per_delivery_minus_idle": "the same minus the server's idle CPU rate x the phase's wall time",
            "deliveries_per_s": "N x messages / wall time of the closed-loop phase (includes the clients' work)",
            "fanout_per_s_by_ack": "N / median time from publish to its ack (acks follow the fan-out)",
            "ratios": "websockets / gateway; of_medians and median of the per-repetition (paired) ratios",
        },
        "summary": summary,
        "comparison_websockets_over_gateway": comparison,
        "target": {"per_conn_bytes_max": TARGET_BYTES, "gateway_per_conn": g[f"per_conn_{hi}"],
                   "met": g[f"per_conn_{hi}"] <= TARGET_BYTES},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
    with open(RESULTS_JSON, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    print_tables(doc, kinds, ns)
    print(f"written: {os.path.relpath(RESULTS_JSON)} ({doc['config']['seconds']} s)")
    return 0


def print_tables(doc: dict, kinds: list[str], ns: list[int]) -> None:
    summary, comp = doc["summary"], doc["comparison_websockets_over_gateway"]
    hi = ns[-1]
    print(f"\nMemory per idle subscribed connection (median of {doc['config']['repeats_done']})")
    print(f"{'server':<12}{'RSS_0':>10}" + "".join(f"{'RSS_' + str(n):>12}{'/conn':>9}" for n in ns)
          + (f"{'marginal':>10}" if len(ns) > 1 else "") + f"{'1M conns':>11}")
    for kind in kinds:
        s = summary[kind]
        cells = "".join(f"{s[f'rss_{n}_bytes'] / 2**20:>10.1f}MB{s[f'per_conn_{n}']:>8,.0f}B" for n in ns)
        marg = f"{s['marginal_per_conn']:>9,.0f}B" if len(ns) > 1 else ""
        print(f"{kind:<12}{s['rss0_bytes'] / 2**20:>8.1f}MB{cells}{marg}"
              f"{s['extrapolated_1M']['one_process_bytes'] / 2**30:>9.2f}GiB")
    m = comp["memory_per_conn"][str(hi)]
    print(f"websockets / gateway at N={hi}: {m['of_medians']:.2f} | {m['median_of_paired']:.2f}; gateway target "
          f"<= {TARGET_BYTES} B: {'met' if doc['target']['met'] else 'NOT met'}")

    print(f"\nServer CPU per delivery ({doc['config']['messages_per_phase']} messages to all N connections, "
          f"closed loop; median of {doc['config']['repeats_done']} x {doc['config']['rounds']} phases)")
    print(f"{'N':>7}{'server':>12}{'µs/delivery':>13}{'-idle':>8}{'deliveries/s':>14}{'N/ack-time':>12}"
          f"{'clients µs':>12}{'foreign':>9}")
    for n in ns:
        for kind in kinds:
            d = summary[kind]["deliveries"][str(n)]
            print(f"{n:>7}{kind:>12}{d['cpu_us_per_delivery']:>13.2f}{d['cpu_us_per_delivery_minus_idle']:>8.2f}"
                  f"{d['deliveries_per_s']:>14,.0f}{d['fanout_per_s_by_ack']:>12,.0f}"
                  f"{d['clients_cpu_us_per_delivery']:>12.2f}"
                  f"{d['foreign_cpu_share']:>9.0%}")
        c, ci, r, a = (comp[k][str(n)] for k in ("cpu_per_delivery", "cpu_per_delivery_minus_idle",
                                                 "deliveries_per_s", "fanout_per_s_by_ack"))
        print(f"{n:>7}{'ws/gateway':>12}{c['of_medians']:>8.2f}|{c['median_of_paired']:.2f}"
              f"{ci['of_medians']:>8.2f}{r['of_medians']:>14.2f}{a['of_medians']:>12.2f}")
    for kind in kinds:
        s = summary[kind]
        errs = {k: v for k, v in s["client_errors"].items() if v}
        print(f"{kind}: msg payload {s['msg_payload_bytes_mean']:.0f} B; lost connections {s['lost_connections']}; "
              f"client-side errors: {errs or 'none'}" + (f" (first: {s['first_error']})" if s["first_error"] else ""))
    print(f"CPU used by other processes during the run: {doc['config']['foreign_cpu_share']:.0%} of the machine")


if __name__ == "__main__":
    sys.exit(main())
