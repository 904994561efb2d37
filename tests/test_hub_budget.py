"""The hub's memory budget (--history-total-bytes), without a gateway: subjects nobody watches are
forgotten least recently written first, watched subjects' oldest history is trimmed, recoveries in
flight keep their subject, the standalone engine gives a forgotten subject a new epoch, and the
accounting is checked against what Python really allocates (tracemalloc).

Subscribers are real fanout Conns on socketpairs; the hub and the engines are driven directly.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from fanout import encode_text
from gateway import protocol, recovery
from gateway.engines.base import Engine
from gateway.engines.standalone import StandaloneEngine
from gateway.hub import ENTRY_OVERHEAD, SUBJECT_OVERHEAD, Hub, Pending
from gateway.records import Record
from gateway.subjects import parse_subject
from support.fanout_peers import SocketpairPeer, socketpair_peers
from support.waits import wait_until

EPOCH = "e1"


def record(subject: str, seq: int, content: bytes = b"x", epoch: str = EPOCH) -> Record:
    return Record(subject, content, epoch, seq, seq - 1, 1_700_000_000_000 + seq)


def fill(hub: Hub, subjects: list[str], seqs: range = range(1, 2), content: bytes = b"x") -> None:
    for seq in seqs:
        for s in subjects:
            hub.deliver(record(s, seq, content))


class Peer(SocketpairPeer):
    @property
    def received(self) -> list[dict[str, Any]]:
        """Every message received so far, decoded."""
        return [orjson.loads(p) for p in self.payloads]

    def messages(self) -> list[dict[str, Any]]:
        self.read()
        return self.received


@pytest.fixture
async def peers() -> AsyncIterator[Any]:
    async with socketpair_peers(Peer) as make:
        yield make


def cost(hub: Hub, subject: str) -> int:
    st = hub.get(subject)
    assert st is not None and st.ring is not None
    return SUBJECT_OVERHEAD + len(subject) + st.ring.nbytes + len(st.ring) * ENTRY_OVERHEAD


def test_accounting_follows_every_change() -> None:
    hub = Hub(lambda s: EPOCH, history=3, history_bytes=1 << 20)
    fill(hub, ["/a/1", "/a/2"], range(1, 6))
    assert hub.bytes == cost(hub, "/a/1") + cost(hub, "/a/2")
    st = hub.state("/a/3")   # a subscription to a quiet subject costs its overhead
    assert hub.bytes == cost(hub, "/a/1") + cost(hub, "/a/2") + SUBJECT_OVERHEAD + len("/a/3")
    hub.release(st)          # and nothing once released
    assert hub.get("/a/3") is None
    hub.deliver(record("/a/1", 1, epoch="e2"))   # a new epoch replaces the ring
    assert hub.bytes == cost(hub, "/a/1") + cost(hub, "/a/2")
    hub.deliver(record("/a/2", 5))                # a duplicate changes nothing
    assert hub.bytes == cost(hub, "/a/1") + cost(hub, "/a/2")


def test_forgets_unwatched_subjects_least_recently_written_first() -> None:
    one = SUBJECT_OVERHEAD + len("/s/00") + ENTRY_OVERHEAD + len(encode_text(protocol.msg(record("/s/00", 1))))
    budget = 10 * one
    hub = Hub(lambda s: EPOCH, history=100, history_bytes=1 << 20, total_bytes=budget)
    subjects = [f"/s/{i:02d}" for i in range(10)]
    fill(hub, subjects)
    assert len(hub) == 10 and hub.stats.forgotten == 0 and hub.bytes <= budget
    hub.deliver(record("/s/00", 2))   # /s/00 is now the most recently written, /s/01 the least
    seen = []
    for i in range(10, 40):
        hub.deliver(record(f"/s/{i:02d}", 1))
        assert hub.bytes <= budget
        seen.append(set(hub._states))
    assert hub.stats.forgotten == 40 - len(hub)
    assert hub.get("/s/01") is None
    first_gone = next(i for i, held in enumerate(seen) if "/s/01" not in held)
    assert "/s/00" in seen[first_gone]   # written later: outlives /s/01
    assert list(hub._states)[-1] == "/s/39"
    assert hub.generation >= 1


async def test_watched_subjects_are_kept_and_their_oldest_history_trimmed(peers: Any) -> None:
    frame_len = len(encode_text(protocol.msg(record("/w/1", 10))))
    budget = 3 * (SUBJECT_OVERHEAD + 10 * (frame_len + ENTRY_OVERHEAD))
    hub = Hub(lambda s: EPOCH, history=1000, history_bytes=1 << 20, total_bytes=budget)
    engine = _NoEngine()
    peer = await peers()
    for s in ("/w/1", "/w/2"):
        assert recovery.subscribe(hub, engine, peer.conn, parse_subject(s), None) is None
    fill(hub, ["/w/1", "/w/2"], range(1, 41))        # twice the budget, all watched
    fill(hub, [f"/u/{i}" for i in range(50)])         # and unwatched ones
    assert hub.bytes <= budget
    assert hub.get("/w/1") is not None and hub.get("/w/2") is not None
    assert hub.stats.trimmed > 0
    for s in ("/w/1", "/w/2"):
        st = hub.get(s)
        assert st is not None and st.ring is not None
        assert st.ring.last_seq == 40 and 1 <= len(st.ring) < 40
        assert st.ring.since(40 - len(st.ring)) is not None and st.ring.since(39 - len(st.ring)) is None
    # the subscriber got every message of both subjects, in order, trimmed or not
    await wait_until(lambda: len([m for m in peer.messages() if m["op"] == "msg"]) == 80, "80 messages")
    for s in ("/w/1", "/w/2"):
        assert [m["seq"] for m in peer.received if m.get("subject") == s and m["op"] == "msg"] == list(range(1, 41))


async def test_a_hopeless_budget_keeps_the_newest_message_of_watched_subjects(peers: Any) -> None:
    hub = Hub(lambda s: EPOCH, history=100, history_bytes=1 << 20, total_bytes=1000)
    peer = await peers()
    subjects = [f"/h/{i}" for i in range(5)]
    for s in subjects:
        recovery.subscribe(hub, _NoEngine(), peer.conn, parse_subject(s), None)
    fill(hub, subjects, range(1, 20))
    assert len(hub) == 5
    for s in subjects:
        st = hub.get(s)
        assert st is not None and st.ring is not None and len(st.ring) == 1 and st.ring.last_seq == 19
        assert st.snapshot_frame() is not None
    assert hub.bytes == sum(cost(hub, s) for s in subjects)


def test_snapshot_frame_is_the_latest_message_flagged() -> None:
    hub = Hub(lambda s: EPOCH, history=10, history_bytes=1 << 20)
    for content in (b"tiny", b"x" * 200, "\u00e9t\u00e9 \"quoted\"".encode() * 5000, b"\xff\x00binary"):
        rec = Record("/snap/1", content, EPOCH, hub.get("/snap/1").last_seq + 1 if hub.get("/snap/1") else 1,
                     None, 5)
        hub.deliver(rec)
        st = hub.get("/snap/1")
        assert st is not None
        assert st.snapshot_frame() == encode_text(protocol.msg(rec, snapshot=True))


def test_big_messages_are_held_once() -> None:
    """A 64 KB message costs its frame, not its frame and its content (issue 10: twice the payload)."""
    hub = Hub(lambda s: EPOCH, history=10, history_bytes=1 << 30)
    n, size = 40, 64 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            hub.deliver(record(f"/big/{i}", 1, bytes([65 + i % 26]) * size))   # distinct contents
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held / n < 1.2 * size
    assert abs(hub.bytes - held) < 0.1 * held


@pytest.mark.parametrize("content_size", [10, 2000])
def test_the_estimate_matches_what_is_allocated(content_size: int) -> None:
    hub = Hub(lambda s: EPOCH, history=100, history_bytes=1 << 30)
    n = 10_000 if content_size < 100 else 2000
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            hub.deliver(record(f"/spray/key-{i:08d}", 1, b"y" * content_size))
        for i in range(0, n, 4):   # some subjects with more history
            for seq in range(2, 6):
                hub.deliver(record(f"/spray/key-{i:08d}", seq, b"y" * content_size))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # an estimate, but an honest one: within a quarter of the truth, either way
    assert 0.75 * held < hub.bytes < 1.25 * held, (hub.bytes / n, held / n)


class _NoEngine(Engine):
    """An engine with no storage of its own (recovery falls back to the hub only)."""

    accepts_positions_ahead = False

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    @property
    def ready(self) -> bool:
        return True

    def check_subject(self, subject: Any) -> None: ...

    def epoch(self, subject: Any) -> str:
        return EPOCH

    async def publish(self, subject: Any, content: bytes) -> tuple[str, int]:
        raise NotImplementedError


async def standalone(total_bytes: int) -> tuple[Hub, StandaloneEngine]:
    engine = StandaloneEngine()
    hub = Hub(lambda s: engine.epoch(parse_subject(s)), 100, 1 << 20, total_bytes)
    engine.bind(hub.deliver, hub)
    await engine.start()
    return hub, engine


async def test_standalone_forgotten_subject_comes_back_in_a_new_epoch(peers: Any) -> None:
    hub, engine = await standalone(20_000)
    old = parse_subject("/old/1")
    for _ in range(3):
        epoch0, seq = engine.publish_now(old, b"before")
    assert seq == 3
    i = 0
    while hub.get("/old/1") is not None:   # a spray of other subjects pushes it out
        engine.publish_now(parse_subject(f"/spray/{i}"), b"z")
        i += 1
        assert i < 10_000
    assert hub.bytes <= 20_000 and engine.stats()["epoch_generation"] >= 1
    epoch1, seq = engine.publish_now(old, b"after")
    assert (seq, epoch1 != epoch0) == (1, True)
    assert epoch1.startswith(epoch0)
    # the old position answers recovered:false and the snapshot, never seq 1 as if it followed 3
    peer = await peers()
    assert recovery.subscribe(hub, engine, peer.conn, old, (epoch0, 3)) is None
    await wait_until(lambda: len(peer.messages()) == 2, "subscribed + snapshot")
    sub, snap = peer.received
    assert (sub["op"], sub["epoch"], sub["seq"], sub["recovered"]) == ("subscribed", epoch1, 1, False)
    assert (snap["seq"], snap["epoch"], snap["snapshot"], snap["content"]) == (1, epoch1, True, "after")
    # a subject known under the new epoch recovers normally, and a watched one is never forgotten
    for j in range(2000):
        engine.publish_now(parse_subject(f"/spray2/{j}"), b"z")
    engine.publish_now(old, b"live")
    assert recovery.subscribe(hub, engine, peer.conn, old, (epoch1, 1)) is None
    await wait_until(lambda: len(peer.messages()) == 5, "the live message, then subscribed + replay")
    assert [(m["op"], m.get("seq")) for m in peer.received[2:]] == [("msg", 2), ("subscribed", 2), ("msg", 2)]
    assert peer.received[3]["recovered"] is True and hub.get("/old/1") is not None


async def test_a_subject_is_kept_while_a_recovery_is_in_flight(peers: Any) -> None:
    hub = Hub(lambda s: EPOCH, history=1000, history_bytes=1 << 20, total_bytes=50_000)
    fill(hub, ["/r/ring", "/r/engine"], range(1, 11))
    peer = await peers()
    st = hub.get("/r/ring")
    assert st is not None
    replay = recovery.RingReplay(st, peer.conn, 0, lambda: None)   # paced, not yet caught up
    other = hub.get("/r/engine")
    assert other is not None
    pending = Pending(peer.conn, 3, buffering=True)
    other.add_pending(pending)
    fill(hub, [f"/x/{i}" for i in range(500)])
    assert hub.stats.forgotten > 0
    assert hub.get("/r/ring") is st and hub.get("/r/engine") is other
    assert pending.buffer == []
    replay.done = True
    pending.active = False
    fill(hub, [f"/y/{i}" for i in range(500)])
    assert hub.get("/r/ring") is None and hub.get("/r/engine") is None


def test_kafka_engine_keeps_a_bounded_prev_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka.structs import TopicPartition

    from gateway.engines import kafka

    monkeypatch.setattr(kafka, "_LAST_SEQS_MAX", 3000)

    engine = kafka.KafkaEngine("127.0.0.1:1", ["t"])
    got: list[Record] = []
    engine.bind(got.append)
    tp = TopicPartition("t", 0)
    engine._parts[tp] = part = kafka._Partition("ep", next=0, complete=True)

    class R:
        def __init__(self, offset: int, key: bytes) -> None:
            self.offset, self.key, self.value, self.timestamp = offset, key, b"v", 1

    n = kafka._LAST_SEQS_MAX + 10
    # two fetched batches: within one batch a subject's records are chained exactly (grouped by subject),
    # the bounded memory is what spans batches
    engine._deliver(tp, [R(0, b"hot"), *(R(i, b"k%d" % i) for i in range(1, n))])
    engine._deliver(tp, [R(n, b"hot"), R(n + 1, b"k1")])
    assert len(part.last) <= kafka._LAST_SEQS_MAX and not part.complete
    assert got[0].prev == 0 and got[1].prev == 0          # first records while complete
    assert got[-2].subject == "/t/hot" and got[-2].prev is None   # dropped from memory: unknown, never wrong
    assert got[-1].subject == "/t/k1" and got[-1].prev is None
    engine._deliver(tp, [R(n + 2, b"k1")])
    assert got[-1].prev == n + 2                            # remembered again


def test_kafka_prev_after_a_hole_is_its_floor_until_the_prev_memory_drops_a_subject(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After retention deleted records the engine had not read (_out_of_range sets `floor`), each subject's
    first record gets prev = floor (an upper bound: no client that missed something holds it), its later
    ones an exact prev; once the bounded prev memory drops a subject, a subject not remembered may have had
    records since the floor: prev unknown (absent), never the floor."""
    from aiokafka.structs import TopicPartition

    from gateway.engines import kafka

    monkeypatch.setattr(kafka, "_LAST_SEQS_MAX", 3000)
    engine = kafka.KafkaEngine("127.0.0.1:1", ["t"])
    got: list[Record] = []
    engine.bind(got.append)
    tp = TopicPartition("t", 0)
    engine._parts[tp] = part = kafka._Partition("ep", next=40, floor=40)

    class R:
        def __init__(self, offset: int, key: bytes) -> None:
            self.offset, self.key, self.value, self.timestamp = offset, key, b"v", 1

    engine._deliver(tp, [R(40, b"a"), R(41, b"b"), R(42, b"a")])
    assert [(r.subject, r.seq, r.prev) for r in got] == [("/t/a", 41, 40), ("/t/b", 42, 40), ("/t/a", 43, 41)]
    n = kafka._LAST_SEQS_MAX + 10
    engine._deliver(tp, [R(43 + i, b"k%d" % i) for i in range(n)])
    assert part.floor is None and not part.complete
    engine._deliver(tp, [R(43 + n, b"new")])
    assert got[-1].subject == "/t/new" and got[-1].prev is None


def test_forgotten_filter_remembers_lately_forgotten_subjects(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.hub import ForgottenFilter

    monkeypatch.setattr(ForgottenFilter, "CAPACITY", 1000)
    f = ForgottenFilter()
    for i in range(1500):
        f.add(f"/f/{i}")
    assert all(f"/f/{i}" in f for i in range(1500))        # no false negatives over both filters
    false_positives = sum(f"/g/{i}" in f for i in range(10_000))
    assert false_positives < 100
    for i in range(1500, 3100):                             # two rotations later: the first ones are gone
        f.add(f"/f/{i}")
    assert sum(f"/f/{i}" in f for i in range(1000)) < 100
    assert all(f"/f/{i}" in f for i in range(2000, 3100))


class _FakeKafka(_NoEngine):
    """Positions ahead are valid and `latest` reads 'Kafka': a canned record per subject."""

    accepts_positions_ahead = True

    def __init__(self, records: dict[str, Record]) -> None:
        super().__init__()
        self.records = records
        self.reads: list[str] = []

    async def latest(self, subject: Any) -> Record | None:
        self.reads.append(subject.text)
        await asyncio.sleep(0)
        return self.records.get(subject.text)


async def test_kafka_fresh_subscriber_to_a_forgotten_subject_gets_its_snapshot(peers: Any) -> None:
    hub = Hub(lambda s: EPOCH, history=100, history_bytes=1 << 20, total_bytes=20_000)
    old = record("/k/old", 7, b"the last one")
    engine = _FakeKafka({"/k/old": old})
    hub.deliver(old)
    fill(hub, [f"/k/spray-{i}" for i in range(200)])
    assert hub.get("/k/old") is None
    peer = await peers()
    waiting = recovery.subscribe(hub, engine, peer.conn, parse_subject("/k/old"), None)
    assert waiting is not None
    hub.deliver(record("/k/old", 8, b"live meanwhile"))   # arrives during the read: after the snapshot
    await waiting
    await wait_until(lambda: len(peer.messages()) == 3, "subscribed, snapshot, live")
    sub, snap, live = peer.received
    assert (sub["op"], sub["recovered"], sub["seq"]) == ("subscribed", False, 8)
    assert (snap["seq"], snap["content"], snap["snapshot"]) == (7, "the last one", True)
    assert (live["seq"], live["content"], "snapshot" in live) == (8, "live meanwhile", False)
    st = hub.get("/k/old")
    assert st is not None and st.pending is None and st.channel   # joined: live from here on
    # a quiet subject that was never forgotten costs no read from Kafka
    assert recovery.subscribe(hub, engine, peer.conn, parse_subject("/k/never"), None) is None
    assert engine.reads == ["/k/old"]


async def test_forget_epoch_drops_the_history_of_that_epochs_subjects(peers: Any) -> None:
    """The engine lost an epoch's continuity (Kafka: retention while the gateway could not read, a topic
    deleted or recreated): every subject of it loses its history and snapshot at once; a watched one keeps
    its subscribers and takes the subject's current epoch, an unwatched one is forgotten; other epochs
    are untouched, the accounting follows, and a fresh subscriber then gets its snapshot from the engine."""
    epochs = {"/a/w": "e1", "/a/u": "e1", "/b/x": "e9"}
    hub = Hub(lambda s: epochs[s], history=100, history_bytes=1 << 20)
    peer = await peers()
    assert recovery.subscribe(hub, _NoEngine(), peer.conn, parse_subject("/a/w"), None) is None
    for s, e in epochs.items():
        for seq in (1, 2):
            hub.deliver(record(s, seq, epoch=e))
    epochs["/a/w"] = epochs["/a/u"] = "e2"   # the engine's epoch of the a-subjects now (a recreated topic)
    assert hub.forget_epoch("e1") == 2
    assert hub.forget_epoch("e1") == 0
    st = hub.get("/a/w")
    assert st is not None and st.ring is None and st.snapshot_frame() is None and st.channel
    assert (st.epoch, st.last_seq, hub.stats.epoch_changes) == ("e2", 0, 1)
    assert hub.get("/a/u") is None and "/a/u" in hub.forgotten and "/a/w" in hub.forgotten
    assert hub.bytes == cost(hub, "/b/x") + SUBJECT_OVERHEAD + len("/a/w")
    assert hub.position("/b/x") == ("e9", 2)
    hub.deliver(record("/a/w", 3, epoch="e2"))   # live again, to the subscriber that stayed
    await wait_until(lambda: [m["seq"] for m in peer.messages() if m["op"] == "msg"] == [1, 2, 3], "live")
    engine = _FakeKafka({"/a/u": record("/a/u", 2, b"from Kafka", epoch="e2")})
    other = await peers()
    waiting = recovery.subscribe(hub, engine, other.conn, parse_subject("/a/u"), None)
    assert waiting is not None
    await waiting
    await wait_until(lambda: len(other.messages()) == 2, "subscribed and the snapshot read from the engine")
    assert [(m["op"], m.get("content")) for m in other.received] == [("subscribed", None), ("msg", "from Kafka")]
