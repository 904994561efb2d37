"""The per-process and per-connection resource limits of PROTOCOL.md 1.1 ("Resource limits") that are
not the fan-out's own (max-pending, max-message, fragments, pongs: fanout/_ws.pxd, _writer.pxd):

- `Admission`: how many connections the process (and each client address) may hold, derived from the
  file limit; over it the WebSocket upgrade is refused (503 / 429 with Retry-After) while plain HTTP
  (/healthz, /metrics) still gets the file descriptors kept in reserve;
- `TokenBucket`: publishes per second per connection, with a burst;
- `origin_allowed`: the Origin check of the upgrade (same-origin unless listed).

Every refusal is counted by limit name in `Admission.hits` (gateway_limit_hits_total{limit=...}).
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from collections.abc import Iterable
from urllib.parse import urlsplit

from .config import FD_RESERVE, Config

log = logging.getLogger("gateway.limits")

#: seconds a refused client is told to wait (Retry-After) before it tries again
RETRY_AFTER_S = 5
#: at most one warning per limit per this many seconds (an attack must not flood the log)
WARN_INTERVAL_S = 10.0


def file_limit() -> int:
    """The process's soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def raise_file_limit() -> int:
    """Raise the soft file limit to the hard one (as Go's runtime does); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # e.g. macOS refuses "unlimited": keep the soft limit
    return file_limit()


def default_max_connections(fd_limit: int) -> int:
    """What --max-connections 0 means: the file limit minus the reserve (at least 1)."""
    return max(1, fd_limit - FD_RESERVE)


class Admission:
    """Counts the open TCP connections of the process and of each client address."""

    __slots__ = ("max_connections", "per_address", "fd_limit", "open", "by_address", "hits", "_warned")

    def __init__(self, config: Config, fd_limit: int | None = None) -> None:
        self.fd_limit = file_limit() if fd_limit is None else fd_limit
        self.max_connections = config.max_connections or default_max_connections(self.fd_limit)
        if self.max_connections > default_max_connections(self.fd_limit):
            log.warning("--max-connections %d is more than the file limit allows (RLIMIT_NOFILE %d minus a "
                        "reserve of %d): raise `ulimit -n`", self.max_connections, self.fd_limit, FD_RESERVE)
        self.per_address = config.max_connections_per_address
        self.open = 0
        self.by_address: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self._warned: dict[str, float] = {}

    def opened(self, address: str) -> bool:
        """A TCP connection was accepted. False when the process is so close to its file limit that
        it must be closed at once, before it can use a descriptor of the reserve for its request."""
        self.open += 1
        self.by_address[address] += 1
        # Connections beyond max-connections may still ask for /healthz; past half the reserve
        # the descriptors left are the engine's.
        if self.open > self.max_connections + FD_RESERVE // 2 or self.open > self.fd_limit - FD_RESERVE // 2:
            self.refused("file_limit", f"{self.open} connections open, near the file limit (RLIMIT_NOFILE "
                         f"{self.fd_limit}): closing new connections without an answer")
            return False
        return True

    def closed(self, address: str) -> None:
        self.open -= 1
        left = self.by_address[address] - 1
        if left > 0:
            self.by_address[address] = left
        else:
            del self.by_address[address]

    def check_upgrade(self, address: str) -> tuple[int, str] | None:
        """(HTTP status, reason) when a WebSocket upgrade from `address` is over a limit, else None."""
        if self.open > self.max_connections:
            self.refused("max_connections", f"--max-connections {self.max_connections} reached: "
                         "refusing WebSocket upgrades with 503")
            return 503, "too many connections, retry later"
        if self.per_address and self.by_address[address] > self.per_address:
            self.refused("max_connections_per_address",
                         f"--max-connections-per-address {self.per_address} reached by {address}")
            return 429, "too many connections from this address, retry later"
        return None

    def refused(self, limit: str, warning: str | None = None) -> None:
        """Count one refusal of `limit`; log `warning` at most once per WARN_INTERVAL_S per limit."""
        self.hits[limit] += 1
        if warning is None:
            return
        now = time.monotonic()
        last = self._warned.get(limit)
        if last is None or now - last >= WARN_INTERVAL_S:
            self._warned[limit] = now
            log.warning("%s (%d refused so far)", warning, self.hits[limit])


class TokenBucket:
    """`rate` tokens per second, at most `burst` held; one per publish. Starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "resume_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        #: while its owner is paused for being over the rate: when it reads again (loop time)
        self.resume_at = 0.0

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0 - 1e-9:  # (refills summed in steps must not fall short by a rounding error)
            self.tokens = max(0.0, tokens - 1.0)
            return True
        self.tokens = tokens
        return False

    def wait(self) -> float:
        """Seconds until the next token (after a refused take)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


def _origin_host(origin: str) -> tuple[str, str] | None:
    """(scheme, host:port with the default port made explicit) of an Origin, or None if it is not one."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return scheme, f"{host}:{port or (443 if scheme == 'https' else 80)}"


def _host_header(host: str, tls: bool) -> str | None:
    parsed = _origin_host(("https://" if tls else "http://") + host)
    return None if parsed is None else parsed[1]


def normalize_origins(origins: Iterable[str]) -> frozenset[str] | None:
    """The allowed-origins setting as a set of "scheme://host:port", or None for '*' (all)."""
    out = set()
    for origin in origins:
        if origin.strip() == "*":
            return None
        parsed = _origin_host(origin)
        if parsed is not None:
            out.add(f"{parsed[0]}://{parsed[1]}")
    return frozenset(out)


def origin_allowed(origin: bytes | None, host: bytes, allowed: frozenset[str] | None) -> bool:
    """The Origin rule of PROTOCOL.md 1.1: no Origin (not a browser), the gateway's own origin (Origin's
    host and port equal the Host header's), a listed origin, or anything when `allowed` is None ('*')."""
    if origin is None or allowed is None:
        return True
    parsed = _origin_host(origin.decode("latin-1"))
    if parsed is None:
        return False  # "null" (sandboxed frames, file://) or garbage
    scheme, where = parsed
    if f"{scheme}://{where}" in allowed:
        return True
    # Same origin: the page was served by this gateway (the demo page, client.js). The Host header is
    # what the browser connected to, so a proxy in front keeps this working as long as it keeps Host;
    # Host's default port is taken from the Origin's scheme, as TLS may end at such a proxy.
    return where == _host_header(host.decode("latin-1"), scheme == "https")
