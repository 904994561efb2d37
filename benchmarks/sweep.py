#!/usr/bin/env python3
"""Sweep one gateway process: latency against load, deliveries/s and memory against N, coalescing off vs on.

    pip install ".[bench]" py-spy
    python benchmarks/sweep.py        # about 12-15 minutes on 2 cores; bounded by --budget (default 1500 s)

For each N in --ns (connections of one standalone gateway process, each subscribed to 3 of the 10
subjects /matches/football/1..10, as benchmarks/load/loadgen.py does):

  floor    the bare C loop of benchmarks/fanout_sockets.py (`c-send`: one send(2) per socket, nothing
           else) in the same run: over one subject's subscribers (N x 3/10 sockets, read at C speed by
           drain processes on the other CPU), the time one core needs to write one message to all of
           them, the latency floor of issue 12 (median of --repeats rounds); then over all N sockets,
           the bare C one-send-per-delivery loop's deliveries per CPU-second.
  ladder   for coalescing off and on (--coalesce-us, --coalesce-min-conns): a fresh gateway
           (`python -m gateway serve`), N connections from loadgen's C clients (their setup and the
           gateway's RSS per connection; also the change of /proc/net/sockstat's TCP `mem`), then
           rounds of --duration s on the same connections at rising message rates: the demo's average
           (1.5 msgs/s), then offered deliveries/s of 10,000 x 1.5^k, until the gateway saturates
           (delivered < 90 % of offered, a p99 over --max-p99-ms, or messages missing at the end).
           Per round: publish -> receive latency percentiles, deliveries/s, gateway CPU (share of one
           core, per delivery) and its wait for a CPU, lost / duplicated / out-of-order, other
           processes' CPU, the gateway's cyclic-GC collections per generation and its writer's
           counters (frames, write syscalls, flushes held, busy probes; from its /metrics).
           The gateway runs on CPU 0, clients and publisher on CPU 1.
  profile  (unless --no-profile) py-spy --native on the gateway during one more round at the knee of
           the largest N, coalescing off: the functions that dominate there.

Derived per N and mode: saturation (the most deliveries/s of any round), the knee (the last round
before saturation), the round nearest half the saturation rate and its p99 / floor, and at the knee
deliveries/s per gateway core against the C loop's deliveries per CPU-second.

Output in benchmarks/results/: sweep.json, sweep_latency.png (percentiles against offered load, per N,
off and on), sweep_throughput.png (deliveries/s per core at the knee against N, with the C loop),
sweep_memory.png (gateway bytes per connection against N), sweep_profile.txt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "load"))
import loadgen as lg  # noqa: E402 (after the sys.path insert above)

import fanout_sockets as fs  # noqa: E402 (after the sys.path insert above)
from _procs import (  # noqa: E402 (after the sys.path insert above)
    Child,
    gateway_samples,
    machine,
    proc_cpu_seconds,
    writer_counters,
    writer_delta,
)

RESULTS = os.path.join(HERE, "results")
# py-spy from PyPI lands next to this interpreter (a venv's bin/), which need not be on PATH
PY_SPY = next((p for p in (os.path.join(os.path.dirname(sys.executable), "py-spy"), shutil.which("py-spy"))
               if p and os.access(p, os.X_OK)), None)
SUBJECTS, PER_CONN = 10, 3
DEMO_RATE = 1.5           # the demo's average: 1 to 5 updates every 2 s
LADDER_START, LADDER_STEP = 10_000, 1.5


def machine_busy_seconds() -> float:
    """CPU seconds the machine spent busy in processes (user, nice, system), all CPUs: without irq and
    softirq time, which the kernel charges to no process (loopback TCP receives run there), so that
    "other processes" = this minus our processes' utime + stime."""
    with open("/proc/stat", encoding="ascii") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    return (vals[0] + vals[1] + vals[2]) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------
# The floor: fanout_sockets.py's bare C send loop on sockets held by one process, drained at C speed


def measure_floor(n_sub: int, n_all: int, repeats: int, tmp: str) -> dict:
    # Without the checkout on PYTHONPATH: the sender imports the installed fanout (it needs no build in place).
    env = dict(os.environ, SENDREF_DIR=tmp)
    children: list[Child] = []
    try:
        sender = fs.child("sender-raw", env)
        children.append(sender)
        port = sender.recv(60)["port"]
        drains = []
        for _ in range(-(-n_all // fs.DRAIN_MAX)):
            drains.append(fs.child("drain", env))
            children.append(drains[-1])
        senders, ports, groups = {"raw": sender}, {"raw": port}, {"raw": drains}
        out = {}
        retries: dict = {}
        for label, n in (("subject", n_sub), ("all", n_all)):
            fs.connect(n, senders, groups, ports)
            fs.measure("c-send", n, senders, groups, retries)  # warm-up
            rounds = [fs.measure("c-send", n, senders, groups, retries) for _ in range(repeats)]
            e2e = sorted(r["e2e_s"] for r in rounds)
            send = sorted(r["send_s"] for r in rounds)
            cpu = sorted(r["cpu_ns_per_delivery"] for r in rounds)
            out[label] = {"sockets": n, "e2e_ms_median": e2e[len(e2e) // 2] * 1e3, "e2e_ms_min": e2e[0] * 1e3,
                          "send_ms_median": send[len(send) // 2] * 1e3,
                          # N x one send on the sender's CPU clock: the floor, free of other processes' noise
                          "cpu_ms": n * cpu[len(cpu) // 2] / 1e6,
                          "cpu_ns_per_delivery_median": cpu[len(cpu) // 2],
                          "deliveries_per_cpu_second": 1e9 / cpu[len(cpu) // 2],
                          "deliveries_per_s_median": n / (e2e[len(e2e) // 2])}
        out["retried_disturbed_rounds"] = sum(retries.values())
        return out
    finally:
        for c in children:
            c.stop()


# ---------------------------------------------------------------------------------------------------
# The gateway under load


def sockstat_tcp_bytes() -> int:
    """/proc/net/sockstat `TCP: ... mem` in bytes: the pages of TCP send and receive buffers in use.
    Idle sockets hold none, so this is ~0 per idle connection; the socket structures themselves are
    slab memory it does not count."""
    with open("/proc/net/sockstat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                f = line.split()
                return int(f[f.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def gc_collections(port: int) -> list[float] | None:
    """The gateway's cyclic-GC collections so far per generation (its /metrics), None if it has none."""
    samples = gateway_samples(port) or {}
    found = [samples.get(f'python_gc_collections_total{{generation="{g}"}}') for g in "012"]
    return None if None in found else found


def held_text(writer: dict | None) -> str:
    """'; N flushes held, P probes, F frames per write' for a round's writer counters ('' without them)."""
    if writer is None:
        return ""
    per_write = writer["frames_out"] / max(1.0, writer["write_syscalls"])
    return (f"; {writer['flushes_held']:.0f} flushes held, {writer['busy_probes']:.0f} probes, "
            f"{per_write:.2f} frames per write")


class Loaded:
    """One gateway with N connected, subscribed C clients; rounds of publishing at given rates."""

    def __init__(self, n: int, extra: list[str], client_dir: str, seed: int, src_base: int = 2) -> None:
        self.n = n
        self.children: list[Child] = []
        self.env = {**os.environ, "LOADCLIENT_DIR": client_dir}
        self.tmp = tempfile.mkdtemp(prefix="sweep-")
        self.final: dict[int, int] = {}
        self.gateway = lg.Gateway(extra, {0})
        self.pid, self.port = self.gateway.pid, self.gateway.port
        try:
            self._connect(n, seed, src_base)
        except BaseException:
            self.close()
            raise

    def _connect(self, n: int, seed: int, src_base: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        subs = (rng.random((n, SUBJECTS)).argsort(axis=1)[:, :PER_CONN] + 1).astype(np.int32)
        self.per_subject = np.bincount(subs.ravel(), minlength=SUBJECTS + 1)
        time.sleep(0.5)
        rss0, kmem0 = lg.gateway_rss(self.pid), sockstat_tcp_bytes()
        for k, chunk in enumerate(np.array_split(subs, math.ceil(n / 10_000))):
            child = Child([sys.executable, os.path.join(HERE, "load", "loadgen.py"), "--role", "client"],
                          env=self.env, name=f"client-{k}")
            self.children.append(child)
            os.sched_setaffinity(child.pid, {1})
            child.send({"dst": lg.HOST, "port": self.port, "src": f"127.0.0.{src_base + k}", "subjects": chunk.tolist(),
                        "prefix": lg.PREFIX, "window": 256, "latcap": 20_000_000})
            child.recv(60)
        cpu0, t0 = lg.gateway_cpu(self.pid), time.monotonic()
        for c in self.children:
            c.call({"op": "connect"})
        while True:
            prog = [c.call({"op": "progress"}) for c in self.children]
            done = sum(p["ready"] + p["failed"] for p in prog)
            if done >= n or time.monotonic() > t0 + 180:
                break
            time.sleep(0.25)
        seconds = time.monotonic() - t0
        ready = sum(p["ready"] for p in prog)
        cpu = lg.gateway_cpu(self.pid) - cpu0
        time.sleep(1.0)
        rss1, kmem1 = lg.gateway_rss(self.pid), sockstat_tcp_bytes()
        self.connect = {"ready": ready, "failed": sum(p["failed"] for p in prog), "seconds": round(seconds, 2),
                        "setups_per_s": round(ready / seconds, 1),
                        "gateway_cpu_us_per_connection": round(cpu / max(1, ready) * 1e6, 1)}
        # Loopback: the kernel holds both ends, so its buffer pages per connection cover two sockets.
        self.memory = {"gateway_rss_before": rss0, "gateway_rss_connected": rss1,
                       "gateway_bytes_per_connection": round((rss1 - rss0) / max(1, ready)),
                       "kernel_tcp_bytes_per_connection_both_ends": round((kmem1 - kmem0) / max(1, ready))}
        if ready != n:
            raise RuntimeError(f"N={n}: only {ready} of {n} connections ready")

    def round(self, rate: float, duration: float, profile: str | None = None) -> dict:
        import numpy as np

        pub_conns = max(1, math.ceil(rate / 500))
        publisher = Child([sys.executable, os.path.join(HERE, "load", "loadgen.py"), "--role", "publisher"],
                          env=self.env, name="publisher")
        spy = None
        try:
            os.sched_setaffinity(publisher.pid, {1})
            publisher.send({"port": self.port, "connections": pub_conns})
            publisher.recv(60)
            for c in self.children:
                c.call({"op": "record"})
            ours = [c.pid for c in self.children] + [publisher.pid]
            gc1, writer1 = gc_collections(self.port), writer_counters(self.port)
            cpu1, busy1, t1 = lg.gateway_cpu(self.pid), machine_busy_seconds(), time.monotonic()
            ours1, wait1 = sum(proc_cpu_seconds(p) for p in ours), lg.runqueue_wait_seconds(self.pid)
            if profile:
                # --native (Cython and C frames) stops the process for each sample: 100 Hz keeps that small.
                spy = subprocess.Popen([PY_SPY or "py-spy", "record", "--native", "--format", "raw",
                                        "--rate", "100", "--duration", str(max(1, int(duration))), "--pid",
                                        str(self.pid), "--output", profile],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                os.sched_setaffinity(spy.pid, {1})
            publisher.send({"op": "run", "rate": rate, "seconds": duration, "subjects": SUBJECTS, "size": 64})
            pub = publisher.recv(duration + 60)
            finals = [c.call({"op": "finish", "final": pub["final"], "timeout": 20.0, "dir": self.tmp}, timeout=90)
                      for c in self.children]
            wall = time.monotonic() - t1
            cpu = lg.gateway_cpu(self.pid) - cpu1
            busy = machine_busy_seconds() - busy1
            ours_cpu = sum(proc_cpu_seconds(p) for p in ours) - ours1
            wait = lg.runqueue_wait_seconds(self.pid) - wait1
            gc2, writer2 = gc_collections(self.port), writer_counters(self.port)
        finally:
            publisher.stop()
            if spy is not None:
                try:
                    spy.wait(duration + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
        stats = [f["stats"] for f in finals]
        lat = np.concatenate([np.load(f["latencies"]) for f in finals])
        new_final = {int(k): v for k, v in pub["final"].items()}
        expected = int(sum(self.per_subject[k] * (v - self.final.get(k, 0)) for k, v in new_final.items()))
        self.final.update(new_final)
        total = {k: sum(s[k] for s in stats) for k in ("deliveries", "duplicates", "out_of_order", "gaps",
                                                       "lost_in_gaps", "closed", "latencies_dropped")}
        deliveries = total["deliveries"]
        offered = rate * float(self.per_subject.sum()) / SUBJECTS
        return {"rate": rate, "offered_deliveries_per_s": round(offered, 1), "publisher": pub | {"final": None},
                **total, "expected": expected, "missing_at_end": sum(f["missing_at_end"] for f in finals),
                "seconds": round(wall, 3), "deliveries_per_s": round(deliveries / wall, 1),
                "gateway_cpu_share": round(cpu / wall, 3),
                "gateway_cpu_us_per_delivery": round(cpu / max(1, deliveries) * 1e6, 3),
                "gateway_runqueue_wait_share": round(wait / wall, 3),
                "clients_and_publisher_cpu_share": round(ours_cpu / wall, 3),
                "other_processes_cpu_share": round(max(0.0, busy - cpu - ours_cpu) / wall, 3),
                # full collections walk every connection's objects: they should stay at 0 in steady state
                "gc_collections": None if gc1 is None or gc2 is None else [round(b - a) for a, b in zip(gc1, gc2)],
                # frames, write syscalls, flushes held by --coalesce-us and busy probes over the round
                "writer": writer_delta(writer1, writer2),
                "latency_ms": lg.percentiles_ms(lat)}

    def close(self) -> None:
        for c in self.children:
            c.stop()
        self.gateway.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def saturated(r: dict, max_p99_ms: float) -> bool:
    """Deliveries fell behind the offered load (they are counted until the last one arrived), the
    publisher could not send at the rate, the p99 grew past the limit, or messages never arrived."""
    return (r["deliveries_per_s"] < 0.9 * r["offered_deliveries_per_s"]
            or r["publisher"]["rate_achieved"] < 0.9 * r["rate"]
            or r["latency_ms"].get("p99", math.inf) > max_p99_ms
            or r["missing_at_end"] > 0)


def rates_for(n: int, limit: int) -> list[float]:
    per_msg = n * PER_CONN / SUBJECTS
    rates = [DEMO_RATE]
    target = LADDER_START
    while len(rates) < limit:
        rates.append(round(target / per_msg, 1))
        target *= LADDER_STEP
    return rates


def summarize(mode: dict, floor: dict) -> dict:
    rounds = mode["rounds"]
    ok = [r for r in rounds if not r["saturated"]]
    best = max(rounds, key=lambda r: r["deliveries_per_s"])
    knee = ok[-1] if ok else rounds[0]
    half = min(ok or rounds, key=lambda r: abs(r["deliveries_per_s"] - best["deliveries_per_s"] / 2))
    per_core = knee["deliveries_per_s"] / max(1e-9, knee["gateway_cpu_share"])
    c_per_core = floor["all"]["deliveries_per_cpu_second"]
    fl = floor["subject"]["cpu_ms"]
    fl_e2e = floor["subject"]["e2e_ms_median"]
    return {"saturation_deliveries_per_s": best["deliveries_per_s"], "knee_rate": knee["rate"],
            "knee_deliveries_per_s": knee["deliveries_per_s"], "knee_gateway_cpu_share": knee["gateway_cpu_share"],
            "knee_deliveries_per_s_per_core": round(per_core), "c_send_deliveries_per_cpu_second": round(c_per_core),
            "knee_per_core_over_c_send": round(per_core / c_per_core, 3),
            "half_rate": half["rate"], "half_deliveries_per_s": half["deliveries_per_s"],
            "half_p99_ms": half["latency_ms"].get("p99"), "floor_ms": round(fl, 3),
            "half_p99_over_floor": round(half["latency_ms"].get("p99", math.nan) / fl, 2),
            "floor_e2e_ms": round(fl_e2e, 3),
            "half_p99_over_floor_e2e": round(half["latency_ms"].get("p99", math.nan) / fl_e2e, 2),
            "knee_p99_ms": knee["latency_ms"].get("p99"),
            "knee_gateway_cpu_us_per_delivery": knee["gateway_cpu_us_per_delivery"],
            "knee_gateway_runqueue_wait_share": knee["gateway_runqueue_wait_share"],
            "knee_other_processes_cpu_share": knee["other_processes_cpu_share"],
            "gen2_collections": sum((r.get("gc_collections") or [0, 0, 0])[2] for r in rounds),
            "half_gateway_runqueue_wait_share": half["gateway_runqueue_wait_share"],
            "half_other_processes_cpu_share": half["other_processes_cpu_share"],
            "lost": sum(r["lost_in_gaps"] + r["missing_at_end"] for r in rounds),
            "duplicates": sum(r["duplicates"] for r in rounds),
            "out_of_order": sum(r["out_of_order"] for r in rounds)}


# ---------------------------------------------------------------------------------------------------
# Profile and plots


def profile_summary(path: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            k = int(count)
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # name (file), no line
            total += k
            self_c[frames[-1]] += k
            for f in set(frames):
                incl[f] += k
    if not total:
        return "no samples\n"
    lines = [f"{total} samples\n", "self %  function"]
    lines += [f"{100 * v / total:6.1f}  {f}" for f, v in self_c.most_common(top)]
    lines += ["", "inclusive %  function"]
    lines += [f"{100 * v / total:6.1f}  {f}" for f, v in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def plot(doc: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(k) for k in doc["per_n"]]
    modes = list(doc["modes"])
    out = []
    # latency percentiles against offered load, one panel per N
    fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 4.2), squeeze=False)
    for ax, n in zip(axes[0], ns):
        cell = doc["per_n"][str(n)]
        for mode, style in zip(modes, ("-", "--")):
            rounds = cell["modes"][mode]["rounds"]
            xs = [r["offered_deliveries_per_s"] for r in rounds]
            for q, color in (("p50", "tab:blue"), ("p99", "tab:red"), ("max", "tab:gray")):
                ax.plot(xs, [r["latency_ms"].get(q) for r in rounds], style, color=color, marker=".",
                        label=f"{q} coalescing {mode}")
        ax.axhline(cell["floor"]["subject"]["cpu_ms"], color="k", lw=1, label="floor (C send loop, CPU time)")
        ax.axhline(1.5 * cell["floor"]["subject"]["cpu_ms"], color="k", lw=1, ls=":", label="1.5 x floor")
        ax.axhline(cell["floor"]["subject"]["e2e_ms_median"], color="tab:green", lw=1, ls="-.",
                   label="floor, last byte read (median)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"N = {n:,} (one process)")
        ax.set_xlabel("offered deliveries/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("publish -> receive latency (ms)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out.append(os.path.join(RESULTS, "sweep_latency.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    # deliveries/s (per gateway core, at the knee, and at saturation) against N
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in zip(modes, ("o", "s")):
        s = [doc["per_n"][str(n)]["modes"][mode]["summary"] for n in ns]
        ax.plot(ns, [x["knee_deliveries_per_s_per_core"] for x in s], marker=marker,
                label=f"gateway per core at the knee, coalescing {mode}")
        ax.plot(ns, [x["saturation_deliveries_per_s"] for x in s], marker=marker, ls=":",
                label=f"gateway deliveries/s at saturation, coalescing {mode}")
    ax.plot(ns, [doc["per_n"][str(n)]["floor"]["all"]["deliveries_per_cpu_second"] for n in ns], "k^-",
            label="bare C send loop, per CPU-second")
    ax.set_xlabel("connections N (one process)")
    ax.set_ylabel("deliveries/s")
    ax.set_yscale("log")
    ax.set_xticks(ns)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(os.path.join(RESULTS, "sweep_throughput.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    # memory against N
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in zip(modes, ("o", "s")):
        ax.plot(ns, [doc["per_n"][str(n)]["modes"][mode]["memory"]["gateway_bytes_per_connection"] for n in ns],
                marker=marker, label=f"gateway RSS per connection (coalescing {mode})")
    ax.axhline(2048, color="r", ls=":", label="target: 2 KiB")
    ax.set_xlabel("connections N (one process)")
    ax.set_ylabel("bytes per connection")
    ax.set_xticks(ns)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(os.path.join(RESULTS, "sweep_memory.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1000,5000,10000,19000", help="connections per run (default 1000,5000,10000,19000)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of publishing per round (default 5)")
    ap.add_argument("--max-rounds", type=int, default=11,
                    help="rounds per ladder, the demo's rate included (default 11: up to 577k deliveries/s)")
    ap.add_argument("--max-p99-ms", type=float, default=1000.0, help="a round with a larger p99 is saturated")
    ap.add_argument("--coalesce-us", type=int, default=1000, help="--coalesce-us of the 'on' gateway (default 1000)")
    ap.add_argument("--coalesce-min-conns", type=int, default=1000, help="its --coalesce-min-conns (default 1000)")
    ap.add_argument("--coalesce-busy-pct", type=int, default=0,
                    help="its --coalesce-busy-pct (default 0: the window follows every big flush, as when "
                         "BENCHMARKS.md's sweep was measured; the gateway's own default is 80)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds of the C floor loop per N (median; default 7)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--budget", type=float, default=1500.0, help="start nothing new after this many seconds")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(RESULTS, "sweep.json"))
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs: the gateway on CPU 0, clients and drains on CPU 1")
    if args.profile and PY_SPY is None:
        sys.exit("py-spy not found (pip install py-spy), or run with --no-profile")
    ns = [int(x) for x in args.ns.split(",")]
    if max(ns) >= 19_500:
        sys.exit("one process holds fewer than 19,500 connections (20,000 open files)")
    started = time.monotonic()
    deadline = started + args.budget
    os.sched_setaffinity(0, {1})
    client_dir = lg.build_client()
    tmp = tempfile.mkdtemp(prefix="sweep-sendref-")
    fs.build_sendref(tmp)
    modes = {"off": [], "on": [f"--coalesce-us={args.coalesce_us}", f"--coalesce-min-conns={args.coalesce_min_conns}",
                               f"--coalesce-busy-pct={args.coalesce_busy_pct}"]}
    doc: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "argv": sys.argv[1:], "settings": vars(args), "modes": modes, "per_n": {}}
    busy0, own0 = machine_busy_seconds(), sum(os.times()[:4])
    try:
        for n in ns:
            if time.monotonic() > deadline:
                print(f"budget used up: N={n} not run", file=sys.stderr)
                break
            n_sub = round(n * PER_CONN / SUBJECTS)
            print(f"N={n}: floor (C send loop over {n_sub} and {n} sockets)", flush=True)
            cell: dict = {"floor": measure_floor(n_sub, n, args.repeats, tmp), "modes": {}}
            doc["per_n"][str(n)] = cell
            print(f"  floor {cell['floor']['subject']['cpu_ms']:.3f} ms CPU, "
                  f"{cell['floor']['subject']['e2e_ms_median']:.3f} ms to the last byte read; C loop "
                  f"{cell['floor']['all']['deliveries_per_cpu_second']:,.0f} deliveries per CPU-second", flush=True)
            # Both gateways at once (their clients on different source addresses), each rate run on one
            # and then the other, first one and then the other first: paired rounds seconds apart, so a
            # change in the machine's other load hits both modes alike.
            loadeds: dict[str, Loaded] = {}
            try:
                for i, (mode, extra) in enumerate(modes.items()):
                    loadeds[mode] = Loaded(n, extra, client_dir, args.seed, src_base=2 + 10 * i)
                    cell["modes"][mode] = {"connect": loadeds[mode].connect, "memory": loadeds[mode].memory,
                                           "rounds": []}
                done: set[str] = set()
                for k, rate in enumerate(rates_for(n, args.max_rounds)):
                    order = list(modes) if k % 2 == 0 else list(modes)[::-1]
                    for mode in order:
                        if mode in done or time.monotonic() > deadline:
                            continue
                        r = loadeds[mode].round(rate, args.duration)
                        r["saturated"] = saturated(r, args.max_p99_ms)
                        cell["modes"][mode]["rounds"].append(r)
                        lat = r["latency_ms"]
                        print(f"  {mode:<3} R={rate:g}/s: {r['deliveries_per_s']:,.0f} deliveries/s of "
                              f"{r['offered_deliveries_per_s']:,.0f}; p50/p99/max {lat.get('p50')}/{lat.get('p99')}/"
                              f"{lat.get('max')} ms; gateway {r['gateway_cpu_share']:.0%} CPU "
                              f"(waiting {r['gateway_runqueue_wait_share']:.0%}), "
                              f"{r['gateway_cpu_us_per_delivery']} us/delivery; "
                              f"others {r['other_processes_cpu_share']:.0%}; "
                              f"GC collections per generation {r['gc_collections']}"
                              f"{held_text(r['writer'])}{'; SATURATED' if r['saturated'] else ''}", flush=True)
                        if r["saturated"]:
                            done.add(mode)
                    if len(done) == len(modes):
                        break
                for mode in modes:
                    cell["modes"][mode]["summary"] = summarize(cell["modes"][mode], cell["floor"])
                if args.profile and n == max(ns) and time.monotonic() < deadline:
                    knee = cell["modes"]["off"]["summary"]["knee_rate"]
                    path = os.path.join(tempfile.gettempdir(), f"sweep-pyspy-{os.getpid()}.txt")
                    loadeds["off"].round(knee, max(10.0, args.duration), profile=path)
                    if os.path.exists(path):
                        head = (f"py-spy --native, gateway (standalone, one process), N={n}, {knee} msgs/s "
                                f"(the knee), coalescing off\n")
                        with open(os.path.join(RESULTS, "sweep_profile.txt"), "w", encoding="utf-8") as fh:
                            fh.write(head + profile_summary(path))
                        os.unlink(path)
            finally:
                for loaded in loadeds.values():
                    loaded.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - started
    ours_cpu = sum(os.times()[:4]) - own0  # this process and every child it started (all reaped by now)
    doc["seconds"] = round(wall, 1)
    doc["foreign_cpu_share"] = round(max(0.0, machine_busy_seconds() - busy0 - ours_cpu)
                                     / (wall * (os.cpu_count() or 1)), 3)
    os.makedirs(RESULTS, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    pngs = plot(doc) if all(len(c["modes"]) == len(modes) for c in doc["per_n"].values()) and doc["per_n"] else []
    print_table(doc)
    print(f"\nother processes used {doc['foreign_cpu_share']:.0%} of the machine; wrote {args.out} "
          + " ".join(os.path.relpath(p) for p in pngs) + f" ({doc['seconds']} s)")
    return 0


def print_table(doc: dict) -> None:
    print("\nN       mode  floor ms  half: deliv/s  p99 ms  /floor   knee: deliv/s  per core  /C loop   sat deliv/s"
          "  B/conn  lost dup ooo")
    for n, cell in doc["per_n"].items():
        for mode, m in cell["modes"].items():
            if "summary" not in m:
                continue
            s = m["summary"]
            print(f"{n:<7} {mode:<4} {s['floor_ms']:>8.2f}  {s['half_deliveries_per_s']:>13,.0f} {s['half_p99_ms']:>7} "
                  f"{s['half_p99_over_floor']:>6}   {s['knee_deliveries_per_s']:>13,.0f} "
                  f"{s['knee_deliveries_per_s_per_core']:>9,} "
                  f"{s['knee_per_core_over_c_send']:>7}   {s['saturation_deliveries_per_s']:>11,.0f}  "
                  f"{m['memory']['gateway_bytes_per_connection']:>6}  "
                  f"{s['lost']} {s['duplicates']} {s['out_of_order']}")


if __name__ == "__main__":
    sys.exit(main())
