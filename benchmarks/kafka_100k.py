#!/usr/bin/env python3
"""100,000 WebSocket users through Kafka on this box, by one command (issue 12's first target).

    pip install ".[bench]"
    python benchmarks/kafka_100k.py                     # about 5 minutes on 2 cores; bounded by --budget
    python benchmarks/kafka_100k.py --connections 20000 --rates 1 --duration 10   # a quick trial

In one run, one step after the other:

  kafka    the tests' 3-node Apache Kafka 4.1.1 cluster (tests/support/kafka_cluster.py, KRaft, replication
           factor 3, min.insync.replicas=2), a fresh topic `matches` (--partitions) since the cluster is new.
  floor    benchmarks/fanout_sockets.py's bare C send loop (one send(2) per socket) over --floor-sockets
           sockets held by one process, drained at C speed by other processes (as benchmarks/sweep.py
           does): its CPU time per send. One match's subscribers are N x 3/10 = 30,000 sockets at N =
           100k, more than one process may hold (20,000 open files), so the floor is that per-send
           CPU time x the subscribers of the busiest match: the time one core needs to write them all
           (issue 12's definition). The same x 1/2 is the ideal with the work split over both cores.
           Then the same loop with readers that sleep in epoll_wait (as the load clients do), so that
           each send also wakes a reader: what co-located clients add to a sender's cost.
  rtt      the Kafka round trip alone, no gateway: an aiokafka producer (acks=all, the gateway's linger)
           to an aiokafka consumer (the gateway's fetch wait) on the same cluster
           (benchmarks/kafka_latency.py's baseline), --rtt-messages at --rtt-rate.
  gateway  `python -m gateway serve --kafka ... --topics matches --workers W --port P`, W the smallest
           count whose SO_REUSEPORT share (hashed, so binomial) stays under --max-per-worker connections
           with 4 standard deviations to spare (6 for 100k under this box's 20,000 open files per
           process; workers = cores is impossible here). Worker i is pinned to CPU i mod cores; clients,
           publisher and brokers are not pinned.
  connect  N connections from loadgen's C clients (benchmarks/load/), ceil(N / --per-process) processes,
           process k from source address 127.0.0.(2+k); each subscribes to 3 of /matches/football/1..10.
           Setup rate and time, gateway CPU per setup, RSS per connection (all workers), connections per
           worker (open sockets from /proc).
  rounds   per --rates multiplier m: --duration s of the demo's traffic x m (gateway.demo_feed's
           schedule: every 2/m s a burst of 1-5 updates on random matches, 1.5 x m msgs/s on average),
           published through the gateway (WebSocket `publish` with `id`, so into Kafka and back out of
           every worker). Lost / duplicated / out of order across all N, expected deliveries counted
           from the acks; publish -> receive p50/p99/max; gateway CPU (all workers), broker CPU, the
           other processes' CPU and the load average; met / not met against 1.5 x floor + Kafka RTT.
           The demo writes its bursts (up to 5 updates at once) as one batch: each round also gives its
           largest burst's sends and their floor (CPU per send x sends). Then per --steady-rates value
           a round of single messages evenly spaced (loadgen's steady pattern), one message in flight
           at a time: the situation the issue's floor describes. Before the rounds, 5 s idle: the CPU
           of the gateway and the brokers with N users connected and nothing published.
           Every round is played once per --client-sched mode (default: other, then batch). The clients
           stand for users on other machines but share the gateway's two CPUs here; under the default
           policy the wake-up each send gives a client preempts the worker in the middle of its fan-out
           (twice the context switches, and the clients' own cost per delivery doubles). SCHED_BATCH
           ("batch") only turns that wake-up preemption off for the client processes: same CPU share,
           same nice level. :PACE_US makes the clients also sleep that long after a wake-up that found
           work (loadclient.h), which adds at most PACE_US to the latencies measured.

Everything this script starts is stopped by its pid at the end (also on error or Ctrl-C); every phase
has a timeout and the whole run --budget seconds. Output: benchmarks/results/kafka_100k.json (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "load"))
import loadgen as lg  # noqa: E402 (after the sys.path insert above)

from _procs import (  # noqa: E402
    Child,
    free_port,
    machine,
    machine_busy_seconds,
    proc_cpu_seconds,
    require_installed_package,
)

RESULTS = os.path.join(HERE, "results")
SUBJECTS, PER_CONN = 10, 3
TOPIC = "matches"
FD_LIMIT_MARGIN_SD = 4.0
# --client-sched: SCHED_BATCH tells CFS the clients are throughput work, so the wake-up a gateway send
# gives its reader does not preempt the gateway in the middle of a fan-out (clients on other machines
# would not share its CPU at all). --gateway-sched: the same for the gateway's workers (an operator's
# choice, `chrt --batch 0`): three workers share each CPU and all wake for the same message; under
# SCHED_BATCH they do not preempt each other (or anything else) on wake-up
POLICIES = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH}


def set_policy(pid: int, policy: str) -> None:
    """Put every thread of process `pid` under `policy` (POLICIES)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(tid), POLICIES[policy], os.sched_param(0))


# ---------------------------------------------------------------------------------------------------
# Sizing rules (pure; tests: benchmarks/test_kafka_100k.py)


def client_mode_ok(mode: str) -> bool:
    """--client-sched's POLICY[:PACE_US]."""
    policy, colon, pace = mode.partition(":")
    return policy in POLICIES and (not colon or pace.isdigit())


def workers_needed(n: int, max_per_worker: int, sd: float = FD_LIMIT_MARGIN_SD) -> int:
    """The fewest SO_REUSEPORT workers whose busiest one stays under max_per_worker connections.

    The kernel hashes each connection's 4-tuple onto a listener, so a worker's share is binomial
    (n, 1/w): mean n/w, standard deviation sqrt(n (1/w)(1 - 1/w)); `sd` of those are kept to spare."""
    if n <= 0 or max_per_worker <= 0:
        raise ValueError("connections and max_per_worker must be > 0")
    w = 1
    while n / w + sd * math.sqrt(n * (1 / w) * (1 - 1 / w)) > max_per_worker:
        w += 1
    return w


def client_processes(n: int, per_process: int, fd_limit: int) -> int:
    """Client processes for n connections, at most per_process each, which must leave room for the
    process's own files under the open-files limit."""
    if per_process <= 0 or per_process > fd_limit - 1000:
        raise ValueError(f"--per-process must be between 1 and {fd_limit - 1000} "
                         f"(the open-files limit is {fd_limit} per process)")
    return math.ceil(n / per_process)


def verdict(p99_ms: float, floor_ms: float, rtt_ms: float) -> dict:
    """Issue 12: p99 publish -> receive within 1.5 x the floor for one match's subscribers, plus the
    Kafka round trip measured alone."""
    target = 1.5 * floor_ms + rtt_ms
    return {"p99_ms": p99_ms, "target_ms": round(target, 3), "ratio": round(p99_ms / target, 3),
            "met": bool(p99_ms <= target)}


# ---------------------------------------------------------------------------------------------------
# Machine checks


def kernel_settings() -> dict:
    out = {}
    for name in ("net/core/somaxconn", "net/ipv4/tcp_max_syn_backlog", "net/ipv4/ip_local_port_range",
                 "fs/file-max", "fs/nr_open", "net/netfilter/nf_conntrack_max", "net/ipv4/tcp_mem"):
        try:
            with open(f"/proc/sys/{name}", encoding="ascii") as fh:
                out[name.replace("/", ".")] = fh.read().split()
        except OSError:
            pass
    out["RLIMIT_NOFILE"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return out


def check_machine(n: int, procs: int, per_process: int, workers: int) -> None:
    """Refuse clearly what cannot work instead of failing half-way through 100k connections."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lo, hi = lg_ports = tuple(int(x) for x in kernel_settings()["net.ipv4.ip_local_port_range"])
    if hi - lo + 1 < per_process:
        sys.exit(f"ephemeral ports {lg_ports} per source address are fewer than --per-process {per_process}")
    if procs + 2 > 254:
        sys.exit(f"{procs} client processes need more source addresses than 127.0.0.2-127.0.0.255")
    if soft < per_process + 1000:
        sys.exit(f"the open-files limit {soft} is too low for {per_process} connections per process "
                 "(raise the soft limit: ulimit -n)")
    with open("/proc/sys/fs/file-max", encoding="ascii") as fh:
        if int(fh.read()) < 3 * n:
            sys.exit(f"fs.file-max is below 3 x {n} (clients, gateway and the floor's sockets)")


# ---------------------------------------------------------------------------------------------------
# Kafka: the cluster, the round trip alone


def start_kafka(partitions: int):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from support.kafka_broker import start_apache_kafka  # noqa: PLC0415

    broker = start_apache_kafka()
    try:
        asyncio.run(broker.create_topic(TOPIC, partitions))
        asyncio.run(broker.create_topic("rtt", 1))
    except BaseException:
        broker.stop()
        raise
    return broker


def broker_pids(broker) -> list[int]:
    return [node.pid for node in broker.cluster.nodes if node.pid is not None]


def kafka_rtt(broker, messages: int, rate: float) -> dict:
    import kafka_latency as kl  # noqa: PLC0415 (it imports aiokafka and the tests' support)
    from gateway.config import Config  # noqa: PLC0415

    cfg = Config()
    cpu0 = sum(proc_cpu_seconds(p) for p in broker_pids(broker))
    t0 = time.monotonic()
    out = asyncio.run(kl.latency_kafka(broker, "rtt", messages, rate, cfg.kafka_fetch_wait_ms, cfg.kafka_linger_ms))
    wall = time.monotonic() - t0
    out["broker_cpu_share"] = round((sum(proc_cpu_seconds(p) for p in broker_pids(broker)) - cpu0) / wall, 3)
    out |= {"messages": messages, "rate": rate, "kafka_fetch_wait_ms": cfg.kafka_fetch_wait_ms,
            "kafka_linger_ms": cfg.kafka_linger_ms}
    return out


# ---------------------------------------------------------------------------------------------------
# The floor


def measure_floor(sockets: int, repeats: int, busiest_match: int) -> dict:
    import sweep  # noqa: PLC0415 (imports fanout_sockets, whose C sender it compiles)

    tmp = tempfile.mkdtemp(prefix="floor-")
    try:
        sweep.fs.build_sendref(tmp)
        f = sweep.measure_floor(sockets, sockets, repeats, tmp)["subject"]
        # The same loop with readers that sleep in epoll_wait, as the load clients do: every send then
        # also wakes a reader on the other CPU. Not the floor; what this box's clients cost a sender.
        sweep.fs.DRAIN_WAIT_MS = 100
        try:
            w = sweep.measure_floor(sockets, sockets, repeats, tmp)["subject"]
        finally:
            sweep.fs.DRAIN_WAIT_MS = 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_send_ms = f["cpu_ns_per_delivery_median"] / 1e6
    return {"measured_sockets": sockets, "cpu_ns_per_send": round(f["cpu_ns_per_delivery_median"], 1),
            "measured_cpu_ms": round(f["cpu_ms"], 3), "measured_e2e_ms_median": round(f["e2e_ms_median"], 3),
            "busiest_match_subscribers": busiest_match,
            "floor_ms_one_core": round(per_send_ms * busiest_match, 3),
            "floor_ms_both_cores": round(per_send_ms * busiest_match / 2, 3),
            "rule": "CPU time per send(2) over measured_sockets x the busiest match's subscribers (one core)",
            "sleeping_readers": {"cpu_ns_per_send": round(w["cpu_ns_per_delivery_median"], 1),
                                 "measured_e2e_ms_median": round(w["e2e_ms_median"], 3),
                                 "ms_one_core": round(w["cpu_ns_per_delivery_median"] / 1e6 * busiest_match, 3)}}


# ---------------------------------------------------------------------------------------------------
# The gateway and its clients


class Workers:
    """`python -m gateway serve --kafka ... --workers W` on a fixed port; ready once every worker serves."""

    def __init__(self, bootstrap: str, workers: int, extra: list[str], log_path: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w+", encoding="utf-8")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--kafka", bootstrap, "--topics", TOPIC,
             "--workers", str(workers), "--port", str(self.port), "--log-level", "warning", *extra],
            cwd="/", stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.worker_pids: list[int] = []
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline:
            with open(log_path, encoding="utf-8") as fh:
                text = fh.read()
            if text.count(" serving on ") >= workers or self.proc.poll() is not None:
                break
            time.sleep(0.2)
        m = re.search(r"workers on port \d+ \(pids ([\d, ]+)\)", text)  # one worker: no supervisor
        if text.count(" serving on ") < workers or (workers > 1 and not m):
            self.stop()
            sys.exit(f"the gateway's {workers} workers did not all start:\n{text[-3000:]}")
        self.worker_pids = [int(p) for p in m.group(1).split(",")] if m else [self.pid]
        ncpu = os.cpu_count() or 1
        self.pinning = {}
        for i, pid in enumerate(self.worker_pids):
            os.sched_setaffinity(pid, {i % ncpu})
            self.pinning[pid] = i % ncpu

    def schedule(self, policy: str) -> None:
        """Put every worker under `policy` (POLICIES)."""
        for pid in self.worker_pids:
            set_policy(pid, policy)

    def sockets_per_worker(self) -> list[int]:
        out = []
        for pid in self.worker_pids:
            n = 0
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                    except OSError:
                        pass
            except OSError:
                pass
            out.append(n)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None and all(os.path.exists(f"/proc/{p}") for p in self.worker_pids)

    def stop(self) -> None:
        lg.stop_process(self.proc, grace=30)  # SIGTERM: the supervisor forwards it to every worker
        for pid in self.worker_pids:  # a worker left behind (the supervisor was killed): by its pid
            if pid == self.pid:
                continue
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.log.close()


class Clients:
    """N C client connections (loadgen's --role client) against the gateway, in several processes."""

    def __init__(self, n: int, port: int, per_process: int, window: int, client_dir: str, seed: int) -> None:
        import numpy as np

        self.n = n
        self.children: list[Child] = []
        self.env = {**os.environ, "LOADCLIENT_DIR": client_dir}
        rng = np.random.default_rng(seed)
        subs = (rng.random((n, SUBJECTS)).argsort(axis=1)[:, :PER_CONN] + 1).astype(np.int32)
        self.per_subject = np.bincount(subs.ravel(), minlength=SUBJECTS + 1)
        self.port = port
        procs = math.ceil(n / per_process)
        for k, chunk in enumerate(np.array_split(subs, procs)):
            child = Child([sys.executable, os.path.join(HERE, "load", "loadgen.py"), "--role", "client"],
                          env=self.env, name=f"client-{k}")
            self.children.append(child)
            child.send({"dst": lg.HOST, "port": port, "src": f"127.0.0.{2 + k}", "subjects": chunk.tolist(),
                        "prefix": lg.PREFIX, "window": window, "latcap": 20_000_000})
            child.recv(60)

    def connect(self, timeout: float) -> tuple[int, int, float, list[dict]]:
        for c in self.children:
            c.call({"op": "connect"})
        t0 = time.monotonic()
        last_print = 0.0
        while True:
            prog = [c.call({"op": "progress"}) for c in self.children]
            ready, failed = sum(p["ready"] for p in prog), sum(p["failed"] for p in prog)
            now = time.monotonic()
            if now - last_print > 5:
                print(f"  connect: {ready:,} ready, {failed:,} failed after {now - t0:.0f} s", flush=True)
                last_print = now
            if ready + failed >= self.n or now > t0 + timeout:
                return ready, failed, now - t0, prog
            time.sleep(0.25)

    def schedule(self, mode: str) -> None:
        """Put every client process under `mode`: POLICY[:PACE_US] (POLICIES, loadclient's pacing)."""
        policy, _, pace = mode.partition(":")
        for c in self.children:
            set_policy(c.pid, policy)
            c.call({"op": "pace", "us": int(pace or 0)})

    def stop(self) -> None:
        lg.stop_children(self.children)


def largest_burst(per_subject, pattern: str, value: float, duration: float, seed: int) -> dict:
    """The publishes due at one instant that cost the most sends (their subjects' subscribers summed):
    a burst of the demo is written as one batch, so its last delivery waits for all of them."""
    due, subj = lg.publish_plan(value, duration, SUBJECTS, pattern, seed)
    sends: dict[float, int] = {}
    count: dict[float, int] = {}
    for at, k in zip(due, subj):
        sends[at] = sends.get(at, 0) + int(per_subject[k])
        count[at] = count.get(at, 0) + 1
    at = max(sends, key=lambda t: sends[t])
    return {"messages": count[at], "sends": sends[at]}


def start_profiler(pid: int, seconds: float, out: str) -> subprocess.Popen:
    import sweep  # noqa: PLC0415

    if sweep.PY_SPY is None:
        sys.exit("--profile needs py-spy (pip install py-spy)")
    # --native (Cython and C frames) stops the process for each sample: 100 Hz keeps that small.
    return subprocess.Popen([sweep.PY_SPY, "record", "--native", "--format", "raw", "--rate", "100",
                             "--duration", str(max(1, int(seconds))), "--pid", str(pid), "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_round(gw: Workers, clients: Clients, brokers: list[int], pattern: str, value: float, duration: float,
              seed: int, drain_timeout: float, tmp: str, profile: str | None = None) -> dict:
    """One round of `pattern` (loadgen.publish_plan: demo x value, or steady at value msgs/s)."""
    import numpy as np

    rate = 1.5 * value if pattern == "demo" else value
    pub_conns = max(1, math.ceil(rate / 500))
    publisher = Child([sys.executable, os.path.join(HERE, "load", "loadgen.py"), "--role", "publisher"],
                      env=clients.env, name="publisher")
    try:
        publisher.send({"port": clients.port, "connections": pub_conns})
        publisher.recv(60)
        for c in clients.children:
            c.call({"op": "record"})
        ours = [c.pid for c in clients.children] + [publisher.pid]
        load0 = os.getloadavg()
        cpu1, busy1, t1 = lg.gateway_cpu(gw.pid), machine_busy_seconds(), time.monotonic()
        per_worker1 = [proc_cpu_seconds(p) for p in gw.worker_pids]
        ours1, wait1 = sum(proc_cpu_seconds(p) for p in ours), lg.runqueue_wait_seconds(gw.pid)
        brk1 = sum(proc_cpu_seconds(p) for p in brokers)
        spy = start_profiler(gw.worker_pids[0], duration, profile) if profile else None
        publisher.send({"op": "run", "rate": value, "seconds": duration, "subjects": SUBJECTS, "size": 64,
                        "pattern": pattern, "seed": seed, "ack_timeout": 30})
        pub = publisher.recv(duration + 90)
        if spy is not None:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
        finals = [c.call({"op": "finish", "final": pub["final"], "timeout": drain_timeout, "dir": tmp},
                         timeout=drain_timeout + 90) for c in clients.children]
        wall = time.monotonic() - t1
        cpu = lg.gateway_cpu(gw.pid) - cpu1
        per_worker = [round((proc_cpu_seconds(p) - c0) / wall, 3) for p, c0 in zip(gw.worker_pids, per_worker1)]
        busy = machine_busy_seconds() - busy1
        ours_cpu = sum(proc_cpu_seconds(p) for p in ours) - ours1
        brk = sum(proc_cpu_seconds(p) for p in brokers) - brk1
        wait = lg.runqueue_wait_seconds(gw.pid) - wait1
        load1 = os.getloadavg()
    finally:
        publisher.stop()
    stats = [f["stats"] for f in finals]
    lat = np.concatenate([np.load(f["latencies"]) for f in finals])
    for f in finals:
        for key in ("latencies", "setup_times"):
            os.unlink(f[key])
    expected = lg.expected_deliveries(clients.per_subject, pub["acked_per_subject"])
    total = {k: sum(s[k] for s in stats) for k in ("deliveries", "duplicates", "out_of_order", "gaps",
                                                   "lost_in_gaps", "unexpected", "bad_frames", "error_frames",
                                                   "closed", "latencies_dropped")}
    deliveries = total["deliveries"]
    return {"pattern": pattern, "multiplier" if pattern == "demo" else "rate": value, "average_rate": rate,
            "duration": duration,
            "publisher": {k: v for k, v in pub.items() if k not in ("final", "acked_per_subject")}
            | {"connections": pub_conns, "acked_per_subject": pub["acked_per_subject"]},
            **total, "expected": expected, "missing_at_end": sum(f["missing_at_end"] for f in finals),
            "connections_behind_at_end": sum(f["connections_behind"] for f in finals),
            "seconds": round(wall, 3), "deliveries_per_s": round(deliveries / wall, 1),
            "gateway_cpu_share": round(cpu / wall, 3), "gateway_cpu_share_per_worker": per_worker,
            "gateway_cpu_us_per_delivery": round(cpu / max(1, deliveries) * 1e6, 3),
            "gateway_runqueue_wait_share": round(wait / wall, 3),
            "broker_cpu_share": round(brk / wall, 3),
            "clients_and_publisher_cpu_share": round(ours_cpu / wall, 3),
            "other_processes_cpu_share": round(max(0.0, busy - cpu - ours_cpu - brk) / wall, 3),
            "loadavg_start_end": [round(load0[0], 2), round(load1[0], 2)],
            "latency_ms": lg.percentiles_ms(lat),
            "first_errors": sorted({s["first_error"] for s in stats if s["first_error"]})[:5]}


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    require_installed_package()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=100_000, help="N WebSocket users (default 100000)")
    ap.add_argument("--workers", type=int, default=0,
                    help="gateway workers (0: the fewest that keep each under --max-per-worker)")
    ap.add_argument("--max-per-worker", type=int, default=18_000,
                    help="connections one worker may hold (open-files limit minus a reserve; default 18000)")
    ap.add_argument("--per-process", type=int, default=12_500, help="client connections per process (default 12500)")
    ap.add_argument("--window", type=int, default=256, help="handshakes in flight per client process")
    ap.add_argument("--rates", default="1,10",
                    help="multipliers of the demo's traffic, one round each (default 1,10: 1.5 and 15 msgs/s)")
    ap.add_argument("--steady-rates", default="1.5",
                    help="then rounds of evenly spaced single messages at these msgs/s, round-robin over the "
                         "matches: one message at a time, the floor's own situation (default 1.5; '' for none)")
    ap.add_argument("--client-sched", default="other,batch",
                    help="scheduling policy of the C client processes, comma-separated to play every round once "
                         "per policy: other (the default CFS policy) or batch (SCHED_BATCH: a woken client does "
                         "not preempt a gateway worker in the middle of its writes), with :PACE_US the clients "
                         "also sleep that long after each wake-up that found work, e.g. batch:1000 "
                         "(default other,batch: each round twice, side by side)")
    ap.add_argument("--gateway-sched", default="other",
                    help="scheduling policy of the gateway's workers, comma-separated like --client-sched (each "
                         "round once per gateway policy and client policy): other (the default) or batch "
                         "(SCHED_BATCH, as `chrt --batch 0` would start them)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of publishing per round (default 30)")
    ap.add_argument("--partitions", type=int, default=4, help="partitions of topic matches (default 4)")
    ap.add_argument("--floor-sockets", type=int, default=15_000,
                    help="sockets of the C floor loop (one process: under 19,000; default 15000)")
    ap.add_argument("--floor-repeats", type=int, default=7)
    ap.add_argument("--rtt-messages", type=int, default=300, help="Kafka round trips measured alone (default 300)")
    ap.add_argument("--rtt-rate", type=float, default=10.0, help="their rate per second (default 10)")
    ap.add_argument("--connect-timeout", type=float, default=300.0)
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--budget", type=float, default=1200.0, help="stop starting new phases after this many seconds")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra `gateway serve` flag (repeatable)")
    ap.add_argument("--profile", metavar="FILE",
                    help="py-spy --native on gateway worker 1 during the last round: a self/inclusive summary "
                         "to FILE (py-spy must be installed next to this python or on PATH)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "kafka_100k.json"))
    args = ap.parse_args()
    n = args.connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        procs = client_processes(n, args.per_process, soft)
        workers = args.workers or workers_needed(n, args.max_per_worker)
    except ValueError as e:
        sys.exit(f"kafka_100k.py: {e}")
    if args.floor_sockets >= 19_000:
        sys.exit("--floor-sockets must stay under 19,000 (one sender process holds them)")
    try:
        plan = [("demo", float(x)) for x in args.rates.split(",") if x.strip()] + \
               [("steady", float(x)) for x in args.steady_rates.split(",") if x.strip()]
    except ValueError:
        sys.exit("--rates, --steady-rates: comma-separated numbers, e.g. 1,10")
    policies = [x.strip() for x in args.client_sched.split(",") if x.strip()]
    if not policies or not all(client_mode_ok(x) for x in policies):
        sys.exit(f"--client-sched: comma-separated POLICY[:PACE_US], POLICY one of {', '.join(POLICIES)}")
    gateway_policies = [x.strip() for x in args.gateway_sched.split(",") if x.strip()]
    if not gateway_policies or not all(x in POLICIES for x in gateway_policies):
        sys.exit(f"--gateway-sched: comma-separated policies, each one of {', '.join(POLICIES)}")
    plan = [(pattern, value, policy, gpolicy) for pattern, value in plan for gpolicy in gateway_policies
            for policy in policies]
    if not plan or any(m <= 0 for _, m, _, _ in plan):
        sys.exit("--rates, --steady-rates: positive numbers, e.g. --rates 1,10 --steady-rates 1.5")
    check_machine(n, procs, args.per_process, workers)
    t_start = time.monotonic()
    deadline = t_start + args.budget
    client_dir = lg.build_client()
    doc: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "argv": sys.argv[1:], "settings": vars(args) | {"workers": workers, "client_processes": procs},
                 "kernel": kernel_settings(), "loadavg_at_start": os.getloadavg()}
    print(f"N={n:,}: {workers} gateway workers, {procs} client processes; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    broker = gw = clients = None
    tmp = tempfile.mkdtemp(prefix="kafka100k-")
    try:
        print("kafka: starting the 3-node cluster ...", flush=True)
        broker = start_kafka(args.partitions)
        brokers = broker_pids(broker)
        doc["kafka"] = {"bootstrap": broker.bootstrap, "partitions": args.partitions, "broker_pids": brokers}
        import numpy as np

        rng = np.random.default_rng(args.seed)
        subs = (rng.random((n, SUBJECTS)).argsort(axis=1)[:, :PER_CONN] + 1)
        busiest = int(np.bincount(subs.ravel(), minlength=SUBJECTS + 1).max())
        print(f"floor: C send loop over {args.floor_sockets:,} sockets, scaled to {busiest:,} ...", flush=True)
        doc["floor"] = measure_floor(args.floor_sockets, args.floor_repeats, busiest)
        print(f"  {doc['floor']['cpu_ns_per_send']:.0f} ns per send: floor {doc['floor']['floor_ms_one_core']:.1f} ms "
              f"on one core ({doc['floor']['floor_ms_both_cores']:.1f} ms over both); with sleeping readers "
              f"{doc['floor']['sleeping_readers']['cpu_ns_per_send']:.0f} ns per send", flush=True)
        print(f"rtt: {args.rtt_messages} Kafka round trips at {args.rtt_rate:g}/s, no gateway ...", flush=True)
        doc["kafka_rtt"] = kafka_rtt(broker, args.rtt_messages, args.rtt_rate)
        d = doc["kafka_rtt"]["deliver"]
        print(f"  produce -> consume p50 {d['p50']:.2f} p99 {d['p99']:.2f} max {d['max']:.2f} ms", flush=True)
        print(f"gateway: {workers} workers ...", flush=True)
        gw = Workers(broker.bootstrap, workers, args.gateway_arg, os.path.join(tmp, "gateway.log"))
        time.sleep(1.0)
        rss0 = lg.gateway_rss(gw.pid)
        clients = Clients(n, gw.port, args.per_process, args.window, client_dir, args.seed)
        cpu0 = lg.gateway_cpu(gw.pid)
        ready, failed, seconds, _prog = clients.connect(min(args.connect_timeout, deadline - time.monotonic()))
        cpu_conn = lg.gateway_cpu(gw.pid) - cpu0
        time.sleep(2.0)
        rss1 = lg.gateway_rss(gw.pid)
        per_worker = gw.sockets_per_worker()
        doc["connect"] = {"ready": ready, "failed": failed, "seconds": round(seconds, 2),
                          "setups_per_s": round(ready / seconds, 1),
                          "gateway_cpu_us_per_connection": round(cpu_conn / max(1, ready) * 1e6, 1),
                          "sockets_per_worker": per_worker, "worker_pids": gw.worker_pids,
                          "worker_cpu": gw.pinning}
        doc["memory"] = {"gateway_rss_before": rss0, "gateway_rss_connected": rss1,
                         "gateway_bytes_per_connection": round((rss1 - rss0) / max(1, ready))}
        print(f"  {ready:,} ready, {failed:,} failed in {seconds:.1f} s ({ready / seconds:,.0f}/s); sockets per "
              f"worker {per_worker}; RSS {doc['memory']['gateway_bytes_per_connection']:,} B per connection",
              flush=True)
        if ready != n:
            raise RuntimeError(f"only {ready} of {n} connections ready ({failed} failed); "
                               f"gateway log:\n{open(gw.log_path, encoding='utf-8').read()[-3000:]}")
        cpu_i, brk_i, t_i = lg.gateway_cpu(gw.pid), sum(proc_cpu_seconds(p) for p in brokers), time.monotonic()
        time.sleep(5.0)
        wall_i = time.monotonic() - t_i
        doc["idle"] = {"seconds": round(wall_i, 2),
                       "gateway_cpu_share": round((lg.gateway_cpu(gw.pid) - cpu_i) / wall_i, 3),
                       "broker_cpu_share": round((sum(proc_cpu_seconds(p) for p in brokers) - brk_i) / wall_i, 3)}
        print(f"  idle, {ready:,} connected: gateway {doc['idle']['gateway_cpu_share']:.1%} of a CPU, brokers "
              f"{doc['idle']['broker_cpu_share']:.1%}", flush=True)
        doc["rounds"] = []
        for pattern, value, policy, gpolicy in plan:
            what = f"the demo's traffic x {value:g}" if pattern == "demo" else f"{value:g} msgs/s, one at a time"
            what += f", clients {policy}" + (f", gateway {gpolicy}" if len(gateway_policies) > 1 else "")
            if time.monotonic() + args.duration + 120 > deadline:
                print(f"budget of {args.budget:g} s used up: round {what} not run", flush=True)
                break
            clients.schedule(policy)
            gw.schedule(gpolicy)
            print(f"round: {what} for {args.duration:g} s ...", flush=True)
            last = (pattern, value, policy, gpolicy) == plan[-1]
            raw = os.path.join(tmp, "profile.raw") if args.profile and last else None
            r = run_round(gw, clients, brokers, pattern, value, args.duration, args.seed, args.drain_timeout, tmp,
                          raw)
            if raw:
                import sweep  # noqa: PLC0415

                with open(args.profile, "w", encoding="utf-8") as fh:
                    fh.write(f"py-spy --native, gateway worker 1 of {workers} (pid {gw.worker_pids[0]}, "
                             f"{per_worker[0]:,} sockets), N={n:,}, round: {what}\n"
                             + sweep.profile_summary(raw))
                r["profile"] = os.path.relpath(args.profile, ROOT)
            r["client_sched"] = policy
            r["gateway_sched"] = gpolicy
            r["verdict"] = verdict(r["latency_ms"].get("p99", math.inf), doc["floor"]["floor_ms_one_core"],
                                   doc["kafka_rtt"]["deliver"]["p99"])
            r["largest_burst"] = largest_burst(clients.per_subject, pattern, value, args.duration, args.seed)
            r["largest_burst"]["floor_ms_one_core"] = round(
                doc["floor"]["cpu_ns_per_send"] * r["largest_burst"]["sends"] / 1e6, 3)
            r["gateway_alive"] = gw.alive()
            doc["rounds"].append(r)
            lat, v = r["latency_ms"], r["verdict"]
            print(f"  {r['deliveries']:,} deliveries (expected {r['expected']:,}), lost "
                  f"{r['lost_in_gaps'] + r['missing_at_end']}, dup {r['duplicates']}, ooo {r['out_of_order']}; "
                  f"latency ms p50 {lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')}; target "
                  f"{v['target_ms']:.1f} ms: {'met' if v['met'] else 'not met'}; gateway CPU "
                  f"{r['gateway_cpu_share']:.0%}, brokers {r['broker_cpu_share']:.0%}, other processes "
                  f"{r['other_processes_cpu_share']:.0%}", flush=True)
        doc["gateway_rss_end"] = lg.gateway_rss(gw.pid)
        with open(gw.log_path, encoding="utf-8") as fh:
            doc["gateway_log_tail"] = fh.read()[-2000:]
    finally:
        if clients is not None:
            clients.stop()
        if gw is not None:
            gw.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        doc["seconds"] = round(time.monotonic() - t_start, 1)
        doc["loadavg_at_end"] = os.getloadavg()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, default=str)
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
