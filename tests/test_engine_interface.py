"""Optional engine features are declared on Engine (gateway/engines/base.py), not probed with getattr."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.engines.base import Engine
from gateway.engines.standalone import StandaloneEngine
from gateway.hub import Hub
from gateway.subjects import Subject, parse_subject


class OnlyRequired(Engine):
    """An engine with just the abstract methods: every optional feature takes its default."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def check_subject(self, subject: Subject) -> None:
        pass

    def epoch(self, subject: Subject) -> str:
        return "e"

    async def publish(self, subject: Subject, content: bytes) -> tuple[str, int]:
        return "e", 1


async def test_defaults_say_not_supported() -> None:
    engine = OnlyRequired()
    subject = parse_subject("/a/1")
    assert engine.publishes_now is False
    with pytest.raises(NotImplementedError, match="OnlyRequired has no synchronous publish"):
        engine.publish_now(subject, b"x")
    assert engine.read_through(subject) is None
    assert await engine.replay(subject, "e", 0, 1) is None
    assert await engine.latest(subject) is None
    assert engine.known_end_seq(subject) is None


async def test_standalone_declares_publish_now() -> None:
    engine = StandaloneEngine()
    hub = Hub(lambda text: engine.epoch(parse_subject(text)), 10, 1 << 20)
    seen: list[Any] = []
    engine.bind(lambda record: (seen.append(record), hub.deliver(record)), hub)
    await engine.start()
    assert engine.publishes_now is True
    epoch, seq = engine.publish_now(parse_subject("/a/1"), b"x")
    assert seq == 1 and [(r.subject, r.seq, r.epoch) for r in seen] == [("/a/1", 1, epoch)]
