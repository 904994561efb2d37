"""A thin third-party client for tests: the `websockets` library plus JSON, written from PROTOCOL.md only."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))
WAIT = 5.0 * SCALE


async def open_ws(url: str, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", WAIT)
    return await connect(url, **kwargs)


async def send(ws: ClientConnection, obj: Any) -> None:
    await ws.send(json.dumps(obj))


async def recv(ws: ClientConnection, timeout: float = WAIT) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, str), f"protocol frames are text, got {type(data)}"
    obj = json.loads(data)
    assert isinstance(obj, dict) and isinstance(obj.get("op"), str)
    return obj


async def recv_until(ws: ClientConnection, op: str, timeout: float = WAIT,
                     skip: tuple[str, ...] = ("hb",)) -> dict[str, Any]:
    """The next frame with `op`, skipping heartbeats; any other frame fails the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        obj = await recv(ws, max(0.01, deadline - loop.time()))
        if obj["op"] == op:
            return obj
        assert obj["op"] in skip, f"expected {op}, got {obj}"


async def connected(url: str, token: str | None = None, **kwargs: Any) -> ClientConnection:
    ws = await open_ws(url, **kwargs)
    hello: dict[str, Any] = {"op": "connect", "client": "tests/1"}
    if token is not None:
        hello["token"] = token
    await send(ws, hello)
    reply = await recv(ws)
    assert reply["op"] == "connected", reply
    return ws


async def close_code(ws: ClientConnection, timeout: float = WAIT) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError("unreachable")


async def no_frame(ws: ClientConnection, skip: tuple[str, ...] = ("hb",)) -> None:
    """Assert that nothing (other than `skip` ops) is on its way to `ws`: a ping sentinel is answered
    with the very next frame. The gateway handles a connection's requests in order and queues every
    frame of a connection in order, so whatever it had queued before the ping arrives first. (A ring
    replay paced over several loop ticks is the one exception: read its messages before using this.)"""
    token = f"sentinel-{next(_sentinels)}"
    await send(ws, {"op": "ping", "id": token})
    while True:
        obj = await recv(ws)
        if obj["op"] not in skip:
            break
    assert obj == {"op": "pong", "id": token}, f"unexpected frame {obj}"


_sentinels = itertools.count(1)


UPGRADE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(port: int, path: str = "/ws", headers: str = "") -> bytes:
    """A WebSocket upgrade request head for 127.0.0.1:`port`; `headers`: extra lines, each ending in CRLF."""
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {UPGRADE_KEY}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").encode()


def read_head(sock: Any) -> bytes:
    """Read a response head (up to its blank line, or what came before the peer closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def raw_upgrade(port: int, path: str = "/ws", rcvbuf: int | None = None) -> socket.socket:
    """A raw TCP socket that did the HTTP upgrade by hand (for frames no library would send).
    `rcvbuf` is set before connecting, so the TCP window really is that small."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port, path))
    data = read_head(sock)
    assert data.startswith(b"HTTP/1.1 101"), data or "server closed during the handshake"
    return sock


def client_frame(opcode: int, payload: bytes, *, mask: bool = True, fin: bool = True) -> bytes:
    """Encode a client frame (masked unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frames(sock: socket.socket, timeout: float = WAIT) -> list[tuple[int, bytes]]:
    """Read server frames until the server closes or `timeout`; returns (opcode, payload) pairs."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    frames = []
    i = 0
    while i + 2 <= len(buf):
        op, n = buf[i] & 0x0F, buf[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = int.from_bytes(buf[i:i + 2], "big")
            i += 2
        elif n == 127:
            n = int.from_bytes(buf[i:i + 8], "big")
            i += 8
        frames.append((op, buf[i:i + n]))
        i += n
    return frames
