"""The one fake transport of the tests and microbenchmarks: no socket, every byte written kept in `out`.

A Conn on it has fd -1 (get_extra_info("socket") is None), so fanout writes everything through
write(); tests read it back from `out`. Enough of asyncio.Transport for fanout.Conn, fanout.WSConn
and gateway.session.Session: buffer limits and size, reading pause/resume, close and abort.
"""

from __future__ import annotations

from typing import Any


class FakeTransport:
    def __init__(self, **extra: Any) -> None:
        """`extra`: what get_extra_info() answers (e.g. peername=("127.0.0.1", 5000))."""
        self.out = bytearray()
        self.extra = extra
        self.reading = True
        self.closing = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True
