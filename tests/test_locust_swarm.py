"""The Locust swarm (locustfiles/gateway.py): its gap/duplicate detector, a short headless swarm against a
real gateway process (zero failures, deliveries counted), and a swarm against a fake gateway that skips
a seq and repeats one (the failures must show up in Locust's CSV).

Locust runs as a subprocess: it monkey-patches the standard library with gevent on import, which must
never happen inside the test process. Only `locustfiles/positions.py` (no Locust import) is loaded here.
"""
from __future__ import annotations

import asyncio
import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from conftest import SCALE

LOCUSTFILES = Path(__file__).resolve().parents[1] / "locustfiles"
LOCUSTFILE = LOCUSTFILES / "gateway.py"


def _load_positions() -> Any:
    spec = importlib.util.spec_from_file_location("locust_positions", LOCUSTFILES / "positions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


positions = _load_positions()
Positions, Verdict = positions.Positions, positions.Verdict
S = "/matches/football/1"


# ------------------------------------------------------------------------------- the detector, sans I/O

def _subscribed(p: Any, seq: int = 0, epoch: str = "e1", recovered: bool = False) -> bool:
    assert p.subscribe_entry(S) == {"subject": S}
    return p.on_subscribed(S, epoch, seq, recovered)


def test_in_order_messages_are_live_and_advance_the_position() -> None:
    p = Positions([S])
    assert _subscribed(p) is False
    assert [p.on_msg(S, "e1", n, n - 1) for n in (1, 2, 3)] == [Verdict.LIVE] * 3
    assert p.subscribe_entry(S) == {"subject": S, "epoch": "e1", "seq": 3}


def test_duplicate_and_gap_are_detected_and_the_replay_fills_the_hole() -> None:
    p = Positions([S])
    _subscribed(p)
    assert p.on_msg(S, "e1", 1, 0) is Verdict.LIVE
    assert p.on_msg(S, "e1", 1, 0) is Verdict.DUPLICATE
    assert p.on_msg(S, "e1", 3, 2) is Verdict.GAP          # seq 2 never came
    assert p.subscribe_entry(S) == {"subject": S, "epoch": "e1", "seq": 1}  # resubscribe from the last one
    assert p.on_msg(S, "e1", 4, 3) is Verdict.IGNORED      # old subscription, before `subscribed`
    assert p.on_subscribed(S, "e1", 4, True) is False
    assert [p.on_msg(S, "e1", n, n - 1) for n in (2, 3, 4, 5)] == [Verdict.REPLAYED] * 3 + [Verdict.LIVE]


def test_unrecovered_position_is_a_loss_and_the_snapshot_restarts_the_stream() -> None:
    p = Positions([S])
    _subscribed(p)
    assert p.on_msg(S, "e1", 1, 0) is Verdict.LIVE
    p.subscribe_entry(S)                                    # reconnect with position e1/1
    assert p.on_subscribed(S, "e2", 7, False) is True       # the gateway restarted: new epoch
    assert p.on_msg(S, "e2", 7, 6, snapshot=True) is Verdict.SNAPSHOT
    assert p.on_msg(S, "e2", 8, 7) is Verdict.LIVE
    assert p.on_msg(S, "e3", 9, 8) is Verdict.GAP           # an epoch change without a resubscribe


def test_messages_of_unknown_subjects_are_ignored() -> None:
    p = Positions([S])
    assert p.on_msg("/matches/football/2", "e1", 1, 0) is Verdict.IGNORED
    assert p.on_msg(S, "e1", 1, 0) is Verdict.IGNORED       # not subscribed yet


@given(st.lists(st.sampled_from(["next", "drop", "repeat"]), max_size=60))
def test_detector_agrees_with_what_the_stream_really_did(ops: list[str]) -> None:
    """A stream where each step delivers the next message, loses it, or repeats the last delivered one:
    every loss is seen as one gap at the next delivery, every repeat as a duplicate."""
    p = Positions([S])
    _subscribed(p)
    produced = delivered = 0
    lost = False
    for op in ops:
        if op == "repeat" and delivered:
            assert p.on_msg(S, "e1", delivered, delivered - 1) is Verdict.DUPLICATE
            continue
        produced += 1
        if op == "drop":
            lost = True
            continue
        verdict = p.on_msg(S, "e1", produced, produced - 1)
        if lost:
            assert verdict is Verdict.GAP
            assert p.subscribe_entry(S)["seq"] == delivered
            assert p.on_subscribed(S, "e1", produced, True) is False
            for seq in range(delivered + 1, produced + 1):  # the replay
                assert p.on_msg(S, "e1", seq, seq - 1) is Verdict.REPLAYED
            lost = False
        else:
            assert verdict is Verdict.LIVE
        delivered = produced


# ------------------------------------------------------------------------------- swarms over sockets

def _locust_argv(port: int, csv_prefix: Path, users: int, seconds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", f"http://127.0.0.1:{port}",
            "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(csv_prefix),
            "--only-summary", "--loglevel", "WARNING", *extra]


def _stats(csv_prefix: Path, report: str) -> dict[str, dict[str, str]]:
    path = Path(f"{csv_prefix}_stats.csv")
    assert path.exists(), f"locust wrote no stats: {report}"
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["Name"]: row for row in csv.DictReader(fh)}


def _count(stats: dict[str, dict[str, str]], name: str, column: str = "Request Count") -> int:
    return int(stats[name][column]) if name in stats else 0


def test_headless_swarm_against_a_gateway_process_has_no_failures(tmp_path: Path) -> None:
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd="/")  # the installed package, not the source tree
    try:
        lines = []
        m = None
        for _ in range(20):  # log lines (e.g. the "auth is off" warning) may come first
            line = gateway.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m or not line:
                break
        assert m, f"no start-up line from the gateway: {lines!r}"
        users, seconds = 20, 15
        run = subprocess.run(_locust_argv(int(m.group(1)), tmp_path / "swarm", users, seconds,
                                          "--feed-multiplier", "2"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=seconds + 60 * SCALE)
        stats = _stats(tmp_path / "swarm", f"exit {run.returncode}: {run.stderr[-3000:]}")
        report = f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        assert _count(stats, "Aggregated", "Failure Count") == 0, report
        assert run.returncode == 0, report
        assert _count(stats, "connect") == users, report                  # 19 fans + 1 feeder
        assert _count(stats, "subscribe") == (users - 1) * 3, report      # 3 matches per fan
        assert _count(stats, "publish") > 0, report                       # acks
        assert _count(stats, "msg") > 0, report                           # deliveries with latency
        assert gateway.poll() is None, "the gateway died under the swarm"
    finally:
        gateway.terminate()
        gateway.wait(10)
        gateway.stdout.close()  # type: ignore[union-attr]


async def test_swarm_reports_gap_and_duplicate_of_a_misbehaving_gateway_as_failures(tmp_path: Path) -> None:
    """A fake gateway answers a subscribe without a position with seq 1, 2, 2 (a repeat), 4 (3 skipped);
    the resubscribe with the position it answers recovered, replaying 3 and 4. The swarm must report the
    duplicate and the gap as failures, resubscribe, and count the replayed messages."""
    from websockets.asyncio.server import serve

    resubscribes = 0

    def msg(subject: str, seq: int) -> str:
        content = json.dumps({"scored": "score_home", "score_home": seq, "score_away": 0, "t": 0})
        return json.dumps({"op": "msg", "subject": subject, "content": content, "epoch": "fake", "seq": seq,
                           "prev": seq - 1, "ts": 0})

    async def handler(ws: Any) -> None:
        nonlocal resubscribes
        async for raw in ws:
            frame = json.loads(raw)
            if frame["op"] == "connect":
                await ws.send(json.dumps({"op": "connected", "session": "s", "server": "fake",
                                          "heartbeat_ms": 15000, "version": 1}))
            elif frame["op"] == "publish":
                await ws.send(json.dumps({"op": "ack", "id": frame["id"], "subject": frame["subject"],
                                          "epoch": "fake", "seq": 1}))
            elif frame["op"] == "subscribe":
                for entry in frame["subjects"]:
                    subject = entry["subject"]
                    if "seq" in entry:  # the negative feedback: recover from the position
                        resubscribes += 1
                        await ws.send(json.dumps({"op": "subscribed", "subject": subject, "epoch": "fake",
                                                  "seq": 4, "recovered": True}))
                        for seq in range(entry["seq"] + 1, 5):
                            await ws.send(msg(subject, seq))
                        continue
                    await ws.send(json.dumps({"op": "subscribed", "subject": subject, "epoch": "fake",
                                              "seq": 0, "recovered": False}))
                    for seq in (1, 2, 2, 4):
                        await ws.send(msg(subject, seq))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *_locust_argv(port, tmp_path / "fake", 2, 4, "--matches", "1", "--matches-per-user", "1"),
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60 * SCALE)
    report = f"exit {proc.returncode}\n{out.decode()[-3000:]}\n{err.decode()[-3000:]}"
    stats = _stats(tmp_path / "fake", report)
    assert _count(stats, "gap", "Failure Count") >= 1, report
    assert _count(stats, "duplicate", "Failure Count") >= 1, report
    assert resubscribes >= 1, report
    assert _count(stats, "msg (replayed)") >= 1, report
    assert proc.returncode == 1, report  # Locust's exit code when any request failed
