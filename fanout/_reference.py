"""Pure-Python twins of the compiled modules, behaviour for behaviour.

Used by the parity tests and with ``FANOUT_NO_EXTENSIONS=1``. Written for
clarity, not speed; the reasoning behind each rule lives in the .pxd files.
"""
from __future__ import annotations

import asyncio
import errno
import operator
import os
import stat
import struct
import time
import types
from collections import deque
from collections.abc import Callable
from typing import Any

from ._enums import CloseCode, WSState

__all__ = [
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "encode_frame", "encode_text", "encode_close",
    "Ring", "Writer", "Conn", "Channel", "WSConn", "WSState", "CloseCode", "publish_run",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_I64 = (-(2**63), 2**63 - 1)
_C_INT = (-(2**31), 2**31 - 1)
_SSIZE = (-(2**63), 2**63 - 1)


def _as_int(value: Any, bounds: tuple[int, int], name: str) -> int:
    # Same errors as Cython's C-integer argument conversion.
    result = operator.index(value)
    if not bounds[0] <= result <= bounds[1]:
        raise OverflowError(f"{name} out of range")
    return result


def _as_bytes(payload: Any) -> bytes:
    if type(payload) is bytes:
        return payload
    with memoryview(payload) as view:
        if not view.c_contiguous:
            raise BufferError("payload must be a contiguous buffer")
        return view.tobytes()


def _header(opcode: int, size: int) -> bytes:
    if size <= 125:
        return bytes((0x80 | opcode, size))
    if size <= 0xFFFF:
        return struct.pack("!BBH", 0x80 | opcode, 126, size)
    return struct.pack("!BBQ", 0x80 | opcode, 127, size)


def encode_frame(opcode: int, payload: bytes | bytearray | memoryview) -> bytes:
    opcode = _as_int(opcode, _C_INT, "opcode")
    if opcode not in _OPCODES:
        raise ValueError(f"invalid opcode {opcode:#x}")
    data = _as_bytes(payload)
    if opcode >= 8 and len(data) > 125:
        raise ValueError("control frame payload longer than 125 bytes")
    return _header(opcode, len(data)) + data


def encode_text(payload: bytes | bytearray | memoryview) -> bytes:
    return encode_frame(OP_TEXT, payload)


def encode_close(code: int, reason: bytes | bytearray | memoryview = b"") -> bytes:
    code = _as_int(code, _C_INT, "code")
    if not 1000 <= code <= 4999 or code in (1004, 1005, 1006, 1015):
        raise ValueError(f"invalid close code {code}")
    data = _as_bytes(reason)
    if len(data) > 123:
        raise ValueError("close reason longer than 123 bytes")
    data.decode("utf-8")
    return _header(OP_CLOSE, len(data) + 2) + code.to_bytes(2, "big") + data


class Ring:
    def __init__(self, capacity: int, max_bytes: int = 2**62) -> None:
        capacity = _as_int(capacity, _SSIZE, "capacity")
        max_bytes = _as_int(max_bytes, _I64, "max_bytes")
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._entries: deque[tuple[int, int, int, bytes]] = deque()
        self._nbytes = 0
        self._last_seq = 0

    def _evict_oldest(self) -> None:
        self._nbytes -= len(self._entries.popleft()[3])

    def seq_at(self, i: int) -> int:
        """Seq of the i-th held entry, oldest first (0 <= i < len); for cursors over the window."""
        if i < 0 or i >= len(self._entries):
            raise IndexError("ring index out of range")
        return self._entries[i][0]

    def append(self, seq: int, prev: int, ts: int, frame: bytes, entry_overhead: int = 0) -> int:
        entry_overhead = _as_int(entry_overhead, _SSIZE, "entry_overhead")
        before = self._nbytes + len(self._entries) * entry_overhead
        self._append(seq, prev, ts, frame)
        return self._nbytes + len(self._entries) * entry_overhead - before

    def _append(self, seq: int, prev: int, ts: int, frame: bytes) -> None:
        seq = _as_int(seq, _I64, "seq")
        prev = _as_int(prev, _I64, "prev")
        ts = _as_int(ts, _I64, "ts")
        if not isinstance(frame, bytes):
            raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
        if seq <= self._last_seq:
            raise ValueError(f"seq {seq} is not after the last seq {self._last_seq}")
        if prev < -1 or prev >= seq:
            raise ValueError(f"prev {prev} must be -1 or in [0, seq)")
        if self._entries and prev >= 0 and prev != self._last_seq:
            self._entries.clear()
            self._nbytes = 0
        if len(self._entries) == self._capacity:
            self._evict_oldest()
        self._entries.append((seq, prev, ts, frame))
        self._nbytes += len(frame)
        self._last_seq = seq
        while len(self._entries) > 1 and self._nbytes > self._max_bytes:
            self._evict_oldest()

    def since(self, seq: int) -> list[bytes] | None:
        seq = _as_int(seq, _I64, "seq")
        if seq >= self._last_seq:
            return []
        if not self._entries:
            return None
        first_seq, first_prev = self._entries[0][:2]
        if seq < first_seq and not (first_prev >= 0 and seq >= first_prev):
            return None
        return [frame for s, _, _, frame in self._entries if s > seq]

    def last(self) -> tuple[int, int, int, bytes] | None:
        return self._entries[-1] if self._entries else None

    def trim(self, keep: int) -> None:
        keep = _as_int(keep, _SSIZE, "keep")
        if keep < 0:
            raise ValueError("keep must be >= 0")
        while len(self._entries) > keep:
            self._evict_oldest()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def first_seq(self) -> int:
        return self._entries[0][0] if self._entries else 0

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def __repr__(self) -> str:
        return (f"<Ring len={len(self)} capacity={self._capacity} "
                f"first_seq={self.first_seq} last_seq={self._last_seq} nbytes={self._nbytes}>")


def _iov_max() -> int:
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        limit = -1
    return 1024 if limit <= 0 else min(limit, 1024)


_IOV_MAX = _iov_max()


BUSY_PERIOD = 0.5
PROBE_EVERY = 6
OPEN_AFTER = 2


class Writer:
    def __init__(self, loop: asyncio.AbstractEventLoop, coalesce_window: float = 0.0,
                 coalesce_min_conns: int = 1000, coalesce_busy: float = 0.0,
                 clock: Callable[[], float] | None = None,
                 cpu_clock: Callable[[], float] | None = None) -> None:
        self._loop = loop
        self._conns: list[Conn] = []
        self._dirty: list[Conn] = []
        self._scheduled = False
        self.coalesce_window = float(coalesce_window)
        self.coalesce_min_conns = int(coalesce_min_conns)
        self.coalesce_busy = float(coalesce_busy)
        self._clock = clock if clock is not None else time.monotonic
        self._cpu_clock = cpu_clock if cpu_clock is not None else time.thread_time
        self._busy_t0 = 0.0
        self._busy_cpu0 = 0.0
        self._busy_share = 0.0
        self._busy = False
        self._probing = False
        self._held_periods = 0
        self._busy_periods = 0
        self._probes = 0
        self._period_frames0 = 0
        self._period_writes0 = 0
        self._unheld_per_write = 1.0
        self._hold_until = 0.0
        self._held_flushes = 0
        self._iov_max = _IOV_MAX
        self._on_overflow: Callable[[Conn], object] | None = None
        self._frames_out = 0
        self._bytes_out = 0
        self._syscalls = 0
        self._overflows = 0
        self._write_errors = 0
        self.pongs_dropped = 0
        self.fragment_limit_hits = 0

    frames_out = property(lambda self: self._frames_out)
    bytes_out = property(lambda self: self._bytes_out)
    syscalls = property(lambda self: self._syscalls)
    overflows = property(lambda self: self._overflows)
    write_errors = property(lambda self: self._write_errors)
    held_flushes = property(lambda self: self._held_flushes)
    busy_share = property(lambda self: self._busy_share)
    probes = property(lambda self: self._probes)

    def _mark_dirty(self, conn: Conn) -> None:
        conn._dirty = True
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            if self._hold_until > 0.0 and self._loop.time() < self._hold_until:
                self._held_flushes += 1
                self._loop.call_at(self._hold_until, self.flush)
            else:
                self._loop.call_soon(self.flush)

    def _register(self, conn: Conn) -> None:
        conn._widx = len(self._conns)
        self._conns.append(conn)

    def _unregister(self, conn: Conn) -> None:
        idx = conn._widx
        if idx < 0:
            return
        conn._widx = -1
        last = self._conns.pop()
        if last is not conn:
            self._conns[idx] = last
            last._widx = idx

    def flush(self) -> None:
        dirty = self._dirty
        self._scheduled = False
        if not dirty:
            return
        timed = self.coalesce_window > 0.0 and self.coalesce_busy > 0.0
        self._dirty = []
        now = self._loop.time()
        touched = 0
        for conn in dirty:
            conn._dirty = False
            if conn._closed or conn._paused:
                continue
            touched += 1
            try:
                conn._flush(now)
            except Exception as exc:
                conn._write_failed()
                self._loop.call_exception_handler({
                    "message": "fanout: unexpected error while writing",
                    "exception": exc,
                    "transport": conn._transport,
                })
        if timed and not self._gate_open():
            self._hold_until = 0.0
        elif self.coalesce_window > 0.0 and touched >= self.coalesce_min_conns:
            self._hold_until = self._loop.time() + self.coalesce_window
        else:
            self._hold_until = 0.0

    def _gate_open(self) -> bool:
        t = self._clock()
        if self._busy_t0 == 0.0:
            self._busy_t0 = t
            self._busy_cpu0 = self._cpu_clock()
            self._period_frames0 = self._frames_out
            self._period_writes0 = self._syscalls
            return False
        elapsed = t - self._busy_t0
        if elapsed < BUSY_PERIOD:
            return self._busy and not self._probing
        cpu = self._cpu_clock()
        self._busy_share = (cpu - self._busy_cpu0) / elapsed
        per_write = (self._frames_out - self._period_frames0) / max(1, self._syscalls - self._period_writes0)
        self._busy_t0 = t
        self._busy_cpu0 = cpu
        self._period_frames0 = self._frames_out
        self._period_writes0 = self._syscalls
        if not self._busy or self._probing:
            self._unheld_per_write = max(1.0, per_write)
        if not self._busy:
            self._busy_periods = self._busy_periods + 1 if self._busy_share >= self.coalesce_busy else 0
            if self._busy_periods >= OPEN_AFTER:
                self._busy = True
                self._busy_periods = 0
                self._held_periods = 0
        elif self._probing:
            self._probing = False
            self._held_periods = 0
            if self._busy_share < self.coalesce_busy:
                self._busy = False
        elif self._busy_share * max(1.0, per_write) / self._unheld_per_write < self.coalesce_busy:
            self._busy = False
        else:
            self._held_periods += 1
            if self._held_periods >= PROBE_EVERY:
                self._probing = True
                self._probes += 1
        return self._busy and not self._probing

    def idle(self, now: float, send_idle: float, recv_idle: float) -> tuple[list[Conn], list[Conn]]:
        quiet = [c for c in self._conns if now - c.last_send >= send_idle]
        deaf = [c for c in self._conns if now - c.last_recv >= recv_idle]
        return quiet, deaf

    def __len__(self) -> int:
        return len(self._conns)

    def __repr__(self) -> str:
        return (f"<Writer conns={len(self._conns)} frames_out={self._frames_out} "
                f"syscalls={self._syscalls} overflows={self._overflows}>")


#: errors after which the socket is still fine (no room or no buffer memory now): like EAGAIN
_SOFT_ERRNOS = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS, errno.ENOMEM))


def _is_data(frame: bytes) -> bool:
    """A data frame, not a control frame (ping, pong, close): only data frames set last_send (_writer.pyx)."""
    return frame[0] & 0x0F < 8


def _abort_transport(transport: asyncio.BaseTransport) -> None:
    try:
        transport.abort()  # type: ignore[attr-defined]
    except Exception:
        pass


def _shared_callback(writer: Writer, cb: Callable[[Conn], object]) -> Callable[[Conn], object]:
    if type(cb) is not types.MethodType:
        return cb
    last = writer._on_overflow
    if isinstance(last, types.MethodType) and last.__func__ is cb.__func__ and last.__self__ is cb.__self__:
        return last
    writer._on_overflow = cb
    return cb


class Conn:
    def __init__(self, writer: Writer, transport: asyncio.Transport, max_pending: int,
                 on_overflow: Callable[[Conn], object]) -> None:
        # None | the only frame | a list of 2+ frames (oldest first)
        self._queue: bytes | list[bytes] | None = None
        # the only channel and this conn's index in it; from two channels on, a tuple of the
        # channels and a list of the indices in the same order (the compiled Conn: a C array)
        self._ch: Channel | None = None
        self._chidx = -1
        self._chans: tuple[Channel, ...] | None = None
        self._chidxs: list[int] | None = None
        self._widx = -1
        self._fd = -1
        self._qbytes = 0
        self._dirty = False
        self._closed = True
        if not isinstance(writer, Writer):
            raise TypeError("writer must be a Writer")
        max_pending = _as_int(max_pending, _SSIZE, "max_pending")
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self._writer = writer
        self._transport = transport
        self._max_pending = max_pending
        self._on_overflow = _shared_callback(writer, on_overflow)
        now = writer._loop.time()
        self.last_send: float = now
        self.last_recv: float = now
        sock = transport.get_extra_info("socket")
        if (sock is not None and transport.get_extra_info("sslcontext") is None
                and transport.get_extra_info("ssl_object") is None):
            fd = sock.fileno()
            if fd >= 0 and stat.S_ISSOCK(os.fstat(fd).st_mode):
                self._fd = fd
        transport.set_write_buffer_limits(high=0 if self._fd >= 0 else 1, low=0)
        self._tbuf = transport.get_write_buffer_size()
        self._paused = self._tbuf > 0
        self._closed = False
        writer._register(self)

    def _transport_size(self) -> int:
        try:
            return int(self._transport.get_write_buffer_size())
        except Exception:
            return 0

    def _enqueue(self, frame: bytes) -> bool:
        if self._closed:
            return False
        if not frame:
            return True
        q = self._queue
        if q is None:
            self._queue = frame
        elif isinstance(q, list):
            q.append(frame)
        else:
            # The compiled Conn untracks this list from the cyclic GC (see "Queues and the cyclic GC"
            # in _writer.pxd); Python code has no way to, so here it stays tracked (same behaviour).
            self._queue = [q, frame]
        self._qbytes += len(frame)
        if self._qbytes + self._tbuf > self._max_pending:
            self._tbuf = self._transport_size()
            if self._qbytes + self._tbuf > self._max_pending:
                writer = self._writer
                self._drop()
                writer._overflows += 1
                writer._loop.call_soon(self._on_overflow, self)
                return False
        if not self._dirty and not self._paused:
            self._writer._mark_dirty(self)
        return True

    def _drop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue = None
        self._qbytes = 0
        ch, chans, idxs = self._ch, self._chans, self._chidxs
        self._ch = self._chans = self._chidxs = None
        if ch is not None:
            ch._remove_at(self._chidx)
        elif chans is not None and idxs is not None:
            for c, idx in zip(chans, idxs):
                c._remove_at(idx)
        self._chidx = -1
        self._writer._unregister(self)

    def _find(self, ch: Channel) -> int:
        chans = self._chans
        if chans is not None:
            for i, c in enumerate(chans):
                if c is ch:
                    return i
        return -1

    def _member(self, ch: Channel) -> bool:
        return self._ch is ch or self._find(ch) >= 0

    def _join(self, ch: Channel, idx: int) -> None:
        if self._chans is None and self._ch is None:
            self._ch, self._chidx = ch, idx
            return
        if self._chans is None or self._chidxs is None:  # the second channel: from the fields to the tuple
            assert self._ch is not None
            self._chans, self._chidxs = (self._ch,), [self._chidx]
        self._chans += (ch,)
        self._chidxs.append(idx)
        self._ch, self._chidx = None, -1

    def _leave(self, ch: Channel) -> int:
        if self._ch is ch:
            idx = self._chidx
            self._ch, self._chidx = None, -1
            return idx
        i = self._find(ch)
        chans, idxs = self._chans, self._chidxs
        if i < 0 or chans is None or idxs is None:
            return -1
        idx = idxs.pop(i)
        if len(idxs) == 1:  # back to one channel: the fields
            self._ch, self._chidx = chans[1 - i], idxs[0]
            self._chans = self._chidxs = None
            return idx
        self._chans = chans[:i] + chans[i + 1:]
        return idx

    def _flush(self, now: float) -> None:
        if self._queue is None:
            return
        if self._fd < 0:
            self._flush_joined(now)
        elif isinstance(self._queue, list):
            self._flush_direct(now)
        else:
            self._flush_one(now)

    def _flush_joined(self, now: float) -> None:
        q = self._queue
        assert q is not None
        if isinstance(q, list):
            data, frames = b"".join(q), len(q)
        else:
            data, frames = q, 1
        self._queue = None
        self._qbytes = 0
        w = self._writer
        w._frames_out += frames
        w._bytes_out += len(data)
        w._syscalls += 1
        if any(_is_data(f) for f in (q if isinstance(q, list) else (q,))):
            self.last_send = now
        self._handover(data)

    def _handover(self, data: bytes) -> None:
        try:
            self._transport.write(data)
        except Exception:
            self._write_failed()

    def _write_failed(self) -> None:
        # a hard error: drop, and abort the transport from call_soon (see _writer.pyx)
        if self._closed:
            return
        transport = self._transport
        self._writer._write_errors += 1
        self._drop()
        if transport is not None:
            self._writer._loop.call_soon(_abort_transport, transport)

    def _flush_direct(self, now: float) -> None:
        w = self._writer
        q = self._queue
        assert isinstance(q, list)
        head = 0
        while head < len(q):
            batch = q[head:head + w._iov_max]
            has_data = any(_is_data(f) for f in batch)
            w._syscalls += 1
            try:
                n = os.writev(self._fd, batch)  # PEP 475 already retries EINTR
            except OSError as exc:
                if exc.errno not in _SOFT_ERRNOS:
                    self._write_failed()
                    return
                off = 0
            else:
                if has_data:
                    self.last_send = now
                w._bytes_out += n
                self._qbytes -= n
                rem = n
                k = 0
                while k < len(batch) and rem >= len(batch[k]):
                    rem -= len(batch[k])
                    k += 1
                w._frames_out += k
                head += k
                if n == sum(map(len, batch)):
                    continue
                off = rem
            frame = q[head]
            head += 1
            tail = frame[off:] if off else frame
            self._qbytes -= len(tail)
            w._frames_out += 1
            w._bytes_out += len(tail)
            w._syscalls += 1
            if has_data:
                self.last_send = now
            self._handover(tail)
            if self._closed:
                return
            if self._paused or self._transport.get_write_buffer_size() > 0:
                break
        if self._closed:
            return
        if head >= len(q):
            self._queue = None
        else:
            del q[:head]

    def _flush_one(self, now: float) -> None:
        w = self._writer
        frame = self._queue
        assert isinstance(frame, bytes)
        self._queue = None
        w._syscalls += 1
        try:
            n = os.write(self._fd, frame)  # PEP 475 already retries EINTR
        except OSError as exc:
            if exc.errno not in _SOFT_ERRNOS:
                self._write_failed()
                return
            n = 0
        self._qbytes -= len(frame)
        w._frames_out += 1
        w._bytes_out += len(frame)
        if _is_data(frame):
            self.last_send = now
        if n == len(frame):
            return
        w._syscalls += 1
        self._handover(frame[n:] if n else frame)

    def send(self, frame: bytes) -> bool:
        if not isinstance(frame, bytes):
            raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
        return self._enqueue(frame)

    def pause_writing(self) -> None:
        self._paused = True
        self._tbuf = self._transport_size()

    def resume_writing(self) -> None:
        self._paused = False
        self._tbuf = 0
        if not self._closed and not self._dirty and self._queue is not None:
            self._writer._mark_dirty(self)

    def close(self) -> None:
        self._drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def pending_bytes(self) -> int:
        return self._qbytes + self._transport_size()

    @property
    def queued_bytes(self) -> int:
        return self._qbytes

    @property
    def max_pending(self) -> int:
        return self._max_pending

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def transport(self) -> asyncio.Transport:
        return self._transport

    @property
    def writer(self) -> Writer:
        return self._writer

    def __repr__(self) -> str:
        return (f"<Conn fd={self._fd} closed={self._closed} paused={self._paused} "
                f"queued={self._queued_frames()}/{self._qbytes}B>")

    def _queued_frames(self) -> int:
        q = self._queue
        return 0 if q is None else len(q) if isinstance(q, list) else 1


class Channel:
    def __init__(self) -> None:
        self._conns: list[Conn] = []

    def _remove_at(self, idx: int) -> None:
        last = self._conns.pop()
        if idx < len(self._conns):
            self._conns[idx] = last
            if last._ch is self:
                last._chidx = idx
            else:
                pos = last._find(self)
                if pos >= 0 and last._chidxs is not None:  # always, while `last` is in our list
                    last._chidxs[pos] = idx

    def add(self, conn: Conn) -> bool:
        if not isinstance(conn, Conn):
            raise TypeError("conn must be a Conn")
        if conn._closed or conn._member(self):
            return False
        conn._join(self, len(self._conns))
        self._conns.append(conn)
        return True

    def remove(self, conn: Conn) -> bool:
        if not isinstance(conn, Conn):
            raise TypeError("conn must be a Conn")
        idx = conn._leave(self)
        if idx < 0:
            return False
        self._remove_at(idx)
        return True

    def publish(self, frame: bytes) -> int:
        if not isinstance(frame, bytes):
            raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
        conns = self._conns
        count = 0
        i = 0
        while i < len(conns):
            conn = conns[i]
            if conn._enqueue(frame):
                count += 1
            if i < len(conns) and conns[i] is conn:
                i += 1
        return count

    def conns(self) -> list[Conn]:
        return list(self._conns)

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn: object) -> bool:
        return isinstance(conn, Conn) and conn._member(self)

    def __repr__(self) -> str:
        return f"<Channel conns={len(self._conns)}>"


# ---- _msgs: msg frames of a run of one subject's records -------------------------------------------

#: each ASCII byte inside a JSON string as orjson writes it (DEL stays as it is)
_JSON_ASCII = [bytes([c]) if c >= 0x20 else b"\\u%04x" % c for c in range(128)]
for _c, _e in ((0x22, b'\\"'), (0x5C, b"\\\\"), (0x08, b"\\b"), (0x09, b"\\t"), (0x0A, b"\\n"), (0x0C, b"\\f"),
               (0x0D, b"\\r")):
    _JSON_ASCII[_c] = _e


def publish_run(ring: Ring, channel: Channel, head: bytes, epoch: bytes, records: list[Any], start: int,
                prev: int, now_ms: int, content_member: Callable[[bytes], bytes],
                entry_overhead: int = 0) -> tuple[int, int]:
    """Twin of fanout._msgs.publish_run: encode, keep and publish records[start:] (see there)."""
    if not isinstance(ring, Ring) or not isinstance(channel, Channel):
        raise TypeError("publish_run needs a Ring and a Channel")
    if not isinstance(head, bytes) or not isinstance(epoch, bytes) or not isinstance(records, list):
        raise TypeError("head and epoch must be bytes, records a list")
    before = ring._nbytes + len(ring._entries) * entry_overhead
    deliveries = 0
    for r in records[max(0, start):]:
        seq = r.offset + 1
        ts = now_ms if r.timestamp is None or r.timestamp < 0 else r.timestamp
        content = b"" if r.value is None else r.value
        if not isinstance(content, bytes):
            raise TypeError(f"record value must be bytes, not {type(content).__name__}")
        if content.isascii():
            member = b'"content":"' + b"".join([_JSON_ASCII[c] for c in content]) + b'"'
        else:
            member = content_member(content)
            if not isinstance(member, bytes):
                raise TypeError("content_member must return bytes")
        payload = (head + member + b',"epoch":"' + epoch + b'","seq":' + b"%d" % seq
                   + (b',"prev":%d' % prev if prev >= 0 else b"") + b',"ts":%d}' % ts)
        frame = encode_text(payload)
        ring._append(seq, prev, ts, frame)
        deliveries += channel.publish(frame)
        prev = seq
    return ring._nbytes + len(ring._entries) * entry_overhead - before, deliveries


def _valid_peer_code(code: int) -> bool:
    if code < 1000 or code > 4999:
        return False
    if code < 3000:
        return code <= 1014 and code not in (1004, 1005, 1006)
    return True


# Module-level aliases of the states: on Python 3.11 an Enum member lookup (WSState.OPEN) costs
# several times a global lookup, and the parser tests the state for every frame.
_HTTP, _OPEN, _DONE = WSState.HTTP, WSState.OPEN, WSState.DONE


class WSConn(Conn):
    """Twin of fanout._ws.WSConn (rules in _ws.pxd)."""

    _state: WSState
    _rbuf: bytearray | None
    _frags: list[bytes] | None
    _frag_size: int
    _frag_op: int
    _max_message: int
    _held: bytes | None
    _held_off: int
    _frag_count: int
    _max_frags: int
    _pongs: int
    _max_pongs: int
    _in_paused: bool

    def __new__(cls, *args: Any, **kwargs: Any) -> WSConn:
        self = super().__new__(cls)
        self._state = _HTTP
        self._rbuf = None
        self._frags = None
        self._frag_size = 0
        self._frag_op = 0
        self._max_message = 0
        self._held = None
        self._held_off = 0
        self._frag_count = 0
        self._max_frags = 0
        self._pongs = 0
        self._max_pongs = 0
        self._in_paused = False
        # what Conn.__init__ sets, for a conn not yet opened
        self._queue = None
        self._ch = None
        self._chidx = -1
        self._chans = None
        self._chidxs = None
        self._widx = -1
        self._fd = -1
        self._qbytes = 0
        self._dirty = False
        self._closed = True
        self._paused = False
        self._tbuf = 0
        self._transport = None  # type: ignore[assignment]  # set by ws_open
        self.last_send = self.last_recv = 0.0
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def ws_open(self, writer: Writer, transport: asyncio.Transport, max_pending: int, max_message: int,
                on_overflow: Callable[[Conn], object], rest: bytes = b"", max_fragments: int = 1024,
                max_pongs: int = 16) -> None:
        limit = _as_int(max_message, _SSIZE, "max_message")
        frags = _as_int(max_fragments, _SSIZE, "max_fragments")
        pongs = _as_int(max_pongs, _SSIZE, "max_pongs")
        if limit < 0:
            raise ValueError("max_message must be >= 0")
        if not (1 <= frags <= 65535 and 1 <= pongs <= 65535):
            raise ValueError("max_fragments and max_pongs must be in 1..65535")
        if self._state != _HTTP:
            raise RuntimeError("ws_open() called twice")
        Conn.__init__(self, writer, transport, max_pending, on_overflow)
        self._max_message = limit
        self._max_frags = frags
        self._max_pongs = pongs
        self._state = _OPEN
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        if self._state == _OPEN:
            self.last_recv = self._writer._loop.time()
            data = bytes(data)
            if self._in_paused:
                self._held = data if self._held is None else self._held[self._held_off:] + data
                self._held_off = 0
                return
            self._feed(data, 0)
        elif self._state == _HTTP:
            self.http_received(data)

    def _feed(self, data: bytes, off: int) -> None:
        buf = data[off:] if self._rbuf is None else bytes(self._rbuf) + data[off:]
        self._rbuf = None
        used = self._parse(buf)
        if self._state != _OPEN or used == len(buf):
            return
        if self._in_paused:
            self._held, self._held_off = buf, used
        else:
            self._rbuf = bytearray(buf[used:])

    def ws_pause_input(self) -> None:
        if self._in_paused or self._state != _OPEN:
            return
        self._in_paused = True
        try:
            self._transport.pause_reading()
        except (AttributeError, RuntimeError):
            pass

    def ws_resume_input(self) -> None:
        if not self._in_paused:
            return
        self._in_paused = False
        held, self._held = self._held, None
        if held is not None and self._state == _OPEN:
            self._feed(held, self._held_off)
        if not self._in_paused and self._state == _OPEN:
            try:
                self._transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass

    @property
    def ws_input_paused(self) -> bool:
        return self._in_paused

    def eof_received(self) -> None:
        return None

    def _parse(self, p: bytes) -> int:
        pos, n = 0, len(p)
        while self._state == _OPEN and not self._in_paused and n - pos >= 2:
            b0, b1 = p[pos], p[pos + 1]
            fin, opcode, len7 = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
            if b0 & 0x70:
                self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
                break
            if not (opcode <= 2 or 8 <= opcode <= 10):
                self._fail(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
                break
            if not b1 & 0x80:
                self._fail(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
                break
            if opcode >= 8 and (not fin or len7 > 125):
                self._fail(CloseCode.PROTOCOL_ERROR, "control frames must be whole and at most 125 bytes")
                break
            if len7 < 126:
                hlen, size = 6, len7
            elif len7 == 126:
                hlen = 8
                if n - pos < hlen - 4:  # the length is known before the mask key
                    break
                size = int.from_bytes(p[pos + 2:pos + 4], "big")
            else:
                hlen = 14
                if n - pos < hlen - 4:  # the length is known before the mask key
                    break
                size = int.from_bytes(p[pos + 2:pos + 10], "big")
                if size >> 63:
                    self._fail(CloseCode.PROTOCOL_ERROR, "frame length has its most significant bit set")
                    break
            if opcode < 8 and size + (self._frag_size if opcode == 0 else 0) > self._max_message:
                self._fail(CloseCode.MESSAGE_TOO_BIG, "message larger than the limit")
                break
            if n - pos - hlen < size:
                break
            key = p[pos + hlen - 4:pos + hlen]
            body = p[pos + hlen:pos + hlen + size]
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(body))
            pos += hlen + size
            if opcode >= 8:
                self._control(opcode, payload)
            else:
                self._frame(opcode, fin, payload)
        return pos

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == OP_CONT:
            if self._frags is None:
                return self._fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
            if self._frag_count >= self._max_frags:
                self._writer.fragment_limit_hits += 1
                return self._fail(CloseCode.MESSAGE_TOO_BIG, f"message in more than {self._max_frags} frames")
            self._frag_count += 1
            self._frags.append(payload)
            self._frag_size += len(payload)
            if fin:
                whole = b"".join(self._frags)
                self._frags = None
                self._frag_size = 0
                self.ws_message(self._frag_op, whole)
            return None
        if self._frags is not None:
            return self._fail(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
        if fin:
            self.ws_message(opcode, payload)
        else:
            self._frags = [payload]
            self._frag_size = len(payload)
            self._frag_count = 1
            self._frag_op = opcode
        return None

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            if self._closed:
                return None
            if self._queue is None and not self._paused:
                self._pongs = 0
            if self._pongs >= self._max_pongs:
                self._writer.pongs_dropped += 1
                return None
            self._pongs += 1
            self._enqueue(encode_frame(OP_PONG, payload))
            return None
        if opcode == OP_PONG:
            return None
        if not payload:
            code: int = CloseCode.NO_STATUS
        elif len(payload) == 1:
            return self._fail(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
        else:
            code = int.from_bytes(payload[:2], "big")
            if not _valid_peer_code(code):
                return self._fail(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return self._fail(CloseCode.INVALID_DATA, "close reason is not valid UTF-8")
        self._state = _DONE
        self._frags = None
        self.ws_close(code, reason)
        return None

    def _fail(self, code: int, reason: str) -> None:
        self._state = _DONE
        self._frags = None
        self.ws_fail(code, reason)

    def ws_stop_input(self) -> None:
        self._state = _DONE
        self._frags = None
        self._rbuf = None
        self._held = None

    @property
    def ws_state(self) -> WSState:
        return self._state

    @property
    def max_message(self) -> int:
        return self._max_message

    def http_received(self, data: bytes) -> None:
        raise NotImplementedError

    def ws_message(self, opcode: int, payload: bytes) -> None:
        raise NotImplementedError

    def ws_close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def ws_fail(self, code: int, reason: str) -> None:
        raise NotImplementedError
