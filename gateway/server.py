"""The listener: one port for WebSocket (/ws) and plain HTTP (/healthz, /metrics, and the demo page: /,
/demo.js, /client.js and its types /client.d.ts, /favicon.ico), the liveness sweep (heartbeats, pings, dead
peers, connect timeout), and the lifecycle.

Each connection is one Session (gateway/session.py) on the loop's own transports: httptools parses the
HTTP request (gateway/http.py), fanout.WSConn the client frames, and every outbound frame goes through
fanout's writer.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import ssl
import time
from collections.abc import Coroutine
from typing import Any

import orjson

from fanout import COMPILED, Writer, WSState

from . import __version__, http, protocol, tls
from .auth import Authenticator, ExpiryQueue
from .config import Config
from .engines.base import Engine
from .hub import Hub
from .limits import RETRY_AFTER_S, Admission, normalize_origins, origin_allowed
from .metrics import CONTENT_TYPE, Stats, make_renderer
from .session import Session
from .subjects import parse_subject

#: which fanout runs (start-up line, /healthz; /metrics: gateway_fanout_compiled): the compiled modules,
#: or the pure-Python twins (FANOUT_NO_EXTENSIONS=1), many times slower
FANOUT_KIND = "compiled" if COMPILED else "pure-Python"

log = logging.getLogger("gateway")


def make_engine(config: Config) -> Engine:
    if config.kafka:
        from .engines.kafka import KafkaEngine
        from .engines.kafka_security import KafkaSecurity

        idem = {"on": True, "off": False, "auto": None}[config.kafka_idempotence]
        return KafkaEngine(
            config.kafka, config.topics,
            fetch_wait_ms=config.kafka_fetch_wait_ms,
            linger_ms=config.kafka_linger_ms,
            warmup_records=config.warmup_records,
            max_recovery_records=config.max_recovery_records,
            idempotence=idem,
            publish_timeout=config.kafka_publish_timeout_ms / 1000,
            metadata_refresh_s=config.kafka_metadata_refresh_ms / 1000,
            client_id=f"gateway-{config.node_id}",
            security=KafkaSecurity.from_config(config),
            max_message_bytes=config.max_message_bytes,
        )
    from .engines.standalone import StandaloneEngine

    return StandaloneEngine()


def make_authenticator(config: Config) -> Authenticator:
    """Raises auth.KeyConfigError (a ValueError) for an empty secret or an unusable key file."""
    public_key = None
    if config.jwt_public_key is not None:
        with open(config.jwt_public_key, "rb") as fh:
            public_key = fh.read()
    return Authenticator(secret=config.jwt_secret, public_key_pem=public_key, audience=config.jwt_audience,
                         issuer=config.jwt_issuer, leeway=config.jwt_leeway_ms / 1000,
                         max_lifetime=config.jwt_max_lifetime_s or None)


def _static(name: str) -> bytes:
    return importlib.resources.files("gateway").joinpath("static", name).read_bytes()


class Gateway:
    """One gateway process: engine + hub + fan-out writer + listener."""

    #: after a close frame is queued, how long the peer gets to finish before the socket is aborted
    close_grace = 2.0

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        self.node_id: str = config.node_id or "gateway"
        self.engine = engine or make_engine(config)
        self.hub = Hub(self._epoch_of, config.history, config.history_bytes, config.history_total_bytes)
        self.engine.bind(self.hub.deliver, self.hub, self.hub.deliver_run, self.hub.forget_epoch)
        self.auth = make_authenticator(config)
        if not self.auth.enabled:
            log.warning("auth is off: no --jwt-secret or --jwt-public-key, every client may subscribe and "
                        "publish to everything")
        elif config.jwt_secret is not None and len(config.jwt_secret.encode()) < 32:
            log.warning("--jwt-secret is %d bytes: HMAC secrets should have at least 32 (RFC 7518, 3.2)",
                        len(config.jwt_secret.encode()))
        # sessions by the time their token runs out (exp + leeway); drained by the sweep
        self.expiries: ExpiryQueue[Session] = ExpiryQueue()
        self.stats = Stats()
        self.admission = Admission(config)
        self._origins = normalize_origins(config.allowed_origins)
        self.sessions: set[Session] = set()
        # sessions not connected yet -> when they were accepted (the sweep enforces the timeouts); a
        # connected session keeps no such time
        self._unconnected: dict[Session, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.writer: Writer = None  # type: ignore[assignment]
        self._render_metrics = make_renderer(self)
        # path: (content type, body, headers). The SDK files are for pages of any origin: a module script
        # from another origin is fetched with CORS, so it needs Access-Control-Allow-Origin (public,
        # static, no credentials: "*").
        sdk: tuple[tuple[str, str], ...] = (("Access-Control-Allow-Origin", "*"),)
        self._pages = {b"/": ("text/html; charset=utf-8", _static("index.html"), ()),
                       b"/demo.js": ("text/javascript; charset=utf-8", _static("demo.js"), ()),
                       b"/client.js": ("text/javascript; charset=utf-8", _static("client.js"), sdk),
                       # client.js's TypeScript declarations (no registered media type; this is the
                       # one TypeScript tooling and Deno use)
                       b"/client.d.ts": ("application/typescript; charset=utf-8", _static("client.d.ts"), sdk),
                       b"/favicon.ico": ("image/x-icon", _static("favicon.ico"), ())}

    def _epoch_of(self, subject: str) -> str:
        return self.engine.epoch(parse_subject(subject))

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self, *, reuse_port: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer = Writer(self.loop, coalesce_window=self.config.coalesce_us / 1e6,
                             coalesce_min_conns=self.config.coalesce_min_conns,
                             coalesce_busy=self.config.coalesce_busy_pct / 100)
        await self.engine.start()
        if self.config.tls_cert:  # started per connection, after the accept (gateway/tls.py says why)
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self._server = await self.loop.create_server(
            self._new_session,
            self.config.host,
            self.config.port,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        self._sweeper = self.loop.create_task(self._sweep_forever())

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{scheme}://{host}:{self.port}/"

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, stop the engine. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions | self._unconnected.keys()):
            session.disconnect(protocol.CloseCode.GOING_AWAY, "gateway shutting down")
        if self.writer is not None:
            self.writer.flush()
        deadline = self.loop.time() + 2.0
        while (self.sessions or self._unconnected) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions | self._unconnected.keys()):
            session._abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.engine.stop(), 2.0)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise   # the stop itself is cancelled
            log.warning("engine did not stop cleanly (a cancellation from inside it)", exc_info=True)
        except (TimeoutError, Exception):  # noqa: BLE001 - exit within the SIGTERM budget anyway
            log.warning("engine did not stop cleanly", exc_info=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    # ---- connections -----------------------------------------------------------------------------------

    def connection_made(self, session: Session) -> bool:
        """A TCP connection was accepted; False: close it at once (the process is out of descriptors)."""
        if not self.admission.opened(session.address):
            return False
        self._unconnected[session] = self.loop.time()
        if self._tls is not None:
            tls.start(self, session, self._tls)  # in connection_made, before the first read
        return True

    def session_opened(self, session: Session) -> None:
        """The WebSocket upgrade is done."""
        self.stats.connections_total += 1
        self.sessions.add(session)

    def session_connected(self, session: Session) -> None:
        self._unconnected.pop(session, None)

    def session_closed(self, session: Session) -> None:
        """The connection is gone (its connection_lost), whatever state it reached."""
        self.sessions.discard(session)
        self._unconnected.pop(session, None)
        self.admission.closed(session.address)

    def _new_session(self) -> asyncio.Protocol:
        return Session(self)  # type: ignore[return-value]  # an asyncio protocol by duck typing (Cython base)

    async def _sweep_forever(self) -> None:
        hb = self.config.heartbeat_ms / 1000
        handshake = self.config.handshake_timeout_ms / 1000
        interval = min(max(min(hb, handshake) / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(self.loop.time())
            except Exception:  # noqa: BLE001 - liveness must keep running
                log.exception("sweep failed")

    def sweep(self, now: float) -> None:
        """Heartbeats after `heartbeat_ms` of output silence; a ping after twice as much input silence;
        close 1011 after 3x without anything from the peer; close 1008 without connect in time; close
        without a response a connection whose HTTP request is not complete within handshake_timeout_ms.

        Why a ping only after 2x: a dead peer is closed 3x after its last input whenever it is pinged,
        so pinging at 1x would only buy an alive peer a longer time to answer (2x instead of 1x) at twice
        the pings. A subscriber never sends anything else, so at scale the pings and their pongs are the
        idle cost of every connection (two sends and two reads per round, one each side).
        """
        hb = self.config.heartbeat_ms / 1000
        quiet_out, quiet_in = self.writer.idle(now, hb, 2 * hb)
        for session in quiet_out:
            if isinstance(session, Session):
                session.heartbeat()
        for session in quiet_in:
            if not isinstance(session, Session):
                continue
            if session.ws_input_paused:
                continue  # we are the ones not reading it (over its publish rate, or behind a slow subscribe)
            if now - session.last_recv >= 3 * hb:
                session.disconnect(protocol.CloseCode.INTERNAL, "no answer to pings")
            elif now - session.last_ping >= hb:
                session.ping(now)
        limit = self.config.connect_timeout_ms / 1000
        handshake = self.config.handshake_timeout_ms / 1000
        for session, created in list(self._unconnected.items()):
            age = now - created
            if session.ws_state == WSState.HTTP and age >= min(handshake, limit):  # still in its HTTP request
                del self._unconnected[session]
                self.admission.refused("handshake_timeout")
                session.disconnect()  # before the upgrade: no response, the socket is just closed
            elif age >= limit:
                del self._unconnected[session]
                session.disconnect(protocol.CloseCode.POLICY, "no connect in time")
        if len(self.expiries):
            self.expire_tokens(time.time())

    # ---- token expiry (PROTOCOL.md 1.1, Session 5) ----------------------------------------------------

    def _expiry_deadline(self, session: Session) -> float | None:
        p = session.principal
        return None if p is None or p.exp is None else p.exp + self.auth.leeway

    def track_expiry(self, session: Session) -> None:
        """Called at connect and at every refresh: the latest entry of a session is the live one."""
        deadline = self._expiry_deadline(session)
        if deadline is None:
            return
        self.expiries.push(deadline, session)
        if len(self.expiries) > 2 * len(self.sessions) + 1024:  # refreshed or closed sessions' entries
            self.expiries.compact(lambda d, s: not s._closing and self._expiry_deadline(s) == d)

    def expire_tokens(self, now: float) -> None:
        """Close 4001 every session whose token ran out without a refresh (wall clock, like `exp`)."""
        for deadline, session in self.expiries.due(now):
            if not session._closing and self._expiry_deadline(session) == deadline:
                session.token_expired()

    # ---- HTTP ------------------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of /healthz. The rule (docs/DESIGN.md "Health"): 503 while starting
        (not caught up) or stopping; an engine outage after that is 200 `degraded` with its reason,
        unless --healthz-unreachable-ms is set and the engine has been unreachable that long."""
        if self._stopping:
            return 503, {"status": "stopping", "reason": "shutting down"}
        health = self.engine.health()
        if health["status"] == "starting":
            return 503, health
        limit = self.config.healthz_unreachable_ms
        down = health.get("unreachable_s")
        if limit and down is not None and down * 1000 >= limit:
            return 503, {**health, "status": "unavailable"}
        return 200, health

    def route(self, req: http.Request, address: str = "") -> tuple[bytes, bool]:
        """(response, upgrade): the 101 answer for /ws, else a complete plain response (then closed).
        Raises http.HttpError for a refused request. `address`: the client's IP (connection limits)."""
        path = req.path
        if path == b"/ws":
            if self._stopping:
                raise http.HttpError(503, "shutting down")
            answer = http.check_upgrade(req)
            if not origin_allowed(req.headers.get(b"origin"), req.header(b"host"), self._origins):
                self.admission.refused("origin")
                raise http.HttpError(403, "origin not allowed (see --allowed-origins)")
            over = self.admission.check_upgrade(address)
            if over is not None:
                raise http.HttpError(over[0], over[1], (("Retry-After", str(RETRY_AFTER_S)),))
            return answer, True
        known = path in (b"/healthz", b"/metrics") or path in self._pages  # bounded label values
        self.stats.http_requests[path.decode("latin-1") if known else "other"] += 1
        if req.method not in (b"GET", b"HEAD"):
            raise http.HttpError(405, "method not allowed", (("Allow", "GET, HEAD"),))
        head = req.method == b"HEAD"
        if path == b"/healthz":
            status, health = self.health()
            body = orjson.dumps({**health, "node": self.node_id, "engine": self.config.engine,
                                 "connections": len(self.sessions), "version": __version__,
                                 "fanout": FANOUT_KIND})
            return http.response(status, body, "application/json", head_only=head), False
        if path == b"/metrics":
            return http.response(200, self._render_metrics(), CONTENT_TYPE, head_only=head), False
        page = self._pages.get(path)
        if page is not None:
            return http.response(200, page[1], page[0], headers=page[2], head_only=head), False
        return http.response(404, b"not found\n", head_only=head), False
