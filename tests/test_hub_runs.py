"""Hub.deliver_run (the Kafka engine's batch sink, the per-record loop in fanout.publish_run) against
Hub.deliver of each record in turn: the same frames on the wire, the same ring, the same accounting and
counters, through duplicates, epoch changes, unknown prev and a recovery in flight. Frames are checked
byte for byte against protocol.msg (orjson), for the compiled fanout and its twin (both test passes).

Subscribers are real fanout Conns on socketpairs; the hubs are driven directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanout import Channel, Ring, encode_text, publish_run
from gateway import protocol
from gateway.engines.base import Record
from gateway.hub import ENTRY_OVERHEAD, Hub, Pending
from support.fanout_peers import SocketpairPeer, socketpair_peers

NOW = 1_700_000_123_456


@dataclass
class Rec:
    """What the engine hands over: aiokafka's decoded record has these attributes."""

    offset: int
    value: bytes | None
    timestamp: int | None
    key: bytes | None = None


def as_records(subject: str, epoch: str, recs: list[Rec], prev: int | None) -> list[Record]:
    out = []
    for r in recs:
        ts = NOW if r.timestamp is None or r.timestamp < 0 else r.timestamp
        out.append(Record(subject, b"" if r.value is None else r.value, epoch, r.offset + 1, prev, ts))
        prev = r.offset + 1
    return out


def expected_frames(subject: str, epoch: str, recs: list[Rec], prev: int | None) -> list[bytes]:
    return [encode_text(protocol.msg(r)) for r in as_records(subject, epoch, recs, prev)]


CONTENTS = [b"", None, b"plain", b'{"score":"2-1","minute":87}', b'back\\slash "q"', bytes(range(128)),
            "é ü 😀 ∑".encode(), b"\xff\xfe\x00binary", b"\x7f", b"x" * 125, b"y" * 126, b"z" * 70_000,
            b"a\x00b\x1fc\td\ne\rf\x08g\x0ch"]


def test_publish_run_frames_match_protocol_msg() -> None:
    recs = [Rec(10 + i, v, None if i % 4 == 0 else (-1 if i % 4 == 1 else 1_600_000_000_000 + i))
            for i, v in enumerate(CONTENTS)]
    for prev in (None, 0, 7):
        ring = Ring(100)
        added, deliveries = publish_run(ring, Channel(), protocol.msg_head("/t/k/x"), b"00ff", recs, 0,
                                        -1 if prev is None else prev, NOW, protocol.content_member, ENTRY_OVERHEAD)
        want = expected_frames("/t/k/x", "00ff", recs, prev)
        assert ring.since(recs[0].offset + 1) == want[1:]
        assert ring.last() == (recs[-1].offset + 1, recs[-2].offset + 1, NOW, want[-1])
        assert added == ring.nbytes + len(ring) * ENTRY_OVERHEAD
        assert deliveries == 0   # nobody subscribed


@given(st.lists(st.tuples(st.one_of(st.none(), st.binary(max_size=300)),
                          st.one_of(st.none(), st.integers(-(2 ** 40), 2 ** 62))), min_size=1, max_size=8),
       st.integers(0, 2 ** 40), st.one_of(st.none(), st.integers(0, 2 ** 40)),
       st.text(alphabet="abcdef0123456789", min_size=1, max_size=16))
def test_publish_run_frames_match_protocol_msg_any(items: list[tuple[bytes | None, int | None]], first: int,
                                                    prev_offset: int | None, epoch: str) -> None:
    prev = None if prev_offset is None else min(prev_offset, first)   # prev < the first seq
    recs = [Rec(first + i, v, ts) for i, (v, ts) in enumerate(items)]
    ring = Ring(len(recs))
    publish_run(ring, Channel(), protocol.msg_head("/t/a.b/c~d-e"), epoch.encode(), recs, 0,
                -1 if prev is None else prev, NOW, protocol.content_member)
    want = expected_frames("/t/a.b/c~d-e", epoch, recs, prev)
    assert ring.since(first + 1) == want[1:]
    assert ring.last()[3] == want[-1]   # type: ignore[index]


def test_publish_run_refuses_what_is_not_bytes() -> None:
    with pytest.raises(TypeError):
        publish_run(Ring(4), Channel(), b"{", b"e", [Rec(0, "text", 1)], 0, 0, NOW,  # type: ignore[arg-type]
                    protocol.content_member)


class Peer(SocketpairPeer):
    @property
    def frames(self) -> list[bytes]:
        """Every frame received so far, as its text frame (byte for byte what the hub wrote)."""
        return [encode_text(p) for p in self.payloads]

    def received(self) -> list[bytes]:
        self.read()
        return self.frames


@pytest.fixture
async def peers() -> AsyncIterator[Any]:
    async with socketpair_peers(Peer) as make:
        yield make


def ring_entries(hub: Hub, subject: str) -> tuple[Any, ...] | None:
    """What a ring holds: its seqs, the frames after the oldest, the newest entry."""
    st_ = hub.get(subject)
    if st_ is None or st_.ring is None:
        return None
    ring = st_.ring
    return [ring.seq_at(i) for i in range(len(ring))], ring.since(ring.seq_at(0)), ring.last()


async def test_deliver_run_is_deliver_of_each_record(peers: Any) -> None:
    """Two hubs fed the same runs, one through deliver_run and one record by record: same wire, same state."""
    by_run, by_record = Hub(lambda s: "e1", 4, 1 << 20), Hub(lambda s: "e1", 4, 1 << 20)
    subjects = ["/t/a", "/t/b"]
    run_peers = {s: [await peers(), await peers()] for s in subjects}
    rec_peers = {s: [await peers(), await peers()] for s in subjects}
    for hub, ps in ((by_run, run_peers), (by_record, rec_peers)):
        for s in subjects:
            for p in ps[s]:
                assert hub.state(s).channel.add(p.conn)

    def feed(subject: str, epoch: str, recs: list[Rec], prev: int | None) -> None:
        by_run.deliver_run(subject, epoch, recs, prev, NOW)
        for r in as_records(subject, epoch, recs, prev):
            by_record.deliver(r)

    feed("/t/a", "e1", [Rec(0, b"a0", 5), Rec(2, b'"a2"', None), Rec(3, None, -3)], 0)
    feed("/t/b", "e1", [Rec(1, "b1 é".encode(), 6)], None)                      # prev unknown
    feed("/t/a", "e1", [Rec(2, b"dup", 7), Rec(3, b"dup", 7), Rec(5, b"a5", 8)], 1)   # re-read: 2 duplicates
    feed("/t/a", "e1", [Rec(3, b"dup", 7)], 3)                                  # all duplicates
    feed("/t/b", "e2", [Rec(0, b"new epoch", 9), Rec(1, b"\xff", 10)], 0)      # epoch change
    feed("/t/c", "e1", [Rec(i, b"c%d" % i, i) for i in range(6)], 0)           # nobody watches; ring of 4
    await asyncio.sleep(0)   # the writer flushes on the next loop turn
    await asyncio.sleep(0.05)
    for s in subjects:
        for p_run, p_rec in zip(run_peers[s], rec_peers[s]):
            assert p_run.received() == p_rec.received()
            assert p_run.frames   # something did arrive
    assert run_peers["/t/a"][0].frames == expected_frames("/t/a", "e1", [Rec(0, b"a0", 5), Rec(2, b'"a2"', None),
                                                                         Rec(3, None, -3), Rec(5, b"a5", 8)], 0)
    for s in (*subjects, "/t/c"):
        assert ring_entries(by_run, s) == ring_entries(by_record, s)
        assert by_run.position(s) == by_record.position(s)
    assert by_run.bytes == by_record.bytes
    for name in ("records", "deliveries", "duplicates", "epoch_changes"):
        assert getattr(by_run.stats, name) == getattr(by_record.stats, name), name
    assert by_run.stats.duplicates == 3 and by_run.stats.epoch_changes == 1


async def test_deliver_run_feeds_a_recovery_in_flight(peers: Any) -> None:
    """A subject with a Pending (a replay under way) gets its live frames buffered, one by one."""
    hub = Hub(lambda s: "e1", 8, 1 << 20)
    hub.deliver_run("/t/p", "e1", [Rec(0, b"m0", 1)], 0, NOW)
    peer = await peers()
    pending = Pending(peer.conn, after_seq=1, buffering=True)
    hub.state("/t/p").add_pending(pending)
    hub.deliver_run("/t/p", "e1", [Rec(1, b"m1", 2), Rec(2, b"m2", 3)], 1, NOW)
    assert pending.buffer == [(2, encode_text(protocol.msg(Record("/t/p", b"m1", "e1", 2, 1, 2)))),
                              (3, encode_text(protocol.msg(Record("/t/p", b"m2", "e1", 3, 2, 3))))]
    assert hub.position("/t/p") == ("e1", 3)


def test_deliver_run_keeps_the_budget() -> None:
    """The memory budget is applied after each run: unwatched subjects are forgotten as with deliver()."""
    hub = Hub(lambda s: "e1", 100, 1 << 20, total_bytes=40_000)
    for i in range(200):
        hub.deliver_run(f"/t/s{i}", "e1", [Rec(j, b"v" * 100, j) for j in range(3)], 0, NOW)
    assert hub.bytes <= 40_000
    assert hub.stats.forgotten > 0
    assert "/t/s0" in hub.forgotten and hub.get("/t/s199") is not None
