"""The SDKs' sans-I/O subscription trackers: gateway/client_tracker.py (Python) and the
SubscriptionTracker of gateway/static/client.js (under node, no browser).

Both are held to the same frame sequences, tests/fixtures/tracker_cases.json (frames in; expected
frames out, deliveries and events per step; positions and counters at the end). The Python tracker
also gets property tests: whatever a gateway does (duplicates, gaps, reordering, truncated replays,
reconnects), every message is delivered exactly once and in order per subject, and every subscribe
frame it sends carries the subject's last delivered position.

client.js's types (gateway/static/client.d.ts) are checked with TypeScript's `tsc` (scripts/test.sh
installs node and TypeScript; a missing `node` or `tsc` is a failure, not a skip), and the names it
declares must be the module's exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SCALE
from gateway.client_tracker import (
    Delivered,
    Event,
    Gap,
    Refused,
    Subscribed,
    SubscriptionTracker,
    Unsubscribed,
)
from support.node import client_module, node

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tracker_cases.json"
CASES: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["cases"]
STATIC = ROOT / "gateway" / "static"
#: where scripts/test.sh installs TypeScript (a cache outside the repository; it also sets GATEWAY_TEST_TSC)
TSC = Path(os.environ.get("GATEWAY_TEST_TSC")
           or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
           / "kafka-ws-gateway" / "typescript" / "node_modules" / ".bin" / "tsc")


# ------------------------------------------------------------------------------ the shared fixture


def observe(events: list[Event]) -> dict[str, list[list[Any]]]:
    """Events in the fixture's notation (see its `about`)."""
    deliver: list[list[Any]] = []
    named: list[list[Any]] = []
    for ev in events:
        if isinstance(ev, Delivered):
            m = ev.message
            deliver.append([m.subject, m.epoch, m.seq, m.data.hex()])
        elif isinstance(ev, Subscribed):
            named.append(["subscribed", ev.subject, ev.recovered])
        elif isinstance(ev, Gap):
            named.append(["gap", ev.subject, ev.epoch, ev.seq])
        elif isinstance(ev, Refused):
            named.append(["refused", ev.subject, ev.frame.get("code"), ev.tracked])
        elif isinstance(ev, Unsubscribed):
            named.append(["unsubscribed", ev.subject])
        else:
            raise TypeError(f"unknown event {ev!r}")
    return {"deliver": deliver, "events": named}


def run_python(case: dict[str, Any]) -> dict[str, Any]:
    t = SubscriptionTracker()
    steps = []
    for step in case["steps"]:
        events: list[Event] = []
        match step["do"]:
            case "subscribe":
                t.subscribe(step["subjects"], {s: (e, q) for s, (e, q) in step.get("positions", {}).items()})
            case "unsubscribe":
                t.unsubscribe(step["subject"])
            case "connect":
                t.connection_made()
            case "disconnect":
                t.connection_lost()
            case "rewind":
                t.positions[step["subject"]] = tuple(step["position"])  # type: ignore[assignment]
            case "receive":
                events = t.receive(step["frame"])
            case other:
                raise AssertionError(f"unknown step {other}")
        steps.append({"out": t.frames_to_send(), **observe(events)})
    stats = {"messages": t.stats["messages"], "duplicates": t.stats["duplicates_dropped"],
             "gaps": t.stats["gaps_detected"], "resubscribes": t.stats["resubscribes"]}
    return {"steps": steps, "positions": {s: list(p) for s, p in t.positions.items()}, "stats": stats}


def check(case: dict[str, Any], got: dict[str, Any]) -> None:
    """Compare a tracker's run with the case, step by step (the first difference is reported)."""
    assert len(got["steps"]) == len(case["steps"])
    for i, (step, seen) in enumerate(zip(case["steps"], got["steps"])):
        want = {"out": step.get("out", []), "deliver": step.get("deliver", []), "events": step.get("events", [])}
        assert seen == want, f"step {i} {step}"
    assert got["positions"] == case["positions"]
    assert got["stats"] == case["stats"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_python_tracker_follows_the_shared_cases(case: dict[str, Any]) -> None:
    check(case, run_python(case))


@pytest.fixture(scope="module")
def client_mjs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return client_module(tmp_path_factory.mktemp("clientjs"))


@pytest.fixture(scope="module")
def node_results(client_mjs: Path) -> dict[str, Any]:
    out = subprocess.run([node(), str(ROOT / "tests" / "js" / "run_tracker_cases.mjs"), str(client_mjs), str(FIXTURE)],
                         capture_output=True, text=True, timeout=60 * SCALE, check=False)
    assert out.returncode == 0, out.stderr
    results: dict[str, Any] = json.loads(out.stdout)
    return results


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_client_js_tracker_follows_the_shared_cases(case: dict[str, Any], node_results: dict[str, Any]) -> None:
    check(case, node_results[case["name"]])


# ------------------------------------------------------------------------------ client.d.ts

_DECLARED = re.compile(r"^export (?:declare )?(class|function) (\w+)", re.MULTILINE)


def test_client_d_ts_declares_exactly_the_modules_exports(client_mjs: Path) -> None:
    declared = {name for _, name in _DECLARED.findall((STATIC / "client.d.ts").read_text())}
    script = f"const m = await import({json.dumps(client_mjs.as_uri())}); console.log(JSON.stringify(Object.keys(m)));"
    out = subprocess.run([node(), "--input-type=module", "-e", script], capture_output=True, text=True,
                         timeout=60 * SCALE, check=False)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == declared


def tsc(directory: Path, *files: str) -> subprocess.CompletedProcess[str]:
    if not TSC.exists():
        pytest.fail(f"no TypeScript compiler at {TSC}: scripts/test.sh installs it (npm install --prefix "
                    "~/.cache/kafka-ws-gateway/typescript typescript@5), or set GATEWAY_TEST_TSC", pytrace=False)
    return subprocess.run([node(), str(TSC), "--noEmit", "--strict", "--target", "es2022", "--module", "es2022",
                           "--moduleResolution", "bundler", *files], cwd=directory, capture_output=True, text=True,
                          timeout=120 * SCALE, check=False)


USAGE = """\
import { GatewayClient, SubscriptionTracker, GatewayError, type Message, type TrackerEvent } from "./client.js";
const c = new GatewayClient(["ws://127.0.0.1:1/ws"], { token: async () => "t", onStatus: (s, d) => void [s, d] });
const off: () => void = c.subscribe("/a", (m: Message) => { const n: number = m.seq; void n; });
off();
c.publish("/a", "x").then((ack) => ack.seq + 1).catch((e: GatewayError) => e.code);
const seqs: number[] = [...c.positions.values()].map((p) => p.seq);
const t = new SubscriptionTracker();
t.subscribe(["/a"], { "/a": { epoch: "e", seq: 0 } });
t.connectionMade();
for (const ev of t.receive({ op: "msg", subject: "/a", epoch: "e", seq: 1 }) as TrackerEvent[]) {
  if (ev.type === "deliver") { const s: string = ev.message.subject; void s; }
  if (ev.type === "gap") { const got: number = ev.gotSeq; void got; }
}
void [seqs, t.framesToSend(), c.stats.reconnects + t.stats.duplicates];
"""


def test_client_d_ts_type_checks_a_typical_use_and_rejects_a_wrong_one(tmp_path: Path) -> None:
    shutil.copy(STATIC / "client.d.ts", tmp_path / "client.d.ts")
    (tmp_path / "usage.ts").write_text(USAGE)
    ok = tsc(tmp_path, "client.d.ts", "usage.ts")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "wrong.ts").write_text('import { GatewayClient } from "./client.js";\n'
                                       'new GatewayClient("ws://x/ws").subscribe(5, (m) => m.nope);\n')
    wrong = tsc(tmp_path, "client.d.ts", "wrong.ts")
    assert wrong.returncode != 0 and "wrong.ts" in wrong.stdout, wrong.stdout + wrong.stderr


# ------------------------------------------------------------------------------ properties


class ModelGateway:
    """A gateway as hostile as the protocol allows it to look from the client: it holds every
    subject's history (seq 1..n in the subject's own epoch, `prev` always right) and may send any of
    it at any time, any number of times; it answers the subscribe entries the tracker sent, in order,
    with a replay that may stop short. It checks every position the tracker sends."""

    def __init__(self, subjects: list[str]) -> None:
        self.n = {s: 0 for s in subjects}
        self.epoch = {s: f"epoch-{i}" for i, s in enumerate(subjects)}
        self.delivered: dict[str, list[int]] = {s: [] for s in subjects}
        self.pending: list[tuple[str, int]] = []  # subscribe entries sent on this connection, unanswered
        self.t = SubscriptionTracker()
        # seq 0 of the subject's epoch: "everything from seq 1"
        self.t.subscribe(subjects, {s: (self.epoch[s], 0) for s in subjects})

    def take_frames(self) -> None:
        for frame in self.t.frames_to_send():
            assert frame["op"] == "subscribe"
            for entry in frame["subjects"]:
                s = entry["subject"]
                # the position is the last delivered message, or the seq 0 it started from
                last = self.delivered[s][-1] if self.delivered[s] else 0
                assert (entry["epoch"], entry["seq"]) == (self.epoch[s], last), (entry, self.delivered[s])
                self.pending.append((s, entry["seq"]))

    def feed(self, frame: dict[str, Any]) -> None:
        for ev in self.t.receive(frame):
            if isinstance(ev, Delivered):
                self.delivered[ev.message.subject].append(ev.message.seq)
        self.take_frames()

    def msg(self, s: str, seq: int) -> dict[str, Any]:
        return {"op": "msg", "subject": s, "epoch": self.epoch[s], "seq": seq, "prev": seq - 1, "content": str(seq)}

    def connect(self) -> None:
        self.t.connection_lost()
        self.pending.clear()  # the old connection's entries are never answered
        self.t.connection_made()
        before = len(self.pending)
        self.take_frames()
        assert sorted(s for s, _ in self.pending[before:]) == sorted(self.n)  # every subject, at once

    def answer(self, limit: int | None) -> None:
        s, after = self.pending.pop(0)
        self.feed({"op": "subscribed", "subject": s, "epoch": self.epoch[s], "seq": self.n[s], "recovered": True})
        replay = range(after + 1, self.n[s] + 1)
        for seq in replay if limit is None else replay[:limit]:
            self.feed(self.msg(s, seq))


SUBJECTS = ["/m/1", "/m/2", "/m/3"]
ops = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(SUBJECTS), st.integers(1, 3)),
    # any message of the history: live, late, duplicated, out of order
    st.tuples(st.just("send"), st.sampled_from(SUBJECTS), st.integers(1, 40)),
    st.tuples(st.just("answer"), st.none(), st.integers(0, 5) | st.none()),
    st.tuples(st.just("reconnect"), st.none(), st.none()),
), max_size=80)


@settings(max_examples=300)
@given(ops)
def test_every_message_exactly_once_in_order_whatever_the_gateway_does(script: list[tuple[Any, ...]]) -> None:
    gw = ModelGateway(SUBJECTS)
    gw.connect()
    for op, s, k in script:
        if op == "publish":
            gw.n[s] += k
        elif op == "send" and gw.n[s]:
            gw.feed(gw.msg(s, 1 + (k - 1) % gw.n[s]))
        elif op == "answer" and gw.pending:
            gw.answer(k)
        elif op == "reconnect":
            gw.connect()
        for subject, seqs in gw.delivered.items():  # at every step: in order, no duplicate, no hole
            assert seqs == list(range(1, len(seqs) + 1)), subject
    # In the end a connection stays up and the gateway answers everything in full: all is delivered.
    gw.connect()
    while gw.pending:
        gw.answer(None)
    assert gw.delivered == {s: list(range(1, gw.n[s] + 1)) for s in SUBJECTS}
    assert gw.t.stats["messages"] == sum(gw.n.values())
    assert gw.t.positions == {s: (gw.epoch[s], gw.n[s]) for s in SUBJECTS}


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(SUBJECTS), st.integers(1, 30)), max_size=60))
def test_live_traffic_alone_never_delivers_out_of_order_and_asks_for_every_gap(sends: list[tuple[str, int]]) -> None:
    """Without answers to its resubscriptions, the tracker delivers only the unbroken start of each
    subject, and asks once per gap (a subject held back asks nothing more until it is answered)."""
    gw = ModelGateway(SUBJECTS)
    gw.connect()
    for s, seq in sends:
        gw.n[s] = max(gw.n[s], seq)
        gw.feed(gw.msg(s, seq))
    for s in SUBJECTS:
        seqs = gw.delivered[s]
        assert seqs == list(range(1, len(seqs) + 1))
    asks = [s for s, _ in gw.pending]  # the connection's subscribe entry per subject, then one per gap
    assert all(asks.count(s) <= 2 for s in SUBJECTS), asks
    assert gw.t.stats["gaps_detected"] == len(gw.pending) - len(SUBJECTS)
    for s in SUBJECTS:  # a subject asks again exactly when a message came after a hole in what it got
        held = [seq for subject, seq in sends if subject == s]
        expected_gap = any(seq > len(gw.delivered[s]) + 1 for seq in held)
        assert (asks.count(s) == 2) == expected_gap, (s, held, gw.delivered[s])
