"""The client's subscription logic without I/O: frames in, events and frames out.

``SubscriptionTracker`` is what a gateway client must do for its subscriptions (PROTOCOL.md, "Client
obligations"), and nothing else: it keeps the last (epoch, seq) of every subject, drops duplicates,
holds a subject back on a ``prev`` gap and asks for it again from its last position, resubscribes
every subject with its position on every new connection, and tells the errors that answer a
``subscribe`` from the others. It never opens a socket, never sleeps and never reads a clock, the
way ``websockets`` separates its protocol (``ClientProtocol``: ``receive_data`` / ``events_received`` /
``data_to_send``) from its asyncio connection: the asyncio ``gateway.client.Client`` runs it, and
anything else (a test, another event loop, a replay of recorded frames) can run it too.

    tracker = SubscriptionTracker()
    tracker.subscribe(["/matches/football/5"])
    tracker.connection_made()                  # a connection is up (`connected` received)
    send(tracker.frames_to_send())             # -> [{"op": "subscribe", "subjects": [...]}]
    for event in tracker.receive(frame):       # every frame received
        ...                                    # Delivered, Subscribed, Gap, Refused, Unsubscribed
    send(tracker.frames_to_send())             # e.g. the resubscription after a gap
    tracker.connection_lost()

The browser client (gateway/static/client.js, ``SubscriptionTracker``) follows the same rules; one
fixture of frame sequences (tests/fixtures/tracker_cases.json) holds both to them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "Delivered",
    "ErrorKind",
    "Event",
    "Gap",
    "Message",
    "Refused",
    "Subscribed",
    "SubscriptionTracker",
    "Unsubscribed",
    "Verdict",
    "classify",
    "decode_message",
    "error_kind",
]

#: Errors that answer one entry of a `subscribe` (PROTOCOL.md "Subscribing"); bad_request also
#: carries `subject` when an entry is malformed. Used to recognise them from a 1.0 gateway, which
#: does not say which request an error answers.
SUBSCRIBE_ERRORS: Final = frozenset({"forbidden", "invalid_subject", "unknown_topic", "bad_request",
                                     "limit_exceeded"})

Position = tuple[str, int]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Message:
    """One `msg` frame. `data` is `content` encoded as UTF-8, or the decoded `content_b64`."""

    subject: str
    content: str | None
    data: bytes
    epoch: str
    seq: int
    prev: int | None
    ts: int | None
    snapshot: bool


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message to hand to the application: the next one of its subject, never seen before."""

    message: Message


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The gateway's `subscribed`: the subject's epoch, its newest seq, and whether the position sent
    was recovered (every message after it follows). `tracked` is False when the subject was
    unsubscribed meanwhile."""

    subject: str
    epoch: str | None
    seq: int | None
    recovered: bool
    tracked: bool


@dataclass(frozen=True, slots=True)
class Gap:
    """A `prev` gap: the subject had (epoch, seq) and got `got_seq` after `got_prev`. The tracker has
    queued a `subscribe` from (epoch, seq) and holds the subject back until its `subscribed`."""

    subject: str
    epoch: str
    seq: int
    got_seq: int
    got_prev: int | None


@dataclass(frozen=True, slots=True)
class Refused:
    """The gateway refused a subscribe entry, or ended a subscription (a refreshed token no longer
    allows it): the tracker no longer holds the subject. `frame` is the `error` frame; `tracked` is
    False when the subject was not (or no longer) subscribed."""

    subject: str
    frame: Mapping[str, Any]
    tracked: bool


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The gateway's `unsubscribed` answer."""

    subject: str


Event = Delivered | Subscribed | Gap | Refused | Unsubscribed


# --------------------------------------------------------------------------- pure functions


Verdict = Literal["deliver", "duplicate", "gap"]


def classify(
    last: Position | None,
    epoch: str,
    seq: int,
    prev: int | None,
    *,
    snapshot: bool = False,
    skip_prev: bool = False,
) -> Verdict:
    """What to do with a message, given the last position received for its subject.

    Args:
        last: the subject's last (epoch, seq), or None when nothing was received yet.
        epoch, seq, prev: the message's fields (`prev` None when the gateway did not send it).
        snapshot: the message is the subject's snapshot (a known jump).
        skip_prev: the first message after a `subscribed` with `recovered:false` (a known jump).

    Returns:
        "deliver", "duplicate" (seq <= the last seq of the same epoch) or "gap" (`prev` is not the
        last seq). Another epoch (or no position yet) starts afresh. A snapshot or a skip_prev
        message is not a gap: otherwise resubscribing would get the same answer forever.
    """
    if last is None or last[0] != epoch:
        return "deliver"
    if seq <= last[1]:
        return "duplicate"
    if prev is not None and prev != last[1] and not snapshot and not skip_prev:
        return "gap"
    return "deliver"


ErrorKind = Literal["publish", "subscribe", "refresh", "connect", "other", "unknown"]


def error_kind(frame: Mapping[str, Any]) -> ErrorKind:
    """What an `error` frame answers, from its `request` field (1.1).

    Args:
        frame: a decoded `error` frame.

    Returns:
        "publish", "subscribe", "refresh", "connect", "other" (another request), or "unknown" for a
        gateway that does not send `request` (1.0): then the client falls back to its own bookkeeping.
    """
    request = frame.get("request")
    if not isinstance(request, str):
        return "unknown"
    if request in ("publish", "subscribe", "refresh", "connect"):
        return request  # type: ignore[return-value]
    return "other"


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_message(frame: Mapping[str, Any]) -> Message | None:
    """A `msg` frame as a Message.

    Args:
        frame: a decoded `msg` frame.

    Returns:
        The Message, or None when a required field (subject, epoch, seq) is missing or mistyped, or
        `content_b64` is not base64. Never raises.
    """
    subject = frame.get("subject")
    epoch = frame.get("epoch")
    seq = _opt_int(frame.get("seq"))
    if not isinstance(subject, str) or not isinstance(epoch, str) or seq is None:
        return None
    content = frame.get("content")
    if isinstance(content, str):
        data = content.encode("utf-8", "surrogatepass")
    else:
        b64 = frame.get("content_b64")
        content = None
        if isinstance(b64, str):
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                return None
        elif b64 is None:
            data = b""
        else:
            return None
    return Message(
        subject,
        content,
        data,
        epoch,
        seq,
        _opt_int(frame.get("prev")),
        _opt_int(frame.get("ts")),
        frame.get("snapshot") is True,
    )


# --------------------------------------------------------------------------- the tracker


class SubscriptionTracker:
    """The subscriptions of one client across its connections (see the module docstring).

    Attributes:
        positions: subject -> the last (epoch, seq) delivered (or given as a starting position);
            `unsubscribe` forgets it, `drop` keeps it. A caller may set one (the page that counts
            what it shows rewinds it to what it counted) before subscribing again.
        stats: counters: messages (delivered), duplicates_dropped, gaps_detected, resubscribes
            (subscribe entries sent again: after a gap, or on a new connection).
        connected: between `connection_made` and `connection_lost`.
    """

    __slots__ = ("_awaiting", "_ever_connected", "_out", "_resyncing", "_skip_prev", "_subjects",
                 "connected", "positions", "stats")

    def __init__(self, stats: dict[str, int] | None = None) -> None:
        """Args:
            stats: a dict to count into (the asyncio client shares its own); a new one if None.
        """
        self.positions: dict[str, Position] = {}
        self.stats: dict[str, int] = stats if stats is not None else {}
        for key in ("messages", "duplicates_dropped", "gaps_detected", "resubscribes"):
            self.stats.setdefault(key, 0)
        self.connected = False
        self._subjects: dict[str, None] = {}  # insertion-ordered set
        self._out: list[dict[str, Any]] = []
        # Subscribe entries sent on this connection and not yet answered, per subject: tells a
        # subscribe error from the error of a fire-and-forget publish to the same subject (1.0).
        self._awaiting: dict[str, int] = {}
        self._resyncing: set[str] = set()  # held back after a gap until `subscribed`
        self._skip_prev: set[str] = set()  # after `recovered:false`: the next message is a jump
        self._ever_connected = False

    def __repr__(self) -> str:
        return (f"<SubscriptionTracker subjects={len(self._subjects)} connected={self.connected} "
                f"resyncing={sorted(self._resyncing)}>")

    @property
    def subjects(self) -> tuple[str, ...]:
        """The subjects held, in the order they were first subscribed."""
        return tuple(self._subjects)

    def __contains__(self, subject: object) -> bool:
        return subject in self._subjects

    # ----------------------------------------------------------------- what the application does

    def subscribe(self, subjects: Iterable[str], positions: Mapping[str, Position] | None = None) -> None:
        """Hold `subjects` and, when connected, queue one `subscribe` frame for them.

        Args:
            subjects: subjects to subscribe (again: a subscribed subject is asked for once more, from
                its position, which makes the gateway replay after it).
            positions: a starting (epoch, seq) per subject, used only for a subject with no position
                yet (what was received wins over what the caller remembers).

        A subject is not validated here: the caller does (gateway.subjects.parse_subject) or the
        gateway answers `invalid_subject`.
        """
        subjects = list(subjects)
        for subject in subjects:
            self._subjects[subject] = None
            if positions is not None and subject in positions and subject not in self.positions:
                epoch, seq = positions[subject]
                self.positions[subject] = (str(epoch), int(seq))
        if self.connected and subjects:
            self._queue_subscribe(subjects)

    def unsubscribe(self, subject: str) -> None:
        """Forget `subject` and its position; when connected, queue an `unsubscribe` frame. Messages
        of the subject that still arrive are dropped."""
        self.drop(subject)
        self.positions.pop(subject, None)
        if self.connected:
            self._out.append({"op": "unsubscribe", "subjects": [subject]})

    def drop(self, subject: str) -> bool:
        """Stop holding `subject` without telling the gateway (e.g. the caller gave up waiting for
        its `subscribed`); its position is kept. Returns whether it was held."""
        self._resyncing.discard(subject)
        self._skip_prev.discard(subject)
        if subject not in self._subjects:
            return False
        del self._subjects[subject]
        return True

    # ----------------------------------------------------------------- what the connection does

    def connection_made(self) -> int:
        """A connection is up (its `connected` arrived): queue one `subscribe` with every subject and
        its position, so the gateway replays what was missed.

        Returns:
            The number of subjects resubscribed.
        """
        self.connected = True
        self._awaiting.clear()
        self._resyncing.clear()  # the resubscription carries every position
        subjects = list(self._subjects)
        if subjects:
            if self._ever_connected:
                self.stats["resubscribes"] += len(subjects)
            self._queue_subscribe(subjects)
        self._ever_connected = True
        return len(subjects)

    def connection_lost(self) -> None:
        """The connection is gone: frames not yet taken by `frames_to_send` are dropped (the next
        `connection_made` resubscribes everything)."""
        self.connected = False
        self._out.clear()
        self._awaiting.clear()
        self._resyncing.clear()

    def frames_to_send(self) -> list[dict[str, Any]]:
        """The frames queued since the last call, oldest first (to be sent in this order)."""
        out, self._out = self._out, []
        return out

    def receive(self, frame: Mapping[str, Any]) -> list[Event]:
        """Handle one frame from the gateway.

        Args:
            frame: a decoded frame (any op; the ones that are not about subscriptions are ignored).

        Returns:
            The events it causes, in order (an empty list for a duplicate, a message held back, a
            malformed one, or a frame about something else, such as an `ack` or the error of a
            publish). A `Gap` also queues a `subscribe` frame (see `frames_to_send`). Never raises on
            bad input.
        """
        op = frame.get("op")
        if op == "msg":
            return self._on_msg(frame)
        if op == "subscribed":
            return self._on_subscribed(frame)
        if op == "error":
            return self._on_error(frame)
        if op == "unsubscribed":
            subject = frame.get("subject")
            return [Unsubscribed(subject)] if isinstance(subject, str) else []
        return []

    # ----------------------------------------------------------------- internals

    def _entry(self, subject: str) -> dict[str, Any]:
        pos = self.positions.get(subject)
        if pos is None:
            return {"subject": subject}
        return {"subject": subject, "epoch": pos[0], "seq": pos[1]}

    def _queue_subscribe(self, subjects: Sequence[str]) -> None:
        self._out.append({"op": "subscribe", "subjects": [self._entry(s) for s in subjects]})
        for s in subjects:
            self._awaiting[s] = self._awaiting.get(s, 0) + 1

    def _answered(self, subject: str) -> bool:
        count = self._awaiting.get(subject, 0)
        if count <= 0:
            return False
        if count == 1:
            del self._awaiting[subject]
        else:
            self._awaiting[subject] = count - 1
        return True

    def _on_msg(self, frame: Mapping[str, Any]) -> list[Event]:
        subject = frame.get("subject")
        if not isinstance(subject, str) or subject not in self._subjects or subject in self._resyncing:
            return []  # unsubscribed, or held back until `subscribed` replays the gap
        msg = decode_message(frame)
        if msg is None:
            return []
        last = self.positions.get(subject)
        verdict = classify(last, msg.epoch, msg.seq, msg.prev,
                           snapshot=msg.snapshot, skip_prev=subject in self._skip_prev)
        if verdict == "duplicate":
            self.stats["duplicates_dropped"] += 1
            return []
        if verdict == "gap":
            assert last is not None
            # Negative feedback: subscribe again from the last position, on this connection.
            self.stats["gaps_detected"] += 1
            self.stats["resubscribes"] += 1
            self._resyncing.add(subject)
            self._queue_subscribe([subject])
            return [Gap(subject, last[0], last[1], msg.seq, msg.prev)]
        self._skip_prev.discard(subject)
        self.positions[subject] = (msg.epoch, msg.seq)
        self.stats["messages"] += 1
        return [Delivered(msg)]

    def _on_subscribed(self, frame: Mapping[str, Any]) -> list[Event]:
        subject = frame.get("subject")
        if not isinstance(subject, str):
            return []
        self._answered(subject)
        epoch = frame.get("epoch")
        recovered = frame.get("recovered") is True
        tracked = subject in self._subjects
        if tracked:
            self._resyncing.discard(subject)
            if recovered:
                self._skip_prev.discard(subject)
            else:
                self._skip_prev.add(subject)  # a snapshot or a jump follows: not a gap
        return [Subscribed(subject, epoch if isinstance(epoch, str) else None,
                           _opt_int(frame.get("seq")), recovered, tracked)]

    def _on_error(self, frame: Mapping[str, Any]) -> list[Event]:
        subject = frame.get("subject")
        if not isinstance(subject, str):
            return []
        kind = error_kind(frame)
        if kind == "refresh":  # the refreshed token no longer allows this subscription
            if subject not in self._subjects:
                return []
        elif kind == "subscribe":
            self._answered(subject)
        elif kind == "unknown":  # a 1.0 gateway: an error of a subject with a subscribe entry pending
            code = frame.get("code")
            if code not in SUBSCRIBE_ERRORS or not self._answered(subject):
                return []
        else:
            return []  # a publish's error (or another request's): subscriptions are not concerned
        return [Refused(subject, frame, self.drop(subject))]
