"""A TCP relay on 127.0.0.1 in front of a server (a gateway, a Kafka broker): the network between a
client and it, with the failures a test needs to cause on purpose.

- `refuse()`: new connections are reset as soon as they are accepted (the server is unreachable),
  until `forward()`; `refused` counts them. Connections already relayed are not touched.
- `cut()`: `refuse()`, and every relayed connection is reset too; `restore()` is `forward()`.
- `swallow()`: new connections are accepted and then ignored (nothing relayed, never closed), until
  `forward()`; `swallowed` counts them.
- `freeze()`: the connections relayed so far stop carrying bytes either way but stay open (a silent
  network: no FIN, no RST, nothing). New connections are relayed as usual (or as told above).
- `lose_answers()`: every connection, relayed or new, still carries the client's bytes to the server,
  but what the server sends back is dropped (counted in `answer_bytes_lost`), until `forward()`: a
  request that arrives and whose answer never does.
A connection closed or reset by one side is closed or reset on the other side too.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class _Link:
    def __init__(self, down: asyncio.StreamWriter, up: asyncio.StreamWriter) -> None:
        self.writers = (down, up)
        self.tasks: list[asyncio.Task[None]] = []
        self.ended = 0  # directions that reached a clean end of stream

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    def abort(self) -> None:
        self.stop()
        for w in self.writers:
            w.transport.abort()


class TcpProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listen_port = port
        self.refused = 0
        self.relayed = 0
        self.swallowed = 0
        self._mode = "forward"
        self._held: list[asyncio.StreamWriter] = []
        self._links: set[_Link] = set()
        self._frozen: list[_Link] = []
        self._server: asyncio.Server | None = None
        self._answers_lost = False
        self.answer_bytes_lost = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._listen_port)
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for link in list(self._links) + self._frozen:
            link.abort()
        for w in self._held:
            w.transport.abort()
        tasks = [t for link in list(self._links) + self._frozen for t in link.tasks]
        if tasks:
            await asyncio.wait(tasks)
        await self._server.wait_closed()
        self._server = None

    def refuse(self) -> None:
        self._mode = "refuse"

    def swallow(self) -> None:
        self._mode = "swallow"

    def forward(self) -> None:
        self._mode = "forward"
        self._answers_lost = False

    def lose_answers(self) -> None:
        self._answers_lost = True

    def cut(self) -> None:
        """Unreachable from now on: reset every relayed connection and refuse new ones."""
        self.refuse()
        for link in list(self._links) + self._frozen:
            link.abort()
        self._links.clear()
        self._frozen.clear()

    restore = forward

    def freeze(self) -> int:
        """Stop every connection relayed so far, leaving its sockets open; returns how many."""
        links = list(self._links)
        for link in links:
            self._links.discard(link)
            link.stop()
            self._frozen.append(link)
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "refuse":
            self.refused += 1
            writer.transport.abort()
            return
        if self._mode == "swallow":
            self.swallowed += 1
            self._held.append(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self._mode != "forward":  # cut or refused while connecting upstream
            self.refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.relayed += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        loop = asyncio.get_running_loop()
        link.tasks = [loop.create_task(self._pipe(reader, up_writer, link)),
                      loop.create_task(self._pipe(up_reader, writer, link, answers=True))]

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, *,
                    answers: bool = False) -> None:
        try:
            while data := await src.read(65536):
                if answers and self._answers_lost:
                    self.answer_bytes_lost += len(data)
                    continue
                dst.write(data)
                await dst.drain()
        except asyncio.CancelledError:
            return  # frozen or shut down: leave the sockets as they are
        except OSError:  # reset by one side: reset the other side too
            self._links.discard(link)
            link.abort()
            return
        # a clean end of stream from one side: pass it on; once both sides ended, close both
        link.ended += 1
        with contextlib.suppress(OSError):
            if link.ended < 2 and dst.can_write_eof():
                dst.write_eof()
                return
        self._links.discard(link)
        for w in link.writers:
            w.close()
