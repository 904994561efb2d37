"""One client connection: the protocol state machine on top of picows, and its subscriptions.

    picows frame -> Session.on_ws_frame -> protocol.decode -> handle_* -> hub / engine / recovery
    every frame to the client -> fanout Conn (queued, one write per tick, bounded)

Frames are reassembled here (picows hands over raw, possibly fragmented, frames). Requests of one
connection are handled in order; only a subscribe whose recovery must read the engine (Kafka) awaits,
and requests that arrive meanwhile wait behind it. Publishes are handed to the engine in the order
received and acknowledged as the engine confirms them.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from fanout import OP_PING, Conn, encode_close, encode_frame, encode_text

from . import protocol, recovery
from .auth import AuthError, Principal
from .engines.base import EngineUnavailable, UnknownTopic
from .protocol import ProtocolError

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("gateway.session")

PING_FRAME = encode_frame(OP_PING, b"")
HEARTBEAT_FRAME = encode_text(protocol.HEARTBEAT)


class Session(WSListener):
    __slots__ = ("gw", "transport", "conn", "id", "principal", "connected", "subjects", "created",
                 "_fragments", "_fragments_size", "_backlog", "_busy", "_inflight", "_closing", "last_ping",
                 "_replays", "_pump_scheduled")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: WSTransport | None = None
        self.conn: Conn | None = None
        self.id = ""
        self.principal: Principal | None = None
        self.connected = False
        self.subjects: set[str] = set()
        self.created = 0.0
        self.last_ping = 0.0
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._backlog: deque[Any] | None = None
        self._busy = False
        self._inflight = 0
        self._closing = False
        self._replays: dict[str, recovery.RingReplay] | None = None
        self._pump_scheduled = False

    # ---- picows callbacks ----------------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        gw = self.gw
        self.conn = Conn(gw.writer, transport.underlying_transport, gw.config.max_pending_bytes, gw.on_overflow)
        self.conn.session = self
        self.created = gw.loop.time()
        gw.session_opened(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closing = True
        if self.conn is not None:
            self.conn.close()
        for subject in self.subjects:
            recovery.unsubscribe(self.gw.hub, self.conn, subject)  # type: ignore[arg-type]
        self.subjects.clear()
        self._backlog = None
        self.gw.session_closed(self)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()
            if self._replays:
                self._schedule_pump()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        conn = self.conn
        if conn is None or self._closing:
            return
        conn.last_recv = self.gw.loop.time()
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            if self._fragments is not None:
                return self.close(protocol.CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if frame.fin:
                return self._on_text(frame.get_payload_as_bytes())
            self._fragments = [frame.get_payload_as_bytes()]
            self._fragments_size = frame.payload_size
        elif kind is WSMsgType.CONTINUATION:
            if self._fragments is None:
                return self.close(protocol.CLOSE_PROTOCOL_ERROR, "continuation without a message")
            self._fragments_size += frame.payload_size
            if self._fragments_size > self.gw.config.max_message_bytes:
                return self.close(protocol.CLOSE_TOO_BIG, "message larger than the limit")
            self._fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = None
                self._on_text(data)
        elif kind is WSMsgType.BINARY:
            if not self.connected:
                return self._not_connected("the first frame must be a connect text frame, not binary")
            self.send_error(ProtocolError(protocol.BAD_REQUEST, "protocol messages are text frames, not binary"))
            if not frame.fin:  # swallow the rest of a fragmented binary message
                self._fragments = []
        elif kind is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close(protocol.CLOSE_NORMAL if code in (WSCloseCode.NO_INFO, None) else int(code.value))
        # PING is answered by picows (auto pong); PONG only refreshes last_recv above.

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
            return
        self._handle(data)

    def _on_first(self, data: bytes) -> None:
        try:
            req = protocol.decode(data)
        except ProtocolError as exc:
            return self._not_connected(f"the first frame must be connect ({exc.message})")
        if not isinstance(req, protocol.Connect):
            return self._not_connected("the first frame must be connect")
        gw = self.gw
        try:
            self.principal = gw.auth.authenticate(req.token)
        except AuthError as exc:
            self.send_error(ProtocolError(protocol.UNAUTHORIZED, str(exc)))
            return self.close(protocol.CLOSE_POLICY, "unauthorized")
        self.connected = True
        self.id = secrets.token_hex(8)
        gw.session_connected(self)
        self.send(protocol.connected(self.id, gw.node_id, gw.config.heartbeat_ms))

    def _not_connected(self, message: str) -> None:
        self.send_error(ProtocolError(protocol.NOT_CONNECTED, message))
        self.close(protocol.CLOSE_POLICY, "not connected")

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
            self.send(protocol.pong(req.id))
        else:  # Connect
            self.send_error(ProtocolError(protocol.BAD_REQUEST, "already connected"))

    def _subscribe(self, req: protocol.Subscribe) -> None:
        gw = self.gw
        for i, entry in enumerate(req.entries):
            if isinstance(entry, ProtocolError):
                self.send_error(entry)
                continue
            subject = entry.subject
            if not self.principal.may_subscribe(subject):  # type: ignore[union-attr]
                self.send_error(ProtocolError(protocol.FORBIDDEN, "not allowed to subscribe to this subject",
                                              subject=subject.text))
                continue
            try:
                gw.engine.check_subject(subject)
            except UnknownTopic as exc:
                self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), subject=subject.text))
                continue
            self.subjects.add(subject.text)
            self._cancel_replay(subject.text)
            waiting = recovery.subscribe(gw.hub, gw.engine, self.conn, subject, entry.position,  # type: ignore[arg-type]
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

    def _unsubscribe(self, req: protocol.Unsubscribe) -> None:
        for entry in req.entries:
            if isinstance(entry, ProtocolError):
                self.send_error(entry)
                continue
            if entry.text in self.subjects:
                self.subjects.discard(entry.text)
                self._cancel_replay(entry.text)
                recovery.unsubscribe(self.gw.hub, self.conn, entry.text)  # type: ignore[arg-type]
            self.send(protocol.unsubscribed(entry.text))

    def _publish(self, req: protocol.Publish) -> None:
        gw = self.gw
        subject = req.subject
        if len(req.content) > gw.config.max_message_bytes:
            return self.send_error(ProtocolError(protocol.TOO_LARGE, "content larger than the limit",
                                                 id=req.id, subject=subject.text))
        if not self.principal.may_publish(subject):  # type: ignore[union-attr]
            return self.send_error(ProtocolError(protocol.FORBIDDEN, "not allowed to publish to this subject",
                                                 id=req.id, subject=subject.text))
        try:
            gw.engine.check_subject(subject)
        except UnknownTopic as exc:
            return self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), id=req.id,
                                                 subject=subject.text))
        gw.stats.publishes += 1
        sync = getattr(gw.engine, "publish_now", None)
        if sync is not None:  # the standalone engine: stored and fanned out right here
            try:
                epoch, seq = sync(subject, req.content)
            except EngineUnavailable as exc:
                return self.send_error(ProtocolError(protocol.UNAVAILABLE, str(exc), id=req.id,
                                                     subject=subject.text))
            if req.has_id:
                self.send(protocol.ack(req.id, subject.text, epoch, seq))
            return
        if self._inflight >= gw.config.max_inflight_publishes:
            return self.send_error(ProtocolError(protocol.RATE_LIMITED, "too many publishes awaiting the engine",
                                                 id=req.id, subject=subject.text))
        self._inflight += 1
        # Created now, in arrival order: the engine enqueues in call order, so one connection's
        # publishes to one subject are produced in the order sent.
        gw.spawn(self._publish_async(req))

    async def _publish_async(self, req: protocol.Publish) -> None:
        subject = req.subject
        try:
            epoch, seq = await self.gw.engine.publish(subject, req.content)
        except EngineUnavailable as exc:
            self.send_error(ProtocolError(protocol.UNAVAILABLE, str(exc) or "the engine is unavailable",
                                          id=req.id, subject=subject.text))
        except UnknownTopic as exc:
            self.send_error(ProtocolError(protocol.UNKNOWN_TOPIC, str(exc), id=req.id, subject=subject.text))
        except Exception as exc:  # noqa: BLE001 - the client gets an answer, the gateway stays up
            log.exception("publish failed")
            self.send_error(ProtocolError(protocol.UNAVAILABLE, f"publish failed: {exc}", id=req.id,
                                          subject=subject.text))
        else:
            if req.has_id:
                self.send(protocol.ack(req.id, subject.text, epoch, seq))
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
        conn = self.conn
        if self._closing or not self._replays or conn is None or conn.paused:
            return  # a paused connection pumps again from resume_writing
        for subject, replay in list(self._replays.items()):
            if replay.pump():
                self._replays.pop(subject, None)
        if self._replays and not conn.paused:
            self._schedule_pump()

    # ---- output ----------------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.conn is not None and not self._closing:
            self.conn.send(encode_text(payload))

    def send_error(self, exc: ProtocolError) -> None:
        self.gw.stats.count_error(exc.code)
        self.send(exc.payload())

    def heartbeat(self) -> None:
        if self.connected and self.conn is not None:
            self.conn.send(HEARTBEAT_FRAME)

    def ping(self, now: float) -> None:
        if self.conn is not None:
            self.last_ping = now
            self.conn.send(PING_FRAME)

    def close(self, code: int, reason: str = "") -> None:
        """Close with `code` after what is queued for the client (order kept); idempotent."""
        if self._closing or self.conn is None or self.transport is None:
            return
        self._closing = True
        self.gw.stats.count_close(code)
        self.gw.writer.flush()  # our queue out first (whatever a paused socket cannot take is dropped)
        self.conn.close()
        # The transport's buffer always ends on a frame boundary, so a close frame can follow it.
        tr = self.transport.underlying_transport
        tr.write(encode_close(code, reason.encode()[:120]))
        tr.close()
        self.gw.loop.call_later(self.gw.close_grace, self._abort)

    def overflowed(self) -> None:
        """The connection's output overflowed: its queue is gone; tell it 4000 and drop it."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.gw.stats.count_close(protocol.CLOSE_SLOW_CONSUMER)
        tr = self.transport.underlying_transport
        # Safe: fanout leaves at most the tail of one frame in the transport (never a whole queue).
        tr.write(encode_close(protocol.CLOSE_SLOW_CONSUMER, b"slow consumer"))
        tr.close()
        self.gw.loop.call_later(self.gw.close_grace, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(graceful=False)
