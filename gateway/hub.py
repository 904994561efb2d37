r"""Subject -> subscribers. Every sequenced record is encoded once, kept in the subject's ring, and handed
to fanout, which queues the same bytes on every subscriber's connection.

    engine --Record--> Hub.deliver --frame--> Ring.append          (recovery window)
                                       \----> Channel.publish      (fan-out, C loop)
                                       \----> pending recoveries   (Kafka replays, positions ahead)
"""

from __future__ import annotations

from collections.abc import Callable

from fanout import Channel, Conn, Ring, encode_text

from . import protocol
from .engines.base import Record


class SubjectState:
    """What the hub holds for one subject: its epoch, recent messages, and subscribers."""

    __slots__ = ("subject", "epoch", "ring", "channel", "latest", "_snapshot_frame", "pending")

    def __init__(self, subject: str, epoch: str) -> None:
        self.subject = subject
        self.epoch = epoch
        self.ring: Ring | None = None        # made on the first message: most subscribed subjects are quiet
        self.channel = Channel()
        self.latest: Record | None = None
        self._snapshot_frame: bytes | None = None
        self.pending: list[Pending] = []

    @property
    def last_seq(self) -> int:
        return 0 if self.ring is None else self.ring.last_seq

    def snapshot_frame(self) -> bytes | None:
        """The latest message flagged snapshot:true, encoded at most once per latest message."""
        if self.latest is None:
            return None
        if self._snapshot_frame is None:
            self._snapshot_frame = encode_text(protocol.msg(self.latest, snapshot=True))
        return self._snapshot_frame

    @property
    def idle(self) -> bool:
        return self.ring is None and not self.channel and not self.pending


class Pending:
    """A subscription not yet in the channel: live frames of the subject are routed to `offer`."""

    __slots__ = ("conn", "after_seq", "buffer", "active")

    def __init__(self, conn: Conn, after_seq: int, *, buffering: bool) -> None:
        self.conn = conn
        self.after_seq = after_seq
        # buffering: a replay from the engine is under way, keep live frames to merge after it.
        # not buffering: a position ahead of this gateway; join the channel at the first newer frame.
        self.buffer: list[tuple[int, bytes]] | None = [] if buffering else None
        self.active = True


class HubStats:
    __slots__ = ("records", "deliveries", "duplicates", "epoch_changes")

    def __init__(self) -> None:
        self.records = 0       # sequenced messages taken from the engine
        self.deliveries = 0    # msg frames queued to subscribers (fan-out count)
        self.duplicates = 0    # records at or below the newest held seq (re-read after a reconnect)
        self.epoch_changes = 0


class Hub:
    def __init__(self, epoch_of: Callable[[str], str], history: int, history_bytes: int) -> None:
        self._epoch_of = epoch_of
        self._history = history
        self._history_bytes = history_bytes
        self._states: dict[str, SubjectState] = {}
        self.stats = HubStats()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, subject: str) -> SubjectState | None:
        return self._states.get(subject)

    def state(self, subject: str) -> SubjectState:
        st = self._states.get(subject)
        if st is None:
            st = self._states[subject] = SubjectState(subject, self._epoch_of(subject))
        return st

    def release(self, st: SubjectState) -> None:
        """Forget a subject that holds nothing and has nobody (called when a subscriber leaves)."""
        if st.idle and self._states.get(st.subject) is st:
            del self._states[st.subject]

    def deliver(self, rec: Record) -> None:
        """The engine's sink: one sequenced record, in seq order per subject."""
        st = self._states.get(rec.subject)
        if st is None:
            st = self._states[rec.subject] = SubjectState(rec.subject, rec.epoch)
        elif rec.epoch != st.epoch:
            # A new epoch (recreated topic, engine restart): old positions mean nothing any more.
            st.epoch = rec.epoch
            st.ring = None
            self.stats.epoch_changes += 1
        elif st.ring is not None and rec.seq <= st.ring.last_seq:
            self.stats.duplicates += 1
            return
        frame = encode_text(protocol.msg(rec))
        if st.ring is None:
            st.ring = Ring(self._history, self._history_bytes)
        st.ring.append(rec.seq, -1 if rec.prev is None else rec.prev, rec.ts, frame)
        st.latest = rec
        st._snapshot_frame = None
        self.stats.records += 1
        self.stats.deliveries += st.channel.publish(frame)
        if st.pending:
            self._offer(st, rec.seq, frame)

    def _offer(self, st: SubjectState, seq: int, frame: bytes) -> None:
        for p in list(st.pending):
            if not p.active or p.conn.closed:
                st.pending.remove(p)
            elif p.buffer is not None:
                p.buffer.append((seq, frame))
            elif seq > p.after_seq:
                # the first message past a position that was ahead of us: from here on, live
                st.pending.remove(p)
                p.active = False
                if p.conn.send(frame):
                    self.stats.deliveries += 1
                    st.channel.add(p.conn)
