"""Small helpers shared by the multi-process benchmarks in this directory (not a test module).

The orchestrator talks to each child it spawned in JSON lines over the child's stdin/stdout;
every wait is bounded, and children are only ever stopped by their own pid.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import select
import signal
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_installed_package() -> None:
    """Exit with what to do unless `fanout` and `gateway` come from an installed package with the compiled
    fanout: the benchmarks measure what users install (`pip install ".[bench]"`), never the checkout,
    whose fanout has no compiled modules (nor, by accident, the pure-Python twins)."""
    advice = ('install the package: pip install ".[bench]" (from the checkout), then run the benchmark with '
              "that venv's python (python -P -m pytest, or pytest, for the pytest files: the checkout must "
              "not be on sys.path)")
    try:
        import fanout
        import gateway
    except ImportError as e:
        raise SystemExit(f"benchmarks: {e}; {advice}") from e
    for mod in (fanout, gateway):
        path = os.path.realpath(mod.__file__ or "")
        if os.path.dirname(path) == os.path.join(os.path.realpath(ROOT), mod.__name__):
            raise SystemExit(f"benchmarks: {mod.__name__} is imported from the checkout ({path}); {advice}")
    if not fanout.COMPILED:
        raise SystemExit("benchmarks: fanout runs its pure-Python twins (FANOUT_NO_EXTENSIONS=1?); unset it")


def reply(obj) -> None:
    """Child side: one JSON line to the orchestrator."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class StdinLines:
    """Child side: async JSON-line reader on stdin (for children running an event loop)."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader), sys.stdin)

    async def next(self) -> dict:
        line = await self.reader.readline()
        return json.loads(line) if line else {"op": "quit"}


class Child:
    """Orchestrator side: a child process speaking JSON lines."""

    def __init__(self, argv: list[str], env: dict | None = None, name: str | None = None,
                 stderr=None, cwd: str | None = None) -> None:
        self.name = name or " ".join(argv[-2:])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, cwd=cwd)
        self.pid = self.proc.pid
        self._buf = b""

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} (pid {self.pid}) did not answer in {timeout} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {self.proc.wait()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def recv(self, timeout: float = 120.0):
        return json.loads(self.readline(timeout))

    def call(self, obj, timeout: float = 120.0):
        self.send(obj)
        return self.recv(timeout)

    def stop(self, quit_msg: dict | None = None, term: bool = False) -> None:
        """Ask it to quit (or SIGTERM it), then kill it by its pid if it is still there after 5 s."""
        if self.proc.poll() is None:
            try:
                if term:
                    self.proc.terminate()
                else:
                    self.send(quit_msg or {"op": "quit"})
                self.proc.wait(5)
            except Exception:  # noqa: BLE001
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def stop_children(children: list[Child | None]) -> None:
    """Orchestrator side: Child.stop() each child in turn (None: one that was never started)."""
    for child in children:
        if child is not None:
            child.stop()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Orchestrator side: send `sig` to a process this script started, wait up to `grace` s for it to
    exit, then SIGKILL it (by its pid) if it is still there."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}


def busy_fraction(interval: float = 1.0) -> float:
    """Share of all CPUs' time spent busy (anything but idle/iowait) over `interval` seconds."""

    def sample():
        with open("/proc/stat", encoding="utf-8") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float = 0.15, max_wait: float = 60.0) -> float:
    """Wait (at most max_wait s) until other processes use < limit of the CPUs; returns the last reading.

    The benchmarks are only meaningful on an otherwise idle machine; a busy one is reported, not hidden.
    """
    deadline = time.monotonic() + max_wait
    busy = busy_fraction()
    while busy >= limit and time.monotonic() < deadline:
        busy = busy_fraction()
    return busy


_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port free on HOST now (released: a server started next binds it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def gateway_samples(port: int) -> dict[str, float] | None:
    """Every sample of a gateway's /metrics on HOST:port, as {'name{labels}': value}; None if unreachable."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-zA-Z_:][^ ]*) (\S+)$", text, re.M)}


#: the fan-out writer's counters in the gateway's /metrics
WRITER_SAMPLES = {"frames_out": "gateway_frames_out_total", "write_syscalls": "gateway_write_syscalls_total",
                  "flushes_held": "gateway_write_flushes_held_total", "busy_probes": "gateway_write_busy_probes_total",
                  "busy_share": "gateway_write_busy_share"}


def writer_counters(port: int) -> dict[str, float] | None:
    """The writer's counters of a gateway now, or None for a server without them (websockets)."""
    samples = gateway_samples(port) or {}
    if WRITER_SAMPLES["frames_out"] not in samples:
        return None
    return {k: samples.get(name, 0.0) for k, name in WRITER_SAMPLES.items()}


def writer_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """The writer's counters over a round (the busy share, a gauge, as the round left it); None without both."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before[k] for k in before if k != "busy_share"}
    delta["busy_share_last"] = after["busy_share"]
    return delta


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all CPUs)."""
    with open("/proc/stat", encoding="utf-8") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / _TCK


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0.0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TCK


def schedstat_seconds(pid: int, field: int) -> float | None:
    """A sum over a process's live threads from /proc/<pid>/task/*/schedstat, in seconds at ns resolution
    (utime + stime count 10 ms ticks): field 0 is time on a CPU, 1 time runnable but waiting for one.
    None when it cannot be read (the process is gone, or the kernel has no schedstat)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[field])
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def rss_bytes(pid: int) -> dict:
    """VmRSS and its anonymous part, in bytes, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmData"):
                out[key] = int(rest.split()[0]) * 1024
    return out
