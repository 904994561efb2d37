"""The embedded engine: one process, no Kafka. Seq 1, 2, 3 ... per subject; history lives in the hub's ring.

The epoch is drawn at start, so it changes when the gateway restarts: a client recovering across a
restart gets `recovered:false` (the history died with the process) instead of silently wrong seqs.
"""

from __future__ import annotations

import secrets
import time

from ..subjects import Subject
from .base import Engine, EngineUnavailable, Record


class StandaloneEngine(Engine):
    accepts_positions_ahead = False

    def __init__(self) -> None:
        super().__init__()
        self._epoch = secrets.token_hex(8)
        self._last: dict[str, int] = {}
        self._running = False

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False

    @property
    def ready(self) -> bool:
        return self._running

    def check_subject(self, subject: Subject) -> None:
        return None  # every legal subject is served

    def epoch(self, subject: Subject) -> str:
        return self._epoch

    async def publish(self, subject: Subject, content: bytes) -> tuple[str, int]:
        return self.publish_now(subject, content)

    def publish_now(self, subject: Subject, content: bytes) -> tuple[str, int]:
        """Sequence, store and fan out synchronously: durable here means stored and fanned out."""
        if not self._running or self._sink is None:
            raise EngineUnavailable("the engine is not running")
        prev = self._last.get(subject.text, 0)
        seq = prev + 1
        self._last[subject.text] = seq
        self._sink(Record(subject.text, content, self._epoch, seq, prev, int(time.time() * 1000)))
        return self._epoch, seq

    def stats(self) -> dict[str, float]:
        return {"subjects": len(self._last)}
