"""One client connection: the HTTP upgrade, then the protocol state machine, and its subscriptions.

    bytes -> fanout.WSConn (frames parsed, pings answered) -> Session.ws_message -> protocol.decode
          -> handle_* -> hub / engine / recovery
    every frame to the client -> the same object's fanout Conn queue (one write per tick, bounded)

A Session *is* the connection's asyncio protocol and its fanout Conn (a subclass of fanout.WSConn),
so an idle connection costs one object (see fanout/_ws.pxd). Requests of one connection are handled in
order; only a subscribe whose recovery must read the engine (Kafka) awaits, and requests that arrive
meanwhile wait behind it. Publishes are handed to the engine in the order received and acknowledged
as the engine confirms them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

from fanout import OP_BINARY, OP_PING, CloseCode, Conn, Writer, WSConn, WSState, encode_close, encode_frame, encode_text

from . import http, protocol, recovery
from .auth import Authenticator, AuthError, Principal
from .config import Config
from .engines.base import Engine, EngineUnavailable, UnknownTopic
from .hub import Hub
from .limits import Admission, TokenBucket
from .metrics import Stats
from .protocol import ProtocolError
from .subjects import parse_subject

log = logging.getLogger("gateway.session")

PING_FRAME = encode_frame(OP_PING, b"")
HEARTBEAT_FRAME = encode_text(protocol.HEARTBEAT)
#: subscriptions a connection keeps in a tuple; more go to a set (see Session._add_subject)
SMALL_SUBJECTS = 8
#: a close frame's reason: at most 123 bytes of UTF-8 (RFC 6455 5.5: control payloads <= 125 bytes)
MAX_CLOSE_REASON = 123


class SessionHost(Protocol):
    """What a Session needs of the gateway that owns it (gateway.server.Gateway is one), and no more.

    Shared parts (read only): the loop, the settings, the fan-out writer, the hub, the engine, the
    authenticator and the counters. Calls back: whether to admit a new connection and what to answer
    its HTTP request, each step of its life (opened, connected, closed, token to watch), and a task
    to keep (the gateway cancels them on stop).
    """

    loop: asyncio.AbstractEventLoop
    config: Config
    writer: Writer
    hub: Hub
    engine: Engine
    auth: Authenticator
    stats: Stats
    admission: Admission
    node_id: str
    #: seconds a peer gets to finish after a close frame is queued, before the socket is aborted
    close_grace: float

    def connection_made(self, session: Session) -> bool:
        """A TCP connection was accepted; False: refuse it (the session aborts its transport)."""

    def route(self, req: http.Request, address: str) -> tuple[bytes, bool]:
        """(response, upgrade) for a complete HTTP request; raises http.HttpError to refuse it."""

    def session_opened(self, session: Session) -> None:
        """The WebSocket upgrade is done."""

    def session_connected(self, session: Session) -> None:
        """Its `connect` was accepted."""

    def session_closed(self, session: Session) -> None:
        """The connection is gone, whatever state it reached."""

    def track_expiry(self, session: Session) -> None:
        """Its token (new, or refreshed) has an `exp`: close it 4001 when that passes."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` as a task the host keeps (and cancels on stop)."""


def _overflowed(conn: Conn) -> None:
    """The writer's on_overflow for every session (one function: no bound method per connection)."""
    if isinstance(conn, Session):
        conn.overflowed()


def close_reason(text: str) -> bytes:
    """`text` as a close reason: UTF-8, cut to MAX_CLOSE_REASON bytes at a character boundary (a cut
    inside a character is invalid UTF-8: encode_close refuses it, and a peer would fail with 1007)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON:
        return data
    return data[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")


class Session(WSConn):
    # Few fields, and None until needed: this object is most of what an idle connection costs.
    __slots__ = ("host", "transport", "principal", "connected", "_subjects", "last_ping",
                 "_http", "_backlog", "_busy", "_inflight", "_closing", "_replays", "_pump_scheduled",
                 "address", "_bucket")

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        # from connection_made (Conn's own `transport` is only set at the upgrade, by ws_open)
        self.transport: asyncio.Transport | None = None  # type: ignore[assignment]
        self.principal: Principal | None = None
        self.connected = False
        # None, one subject (str), a tuple of 2..SMALL_SUBJECTS, or a set beyond (see _add_subject)
        self._subjects: str | tuple[str, ...] | set[str] | None = None
        self.last_ping = 0.0
        self._http: http.Request | None = None
        self._backlog: deque[Any] | None = None
        self._busy = False
        self._inflight = 0
        self._closing = False
        self._replays: dict[str, recovery.RingReplay] | None = None
        self._pump_scheduled = False
        #: the client's IP address (interned: shared by its connections), for the per-address limit
        self.address = ""
        self._bucket: TokenBucket | None = None  # publish rate, from the first publish on

    # ---- asyncio protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.address = sys.intern(str(peer[0]))
        self._http = http.Request()
        if not self.host.connection_made(self):
            self._http = None
            self._closing = True
            transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        # First: the fd is closed right after this returns and may be reused at once; fanout must
        # never write to it again (see fanout/_writer.pxd).
        Conn.close(self)
        self._closing = True
        self._http = None
        self.ws_stop_input()
        for subject in self.subjects:
            recovery.unsubscribe(self.host.hub, self, subject)
        self._subjects = None
        self._backlog = None
        self.host.session_closed(self)

    def resume_writing(self) -> None:
        WSConn.resume_writing(self)
        if self._replays:
            self._schedule_pump()

    # ---- the HTTP request that opens the connection -------------------------------------------------

    def http_received(self, data: bytes) -> None:
        req = self._http
        if req is None or self._closing:
            return
        try:
            if not req.feed(data):
                return
            self._http = None
            answer, upgrade = self.host.route(req, self.address)
        except http.HttpError as exc:
            self._http = None
            self.host.stats.count_http_error(exc.status)
            return self._http_close(exc.response())
        if not upgrade:
            return self._http_close(answer)
        host = self.host
        transport = self.transport
        assert transport is not None
        transport.write(answer)  # 101: from here on, frames
        host.session_opened(self)
        config = host.config
        self.ws_open(host.writer, transport, config.max_pending_bytes, config.max_message_bytes, _overflowed,
                     req.rest, config.max_fragments, config.max_queued_pongs)

    def _http_close(self, answer: bytes) -> None:
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.write(answer)
            transport.close()
            # as after a close frame: over TLS, close() awaits the peer's close_notify for up to 30 s
            self.host.loop.call_later(self.host.close_grace, self._abort)

    # ---- frames (parsed by fanout.WSConn) --------------------------------------------------------------

    def ws_message(self, opcode: int, payload: bytes) -> None:
        if self._closing:
            return
        if opcode == OP_BINARY:
            if not self.connected:
                return self._not_connected("the first frame must be a connect text frame, not binary")
            return self.send_error(ProtocolError(protocol.BAD_REQUEST, "protocol messages are text frames, not binary"))
        self._on_text(payload)

    def ws_close(self, code: int, reason: str) -> None:  # the client's close: echo its code
        self.disconnect(protocol.CloseCode.NORMAL if code == CloseCode.NO_STATUS else code, by_client=True)

    def ws_fail(self, code: int, reason: str) -> None:
        self.disconnect(code, reason)

    @property
    def subjects(self) -> tuple[str, ...] | set[str]:
        s = self._subjects
        if s is None:
            return ()
        return (s,) if isinstance(s, str) else s if isinstance(s, tuple) else set(s)

    def _add_subject(self, subject: str) -> None:
        # A set costs 216 bytes from its first element, a tuple of three 64: most connections hold a
        # few subscriptions, and a scan of a few strings is as fast as a hash. Only past SMALL_SUBJECTS
        # does a set keep a connection's many subscribe / unsubscribe requests O(1) each.
        s = self._subjects
        if s is None:
            self._subjects = subject
        elif isinstance(s, str):
            if s != subject:
                self._subjects = (s, subject)
        elif isinstance(s, tuple):
            if subject not in s:
                self._subjects = s + (subject,) if len(s) < SMALL_SUBJECTS else {*s, subject}
        else:
            s.add(subject)

    def _has_subject(self, subject: str) -> bool:
        s = self._subjects
        return s == subject if isinstance(s, str) else (s is not None and subject in s)

    def _discard_subject(self, subject: str) -> None:
        s = self._subjects
        if isinstance(s, str):
            if s == subject:
                self._subjects = None
        elif isinstance(s, tuple):
            if subject in s:
                rest = tuple(x for x in s if x != subject)
                self._subjects = rest[0] if len(rest) == 1 else rest
        elif s is not None:
            s.discard(subject)

    @property
    def subscription_count(self) -> int:
        s = self._subjects
        return 0 if s is None else 1 if isinstance(s, str) else len(s)

    # ---- requests --------------------------------------------------------------------------------------

    def _on_text(self, data: bytes) -> None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return self.disconnect(protocol.CloseCode.INVALID_UTF8, "text frame is not valid UTF-8")
        if not self.connected:
            return self._on_first(data)
        if self._busy:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append(data)
            # Read nothing more until the subscribe is done: what follows waits in the socket (TCP slows
            # the client down), not in this backlog, which so holds at most a frame or two.
            self.ws_pause_input()
            return
        self._handle(data)

    def _on_first(self, data: bytes) -> None:
        try:
            req = protocol.decode(data)
        except ProtocolError as exc:
            return self._not_connected(f"the first frame must be connect ({exc.message})", exc.request)
        if not isinstance(req, protocol.Connect):
            return self._not_connected("the first frame must be connect", _op_name(req))
        host = self.host
        try:
            self.principal = host.auth.authenticate(req.token)
        except AuthError as exc:
            self.send_error(ProtocolError(protocol.UNAUTHORIZED, str(exc), request="connect"))
            return self.disconnect(protocol.CloseCode.POLICY, "unauthorized")
        self.connected = True
        host.session_connected(self)
        if self.principal.exp is not None:
            host.track_expiry(self)
        # the session id is only reported (not kept: an idle connection's bytes count)
        self.reply(protocol.connected(secrets.token_hex(8), host.node_id, host.config.heartbeat_ms))

    def _not_connected(self, message: str, request: str | None = None) -> None:
        self.send_error(ProtocolError(protocol.NOT_CONNECTED, message, request=request))
        self.disconnect(protocol.CloseCode.POLICY, "not connected")

    def _refresh(self, req: protocol.Refresh) -> None:
        """1.1: a valid token for the same `sub` replaces the session's token and entitlements; an
        invalid one is refused and the session keeps its old token (and its expiry)."""
        host = self.host
        if not host.auth.enabled:
            return self.reply(protocol.refreshed(None))  # no auth: tokens are ignored
        try:
            principal = host.auth.refresh(self.principal, req.token)  # type: ignore[arg-type]
        except AuthError as exc:
            return self.send_error(ProtocolError(protocol.UNAUTHORIZED, str(exc), request="refresh"))
        self.principal = principal
        host.track_expiry(self)
        self.reply(protocol.refreshed(principal.exp))
        # the new entitlements apply to what is already subscribed too
        for subject in list(self.subjects):
            if not principal.may_subscribe(parse_subject(subject)):
                self._discard_subject(subject)
                self._cancel_replay(subject)
                recovery.unsubscribe(host.hub, self, subject)
                self.send_error(ProtocolError(protocol.FORBIDDEN, "the refreshed token does not allow this "
                                              "subscription", subject=subject, request="refresh"))

    def token_expired(self) -> None:
        """The token ran out without a refresh (called by the gateway's sweep): 1.1 close 4001."""
        if self._closing:
            return
        self.send_error(ProtocolError(protocol.UNAUTHORIZED, "token expired"))
        self.disconnect(protocol.CloseCode.TOKEN_EXPIRED, "token expired")

    def _handle(self, data: bytes) -> None:
        try:
            req = protocol.decode(data)
        except ProtocolError as exc:
            return self.send_error(exc)
        if isinstance(req, protocol.Publish):
            self._publish(req)
        elif isinstance(req, protocol.Subscribe):
            self._subscribe(req)
        elif isinstance(req, protocol.Unsubscribe):
            self._unsubscribe(req)
        elif isinstance(req, protocol.Ping):
            self.reply(protocol.pong(req.id))
        elif isinstance(req, protocol.Refresh):
            self._refresh(req)
        else:  # Connect
            self.send_error(ProtocolError(protocol.BAD_REQUEST, "already connected", request="connect"))

    def _subscribe(self, req: protocol.Subscribe) -> None:
        host = self.host
        for i, entry in enumerate(req.entries):
            if isinstance(entry, ProtocolError):
                self.send_error(entry)
                continue
            subject = entry.subject
            if not self.principal.may_subscribe(subject):  # type: ignore[union-attr]
                self.send_error(ProtocolError(protocol.FORBIDDEN, "not allowed to subscribe to this subject",
                                              subject=subject.text, request="subscribe"))
                continue
            try:
                host.engine.check_subject(subject)
            except UnknownTopic as exc:
                self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), subject=subject.text,
                                              request="subscribe"))
                continue
            if self.subscription_count >= host.config.max_subscriptions and not self._has_subject(subject.text):
                host.admission.refused("max_subscriptions")
                self.send_error(ProtocolError(
                    protocol.LIMIT_EXCEEDED, f"more than {host.config.max_subscriptions} subscriptions on one "
                    "connection (--max-subscriptions)", subject=subject.text, request="subscribe"))
                continue
            self._add_subject(host.hub.state(subject.text).subject)  # the hub's copy of the string: shared
            self._cancel_replay(subject.text)
            waiting = recovery.subscribe(host.hub, host.engine, self, subject, entry.position,
                                         self._start_replay)
            if waiting is not None:
                rest = protocol.Subscribe(req.entries[i + 1:])
                self._busy = True
                host.spawn(self._finish_subscribe(waiting, rest))
                return

    async def _finish_subscribe(self, waiting: Any, rest: protocol.Subscribe) -> None:
        await waiting  # recovery turns engine failures into recovered:false itself
        self._busy = False
        if self._closing:
            return
        if rest.entries:
            self._subscribe(rest)  # may start another replay, which then drains the backlog
        while self._backlog and not self._busy and not self._closing:
            self._handle(self._backlog.popleft())
        bucket = self._bucket
        if self.ws_input_paused and not self._busy and not (bucket is not None and
                                                            bucket.resume_at > self.host.loop.time()):
            self._resume_input()  # (unless over its publish rate: then its timer resumes it)

    def _unsubscribe(self, req: protocol.Unsubscribe) -> None:
        for entry in req.entries:
            if isinstance(entry, ProtocolError):
                self.send_error(entry)
                continue
            if self._has_subject(entry.text):
                self._discard_subject(entry.text)
                self._cancel_replay(entry.text)
                recovery.unsubscribe(self.host.hub, self, entry.text)
            self.reply(protocol.unsubscribed(entry.text))

    def _publish(self, req: protocol.Publish) -> None:
        host = self.host
        subject = req.subject
        if host.config.publish_rate > 0 and not self._take_token():
            return self.send_error(ProtocolError(protocol.RATE_LIMITED, "publishing faster than the connection's "
                                                 "rate (--publish-rate)", id=req.id, subject=subject.text,
                                                 request="publish"))
        if protocol.content_too_large(req.content, host.config.max_message_bytes):
            return self.send_error(ProtocolError(protocol.TOO_LARGE, "content larger than the limit as delivered "
                                                 "(JSON-escaped, --max-message-bytes)",
                                                 id=req.id, subject=subject.text, request="publish"))
        if not self.principal.may_publish(subject):  # type: ignore[union-attr]
            return self.send_error(ProtocolError(protocol.FORBIDDEN, "not allowed to publish to this subject",
                                                 id=req.id, subject=subject.text, request="publish"))
        try:
            host.engine.check_subject(subject)
        except UnknownTopic as exc:
            return self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), id=req.id,
                                                 subject=subject.text, request="publish"))
        host.stats.publishes += 1
        engine = host.engine
        if engine.publishes_now:  # the standalone engine: stored and fanned out right here
            try:
                epoch, seq = engine.publish_now(subject, req.content)
            except EngineUnavailable as exc:
                return self.send_error(ProtocolError(protocol.UNAVAILABLE, str(exc), id=req.id,
                                                     subject=subject.text, request="publish"))
            if req.has_id:
                self.reply(protocol.ack(req.id, subject.text, epoch, seq))
            return
        if self._inflight >= host.config.max_inflight_publishes:
            return self.send_error(ProtocolError(protocol.RATE_LIMITED, "too many publishes awaiting the engine",
                                                 id=req.id, subject=subject.text, request="publish"))
        self._inflight += 1
        # Created now, in arrival order: the engine enqueues in call order, so one connection's
        # publishes to one subject are produced in the order sent.
        host.spawn(self._publish_async(req))

    def _take_token(self) -> bool:
        """One publish of the connection's rate; False when over it. Then the connection is not read
        until its next token: the rest of a flood waits in its own socket buffer (TCP slows the sender)
        instead of costing the gateway a parse and an error frame each, and other clients' time."""
        host = self.host
        now = host.loop.time()
        bucket = self._bucket
        if bucket is None:
            rate = host.config.publish_rate
            bucket = self._bucket = TokenBucket(rate, host.config.publish_burst or max(1.0, 2 * rate), now)
        if bucket.take(now):
            return True
        host.admission.refused("publish_rate")
        if not self.ws_input_paused:
            self.ws_pause_input()
            bucket.resume_at = now + bucket.wait()
            host.loop.call_later(bucket.wait(), self._resume_input)
        return False

    def _resume_input(self) -> None:
        if not self._closing:
            self.last_recv = self.host.loop.time()  # its silence while paused was ours (see the sweep)
            self.ws_resume_input()

    async def _publish_async(self, req: protocol.Publish) -> None:
        subject = req.subject
        try:
            epoch, seq = await self.host.engine.publish(subject, req.content)
        except EngineUnavailable as exc:
            self.send_error(ProtocolError(protocol.UNAVAILABLE, str(exc) or "the engine is unavailable",
                                          id=req.id, subject=subject.text, request="publish"))
        except UnknownTopic as exc:
            self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), id=req.id, subject=subject.text,
                                          request="publish"))
        except Exception as exc:  # noqa: BLE001 - the client gets an answer, the gateway stays up
            log.exception("publish failed")
            self.send_error(ProtocolError(protocol.UNAVAILABLE, f"publish failed: {exc}", id=req.id,
                                          subject=subject.text, request="publish"))
        else:
            if req.has_id:
                self.reply(protocol.ack(req.id, subject.text, epoch, seq))
        finally:
            self._inflight -= 1

    # ---- paced replays (recovery larger than what the connection may queue at once) -------------------

    def _start_replay(self, replay: recovery.RingReplay) -> None:
        if self._replays is None:
            self._replays = {}
        self._replays[replay.st.subject] = replay
        replay.on_stall = self._replay_stalled
        self._schedule_pump()

    def _replay_stalled(self) -> None:
        self.disconnect(protocol.CloseCode.SLOW_CONSUMER, "slow consumer: fell behind the recovery window")

    def _cancel_replay(self, subject: str) -> None:
        if self._replays:
            replay = self._replays.pop(subject, None)
            if replay is not None:
                replay.done = True

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            # call_soon runs after the writer's flush scheduled by the frames just queued
            self.host.loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        if self._closing or not self._replays or self.paused:
            return  # a paused connection pumps again from resume_writing
        for subject, replay in list(self._replays.items()):
            if replay.pump():
                self._replays.pop(subject, None)
        if self._replays and not self.paused:
            self._schedule_pump()

    # ---- output ----------------------------------------------------------------------------------------

    def reply(self, payload: bytes) -> None:
        """Queue one protocol message (JSON bytes) as a text frame."""
        if not self._closing:
            self.send(encode_text(payload))

    def send_error(self, exc: ProtocolError) -> None:
        self.host.stats.count_error(exc.code)
        self.reply(exc.payload())

    def heartbeat(self) -> None:
        if self.connected:
            self.send(HEARTBEAT_FRAME)

    def ping(self, now: float) -> None:
        self.last_ping = now
        self.send(PING_FRAME)

    def disconnect(self, code: int = protocol.CloseCode.NORMAL, reason: str = "", *, by_client: bool = False) -> None:
        """Close the connection with `code` after what is queued for the client (order kept); idempotent.
        `by_client`: this answers the client's own close (counted apart).

        Before the upgrade there is no WebSocket: the socket is just closed, without a response. (Not
        named close(): Conn.close() is the fan-out's "forget this connection", with no arguments.)
        """
        if self._closing or self.transport is None:
            return
        self._closing = True
        transport = self.transport
        if self.ws_state == WSState.HTTP:
            self._http = None  # still in HTTP: no WebSocket to close
            self.ws_stop_input()
            # Nothing to deliver: abort, not close. Over TLS, close() would send close_notify and keep the
            # connection (and its place under the limits) until the peer answers or the TLS layer's own
            # shutdown timeout (30 s) passes: a slowloris over TLS would outlive its handshake timeout.
            transport.abort()
            return
        self.ws_stop_input()
        self.host.stats.count_close(code, by_client=by_client)
        self.host.writer.flush()  # our queue out first (whatever a paused socket cannot take is dropped)
        Conn.close(self)
        # The transport's buffer always ends on a frame boundary, so a close frame can follow it.
        transport.write(encode_close(code, close_reason(reason)))
        transport.close()
        self.host.loop.call_later(self.host.close_grace, self._abort)

    def overflowed(self) -> None:
        """The connection's output overflowed: its queue is gone; tell it 4000 and drop it."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.ws_stop_input()
        self.host.stats.count_close(protocol.CloseCode.SLOW_CONSUMER)
        transport = self.transport
        # Safe: fanout leaves at most the tail of one frame in the transport (never a whole queue).
        transport.write(encode_close(protocol.CloseCode.SLOW_CONSUMER, b"slow consumer"))
        transport.close()
        self.host.loop.call_later(self.host.close_grace, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # a no-op once the connection is gone


def _op_name(req: protocol.Request) -> str:
    return {protocol.Subscribe: "subscribe", protocol.Unsubscribe: "unsubscribe", protocol.Publish: "publish",
            protocol.Ping: "ping", protocol.Refresh: "refresh", protocol.Connect: "connect"}[type(req)]
