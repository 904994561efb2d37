#!/usr/bin/env python3
"""Load generator for the top of the range: N WebSocket subscribers read at C speed, publishers at R msgs/s.

    pip install ".[bench]"            # numpy, tqdm, Cython (the build requirement)
    python benchmarks/load/loadgen.py --connections 10000,19000 --rate 200 --duration 20

For each N in --connections it starts a fresh `python -m gateway serve --port 0` (standalone, or with
--gateway-arg ... e.g. --gateway-arg=--workers=2), or uses --url with --pid for an already running one, then:

  connect   N connections from ceil(N / --per-process) client processes (fewer than 20,000 open files
            each), process k binding to source address 127.0.0.(2+k) so ephemeral ports never run out.
            Each connection: TCP connect, HTTP upgrade, `connect`, one `subscribe` of S subjects
            (/matches/football/1..M, drawn at random per connection, fixed seed), at most --window
            handshakes in flight per process. Measured: setup rate (connections/s), per-connection
            setup time (connect() -> last `subscribed`), the gateway's CPU per connection and its RSS
            per idle subscribed connection (from /proc, summed over its worker processes).
  measure   a publisher process sends R msgs/s for --duration s round-robin over the M subjects,
            spread over --pub-connections connections (the gateway's --publish-rate is per
            connection), each `publish` with an `id`; the content starts with the CLOCK_MONOTONIC
            nanoseconds at send time (clients on the same machine read the same clock). The clients
            check every `msg`: duplicates (seq equal to the last), out of order (below the last), gaps
            (`prev` not the last seq) and the messages lost in them; then they wait (bounded) until
            every connection has the newest acked seq of each of its subjects; what is still missing is
            counted as lost at the end. Measured: publish -> receive latency of every delivery
            (percentiles with numpy), deliveries/s, gateway CPU per delivery and CPU share, acks.

The client side is C (loadclient.h: one epoll per process, no Python per frame), compiled at run time
with Cython into benchmarks/load/_build/ (never part of setup.py). Client processes and the publisher
are pinned to the last CPU and the gateway to the others when there are >= 2 CPUs (--no-pin to
disable). Bounded: every phase has a timeout and the whole run --budget seconds. A tqdm bar shows each
phase. Output: benchmarks/results/load.json (or --out).

Internal roles: --role client | publisher (spawned by the orchestrator, JSON lines on stdin/stdout).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _procs
from _procs import (  # noqa: E402
    Child,
    machine,
    machine_busy_seconds,
    proc_cpu_seconds,
    reply,
    require_installed_package,
    schedstat_seconds,
    stop_children,
    stop_process,
)

RESULTS_DIR = os.path.join(os.path.dirname(HERE), "results")
BUILD_ROOT = os.path.join(HERE, "_build")
PREFIX = "/matches/football/"
HOST = "127.0.0.1"

# ---------------------------------------------------------------------------------------------------
# Build


def build_client() -> str:
    """Compile loadclient.pyx (+ loadclient.h) once per source version; returns the directory to import from."""
    sources = [os.path.join(HERE, f) for f in ("loadclient.pyx", "loadclient.h")]
    digest = hashlib.sha256()
    for f in sources:
        with open(f, "rb") as fh:
            digest.update(fh.read())
    out = os.path.join(BUILD_ROOT, digest.hexdigest()[:12])
    if os.path.isdir(out) and any(f.startswith("loadclient") and f.endswith(".so") for f in os.listdir(out)):
        return out
    os.makedirs(out, exist_ok=True)
    for f in sources:
        shutil.copy(f, out)
    script = (
        "from setuptools import setup, Extension\n"
        "from Cython.Build import cythonize\n"
        "setup(ext_modules=cythonize([Extension('loadclient', ['loadclient.pyx'], extra_compile_args=['-O2'])],"
        " quiet=True), script_args=['build_ext', '--inplace', '-q'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        sys.exit(f"compiling the load client failed:\n{proc.stdout}\n{proc.stderr}")
    return out


# ---------------------------------------------------------------------------------------------------
# Children: JSON lines on stdin (read with os.read: a buffered readline would hide lines from select)


class Control:
    def __init__(self) -> None:
        self.buf = b""

    def poll(self, timeout: float) -> dict | None:
        if b"\n" not in self.buf:
            r, _, _ = select.select([0], [], [], timeout)
            if not r:
                return None
            chunk = os.read(0, 1 << 20)
            if not chunk:
                return {"op": "quit"}
            self.buf += chunk
            if b"\n" not in self.buf:
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def next(self, timeout: float) -> dict:
        """The next line, however long it takes (polling `timeout` s at a time)."""
        msg = None
        while msg is None:
            msg = self.poll(timeout)
        return msg


def await_run(ctl: Control) -> dict | None:
    """Publisher side: tell the orchestrator our pid, then wait for its "run" command (None: told to quit)."""
    reply({"pid": os.getpid()})
    cmd = ctl.next(600)
    return cmd if cmd["op"] == "run" else None


def role_client() -> None:
    import numpy as np

    sys.path.insert(0, os.environ["LOADCLIENT_DIR"])
    import loadclient  # noqa: PLC0415

    ctl = Control()
    cfg = ctl.next(60)
    subjects = np.ascontiguousarray(np.array(cfg["subjects"], dtype=np.int32))
    client = loadclient.Client(cfg["dst"], cfg["port"], cfg["src"], subjects, cfg["prefix"], cfg["window"],
                               cfg["latcap"], cfg.get("mode", "ours"))  # mode: benchmarks/compare.py's peers
    reply({"pid": os.getpid()})
    started = False
    while True:
        cmd = ctl.poll(0 if started else 0.05)
        if cmd is None:
            if started:
                client.run(0.05)
            continue
        op = cmd["op"]
        if op == "quit":
            break
        if op == "connect":
            started = True
            reply({"ok": True})
        elif op == "progress":
            reply(client.progress())
        elif op == "pace":
            client.set_pace(int(cmd["us"]))
            reply({"ok": True})
        elif op == "record":
            client.reset_counters()
            client.set_recording(True)
            reply({"ok": True})
        elif op == "finish":
            final = {int(k): v for k, v in cmd["final"].items()}
            deadline = time.monotonic() + cmd["timeout"]
            while client.behind(final)[1] and time.monotonic() < deadline:
                client.run(0.05)
            client.set_recording(False)
            missing, conns_behind = client.behind(final)
            lat_path = os.path.join(cmd["dir"], f"lat-{os.getpid()}.npy")
            setup_path = os.path.join(cmd["dir"], f"setup-{os.getpid()}.npy")
            np.save(lat_path, np.frombuffer(client.latencies_ns(), dtype=np.int64))
            np.save(setup_path, np.array(client.setup_times(), dtype=np.float64))
            reply({"stats": client.stats(), "missing_at_end": missing, "connections_behind": conns_behind,
                   "latencies": lat_path, "setup_times": setup_path})


def _ws_open(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    sock.sendall(ws_client_frame(b'{"op":"connect","client":"loadgen-publisher"}'))
    return sock


def ws_client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """Masked client frame (text by default), mask key 0 (the payload bytes stay as they are)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def mqtt_packet(first: int, body: bytes) -> bytes:
    """An MQTT control packet: the first byte, the remaining length (variable-length integer), the body."""
    n, rl = len(body), bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        rl.append(b | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(rl) + body


def _server_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    out = []
    while len(buf) >= 2:
        n, hl = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, hl = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, hl = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < hl + n:
            break
        out.append((buf[0] & 0x0F, bytes(buf[hl:hl + n])))
        del buf[:hl + n]
    return out


def publish_plan(rate: float, seconds: float, subjects: int, pattern: str = "steady",
                 seed: int = 0) -> tuple[list[float], list[int]]:
    """When each publish is due (seconds from the start) and on which subject (1..subjects).

    steady  int(rate x seconds) publishes, evenly spaced, round-robin over the subjects.
    demo    the live-scores demo's schedule (gateway.demo_feed.schedule): every 2 s a burst of 1 to 5
            updates on random matches (1.5 msgs/s on average), `rate` multiplies the pace (10: ten
            times the demo); seeded, so a run repeats. Needs subjects == demo_feed.MATCHES."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be > 0")
    if pattern == "steady":
        total = int(rate * seconds)
        return [i / rate for i in range(total)], [i % subjects + 1 for i in range(total)]
    if pattern != "demo":
        raise ValueError(f"unknown publish pattern {pattern!r} (steady or demo)")
    import random

    from gateway import demo_feed

    if subjects != demo_feed.MATCHES:
        raise ValueError(f"the demo pattern publishes on {demo_feed.MATCHES} matches, not {subjects} subjects")
    due, subj = [], []
    for tick in demo_feed.schedule(random.Random(seed), rate=rate, duration=seconds):
        for subject, _event in tick.updates:
            due.append(tick.at)
            subj.append(int(subject.rsplit("/", 1)[1]))
    return due, subj


def expected_deliveries(per_subject, acked_per_subject: dict) -> int:
    """Deliveries owed for one round: every acked publish goes once to each subscriber of its subject.
    Counted from the acks, not from the newest seq, which on a reused (Kafka) topic or a subject with
    earlier traffic is no count of this round's publishes."""
    return int(sum(int(per_subject[int(k)]) * int(v) for k, v in acked_per_subject.items()))


def role_publisher() -> None:
    import numpy as np

    ctl = Control()
    cfg = ctl.next(60)
    socks = [_ws_open(cfg["port"]) for _ in range(cfg["connections"])]
    bufs = [bytearray() for _ in socks]
    for s in socks:
        s.setblocking(False)
    fd_index = {s.fileno(): i for i, s in enumerate(socks)}
    cmd = await_run(ctl)
    if cmd is None:
        return
    rate, seconds, subjects, size = cmd["rate"], cmd["seconds"], cmd["subjects"], cmd["size"]
    due_at, subject_of = publish_plan(rate, seconds, subjects, cmd.get("pattern", "steady"), cmd.get("seed", 0))
    total = len(due_at)
    sent_at = np.zeros(total, dtype=np.int64)
    ack_ns = np.zeros(total, dtype=np.int64)
    final: dict[int, int] = {}
    acked_per_subject: dict[int, int] = {}
    errors, first_error, acked, sent, connected = 0, "", 0, 0, 0

    def read_ready(timeout: float) -> None:
        nonlocal errors, first_error, acked, connected
        r, _, _ = select.select(socks, [], [], timeout)
        now = time.monotonic_ns()
        for s in r:
            i = fd_index[s.fileno()]
            try:
                chunk = s.recv(1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError("the gateway closed a publisher connection")
            bufs[i] += chunk
            for opcode, payload in _server_frames(bufs[i]):
                if opcode == 9:
                    s.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                if opcode != 1:
                    continue
                frame = json.loads(payload)
                if frame["op"] == "ack":
                    k = frame["id"]
                    ack_ns[k] = now
                    acked += 1
                    idx = int(frame["subject"].rsplit("/", 1)[1])
                    final[idx] = max(final.get(idx, 0), frame["seq"])
                    acked_per_subject[idx] = acked_per_subject.get(idx, 0) + 1
                elif frame["op"] == "error":
                    errors += 1
                    first_error = first_error or payload.decode()[:300]
                elif frame["op"] == "connected":
                    connected += 1

    t0 = time.monotonic()
    pad = "x" * max(0, size - 20)
    while sent < total:
        elapsed = time.monotonic() - t0
        batches: dict[int, list[bytes]] = {}
        while sent < total and due_at[sent] <= elapsed:
            subject = subject_of[sent]
            ns = time.monotonic_ns()
            sent_at[sent] = ns
            payload = (f'{{"op":"publish","subject":"{PREFIX}{subject}","content":"{ns}|{pad}","id":{sent}}}'
                       .encode())
            batches.setdefault(sent % len(socks), []).append(ws_client_frame(payload))
            sent += 1
        for i, frames in batches.items():
            socks[i].setblocking(True)
            socks[i].sendall(b"".join(frames))
            socks[i].setblocking(False)
        next_due = t0 + (due_at[sent] if sent < total else 0.0)
        read_ready(max(0.0, next_due - time.monotonic()))
    t_sent = time.monotonic()
    deadline = t_sent + cmd.get("ack_timeout", 15)
    while acked + errors < total and time.monotonic() < deadline:
        read_ready(0.05)
    ok = ack_ns > 0
    ack_ms = (ack_ns[ok] - sent_at[ok]) / 1e6
    reply({"sent": sent, "acked": acked, "errors": errors, "first_error": first_error,
           "send_seconds": t_sent - t0, "rate_achieved": sent / max(1e-9, t_sent - t0),
           "final": {str(k): v for k, v in final.items()},
           "acked_per_subject": {str(k): v for k, v in acked_per_subject.items()},
           "ack_ms": {p: float(np.percentile(ack_ms, q)) for p, q in (("p50", 50), ("p99", 99), ("max", 100))}
           if len(ack_ms) else {}})
    ctl.poll(30)  # quit


# ---------------------------------------------------------------------------------------------------
# Orchestrator


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (the gateway's --workers), from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children", encoding="ascii") as fh:
                    todo.extend(int(x) for x in fh.read().split())
        except OSError:
            pass
    return out


def gateway_cpu(pid: int) -> float:
    return sum(proc_cpu_seconds(p) for p in tree_pids(pid))


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process tree's threads spent runnable but waiting for a CPU (/proc/<tid>/schedstat)."""
    return sum(schedstat_seconds(p, 1) or 0.0 for p in tree_pids(pid))


def gateway_rss(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


#: the slab caches a connected TCP socket takes objects from (its sock, inode, file, dentry, epoll entry)
SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")


def kernel_socket_memory() -> dict:
    """The machine's kernel memory for sockets now: active objects and object size of SOCKET_SLABS
    (/proc/slabinfo, readable by root only; {} otherwise) and the TCP line of /proc/net/sockstat
    (sockets in use, buffer memory in pages)."""
    out: dict = {"slabs": {}}
    try:
        with open("/proc/slabinfo", encoding="ascii") as fh:
            for line in fh:
                f = line.split()
                if f and f[0] in SOCKET_SLABS:
                    out["slabs"][f[0]] = {"active": int(f[1]), "objsize": int(f[3])}
    except OSError:
        pass
    with open("/proc/net/sockstat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                f = line.split()
                out["tcp"] = {k: int(v) for k, v in zip(f[1::2], f[2::2])}
    return out


def kernel_memory_delta(before: dict, after: dict) -> dict:
    """Kernel memory added between two kernel_socket_memory() readings, per TCP socket added. Client and
    gateway run on this machine, so both ends of every connection are counted: per socket is what one
    gateway-side socket costs (the ends are alike)."""
    sockets = after["tcp"]["inuse"] - before["tcp"]["inuse"]
    slabs = {name: (after["slabs"][name]["active"] - before["slabs"][name]["active"]) * after["slabs"][name]["objsize"]
             for name in after["slabs"] if name in before["slabs"]}
    page = os.sysconf("SC_PAGE_SIZE")
    per = max(1, sockets)
    return {"tcp_sockets_added": sockets,
            "slab_bytes_per_socket": {k: round(v / per) for k, v in slabs.items()},
            "slab_bytes_per_socket_total": round(sum(slabs.values()) / per) if slabs else None,
            "slab_object_sizes": {k: v["objsize"] for k, v in after["slabs"].items()},
            "tcp_buffer_bytes_per_socket": round((after["tcp"]["mem"] - before["tcp"]["mem"]) * page / per),
            "tcp_buffer_pages_after": after["tcp"]["mem"]}


class Gateway:
    def __init__(self, extra: list[str], cpus: set[int] | None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0", "--log-level",
                                      "warning", *extra], cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.pid = self.proc.pid
        if cpus:
            os.sched_setaffinity(self.pid, cpus)
        line = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
            if not line and self.proc.poll() is not None:
                break
        else:
            m = None
        if not m:
            self.stop()
            sys.exit(f"the gateway did not start: {line!r}")

    def stop(self) -> None:
        stop_process(self.proc)


def percentiles_ms(ns) -> dict:
    import numpy as np

    if len(ns) == 0:
        return {}
    qs = (50, 90, 99, 99.9, 100)
    vals = np.percentile(ns, qs) / 1e6
    return {("max" if q == 100 else f"p{q:g}"): round(float(v), 3) for q, v in zip(qs, vals)} | \
        {"mean": round(float(np.mean(ns)) / 1e6, 3), "count": int(len(ns))}


def connect_progress(children: list[Child], n: int, bar, until: float, step: float) -> list[dict]:
    """Poll the client processes every `step` s (showing it on the tqdm bar) until all n connections are
    ready or failed, or the monotonic clock passes `until`; returns each client's last progress."""
    while True:
        prog = [c.call({"op": "progress"}) for c in children]
        done = sum(p["ready"] + p["failed"] for p in prog)
        bar.n = done
        bar.refresh()
        if done >= n or time.monotonic() > until:
            return prog
        time.sleep(step)


def run_one(args, n: int, client_dir: str, bar_pos: int, deadline: float) -> dict:
    import numpy as np
    from tqdm import tqdm

    ncpu = os.cpu_count() or 1
    client_cpus = {ncpu - 1} if args.pin and ncpu >= 2 else None
    gateway_cpus = set(range(ncpu - 1)) if client_cpus else None
    gateway = None
    if args.url:
        m = re.match(r"wss?://([\d.]+):(\d+)", args.url)
        host, port, gpid = m.group(1), int(m.group(2)), args.pid
    else:
        gateway = Gateway(args.gateway_arg, gateway_cpus)
        host, port, gpid = HOST, gateway.port, gateway.pid
    procs = math.ceil(n / args.per_process)
    rng = np.random.default_rng(args.seed)
    subs = (rng.random((n, args.subjects)).argsort(axis=1)[:, :args.subjects_per_connection] + 1).astype(np.int32)
    per_subject = np.bincount(subs.ravel(), minlength=args.subjects + 1)
    env = {**os.environ, "LOADCLIENT_DIR": client_dir}
    me = os.path.abspath(__file__)
    children: list[Child] = []
    publisher = None
    tmp = tempfile.mkdtemp(prefix="loadgen-")
    result: dict = {"connections": n, "client_processes": procs, "gateway_pid": gpid}
    try:
        time.sleep(0.5)
        rss0 = gateway_rss(gpid)
        kernel0 = kernel_socket_memory()
        for k, chunk in enumerate(np.array_split(subs, procs)):
            child = Child([sys.executable, me, "--role", "client"], env=env, name=f"client-{k}")
            if client_cpus:
                os.sched_setaffinity(child.pid, client_cpus)
            child.send({"dst": host, "port": port, "src": f"127.0.0.{2 + k}", "subjects": chunk.tolist(),
                        "prefix": PREFIX, "window": args.window, "latcap": args.latency_cap})
            child.recv(60)
            children.append(child)
        # -- connect
        cpu0, t0 = gateway_cpu(gpid), time.monotonic()
        for c in children:
            c.call({"op": "connect"})
        with tqdm(total=n, desc=f"N={n} connect", unit="conn", position=bar_pos, leave=True) as bar:
            prog = connect_progress(children, n, bar, min(deadline, t0 + args.connect_timeout), 0.25)
        t_conn = time.monotonic() - t0
        cpu_conn = gateway_cpu(gpid) - cpu0
        ready = sum(p["ready"] for p in prog)
        time.sleep(1.0)  # let the gateway settle before reading memory
        rss1 = gateway_rss(gpid)
        kernel1 = kernel_socket_memory()
        result["connect"] = {"ready": ready, "failed": sum(p["failed"] for p in prog), "seconds": round(t_conn, 3),
                             "setups_per_s": round(ready / t_conn, 1),
                             "gateway_cpu_us_per_connection": round(cpu_conn / max(1, ready) * 1e6, 1)}
        result["memory"] = {"gateway_rss_before": rss0, "gateway_rss_connected": rss1,
                            "bytes_per_connection": round((rss1 - rss0) / max(1, ready)),
                            "kernel": kernel_memory_delta(kernel0, kernel1)}
        # -- idle CPU of the connected gateway (heartbeats and pings), 2 s
        cpu_i0, t_i0 = gateway_cpu(gpid), time.monotonic()
        time.sleep(2.0)
        idle_cpu_share = (gateway_cpu(gpid) - cpu_i0) / (time.monotonic() - t_i0)
        # -- measure
        pub_conns = args.pub_connections or max(1, math.ceil(args.rate / 500))
        publisher = Child([sys.executable, me, "--role", "publisher"], env=env, name="publisher")
        if client_cpus:
            os.sched_setaffinity(publisher.pid, client_cpus)
        publisher.send({"port": port, "connections": pub_conns})
        publisher.recv(60)
        for c in children:
            c.call({"op": "record"})
        ours = [c.pid for c in children] + [publisher.pid]
        cpu1, busy1, t1 = gateway_cpu(gpid), machine_busy_seconds(), time.monotonic()
        ours1, wait1 = sum(proc_cpu_seconds(p) for p in ours), runqueue_wait_seconds(gpid)
        ours_wait1 = sum(runqueue_wait_seconds(p) for p in ours)
        publisher.send({"op": "run", "rate": args.rate, "seconds": args.duration, "subjects": args.subjects,
                        "size": args.size, "pattern": args.pattern, "seed": args.seed})
        with tqdm(total=round(args.duration), desc=f"N={n} publish {args.rate:g}/s", unit="s",
                  position=bar_pos, leave=True) as bar:
            while time.monotonic() - t1 < args.duration:
                time.sleep(min(1.0, max(0.0, args.duration - (time.monotonic() - t1))))
                prog = [c.call({"op": "progress"}) for c in children]
                bar.n = min(round(args.duration), round(time.monotonic() - t1))
                bar.set_postfix(deliveries=sum(p["deliveries"] for p in prog))
        pub = publisher.recv(args.duration + 60)
        final = pub.pop("final")
        finals = [c.call({"op": "finish", "final": final, "timeout": args.drain_timeout, "dir": tmp},
                         timeout=args.drain_timeout + 60) for c in children]
        t_end = time.monotonic()
        cpu_meas = gateway_cpu(gpid) - cpu1
        busy = machine_busy_seconds() - busy1
        ours_cpu = sum(proc_cpu_seconds(p) for p in ours) - ours1
        wait = runqueue_wait_seconds(gpid) - wait1
        ours_wait = sum(runqueue_wait_seconds(p) for p in ours) - ours_wait1
        stats = [f["stats"] for f in finals]
        lat = np.concatenate([np.load(f["latencies"]) for f in finals]) if finals else np.zeros(0)
        setup = np.concatenate([np.load(f["setup_times"]) for f in finals]) if finals else np.zeros(0)
        deliveries = sum(s["deliveries"] for s in stats)
        expected = expected_deliveries(per_subject, pub.pop("acked_per_subject"))
        total = {k: sum(s[k] for s in stats) for k in ("deliveries", "duplicates", "out_of_order", "gaps",
                                                       "lost_in_gaps", "unexpected", "snapshots", "bad_frames",
                                                       "error_frames", "closed", "latencies_dropped")}
        wall = t_end - t1
        result["setup_ms"] = percentiles_ms(setup * 1e9)
        result["publisher"] = pub | {"connections": pub_conns}
        result["delivery"] = total | {
            "expected": expected,
            "missing_at_end": sum(f["missing_at_end"] for f in finals),
            "connections_behind_at_end": sum(f["connections_behind"] for f in finals),
            "seconds": round(wall, 3), "deliveries_per_s": round(deliveries / wall, 1),
            "gateway_cpu_seconds": round(cpu_meas, 3),
            "gateway_cpu_share": round(cpu_meas / wall, 3),
            "gateway_idle_cpu_share": round(idle_cpu_share, 4),
            "gateway_cpu_us_per_delivery": round(cpu_meas / max(1, deliveries) * 1e6, 3),
            "gateway_runqueue_wait_share": round(wait / wall, 3),
            "clients_and_publisher_cpu_share": round(ours_cpu / wall, 3),
            "clients_and_publisher_runqueue_wait_share": round(ours_wait / wall, 3),
            "other_processes_cpu_share": round((busy - cpu_meas - ours_cpu) / wall, 3),
            "machine_busy_share": round(busy / wall / (os.cpu_count() or 1), 3)}
        result["latency_ms"] = percentiles_ms(lat)
        result["gateway_rss_end"] = gateway_rss(gpid)
        result["first_errors"] = sorted({s["first_error"] for s in stats if s["first_error"]})[:5]
        return result
    finally:
        stop_children([publisher, *children])
        if gateway is not None:
            gateway.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["client", "publisher"], help=argparse.SUPPRESS)
    ap.add_argument("--connections", default="10000", help="comma-separated N values (default 10000)")
    ap.add_argument("--subjects", type=int, default=10, help="M subjects /matches/football/1..M (default 10)")
    ap.add_argument("--subjects-per-connection", type=int, default=3, help="S (default 3, at most 16)")
    ap.add_argument("--rate", type=float, default=100.0, help="R: published messages per second (default 100)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of publishing (default 15)")
    ap.add_argument("--pattern", choices=["steady", "demo"], default="steady",
                    help="steady: R msgs/s evenly, round-robin over the subjects; demo: the live-scores demo's "
                         "bursts (1-5 updates on random matches every 2 s / R; R = 1 is the demo's 1.5 msgs/s)")
    ap.add_argument("--size", type=int, default=64, help="content bytes (default 64; at least the timestamp)")
    ap.add_argument("--per-process", type=int, default=10000, help="connections per client process (< 19,000)")
    ap.add_argument("--window", type=int, default=256, help="handshakes in flight per client process")
    ap.add_argument("--pub-connections", type=int, default=0, help="publisher connections (0 = one per 500 msgs/s)")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for the gateway (repeatable)")
    ap.add_argument("--url", help="use this running gateway (ws://127.0.0.1:PORT/ws) instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the gateway's pid, for CPU and RSS from /proc")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin gateway and clients to CPUs")
    ap.add_argument("--connect-timeout", type=float, default=180.0)
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="wait for the last deliveries (s)")
    ap.add_argument("--latency-cap", type=int, default=20_000_000, help="latencies kept per client process")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--budget", type=float, default=900.0, help="stop starting new N after this many seconds")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "load.json"))
    args = ap.parse_args()
    if args.role == "client":
        return role_client()
    if args.role == "publisher":
        return role_publisher()
    if args.per_process >= 19000:
        sys.exit("--per-process must stay under 19,000 (20,000 open files per process)")
    if args.url and not args.pid:
        sys.exit("--url needs --pid (the gateway's CPU and memory are read from /proc)")
    ns = [int(x) for x in args.connections.split(",")]
    t_start = time.monotonic()
    deadline = t_start + args.budget
    client_dir = build_client()
    results = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "argv": sys.argv[1:], "settings": {k: v for k, v in vars(args).items() if k != "role"}, "runs": []}
    for _i, n in enumerate(ns):
        if time.monotonic() > deadline:
            print(f"budget of {args.budget:g} s used up, N={n} not run", file=sys.stderr)
            break
        results["runs"].append(run_one(args, n, client_dir, 0, deadline))
        r = results["runs"][-1]
        d, lat = r["delivery"], r["latency_ms"]
        print(f"N={n}: {r['connect']['ready']} ready ({r['connect']['setups_per_s']:g}/s), "
              f"{r['memory']['bytes_per_connection']} B/conn (kernel: slab "
              f"{r['memory']['kernel']['slab_bytes_per_socket_total']} B, buffers "
              f"{r['memory']['kernel']['tcp_buffer_bytes_per_socket']} B per socket); {d['deliveries']} deliveries "
              f"({d['deliveries_per_s']:g}/s), lost {d['lost_in_gaps'] + d['missing_at_end']}, "
              f"dup {d['duplicates']}, ooo {d['out_of_order']}; latency ms p50 {lat.get('p50')} "
              f"p99 {lat.get('p99')} max {lat.get('max')}; gateway {d['gateway_cpu_us_per_delivery']} us/delivery, "
              f"CPU {d['gateway_cpu_share']:.0%} (waiting for a CPU {d['gateway_runqueue_wait_share']:.0%}; "
              f"other processes {d['other_processes_cpu_share']:.0%} of a CPU)", flush=True)
    results["seconds"] = round(time.monotonic() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
