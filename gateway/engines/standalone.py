"""The embedded engine: one process, no Kafka. Seq 1, 2, 3 ... per subject; history lives in the hub's ring.

The epoch is drawn at start, so it changes when the gateway restarts: a client recovering across a
restart gets `recovered:false` (the history died with the process) instead of silently wrong seqs.

The engine keeps no per-subject state: a subject's (epoch, newest seq) is the hub's, so it is bounded
by the hub's memory budget. A subject the hub forgot starts again at seq 1 in a new epoch: the epoch
of a subject the hub does not hold is the start epoch suffixed with the hub's forget `generation`,
which has grown since the subject was forgotten, so an old position can never match a new seq.
"""

from __future__ import annotations

import secrets
import time

from ..records import Record
from ..subjects import Subject
from .base import Engine, EngineUnavailable


class StandaloneEngine(Engine):
    accepts_positions_ahead = False
    publishes_now = True

    def __init__(self) -> None:
        super().__init__()
        self._epoch = secrets.token_hex(8)
        self._current = (0, self._epoch)   # (hub generation, epoch of subjects new in it): shared string
        self._running = False

    async def start(self) -> None:
        if self._held is None:
            raise RuntimeError("the standalone engine needs the hub: bind(sink, held) before start()")
        self._running = True

    async def stop(self) -> None:
        self._running = False

    @property
    def ready(self) -> bool:
        return self._running

    def check_subject(self, subject: Subject) -> None:
        return None  # every legal subject is served

    def _new_epoch(self) -> str:
        """The epoch a subject not held by the hub starts in."""
        assert self._held is not None
        generation = self._held.generation
        if generation != self._current[0]:
            self._current = (generation, f"{self._epoch}-{generation}")
        return self._current[1]

    def epoch(self, subject: Subject) -> str:
        assert self._held is not None
        held = self._held.position(subject.text)
        return self._new_epoch() if held is None else held[0]

    async def publish(self, subject: Subject, content: bytes) -> tuple[str, int]:
        return self.publish_now(subject, content)

    def publish_now(self, subject: Subject, content: bytes) -> tuple[str, int]:
        """Sequence, store and fan out synchronously: durable here means stored and fanned out."""
        if not self._running or self._sink is None or self._held is None:
            raise EngineUnavailable("the engine is not running")
        held = self._held.position(subject.text)
        epoch, prev = (self._new_epoch(), 0) if held is None else held
        seq = prev + 1
        self._sink(Record(subject.text, content, epoch, seq, prev, int(time.time() * 1000)))
        return epoch, seq

    def stats(self) -> dict[str, float]:
        return {} if self._held is None else {"epoch_generation": float(self._held.generation)}
