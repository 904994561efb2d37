"""A scripted fake gateway for client tests: a `websockets` server on 127.0.0.1:0.

The test body drives each accepted connection: `conn = await gw.accept()`, then
`await conn.handshake()`, `await conn.expect("subscribe")`, `await conn.send({...})`,
`await conn.close(1008)`. Connections stay open until the test closes them, the client closes
them, or the server stops (close 1001).
"""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

# One timeout unit for every wait in these tests, scaled for slow machines; never an assertion.
T = 5.0 * float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))


class FakeConn:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self._keepalive: asyncio.Task[None] | None = None

    async def recv(self, timeout: float = T) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        self.received.append(frame)
        return frame

    async def expect(self, op: str, timeout: float = T, max_frames: int = 50) -> dict[str, Any]:
        """The next frame with this op (skipping others, at most `max_frames`)."""
        for _ in range(max_frames):
            frame = await self.recv(timeout)
            if frame.get("op") == op:
                return frame
        raise AssertionError(f"no {op!r} within {max_frames} frames")

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def handshake(
        self, heartbeat_ms: int = 60_000, session: str = "s1", server: str = "fake"
    ) -> dict[str, Any]:
        hello = await self.expect("connect")
        await self.send(
            {"op": "connected", "session": session, "server": server,
             "heartbeat_ms": heartbeat_ms, "version": 1}
        )
        return hello

    async def subscribed(
        self, subject: str, epoch: str = "e1", seq: int = 0, recovered: bool = False
    ) -> None:
        await self.send(
            {"op": "subscribed", "subject": subject, "epoch": epoch, "seq": seq,
             "recovered": recovered}
        )

    async def msg(
        self, subject: str, seq: int, prev: int | None, content: str = "x", epoch: str = "e1",
        **extra: Any,
    ) -> None:
        frame: dict[str, Any] = {"op": "msg", "subject": subject, "content": content,
                                 "epoch": epoch, "seq": seq, "ts": 1_700_000_000_000}
        if prev is not None:
            frame["prev"] = prev
        frame.update(extra)
        await self.send(frame)

    def start_keepalive(self, interval: float, max_beats: int = 10_000) -> None:
        """Send `hb` every `interval` s (at most `max_beats`) until stop_keepalive()."""

        async def beat() -> None:
            for _ in range(max_beats):
                try:
                    await self.send({"op": "hb"})
                except ConnectionClosed:
                    return
                await asyncio.sleep(interval)

        self._keepalive = asyncio.get_running_loop().create_task(beat())

    async def stop_keepalive(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    async def wait_closed(self, timeout: float = T) -> None:
        async with asyncio.timeout(timeout):
            await self.ws.wait_closed()


class FakeGateway:
    def __init__(self) -> None:
        self._conns: asyncio.Queue[FakeConn] = asyncio.Queue()
        self._server: Server | None = None
        self.accepted = 0

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def __aenter__(self) -> FakeGateway:
        self._server = await serve(
            self._handler, "127.0.0.1", 0, ping_interval=None, compression=None
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        async with asyncio.timeout(T):
            await self._server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        self.accepted += 1
        conn = FakeConn(ws)
        await self._conns.put(conn)
        try:
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            await conn.stop_keepalive()

    async def accept(self, timeout: float = T) -> FakeConn:
        async with asyncio.timeout(timeout):
            return await self._conns.get()
