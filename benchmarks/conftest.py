"""pytest-benchmark helpers for benchmarks/ (not part of the normal test run: testpaths is `tests`).

Each microbenchmark records its min and median per call under (group, implementation); at the end of
the session the ratio reference/ours of every group is printed and written to
benchmarks/results/fanout_micro.json. The ratio uses the min: on a shared VM the median of a
sub-microsecond call swings by tens of percent between runs, the min much less.
"""
from __future__ import annotations

import json
import os
import platform
from collections import defaultdict

import pytest

#: group -> implementation ("ours" | "pure-python") -> (min, median) seconds per call
MEDIANS: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fanout_micro.json")


@pytest.fixture
def record():
    """record(benchmark, group, impl, per_call=1): keep min and median (divided by per_call) for the table."""

    def _record(benchmark, group: str, impl: str, per_call: int = 1) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            MEDIANS[group][impl] = (stats.stats.min / per_call, stats.stats.median / per_call)

    return _record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
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
