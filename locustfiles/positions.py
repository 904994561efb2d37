"""Per-subject positions of one client, and the verdict on every `msg` (sans-I/O, no Locust import).

The Locust users in `gateway.py` keep one `Positions` per connection and ask it about every frame:

    subscribe_entry(S)  -> the entry to put in a `subscribe` (with the last epoch/seq once there is one)
    on_subscribed(...)  -> True when a position was given and the gateway could not recover it (a loss)
    on_msg(...)         -> Verdict: LIVE, REPLAYED, SNAPSHOT, DUPLICATE, GAP, IGNORED

It follows the client obligations of protocol 1.1 (../shared/PROTOCOL.md): a message whose seq is not
above the last one of the same epoch is a duplicate and is dropped; a `prev` that differs from the last
seq is a gap, and the caller subscribes again with the last position (negative feedback), the position
staying where it was so that the replay fills the hole. Frames of a subject between that `subscribe`
and its `subscribed` belong to the replaced subscription and are ignored (the replay brings them).
Kept free of Locust and gevent so the test suite can import it without gevent's monkey-patching.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    LIVE = "live"              # next in order
    REPLAYED = "replayed"      # next in order, sent by the recovery (seq <= newest at subscribe time)
    SNAPSHOT = "snapshot"      # the subject's latest message, sent on a subscribe that did not recover
    DUPLICATE = "duplicate"    # seq not above the last seq of the same epoch: dropped
    GAP = "gap"                # prev differs from the last seq, or the epoch changed: resubscribe
    IGNORED = "ignored"        # not subscribed, or a resubscribe is in flight


@dataclass
class SubjectState:
    epoch: str | None = None   # None until the first `subscribed`
    seq: int = 0               # last seq received (or the subscribed seq when nothing was recovered)
    pending: bool = False      # a `subscribe` is in flight
    asked_with_position: bool = False
    replay_until: int = 0      # seqs up to this one, after a recovery, are replayed, not live


class Positions:
    """The positions of one connection's subjects (survives reconnects: that is the point)."""

    def __init__(self, subjects: list[str] | tuple[str, ...] = ()) -> None:
        self.subjects: dict[str, SubjectState] = {s: SubjectState() for s in subjects}

    def subscribe_entry(self, subject: str) -> dict:
        """The `subjects` entry for a (re)subscribe; marks the subject as waiting for `subscribed`."""
        state = self.subjects.setdefault(subject, SubjectState())
        state.pending = True
        state.asked_with_position = state.epoch is not None
        if state.epoch is None:
            return {"subject": subject}
        return {"subject": subject, "epoch": state.epoch, "seq": state.seq}

    def on_subscribed(self, subject: str, epoch: str, seq: int, recovered: bool) -> bool:
        """Apply a `subscribed`; returns True when a given position was not recovered (messages lost)."""
        state = self.subjects.get(subject)
        if state is None:
            return False
        state.pending = False
        if recovered and state.epoch == epoch:
            state.replay_until = seq
            return False
        lost = state.asked_with_position
        state.epoch, state.seq, state.replay_until = epoch, seq, 0
        return lost

    def on_msg(self, subject: str, epoch: str, seq: int, prev: int | None, snapshot: bool = False) -> Verdict:
        state = self.subjects.get(subject)
        if state is None or state.pending or state.epoch is None:
            return Verdict.IGNORED
        if snapshot:
            state.epoch, state.seq = epoch, seq
            return Verdict.SNAPSHOT
        if epoch != state.epoch:
            return Verdict.GAP
        if seq <= state.seq:
            return Verdict.DUPLICATE
        if prev is not None and prev != state.seq:
            return Verdict.GAP
        state.seq = seq
        return Verdict.REPLAYED if seq <= state.replay_until else Verdict.LIVE
