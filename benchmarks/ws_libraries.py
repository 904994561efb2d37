#!/usr/bin/env python3
"""Side-by-side benchmark of server-side WebSocket libraries for the gateway.

Variants (all on uvloop, one server subprocess each, 127.0.0.1 only):

  picows-afn            picows.ws_create_server, aiofastnet transports (picows default), default read buffer (16 KiB)
  picows-afn-rb256      same, read_buffer_init_size=256 (picows clamps this to 2048)
  picows-afn-min        same as rb256 + a LoggerAdapter as logger_name (avoids one logging.Logger per connection)
  picows-uv             picows.ws_create_server(use_aiofastnet=False): uvloop's own transports, default read buffer
  picows-uv-rb256       uvloop transports, read_buffer_init_size=256
  picows-uv-min         uvloop transports, rb256 + LoggerAdapter
  websockets-sansio     websockets.server.ServerProtocol driven by a minimal asyncio.Protocol
  wsproto               wsproto.WSConnection(SERVER) driven by a minimal asyncio.Protocol
  fanout-ws             the gateway's own layer: a protocol subclassing fanout.WSConn (Cython frame parser on the
                        fan-out Conn) with the opening request parsed by httptools (gateway.http.Request,
                        check_upgrade), wired exactly as gateway.session.Session does; uvloop's transports

Measurements (each repeated REPEATS times, median reported):
  (a) handshakes/s: N upgrade handshakes (connect, send upgrade, read 101, close) from one client
      process with C concurrent connections; also server CPU time per handshake (from /proc).
  (b) inbound frames/s: K connections each blasting pre-encoded masked ~60-byte JSON text frames;
      the server parses and counts them; rate = frames / (server time of last frame - first frame).
  (c) RSS per idle connection: (RSS with M upgraded idle connections - RSS with 0) / M, fresh server.

fanout-ws runs the installed package (pip install ".[bench]"), with its compiled fanout; the checkout is never
put on sys.path (benchmarks/_procs.py, require_installed_package).

Afterwards it runs functional checks of picows (interleaved raw writes, close codes, fragmentation,
plain HTTP on the upgrade path) and stores everything in benchmarks/results/ws_libraries.json.

Usage:  python benchmarks/ws_libraries.py [--quick] [--repeats 3] [--variants a,b,...] [--no-checks]
Internal roles (spawned by the orchestrator): --role server|client-hs|client-frames
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from _procs import require_installed_package

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_JSON = os.path.join(RESULTS_DIR, "ws_libraries.json")

VARIANTS = [
    "picows-afn", "picows-afn-rb256", "picows-afn-min",
    "picows-uv", "picows-uv-rb256", "picows-uv-min",
    "websockets-sansio", "wsproto", "fanout-ws",
]

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
PAYLOAD = b'{"op":"publish","topic":"orders.eu-west-1","seq":1234567,"v":42}'  # 64 bytes
MASK = b"\x37\xfa\x21\x3d"


def upgrade_request(port: int, path: str = "/ws") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def mask_bytes(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    m = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ m).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True,
                 mask: bytes = MASK, declared_len: int | None = None) -> bytes:
    n = len(payload) if declared_len is None else declared_len
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        hdr = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        hdr = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        hdr = struct.pack("!BBQ", b0, mbit | 127, n)
    if masked:
        return hdr + mask + mask_bytes(payload, mask)
    return hdr + payload


def install_uvloop():
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ----------------------------------------------------------------------------------------------
# Server role
# ----------------------------------------------------------------------------------------------

class Stats:
    __slots__ = ("open", "handshakes", "frames", "target", "t_start", "t_end")

    def __init__(self):
        self.open = 0
        self.handshakes = 0
        self.reset()

    def reset(self, target: int = 0):
        self.frames = 0
        self.target = target
        self.t_start = 0.0
        self.t_end = 0.0


S = Stats()
_perf = time.perf_counter


def _count(n: int):
    s = S
    if s.frames == 0:
        s.t_start = _perf()
    s.frames += n
    if s.target and s.frames >= s.target and not s.t_end:
        s.t_end = _perf()


def make_picows_server(variant: str):
    import picows
    from picows import WSCloseCode, WSListener, WSMsgType

    TEXT, BINARY, CONT, CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.CLOSE

    class Listener(WSListener):
        __slots__ = ()

        def on_ws_connected(self, transport):
            S.open += 1
            S.handshakes += 1

        def on_ws_frame(self, transport, frame):
            mt = frame.msg_type
            if mt in (TEXT, BINARY, CONT):
                if frame.fin:
                    s = S
                    if s.frames == 0:
                        s.t_start = _perf()
                    s.frames += 1
                    if s.frames == s.target:
                        s.t_end = _perf()
            elif mt == CLOSE:
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()

        def on_ws_disconnected(self, transport):
            S.open -= 1

    kw = {}
    kw["use_aiofastnet"] = "-afn" in variant
    if "rb256" in variant or variant.endswith("-min"):
        kw["read_buffer_init_size"] = 256
    if variant.endswith("-min"):
        kw["logger_name"] = logging.LoggerAdapter(logging.getLogger("picows.server"), {})

    async def start():
        return await picows.ws_create_server(lambda req: Listener(), HOST, 0, backlog=1024, **kw)
    return start


def make_websockets_server():
    from websockets.frames import Opcode
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)

    class Proto(asyncio.Protocol):
        __slots__ = ("tr", "p", "is_open")

        def connection_made(self, tr):
            self.tr = tr
            self.p = ServerProtocol(max_size=1 << 20)
            self.is_open = False

        def _flush(self):
            for d in self.p.data_to_send():
                if d:
                    self.tr.write(d)
                else:           # b"" == send EOF; a server closes the TCP connection
                    self.tr.close()
                    return

        def data_received(self, data):
            p = self.p
            p.receive_data(data)
            n = 0
            for ev in p.events_received():
                if isinstance(ev, Request):
                    resp = p.accept(ev)
                    p.send_response(resp)
                    if resp.status_code == 101:
                        self.is_open = True
                        S.open += 1
                        S.handshakes += 1
                elif ev.opcode in DATA and ev.fin:
                    n += 1
            if n:
                _count(n)
            self._flush()

        def eof_received(self):
            self.p.receive_eof()
            self._flush()
            return False

        def connection_lost(self, exc):
            if self.is_open:
                self.is_open = False
                S.open -= 1

    async def start():
        loop = asyncio.get_running_loop()
        return await loop.create_server(Proto, HOST, 0, backlog=1024)
    return start


def make_wsproto_server():
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage

    class Proto(asyncio.Protocol):
        __slots__ = ("tr", "c", "is_open")

        def connection_made(self, tr):
            self.tr = tr
            self.c = WSConnection(ConnectionType.SERVER)
            self.is_open = False

        def data_received(self, data):
            c = self.c
            c.receive_data(data)
            n = 0
            out = None
            close = False
            for ev in c.events():
                t = type(ev)
                if t is TextMessage or t is BytesMessage:
                    if ev.message_finished:
                        n += 1
                elif t is Request:
                    out = c.send(AcceptConnection())
                    self.is_open = True
                    S.open += 1
                    S.handshakes += 1
                elif t is Ping:
                    out = (out or b"") + c.send(ev.response())
                elif t is CloseConnection:
                    try:
                        out = (out or b"") + c.send(ev.response())
                    except Exception:
                        pass
                    close = True
            if n:
                _count(n)
            if out:
                self.tr.write(out)
            if close:
                self.tr.close()

        def eof_received(self):
            try:
                self.c.receive_data(None)
            except Exception:
                pass
            return False

        def connection_lost(self, exc):
            if self.is_open:
                self.is_open = False
                S.open -= 1

    async def start():
        loop = asyncio.get_running_loop()
        return await loop.create_server(Proto, HOST, 0, backlog=1024)
    return start


def make_fanout_server():
    """The gateway's layer: Session's upgrade path (gateway/session.py) minus the gateway's protocol."""
    import fanout
    from fanout import Conn, Writer, WSConn, encode_close
    from gateway import http

    if not fanout.COMPILED:
        raise SystemExit("fanout-ws: fanout is not compiled (FANOUT_NO_EXTENSIONS=1?)")
    MAX = 1 << 20                   # the gateway's defaults for max_pending_bytes and max_message_bytes
    W = []                          # the Writer, made in start() (it needs the running loop)

    def on_overflow(conn):
        conn.transport.abort()

    class Proto(WSConn):
        __slots__ = ("tr", "_http", "is_open")

        def __init__(self):
            self.tr = None
            self._http = None
            self.is_open = False

        def connection_made(self, tr):
            self.tr = tr
            self._http = http.Request()

        def http_received(self, data):
            req = self._http
            if req is None:
                return
            try:
                if not req.feed(data):
                    return
                self._http = None
                if req.path != b"/ws":
                    raise http.HttpError(404, "not found")
                answer = http.check_upgrade(req)
            except http.HttpError as exc:
                self._http = None
                self.tr.write(exc.response())
                self.tr.close()
                return
            tr = self.tr
            tr.write(answer)        # 101: from here on, frames
            self.is_open = True
            S.open += 1
            S.handshakes += 1
            self.ws_open(W[0], tr, MAX, MAX, on_overflow, req.rest)

        def ws_message(self, opcode, payload):
            s = S
            if s.frames == 0:
                s.t_start = _perf()
            s.frames += 1
            if s.frames == s.target:
                s.t_end = _perf()

        def _close(self, code, reason=b""):
            self.ws_stop_input()
            W[0].flush()            # what is queued goes first, as in Session.close
            Conn.close(self)
            self.tr.write(encode_close(code, reason))
            self.tr.close()

        def ws_close(self, code, reason):
            self._close(1000 if code == 1005 else code)

        def ws_fail(self, code, reason):
            self._close(code, reason.encode()[:120])

        def connection_lost(self, exc):
            Conn.close(self)  # first, as in Session: the fd may be reused right after this returns
            self._http = None
            self.ws_stop_input()
            if self.is_open:
                self.is_open = False
                S.open -= 1

    async def start():
        loop = asyncio.get_running_loop()
        W.append(Writer(loop))
        return await loop.create_server(Proto, HOST, 0, backlog=1024)
    return start


def run_server(variant: str):
    install_uvloop()
    if variant.startswith("picows"):
        start = make_picows_server(variant)
    elif variant == "websockets-sansio":
        start = make_websockets_server()
    elif variant == "wsproto":
        start = make_wsproto_server()
    elif variant == "fanout-ws":
        start = make_fanout_server()
    else:
        raise SystemExit(f"unknown variant {variant}")

    async def main():
        loop = asyncio.get_running_loop()
        server = await start()
        port = server.sockets[0].getsockname()[1]
        done = loop.create_future()
        buf = bytearray()
        fd = sys.stdin.fileno()

        def reply(obj):
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

        def on_stdin():
            data = os.read(fd, 4096)
            if not data:
                if not done.done():
                    done.set_result(None)
                return
            buf.extend(data)
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                cmd, *args = line.decode().split()
                if cmd == "stats":
                    reply({"open": S.open, "handshakes": S.handshakes, "frames": S.frames,
                           "elapsed": (S.t_end - S.t_start) if S.t_end else None})
                elif cmd == "reset":
                    S.reset(int(args[0]) if args else 0)
                    reply({"ok": True})
                elif cmd == "gc":
                    gc.collect()
                    reply({"ok": True})
                elif cmd == "quit" and not done.done():
                    done.set_result(None)

        loop.add_reader(fd, on_stdin)
        print(f"PORT {port}", flush=True)
        await done
        loop.remove_reader(fd)
        server.close()

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------
# Client roles
# ----------------------------------------------------------------------------------------------

def run_client_hs(port: int, n: int, conc: int, hold: bool):
    """N upgrade handshakes with `conc` in flight. hold=True keeps them open until stdin closes."""
    install_uvloop()
    req = upgrade_request(port)

    class P(asyncio.Protocol):
        __slots__ = ("fut", "buf", "tr")

        def __init__(self, fut):
            self.fut = fut
            self.buf = b""

        def connection_made(self, tr):
            self.tr = tr
            tr.write(req)

        def data_received(self, d):
            if self.fut is None:
                return
            self.buf += d
            if b"\r\n\r\n" in self.buf:
                good = self.buf.startswith(b"HTTP/1.1 101")
                f, self.fut, self.buf = self.fut, None, b""
                if not hold:
                    self.tr.close()
                f.set_result(good)

        def connection_lost(self, exc):
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(False)

    async def main():
        loop = asyncio.get_running_loop()
        remaining = n
        ok = fail = 0
        held = []

        async def worker():
            nonlocal remaining, ok, fail
            while remaining > 0:
                remaining -= 1
                fut = loop.create_future()
                try:
                    tr, _ = await loop.create_connection(lambda: P(fut), HOST, port)  # noqa: B023 (called at once)
                except OSError:
                    fail += 1
                    continue
                if await fut:
                    ok += 1
                    if hold:
                        held.append(tr)
                else:
                    fail += 1

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*[worker() for _ in range(conc)])
        elapsed = time.perf_counter() - t0
        print(json.dumps({"ok": ok, "fail": fail, "elapsed": elapsed,
                          "client_cpu_share": (time.process_time() - c0) / elapsed}), flush=True)
        if hold:
            ev = loop.create_future()
            loop.add_reader(sys.stdin.fileno(), lambda: ev.done() or ev.set_result(None))
            await ev
            for tr in held:
                tr.abort()
            await asyncio.sleep(0.05)

    asyncio.run(main())


def blocking_handshake(port: int, path: str = "/ws", timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.sendall(upgrade_request(port, path))
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError(f"closed during handshake: {buf!r}")
        buf += d
    head, _, tail = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake failed: {head!r}")
    return s, tail


def run_client_frames(port: int, conns: int, frames_per_conn: int):
    frame = encode_frame(0x1, PAYLOAD)
    blob = frame * frames_per_conn
    socks = [blocking_handshake(port)[0] for _ in range(conns)]
    for s in socks:
        s.settimeout(None)
    errors = []

    def send(s):
        try:
            s.sendall(blob)
        except OSError as e:
            errors.append(repr(e))

    ths = [threading.Thread(target=send, args=(s,)) for s in socks]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    print(json.dumps({"sent": conns * frames_per_conn, "frame_len": len(frame),
                      "send_elapsed": time.perf_counter() - t0, "errors": errors}), flush=True)
    sys.stdin.read()          # wait until the orchestrator says we are done (stdin closed)
    for s in socks:
        s.close()


# ----------------------------------------------------------------------------------------------
# Orchestrator helpers
# ----------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_times(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) / CLK_TCK, int(parts[12]) / CLK_TCK   # utime, stime


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


class LineProc:
    """Subprocess with a line-oriented stdout, read with timeouts (no blocking forever)."""

    def __init__(self, args, stderr_path):
        self.err = open(stderr_path, "ab")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.buf = b""
        STARTED.append(self)

    @property
    def pid(self):
        return self.p.pid

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"pid {self.pid}: no output within {timeout}s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                d = os.read(fd, 65536)
                if not d:
                    raise EOFError(f"pid {self.pid} exited (rc={self.p.poll()})")
                self.buf += d
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def send(self, line: str):
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def cmd(self, line: str, timeout: float = 10.0) -> dict:
        self.send(line)
        return json.loads(self.readline(timeout))

    def close_stdin(self):
        try:
            self.p.stdin.close()
        except (OSError, ValueError):
            pass

    def stop(self, timeout: float = 5.0):
        if self.p.poll() is None:
            try:
                if not self.p.stdin.closed:
                    self.send("quit")
            except (OSError, ValueError):
                pass
            self.close_stdin()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)      # only our own child, by PID
                self.p.wait()
        self.err.close()


STARTED: list[LineProc] = []


def stop_all():
    for lp in STARTED:
        try:
            lp.stop(timeout=3)
        except Exception:
            pass


def wait_for(server: LineProc, pred, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = server.cmd("stats")
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def bench_one(variant: str, cfg, tmp: str) -> dict:
    res = {}
    srv = LineProc(["--role", "server", "--variant", variant], os.path.join(tmp, f"{variant}.err"))
    try:
        port = int(srv.readline(15).split()[1])

        # (c) memory -- fresh server: warm up code paths, then baseline, then M idle connections
        w = LineProc(["--role", "client-hs", "--port", str(port), "--n", "200", "--conc", "20"],
                     os.path.join(tmp, "client.err"))
        json.loads(w.readline(30))
        w.stop()
        wait_for(srv, lambda s: s["open"] == 0, 5)
        srv.cmd("gc")
        time.sleep(0.2)
        rss0 = rss_bytes(srv.pid)
        h = LineProc(["--role", "client-hs", "--port", str(port), "--n", str(cfg.idle),
                      "--conc", "100", "--hold"], os.path.join(tmp, "client.err"))
        r = json.loads(h.readline(60))
        st = wait_for(srv, lambda s: s["open"] >= cfg.idle, 10)
        srv.cmd("gc")
        time.sleep(0.3)
        rss1 = rss_bytes(srv.pid)
        res["idle_conns"] = st["open"]
        res["idle_client_ok"] = r["ok"]
        res["rss0_mb"] = rss0 / 1e6
        res["rss_per_conn"] = (rss1 - rss0) / max(st["open"], 1)
        h.close_stdin()
        h.stop(10)
        wait_for(srv, lambda s: s["open"] == 0, 10)

        # (a) handshakes
        u0, s0 = cpu_times(srv.pid)
        c = LineProc(["--role", "client-hs", "--port", str(port), "--n", str(cfg.handshakes),
                      "--conc", str(cfg.hs_conc)], os.path.join(tmp, "client.err"))
        r = json.loads(c.readline(120))
        u1, s1 = cpu_times(srv.pid)
        c.stop()
        res["hs_ok"] = r["ok"]
        res["hs_fail"] = r["fail"]
        res["hs_per_s"] = r["ok"] / r["elapsed"]
        res["hs_server_cpu_us"] = (u1 + s1 - u0 - s0) / max(r["ok"], 1) * 1e6
        res["hs_server_user_us"] = (u1 - u0) / max(r["ok"], 1) * 1e6
        res["hs_server_cpu_share"] = (u1 + s1 - u0 - s0) / r["elapsed"]
        res["hs_client_cpu_share"] = r["client_cpu_share"]
        wait_for(srv, lambda s: s["open"] == 0, 10)

        # (b) inbound frames
        total = cfg.frame_conns * cfg.frames_per_conn
        srv.cmd(f"reset {total}")
        cpu0 = cpu_seconds(srv.pid)
        f = LineProc(["--role", "client-frames", "--port", str(port), "--conns", str(cfg.frame_conns),
                      "--frames", str(cfg.frames_per_conn)], os.path.join(tmp, "client.err"))
        st = wait_for(srv, lambda s: s["frames"] >= total, 120)
        cpu1 = cpu_seconds(srv.pid)
        fr = json.loads(f.readline(30))
        f.close_stdin()
        f.stop()
        res["frames_counted"] = st["frames"]
        res["frames_per_s"] = st["frames"] / st["elapsed"] if st["elapsed"] else None
        res["frame_server_cpu_ns"] = (cpu1 - cpu0) / max(st["frames"], 1) * 1e9
        res["frame_len"] = fr["frame_len"]
        res["frames_client_send_s"] = fr["send_elapsed"]
        res["frames_server_s"] = st["elapsed"]
    finally:
        srv.stop()
    return res


# ----------------------------------------------------------------------------------------------
# picows functional checks
# ----------------------------------------------------------------------------------------------

def run_check_server(use_aiofastnet: bool):
    install_uvloop()
    import picows
    from picows import WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener

    class Echo(WSListener):
        """Echoes a JSON description of each data frame; 'interleave:<mode>:<n>' starts the
        interleaved-write test."""

        def on_ws_frame(self, t, frame):
            if frame.msg_type == WSMsgType.CLOSE:
                t.send_close(frame.get_close_code())
                t.disconnect()
                return
            if frame.msg_type in (WSMsgType.PING, WSMsgType.PONG):
                return
            p = frame.get_payload_as_bytes()
            if p.startswith(b"interleave:"):
                _, mode, n = p.decode().split(":")
                start_interleave(t, mode, int(n))
                return
            t.send(WSMsgType.TEXT, json.dumps({
                "type": WSMsgType(frame.msg_type).name, "fin": bool(frame.fin),
                "payload": p.decode("latin-1")}).encode())

    def start_interleave(t, mode, n, batch_size=150):
        """Writes n frames, cycling picows send / underlying_transport.write / os.write(fd), in
        batches spread over loop iterations so that the transport backlog both builds up and drains."""
        loop = asyncio.get_running_loop()
        tr = t.underlying_transport
        sockobj = tr.get_extra_info("socket")
        fd = sockobj.fileno()
        st = {"transport_type": type(tr).__module__ + "." + type(tr).__name__,
              "socket_type": type(sockobj).__name__, "picows_send": 0, "transport_write": 0,
              "fd_full": 0, "fd_partial": 0, "fd_eagain": 0, "fd_deferred_buffer_nonempty": 0}
        filler = b"x" * 6000
        seq = iter(range(n))

        def write_one(i):
            payload = b"%07d:" % i + filler[: (i * 997) % 5000]
            k = i % 3
            if k == 0:
                t.send(WSMsgType.TEXT, payload)
                st["picows_send"] += 1
                return
            frame = encode_frame(0x1, payload, masked=False)   # pre-encoded server frame
            if k == 1:
                tr.write(frame)
                st["transport_write"] += 1
                return
            if mode == "safe" and tr.get_write_buffer_size() > 0:
                tr.write(frame)        # transport has a backlog -> must queue behind it
                st["fd_deferred_buffer_nonempty"] += 1
                return
            try:
                w = os.write(fd, frame)
            except BlockingIOError:
                w = 0
            if w == len(frame):
                st["fd_full"] += 1
            else:
                st["fd_partial" if w else "fd_eagain"] += 1
                tr.write(frame[w:])    # remainder must go through the transport

        def batch():
            if t.is_disconnected:
                return
            # 1st half: flood (transport backlog builds up while the kernel keeps draining it);
            # 2nd half: paced, so the backlog drains and most direct fd writes hit an empty transport.
            if st["picows_send"] * 3 >= n // 2 and tr.get_write_buffer_size() > 256 * 1024:
                loop.call_later(0.001, batch)
                return
            for _ in range(batch_size):
                i = next(seq, None)
                if i is None:
                    t.send(WSMsgType.TEXT, b"END " + json.dumps(st).encode())
                    return
                write_one(i)
            loop.call_later(0.001, batch)

        batch()

    def factory(req):
        if req.path == b"/healthz":
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(b'{"status":"ok"}\n',
                                                     extra_headers={"Content-Type": "application/json"}),
                None)
        if req.path == b"/ws":
            return Echo()
        return None

    async def main():
        loop = asyncio.get_running_loop()
        server = await picows.ws_create_server(factory, HOST, 0, max_frame_size=1024,
                                               read_buffer_init_size=256,
                                               use_aiofastnet=use_aiofastnet)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        done = loop.create_future()
        loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
        await done
        server.close()

    asyncio.run(main())


class FrameReader:
    def __init__(self, sock, initial=b""):
        self.s = sock
        self.buf = bytearray(initial)

    def _need(self, n):
        while len(self.buf) < n:
            d = self.s.recv(1 << 20)
            if not d:
                raise EOFError
            self.buf += d

    def read(self):
        """Returns (fin, opcode, payload) of the next server frame; raises on malformed framing."""
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        if b0 & 0x70 or (b0 & 0x0F) not in (0, 1, 2, 8, 9, 10) or b1 & 0x80:
            raise ValueError(f"malformed frame header {bytes(self.buf[:2]).hex()}")
        n, off = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, off = struct.unpack_from("!H", self.buf, 2)[0], 4
        elif n == 127:
            self._need(10)
            n, off = struct.unpack_from("!Q", self.buf, 2)[0], 10
        if n > 1 << 24:
            raise ValueError(f"absurd frame length {n}")
        self._need(off + n)
        payload = bytes(self.buf[off:off + n])
        del self.buf[:off + n]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def read_close(self):
        """Reads until a CLOSE frame, returns (code, reason, peer_closed_tcp)."""
        code = reason = None
        try:
            while True:
                fin, op, p = self.read()
                if op == 0x8:
                    code = struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None
                    reason = p[2:].decode(errors="replace")
                    break
        except (EOFError, OSError):
            return code, reason, True
        try:
            closed = self.s.recv(65536) == b""
        except OSError:
            closed = True
        return code, reason, closed


def check_interleave(port: int, mode: str, n: int) -> dict:
    s, tail = blocking_handshake(port)
    s.settimeout(10)
    s.sendall(encode_frame(0x1, f"interleave:{mode}:{n}".encode()))
    time.sleep(0.3)               # let server-side kernel + transport buffers fill up
    fr = FrameReader(s, tail)
    expected = 0
    result = {"mode": mode, "frames_sent": n, "frames_in_order": 0, "error": None}
    filler = b"x" * 6000
    try:
        while True:
            fin, op, p = fr.read()
            if p.startswith(b"END "):
                result["server_stats"] = json.loads(p[4:])
                break
            want = b"%07d:" % expected + filler[: (expected * 997) % 5000]
            if op != 0x1 or not fin or p != want:
                result["error"] = (f"frame #{expected}: got op={op} fin={fin} len={len(p)} {p[:12]!r}..., "
                                   f"expected len={len(want)}; content equal={p == want}")
                break
            expected += 1
    except Exception as e:
        result["error"] = f"after {expected} good frames: {type(e).__name__}: {e}"
    result["frames_in_order"] = expected
    s.close()
    return result


def check_protocol(port: int) -> dict:
    out = {}
    # 8 KiB Cookie header in the upgrade request, server read_buffer_init_size=256 (clamped to 2048)
    s = socket.create_connection((HOST, port), timeout=5)
    req = upgrade_request(port).replace(b"\r\n\r\n", b"\r\nCookie: " + b"c" * 8192 + b"\r\n\r\n")
    s.sendall(req)
    resp = b""
    while b"\r\n\r\n" not in resp:
        d = s.recv(65536)
        if not d:
            break
        resp += d
    out["8KiB_header_upgrade_with_rb256"] = resp.split(b"\r\n", 1)[0].decode()
    s.close()
    # unmasked client frame
    s, tail = blocking_handshake(port)
    s.sendall(encode_frame(0x1, b"hello", masked=False))
    out["unmasked_frame"] = dict(zip(("close_code", "reason", "tcp_closed"), FrameReader(s, tail).read_close()))
    s.close()
    # oversized frame (server max_frame_size=1024); only the header+mask is needed to trigger
    s, tail = blocking_handshake(port)
    s.sendall(encode_frame(0x2, b"\0" * 2000))
    out["oversized_frame_2000_gt_1024"] = dict(zip(("close_code", "reason", "tcp_closed"),
                                                   FrameReader(s, tail).read_close()))
    s.close()
    # fragmentation: TEXT(fin=0) PING CONT(fin=0) CONT(fin=1), then an orphan CONT, then bad UTF-8
    s, tail = blocking_handshake(port)
    s.settimeout(3)
    s.sendall(encode_frame(0x1, b"frag1-", fin=False) + encode_frame(0x9, b"p") +
              encode_frame(0x0, b"frag2-", fin=False) + encode_frame(0x0, b"frag3", fin=True))
    fr = FrameReader(s, tail)
    got = []
    for _ in range(4):
        fin, op, p = fr.read()
        got.append({0xA: "PONG"}.get(op) or json.loads(p))
    out["fragmented_message_delivery"] = got
    s.sendall(encode_frame(0x0, b"orphan-continuation", fin=True))
    out["orphan_continuation"] = json.loads(fr.read()[2])
    s.sendall(encode_frame(0x1, b"\xff\xfe invalid utf8"))
    out["invalid_utf8_text"] = json.loads(fr.read()[2])
    s.close()
    return out


def check_http(port: int) -> dict:
    out = {}
    curl = shutil.which("curl")
    env = dict(os.environ, NO_PROXY="*", no_proxy="*")
    env.pop("http_proxy", None)
    env.pop("HTTP_PROXY", None)
    cases = {
        "curl GET /healthz": ["-i", f"http://{HOST}:{port}/healthz"],
        "curl GET /unknown": ["-i", f"http://{HOST}:{port}/unknown"],
        "curl GET /ws (no Upgrade hdrs)": ["-i", f"http://{HOST}:{port}/ws"],
        "curl -I (HEAD) /healthz": ["-I", f"http://{HOST}:{port}/healthz"],
        "curl POST /healthz": ["-i", "-d", "x=1", f"http://{HOST}:{port}/healthz"],
        "curl --http1.0 /healthz": ["-i", "--http1.0", f"http://{HOST}:{port}/healthz"],
    }
    for name, args in cases.items():
        if not curl:
            out[name] = "curl not installed"
            continue
        p = subprocess.run([curl, "-s", "--noproxy", "*", "--max-time", "3"] + args,
                           capture_output=True, env=env, timeout=10)
        txt = p.stdout.decode(errors="replace").replace("\r\n", "\n")
        head, _, body = txt.partition("\n\n")
        lines = head.split("\n")
        out[name] = {"status": lines[0], "headers": lines[1:], "body": body.strip()[:80], "curl_rc": p.returncode}
    return out


def run_checks(tmp: str) -> dict:
    checks = {}
    for afn in (True, False):
        key = "aiofastnet" if afn else "uvloop"
        srv = LineProc(["--role", "check-server"] + (["--afn"] if afn else []),
                       os.path.join(tmp, f"check-{key}.err"))
        try:
            port = int(srv.readline(15).split()[1])
            c = {"interleave_safe": check_interleave(port, "safe", 20000),
                 "interleave_naive_fd_write": check_interleave(port, "naive", 20000)}
            c.update(check_protocol(port))
            c["http"] = check_http(port)
            checks[key] = c
        except Exception as e:
            checks[key] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            srv.stop()
    return checks


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main():
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="orchestrator")
    ap.add_argument("--variant")
    ap.add_argument("--port", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--conc", type=int)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--conns", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--afn", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small counts, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--handshakes", type=int, default=5000)
    ap.add_argument("--hs-conc", type=int, default=32)
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--frame-conns", type=int, default=4)
    ap.add_argument("--frames-per-conn", type=int, default=100000)
    ap.add_argument("--no-checks", action="store_true")
    a = ap.parse_args()

    if a.role == "server":
        return run_server(a.variant)
    if a.role == "check-server":
        return run_check_server(a.afn)
    if a.role == "client-hs":
        return run_client_hs(a.port, a.n, a.conc, a.hold)
    if a.role == "client-frames":
        return run_client_frames(a.port, a.conns, a.frames)

    if a.quick:
        a.repeats, a.handshakes, a.idle, a.frames_per_conn = 1, 1000, 1000, 10000
    variants = a.variants.split(",")
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="ws_libraries_")
    runs = {v: [] for v in variants}
    try:
        for rep in range(a.repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]   # rotate order
            for v in order:
                t0 = time.monotonic()
                try:
                    r = bench_one(v, a, tmp)
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"}
                runs[v].append(r)
                print(f"[rep {rep + 1}/{a.repeats}] {v:18s} {time.monotonic() - t0:5.1f}s  "
                      + json.dumps({k: (round(x, 1) if isinstance(x, float) else x) for k, x in r.items()}),
                      file=sys.stderr, flush=True)
        checks = {} if a.no_checks else run_checks(tmp)
    finally:
        stop_all()

    def med(v, key):
        xs = [r[key] for r in runs[v] if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    summary = {}
    for v in variants:
        summary[v] = {k: med(v, k) for k in ("hs_per_s", "hs_server_cpu_us", "hs_server_user_us", "frames_per_s",
                                              "frame_server_cpu_ns", "rss_per_conn", "rss0_mb")}
    lines = [
        "| variant | handshakes/s | server CPU µs/handshake (user) | inbound frames/s | server CPU ns/frame "
        "| RSS bytes/idle conn | base RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        s = summary[v]
        lines.append(f"| {v} | {fmt(s['hs_per_s'], ',.0f')} | {fmt(s['hs_server_cpu_us'], '.0f')} "
                     f"({fmt(s['hs_server_user_us'], '.0f')}) | "
                     f"{fmt(s['frames_per_s'], ',.0f')} | {fmt(s['frame_server_cpu_ns'], ',.0f')} | "
                     f"{fmt(s['rss_per_conn'], ',.0f')} | {fmt(s['rss0_mb'], '.1f')} |")
    table = "\n".join(lines)
    print(table)
    elapsed = time.monotonic() - t_start
    print(f"\n(median of {a.repeats}; {a.handshakes} handshakes @ concurrency {a.hs_conc}; "
          f"{a.frame_conns}x{a.frames_per_conn} frames of {len(encode_frame(1, PAYLOAD))} B; "
          f"{a.idle} idle conns; total {elapsed:.0f}s)")
    if checks:
        print("\npicows checks:\n" + json.dumps(checks, indent=1))

    import aiofastnet
    import httptools
    import picows
    import uvloop
    import websockets
    import wsproto
    try:
        import fanout
        fanout_compiled = fanout.COMPILED
    except ImportError:
        fanout_compiled = None
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(RESULTS_JSON, "w") as fp:
        json.dump({
            "config": {"repeats": a.repeats, "handshakes": a.handshakes, "hs_concurrency": a.hs_conc,
                       "idle_conns": a.idle, "frame_conns": a.frame_conns,
                       "frames_per_conn": a.frames_per_conn, "frame_bytes": len(encode_frame(1, PAYLOAD)),
                       "cpus": os.cpu_count(), "python": sys.version.split()[0],
                       "versions": {"picows": picows.__version__, "websockets": websockets.__version__,
                                    "wsproto": getattr(wsproto, "__version__", "1.3.2"),
                                    "uvloop": uvloop.__version__,
                                    "aiofastnet": getattr(aiofastnet, "__version__", "?"),
                                    "httptools": httptools.__version__, "fanout_compiled": fanout_compiled}},
            "median": summary, "runs": runs, "table_markdown": table, "picows_checks": checks,
            "elapsed_s": elapsed,
        }, fp, indent=1)
    print(f"\nwrote {RESULTS_JSON}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
