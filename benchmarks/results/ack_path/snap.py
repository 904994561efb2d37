"""Snapshot of kernel counters around a measurement window: `python snap.py OUT.json PID...`.

System-wide TCP counters (/proc/net/snmp, /proc/net/netstat), IPIs (/proc/interrupts), softirqs
per CPU (/proc/softirqs), CPU time per CPU (/proc/stat) and each PID's utime/stime (clock ticks).
analyze.py takes the difference of two snapshots.
"""
from __future__ import annotations

import json
import sys
import time


def snmp() -> dict[str, int]:
    out: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(path, encoding="ascii") as fh:
            lines = fh.read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            prefix, keys = head.split(":", 1)
            for k, x in zip(keys.split(), vals.split(":", 1)[1].split()):
                out[prefix + k] = int(x)
    return out


def per_cpu(path: str, names: tuple[str, ...]) -> dict[str, list[int]]:
    out = {}
    with open(path, encoding="ascii") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0].rstrip(":") in names:
                out[parts[0].rstrip(":")] = [int(x) for x in parts[1:3]]
    return out


def stat_cpu() -> dict[str, list[int]]:
    out = {}
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3] != " ":
                parts = line.split()
                out[parts[0]] = [int(x) for x in parts[1:8]]  # user nice system idle iowait irq softirq
    return out


def pid_cpu(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return [int(fields[11]), int(fields[12])]  # utime, stime
    except OSError:
        return [0, 0]


def main() -> None:
    snap = {"t": time.monotonic(), "snmp": snmp(),
            "irq": per_cpu("/proc/interrupts", ("RES", "CAL", "LOC", "TLB")),
            "softirq": per_cpu("/proc/softirqs", ("NET_RX", "NET_TX", "TIMER", "SCHED", "HRTIMER", "RCU")),
            "stat": stat_cpu(), "pids": {p: pid_cpu(int(p)) for p in sys.argv[2:]}}
    with open(sys.argv[1], "w", encoding="ascii") as fh:
        json.dump(snap, fh)


if __name__ == "__main__":
    main()
