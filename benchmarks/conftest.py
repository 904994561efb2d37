"""pytest-benchmark helpers for benchmarks/ (not part of the normal test run: testpaths is `tests`).

Each microbenchmark records its min and median per call under (group, implementation); at the end of
the session the ratio reference/ours of every group is printed and written to
benchmarks/results/fanout_micro.json. The ratio uses the min: on a shared VM the median of a
sub-microsecond call swings by tens of percent between runs, the min much less.

test_fanout_sockets_bench.py fills SOCKETS (deliveries/s of every kept round); a second section then
prints the median deliveries/s per variant and N, and the ratios the issue asks for, and writes
benchmarks/results/fanout_sockets_bench.json.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections import defaultdict

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config: pytest.Config) -> None:
    """Benchmark the installed package (pip install ".[bench]"), never the checkout or the pure-Python twins."""
    if HERE not in sys.path:  # _procs.py is a script module next to this file, not a package
        sys.path.insert(0, HERE)
    from _procs import require_installed_package

    try:
        require_installed_package()
    except SystemExit as e:
        raise pytest.UsageError(str(e)) from None

#: group -> implementation ("ours" | "pure-python") -> (min, median) seconds per call
MEDIANS: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fanout_micro.json")

#: "variant N" -> kept rounds (fanout_sockets.run_round() dicts); "variant N" -> re-run disturbed
#: rounds; "N" -> other processes' CPU share while that N ran
SOCKETS: dict[str, dict] = {"rounds": {}, "retries": {}, "machine": {}}
SOCKETS_RESULTS = os.path.join(os.path.dirname(RESULTS), "fanout_sockets_bench.json")
#: (numerator, denominator, N): the ratios of median deliveries/s that the issue asks for (+ one extra)
SOCKET_RATIOS = [(a, b, n) for n in (1000, 10000) for a, b in
                 (("fanout", "c-send"), ("fanout", "websockets"), ("fanout", "uvloop-write"))]
SOCKET_RATIOS += [("fanout-x10", "c-send-x10", 10000), ("fanout-x10", "c-sendmsg-x10", 10000)]


@pytest.fixture
def record():
    """record(benchmark, group, impl, per_call=1): keep min and median (divided by per_call) for the table."""

    def _record(benchmark, group: str, impl: str, per_call: int = 1) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            MEDIANS[group][impl] = (stats.stats.min / per_call, stats.stats.median / per_call)

    return _record


@pytest.fixture(scope="session")
def sockets_results() -> dict:
    """SOCKETS, which test_fanout_sockets_bench.py fills in."""
    return SOCKETS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SOCKETS["rounds"]:
        sockets_summary(terminalreporter)
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("fanout vs pure Python, per call (ratio = pure-python / ours, from the min)")
    tr.write_line(f"{'':<34}{'ours min':>10}{'median':>10}{'pure-py min':>13}{'median':>10}{'ratio':>8}")
    rows = []
    nan = (float("nan"), float("nan"))
    for group in sorted(MEDIANS):
        impls = MEDIANS[group]
        ours, ref = impls.get("ours", nan), impls.get("pure-python", nan)
        ratio = ref[0] / ours[0] if ours[0] > 0 else float("nan")
        rows.append({"group": group, "ours_min_ns": ours[0] * 1e9, "ours_median_ns": ours[1] * 1e9,
                     "pure_python_min_ns": ref[0] * 1e9, "pure_python_median_ns": ref[1] * 1e9,
                     "speedup_min": ratio, "speedup_median": ref[1] / ours[1] if ours[1] > 0 else None})
        tr.write_line(f"{group:<34}{ours[0] * 1e9:>8.1f}ns{ours[1] * 1e9:>8.1f}ns"
                      f"{ref[0] * 1e9:>11.1f}ns{ref[1] * 1e9:>8.1f}ns{ratio:>7.1f}x")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as fh:
        json.dump({"python": platform.python_version(), "cpus": os.cpu_count(), "rows": rows}, fh, indent=1)
    tr.write_line(f"written to {os.path.relpath(RESULTS)}")


def sockets_summary(tr) -> None:
    """Median deliveries/s per variant and N, and the ratios of those medians."""
    rounds = SOCKETS["rounds"]
    med = {key: statistics.median(r["rate"] for r in runs) for key, runs in rounds.items() if runs}
    ns = sorted({int(key.split()[1]) for key in med})
    variants = list(dict.fromkeys(key.split()[0] for key in med))
    tr.section("socket fan-out: deliveries/s (median of the kept rounds; min-max)")
    tr.write_line(f"{'variant':<16}" + "".join(f"{'N=' + str(n):>34}" for n in ns))
    for v in variants:
        cells = []
        for n in ns:
            runs = rounds.get(f"{v} {n}")
            cells.append(f"{med[f'{v} {n}']:>14,.0f} ({min(r['rate'] for r in runs):>8,.0f}-"
                         f"{max(r['rate'] for r in runs):>8,.0f})" if runs else f"{'-':>34}")
        tr.write_line(f"{v:<16}" + "".join(cells))
    ratios = {}
    tr.write_line("")
    tr.write_line(f"{'ratio of medians':<32}" + "".join(f"{'N=' + str(n):>10}" for n in ns))
    for a, b, n in SOCKET_RATIOS:
        if f"{a} {n}" in med and f"{b} {n}" in med:
            ratios[f"{a}/{b} {n}"] = med[f"{a} {n}"] / med[f"{b} {n}"]
    for a, b in dict.fromkeys((a, b) for a, b, _ in SOCKET_RATIOS):
        cells = [f"{ratios[f'{a}/{b} {n}']:>10.2f}" if f"{a}/{b} {n}" in ratios else f"{'-':>10}" for n in ns]
        if any(c.strip() != "-" for c in cells):
            tr.write_line(f"{a + ' / ' + b:<32}" + "".join(cells))
    machine = SOCKETS["machine"]
    kept_disturbed = sum(r.get("disturbed", False) for runs in rounds.values() for r in runs)
    tr.write_line("")
    tr.write_line("CPU used by other processes: "
                  + ", ".join(f"N={n}: {m['foreign_cpu_share']:.0%}" for n, m in machine.items())
                  + f"; disturbed rounds re-run: {sum(SOCKETS['retries'].values())}, kept disturbed: "
                  + str(kept_disturbed))
    os.makedirs(os.path.dirname(SOCKETS_RESULTS), exist_ok=True)
    with open(SOCKETS_RESULTS, "w", encoding="utf-8") as fh:
        json.dump({"python": platform.python_version(), "cpus": os.cpu_count(),
                   "rate_definition": "deliveries / (time the last byte reached the drains - sender t0)",
                   "median_rate": med, "ratios": ratios, **SOCKETS}, fh, indent=1)
    tr.write_line(f"written to {os.path.relpath(SOCKETS_RESULTS)}")
