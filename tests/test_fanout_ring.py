"""The recovery ring: against a plain-list model, and against the full history it is a window of."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support import fanout_impls


@pytest.fixture(scope="module", params=fanout_impls.IMPL_PARAMS)
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return fanout_impls.load(request.param)


def frame(seq: int, size: int = 4) -> bytes:
    return (b"%d:" % seq).ljust(size, b".")


@dataclass
class Model:
    """The ring's contract, written as plainly as possible."""

    capacity: int
    max_bytes: int
    entries: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    last_seq: int = 0

    def append(self, seq: int, prev: int, ts: int, data: bytes) -> None:
        if seq <= self.last_seq or prev < -1 or prev >= seq:
            raise ValueError
        if self.entries and prev >= 0 and prev != self.last_seq:
            self.entries = []  # a proven gap: nothing older can be chained to this entry
        self.entries.append((seq, prev, ts, data))
        self.last_seq = seq
        while len(self.entries) > self.capacity or (
            len(self.entries) > 1 and sum(len(e[3]) for e in self.entries) > self.max_bytes
        ):
            del self.entries[0]

    def since(self, seq: int) -> list[bytes] | None:
        if seq >= self.last_seq:
            return []
        if not self.entries:
            return None
        first_seq, first_prev = self.entries[0][:2]
        if seq >= first_seq or (first_prev >= 0 and seq >= first_prev):
            return [e[3] for e in self.entries if e[0] > seq]
        return None


def assert_same(ring: Any, model: Model) -> None:
    assert len(ring) == len(model.entries)
    assert ring.last_seq == model.last_seq
    assert ring.first_seq == (model.entries[0][0] if model.entries else 0)
    assert ring.nbytes == sum(len(e[3]) for e in model.entries)
    assert ring.last() == (model.entries[-1] if model.entries else None)
    for q in range(-2, model.last_seq + 3):
        assert ring.since(q) == model.since(q), q


# One op = (seq step, how prev is given, frame size). "wrong" gives a prev that is
# not the last seq: a gap, or nonsense that must be refused.
ops = st.lists(
    st.tuples(st.integers(-1, 4), st.sampled_from(["last", "last", "last", "unknown", "wrong"]), st.integers(0, 12)),
    max_size=80,
)


@given(capacity=st.integers(1, 40), max_bytes=st.sampled_from([0, 5, 20, 60, 2**62]), script=ops, data=st.data())
def test_matches_list_model(impl: SimpleNamespace, capacity: int, max_bytes: int, script: list[Any],
                            data: st.DataObject) -> None:
    ring = impl.Ring(capacity, max_bytes)
    model = Model(capacity, max_bytes)
    assert ring.capacity == capacity and ring.max_bytes == max_bytes
    for step, how, size in script:
        seq = model.last_seq + step
        if how == "last":
            prev = model.last_seq
        elif how == "unknown":
            prev = -1
        else:
            prev = data.draw(st.integers(-3, seq + 1), label="prev")
        payload = frame(seq, size)
        try:
            model.append(seq, prev, seq * 10, payload)
        except ValueError:
            with pytest.raises(ValueError):
                ring.append(seq, prev, seq * 10, payload)
        else:
            ring.append(seq, prev, seq * 10, payload)
        assert_same(ring, model)


@given(
    capacity=st.integers(1, 40),
    max_bytes=st.sampled_from([8, 40, 2**62]),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=70),
    start=st.integers(0, 5),
    feeding=st.lists(st.sampled_from(["known", "known", "known", "unknown", "skip"]), min_size=70, max_size=70),
)
def test_since_never_hides_a_message(
    impl: SimpleNamespace, capacity: int, max_bytes: int, steps: list[int], start: int, feeding: list[str]
) -> None:
    """Whatever since() returns is exactly the subject's history after the position."""
    seqs = []
    seq = 0
    for step in steps:
        seq += step
        seqs.append(seq)
    ring = impl.Ring(capacity, max_bytes)
    fed_previous = False
    for i, seq in enumerate(seqs):
        if i < start:
            continue
        how = feeding[i]
        true_prev = seqs[i - 1] if i else 0
        if how == "skip" and i + 1 < len(seqs):
            fed_previous = False
            continue
        # "unknown" is only honest right after a message that was fed (or for the first one):
        # the caller promises it hands over every message it sees, in order.
        prev = -1 if how == "unknown" and (fed_previous or len(ring) == 0) else true_prev
        ring.append(seq, prev, 0, frame(seq))
        fed_previous = True
        history = seqs[: i + 1]
        for q in range(-1, seq + 2):
            got = ring.since(q)
            if got is not None:
                assert got == [frame(s) for s in history if s > q], q
            if q >= ring.first_seq:
                assert got is not None, q


def test_empty_ring(impl: SimpleNamespace) -> None:
    ring = impl.Ring(3)
    assert (len(ring), ring.first_seq, ring.last_seq, ring.nbytes, ring.last()) == (0, 0, 0, 0, None)
    assert ring.since(0) == []
    assert ring.since(7) == []
    assert ring.since(-1) is None


def test_wrap_around_and_too_old(impl: SimpleNamespace) -> None:
    ring = impl.Ring(5)
    for seq in range(1, 24):
        ring.append(seq, seq - 1, 1000 + seq, frame(seq))
    assert (len(ring), ring.first_seq, ring.last_seq) == (5, 19, 23)
    assert ring.since(18) == [frame(s) for s in range(19, 24)]  # 19's prev is 18: provably complete
    assert ring.since(17) is None
    assert ring.since(20) == [frame(21), frame(22), frame(23)]
    assert ring.since(23) == []
    assert ring.since(99) == []
    assert ring.last() == (23, 22, 1023, frame(23))


def test_growth_past_the_first_allocation(impl: SimpleNamespace) -> None:
    ring = impl.Ring(100)
    for seq in range(1, 61):
        ring.append(seq, seq - 1, 0, frame(seq))
    assert ring.since(0) == [frame(s) for s in range(1, 61)]
    for seq in range(61, 131):
        ring.append(seq, seq - 1, 0, frame(seq))
    assert ring.since(30) == [frame(s) for s in range(31, 131)]
    assert ring.since(29) is None


def test_eviction_by_bytes_keeps_the_newest(impl: SimpleNamespace) -> None:
    ring = impl.Ring(10, max_bytes=10)
    for seq in range(1, 5):
        ring.append(seq, seq - 1, 0, frame(seq, 4))
    assert (len(ring), ring.nbytes, ring.first_seq) == (2, 8, 3)
    big = frame(5, 50)
    ring.append(5, 4, 0, big)
    assert (len(ring), ring.nbytes, ring.first_seq) == (1, 50, 5)
    assert ring.since(4) == [big]
    assert ring.since(3) is None


def test_unknown_prev(impl: SimpleNamespace) -> None:
    ring = impl.Ring(10)
    ring.append(41, -1, 0, frame(41))
    ring.append(42, 41, 0, frame(42))
    assert ring.since(40) is None  # 41 may have had a predecessor we never saw
    assert ring.since(41) == [frame(42)]
    ring2 = impl.Ring(10)
    ring2.append(41, 37, 0, frame(41))
    assert ring2.since(37) == [frame(41)]  # nothing exists between 37 and 41
    assert ring2.since(36) is None


def test_known_gap_drops_what_cannot_be_chained(impl: SimpleNamespace) -> None:
    ring = impl.Ring(10)
    for seq in (1, 2, 3):
        ring.append(seq, seq - 1, 0, frame(seq))
    ring.append(7, 5, 0, frame(7))  # 4 and 5 were never appended
    assert (len(ring), ring.first_seq) == (1, 7)
    assert ring.since(5) == [frame(7)]
    assert ring.since(3) is None
    assert ring.since(2) is None


def test_bad_appends_change_nothing(impl: SimpleNamespace) -> None:
    ring = impl.Ring(4)
    ring.append(5, 4, 0, frame(5))
    for args, exc in [
        ((5, 4, 0, b"x"), ValueError),
        ((4, 3, 0, b"x"), ValueError),
        ((6, 6, 0, b"x"), ValueError),
        ((6, -2, 0, b"x"), ValueError),
        ((6, 5, 0, "x"), TypeError),
        ((6, 5, 0, None), TypeError),
        ((6.0, 5, 0, b"x"), TypeError),
        ((2**63, 5, 0, b"x"), OverflowError),
    ]:
        with pytest.raises(exc):
            ring.append(*args)
    assert (len(ring), ring.last_seq, ring.last()) == (1, 5, (5, 4, 0, frame(5)))


def test_constructor_checks(impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError):
        impl.Ring(0)
    with pytest.raises(ValueError):
        impl.Ring(3, -1)
    with pytest.raises(TypeError):
        impl.Ring(2.5)
    assert impl.Ring(3).max_bytes == 2**62


@pytest.mark.skipif(fanout_impls.NO_EXTENSIONS, reason="FANOUT_NO_EXTENSIONS=1")
@given(capacity=st.integers(1, 20), max_bytes=st.sampled_from([6, 30, 2**62]), script=ops, data=st.data())
def test_parity_with_reference(capacity: int, max_bytes: int, script: list[Any], data: st.DataObject) -> None:
    rings = [fanout_impls.load(name).Ring(capacity, max_bytes) for name in ("compiled", "reference")]

    def observe(ring: Any) -> Any:
        return (len(ring), ring.first_seq, ring.last_seq, ring.nbytes, ring.last(),
                [ring.since(q) for q in range(-1, ring.last_seq + 2)])

    last = 0
    for step, how, size in script:
        seq = last + step
        prev = {"last": last, "unknown": -1}.get(how)
        if prev is None:
            prev = data.draw(st.integers(-3, seq + 1), label="prev")
        outcomes: list[type[Exception] | None] = []
        for ring in rings:
            try:
                ring.append(seq, prev, -seq, frame(seq, size))
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1]
        last = rings[0].last_seq
        assert observe(rings[0]) == observe(rings[1])


def test_trim_drops_the_oldest_and_keeps_positions(impl: SimpleNamespace) -> None:
    ring = impl.Ring(100)
    for seq in range(1, 11):
        ring.append(seq, seq - 1, 0, frame(seq))
    ring.trim(3)
    assert (len(ring), ring.first_seq, ring.last_seq, ring.nbytes) == (3, 8, 10, 12)
    assert ring.since(7) == [frame(8), frame(9), frame(10)]
    assert ring.since(6) is None
    ring.trim(5)  # already within: nothing changes
    assert len(ring) == 3
    ring.trim(0)
    assert (len(ring), ring.last_seq, ring.nbytes, ring.last()) == (0, 10, 0, None)
    assert ring.since(10) == [] and ring.since(9) is None
    ring.append(11, 10, 0, frame(11))  # still chained to the trimmed history
    assert ring.since(10) == [frame(11)]
    with pytest.raises(ValueError):
        ring.trim(-1)


_FAILED_GROW = r"""
import sys
import _testcapi
from fanout import COMPILED, Ring

assert COMPILED == (sys.argv[1] == "compiled"), COMPILED
frame = b"0123456789"
failures = 0
for nth in range(80):   # fail the nth allocation of one append that has to grow the ring
    ring = Ring(1000)
    for seq in range(1, 17):   # full at 16 entries (a power of two): the 17th grows it
        ring.append(seq, seq - 1, 0, frame)
    _testcapi.set_nomemory(nth, nth + 1)
    try:
        ring.append(17, 16, 0, frame)
        appended = 1
    except MemoryError:
        appended = 0
    finally:
        _testcapi.remove_mem_hooks()
    failures += 1 - appended
    held = list(range(1, 17 + appended))
    # intact: every seq readable, every frame there, and it keeps growing (and is freed) normally
    assert [ring.seq_at(i) for i in range(len(ring))] == held, (nth, [ring.seq_at(i) for i in range(len(ring))])
    assert ring.since(0) == [frame] * len(held) and ring.first_seq == 1
    for seq in range(held[-1] + 1, 40):
        ring.append(seq, seq - 1, 0, frame)
    assert [ring.seq_at(i) for i in range(len(ring))] == list(range(1, 40))
    del ring
assert failures, "no allocation of the growing append was made to fail"
print("ok", failures)
"""


def test_failed_allocation_while_growing_leaves_the_ring_intact(impl: SimpleNamespace, tmp_path: Any) -> None:
    """Every allocation of an append that grows the ring is made to fail in turn (CPython's
    _testcapi.set_nomemory); the debug allocator (PYTHONMALLOC=debug) turns a read of freed memory
    into garbage seqs and a double free into an abort, so a ring left pointing at a freed array fails."""
    import subprocess
    import sys

    pytest.importorskip("_testcapi")
    env = dict(os.environ, PYTHONMALLOC="debug")
    if impl.name == "reference":
        env["FANOUT_NO_EXTENSIONS"] = "1"
    else:
        env.pop("FANOUT_NO_EXTENSIONS", None)
    # cwd: not the checkout, so the installed fanout runs
    proc = subprocess.run([sys.executable, "-c", _FAILED_GROW, impl.name], env=env, capture_output=True,
                          text=True, errors="replace", timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok ")


def test_append_returns_the_change_in_footprint(impl: SimpleNamespace) -> None:
    ring = impl.Ring(3, max_bytes=20)
    assert ring.append(1, 0, 0, frame(1, 6), 100) == 106
    assert ring.append(2, 1, 0, frame(2, 6)) == 6                 # entry_overhead defaults to 0
    assert ring.append(3, 2, 0, frame(3, 6), 100) == 106
    assert ring.append(4, 3, 0, frame(4, 6), 100) == 0            # full: the oldest goes
    assert ring.append(5, 4, 0, frame(5, 15), 100) == 15 - 18 - 200   # full, then over max_bytes: all three go
    assert (len(ring), ring.nbytes) == (1, 15)
    assert ring.append(9, 7, 0, frame(9, 4), 100) == 4 - 15       # a proven gap drops the rest
