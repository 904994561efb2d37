"""A small asyncio TCP proxy for outage tests: 127.0.0.1:port -> target, with cut() and restore().

cut() drops every live connection (RST) and makes new ones close as soon as they are accepted,
so clients see the peer as unreachable; restore() lets connections through again.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._cut = False
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.refused = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        self._cut = True
        for client, upstream in list(self._conns):
            client.transport.abort()
            upstream.transport.abort()

    def restore(self) -> None:
        self._cut = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # stop() cancels handlers; a cancelled handler makes asyncio.start_server's done-callback log
        # "Exception in callback" (Python < 3.12 calls task.exception() on it), so end normally.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self._cut:
                self.refused += 1
                return
            try:
                up_reader, upstream = await asyncio.open_connection(*self.target)
            except OSError:
                self.refused += 1
                return
            if self._cut:   # cut while connecting
                self.refused += 1
                return
            self.accepted += 1
            conn = (writer, upstream)
            self._conns.add(conn)
            try:
                await asyncio.gather(self._pump(reader, upstream, writer),
                                     self._pump(up_reader, writer, upstream))
            finally:
                self._conns.discard(conn)
        finally:
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
            self._handlers.discard(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, other: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side is gone: drop the whole connection (Kafka clients never half-close).
            with contextlib.suppress(Exception):
                dst.transport.abort()
            with contextlib.suppress(Exception):
                other.transport.abort()
