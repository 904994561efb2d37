"""fanout.WSConn: client frames in (RFC 6455 5.2-5.5), events out; compiled and reference side by side.

Frames are fed as bytes, split anywhere; the hooks record what the gateway's Session would be told.
Pongs come out through the Conn queue, so a fake transport (no socket: everything goes through
transport.write) collects them.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import fanout_impls
from support.fake_transport import FakeTransport
from support.ws import client_frame


@pytest.fixture(params=fanout_impls.IMPL_PARAMS)
def impl(request):
    return fanout_impls.load(request.param)


def make(impl, loop, *, max_message=1 << 20, opened=True, max_fragments=1024, max_pongs=16, pause_on=None):
    class Recorder(impl.WSConn):
        def __init__(self) -> None:
            self.events = []

        def http_received(self, data):
            self.events.append(("http", bytes(data)))

        def ws_message(self, opcode, payload):
            self.events.append(("msg", opcode, payload))
            if payload == pause_on:
                self.ws_pause_input()

        def ws_close(self, code, reason):
            self.events.append(("close", code, reason))

        def ws_fail(self, code, reason):
            self.events.append(("fail", code))

    conn = Recorder()
    tr = FakeTransport()
    writer = impl.Writer(loop)
    if opened:
        conn.ws_open(writer, tr, 1 << 20, max_message, lambda c: None, b"", max_fragments, max_pongs)
    return conn, tr, writer


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        out.append((op, bytes(data[i:i + n])))
        i += n
    return out


def feed_split(conn, data: bytes, cuts) -> None:
    pos = 0
    for cut in sorted(set(cuts)):
        if pos < cut < len(data):
            conn.data_received(data[pos:cut])
            pos = cut
    conn.data_received(data[pos:])


async def test_one_text_frame_fed_a_byte_at_a_time(impl):
    conn, _, _ = make(impl, asyncio.get_running_loop())
    frame = client_frame(0x1, b'{"op":"ping"}')
    for i in range(len(frame)):
        conn.data_received(frame[i:i + 1])
    assert conn.events == [("msg", 1, b'{"op":"ping"}')]


async def test_length_forms_and_unmasking(impl):
    conn, _, _ = make(impl, asyncio.get_running_loop())
    payloads = [b"", b"a" * 125, b"b" * 126, bytes(range(256)) * 256, os.urandom(70000)]
    conn.data_received(b"".join(client_frame(0x2, p) for p in payloads))
    assert conn.events == [("msg", 2, p) for p in payloads]


@pytest.mark.parametrize("chunk", [1, 7, 1000, 65536])
async def test_large_and_small_frames_across_reads(impl, chunk):
    conn, _, _ = make(impl, asyncio.get_running_loop())
    payloads = [os.urandom(70000), *(bytes([i]) * i for i in range(1, 12)), os.urandom(300)]
    wire = b"".join(client_frame(0x2, p) for p in payloads)
    for i in range(0, len(wire), chunk):
        conn.data_received(wire[i:i + chunk])
    assert conn.events == [("msg", 2, p) for p in payloads]


async def test_bytes_before_ws_open_go_to_http_and_rest_is_parsed(impl):
    loop = asyncio.get_running_loop()
    conn, tr, writer = make(impl, loop, opened=False)
    conn.data_received(b"GET / HTTP/1.1\r\n")
    assert conn.ws_state is impl.WSState.HTTP
    y = client_frame(0x1, b"y")
    conn.ws_open(writer, tr, 1 << 20, 100, lambda c: None, client_frame(0x1, b"x") + y[:3])
    conn.data_received(y[3:])
    assert conn.events == [("http", b"GET / HTTP/1.1\r\n"), ("msg", 1, b"x"), ("msg", 1, b"y")]
    with pytest.raises(RuntimeError):
        conn.ws_open(writer, tr, 1 << 20, 100, lambda c: None)


async def test_ping_is_answered_in_order_and_pong_ignored(impl):
    loop = asyncio.get_running_loop()
    conn, tr, writer = make(impl, loop)
    conn.send(b"\x81\x01A")  # something already queued: the pong goes behind it
    conn.data_received(client_frame(0x9, b"p1") + client_frame(0xA, b"ignored") + client_frame(0x9, b""))
    writer.flush()
    assert server_frames(bytes(tr.out)) == [(1, b"A"), (0xA, b"p1"), (0xA, b"")]
    assert conn.events == []


async def test_fragmented_message_with_a_ping_inside(impl):
    loop = asyncio.get_running_loop()
    conn, tr, writer = make(impl, loop)
    data = (client_frame(0x1, b"he", fin=False) + client_frame(0x0, b"l", fin=False) + client_frame(0x9, b"!")
            + client_frame(0x0, b"lo", fin=True) + client_frame(0x1, b"next"))
    conn.data_received(data)
    writer.flush()
    assert conn.events == [("msg", 1, b"hello"), ("msg", 1, b"next")]
    assert server_frames(bytes(tr.out)) == [(0xA, b"!")]


async def test_close_frames(impl):
    loop = asyncio.get_running_loop()
    conn, _, _ = make(impl, loop)
    conn.data_received(client_frame(0x8, struct.pack("!H", 4001) + "bye é".encode()) + client_frame(0x1, b"late"))
    assert conn.events == [("close", 4001, "bye é")]
    conn, _, _ = make(impl, loop)
    conn.data_received(client_frame(0x8, b""))
    assert conn.events == [("close", 1005, "")]
    assert conn.events[0][1] == impl.CloseCode.NO_STATUS


BAD = [
    ("reserved bits", bytes([0xC1, 0x80]) + b"\0\0\0\0", 1002),
    ("unknown opcode", client_frame(0x3, b"x"), 1002),
    ("unknown control opcode", client_frame(0xB, b"x"), 1002),
    ("unmasked", client_frame(0x1, b"x", mask=False), 1002),
    ("fragmented ping", client_frame(0x9, b"x", fin=False), 1002),
    ("long ping", client_frame(0x9, b"x" * 126), 1002),
    ("orphan continuation", client_frame(0x0, b"x"), 1002),
    ("message inside a fragmented one", client_frame(0x1, b"a", fin=False) + client_frame(0x1, b"b"), 1002),
    ("64-bit length with MSB set", bytes([0x82, 0xFF]) + b"\x80" + b"\0" * 7 + b"\0\0\0\0", 1002),
    ("1-byte close", client_frame(0x8, b"\x03"), 1002),
    ("reserved close code 1005", client_frame(0x8, struct.pack("!H", 1005)), 1002),
    ("close code 999", client_frame(0x8, struct.pack("!H", 999)), 1002),
    ("close code 2000", client_frame(0x8, struct.pack("!H", 2000)), 1002),
    ("close code 5000", client_frame(0x8, struct.pack("!H", 5000)), 1002),
    ("close reason not UTF-8", client_frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),
]


@pytest.mark.parametrize("data,code", [pytest.param(d, c, id=name) for name, d, c in BAD])
async def test_violations_fail_once_and_silence_the_input(impl, data, code):
    conn, _, _ = make(impl, asyncio.get_running_loop())
    conn.data_received(data + client_frame(0x1, b"after"))
    conn.data_received(client_frame(0x1, b"later"))
    assert conn.events == [("fail", code)]
    assert conn.ws_state is impl.WSState.DONE


async def test_oversized_frame_is_refused_from_its_header(impl):
    conn, _, _ = make(impl, asyncio.get_running_loop(), max_message=1000)
    conn.data_received(bytes([0x81, 0x80 | 127]) + (10**9).to_bytes(8, "big"))  # no payload sent at all
    assert conn.events == [("fail", 1009)]
    conn, _, _ = make(impl, asyncio.get_running_loop(), max_message=1000)
    conn.data_received(client_frame(0x1, b"x" * 1000))  # exactly the limit is fine
    conn.data_received(client_frame(0x1, b"x" * 600, fin=False) + client_frame(0x0, b"x" * 401))
    assert conn.events == [("msg", 1, b"x" * 1000), ("fail", 1009)]


async def test_stop_input(impl):
    conn, _, _ = make(impl, asyncio.get_running_loop())
    conn.data_received(client_frame(0x1, b"abc")[:4])
    conn.ws_stop_input()
    conn.data_received(client_frame(0x1, b"abc")[4:] + client_frame(0x1, b"x"))
    assert conn.events == [] and conn.ws_state is impl.WSState.DONE


messages = st.lists(
    st.tuples(st.sampled_from([0x1, 0x2]), st.binary(max_size=300), st.integers(1, 4), st.booleans()),
    max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=messages, cuts=st.lists(st.integers(0, 6000), max_size=12))
def test_any_fragmentation_and_any_split_give_the_same_messages(impl, msgs, cuts):
    loop = asyncio.new_event_loop()
    try:
        conn, tr, writer = make(impl, loop)
        wire, pings = b"", []
        for i, (op, payload, parts, ping) in enumerate(msgs):
            size = -(-len(payload) // parts) if payload else 1
            chunks = [payload[j:j + size] for j in range(0, len(payload), size)] or [b""]
            for k, chunk in enumerate(chunks):
                wire += client_frame(op if k == 0 else 0x0, chunk, fin=k == len(chunks) - 1)
                if ping and k == 0:
                    pings.append(str(i).encode())
                    wire += client_frame(0x9, pings[-1])
        feed_split(conn, wire, cuts)
        writer.flush()
        assert conn.events == [("msg", op, payload) for op, payload, _, _ in msgs]
        assert server_frames(bytes(tr.out)) == [(0xA, p) for p in pings]
    finally:
        loop.close()


async def test_message_in_more_fragments_than_the_limit_fails_1009(impl):
    conn, _, writer = make(impl, asyncio.get_running_loop(), max_fragments=4)

    def fragmented(n: int) -> bytes:
        parts = [client_frame(0x1 if i == 0 else 0x0, b"ab", fin=(i == n - 1)) for i in range(n)]
        return b"".join(parts)

    conn.data_received(fragmented(4))
    assert conn.events == [("msg", 1, b"ab" * 4)]
    conn.data_received(fragmented(5))
    assert conn.events[1:] == [("fail", 1009)]
    assert writer.fragment_limit_hits == 1
    conn.data_received(fragmented(2))  # input is ignored after the failure
    assert len(conn.events) == 2


async def test_ping_flood_gets_at_most_max_pongs_until_the_queue_drains(impl):
    conn, tr, writer = make(impl, asyncio.get_running_loop(), max_pongs=3)
    conn.data_received(b"".join(client_frame(0x9, b"%d" % i) for i in range(100)))
    writer.flush()
    assert server_frames(bytes(tr.out)) == [(0xA, b"0"), (0xA, b"1"), (0xA, b"2")]
    assert writer.pongs_dropped == 97
    tr.out.clear()
    conn.data_received(client_frame(0x9, b"next"))  # the pongs owed were written: answered again
    writer.flush()
    assert server_frames(bytes(tr.out)) == [(0xA, b"next")]
    assert conn.events == []


@pytest.mark.parametrize("cut", [0, 1, 9, 20, 31])
async def test_paused_input_holds_the_rest_and_resume_parses_it_in_order(impl, cut):
    conn, tr, _ = make(impl, asyncio.get_running_loop(), pause_on=b"stop")
    payloads = [b"a", b"stop", b"b", b"c" * 300, b"stop", b"d"]
    wire = b"".join(client_frame(0x1, p) for p in payloads)
    conn.data_received(wire[:cut])
    conn.data_received(wire[cut:])
    assert [e[2] for e in conn.events] == [b"a", b"stop"]
    assert conn.ws_input_paused and not tr.reading
    conn.data_received(client_frame(0x1, b"late"))  # a transport may deliver what it had read
    assert len(conn.events) == 2
    conn.ws_resume_input()
    assert [e[2] for e in conn.events] == [b"a", b"stop", b"b", b"c" * 300, b"stop"]
    assert conn.ws_input_paused and not tr.reading
    conn.ws_resume_input()
    assert [e[2] for e in conn.events] == [*payloads, b"late"]
    assert not conn.ws_input_paused and tr.reading
    conn.ws_resume_input()  # idempotent
    conn.data_received(client_frame(0x1, b"after"))
    assert conn.events[-1] == ("msg", 1, b"after")
