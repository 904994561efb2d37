"""Per-send counts of one probe window: `python analyze.py TAG...` (dirs under $ACK_PATH_OUT, default /tmp/ack_path).

Each TAG dir holds perfstat.csv (perf stat -x, on the sender's pid) and the snapshots s0.json, s1.json
(snap.py). A "send" is one sendto(2) or sendmsg(2) of the sender, i.e. one delivery.
"""
from __future__ import annotations

import csv
import json
import os
import sys

TCP = ("TcpOutSegs", "TcpInSegs", "TcpExtDelayedACKs", "TcpExtTCPHPAcks", "TcpExtTCPPureAcks", "TcpExtTCPHPHits",
       "TcpExtDelayedACKLocked", "TcpExtTCPBacklogCoalesce", "TcpExtTCPAutoCorking", "TcpExtTCPOrigDataSent",
       "TcpExtTCPDelivered", "TcpRetransSegs")


def diff(a: dict, b: dict) -> dict:
    return {k: ([y - x for x, y in zip(a[k], b[k])] if isinstance(a[k], list) else b[k] - a[k]) for k in a}


def report(tag: str) -> None:
    base = os.path.join(os.environ.get("ACK_PATH_OUT", "/tmp/ack_path"), tag)
    ev: dict[str, float] = {}
    with open(os.path.join(base, "perfstat.csv"), encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if len(row) >= 3 and row[0] and not row[0].startswith("#"):
                try:
                    ev[row[2]] = float(row[0])
                except ValueError:
                    pass  # <not counted> / <not supported>
    with open(os.path.join(base, "s0.json"), encoding="ascii") as f0, open(os.path.join(base, "s1.json"),
                                                                           encoding="ascii") as f1:
        s0, s1 = json.load(f0), json.load(f1)
    dt = s1["t"] - s0["t"]
    tcp, irq, sirq, st = (diff(s0[k], s1[k]) for k in ("snmp", "irq", "softirq", "stat"))
    pc = diff(s0["pids"], s1["pids"])
    sends = ev.get("syscalls:sys_enter_sendto", 0) + ev.get("syscalls:sys_enter_sendmsg", 0)
    per = max(1.0, sends)
    clock = ev.get("task-clock", 0.0)
    print(f"== {tag}: {dt:.1f} s, sends {sends:.0f} ({sends / dt:.0f}/s), task-clock {clock:.0f} ms"
          f" -> {clock * 1e3 / per:.2f} us/send; utime/stime ticks {list(pc.values())}")
    for k, v in ev.items():
        if v:
            print(f"   {k:36s} {v:12.0f}  per send {v / per:8.3f}")
    for k in TCP:
        print(f"   {k:36s} {tcp.get(k, 0):12d}  per send {tcp.get(k, 0) / per:8.3f}")
    print("   IPIs RES/CAL per CPU", irq["RES"], irq["CAL"], " per send",
          [round(sum(irq[k]) / per, 3) for k in ("RES", "CAL")])
    print("   softirq NET_RX", sirq.get("NET_RX"), "TIMER", sirq.get("TIMER"), "SCHED", sirq.get("SCHED"))
    print("   /proc/stat cpu0 user,nice,sys,idle,iowait,irq,softirq", st["cpu0"], "cpu1", st.get("cpu1"))


if __name__ == "__main__":
    for t in sys.argv[1:]:
        report(t)
