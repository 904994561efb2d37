"""Reading one sample of the gateway's /metrics (Prometheus text format), for the tests."""

from __future__ import annotations

import re
import urllib.request

from .ws import WAIT


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of `name` with exactly `labels` (e.g. '{limit="origin"}') in a /metrics body; fails the
    test when there is no such sample."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def metric(port: int, name: str, labels: str = "") -> float:
    """Scrape the gateway on `port` now (blocking: from a coroutine, asyncio.to_thread) and read one sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as resp:
        return sample(resp.read().decode(), name, labels)
