r"""Subject -> subscribers. Every sequenced record is encoded once, kept in the subject's ring, and handed
to fanout, which queues the same bytes on every subscriber's connection.

    engine --Record--> Hub.deliver --frame--> Ring.append          (recovery window)
                                       \----> Channel.publish      (fan-out, C loop)
                                       \----> pending recoveries   (Kafka replays, positions ahead)

The memory budget (--history-total-bytes): the hub keeps an estimate of what every subject costs
(`SUBJECT_OVERHEAD` per subject + its ring's frames + `ENTRY_OVERHEAD` per held frame) and, when the
total goes over the budget, forgets subjects nobody watches, least recently written first, then trims
the oldest history of the watched ones (never their newest message: it is their snapshot). Subjects
are kept in an OrderedDict in order of their last write, so the least recently written is at the
front and moving a subject to the back is O(1). "Watched" means a subscriber in the channel, a
recovery in flight (a Kafka replay's `Pending`, a paced `RingReplay`): their state is never forgotten
under them. A forgotten subject leaves nothing behind; the standalone engine gives it a new epoch when
it comes back (see `generation`), the Kafka engine reads it from Kafka again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fanout import COMPILED, Channel, Conn, Ring, encode_text, publish_run

from . import protocol
from .records import Record

if TYPE_CHECKING:
    from .recovery import RingReplay

#: Estimated bytes of one subject besides its frames and its name: its dict entry, the SubjectState, its
#: Channel, its Ring and the Ring's first arrays. Measured with tracemalloc for the compiled fanout and for
#: its pure-Python twins, which are larger (tests/test_hub_budget.py checks the estimate against what is
#: really allocated).
SUBJECT_OVERHEAD = 520 if COMPILED else 1240
#: Estimated bytes per held frame besides its length: the bytes object's header and the ring's slots
#: (3 int64 + 1 pointer in the compiled ring; a tuple and its ints in the twin).
ENTRY_OVERHEAD = 66 if COMPILED else 141

_SNAPSHOT_TAIL = b',"snapshot":true}'


class ForgottenFilter:
    """Which subjects were forgotten lately: two rotating Bloom filters of 2^24 bits (2 MiB) each.

    The Kafka engine reads a snapshot from Kafka for a fresh subscriber only when its subject may have
    been forgotten, not for every quiet subject. False positives (about 3 % when a filter is full) cost
    one needless read; a subject forgotten more than `CAPACITY`..2×`CAPACITY` forgets ago is no longer
    remembered, by then (least recently written first) at least that many records came after its last
    one, beyond any sane --max-recovery-records."""

    BITS = 1 << 24
    CAPACITY = 1_000_000

    __slots__ = ("_current", "_previous", "_count")

    def __init__(self) -> None:
        self._current = bytearray(self.BITS // 8)
        self._previous: bytearray | None = None
        self._count = 0

    @classmethod
    def _bits(cls, subject: str) -> tuple[int, int, int]:
        h = hash(subject) & 0xFFFF_FFFF_FFFF_FFFF
        mask = cls.BITS - 1
        return h & mask, (h >> 24) & mask, ((h >> 40) ^ (h * 0x9E3779B97F4A7C15 >> 20)) & mask

    def add(self, subject: str) -> None:
        if self._count >= self.CAPACITY:
            self._previous, self._current, self._count = self._current, bytearray(self.BITS // 8), 0
        bits = self._current
        for b in self._bits(subject):
            bits[b >> 3] |= 1 << (b & 7)
        self._count += 1

    def __contains__(self, subject: str) -> bool:
        positions = self._bits(subject)
        for bits in (self._current, self._previous):
            if bits is not None and all(bits[b >> 3] & (1 << (b & 7)) for b in positions):
                return True
        return False


def _payload(frame: bytes) -> bytes:
    """The payload of an unmasked server frame (header of 2, 4 or 10 bytes)."""
    n = frame[1] & 0x7F
    return frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]


class SubjectState:
    """What the hub holds for one subject: its epoch, recent messages, and subscribers."""

    __slots__ = ("subject", "epoch", "ring", "channel", "_snapshot_frame", "pending", "replays")

    def __init__(self, subject: str, epoch: str) -> None:
        self.subject = subject
        self.epoch = epoch
        self.ring: Ring | None = None        # made on the first message: most subscribed subjects are quiet
        self.channel = Channel()
        self._snapshot_frame: bytes | None = None
        # made when needed: most subjects never have a recovery in flight
        self.pending: list[Pending] | None = None
        self.replays: list[RingReplay] | None = None

    @property
    def last_seq(self) -> int:
        return 0 if self.ring is None else self.ring.last_seq

    def snapshot_frame(self) -> bytes | None:
        """The latest message flagged snapshot:true, made from its frame at most once per latest message
        (the hub keeps no Record: only the frame, so a message's content is held once)."""
        if self._snapshot_frame is None:
            last = None if self.ring is None else self.ring.last()
            if last is None:
                return None
            # `msg` puts "snapshot" last (protocol.msg), so the flagged payload is the frame's JSON
            # object with one more member
            self._snapshot_frame = encode_text(_payload(last[3])[:-1] + _SNAPSHOT_TAIL)
        return self._snapshot_frame

    def add_pending(self, p: Pending) -> None:
        if self.pending is None:
            self.pending = []
        self.pending.append(p)

    def remove_pending(self, p: Pending) -> None:
        if self.pending is not None:
            if p in self.pending:
                self.pending.remove(p)
            if not self.pending:
                self.pending = None

    def add_replay(self, replay: RingReplay) -> None:
        if self.replays is None:
            self.replays = []
        self.replays.append(replay)

    @property
    def watched(self) -> bool:
        """A subscriber, or a recovery in flight that will make one: the state must be kept."""
        if self.channel:
            return True
        if self.pending is not None:
            self.pending = [p for p in self.pending if p.active and not p.conn.closed] or None
        if self.replays is not None:
            self.replays = [r for r in self.replays if not r.done and not r.conn.closed] or None
        return self.pending is not None or self.replays is not None

    @property
    def idle(self) -> bool:
        return self.ring is None and not self.watched


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
    __slots__ = ("records", "deliveries", "duplicates", "epoch_changes", "forgotten", "trimmed")

    def __init__(self) -> None:
        self.records = 0       # sequenced messages taken from the engine
        self.deliveries = 0    # msg frames queued to subscribers (fan-out count)
        self.duplicates = 0    # records at or below the newest held seq (re-read after a reconnect)
        self.epoch_changes = 0
        self.forgotten = 0     # subjects forgotten under the memory budget
        self.trimmed = 0       # messages dropped from watched subjects' history under the budget


def _ring_cost(ring: Ring | None) -> int:
    return 0 if ring is None else ring.nbytes + len(ring) * ENTRY_OVERHEAD


class Hub:
    def __init__(self, epoch_of: Callable[[str], str], history: int, history_bytes: int,
                 total_bytes: int = 2 ** 62) -> None:
        self._epoch_of = epoch_of
        self._history = history
        self._history_bytes = history_bytes
        self.total_bytes = total_bytes
        # a sweep goes a little under the budget, so that sweeps come in batches, not one per message
        self._target = total_bytes - total_bytes // 32
        self._states: OrderedDict[str, SubjectState] = OrderedDict()   # least recently written first
        self.bytes = 0            # estimated bytes held for all subjects (see SUBJECT_OVERHEAD)
        #: +1 after every sweep that forgot a subject; the standalone engine's epochs derive from it,
        #: so a forgotten subject that comes back never gets an epoch it had before
        self.generation = 0
        # the next sweep when the held bytes go over this: the budget, or more after a sweep that could
        # not reach its target
        self._sweep_above = total_bytes
        self.forgotten = ForgottenFilter()
        self.stats = HubStats()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, subject: str) -> SubjectState | None:
        return self._states.get(subject)

    def position(self, subject: str) -> tuple[str, int] | None:
        """(epoch, newest seq) of a subject the hub holds, None for one it does not (never seen or forgotten)."""
        st = self._states.get(subject)
        return None if st is None else (st.epoch, st.last_seq)

    def state(self, subject: str) -> SubjectState:
        st = self._states.get(subject)
        if st is None:
            st = self._states[subject] = SubjectState(subject, self._epoch_of(subject))
            self.bytes += SUBJECT_OVERHEAD + len(subject)
        return st

    def release(self, st: SubjectState) -> None:
        """Forget a subject that holds nothing and has nobody (called when a subscriber leaves)."""
        if st.idle and self._states.get(st.subject) is st:
            del self._states[st.subject]
            self.bytes -= SUBJECT_OVERHEAD + len(st.subject)

    def deliver(self, rec: Record) -> None:
        """The engine's sink: one sequenced record, in seq order per subject."""
        states = self._states
        st = states.get(rec.subject)
        if st is None:
            st = states[rec.subject] = SubjectState(rec.subject, rec.epoch)
            self.bytes += SUBJECT_OVERHEAD + len(rec.subject)
        else:
            if rec.epoch != st.epoch:
                # A new epoch (recreated topic, engine restart): old positions mean nothing any more.
                st.epoch = rec.epoch
                self.bytes -= _ring_cost(st.ring)
                st.ring = None
                self.stats.epoch_changes += 1
            elif st.ring is not None and rec.seq <= st.ring.last_seq:
                self.stats.duplicates += 1
                return
            states.move_to_end(rec.subject)
        frame = encode_text(protocol.msg(rec))
        ring = st.ring
        if ring is None:
            ring = st.ring = Ring(self._history, self._history_bytes)
        self.bytes += ring.append(rec.seq, -1 if rec.prev is None else rec.prev, rec.ts, frame, ENTRY_OVERHEAD)
        st._snapshot_frame = None
        self.stats.records += 1
        self.stats.deliveries += st.channel.publish(frame)
        if st.pending:
            self._offer(st, rec.seq, frame)
        if self.bytes > self._sweep_above:
            self.sweep()

    def deliver_run(self, subject: str, epoch: str, records: list[Any], prev: int | None, now_ms: int) -> None:
        """The engine's batch sink: records of one subject in offset order (objects with .offset,
        .value, .timestamp: seq = offset + 1; a None value is empty content, a None or negative
        timestamp becomes now_ms). `prev` is the seq of the subject's message before the first (0: none,
        None: unknown); each later record's prev is the one before it. Same result as deliver() of each
        record in turn, with the per-subject work done once per run and the per-record loop in fanout
        (the memory budget is checked after the run instead of after every record)."""
        if not records:
            return
        states = self._states
        st = states.get(subject)
        start = 0
        if st is None:
            st = states[subject] = SubjectState(subject, epoch)
            self.bytes += SUBJECT_OVERHEAD + len(subject)
        else:
            if epoch != st.epoch:
                st.epoch = epoch
                self.bytes -= _ring_cost(st.ring)
                st.ring = None
                self.stats.epoch_changes += 1
            elif st.ring is not None:
                held = st.ring.last_seq
                while start < len(records) and records[start].offset + 1 <= held:
                    start += 1
                if start:
                    self.stats.duplicates += start
                    if start == len(records):
                        return
                    prev = records[start - 1].offset + 1
            states.move_to_end(subject)
        if st.pending:
            # a recovery merges live frames one by one (rare): the per-record path
            for i in range(start, len(records)):
                r = records[i]
                seq = r.offset + 1
                ts = now_ms if r.timestamp is None or r.timestamp < 0 else r.timestamp
                self.deliver(Record(subject, b"" if r.value is None else r.value, epoch, seq, prev, ts))
                prev = seq
            return
        ring = st.ring
        if ring is None:
            ring = st.ring = Ring(self._history, self._history_bytes)
        added, deliveries = publish_run(ring, st.channel, protocol.msg_head(subject), epoch.encode(), records,
                                        start, -1 if prev is None else prev, now_ms, protocol.content_member,
                                        ENTRY_OVERHEAD)
        self.bytes += added
        st._snapshot_frame = None
        self.stats.records += len(records) - start
        self.stats.deliveries += deliveries
        if self.bytes > self._sweep_above:
            self.sweep()

    def _offer(self, st: SubjectState, seq: int, frame: bytes) -> None:
        assert st.pending is not None
        for p in list(st.pending):
            if not p.active or p.conn.closed:
                st.remove_pending(p)
            elif p.buffer is not None:
                p.buffer.append((seq, frame))
            elif seq > p.after_seq:
                # the first message past a position that was ahead of us: from here on, live
                st.remove_pending(p)
                p.active = False
                if p.conn.send(frame):
                    self.stats.deliveries += 1
                    st.channel.add(p.conn)

    def forget_epoch(self, epoch: str) -> int:
        """The engine can no longer vouch for `epoch`'s history (Kafka: retention deleted records of the
        partition before it read them, or the topic was deleted or recreated): forget what is held of
        every subject of it. Its messages go (no replay from memory spans the loss, no snapshot predates
        it; a recovery is asked of the engine, and a fresh subscriber's snapshot read from it, as for a
        subject forgotten under the budget), and the subject too when nobody watches it. A watched one
        keeps its subscribers and recoveries in flight and takes the subject's epoch now (a recreated
        topic's new one). O(subjects held): the engine calls it rarely. Returns how many subjects."""
        n = 0
        dropped = False
        for subject, st in list(self._states.items()):
            if st.epoch != epoch:
                continue
            n += 1
            if st.ring is not None:
                self.forgotten.add(subject)
            if st.watched:
                self.bytes -= _ring_cost(st.ring)
                st.ring = None
                st._snapshot_frame = None
                now = self._epoch_of(subject)
                if now != st.epoch:
                    st.epoch = now
                    self.stats.epoch_changes += 1
            else:
                del self._states[subject]
                self.bytes -= SUBJECT_OVERHEAD + len(subject) + _ring_cost(st.ring)
                dropped = True
        if dropped:
            self.generation += 1
        return n

    # ---- the memory budget ----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Bring the held bytes under the budget: forget unwatched subjects, least recently written
        first, then trim the oldest history of watched ones. When even that cannot reach the target
        (watched subjects' newest messages alone exceed it), the next sweep waits until the held bytes
        grew by another 1/16 of the budget, so a hopeless budget does not cost a sweep per message."""
        target = self._target
        states = self._states
        forgotten = 0
        for _ in range(len(states)):
            if self.bytes <= target:
                break
            subject, st = next(iter(states.items()))
            if st.watched:
                states.move_to_end(subject)   # kept; looked at again only after all the others
                continue
            del states[subject]
            self.bytes -= SUBJECT_OVERHEAD + len(subject) + _ring_cost(st.ring)
            if st.ring is not None:
                self.forgotten.add(subject)
            forgotten += 1
        if forgotten:
            self.generation += 1
            self.stats.forgotten += forgotten
        if self.bytes > target:
            self._trim(target)
        futile = self.bytes > target
        self._sweep_above = self.bytes + self.total_bytes // 16 if futile else self.total_bytes

    def _trim(self, target: int) -> None:
        """Halve the history of watched subjects, least recently written first, pass after pass."""
        while self.bytes > target:
            progress = False
            for st in list(self._states.values()):
                ring = st.ring
                if ring is None or len(ring) <= 1:
                    continue
                before = _ring_cost(ring)
                n = len(ring)
                ring.trim(n // 2 if n > 2 else 1)
                self.stats.trimmed += n - len(ring)
                self.bytes -= before - _ring_cost(ring)
                progress = True
                if self.bytes <= target:
                    return
            if not progress:
                return
