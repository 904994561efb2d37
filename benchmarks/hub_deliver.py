"""Cost of Hub.deliver per record, this tree's hub against another revision's, side by side in one run.

    python benchmarks/hub_deliver.py [--before main] [--rounds 5]

The other revision's gateway/hub.py is read with `git show REV:gateway/hub.py` and loaded as a module
of the installed `gateway` package (same fanout, same protocol, same Record), so only the hub differs.
Cases: one hot subject (a full ring, every append evicts), and a spray of new subjects (each record a
subject never seen), with and without a budget small enough to forget subjects all the time.
No subscribers: what fans out to them (Channel.publish) is not the hub's code. Rounds alternate the
two hubs; the table shows the median ns per record. Results: benchmarks/results/hub_deliver.json.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from _procs import require_installed_package

HERE = os.path.dirname(os.path.abspath(__file__))


def load_hub(rev: str):
    source = subprocess.run(["git", "-C", HERE, "show", f"{rev}:gateway/hub.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("gateway._hub_" + rev.replace("/", "_"), loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "gateway"
    exec(compile(source, f"{rev}:gateway/hub.py", "exec"), module.__dict__)
    return module


def make_hub(module, budget: int | None):
    if budget is None:
        return module.Hub(lambda s: "e", 1000, 4 << 20)
    try:
        return module.Hub(lambda s: "e", 1000, 4 << 20, budget)
    except TypeError:
        return None   # a hub without a budget


def run_case(module, case: str, n: int) -> float | None:
    from gateway.records import Record

    budget = 4 << 20 if case == "spray, forgetting (4 MiB budget)" else None
    hub = make_hub(module, budget)
    if hub is None:
        return None
    content = b"x" * 16
    if case == "hot subject":
        for i in range(1, 1001):   # fill the ring first: steady state, every append evicts
            hub.deliver(Record("/hot/1", content, "e", i, i - 1, 1_700_000_000_000))
        records = [Record("/hot/1", content, "e", i, i - 1, 1_700_000_000_000) for i in range(1001, n + 1001)]
    else:
        records = [Record(f"/spray/{i}", content, "e", 1, 0, 1_700_000_000_000) for i in range(n)]
    gc.collect()
    deliver = hub.deliver
    t = time.perf_counter()
    for r in records:
        deliver(r)
    return (time.perf_counter() - t) / n * 1e9


def main() -> None:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="main")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    import gateway.hub as after

    hubs = {args.before: load_hub(args.before), "this tree": after}
    cases = ["hot subject", "spray, no budget reached", "spray, forgetting (4 MiB budget)"]
    results: dict[str, dict[str, list[float]]] = {c: {k: [] for k in hubs} for c in cases}
    for _ in range(args.rounds):
        for case in cases:
            for name, module in hubs.items():
                ns = run_case(module, case, args.n)
                if ns is not None:
                    results[case][name].append(ns)
    table = {}
    print(f"{'case':36} " + " ".join(f"{k:>14}" for k in hubs) + "   ratio")
    for case in cases:
        med = {k: statistics.median(v) for k, v in results[case].items() if v}
        ratio = med["this tree"] / med[args.before] if args.before in med else None
        table[case] = {"median_ns": med, "ratio": ratio, "all_ns": results[case]}
        print(f"{case:36} " + " ".join(f"{med.get(k, float('nan')):14.0f}" for k in hubs)
              + (f"   {ratio:.2f}" if ratio else ""))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "hub_deliver.json"), "w") as f:
        json.dump({"benchmark": "hub_deliver", "before": args.before, "n": args.n, "rounds": args.rounds,
                   "python": sys.version.split()[0], "cases": table}, f, indent=1)


if __name__ == "__main__":
    main()
