from collections.abc import Callable
from typing import Any

from ._ring import Ring
from ._writer import Channel

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
) -> tuple[int, int]: ...
