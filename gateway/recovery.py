"""Subscribing with or without a recovery position: replay from the hub's ring, else from the engine
(Kafka reads the partition again), else `recovered:false` and the snapshot.

The order on the wire is always: `subscribed`, then replayed messages (or the snapshot), then live
messages; no message is sent twice on one subscription and none is skipped. The in-memory paths run
without yielding to the loop, so no live message can slip between replay and joining the channel.
The engine path awaits; meanwhile live messages of the subject are buffered in a `Pending` and merged
after the replay, deduplicated by seq.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from fanout import Conn, encode_text

from . import protocol
from .engines.base import Engine
from .hub import Hub, Pending, SubjectState
from .subjects import Subject


def subscribe(hub: Hub, engine: Engine, conn: Conn, subject: Subject,
              position: tuple[str, int] | None) -> Coroutine[Any, Any, None] | None:
    """Answer one subscribe entry. Returns None when done, or a coroutine to await (an engine replay)."""
    st = hub.state(subject.text)
    st.channel.remove(conn)  # subscribing again replaces the old subscription
    _drop_pending(st, conn)
    newest = st.last_seq
    if position is None:
        _fresh(st, conn)
        return None
    epoch, after = position
    if epoch != st.epoch:
        _fresh(st, conn)
        return None
    if after == newest:
        _join(st, conn, recovered=True, frames=())
        return None
    if after > newest:
        if not engine.accepts_positions_ahead:
            _fresh(st, conn)
            return None
        # Another gateway was faster: valid. Only messages after the position will be sent.
        conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, newest, True)))
        st.pending.append(Pending(conn, after, buffering=False))
        return None
    frames = st.ring.since(after) if st.ring is not None else None
    if frames is not None:
        _join(st, conn, recovered=True, frames=frames)
        return None
    return _replay_from_engine(hub, engine, st, conn, subject, epoch, after, newest)


def _fresh(st: SubjectState, conn: Conn) -> None:
    snapshot = st.snapshot_frame()
    _join(st, conn, recovered=False, frames=() if snapshot is None else (snapshot,))


def _join(st: SubjectState, conn: Conn, *, recovered: bool, frames: Any) -> None:
    if not conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, st.last_seq, recovered))):
        return
    for frame in frames:
        conn.send(frame)
    st.channel.add(conn)


def _drop_pending(st: SubjectState, conn: Conn) -> None:
    for p in st.pending:
        if p.conn is conn:
            p.active = False
    st.pending[:] = [p for p in st.pending if p.active]


def unsubscribe(hub: Hub, conn: Conn, subject: str) -> None:
    st = hub.get(subject)
    if st is None:
        return
    st.channel.remove(conn)
    _drop_pending(st, conn)
    hub.release(st)


async def _replay_from_engine(hub: Hub, engine: Engine, st: SubjectState, conn: Conn, subject: Subject,
                              epoch: str, after: int, upto: int) -> None:
    pending = Pending(conn, after, buffering=True)
    st.pending.append(pending)
    try:
        records = await engine.replay(subject, epoch, after, upto)
    except Exception:  # noqa: BLE001 - a failed read is a failed recovery, not a dead connection
        records = None
    finally:
        if pending in st.pending:
            st.pending.remove(pending)
    if not pending.active or conn.closed:
        return  # unsubscribed, resubscribed or gone meanwhile
    pending.active = False
    if records is None or epoch != st.epoch:
        _fresh(st, conn)
        return
    if not conn.send(encode_text(protocol.subscribed(st.subject, st.epoch, st.last_seq, True))):
        return
    last = after
    for rec in records:
        if rec.seq > last:
            conn.send(encode_text(protocol.msg(rec)))
            last = rec.seq
    for seq, frame in pending.buffer or ():
        if seq > last:
            conn.send(frame)
            last = seq
    # Live messages that arrived after the replay's upper bound but are already in the ring and not
    # in the buffer cannot exist: the buffer took every frame delivered since the replay began.
    st.channel.add(conn)
