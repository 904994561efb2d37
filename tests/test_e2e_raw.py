"""Frames no well-behaved library sends, over a raw socket: bad UTF-8, unmasked frames, reserved bits,
oversized headers, pings inside fragmented messages, a peer that never answers pings."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time

import pytest

from conftest import SCALE
from support.ws import client_frame, raw_upgrade, read_frames

pytestmark = pytest.mark.both_loops


def _connect(sock) -> None:
    sock.sendall(client_frame(0x1, json.dumps({"op": "connect"}).encode()))


def _close_code(frames) -> int | None:
    closes = [p for op, p in frames if op == 0x8]
    return struct.unpack("!H", closes[0][:2])[0] if closes and len(closes[0]) >= 2 else None


async def test_invalid_utf8_closes_1007(gateway_factory):
    gw = await gateway_factory()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(sock)
    sock.sendall(client_frame(0x1, b'{"op":"ping","id":"\xff\xfe"}'))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    texts = [json.loads(p) for op, p in frames if op == 0x1]
    assert texts[0]["op"] == "connected"
    assert _close_code(frames) == 1007
    sock.close()


async def test_unmasked_client_frame_closes_1002(gateway_factory):
    gw = await gateway_factory()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    sock.sendall(client_frame(0x1, json.dumps({"op": "connect"}).encode(), mask=False))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    assert _close_code(frames) == 1002
    sock.close()


async def test_peer_that_never_answers_pings_is_closed_1011(gateway_factory):
    gw = await gateway_factory(heartbeat_ms=100)
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(sock)
    frames = await asyncio.to_thread(read_frames, sock, 5)  # we read but never send a pong
    ops = [op for op, _ in frames]
    assert 0x9 in ops, "the server sends WebSocket pings"
    assert any(op == 0x1 and json.loads(p) == {"op": "hb"} for op, p in frames)
    assert _close_code(frames) == 1011
    sock.close()


def _answer_pings(sock, answers: int, timeout: float) -> tuple[list[float], list[tuple[int, bytes]]]:
    """Read server frames; answer the first `answers` pings with a pong, then go silent until the server
    closes. Returns, per ping, the seconds since our last frame to the server, and every frame after."""
    sock.settimeout(timeout)
    last_sent = time.monotonic()
    _connect(sock)
    gaps: list[float] = []
    after: list[tuple[int, bytes]] = []
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 2:  # server frames are unmasked; ours here are all under 64 KiB
            op, n, head = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                n, head = (int.from_bytes(buf[2:4], "big") if len(buf) >= 4 else 1 << 20), 4
            if len(buf) < head + n:
                break
            payload, buf = buf[head:head + n], buf[head + n:]
            if op == 0x9:
                gaps.append(time.monotonic() - last_sent)
                if len(gaps) <= answers:
                    last_sent = time.monotonic()  # before the send: the server hears it no earlier
                    sock.sendall(client_frame(0xA, payload))
                    continue
            if len(gaps) >= answers:
                after.append((op, payload))
    return gaps, after


async def test_pings_come_after_twice_heartbeat_of_input_silence_and_silence_is_closed_1011(gateway_factory):
    """A peer that only reads (a subscriber) is pinged once per 2 x heartbeat_ms of its silence, and a
    pong starts that over; once it stops answering it is closed 1011 (3 x after its last frame)."""
    hb = 0.3
    gw = await gateway_factory(heartbeat_ms=int(hb * 1000))
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    gaps, after = await asyncio.to_thread(_answer_pings, sock, 3, 20 * hb * SCALE)
    sock.close()
    assert len(gaps) >= 4, f"3 pings answered, then one more before the close: {gaps}"
    # the sweep runs every heartbeat_ms/4 and its clock is the loop's: a little slack below, none needed above
    assert all(g >= 2 * hb - 0.05 for g in gaps), f"a ping before 2 x heartbeat_ms of silence: {gaps}"
    assert _close_code(after) == 1011, after
    assert all(op != 0x8 for op, _ in after[:-1]), "closed only at the end"


async def test_client_close_is_answered(gateway_factory):
    gw = await gateway_factory()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(sock)
    sock.sendall(client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    assert _close_code(frames) == 1000
    sock.close()


async def test_reserved_bits_close_1002_and_other_clients_are_unaffected(gateway_factory):
    gw = await gateway_factory()
    good = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(good)
    bad = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(bad)
    bad.sendall(bytes([0xC1, 0x80]) + b"\0\0\0\0")  # RSV1 without a negotiated extension
    frames = await asyncio.to_thread(read_frames, bad, 5)
    assert _close_code(frames) == 1002
    good.sendall(client_frame(0x1, json.dumps({"op": "ping", "id": 1}).encode()))
    good.settimeout(5)
    data = b""
    while b'"pong"' not in data:
        chunk = await asyncio.to_thread(good.recv, 4096)
        assert chunk, "the well-behaved client was dropped"
        data += chunk
    bad.close()
    good.close()


async def test_oversized_frame_is_refused_from_its_header_1009(gateway_factory):
    gw = await gateway_factory(max_message_bytes=1024)
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(sock)
    # announce 1 GB and send nothing more: the gateway must not wait for (or buffer) the payload
    sock.sendall(bytes([0x81, 0x80 | 127]) + (10**9).to_bytes(8, "big") + os.urandom(4))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    assert _close_code(frames) == 1009
    sock.close()


async def test_fragments_with_a_ping_between_them_and_binary_refused(gateway_factory):
    gw = await gateway_factory()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(sock)
    text = json.dumps({"op": "ping", "id": "frag"}).encode()
    sock.sendall(client_frame(0x1, text[:4], fin=False) + client_frame(0x9, b"hello")
                 + client_frame(0x0, text[4:9], fin=False) + client_frame(0x0, text[9:]))
    sock.sendall(client_frame(0x2, b"\x00\x01"))
    sock.sendall(client_frame(0x8, struct.pack("!H", 4001)))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    texts = [json.loads(p) for op, p in frames if op == 0x1]
    assert texts[0]["op"] == "connected"
    assert (0xA, b"hello") in frames
    assert texts[1] == {"op": "pong", "id": "frag"}
    assert (texts[2]["op"], texts[2]["code"]) == ("error", "bad_request")
    assert _close_code(frames) == 4001  # the peer's close code is echoed
    sock.close()


async def test_first_frames_in_the_same_packet_as_the_upgrade(gateway_factory):
    gw = await gateway_factory()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 + client_frame(0x1, json.dumps({"op": "connect"}).encode())
                 + client_frame(0x1, json.dumps({"op": "ping", "id": 2}).encode())
                 + client_frame(0x8, struct.pack("!H", 1000)))
    data = b""
    while True:
        chunk = await asyncio.to_thread(sock.recv, 65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert b'"connected"' in rest and b'{"op":"pong","id":2}' in rest
    sock.close()


async def test_close_codes_a_client_chooses_do_not_become_metric_labels(gateway_factory):
    """A client's close code is echoed (RFC 6455 5.5.1) but counted under its own code only when it is
    one the gateway sends itself; any other valid code (1012-1014, 3000-4999) is `code="other"`: before,
    each was a label value of its own, about 2000 series one client could create."""
    import urllib.request

    from support.metrics import sample

    gw = await gateway_factory()
    codes = [3000, 3456, 4999, 4321, 1000]
    for code in codes:
        sock = await asyncio.to_thread(raw_upgrade, gw.port)
        _connect(sock)
        sock.sendall(client_frame(0x8, struct.pack("!H", code)))
        frames = await asyncio.to_thread(read_frames, sock, 5)
        assert _close_code(frames) == code  # still echoed
        sock.close()
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5 * SCALE) as resp:
            return resp.read().decode()

    text = await asyncio.to_thread(scrape)
    labels = {m for m in text.splitlines() if m.startswith("gateway_client_closes_total{")}
    assert labels == {'gateway_client_closes_total{code="1000"} 1.0',
                      'gateway_client_closes_total{code="other"} 4.0'}, labels
    assert sample(text, "gateway_client_closes_total", '{code="other"}') == 4
    # none of them is a close the gateway started
    assert not [m for m in text.splitlines() if m.startswith("gateway_closes_total{")], text


async def test_a_client_closing_with_a_gateway_code_is_not_counted_as_the_gateways_close(gateway_factory):
    """A client may close with 4000 or 1011 (both valid close codes): that is no slow consumer and no
    dead peer of the gateway's, and the operator's alerts on `gateway_closes_total{code="4000"}` must not
    fire for it. It counts in `gateway_client_closes_total`; the gateway's own 1008 still counts as its."""
    import urllib.request

    from support.metrics import sample

    gw = await gateway_factory()
    for code in (4000, 1011, 4000):
        sock = await asyncio.to_thread(raw_upgrade, gw.port)
        _connect(sock)
        sock.sendall(client_frame(0x8, struct.pack("!H", code)))
        frames = await asyncio.to_thread(read_frames, sock, 5)
        assert _close_code(frames) == code  # echoed
        sock.close()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)  # the gateway's close: binary before connect
    sock.sendall(client_frame(0x2, b"x"))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    assert _close_code(frames) == 1008
    sock.close()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5 * SCALE) as resp:
            return resp.read().decode()

    text = await asyncio.to_thread(scrape)
    assert sample(text, "gateway_client_closes_total", '{code="4000"}') == 2
    assert sample(text, "gateway_client_closes_total", '{code="1011"}') == 1
    gateway_closes = {m for m in text.splitlines() if m.startswith("gateway_closes_total{")}
    assert gateway_closes == {'gateway_closes_total{code="1008"} 1.0'}, gateway_closes
