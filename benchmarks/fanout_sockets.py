#!/usr/bin/env python3
"""Deliveries/s of one 62-byte WebSocket frame to N connected loopback TCP sockets.

    pip install ".[bench]"   # the package with its compiled fanout; the benchmarks never import the checkout
    python benchmarks/fanout_sockets.py            # ~2-3 minutes on 2 cores (bounded: 8 minutes)

Variants, side by side in one run, on the same machine state:

  fanout          Channel.publish(frame) + Writer.flush(): one message per tick
  uvloop-write    pure-Python baseline: `for tr in transports: tr.write(frame)` (uvloop transports)
  websockets      websockets.broadcast() over websockets' own asyncio server connections (uvloop)
  c-send          bare C reference: one send(2) per socket, nothing else (compiled by this script)
  fanout-x10      10 Channel.publish() then one Writer.flush(): one sendmsg(2) of 10 frames per socket
  c-send-x10      bare C reference, one send(2) per delivery: 10 messages x N sockets
  c-sendmsg-x10   (extra) bare C: one sendmsg(2) of the 10 frames per socket, the ceiling for fanout-x10

Processes (the 20k open-files limit per process forbids holding both ends in one):

  sender-raw   pinned to CPU 0; uvloop server holding N accepted sockets; runs fanout, uvloop-write,
               c-send and the x10 variants on the very same sockets (fanout.Conn per socket)
  sender-ws    pinned to CPU 0; websockets server holding N connections; runs websockets
  drains       pinned to CPU 1; each holds <= 5000 client sockets, reads them with epoll in C
               and counts bytes; a round ends when every drain has all N x frames x 62 bytes

A round: the drains are armed with the byte count they must see, the sender takes t0 and sends,
each drain reports the CLOCK_MONOTONIC time at which its last byte arrived. Deliveries/s =
N x frames / (last byte - t0). Every round checks that the drains got exactly the expected bytes
(and, for fanout, that Writer.frames_out grew by N x frames). Each variant runs --repeats times per
N (order rotated), after one warm-up round; the median is reported, and also the median of the
per-repetition ratios ("paired").

Hygiene: a round whose sender lost its CPU (wall time > its thread CPU time + 10 %) or whose drains
finished far behind the sender is run again (at most 4 times; counted in the JSON), since on a
2-core machine other processes would otherwise decide the numbers. The drains poll (epoll_wait with
timeout 0) instead of sleeping, so the sender does not pay a cross-CPU wake-up per socket that
remote clients would never cause; the loopback receive path itself (TCP input, run in the sender's
softirq) stays in every variant's cost alike.

Output: benchmarks/results/fanout_sockets.json and benchmarks/results/fanout_sockets.png.
Internal roles: --role sender-raw|sender-ws|drain (spawned by the orchestrator).
"""
from __future__ import annotations

import argparse
import array
import asyncio
import gc
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _procs import HOST, Child, StdinLines, machine, machine_busy_seconds, reply, require_installed_package, wait_quiet

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_JSON = os.path.join(RESULTS_DIR, "fanout_sockets.json")
RESULTS_PNG = os.path.join(RESULTS_DIR, "fanout_sockets.png")

SENDER_CPU = 0
OTHER_CPU = 1
DRAIN_MAX = 5000          # sockets per drain process (well under the 20k fd limit)
RUN_BUDGET = 8 * 60       # the whole run, seconds
CMD_TIMEOUT = 120.0       # one command to a child, seconds
ROUND_TIMEOUT = 30.0      # one drain round, seconds
#: 0: the drains poll (the floor: no wake-up per send); > 0: they sleep in epoll_wait up to this many ms,
#: as clients on the same machine do, so every send also wakes a reader (kafka_100k.py measures both)
DRAIN_WAIT_MS = 0
#: idle seconds before each round, so that every socket is quiet that long between two messages (as a
#: connection on 3 of 10 subjects at a few msgs/s is): after > RTO of quiet, the reader's kernel ACKs each
#: segment at once, on loopback inside the sender's send (BENCHMARKS.md, "the clients' ACKs")
ROUND_SLEEP_S = 0.0
MAX_RETRIES = 4           # a disturbed round (see disturbed()) is run again at most this often

# 60-byte JSON payload -> 62-byte frame (2-byte header, unmasked server frame)
PAYLOAD = b'{"op":"msg","subject":"/matches/football/5","seq":1000000}'
PAYLOAD = PAYLOAD[:-1] + b" " * (60 - len(PAYLOAD)) + b"}"
PAYLOADS10 = [PAYLOAD.replace(b"1000000", b"100000" + str(i).encode()) for i in range(10)]
FRAME_LEN = 62

ONE = ["fanout", "uvloop-write", "websockets", "c-send"]
TEN = ["fanout-x10", "c-send-x10", "c-sendmsg-x10"]
VARIANTS = ONE + TEN
MSGS = {v: (10 if v.endswith("-x10") else 1) for v in VARIANTS}

# ---------------------------------------------------------------------------------------------------
# The C reference loops and the drain, compiled at run time (never part of setup.py).

SENDREF_PYX = r'''
# cython: language_level=3, boundscheck=False, wraparound=False
"""Bare C send loops (the reference) and the byte-counting epoll drain."""
from posix.uio cimport iovec

cdef extern from *:
    """
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <sys/epoll.h>
    #include <time.h>
    #include <errno.h>
    #include <string.h>
    #include <sched.h>

    static double ref_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }

    /* The reference: one send() per socket, nothing else. */
    static long ref_send_each(const int* fds, long n, const char* buf, size_t len) {
        long bad = 0;
        for (long i = 0; i < n; i++)
            if (send(fds[i], buf, len, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)len) bad++;
        return bad;
    }

    /* One sendmsg() of `cnt` frames per socket. */
    static long ref_sendmsg_each(const int* fds, long n, struct iovec* iov, int cnt, size_t total) {
        struct msghdr m;
        long bad = 0;
        memset(&m, 0, sizeof m);
        m.msg_iov = iov;
        m.msg_iovlen = cnt;
        for (long i = 0; i < n; i++)
            if (sendmsg(fds[i], &m, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)total) bad++;
        return bad;
    }

    /* Read every ready socket until `expected` bytes came or the deadline passed. By default it
       polls (epoll_wait with timeout 0) instead of sleeping: a sleeping reader makes every send()
       on the sender's CPU pay for a cross-CPU wake-up, a cost remote clients never cause.
       wait_ms > 0 sleeps in epoll_wait as ordinary clients on the same machine do (DRAIN_WAIT_MS). */
    static long long ref_drain(int epfd, long long expected, double timeout, int wait_ms, double* t_last,
                               long* eofs) {
        static char buf[1 << 18];
        struct epoll_event ev[1024];
        long long got = 0;
        double deadline = ref_now() + timeout;
        *t_last = 0.0;
        *eofs = 0;
        while (got < expected) {
            int n = epoll_wait(epfd, ev, 1024, wait_ms);
            if (n == 0) {
                if (ref_now() > deadline) break;
                if (!wait_ms) sched_yield();  /* share the drain CPU with the other drains of this round */
                continue;
            }
            if (n < 0) {
                if (errno == EINTR) continue;
                break;
            }
            for (int i = 0; i < n; i++) {
                ssize_t r = recv(ev[i].data.fd, buf, sizeof buf, MSG_DONTWAIT);
                if (r > 0) got += r;
                else if (r == 0) {
                    (*eofs)++;
                    epoll_ctl(epfd, EPOLL_CTL_DEL, ev[i].data.fd, NULL);
                }
            }
            if (n > 0) *t_last = ref_now();
        }
        return got;
    }
    """
    double ref_now() nogil
    long ref_send_each(const int* fds, long n, const char* buf, size_t len) nogil
    long ref_sendmsg_each(const int* fds, long n, iovec* iov, int cnt, size_t total) nogil
    long long ref_drain(int epfd, long long expected, double timeout, int wait_ms, double* t_last,
                        long* eofs) nogil


def now():
    return ref_now()


def send_each(int[::1] fds, bytes frame):
    """One send() per socket; returns the number of sends that did not take the whole frame."""
    cdef const char* buf = frame
    cdef size_t n = len(frame)
    cdef long bad = 0
    if fds.shape[0] == 0:
        return 0
    with nogil:
        bad = ref_send_each(&fds[0], fds.shape[0], buf, n)
    return bad


def send_each_multi(int[::1] fds, list frames):
    """Message after message, one send() per socket each: one syscall per delivery."""
    cdef long bad = 0
    for frame in frames:
        bad += send_each(fds, frame)
    return bad


def sendmsg_each(int[::1] fds, list frames):
    """One sendmsg() per socket carrying all frames."""
    cdef iovec iov[64]
    cdef int k = 0
    cdef size_t total = 0
    cdef long bad = 0
    cdef bytes f
    if fds.shape[0] == 0:
        return 0
    if len(frames) > 64:
        raise ValueError("at most 64 frames")
    for f in frames:
        iov[k].iov_base = <char*>f
        iov[k].iov_len = len(f)
        total += len(f)
        k += 1
    with nogil:
        bad = ref_sendmsg_each(&fds[0], fds.shape[0], iov, k, total)
    return bad


def drain(int epfd, long long expected, double timeout, int wait_ms=0):
    """-> (bytes received, CLOCK_MONOTONIC time of the last read, sockets that hit EOF)."""
    cdef double t_last = 0.0
    cdef long eofs = 0
    cdef long long got
    with nogil:
        got = ref_drain(epfd, expected, timeout, wait_ms, &t_last, &eofs)
    return got, t_last, eofs
'''


def build_sendref(tmpdir: str) -> None:
    """Cythonize and compile _sendref.pyx into tmpdir (-O2, as setup.py builds fanout)."""
    with open(os.path.join(tmpdir, "_sendref.pyx"), "w", encoding="utf-8") as fh:
        fh.write(SENDREF_PYX)
    script = (
        "from setuptools import setup, Extension\n"
        "from Cython.Build import cythonize\n"
        "setup(ext_modules=cythonize([Extension('_sendref', ['_sendref.pyx'], extra_compile_args=['-O2'])],"
        " quiet=True), script_args=['build_ext', '--inplace', '-q'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmpdir, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        sys.exit(f"compiling the C reference failed:\n{proc.stdout}\n{proc.stderr}")


def import_sendref():
    sys.path.insert(0, os.environ["SENDREF_DIR"])
    import _sendref  # noqa: PLC0415

    return _sendref


# ---------------------------------------------------------------------------------------------------
# Children talk to the orchestrator in JSON lines over stdin/stdout (see _procs.py).

def frames():
    import fanout  # noqa: PLC0415

    frame = fanout.encode_text(PAYLOAD)
    frames10 = [fanout.encode_text(p) for p in PAYLOADS10]
    assert len(frame) == FRAME_LEN and all(len(f) == FRAME_LEN for f in frames10)
    return frame, frames10


async def wait_for_count(get, n: int, timeout: float) -> None:
    # Not tests/support/waits.wait_until, the suite's polling helper: benchmarks import no tests code
    # (these children run as `python benchmarks/fanout_sockets.py`, without tests/ on sys.path).
    deadline = time.monotonic() + timeout
    while get() < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {get()} of {n} connections after {timeout} s")
        await asyncio.sleep(0.01)


async def sender_raw_main() -> None:
    import fanout  # noqa: PLC0415

    ref = import_sendref()
    frame, frames10 = frames()
    loop = asyncio.get_running_loop()
    writer = fanout.Writer(loop)
    channel = fanout.Channel()
    protos: list = []
    events = {"paused": 0, "lost": 0, "overflows": 0}

    def on_overflow(conn) -> None:
        events["overflows"] += 1

    class Proto(asyncio.Protocol):
        __slots__ = ("tr", "conn")

        def connection_made(self, tr) -> None:
            self.tr = tr
            self.conn = None
            protos.append(self)

        def data_received(self, data) -> None:
            pass

        def pause_writing(self) -> None:
            events["paused"] += 1
            if self.conn is not None:
                self.conn.pause_writing()

        def resume_writing(self) -> None:
            if self.conn is not None:
                self.conn.resume_writing()

        def connection_lost(self, exc) -> None:
            events["lost"] += 1
            if self.conn is not None:
                self.conn.close()

    server = await loop.create_server(Proto, HOST, 0, backlog=4096)
    ctl = StdinLines()
    await ctl.open()
    reply({"port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    transports: list = []
    fds = array.array("i")
    ready = 0
    while True:
        cmd = await ctl.next()
        op = cmd["op"]
        if op == "quit":
            break
        if op == "grow":
            await wait_for_count(lambda: len(protos), cmd["n"], 60)
            for p in protos[ready:]:
                p.conn = fanout.Conn(writer, p.tr, 1 << 20, on_overflow)
                channel.add(p.conn)
                transports.append(p.tr)
                fds.append(p.conn.fd)
            ready = len(protos)
            assert len(channel) == ready and min(fds) >= 0
            gc.collect()
            gc.freeze()
            reply({"n": ready})
            continue
        # op == "run"
        v = cmd["variant"]
        fo, sc = writer.frames_out, writer.syscalls
        bad = 0
        if v == "fanout":
            c0, t0 = time.thread_time(), time.monotonic()
            channel.publish(frame)
            writer.flush()
            t1, c1 = time.monotonic(), time.thread_time()
        elif v == "uvloop-write":
            c0, t0 = time.thread_time(), time.monotonic()
            for tr in transports:
                tr.write(frame)
            t1, c1 = time.monotonic(), time.thread_time()
        elif v == "c-send":
            c0, t0 = time.thread_time(), time.monotonic()
            bad = ref.send_each(fds, frame)
            t1, c1 = time.monotonic(), time.thread_time()
        elif v == "fanout-x10":
            c0, t0 = time.thread_time(), time.monotonic()
            for f in frames10:
                channel.publish(f)
            writer.flush()
            t1, c1 = time.monotonic(), time.thread_time()
        elif v == "c-send-x10":
            c0, t0 = time.thread_time(), time.monotonic()
            bad = ref.send_each_multi(fds, frames10)
            t1, c1 = time.monotonic(), time.thread_time()
        elif v == "c-sendmsg-x10":
            c0, t0 = time.thread_time(), time.monotonic()
            bad = ref.sendmsg_each(fds, frames10)
            t1, c1 = time.monotonic(), time.thread_time()
        else:
            raise ValueError(v)
        buffered = sum(1 for tr in transports if tr.get_write_buffer_size())
        reply({"t0": t0, "t1": t1, "cpu": c1 - c0, "bad": bad, "frames_out": writer.frames_out - fo,
               "syscalls": writer.syscalls - sc, "buffered": buffered, **events})
        await asyncio.sleep(0)  # let the (now empty) scheduled flush run


async def sender_ws_main() -> None:
    import websockets  # noqa: PLC0415
    from websockets.asyncio.server import broadcast, serve  # noqa: PLC0415

    conns: set = set()

    async def handler(ws) -> None:
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    # No keepalive pings (they would add bytes the drains do not expect); no compression offered anyway.
    server = await serve(handler, HOST, 0, ping_interval=None, compression=None, backlog=4096)
    ctl = StdinLines()
    await ctl.open()
    reply({"port": server.sockets[0].getsockname()[1], "pid": os.getpid(), "websockets": websockets.__version__})
    targets: list = []
    while True:
        cmd = await ctl.next()
        op = cmd["op"]
        if op == "quit":
            break
        if op == "grow":
            await wait_for_count(lambda: len(conns), cmd["n"], 60)
            targets = list(conns)
            gc.collect()
            gc.freeze()
            reply({"n": len(targets)})
            continue
        assert cmd["variant"] == "websockets"
        c0, t0 = time.thread_time(), time.monotonic()
        broadcast(targets, PAYLOAD, text=True)
        t1, c1 = time.monotonic(), time.thread_time()
        buffered = sum(1 for ws in targets if ws.transport.get_write_buffer_size())
        reply({"t0": t0, "t1": t1, "cpu": c1 - c0, "bad": 0, "buffered": buffered})
        await asyncio.sleep(0)


def role_sender(kind: str) -> None:
    os.sched_setaffinity(0, {SENDER_CPU})
    import uvloop  # noqa: PLC0415

    uvloop.run(sender_raw_main() if kind == "raw" else sender_ws_main())


def role_drain() -> None:
    """Client ends: connect, (WebSocket-upgrade,) then count bytes per round with the C epoll drain."""
    os.sched_setaffinity(0, {OTHER_CPU})
    ref = import_sendref()
    ep = select.epoll()
    socks: list[socket.socket] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "connect":
            need = cmd["n"] - len(socks)
            new: list[socket.socket] = []
            while need > 0:
                batch = []
                for _ in range(min(need, 256)):
                    s = socket.create_connection((HOST, cmd["port"]), timeout=30)
                    if cmd["ws"]:
                        s.sendall(
                            f"GET /ws HTTP/1.1\r\nHost: {HOST}:{cmd['port']}\r\nUpgrade: websocket\r\n"
                            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                            f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
                    batch.append(s)
                if cmd["ws"]:
                    for s in batch:
                        data = b""
                        while b"\r\n\r\n" not in data:
                            chunk = s.recv(4096)
                            if not chunk:
                                raise ConnectionError("closed during the upgrade")
                            data += chunk
                        if not data.startswith(b"HTTP/1.1 101") or not data.endswith(b"\r\n\r\n"):
                            raise ConnectionError(f"bad upgrade answer {data[:80]!r}")
                new += batch
                need -= len(batch)
            for s in new:
                s.setblocking(False)
                ep.register(s.fileno(), select.EPOLLIN)
            socks += new
            reply({"n": len(socks)})
        elif op == "drain":
            expected = cmd["per_sock"] * len(socks)
            got, t_last, eofs = ref.drain(ep.fileno(), expected, cmd["timeout"], cmd.get("wait_ms", 0))
            reply({"got": got, "expected": expected, "t_last": t_last, "eofs": eofs})


# ---------------------------------------------------------------------------------------------------
# Orchestrator

def child(role: str, env: dict) -> Child:
    return Child([sys.executable, os.path.abspath(__file__), "--role", role], env=env, name=role)


def start_children(tmp: str, max_n: int, children: list) -> tuple[dict, dict, dict]:
    """Start both senders and enough drains for max_n sockets per sender; -> (senders, ports, drains).

    Every child is appended to `children` as soon as it exists: the caller stops them (by pid) also
    when this fails half-way. Shared with test_fanout_sockets_bench.py.
    """
    env = dict(os.environ, SENDREF_DIR=tmp)
    senders = {}
    for key in ("raw", "ws"):
        senders[key] = child(f"sender-{key}", env)
        children.append(senders[key])
    ports = {k: c.recv(60)["port"] for k, c in senders.items()}
    n_drains = -(-max_n // DRAIN_MAX)
    drains: dict = {k: [] for k in senders}
    for key in senders:
        for _ in range(n_drains):
            drains[key].append(child("drain", env))
            children.append(drains[key][-1])
    return senders, ports, drains


def connect(n: int, senders: dict, drains: dict, ports: dict) -> None:
    """Grow both senders to n connected sockets (from the drains' side), and check they hold n."""
    for key, group in drains.items():
        for d, share in zip(group, split(n, len(group))):
            d.send({"op": "connect", "port": ports[key], "n": share, "ws": key == "ws"})
        for d in group:
            d.recv()
        got = senders[key].call({"op": "grow", "n": n})["n"]
        if got != n:
            raise RuntimeError(f"{key} sender holds {got} connections, expected {n}")


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def run_round(variant: str, n: int, senders: dict, drains: dict) -> dict:
    if ROUND_SLEEP_S:
        time.sleep(ROUND_SLEEP_S)
    key = "ws" if variant == "websockets" else "raw"
    sender, group = senders[key], drains[key]
    msgs = MSGS[variant]
    for d in group:
        d.send({"op": "drain", "per_sock": FRAME_LEN * msgs, "timeout": ROUND_TIMEOUT, "wait_ms": DRAIN_WAIT_MS})
    s = sender.call({"op": "run", "variant": variant})
    ds = [d.recv(ROUND_TIMEOUT + 10) for d in group]
    got = sum(d["got"] for d in ds)
    expected = n * msgs * FRAME_LEN
    problems = []
    if got != expected or any(d["got"] != d["expected"] for d in ds):
        problems.append(f"drains got {got} bytes, expected {expected}")
    if any(d["eofs"] for d in ds):
        problems.append("a socket was closed")
    if s.get("bad"):
        problems.append(f"{s['bad']} short sends")
    if variant.startswith("fanout") and s["frames_out"] != n * msgs:
        problems.append(f"Writer.frames_out grew by {s['frames_out']}, expected {n * msgs}")
    if s.get("buffered"):
        problems.append(f"{s['buffered']} transports buffered data (socket full)")
    if problems:
        raise RuntimeError(f"{variant} N={n}: " + "; ".join(problems))
    t_end = max(d["t_last"] for d in ds)
    e2e = t_end - s["t0"]
    send = s["t1"] - s["t0"]
    out = {"deliveries": n * msgs, "e2e_s": e2e, "send_s": send, "cpu_s": s["cpu"], "rate": n * msgs / e2e,
           "send_rate": n * msgs / send, "cpu_ns_per_delivery": s["cpu"] / (n * msgs) * 1e9, "bytes": got}
    if "syscalls" in s and variant.startswith("fanout"):
        out["syscalls"] = s["syscalls"]
    return out


def disturbed(r: dict) -> bool:
    """The round lost its CPU: the sender's wall time exceeds its CPU time (another process ran on the
    sender's core), or the drains finished long after the sender (they were held up on theirs)."""
    return (r["send_s"] - r["cpu_s"] > 0.1 * r["send_s"] + 2e-4
            or r["e2e_s"] - r["send_s"] > 0.25 * r["send_s"] + 1e-3)


def measure(variant: str, n: int, senders: dict, drains: dict, retries: dict) -> dict:
    """run_round(), run again (at most MAX_RETRIES times, counted in retries[variant]) while disturbed."""
    for _attempt in range(MAX_RETRIES + 1):
        r = run_round(variant, n, senders, drains)
        if not disturbed(r):
            break
        retries[variant] = retries.get(variant, 0) + 1
    r["disturbed"] = disturbed(r)
    return r


def summarize(results: dict, ns: list[int]) -> dict:
    med = {v: {} for v in VARIANTS}
    for v in VARIANTS:
        for n in ns:
            runs = results[v][str(n)]
            med[v][str(n)] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "send_rate": statistics.median(r["send_rate"] for r in runs),
                "e2e_ms": statistics.median(r["e2e_s"] for r in runs) * 1e3,
                "send_ms": statistics.median(r["send_s"] for r in runs) * 1e3,
                "cpu_ns_per_delivery": statistics.median(r["cpu_ns_per_delivery"] for r in runs),
                "rate_min": min(r["rate"] for r in runs),
                "rate_max": max(r["rate"] for r in runs),
            }
    ratios = {}
    for n in ns:
        k = str(n)
        c1, c10 = med["c-send"][k]["rate"], med["c-send-x10"][k]["rate"]
        ratios[k] = {
            **{f"{v}/c-send": med[v][k]["rate"] / c1 for v in ONE},
            **{f"{v}/c-send-x10": med[v][k]["rate"] / c10 for v in TEN},
            "fanout/websockets": med["fanout"][k]["rate"] / med["websockets"][k]["rate"],
            "fanout/uvloop-write": med["fanout"][k]["rate"] / med["uvloop-write"][k]["rate"],
            "fanout-x10/c-send": med["fanout-x10"][k]["rate"] / c1,
            "fanout-x10/c-sendmsg-x10": med["fanout-x10"][k]["rate"] / med["c-sendmsg-x10"][k]["rate"],
            # the same ratios on the sender's own clock (until its send loop returned)
            "send_clock:fanout/c-send": med["fanout"][k]["send_rate"] / med["c-send"][k]["send_rate"],
            "send_clock:fanout/websockets": med["fanout"][k]["send_rate"] / med["websockets"][k]["send_rate"],
            "send_clock:fanout-x10/c-send-x10": (med["fanout-x10"][k]["send_rate"]
                                                 / med["c-send-x10"][k]["send_rate"]),
        }
    # Paired: the two variants' rounds of the same repetition ran seconds apart, so the median of the
    # per-repetition ratios is less exposed to slow drifts of the machine than a ratio of medians.
    paired = {}
    for n in ns:
        k = str(n)
        paired[k] = {}
        for a, b in (("fanout", "c-send"), ("fanout", "websockets"), ("uvloop-write", "c-send"),
                     ("websockets", "c-send"), ("fanout-x10", "c-send-x10"), ("fanout-x10", "c-sendmsg-x10")):
            pairs = zip(results[a][k], results[b][k])
            paired[k][f"{a}/{b}"] = statistics.median(x["rate"] / y["rate"] for x, y in pairs)
    return {"median": med, "ratios": ratios, "paired_ratios": paired}


def plot(summary: dict, ns: list[int]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"fanout": "o-", "uvloop-write": "s--", "websockets": "v--", "c-send": "k^-",
              "fanout-x10": "o-", "c-send-x10": "k^:", "c-sendmsg-x10": "kD:"}
    for v in VARIANTS:
        cells = [summary["median"][v][str(n)] for n in ns]
        ys = [c["rate"] for c in cells]
        err = [[y - c["rate_min"] for y, c in zip(ys, cells)], [c["rate_max"] - y for y, c in zip(ys, cells)]]
        ax.errorbar(ns, ys, yerr=err, fmt=styles[v], capsize=3,
                    label=v + (" (frame-deliveries/s)" if MSGS[v] > 1 else ""))
    ax.set_xlabel("connected sockets N")
    ax.set_ylabel("deliveries/s (median; bars: min-max)")
    ax.set_yscale("log")
    ax.set_xticks(ns)
    ax.set_title("One 62-byte frame to N loopback TCP sockets, sender on one core")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_PNG, dpi=120)
    plt.close(fig)


def set_options(drain_wait_ms: int, round_sleep_s: float, out: str) -> None:
    """The module's knobs, from the command line (sweep.py and kafka_100k.py set them in-process)."""
    global DRAIN_WAIT_MS, ROUND_SLEEP_S, RESULTS_JSON, RESULTS_PNG
    DRAIN_WAIT_MS, ROUND_SLEEP_S = drain_wait_ms, round_sleep_s
    RESULTS_JSON, RESULTS_PNG = out, os.path.splitext(out)[0] + ".png"


def main() -> int:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["sender-raw", "sender-ws", "drain"])
    ap.add_argument("--ns", default="1000,5000,10000", help="socket counts (default 1000,5000,10000)")
    ap.add_argument("--repeats", type=int, default=9, help="rounds per variant and N (median; default 9)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset, for profiling")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--drain-wait-ms", type=int, default=DRAIN_WAIT_MS,
                    help="0: drains poll (the floor); > 0: they sleep in epoll_wait up to this long, as clients do")
    ap.add_argument("--round-sleep", type=float, default=ROUND_SLEEP_S,
                    help="idle seconds before each round (each socket quiet that long between messages)")
    ap.add_argument("--out", default=RESULTS_JSON, help="JSON results (the plot goes next to it, .png)")
    args = ap.parse_args()
    set_options(args.drain_wait_ms, args.round_sleep, args.out)
    if args.role == "drain":
        role_drain()
        return 0
    if args.role:
        role_sender(args.role.split("-")[1])
        return 0

    from tqdm import tqdm  # noqa: PLC0415

    started = time.monotonic()
    mach = machine()
    ns = sorted(int(x) for x in args.ns.split(","))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (the median of at least 3)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs: the sender is pinned to CPU 0 and the drains to CPU 1")
    os.sched_setaffinity(0, {OTHER_CPU})
    os.makedirs(os.path.dirname(os.path.abspath(RESULTS_JSON)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="fanout-sendref-")
    children: list[Child] = []
    try:
        steps = 1 + len(ns) + len(ns) * len(variants) * (args.repeats + 1)
        bar = tqdm(total=steps, desc="fanout_sockets", unit="step", dynamic_ncols=True)
        bar.set_postfix_str("compiling the C reference")
        build_sendref(tmp)
        bar.set_postfix_str("waiting for an idle machine (<= 60 s)")
        mach["cpu_busy_before"] = round(wait_quiet(), 3)
        busy0, wall0, own0 = machine_busy_seconds(), time.monotonic(), sum(os.times()[:4])
        bar.update()
        senders, ports, drains = start_children(tmp, max(ns), children)
        results: dict = {v: {str(n): [] for n in ns} for v in variants}
        retries: dict = {}
        for n in ns:
            bar.set_postfix_str(f"connecting {n} + {n} sockets")
            connect(n, senders, drains, ports)
            bar.update()
            for rep in range(args.repeats + 1):  # rep 0 is the warm-up
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                for v in order:
                    if time.monotonic() - started > RUN_BUDGET:
                        raise TimeoutError(f"run budget of {RUN_BUDGET} s exceeded")
                    bar.set_postfix_str(f"N={n} {v} {'warm-up' if rep == 0 else f'round {rep}'}")
                    r = measure(v, n, senders, drains, retries)
                    if rep:
                        results[v][str(n)].append(r)
                    bar.update()
        bar.close()
    finally:
        for c in children:
            c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    # CPU used by processes that are not ours while we measured (other work on this machine).
    foreign = (machine_busy_seconds() - busy0) - (sum(os.times()[:4]) - own0)
    mach["foreign_cpu_share"] = round(max(0.0, foreign) / ((time.monotonic() - wall0) * (os.cpu_count() or 1)), 3)

    if variants != VARIANTS:
        for v in variants:
            for n in ns:
                print(v, n, f"{statistics.median(r['rate'] for r in results[v][str(n)]):,.0f}/s")
        return 0
    summary = summarize(results, ns)
    import uvloop  # noqa: PLC0415
    import websockets  # noqa: PLC0415

    doc = {
        "config": {"ns": ns, "repeats": args.repeats, "drain_wait_ms": DRAIN_WAIT_MS, "round_sleep_s": ROUND_SLEEP_S,
                   "frame_bytes": FRAME_LEN, "sender_cpu": SENDER_CPU,
                   "drain_cpu": OTHER_CPU, "drain_max_sockets": DRAIN_MAX, **mach,
                   "loadavg_at_end": os.getloadavg(),
                   "versions": {"uvloop": uvloop.__version__, "websockets": websockets.__version__},
                   "seconds": round(time.monotonic() - started, 1)},
        "rate_definition": "deliveries / (time the last byte reached the drains - sender t0); "
                           "send_rate uses the sender's own clock until its send loop returned",
        **summary,
        "retried_disturbed_rounds": retries,
        "still_disturbed_rounds": sum(r["disturbed"] for v in results for n in results[v] for r in results[v][n]),
        "runs": results,
    }
    with open(RESULTS_JSON, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    if not args.no_plot:
        plot(summary, ns)
    print_table(summary, ns)
    print(f"\nCPU used by other processes during the run: {mach['foreign_cpu_share']:.0%} of the machine; "
          f"disturbed rounds re-run: {sum(retries.values())}, kept disturbed: {doc['still_disturbed_rounds']}")
    print(f"\nwritten: {os.path.relpath(RESULTS_JSON)}, {os.path.relpath(RESULTS_PNG)} "
          f"({doc['config']['seconds']} s)")
    return 0


def print_table(summary: dict, ns: list[int]) -> None:
    med, ratios = summary["median"], summary["ratios"]
    head = "".join(f"{'N=' + str(n):>22}" for n in ns)
    print(f"\n{'variant':<16}{head}    (deliveries/s, median; ratio to the C reference)")
    for v in VARIANTS:
        ref = "c-send" if MSGS[v] == 1 else "c-send-x10"
        cells = "".join(f"{med[v][str(n)]['rate']:>14,.0f} ({med[v][str(n)]['rate'] / med[ref][str(n)]['rate']:4.2f})"
                        for n in ns)
        print(f"{v:<16}{cells}")
    print(f"\n{'variant':<16}" + "".join(f"{'N=' + str(n):>12}" for n in ns)
          + "    (sender CPU ns per delivery, median)")
    for v in VARIANTS:
        print(f"{v:<16}" + "".join(f"{med[v][str(n)]['cpu_ns_per_delivery']:>12,.0f}" for n in ns))
    paired = summary["paired_ratios"]
    print(f"\n{'ratio (of medians | paired)':<28}" + "".join(f"{'N=' + str(n):>16}" for n in ns))
    for key in ("fanout/c-send", "fanout/websockets", "fanout-x10/c-send-x10"):
        print(f"{key:<28}" + "".join(f"{ratios[str(n)][key]:>9.2f} | {paired[str(n)][key]:4.2f}" for n in ns))


if __name__ == "__main__":
    sys.exit(main())
