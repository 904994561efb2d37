"""Subscribing with or without a recovery position: replay from the hub's ring, else from the engine
(Kafka reads the partition again), else `recovered:false` and the snapshot.

The order on the wire is always: `subscribed`, then replayed messages (or the snapshot), then live
messages; no message is sent twice on one subscription and none is skipped. The in-memory paths run
without yielding to the loop, so no live message can slip between replay and joining the channel.
The engine path awaits; meanwhile live messages of the subject are buffered in a `Pending` and merged
after the replay, deduplicated by seq.

A replay from the ring can be far larger than what one connection may have queued (a client that was
away for a while): it is paced by `RingReplay`, which walks the ring with a cursor, queues only while
the connection's output is under half its limit, continues when the socket drains, and joins the
channel when it reaches the newest message. Live messages meanwhile land in the ring, so nothing is
buffered per connection. A reader so slow that the ring moves past its cursor is closed like any slow
consumer (4000) and recovers again from its last position.

Every recovery in flight is registered on the subject's state (`pending`, `replays`), so the hub's
memory budget never forgets a subject under it. In the Kafka engine a fresh subscriber to a subject
the hub does not hold (forgotten under the budget) gets its snapshot read from Kafka (`Engine.latest`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fanout import Conn, encode_text

from . import protocol
from .engines.base import Engine
from .hub import Hub, Pending, SubjectState
from .subjects import Subject


def _fits(conn: Conn, frame: bytes) -> bool:
    """Whether a paced send may queue `frame` now: the connection's output stays under half its limit,
    or holds nothing (one message alone never overflows: --max-pending-bytes >= 2 x --max-message-bytes).
    So the snapshots and replays of many subjects subscribed at once never add up to an overflow."""
    pending = conn.pending_bytes
    return not pending or pending + len(frame) <= conn.max_pending // 2


class RingReplay:
    """A replay from the ring, paced by the connection's output queue (see the module docstring).

    `head`: a frame to send before the ring's frames after `after` (a snapshot, whose seq is `after`)."""

    __slots__ = ("st", "conn", "cursor", "on_stall", "done", "head")

    def __init__(self, st: SubjectState, conn: Conn, after: int, on_stall: Callable[[], None],
                 head: bytes | None = None) -> None:
        self.st = st
        self.conn = conn
        self.cursor = after
        self.on_stall = on_stall  # the ring moved past the cursor: the reader is too slow
        self.done = False
        self.head = head
        st.add_replay(self)   # the hub keeps the subject while this is in flight

    def pump(self) -> bool:
        """Queue what the connection can take now; True once caught up and live (or given up)."""
        if self.done:
            return True
        conn, st = self.conn, self.st
        if conn.closed:
            self.done = True
            return True
        frames = st.ring.since(self.cursor) if st.ring is not None else []
        if frames is None:
            self.done = True
            self.on_stall()
            return True
        head = self.head
        if head is not None:
            if not _fits(conn, head):
                return False
            self.head = None
            if not conn.send(head):
                self.done = True
                return True
        sent = 0
        for frame in frames:
            if not _fits(conn, frame):
                break
            if not conn.send(frame):
                self.done = True
                return True
            sent += 1
        if sent == len(frames):
            st.channel.add(conn)
            self.done = True
            return True
        if sent:
            # `frames` are the newest len(frames) entries of the ring: the last one sent is the new cursor
            assert st.ring is not None
            self.cursor = st.ring.seq_at(len(st.ring) - (len(frames) - sent) - 1)
        return False


def subscribe(hub: Hub, engine: Engine, conn: Conn, subject: Subject,
              position: tuple[str, int] | None,
              start_replay: Callable[[RingReplay], None] | None = None) -> Coroutine[Any, Any, None] | None:
    """Answer one subscribe entry. Returns None when done, or a coroutine to await (an engine replay).

    A ring replay that does not fit the connection's queue at once is handed to `start_replay`, which
    must pump it again when the connection drains."""
    st = hub.state(subject.text)
    st.channel.remove(conn)  # subscribing again replaces the old subscription
    _drop_pending(st, conn)
    newest = st.last_seq
    if position is None:
        return _fresh_or_from_engine(hub, engine, st, conn, subject, start_replay)
    epoch, after = position
    if epoch != st.epoch:
        return _fresh_or_from_engine(hub, engine, st, conn, subject, start_replay)
    if after == newest:
        if newest == 0 and engine.accepts_positions_ahead:
            # seq 0 asks for the whole epoch, and the hub holds nothing of S: the engine may have read
            # S's messages before the hub held it (older than the warmup, or forgotten): read them.
            upto = engine.read_through(subject)
            if upto:
                return _replay_from_engine(hub, engine, st, conn, subject, epoch, 0, upto)
        _join(st, conn, recovered=True, frames=())
        return None
    if after > newest:
        if not engine.accepts_positions_ahead:
            _fresh(st, conn, start_replay)
            return None
        # The hub holds nothing of S after `newest`, but the engine may have read past the position
        # (S's messages are older than what the hub was warmed up with): those come from the engine.
        upto = engine.read_through(subject)
        if upto is not None and after < upto:
            return _replay_from_engine(hub, engine, st, conn, subject, epoch, after, upto)
        # Ahead of what this gateway has read: valid if Kafka holds it (another gateway was faster),
        # recovered:false if it is beyond the partition's end (a bogus position must not silence the
        # subscription until that seq comes). Within the end our last fetch reported: valid at once
        # (the usual case, e.g. clients failing over from a faster gateway); otherwise Kafka is
        # asked, and live frames are buffered meanwhile.
        known = engine.known_end_seq(subject)
        if known is not None and after <= known:
            conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, newest, True)))
            st.add_pending(Pending(conn, after, buffering=False))
            return None
        pending = Pending(conn, after, buffering=True)
        st.add_pending(pending)
        return _check_ahead(hub, engine, st, conn, subject, epoch, after, pending)
    frames = st.ring.since(after) if st.ring is not None else None
    if frames is not None:
        if start_replay is None:
            _join(st, conn, recovered=True, frames=frames)
            return None
        if conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, st.last_seq, True))):
            replay = RingReplay(st, conn, after, lambda: None)
            if not replay.pump():
                start_replay(replay)
        return None
    return _replay_from_engine(hub, engine, st, conn, subject, epoch, after, newest)


def _fresh_or_from_engine(hub: Hub, engine: Engine, st: SubjectState, conn: Conn, subject: Subject,
                          start_replay: Callable[[RingReplay], None] | None) -> Coroutine[Any, Any, None] | None:
    """recovered:false with the snapshot; read from the engine when the hub may have forgotten it."""
    if st.ring is None and engine.accepts_positions_ahead and st.subject in hub.forgotten:
        pending = Pending(conn, 0, buffering=True)   # registered now: see _replay_from_engine
        st.add_pending(pending)
        return _run_snapshot(hub, engine, st, conn, subject, st.epoch, pending)
    _fresh(st, conn, start_replay)
    return None


async def _check_ahead(hub: Hub, engine: Engine, st: SubjectState, conn: Conn, subject: Subject, epoch: str,
                       after: int, pending: Pending) -> None:
    try:
        try:
            end = await engine.end_seq(subject, epoch)
        except Exception:  # noqa: BLE001 - an unanswered question is a failed recovery
            end = None
        if not pending.active or conn.closed:
            return  # unsubscribed, resubscribed or gone meanwhile
        if end is None or after > end or epoch != st.epoch:
            pending.active = False
            _fresh(st, conn)
            return
        if not conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, st.last_seq, True))):
            return
        buffer = pending.buffer
        assert buffer is not None
        newer = [frame for seq, frame in buffer if seq > after]
        if newer:   # the position was passed while Kafka was asked: those, then live
            for frame in newer:
                conn.send(frame)
            st.channel.add(conn)
        else:       # still ahead: join at the first newer frame (no await since the buffer was read)
            st.add_pending(Pending(conn, after, buffering=False))
    finally:
        _end_pending(hub, st, pending)


def _fresh(st: SubjectState, conn: Conn, start_replay: Callable[[RingReplay], None] | None = None) -> None:
    """recovered:false, the snapshot, then live. With `start_replay`, a snapshot the connection's output
    cannot take now is paced like a replay: sent when it drains, followed by what the ring got meanwhile."""
    snapshot = st.snapshot_frame()
    if snapshot is None or start_replay is None or _fits(conn, snapshot):
        _join(st, conn, recovered=False, frames=() if snapshot is None else (snapshot,))
        return
    if conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, st.last_seq, False))):
        start_replay(RingReplay(st, conn, st.last_seq, lambda: None, head=snapshot))


def _join(st: SubjectState, conn: Conn, *, recovered: bool, frames: Any) -> None:
    if not conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, st.last_seq, recovered))):
        return
    for frame in frames:
        conn.send(frame)
    st.channel.add(conn)


def _drop_pending(st: SubjectState, conn: Conn) -> None:
    if st.pending is None:
        return
    for p in st.pending:
        if p.conn is conn:
            p.active = False
    st.pending = [p for p in st.pending if p.active] or None


def unsubscribe(hub: Hub, conn: Conn, subject: str) -> None:
    st = hub.get(subject)
    if st is None:
        return
    st.channel.remove(conn)
    _drop_pending(st, conn)
    hub.release(st)


#: live frames a paced engine replay may hold back for one connection; past it the rest is queued at
#: once, so a reader this far behind overflows and is closed as a slow consumer (4000)
MAX_HELD_LIVE_FRAMES = 100_000
_PACE_S = 0.001


async def _paced_send(conn: Conn, frame: bytes, pending: Pending) -> bool:
    """Queue `frame` once the connection's output is under half its limit; False when the
    subscription ended meanwhile (unsubscribed, resubscribed, closed, overflowed)."""
    budget = conn.max_pending // 2
    while conn.pending_bytes and conn.pending_bytes + len(frame) > budget:
        if not pending.active or conn.closed:
            return False
        if pending.buffer is not None and len(pending.buffer) > MAX_HELD_LIVE_FRAMES:
            break
        await asyncio.sleep(_PACE_S)
    if not pending.active or conn.closed:
        return False
    return conn.send(frame)


def _replay_from_engine(hub: Hub, engine: Engine, st: SubjectState, conn: Conn, subject: Subject,
                        epoch: str, after: int, upto: int) -> Coroutine[Any, Any, None]:
    """Read (after, upto] from the engine, then send it paced by the connection's output queue (a
    deep recovery is far larger than --max-pending-bytes), then the live frames buffered meanwhile.

    The Pending is registered here, synchronously, in the same loop step that read `upto`: the
    coroutine only starts a step later, and a record delivered in between would otherwise be lost.
    It stays registered until the connection joins the channel, so nothing delivered during the read
    or the pacing is lost; the final join happens with no await after the buffer's end."""
    pending = Pending(conn, after, buffering=True)
    st.add_pending(pending)
    return _run_replay(hub, engine, st, conn, subject, epoch, after, upto, pending)


async def _run_replay(hub: Hub, engine: Engine, st: SubjectState, conn: Conn, subject: Subject,
                      epoch: str, after: int, upto: int, pending: Pending) -> None:
    try:
        try:
            records = await engine.replay(subject, epoch, after, upto)
        except Exception:  # noqa: BLE001 - a failed read is a failed recovery, not a dead connection
            records = None
        if not pending.active or conn.closed:
            return  # unsubscribed, resubscribed or gone meanwhile
        if records is None or epoch != st.epoch:
            pending.active = False
            _fresh(st, conn)
            return
        newest = max(st.last_seq, records[-1].seq if records else 0)   # the hub may hold less than Kafka
        if not conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, newest, True))):
            return
        last = after
        for rec in records:
            if rec.seq > last:
                if not await _paced_send(conn, encode_text(protocol.msg(rec)), pending):
                    return
                last = rec.seq
        await _send_buffered_and_join(st, conn, epoch, pending, last)
    finally:
        _end_pending(hub, st, pending)


async def _run_snapshot(hub: Hub, engine: Engine, st: SubjectState, conn: Conn, subject: Subject,
                        epoch: str, pending: Pending) -> None:
    """A fresh subscription to a subject the hub does not hold: its latest record from the engine
    (Kafka, within --max-recovery-records) as the snapshot, then what was buffered meanwhile."""
    try:
        try:
            rec = await engine.latest(subject)
        except Exception:  # noqa: BLE001 - no snapshot is still a valid answer
            rec = None
        if not pending.active or conn.closed:
            return
        if epoch != st.epoch:
            pending.active = False
            _fresh(st, conn)
            return
        newest = max(st.last_seq, rec.seq if rec is not None else 0)
        if not conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, newest, False))):
            return
        last = 0
        if rec is not None and rec.epoch == epoch:
            if not await _paced_send(conn, encode_text(protocol.msg(rec, snapshot=True)), pending):
                return
            last = rec.seq
        await _send_buffered_and_join(st, conn, epoch, pending, last)
    finally:
        _end_pending(hub, st, pending)


async def _send_buffered_and_join(st: SubjectState, conn: Conn, epoch: str, pending: Pending, last: int) -> None:
    """The live frames buffered while the engine was read (those after `last`), then the channel."""
    buffer = pending.buffer
    assert buffer is not None
    i = 0
    while i < len(buffer):   # it grows while we wait for the connection to drain
        seq, frame = buffer[i]
        i += 1
        if seq > last:
            if not await _paced_send(conn, frame, pending):
                return
            last = seq
    if epoch != st.epoch:   # the epoch changed while pacing: what was buffered is another epoch's
        pending.active = False
        _fresh(st, conn)
        return
    # No await since the buffer's last entry was taken: no live frame can slip in between.
    st.channel.add(conn)


def _end_pending(hub: Hub, st: SubjectState, pending: Pending) -> None:
    pending.active = False
    st.remove_pending(pending)
    hub.release(st)   # the connection may have left meanwhile: the hub may forget the subject now
