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
from typing import TYPE_CHECKING, Any

from fanout import OP_BINARY, OP_PING, Conn, WSConn, encode_close, encode_frame, encode_text

from . import http, protocol, recovery
from .auth import AuthError, Principal
from .engines.base import EngineUnavailable, UnknownTopic
from .limits import TokenBucket
from .protocol import ProtocolError
from .subjects import parse_subject

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("gateway.session")

PING_FRAME = encode_frame(OP_PING, b"")
HEARTBEAT_FRAME = encode_text(protocol.HEARTBEAT)
#: a close frame's reason: at most 123 bytes of UTF-8 (RFC 6455 5.5: control payloads <= 125 bytes)
MAX_CLOSE_REASON = 123


def close_reason(text: str) -> bytes:
    """`text` as a close reason: UTF-8, cut to MAX_CLOSE_REASON bytes at a character boundary (a cut
    inside a character is invalid UTF-8: encode_close refuses it, and a peer would fail with 1007)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON:
        return data
    return data[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")


class Session(WSConn):
    # Few fields, and None until needed: this object is most of what an idle connection costs.
    __slots__ = ("gw", "transport", "principal", "connected", "_subjects", "created", "last_ping",
                 "_http", "_backlog", "_busy", "_inflight", "_closing", "_replays", "_pump_scheduled",
                 "address", "_bucket")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # from connection_made (Conn's own `transport` is only set at the upgrade, by ws_open)
        self.transport: asyncio.Transport | None = None  # type: ignore[assignment]
        self.principal: Principal | None = None
        self.connected = False
        # None, one subject (str), or a set from the second subscription on
        self._subjects: str | set[str] | None = None
        self.created = 0.0
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
        self.created = self.gw.loop.time()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.address = sys.intern(str(peer[0]))
        self._http = http.Request()
        if not self.gw.connection_made(self):
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
            recovery.unsubscribe(self.gw.hub, self, subject)
        self._subjects = None
        self._backlog = None
        self.gw.session_closed(self)

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
            answer, upgrade = self.gw.route(req, self.address)
        except http.HttpError as exc:
            self._http = None
            self.gw.stats.count_http_error(exc.status)
            return self._http_close(exc.response())
        if not upgrade:
            return self._http_close(answer)
        gw = self.gw
        tr = self.transport
        assert tr is not None
        tr.write(answer)  # 101: from here on, frames
        gw.session_opened(self)
        config = gw.config
        self.ws_open(gw.writer, tr, config.max_pending_bytes, config.max_message_bytes, gw.on_overflow,
                     req.rest, config.max_fragments, config.max_queued_pongs)

    def _http_close(self, answer: bytes) -> None:
        self._closing = True
        tr = self.transport
        if tr is not None:
            tr.write(answer)
            tr.close()

    # ---- frames (parsed by fanout.WSConn) --------------------------------------------------------------

    def ws_message(self, opcode: int, payload: bytes) -> None:
        if self._closing:
            return
        if opcode == OP_BINARY:
            if not self.connected:
                return self._not_connected("the first frame must be a connect text frame, not binary")
            return self.send_error(ProtocolError(protocol.BAD_REQUEST, "protocol messages are text frames, not binary"))
        self._on_text(payload)

    def ws_close(self, code: int, reason: str) -> None:
        self.close(protocol.CLOSE_NORMAL if code == 1005 else code)

    def ws_fail(self, code: int, reason: str) -> None:
        self.close(code, reason)

    @property
    def subjects(self) -> tuple[str, ...] | set[str]:
        s = self._subjects
        if s is None:
            return ()
        return (s,) if isinstance(s, str) else set(s)

    def _add_subject(self, subject: str) -> None:
        s = self._subjects
        if s is None:
            self._subjects = subject
        elif isinstance(s, str):
            if s != subject:
                self._subjects = {s, subject}
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
            return self.close(protocol.CLOSE_INVALID_UTF8, "text frame is not valid UTF-8")
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
        gw = self.gw
        try:
            self.principal = gw.auth.authenticate(req.token)
        except AuthError as exc:
            self.send_error(ProtocolError(protocol.UNAUTHORIZED, str(exc), request="connect"))
            return self.close(protocol.CLOSE_POLICY, "unauthorized")
        self.connected = True
        gw.session_connected(self)
        if self.principal.exp is not None:
            gw.track_expiry(self)
        # the session id is only reported (not kept: an idle connection's bytes count)
        self.reply(protocol.connected(secrets.token_hex(8), gw.node_id, gw.config.heartbeat_ms))

    def _not_connected(self, message: str, request: str | None = None) -> None:
        self.send_error(ProtocolError(protocol.NOT_CONNECTED, message, request=request))
        self.close(protocol.CLOSE_POLICY, "not connected")

    def _refresh(self, req: protocol.Refresh) -> None:
        """1.1: a valid token for the same `sub` replaces the session's token and entitlements; an
        invalid one is refused and the session keeps its old token (and its expiry)."""
        gw = self.gw
        if not gw.auth.enabled:
            return self.reply(protocol.refreshed(None))  # no auth: tokens are ignored
        try:
            principal = gw.auth.refresh(self.principal, req.token)  # type: ignore[arg-type]
        except AuthError as exc:
            return self.send_error(ProtocolError(protocol.UNAUTHORIZED, str(exc), request="refresh"))
        self.principal = principal
        gw.track_expiry(self)
        self.reply(protocol.refreshed(principal.exp))
        # the new entitlements apply to what is already subscribed too
        for subject in list(self.subjects):
            if not principal.may_subscribe(parse_subject(subject)):
                self._discard_subject(subject)
                self._cancel_replay(subject)
                recovery.unsubscribe(gw.hub, self, subject)
                self.send_error(ProtocolError(protocol.FORBIDDEN, "the refreshed token does not allow this "
                                              "subscription", subject=subject, request="refresh"))

    def token_expired(self) -> None:
        """The token ran out without a refresh (called by the gateway's sweep): 1.1 close 4001."""
        if self._closing:
            return
        self.send_error(ProtocolError(protocol.UNAUTHORIZED, "token expired"))
        self.close(protocol.CLOSE_TOKEN_EXPIRED, "token expired")

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
        gw = self.gw
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
                gw.engine.check_subject(subject)
            except UnknownTopic as exc:
                self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), subject=subject.text,
                                              request="subscribe"))
                continue
            if self.subscription_count >= gw.config.max_subscriptions and not self._has_subject(subject.text):
                gw.admission.refused("max_subscriptions")
                self.send_error(ProtocolError(
                    protocol.LIMIT_EXCEEDED, f"more than {gw.config.max_subscriptions} subscriptions on one "
                    "connection (--max-subscriptions)", subject=subject.text, request="subscribe"))
                continue
            self._add_subject(gw.hub.state(subject.text).subject)  # the hub's copy of the string: shared
            self._cancel_replay(subject.text)
            waiting = recovery.subscribe(gw.hub, gw.engine, self, subject, entry.position,
                                         self._start_replay)
            if waiting is not None:
                rest = protocol.Subscribe(req.entries[i + 1:])
                self._busy = True
                gw.spawn(self._finish_subscribe(waiting, rest))
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
                                                            bucket.resume_at > self.gw.loop.time()):
            self._resume_input()  # (unless over its publish rate: then its timer resumes it)

    def _unsubscribe(self, req: protocol.Unsubscribe) -> None:
        for entry in req.entries:
            if isinstance(entry, ProtocolError):
                self.send_error(entry)
                continue
            if self._has_subject(entry.text):
                self._discard_subject(entry.text)
                self._cancel_replay(entry.text)
                recovery.unsubscribe(self.gw.hub, self, entry.text)
            self.reply(protocol.unsubscribed(entry.text))

    def _publish(self, req: protocol.Publish) -> None:
        gw = self.gw
        subject = req.subject
        if gw.config.publish_rate > 0 and not self._take_token():
            return self.send_error(ProtocolError(protocol.RATE_LIMITED, "publishing faster than the connection's "
                                                 "rate (--publish-rate)", id=req.id, subject=subject.text,
                                                 request="publish"))
        if len(req.content) > gw.config.max_message_bytes:
            return self.send_error(ProtocolError(protocol.TOO_LARGE, "content larger than the limit",
                                                 id=req.id, subject=subject.text, request="publish"))
        if not self.principal.may_publish(subject):  # type: ignore[union-attr]
            return self.send_error(ProtocolError(protocol.FORBIDDEN, "not allowed to publish to this subject",
                                                 id=req.id, subject=subject.text, request="publish"))
        try:
            gw.engine.check_subject(subject)
        except UnknownTopic as exc:
            return self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), id=req.id,
                                                 subject=subject.text, request="publish"))
        gw.stats.publishes += 1
        sync = getattr(gw.engine, "publish_now", None)
        if sync is not None:  # the standalone engine: stored and fanned out right here
            try:
                epoch, seq = sync(subject, req.content)
            except EngineUnavailable as exc:
                return self.send_error(ProtocolError(protocol.UNAVAILABLE, str(exc), id=req.id,
                                                     subject=subject.text, request="publish"))
            if req.has_id:
                self.reply(protocol.ack(req.id, subject.text, epoch, seq))
            return
        if self._inflight >= gw.config.max_inflight_publishes:
            return self.send_error(ProtocolError(protocol.RATE_LIMITED, "too many publishes awaiting the engine",
                                                 id=req.id, subject=subject.text, request="publish"))
        self._inflight += 1
        # Created now, in arrival order: the engine enqueues in call order, so one connection's
        # publishes to one subject are produced in the order sent.
        gw.spawn(self._publish_async(req))

    def _take_token(self) -> bool:
        """One publish of the connection's rate; False when over it. Then the connection is not read
        until its next token: the rest of a flood waits in its own socket buffer (TCP slows the sender)
        instead of costing the gateway a parse and an error frame each, and other clients' time."""
        gw = self.gw
        now = gw.loop.time()
        bucket = self._bucket
        if bucket is None:
            rate = gw.config.publish_rate
            bucket = self._bucket = TokenBucket(rate, gw.config.publish_burst or max(1.0, 2 * rate), now)
        if bucket.take(now):
            return True
        gw.admission.refused("publish_rate")
        if not self.ws_input_paused:
            self.ws_pause_input()
            bucket.resume_at = now + bucket.wait()
            gw.loop.call_later(bucket.wait(), self._resume_input)
        return False

    def _resume_input(self) -> None:
        if not self._closing:
            self.last_recv = self.gw.loop.time()  # its silence while paused was ours (see the sweep)
            self.ws_resume_input()

    async def _publish_async(self, req: protocol.Publish) -> None:
        subject = req.subject
        try:
            epoch, seq = await self.gw.engine.publish(subject, req.content)
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
        self.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer: fell behind the recovery window")

    def _cancel_replay(self, subject: str) -> None:
        if self._replays:
            replay = self._replays.pop(subject, None)
            if replay is not None:
                replay.done = True

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            # call_soon runs after the writer's flush scheduled by the frames just queued
            self.gw.loop.call_soon(self._pump)

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
        self.gw.stats.count_error(exc.code)
        self.reply(exc.payload())

    def heartbeat(self) -> None:
        if self.connected:
            self.send(HEARTBEAT_FRAME)

    def ping(self, now: float) -> None:
        self.last_ping = now
        self.send(PING_FRAME)

    def close(self, code: int = protocol.CLOSE_NORMAL, reason: str = "") -> None:
        """Close with `code` after what is queued for the client (order kept); idempotent."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        tr = self.transport
        if self.ws_state == 0:
            self._http = None  # still in HTTP: no WebSocket to close
            self.ws_stop_input()
            tr.close()
            return
        self.ws_stop_input()
        self.gw.stats.count_close(code)
        self.gw.writer.flush()  # our queue out first (whatever a paused socket cannot take is dropped)
        Conn.close(self)
        # The transport's buffer always ends on a frame boundary, so a close frame can follow it.
        tr.write(encode_close(code, close_reason(reason)))
        tr.close()
        self.gw.loop.call_later(self.gw.close_grace, self._abort)

    def overflowed(self) -> None:
        """The connection's output overflowed: its queue is gone; tell it 4000 and drop it."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.ws_stop_input()
        self.gw.stats.count_close(protocol.CLOSE_SLOW_CONSUMER)
        tr = self.transport
        # Safe: fanout leaves at most the tail of one frame in the transport (never a whole queue).
        tr.write(encode_close(protocol.CLOSE_SLOW_CONSUMER, b"slow consumer"))
        tr.close()
        self.gw.loop.call_later(self.gw.close_grace, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # a no-op once the connection is gone


def _op_name(req: protocol.Request) -> str:
    return {protocol.Subscribe: "subscribe", protocol.Unsubscribe: "unsubscribe", protocol.Publish: "publish",
            protocol.Ping: "ping", protocol.Refresh: "refresh", protocol.Connect: "connect"}[type(req)]
