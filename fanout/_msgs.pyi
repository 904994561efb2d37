from collections.abc import Callable
from typing import Any

from ._ring import Ring
from ._writer import Channel

__all__ = ["publish_run"]

def publish_run(
    ring: Ring,
    channel: Channel,
    head: bytes,
    epoch: bytes,
    records: list[Any],
    start: int,
    prev: int,
    now_ms: int,
    content_member: Callable[[bytes], bytes],
    entry_overhead: int = 0,
) -> tuple[int, int]:
    """Encode, keep and publish records[start:] of one subject, in one loop.

    Each record becomes the ``msg`` frame ``protocol.msg`` would give (seq = offset + 1, ts = its
    timestamp or ``now_ms`` when None or negative, a None value is empty content), appended to
    ``ring`` and published to ``channel``.

    Args:
        ring: the subject's recovery window.
        channel: the subject's subscribers.
        head: the payload's start, ``{"op":"msg","subject":"...",``, made once per run.
        epoch: the subject's epoch; must need no JSON escaping (the engines' epochs are hex).
        records: objects with ``.offset``, ``.value`` and ``.timestamp``, in offset order.
        start: the first index of ``records`` to publish (negative: 0).
        prev: the seq of the subject's message before records[start] (0: none, -1: unknown, then
            the first msg has no "prev"); each later record's prev is the one before it.
        now_ms: the timestamp for records without one.
        content_member: for content that is not plain ASCII, returns the whole ``"content":"..."``
            (or ``"content_b64":"..."``) member.
        entry_overhead: bytes counted per held ring entry in the first result.
    Returns:
        (change of the ring's ``nbytes + len * entry_overhead``, frames queued to subscribers).
    Raises:
        ValueError: a seq is not after the ring's last seq (Ring.append).
        TypeError: a value is neither bytes nor None.
    """

