"""Real connections from a real event loop for the fanout writer tests.

The gateway side is a protocol that forwards pause_writing/resume_writing to
its Conn, exactly as the gateway must; the client side is a protocol that can
stall (pause_reading) so the kernel buffers fill and writes hit EAGAIN.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop

from support import fanout_tls
from support.waits import WAIT

SMALL_BUF = 4096

LOOP_PARAMS = [
    pytest.param(uvloop.new_event_loop, id="uvloop"),
    pytest.param(asyncio.SelectorEventLoop, id="asyncio"),
]
KINDS = ["socketpair", "tcp", "tls"]

T = TypeVar("T")


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` on a fresh loop from ``loop_factory``, bounded by WAIT * 3."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), WAIT * 3)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())


async def _wait_signalled(cond: Callable[[], bool], event: asyncio.Event, what: str) -> None:
    """Wait for `cond`, tested again each time `event` is set (no polling); bounded by WAIT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not cond():
        event.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        try:
            await asyncio.wait_for(event.wait(), remaining)
        except TimeoutError:
            pass


class GatewayProtocol(asyncio.Protocol):
    """What the gateway's protocol must do for fanout: create the Conn, forward flow control."""

    def __init__(self, make_conn: Callable[[asyncio.Transport], Any], sndbuf: int | None) -> None:
        self.make_conn = make_conn
        self.sndbuf = sndbuf
        self.conn: Any = None
        self.transport: asyncio.Transport | None = None
        self.pauses = 0
        self.resumes = 0
        loop = asyncio.get_running_loop()
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        try:
            if self.sndbuf:
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            self.conn = self.make_conn(transport)  # type: ignore[arg-type]
        except BaseException as exc:
            self.made.set_exception(exc)
            raise
        self.made.set_result(None)

    def pause_writing(self) -> None:
        self.pauses += 1
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.resumes += 1
        if self.conn is not None:
            self.conn.resume_writing()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.close()
        if not self.lost.done():
            self.lost.set_result(exc)


class Reader(asyncio.Protocol):
    """The client: collects every byte; ``stall()`` stops reading so the sender's buffers fill."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.done = False
        self.event = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.event.set()

    def eof_received(self) -> bool:
        self.done = True
        self.event.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.event.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    def stall(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def unstall(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    async def wait_bytes(self, n: int) -> None:
        await _wait_signalled(lambda: len(self.data) >= n or self.done, self.event, f"{n} bytes")
        assert len(self.data) >= n, f"connection ended after {len(self.data)} of {n} bytes"

    async def wait_done(self) -> None:
        await _wait_signalled(lambda: self.done, self.event, "the end of the stream")


class Net:
    """Opens gateway<->client connection pairs of one kind and closes them all at the end."""

    def __init__(self, kind: str, small: bool = True) -> None:
        assert kind in KINDS
        self.kind = kind
        self.small = small
        self.pairs: list[tuple[GatewayProtocol, Reader]] = []
        self._protocols: list[GatewayProtocol | Reader] = []
        self._server: asyncio.Server | None = None
        self._accepted: asyncio.Queue[GatewayProtocol] = asyncio.Queue()
        self._make_conn: Callable[[asyncio.Transport], Any] | None = None
        self._client_ssl: ssl.SSLContext | None = None

    async def __aenter__(self) -> Net:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _gateway_factory(self) -> GatewayProtocol:
        assert self._make_conn is not None
        proto = GatewayProtocol(self._make_conn, SMALL_BUF if self.small else None)
        self._protocols.append(proto)
        self._accepted.put_nowait(proto)
        return proto

    def _reader_factory(self) -> Reader:
        reader = Reader()
        self._protocols.append(reader)
        return reader

    async def open(self, make_conn: Callable[[asyncio.Transport], Any]) -> tuple[GatewayProtocol, Reader]:
        """A connected pair; ``make_conn(transport)`` builds the Conn in connection_made."""
        loop = asyncio.get_running_loop()
        self._make_conn = make_conn
        if self.kind == "socketpair":
            a, b = socket.socketpair()
            if self.small:
                a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
                b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
            _, reader = await loop.create_unix_connection(self._reader_factory, sock=b)
            # The server side is opened second so that its first writes find the peer ready.
            await loop.create_unix_connection(self._gateway_factory, sock=a)
        else:
            if self._server is None:
                server_ssl = None
                if self.kind == "tls":
                    server_ssl, self._client_ssl = fanout_tls.contexts()
                self._server = await loop.create_server(self._gateway_factory, "127.0.0.1", 0, ssl=server_ssl)
            port = self._server.sockets[0].getsockname()[1]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if self.small:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", port))
            except BaseException:
                s.close()
                raise
            # Closed by its transport from here on.
            ssl_args: dict[str, Any] = {}
            if self.kind == "tls":
                ssl_args = {"ssl": self._client_ssl, "server_hostname": "127.0.0.1"}
            _, reader = await loop.create_connection(self._reader_factory, sock=s, **ssl_args)
        gw = await asyncio.wait_for(self._accepted.get(), WAIT)
        # connection_made may come a loop iteration later (uvloop), or after the TLS handshake.
        await asyncio.wait_for(asyncio.shield(gw.made), WAIT)
        self.pairs.append((gw, reader))
        return gw, reader

    async def aclose(self) -> None:
        for proto in self._protocols:
            if proto.transport is not None and not proto.lost.done():
                proto.transport.abort()
        for proto in self._protocols:
            if proto.transport is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(proto.lost), WAIT)
                except TimeoutError:
                    pass
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
