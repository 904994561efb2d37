"""Frames no well-behaved library sends, over a raw socket: bad UTF-8, unmasked frames, a peer that
never answers pings."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
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


async def test_client_close_is_answered(gateway_factory):
    gw = await gateway_factory()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    _connect(sock)
    sock.sendall(client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
    frames = await asyncio.to_thread(read_frames, sock, 5)
    assert _close_code(frames) == 1000
    sock.close()
