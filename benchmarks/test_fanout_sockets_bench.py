"""Socket fan-out under pytest-benchmark: one 62-byte frame to N loopback sockets, side by side.

    pip install ".[bench]"   # the package with its compiled fanout; the benchmarks never import the checkout
    python -P -m pytest benchmarks/test_fanout_sockets_bench.py    # ~50 s on 2 idle cores, ~2 min busy

Not collected by the normal test run (pyproject's testpaths is `tests`). This is the pytest-benchmark
view of benchmarks/fanout_sockets.py and runs that script's own machinery (imported as a module): its
compiled C reference, its sender and drain child processes, run_round() and its re-run of disturbed
rounds. Variants: fanout, uvloop-write, websockets, c-send at N = 1k and 10k; fanout-x10, c-send-x10
and c-sendmsg-x10 (10 messages per tick) at N = 10k.

- The C reference is compiled once per session. The children (both senders on CPU 0, the drains on
  CPU 1) are started once per N by the module-scoped `rig` fixture and stopped by their pid when
  its N is done.
- Each test does one warm-up round, then ROUNDS rounds under benchmark.pedantic(). The time that
  pytest-benchmark records for a round is that round's measured time, from the sender's t0 to the
  last byte reaching the drains. It is not the orchestrator's wall time around the call, which adds
  the JSON round trips to the children and any re-run of a disturbed round.
- The deliveries/s of every kept round are recorded. benchmarks/conftest.py prints their medians
  and the ratios the issue asks for at the end of the session, and writes
  benchmarks/results/fanout_sockets_bench.json.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

import fanout

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # fanout_sockets.py and _procs.py are scripts, not a package
    sys.path.insert(0, HERE)

import fanout_sockets as fs  # noqa: E402
from _procs import machine_busy_seconds, wait_quiet  # noqa: E402

if not fanout.COMPILED:  # the senders would run the pure-Python twin against the C reference
    pytest.skip("fanout is not compiled (FANOUT_NO_EXTENSIONS=1?)", allow_module_level=True)
if (os.cpu_count() or 1) < 2:
    pytest.skip("needs 2 CPUs: the sender is pinned to CPU 0 and the drains to CPU 1", allow_module_level=True)

NS = [1000, 10000]
N_X10 = 10000
ROUNDS = 5            # kept rounds per variant and N (after one warm-up round)
QUIET_WAIT = 10.0     # per N: wait at most this long for other processes to leave the CPUs
BUDGET = 4 * 60       # the whole module, seconds; past it the remaining tests fail at once
_STARTED = time.monotonic()


class Rig:
    """The children of one N: fanout_sockets' senders ("raw", "ws") and their drains, all connected."""

    def __init__(self, n: int, senders: dict, ports: dict, drains: dict) -> None:
        self.n, self.senders, self.ports, self.drains = n, senders, ports, drains
        self.retries: dict[str, int] = {}  # fanout_sockets.measure() counts re-run rounds per variant


@pytest.fixture(scope="session")
def sendref_dir():
    """fanout_sockets' C reference (send loops and the epoll drain), compiled once into a temp dir."""
    tmp = tempfile.mkdtemp(prefix="fanout-sendref-")
    try:
        fs.build_sendref(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def rig(request, sendref_dir, sockets_results):
    """Senders and drains holding N + N connected sockets, started once per N, stopped by pid."""
    n = request.param
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {fs.OTHER_CPU})  # the orchestrator stays off the senders' CPU, as in main()
    children: list = []
    busy_before = round(wait_quiet(max_wait=QUIET_WAIT), 3)
    busy0, wall0, own0 = machine_busy_seconds(), time.monotonic(), sum(os.times()[:4])
    try:
        # as many drains as the script's default run (N up to 10k), so each N is measured the same way
        senders, ports, drains = fs.start_children(sendref_dir, max(NS), children)
        fs.connect(n, senders, drains, ports)
        yield Rig(n, senders, ports, drains)
    finally:
        for c in children:
            c.stop()
            c.proc.stdin.close()  # Child.stop() leaves the pipes open (ResourceWarning is an error here)
            c.proc.stdout.close()
        os.sched_setaffinity(0, affinity)
    # CPU used by processes that are not ours (our children are waited for, so os.times() holds them)
    foreign = (machine_busy_seconds() - busy0) - (sum(os.times()[:4]) - own0)
    sockets_results["machine"][str(n)] = {
        "cpu_busy_before": busy_before,
        "foreign_cpu_share": round(max(0.0, foreign) / ((time.monotonic() - wall0) * (os.cpu_count() or 1)), 3),
    }


def _bench(benchmark, rig: Rig, variant: str, sockets_results) -> None:
    if time.monotonic() - _STARTED > BUDGET:
        pytest.fail(f"module budget of {BUDGET} s exceeded")
    n = rig.n
    fs.measure(variant, n, rig.senders, rig.drains, rig.retries)  # warm-up round, not kept
    retries0 = rig.retries.get(variant, 0)
    kept: list[dict] = []
    clock = 0.0

    def round_clock() -> float:
        """pytest-benchmark's timer here: advances by the measured time of each kept round only."""
        return clock

    def one_round() -> None:
        nonlocal clock
        r = fs.measure(variant, n, rig.senders, rig.drains, rig.retries)
        kept.append(r)
        clock += r["e2e_s"]

    # pedantic() reads the fixture's timer for each round it makes (pytest-benchmark 4 and 5); without
    # that attribute the table would show orchestrator wall time, while the ratios below stay the same.
    if hasattr(benchmark, "_timer"):
        benchmark._timer = round_clock
    benchmark.group = f"socket fan-out, {fs.MSGS[variant]} msg/tick, N={n}"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    rates = sorted(r["rate"] for r in kept)
    benchmark.extra_info.update({
        "deliveries_per_round": n * fs.MSGS[variant],
        "deliveries_per_s_median": rates[len(rates) // 2],
        "deliveries_per_s_min": rates[0],
        "deliveries_per_s_max": rates[-1],
    })
    sockets_results["rounds"][f"{variant} {n}"] = kept
    sockets_results["retries"][f"{variant} {n}"] = rig.retries.get(variant, 0) - retries0


@pytest.mark.parametrize("variant", fs.ONE)
@pytest.mark.parametrize("rig", NS, indirect=True, ids=lambda n: f"{n // 1000}k")
def test_one_message(benchmark, rig, variant, sockets_results):
    _bench(benchmark, rig, variant, sockets_results)


@pytest.mark.parametrize("variant", fs.TEN)
@pytest.mark.parametrize("rig", [N_X10], indirect=True, ids=lambda n: f"{n // 1000}k")
def test_ten_messages(benchmark, rig, variant, sockets_results):
    _bench(benchmark, rig, variant, sockets_results)
