"""Microbenchmarks of the compiled fanout modules against pure-Python baselines, in the same run.

    pip install ".[bench]"   # the package with its compiled fanout; the benchmarks never import the checkout
    python -P -m pytest benchmarks/test_fanout_bench.py   # -P: the checkout (cwd) stays off sys.path

Not collected by the normal test run (pyproject's testpaths is `tests`). The ratio table
(pure-python / ours, per group) is printed at the end by benchmarks/conftest.py.

- frame encode: fanout.encode_text vs a struct-based pure-Python encoder (what one would write
  without fanout), for 60 B, 1000 B and 70 000 B payloads (the three header forms);
- ring append: steady state (the ring is full, every append evicts), 100 appends per call;
- ring since(): recovery lookups 1, 10, 100 and 999 messages back in a full 1000-entry ring,
  and a position older than the window (answer None);
- inbound frames: WSConn.data_received of one read holding 100 masked 64-byte text frames (and of one
  64 KiB frame), each message handed to a no-op hook, vs the pure-Python twin of the same parser.
"""
from __future__ import annotations

import asyncio
import itertools
import struct

import pytest

import fanout
from fanout import _reference
from gateway_vs_websockets import mask_frame  # benchmarks/ is on the path (conftest.py)
from support.fake_transport import FakeTransport  # tests/ is on the path (pyproject pythonpath)

# Warm up each benchmark first: on this shared VM the first rounds of a run are often slower.
pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=20_000, min_time=0.0002)

if not fanout.COMPILED:  # FANOUT_NO_EXTENSIONS=1 would compare the twin with itself
    pytest.skip("fanout is not compiled (FANOUT_NO_EXTENSIONS=1?)", allow_module_level=True)

_H2 = struct.Struct("!BB").pack
_H4 = struct.Struct("!BBH").pack
_H10 = struct.Struct("!BBQ").pack


def py_encode_text(payload: bytes) -> bytes:
    """Pure-Python RFC 6455 unmasked text frame, with precompiled struct formats."""
    n = len(payload)
    if n <= 125:
        return _H2(0x81, n) + payload
    if n <= 0xFFFF:
        return _H4(0x81, 126, n) + payload
    return _H10(0x81, 127, n) + payload


ENCODERS = {"ours": fanout.encode_text, "pure-python": py_encode_text}
RINGS = {"ours": fanout.Ring, "pure-python": _reference.Ring}
IMPLS = ["ours", "pure-python"]

CAPACITY = 1000
FRAME = fanout.encode_text(b'{"op":"msg","subject":"/matches/football/5","content":"1:0"}')
APPENDS_PER_CALL = 100


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [60, 1000, 70_000])
def test_encode_text(benchmark, record, impl, size):
    payload = b"x" * size
    encode = ENCODERS[impl]
    assert encode(payload) == fanout.encode_text(payload)  # same bytes on the wire
    benchmark.group = f"encode_text {size} B"
    benchmark(encode, payload)
    record(benchmark, benchmark.group, impl)


def _full_ring(impl):
    ring = RINGS[impl](CAPACITY)
    for seq in range(1, CAPACITY + 1):
        ring.append(seq, seq - 1, 1_700_000_000_000 + seq, FRAME)
    return ring


@pytest.mark.parametrize("impl", IMPLS)
def test_ring_append(benchmark, record, impl):
    ring = _full_ring(impl)
    seqs = itertools.count(CAPACITY + 1)
    append = ring.append

    def run():
        for _ in range(APPENDS_PER_CALL):
            seq = next(seqs)
            append(seq, seq - 1, seq, FRAME)

    benchmark.group = "ring append (full, evicting)"
    benchmark(run)
    assert len(ring) == CAPACITY
    record(benchmark, benchmark.group, impl, per_call=APPENDS_PER_CALL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("back", [1, 10, 100, 999, "miss"])
def test_ring_since(benchmark, record, impl, back):
    ring = _full_ring(impl)
    if back == "miss":
        pos, want = 0, None  # the ring now starts at seq 2 (prev 1): nothing proves seq 1 is held
        ring.append(CAPACITY + 1, CAPACITY, 0, FRAME)  # evicts seq 1
    else:
        pos = ring.last_seq - back
        want = back
    got = ring.since(pos)
    assert (got is None) if want is None else (len(got) == want)
    benchmark.group = f"ring since ({back} back)" if back != "miss" else "ring since (too old: None)"
    benchmark(ring.since, pos)
    record(benchmark, benchmark.group, impl)


WSCONNS = {"ours": fanout.WSConn, "pure-python": _reference.WSConn}
WRITERS = {"ours": fanout.Writer, "pure-python": _reference.Writer}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ["100 x 64 B", "1 x 64 KiB"])
def test_inbound_frames(benchmark, record, impl, shape):
    count, size = (100, 64) if shape == "100 x 64 B" else (1, 65000)
    read = b"".join(mask_frame(0x1, b"x" * size) for _ in range(count))

    class Counting(WSCONNS[impl]):
        n = 0

        def __init__(self) -> None:  # the gateway's Session also takes its own arguments
            pass

        def ws_message(self, opcode, payload):
            Counting.n += 1

    loop = asyncio.new_event_loop()
    try:
        conn = Counting()
        conn.ws_open(WRITERS[impl](loop), FakeTransport(), 1 << 20, 1 << 20, None)
        conn.data_received(read)
        assert Counting.n == count
        benchmark.group = f"inbound frames ({shape}, one read)"
        benchmark(conn.data_received, read)
        record(benchmark, benchmark.group, impl)
    finally:
        loop.close()
