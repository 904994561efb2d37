"""The interface between the gateway and a message engine.

An engine turns publishes into sequenced records and feeds every sequenced record, in seq order per
subject, into one sink (the hub), which keeps the per-subject ring and fans out. The gateway never
knows whether a record came from its own publish or from another producer.

    client publish -> engine.publish() -> (epoch, seq)      [ack after the record is durable]
    engine -------> sink(Record) -> hub: ring + fan-out      [every record, publisher's own included]
    recovery -----> hub ring first, else engine.replay()     [Kafka reads the partition again]
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..records import Record
from ..subjects import Subject

# Record: gateway/records.py
__all__ = ["Engine", "EngineUnavailable", "Forget", "Held", "Record", "Sink", "UnknownTopic"]


class EngineUnavailable(Exception):
    """The engine cannot take a publish now (Kafka unreachable, timed out): error code `unavailable`."""


class UnknownTopic(Exception):
    """The subject's topic is not served by this gateway: error code `unknown_topic`."""


Sink = Callable[[Record], None]
#: The batch sink (Hub.deliver_run): (subject, epoch, records of that subject in offset order with
#: .offset/.value/.timestamp, seq of the subject's message before the first (0 none, None unknown), now in ms)
RunSink = Callable[[str, str, list[Any], "int | None", int], None]
#: (Hub.forget_epoch) told an epoch whose history the engine can no longer vouch for: records of it were
#: lost before the engine read them (Kafka: retention while the gateway could not read), or it ended (a
#: topic deleted or recreated). The hub forgets what it holds of that epoch's subjects.
Forget = Callable[[str], object]


class Held(Protocol):
    """What the hub tells an engine about the subjects it holds (the hub forgets subjects under its
    memory budget; an engine that keeps no per-subject state of its own asks here)."""

    @property
    def generation(self) -> int:
        """Grows every time the hub forgets subjects."""

    def position(self, subject: str) -> tuple[str, int] | None:
        """(epoch, newest seq) of a held subject; None when not held (never seen, or forgotten)."""


class Engine(abc.ABC):
    """What the hub, the sessions and recovery need from an engine."""

    #: In the Kafka engine a recovery position ahead of what this gateway has read is valid
    #: (another gateway was faster); in the standalone engine it is not (recovered:false).
    accepts_positions_ahead: bool = False

    #: True when publish_now() is supported: the engine sequences, stores and fans out a publish
    #: before it returns (standalone), so the session acks it at once instead of awaiting publish().
    publishes_now: bool = False

    def __init__(self) -> None:
        self._sink: Sink | None = None
        self._held: Held | None = None
        self._run_sink: RunSink | None = None
        self._forget: Forget | None = None

    def bind(self, sink: Sink, held: Held | None = None, run_sink: RunSink | None = None,
             forget: Forget | None = None) -> None:
        """Set where sequenced records go (the hub's deliver) and what the hub holds. Called once,
        before start(). An engine that reads records in batches hands them to `run_sink` (the hub's
        deliver_run), one run per subject, when given, instead of a Record each to `sink`. `forget`
        (the hub's forget_epoch) is told an epoch whose held history no longer stands (see Forget)."""
        self._sink = sink
        self._held = held
        self._run_sink = run_sink
        self._forget = forget

    @abc.abstractmethod
    async def start(self) -> None:
        """Start; returns when the engine can take publishes (Kafka may still be catching up)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop and release resources; idempotent."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once the gateway may report healthy (Kafka: partitions assigned and caught up)."""

    def health(self) -> dict[str, Any]:
        """What /healthz reports: "status" (ok, starting, degraded), a "reason" unless ok, and details;
        "unreachable_s" when the engine cannot reach its storage (seconds since)."""
        return {"status": "ok"} if self.ready else {"status": "starting", "reason": "starting"}

    def partition_stats(self) -> list[tuple[str, int, int | None, int]]:
        """(topic, partition, lag or None when unknown, records read) per partition read; [] without."""
        return []

    def produce_latency(self) -> tuple[Sequence[float], list[int], float] | None:
        """Publish-to-ack latency: (bucket upper bounds in s, count per bucket (not cumulative, one more
        for +Inf), sum in s); None when the engine does not measure it."""
        return None

    @property
    def connected(self) -> bool:
        """False while the engine cannot reach its storage (Kafka); always True without one."""
        return True

    @abc.abstractmethod
    def check_subject(self, subject: Subject) -> None:
        """Raise UnknownTopic when the subject's topic is not served."""

    @abc.abstractmethod
    def epoch(self, subject: Subject) -> str:
        """The subject's current epoch (also when no message of it is held)."""

    @abc.abstractmethod
    async def publish(self, subject: Subject, content: bytes) -> tuple[str, int]:
        """Make the message durable and return its (epoch, seq); raise EngineUnavailable or UnknownTopic.

        The record also reaches the sink (possibly before this returns), like any other record.
        """

    def publish_now(self, subject: Subject, content: bytes) -> tuple[str, int]:
        """Sequence, store and fan out the message before returning; only where `publishes_now` is True.

        Args:
            subject: where the message goes (already checked with check_subject()).
            content: the message's bytes.
        Returns:
            The message's (epoch, seq); the record reached the sink before this returns.
        Raises:
            EngineUnavailable: the engine is not running.
            NotImplementedError: the engine has no synchronous publish (`publishes_now` is False); use
                publish().
        """
        raise NotImplementedError(f"{type(self).__name__} has no synchronous publish; await publish()")

    def read_through(self, subject: Subject) -> int | None:
        """The seq up to which the subject's partition has been handed to the sink; None when not known.

        Recovery uses it to tell a position really ahead of this gateway from one whose messages this
        gateway read before the hub held the subject (Kafka: older than the warmup window). The default
        engine reads nothing ahead of the hub: None.
        """
        return None

    async def replay(self, subject: Subject, epoch: str, after_seq: int, upto_seq: int) -> list[Record] | None:
        """Records of `subject` with after_seq < seq <= upto_seq, read from durable storage, in order.

        None when they cannot be had (epoch changed, older than retention, too many to read). The
        default engine keeps nothing beyond the hub's ring.
        """
        return None

    async def latest(self, subject: Subject) -> Record | None:
        """The subject's newest record read from durable storage (a snapshot for a subject the hub
        forgot), None when there is none within reach. The default engine keeps nothing else."""
        return None

    def known_end_seq(self, subject: Subject) -> int | None:
        """What the engine last heard of the subject's partition end (Kafka: the high watermark of its
        last fetch), without asking; a lower bound of end_seq(). None when it knows nothing."""
        return None

    async def end_seq(self, subject: Subject, epoch: str) -> int | None:
        """The newest seq that durable storage holds in the subject's partition (Kafka: its end
        offset), asked of the storage now; None when it cannot be told (storage unreachable, another
        epoch). Recovery asks it of a position ahead of what this gateway has read (protocol 1.1)."""
        return None

    def stats(self) -> dict[str, float]:
        """Engine-specific counters for /metrics (name -> value)."""
        return {}
