"""Subscribers for tests that drive the hub directly (no gateway): real fanout Conns on one end of a
socketpair, the frames that reach the other end decoded with support.fanout_ws."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fanout import Conn, Writer
from support.fanout_ws import decode_stream


class SocketpairPeer:
    """A real Conn on one end of a socketpair; `read()` decodes what reached the other end."""

    def __init__(self, conn: Conn, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        self._buf = b""
        self.payloads: list[bytes] = []

    def read(self) -> list[bytes]:
        """The payloads of every frame received so far (reads what is there, without blocking)."""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            self._buf += data
        frames, self._buf = decode_stream(self._buf)
        self.payloads += [f.payload for f in frames]
        return self.payloads


P = TypeVar("P", bound=SocketpairPeer)


@asynccontextmanager
async def socketpair_peers(peer_type: type[P]) -> AsyncIterator[Callable[[], Awaitable[P]]]:
    """A maker of peers on one fanout Writer (unbounded buffers); closes every peer's both ends at the end."""
    loop = asyncio.get_running_loop()
    writer = Writer(loop)
    made: list[tuple[P, asyncio.BaseTransport]] = []

    async def make() -> P:
        a, b = socket.socketpair()
        b.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        peer = peer_type(Conn(writer, transport, 1 << 30, lambda conn: None), b)  # type: ignore[arg-type]
        made.append((peer, transport))
        return peer

    try:
        yield make
    finally:
        for peer, transport in made:
            transport.close()
            peer.sock.close()
