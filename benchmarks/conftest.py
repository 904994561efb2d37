"""pytest-benchmark helpers for benchmarks/ (not part of the normal test run: testpaths is `tests`).

Each microbenchmark records its median under (group, implementation); at the end of the session the
ratio reference/ours of every group is printed and written to benchmarks/results/fanout_micro.json.
"""
from __future__ import annotations

import json
import os
import platform
from collections import defaultdict

import pytest

#: group -> implementation ("ours" | "pure-python") -> median seconds per call
MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fanout_micro.json")


@pytest.fixture
def record():
    """record(benchmark, group, impl, per_call=1): keep the median (divided by per_call) for the ratio table."""

    def _record(benchmark, group: str, impl: str, per_call: int = 1) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            MEDIANS[group][impl] = stats.stats.median / per_call

    return _record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("fanout vs pure Python (median per call; ratio = pure-python / ours)")
    rows = []
    for group in sorted(MEDIANS):
        impls = MEDIANS[group]
        ours, ref = impls.get("ours"), impls.get("pure-python")
        ratio = ref / ours if ours and ref else None
        rows.append({"group": group, "ours_ns": ours and ours * 1e9, "pure_python_ns": ref and ref * 1e9,
                     "speedup": ratio})
        tr.write_line(f"{group:<34} ours {ours * 1e9 if ours else float('nan'):9.1f} ns   "
                      f"pure-python {ref * 1e9 if ref else float('nan'):9.1f} ns   "
                      f"ratio {ratio if ratio else float('nan'):6.1f}x")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as fh:
        json.dump({"python": platform.python_version(), "cpus": os.cpu_count(), "rows": rows}, fh, indent=1)
    tr.write_line(f"written to {os.path.relpath(RESULTS)}")
