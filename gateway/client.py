"""Python asyncio client SDK for the gateway (PROTOCOL.md, "Client obligations" and "Liveness").

    async with Client(["ws://127.0.0.1:8800/ws", "ws://127.0.0.1:8801/ws"]) as client:
        sub = await client.subscribe("/matches/football/5")
        await client.publish("/matches/football/5", "1-0")
        async for msg in sub:
            print(msg.seq, msg.content)

What the client does for you:

* keeps the last (epoch, seq) of every subject (``Client.positions``) and, on every reconnect,
  resubscribes all subjects in one ``subscribe`` carrying those positions, so the gateway replays
  what was missed;
* drops duplicates (seq <= last seq of the same epoch) and, on a ``prev`` mismatch, holds the
  subject back and subscribes again to it with the last position on the same connection
  (negative feedback) until ``subscribed`` arrives and the replay fills the gap;
* treats a connection that receives nothing for 2 x ``heartbeat_ms`` as dead, and reconnects with
  exponential backoff and full jitter, cycling through the URL list; close code 1008 (or an
  ``unauthorized`` error answering ``connect``) is fatal and stops it;
* takes a token or a token provider (a function, sync or async, returning a fresh JWT): with a
  provider it asks for a token at every (re)connect, sends ``refresh`` ahead of the token's ``exp``
  (``refresh_delay``), and after close 4001 (token expired, protocol 1.1) reconnects with a fresh token
  and recovers like after any other drop;
* tells errors apart by their ``request`` field (1.1): a failed fire-and-forget publish never ends a
  subscription of the same subject (1.0 gateways: by counting unanswered subscribe entries);
* never resends a publish on its own: publishes waiting for an ack when the connection drops fail
  with ``ConnectionClosedError`` and the caller decides.

The subscription logic (positions, duplicates, gaps, resubscribing, which errors answer a
``subscribe``) is ``gateway.client_tracker.SubscriptionTracker``, which does no I/O (frames in, events
and frames out) and is tested on its own, like the other pure parts (``backoff_delay``,
``content_fields``, ``token_exp``, ``refresh_delay``, and ``classify``, ``decode_message``,
``error_kind`` re-exported from the tracker's module). ``Client`` is the asyncio runner around them,
on ``websockets``: it owns the connection, timers, futures and callbacks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
from websockets.uri import parse_uri

from .client_tracker import (
    Delivered,
    Gap,
    Message,
    Refused,
    Subscribed,
    SubscriptionTracker,
    Unsubscribed,
    Verdict,
    _opt_int,
    classify,
    decode_message,
    error_kind,
)
from .subjects import SubjectError, parse_subject

__all__ = [
    "Ack",
    "Client",
    "ConnectionClosedError",
    "GatewayError",
    "Message",
    "Subscription",
    "SubscriptionTracker",
    "Verdict",
    "backoff_delay",
    "classify",
    "content_fields",
    "decode_message",
    "error_kind",
    "refresh_delay",
    "token_exp",
]

log = logging.getLogger("gateway.client")

CLOSE_POLICY: Final = 1008
CLOSE_TOKEN_EXPIRED: Final = 4001  # 1.1: reconnect with a fresh token
# Errors after which reconnecting cannot help.
_FATAL_ERRORS: Final = frozenset({"unauthorized", "not_connected"})
# A gateway sends `connected` first; tolerate (and skip) a few unknown frames before it.
_HANDSHAKE_MAX_FRAMES: Final = 8


# --------------------------------------------------------------------------- values and errors


@dataclass(frozen=True, slots=True)
class Ack:
    """The gateway's `ack` of a publish: the message is durable at (epoch, seq)."""

    subject: str
    epoch: str
    seq: int
    id: str | int


class GatewayError(Exception):
    """An `error` frame from the gateway (or a local failure with a protocol error code).

    Attributes:
        code: the protocol's error code (`forbidden`, `unavailable`, ...; "unknown" if none).
        message: the gateway's text ("" if none).
        subject, id: the subject and the request id the error is about, when the gateway said.
        request: the op of the request it answers (1.1), None from a 1.0 gateway.
    """

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        subject: str | None = None,
        id: str | int | None = None,  # noqa: A002 - the protocol's field name
        request: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.subject = subject
        self.id = id
        self.request = request  # 1.1: the op of the request the error answers (None: 1.0 or none)

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> GatewayError:
        """The error an `error` frame reports. Fields of the wrong type are left out; never raises."""
        code = frame.get("code")
        message = frame.get("message")
        subject = frame.get("subject")
        ident = frame.get("id")
        request = frame.get("request")
        return cls(
            code if isinstance(code, str) else "unknown",
            message if isinstance(message, str) else "",
            subject=subject if isinstance(subject, str) else None,
            id=ident if isinstance(ident, (str, int)) and not isinstance(ident, bool) else None,
            request=request if isinstance(request, str) else None,
        )


class ConnectionClosedError(GatewayError):
    """The connection was lost (or never made) while a request waited for its answer.

    A publish that fails this way may or may not have been stored: the client never resends it.
    `code` is "connection_closed"; `close_code` the WebSocket close code when one was received.
    """

    def __init__(
        self,
        message: str = "connection closed",
        *,
        close_code: int | None = None,
        subject: str | None = None,
        id: str | int | None = None,  # noqa: A002
    ) -> None:
        super().__init__("connection_closed", message, subject=subject, id=id)
        self.close_code = close_code


# --------------------------------------------------------------------------- sans-I/O helpers


def backoff_delay(
    attempt: int, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Delay before reconnect attempt number `attempt` (0-based): "full jitter", i.e. uniform in
    [0, min(maximum, initial * 2**attempt)], so a crowd of clients does not reconnect in step.

    Args:
        attempt: failed attempts so far (negative counts as 0).
        initial, maximum: the first cap and the largest, in seconds.
        rng: the random source (the `random` module's when None).

    Returns:
        Seconds to wait.
    """
    cap = min(maximum, initial * 2.0 ** min(max(attempt, 0), 64))
    return (rng if rng is not None else random).uniform(0.0, cap)


def content_fields(content: str | bytes | bytearray | memoryview) -> dict[str, str]:
    """The content fields of a `publish` frame (PROTOCOL.md "Messages").

    Args:
        content: text, or bytes.

    Returns:
        {"content": text} for text and UTF-8 bytes, {"content_b64": base64} for other bytes.
    """
    if isinstance(content, str):
        return {"content": content}
    raw = bytes(content)
    try:
        return {"content": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"content_b64": base64.b64encode(raw).decode("ascii")}


def token_exp(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (the gateway verifies).

    Args:
        token: a JWT (or anything).

    Returns:
        `exp` in seconds since the epoch, or None when the token is not a JWT or has no numeric
        `exp`. Never raises.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or exp != exp:  # NaN
        return None
    return float(exp)


def refresh_delay(exp: float, now: float, lead: float) -> float:
    """Seconds from `now` until a token expiring at `exp` should be refreshed: `lead` seconds before
    `exp`, but never later than halfway through what is left (a short token is refreshed early
    enough to retry once), and not negative.

    Args:
        exp, now: seconds since the epoch. lead: seconds.

    Returns:
        Seconds to wait (>= 0).
    """
    left = exp - now
    return max(0.0, left - min(lead, left / 2.0))


def _dumps(frame: Mapping[str, Any]) -> bytes:
    return orjson.dumps(frame)


def _received_code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a request's answer read: a send that failed never awaited it, and the connection's end
    may have failed it meanwhile (asyncio would log "Future exception was never retrieved")."""
    if fut.done() and not fut.cancelled():
        fut.exception()


# --------------------------------------------------------------------------- subscription


_Callback = Callable[[Message], Any]


class Subscription:
    """One subscribed subject: an async iterator of its messages, in order.

    With a `callback`, messages go to the callback only (sync callbacks are called inline by the
    reader; coroutine results are awaited one after the other by a per-subscription task, so order
    holds either way) and the iterator stays empty. Without one they are queued for `get()` /
    `async for` (unbounded: consume them).
    """

    __slots__ = (
        "subject",
        "recovered",
        "epoch",
        "seq",
        "_callback",
        "_queue",
        "_pending",
        "_worker",
        "_closed",
        "_error",
        "_client",
    )

    def __init__(self, client: Client, subject: str, callback: _Callback | None) -> None:
        self.subject = subject
        self.recovered: bool | None = None
        self.epoch: str | None = None
        self.seq: int | None = None
        self._client = client
        self._callback = callback
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._pending: asyncio.Queue[Awaitable[Any] | None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._error: GatewayError | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.subject} epoch={self.epoch} seq={self.seq} closed={self._closed}>"

    @property
    def closed(self) -> bool:
        """True once the subscription ended (unsubscribed, refused, the client closed)."""
        return self._closed

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        """The next message. Raises StopAsyncIteration once unsubscribed or the client closed, or the
        GatewayError that ended the subscription (e.g. `forbidden` after a token refresh)."""
        msg = await self._queue.get()
        if msg is None:
            self._queue.put_nowait(None)  # every later reader sees the end too
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return msg

    async def get(self, timeout: float | None = None) -> Message:
        """The next message.

        Args:
            timeout: seconds to wait at most (None: no limit).

        Raises:
            TimeoutError: nothing came within `timeout`.
            GatewayError: the error that ended the subscription, or ConnectionClosedError once it
                is closed.
        """
        async with asyncio.timeout(timeout):
            msg = await self._queue.get()
        if msg is None:
            self._queue.put_nowait(None)
            raise self._error or ConnectionClosedError("subscription closed", subject=self.subject)
        return msg

    async def unsubscribe(self) -> None:
        """`Client.unsubscribe` of this subject."""
        await self._client.unsubscribe(self.subject)

    # -- called by the client

    def _deliver(self, msg: Message) -> None:
        if self._closed:
            return
        callback = self._callback
        if callback is None:
            self._queue.put_nowait(msg)
            return
        try:
            result = callback(msg)
        except Exception:
            log.exception("callback for %s failed", self.subject)
            return
        if inspect.isawaitable(result):
            if self._pending is None:
                self._pending = asyncio.Queue()
                self._worker = asyncio.get_running_loop().create_task(
                    self._run_callbacks(self._pending), name=f"gateway-callbacks {self.subject}"
                )
            self._pending.put_nowait(result)

    async def _run_callbacks(self, pending: asyncio.Queue[Awaitable[Any] | None]) -> None:
        try:
            for _ in itertools.count():  # ends at the sentinel put by _close()
                awaitable = await pending.get()
                if awaitable is None:
                    return
                try:
                    await awaitable
                except Exception:
                    log.exception("callback for %s failed", self.subject)
        finally:
            # Close what will never run, so no "coroutine was never awaited" warning.
            while not pending.empty():
                left = pending.get_nowait()
                if inspect.iscoroutine(left):
                    left.close()

    def _drop_queued(self) -> None:
        """Forget the async callbacks not started yet (the client closed from within one of them)."""
        pending = self._pending
        if pending is None:
            return
        while not pending.empty():
            left = pending.get_nowait()
            if inspect.iscoroutine(left):
                left.close()
        pending.put_nowait(None)

    def _close(self, error: GatewayError | None = None) -> asyncio.Task[None] | None:
        """End the iterator; let queued async callbacks finish. Returns the callback task."""
        if self._closed:
            return None
        self._closed = True
        self._error = error
        self._queue.put_nowait(None)
        if self._pending is not None:
            self._pending.put_nowait(None)
        return self._worker


# --------------------------------------------------------------------------- client


class _Fatal(Exception):
    """Reconnecting cannot help (close 1008, `unauthorized`): carries the error to surface."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(str(error))
        self.error = error


# What a failed attempt can raise; anything here means "try the next URL after a backoff".
_RETRYABLE: Final = (OSError, WebSocketException, ValueError)

#: a token, or a function (sync or async) returning a fresh one
TokenProvider = Callable[[], "str | Awaitable[str]"]


class Client:
    """Connection to one of several gateways, with subscriptions that survive reconnects.

    Args:
        urls: one WebSocket URL or several (tried in turn, cycling, on every reconnect).
        token: a JWT, or a function (sync or async) returning a fresh one, asked at every (re)connect
            and `refresh_lead` seconds before its `exp`.
        refresh_lead: seconds before `exp` to send `refresh` (at most halfway to `exp`).
        name: the `client` field of `connect`.
        backoff_initial, backoff_max: reconnect backoff (full jitter), in seconds. The backoff goes back
            to `backoff_initial` only after a connection that lasted `backoff_max`: a gateway that
            accepts and then drops at once is not retried every `backoff_initial`.
        connect_timeout: seconds for the WebSocket handshake and the `connected` answer, and for an
            async token provider's answer (a provider that hangs is a failed attempt).
        max_message_bytes: the largest frame accepted from the gateway.
        on_event: called with (name, info) on connected, disconnected, reconnecting, connect_failed,
            gap, subscription_lost, publish_failed, refreshed, refresh_failed, token_expired,
            heartbeat_timeout, error, fatal; must not block (exceptions are logged).
        max_reconnect_attempts: consecutive failed attempts before giving up (None: never).
        rng: the random source of the backoff.
        ws_options: more keyword arguments for `websockets.asyncio.client.connect`.

    Raises:
        ValueError: no URL, or a URL that is not ws:// or wss://.

    Attributes:
        connected, url, session, server, heartbeat_ms: the current connection's.
        positions: subject -> last (epoch, seq) received (the tracker's).
        stats: counters (messages, duplicates_dropped, gaps_detected, reconnects, resubscribes,
            refreshes, expired).
        token_exp: `exp` of the token the session holds, when known.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | TokenProvider | None = None,
        refresh_lead: float = 30.0,
        name: str = "gateway-py/0.1",
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        connect_timeout: float = 5.0,
        max_message_bytes: int = 16 * 2**20,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        max_reconnect_attempts: int | None = None,
        rng: random.Random | None = None,
        ws_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._urls: list[str] = [urls] if isinstance(urls, str) else list(urls)
        if not self._urls:
            raise ValueError("at least one gateway URL is required")
        for url in self._urls:
            try:
                parse_uri(url)
            except InvalidURI as exc:
                raise ValueError(f"not a WebSocket URL: {url!r}") from exc
        # a provider is called at every (re)connect and before exp; a plain string is sent as is
        self._token_provider: TokenProvider | None = token if callable(token) else None
        self._token: str | None = None if callable(token) else token
        self._refresh_lead = refresh_lead
        self._refresh_timer: asyncio.TimerHandle | None = None
        self.token_exp: float | None = None  # exp of the token the session holds, when known
        self._name = name
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._max_message_bytes = max_message_bytes
        self._on_event = on_event
        self._max_attempts = max_reconnect_attempts
        self._rng = rng if rng is not None else random.Random()
        self._ws_options: dict[str, Any] = dict(ws_options or {})

        self.session: str | None = None
        self.server: str | None = None
        self.heartbeat_ms: int | None = None
        self.connected = False
        self.url: str | None = None
        self.stats: dict[str, int] = {
            "messages": 0,
            "duplicates_dropped": 0,
            "gaps_detected": 0,
            "reconnects": 0,
            "resubscribes": 0,
            "refreshes": 0,
            "expired": 0,
        }
        # the subscription logic, sans I/O: it counts into self.stats and owns the positions
        self._tracker = SubscriptionTracker(self.stats)
        #: subject -> last (epoch, seq) received: the tracker's, resent on every reconnect
        self.positions: dict[str, tuple[str, int]] = self._tracker.positions

        self._url_index = 0
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing = False
        self._fatal: GatewayError | None = None
        self._ids = itertools.count(1)
        self._subs: dict[str, Subscription] = {}
        self._sub_waiters: dict[str, list[asyncio.Future[Subscription]]] = {}
        self._unsub_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._acks: dict[str | int, asyncio.Future[Ack]] = {}
        self._pings: dict[str | int, asyncio.Future[None]] = {}
        self._last_rx = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Client {state} url={self.url} session={self.session} subjects={len(self._subs)}>"

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, *, timeout: float | None = 30.0) -> None:
        """Connect to the first reachable URL and wait for `connected`; keep reconnecting after
        (until `close`), resubscribing every subject from its position each time.

        Args:
            timeout: seconds to wait for the first `connected` (None: keep trying, bounded only by
                `max_reconnect_attempts`).

        Raises:
            GatewayError: the gateway's error on close 1008 / `unauthorized` (fatal: no retry).
            ConnectionClosedError: no gateway answered within `timeout`, or the attempts ran out.
            RuntimeError: already connected or connecting.
        """
        if self._runner is not None and not self._runner.done():
            raise RuntimeError("already connected or connecting")
        loop = asyncio.get_running_loop()
        self._closing = False
        self._fatal = None
        first: asyncio.Future[None] = loop.create_future()
        self._first = first
        runner = loop.create_task(self._run(), name="gateway-client")
        self._runner = runner
        runner.add_done_callback(self._runner_done)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(first)
        except TimeoutError:
            await self._stop_runner()
            raise ConnectionClosedError(f"no gateway reachable within {timeout} s") from None
        except BaseException:
            await self._stop_runner()
            raise

    async def close(self) -> None:
        """Stop reconnecting, close the connection with 1000, end every subscription (their iterators
        stop), fail every request still waiting (ConnectionClosedError). Never raises."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000)
        await self._stop_runner()
        error = ConnectionClosedError("client closed")
        self._fail_requests(error)
        self._fail_subscribe_waiters(error)
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
            self._first.exception()  # retrieved: nobody else may wait for it
        subs, self._subs = self._subs, {}
        # close() awaited by an async callback: its own task is left to end when the callback returns
        # (cancelling and awaiting it would cancel close() itself), with nothing queued after it
        current = asyncio.current_task()
        tasks: set[asyncio.Task[Any]] = set()
        for sub in subs.values():
            self._tracker.drop(sub.subject)  # ended: a later connect() does not subscribe it again
            task = sub._close()
            if task is current:
                sub._drop_queued()
            elif task is not None:
                tasks.add(task)
        tasks.update(t for t in self._tasks if t is not current)
        self._tasks.clear()
        for task in tasks:
            task.cancel()  # pending async callbacks do not outlive the client
        if tasks:
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    log.error("background task failed", exc_info=task.exception())

    async def _stop_runner(self) -> None:
        runner = self._runner
        if runner is None:
            return
        if not runner.done():
            runner.cancel()
            await asyncio.wait({runner})  # its outcome is read by _runner_done

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # a bug, not a network failure: say so, and stop for good
            log.error("gateway client supervisor crashed", exc_info=exc)
            self.connected = False
            self._fatal = self._fatal or GatewayError("internal", repr(exc))
        first = self._first
        if first is None or first.done():
            return
        if task.cancelled():
            first.set_exception(ConnectionClosedError("connect cancelled"))
        else:
            first.set_exception(exc or self._fatal or ConnectionClosedError("client stopped"))
        first.exception()  # mark retrieved; connect() re-raises it if it still waits

    # ----------------------------------------------------------------- subscribing

    async def subscribe(
        self,
        subject: str,
        callback: _Callback | None = None,
        *,
        position: tuple[str, int] | None = None,
        timeout: float | None = 10.0,
    ) -> Subscription:
        """Subscribe and wait for `subscribed`. Subscribing again to a subscribed subject returns the
        same Subscription (and asks the gateway again from its position).

        Args:
            subject: the subject.
            callback: called with every Message (a coroutine function's results are awaited one after
                the other); without one, iterate the Subscription.
            position: (epoch, seq) to start after, used when no message of the subject was received
                yet; seq 0 asks for the whole epoch.
            timeout: seconds to wait for `subscribed` (None: no limit). Not connected, the request
                waits for the next connection.

        Returns:
            The Subscription (its `recovered`, `epoch`, `seq` are the gateway's answer).

        Raises:
            GatewayError: `invalid_subject` (checked locally too), `forbidden`, `unknown_topic`,
                `limit_exceeded`; the fatal error after close 1008; ConnectionClosedError when the
                client is closed.
            TimeoutError: no answer within `timeout` (the subscription is then dropped).
        """
        (sub,) = await self._subscribe([(subject, position)], callback, timeout)
        return sub

    async def subscribe_many(
        self,
        subjects: Sequence[str],
        callback: _Callback | None = None,
        *,
        timeout: float | None = 10.0,
    ) -> list[Subscription]:
        """One `subscribe` frame for many subjects.

        Args:
            subjects, callback, timeout: as for `subscribe` (one callback for all).

        Returns:
            Their Subscriptions, in order.

        Raises:
            GatewayError, TimeoutError: as `subscribe`; the first error once all are answered (the
                subjects that succeeded stay subscribed).
        """
        return await self._subscribe([(s, None) for s in subjects], callback, timeout)

    async def _subscribe(
        self,
        items: Sequence[tuple[str, tuple[str, int] | None]],
        callback: _Callback | None,
        timeout: float | None,
    ) -> list[Subscription]:
        self._check_usable()
        for subject, _ in items:
            try:
                parse_subject(subject)
            except SubjectError as exc:
                raise GatewayError("invalid_subject", str(exc), subject=subject) from None
        loop = asyncio.get_running_loop()
        subs: list[Subscription] = []
        created: list[str] = []
        waiters: list[tuple[str, asyncio.Future[Subscription]]] = []
        for subject, _ in items:
            sub = self._subs.get(subject)
            if sub is None:
                sub = Subscription(self, subject, callback)
                self._subs[subject] = sub
                created.append(subject)
            elif callback is not None:
                sub._callback = callback
            fut: asyncio.Future[Subscription] = loop.create_future()
            self._sub_waiters.setdefault(subject, []).append(fut)
            waiters.append((subject, fut))
            subs.append(sub)
        # Not connected: the next connection's resubscription carries these subjects.
        self._tracker.subscribe([s for s, _ in items], {s: p for s, p in items if p is not None})
        await self._flush()
        try:
            async with asyncio.timeout(timeout):
                results = await asyncio.gather(*(f for _, f in waiters), return_exceptions=True)
        except BaseException:
            for subject, fut in waiters:
                fut.cancel()
                with contextlib.suppress(KeyError, ValueError):
                    self._sub_waiters[subject].remove(fut)
            for subject in created:
                self._drop_subscription(subject, None)
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return subs

    async def unsubscribe(self, subject: str, *, timeout: float | None = 10.0) -> None:
        """Stop the subscription (its iterator ends), forget its position, wait for `unsubscribed`.

        Args:
            subject: the subject (not subscribed: only the gateway is told).
            timeout: seconds to wait for `unsubscribed`, and then for queued async callbacks to end
                (they are cancelled after).

        Raises:
            TimeoutError: no `unsubscribed` within `timeout` (the subscription is gone anyway).
        """
        worker = self._drop_subscription(subject, None)
        self._tracker.unsubscribe(subject)  # forgets the position; queues `unsubscribe` if connected
        ws = self._ws
        if self.connected and ws is not None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._unsub_waiters.setdefault(subject, []).append(fut)
            try:
                await self._flush()
                async with asyncio.timeout(timeout):
                    await fut
            except ConnectionClosed:
                pass  # nothing to undo: the next connection does not resubscribe it
            finally:
                fut.cancel()
                with contextlib.suppress(KeyError, ValueError):
                    self._unsub_waiters[subject].remove(fut)
        # queued async callbacks run to their end, within `timeout` (unless this is one of them: it
        # cannot wait for itself; the rest run after it returns)
        if worker is not None and worker is not asyncio.current_task():
            done, _ = await asyncio.wait({worker}, timeout=timeout)
            if not done:
                worker.cancel()
                await asyncio.wait({worker})

    def _drop_subscription(
        self, subject: str, error: GatewayError | None
    ) -> asyncio.Task[None] | None:
        sub = self._subs.pop(subject, None)
        self._tracker.drop(subject)
        return sub._close(error) if sub is not None else None

    async def _flush(self) -> None:
        """Send what the tracker queued, in order, on the current connection. The frames are taken
        synchronously, so a reconnect cannot slip in between; a frame lost with the connection is
        not resent (the next connection resubscribes everything with its positions)."""
        ws = self._ws
        if ws is None or not self.connected:
            return
        frames = self._tracker.frames_to_send()
        for frame in frames:
            try:
                await ws.send(_dumps(frame), text=True)
            except ConnectionClosed:
                return  # _serve's end settles what waits for an answer (_fail_requests)

    # ----------------------------------------------------------------- publishing, ping

    async def publish(
        self,
        subject: str,
        content: str | bytes | bytearray | memoryview,
        *,
        ack: bool = True,
        timeout: float | None = 10.0,
    ) -> Ack | None:
        """Publish a message. Never resent by the client.

        Args:
            subject: the subject.
            content: text, or bytes (sent as `content_b64` when not UTF-8).
            ack: wait for the gateway's ack (the message is durable); False: fire and forget (a
                failure then comes as the `publish_failed` event).
            timeout: seconds to wait for the ack (None: no limit).

        Returns:
            The Ack (epoch and seq of the stored message), or None without `ack`.

        Raises:
            GatewayError: the gateway's refusal (`unavailable`, `forbidden`, `rate_limited`, ...).
            ConnectionClosedError: not connected, or the connection dropped before the ack (the
                message may or may not be stored).
            TimeoutError: no ack within `timeout`.
        """
        ws = self._require_ws()
        frame: dict[str, Any] = {"op": "publish", "subject": subject}
        frame.update(content_fields(content))
        if not ack:
            try:
                await ws.send(_dumps(frame), text=True)
            except ConnectionClosed as exc:
                raise ConnectionClosedError(subject=subject, close_code=_received_code(exc)) from exc
            return None
        ident = next(self._ids)
        frame["id"] = ident
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._acks[ident] = fut
        try:
            try:
                await ws.send(_dumps(frame), text=True)
            except ConnectionClosed as exc:
                raise ConnectionClosedError(subject=subject, id=ident,
                                            close_code=_received_code(exc)) from exc
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._acks.pop(ident, None)
            _retrieved(fut)

    async def ping(self, timeout: float | None = 5.0) -> float:
        """Round trip of an `op: ping` / `pong`.

        Args:
            timeout: seconds to wait for the `pong`.

        Returns:
            The round trip, in seconds.

        Raises:
            ConnectionClosedError: not connected, or the connection dropped first.
            TimeoutError: no `pong` within `timeout`.
        """
        ws = self._require_ws()
        ident = next(self._ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ident] = fut
        started = time.perf_counter()
        try:
            try:
                await ws.send(_dumps({"op": "ping", "id": ident}), text=True)
            except ConnectionClosed as exc:
                raise ConnectionClosedError(id=ident) from exc
            async with asyncio.timeout(timeout):
                await fut
            return time.perf_counter() - started
        finally:
            self._pings.pop(ident, None)
            _retrieved(fut)

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ConnectionClosedError("client closed")

    def _require_ws(self) -> ClientConnection:
        self._check_usable()
        ws = self._ws
        if not self.connected or ws is None:
            raise ConnectionClosedError("not connected")
        return ws

    # ----------------------------------------------------------------- connection supervisor

    async def _run(self) -> None:
        """Connect, serve, reconnect: until close(), a fatal error or too many failed attempts."""
        failures = 0  # consecutive failed attempts, for max_reconnect_attempts
        step = 0  # backoff exponent: grows with every wait, back to 0 after a connection that lasted
        loop = asyncio.get_running_loop()
        first = True
        while not self._closing:
            url = self._urls[self._url_index]
            try:
                ws, hello = await self._open(url)
            except _Fatal as fatal:
                self._set_fatal(fatal.error)
                return
            except _RETRYABLE as exc:
                log.info("gateway %s unreachable: %r", url, exc)
                self._event("connect_failed", {"url": url, "error": repr(exc)})
                self._next_url()
                failures += 1
                if self._max_attempts is not None and failures >= self._max_attempts:
                    self._set_fatal(
                        ConnectionClosedError(f"gave up after {failures} failed attempts")
                    )
                    return
                await self._backoff(step)
                step += 1
                continue
            failures = 0  # a successful `connected` ends the run of failed attempts
            since = loop.time()
            try:
                code, reason = await self._serve(ws, url, hello, first)
            except _Fatal as fatal:
                self._set_fatal(fatal.error)
                return
            first = False
            if self._closing:
                return
            if loop.time() - since >= self._backoff_max:
                step = 0  # it lasted: a fresh loss, retried fast; one dropped at once backs off further
            log.info("connection to %s lost (close code %s %s), reconnecting", url, code, reason)
            self._event("disconnected", {"url": url, "code": code, "reason": reason})
            self._next_url()
            await self._backoff(step)
            step += 1

    async def _backoff(self, attempt: int) -> None:
        delay = backoff_delay(attempt, self._backoff_initial, self._backoff_max, self._rng)
        self._event("reconnecting",
                    {"attempt": attempt, "delay": delay, "url": self._urls[self._url_index]})
        await asyncio.sleep(delay)

    def _next_url(self) -> None:
        self._url_index = (self._url_index + 1) % len(self._urls)

    async def _open(self, url: str) -> tuple[ClientConnection, dict[str, Any]]:
        """WebSocket handshake, `connect`, and the `connected` answer (within connect_timeout)."""
        options: dict[str, Any] = {
            "open_timeout": self._connect_timeout,
            "max_size": self._max_message_bytes,
            "ping_interval": None,  # liveness is the protocol's `hb`; the server pings us
            "compression": None,
            "proxy": None,
            "close_timeout": self._connect_timeout,
        }
        options.update(self._ws_options)
        token = await self._fresh_token() if self._token_provider is not None else self._token
        ws = await ws_connect(url, **options)
        try:
            hello: dict[str, Any] = {"op": "connect", "client": self._name}
            if token is not None:
                hello["token"] = token
                self._token = token
                self.token_exp = token_exp(token)
            async with asyncio.timeout(self._connect_timeout):
                await ws.send(_dumps(hello), text=True)
                for _ in range(_HANDSHAKE_MAX_FRAMES):
                    frame = orjson.loads(await ws.recv(decode=False))
                    op = frame.get("op") if isinstance(frame, dict) else None
                    if op == "connected":
                        return ws, frame
                    if op == "error":
                        error = GatewayError.from_frame(frame)
                        if error.code in _FATAL_ERRORS:
                            raise _Fatal(error)
                        log.warning("gateway %s refused connect: %s", url, error)
                raise ValueError(f"{url} sent no `connected`")
        except ConnectionClosed as exc:
            self._discard(ws)
            if exc.rcvd is not None and exc.rcvd.code == CLOSE_POLICY:
                raise _Fatal(GatewayError("unauthorized", exc.rcvd.reason or "closed 1008")) from exc
            raise
        except BaseException:
            self._discard(ws)
            raise

    async def _fresh_token(self) -> str:
        """Ask the provider; its failure is a failed attempt (ValueError: backoff and retry), and so is
        an async provider without an answer within connect_timeout."""
        assert self._token_provider is not None
        deadline: asyncio.Timeout | None = None
        try:
            token = self._token_provider()
            if inspect.isawaitable(token):
                async with asyncio.timeout(self._connect_timeout) as deadline:  # cancels the provider
                    token = await token
        except Exception as exc:
            if deadline is not None and deadline.expired():
                raise ValueError(f"token provider gave no token within {self._connect_timeout} s") from exc
            raise ValueError(f"token provider failed: {exc!r}") from exc
        if not isinstance(token, str) or not token:
            raise ValueError(f"token provider returned {type(token).__name__}, not a token")
        return token

    def _schedule_refresh(self, ws: ClientConnection) -> None:
        """Refresh ahead of exp (only with a provider: a fixed token cannot be renewed)."""
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        if self._token_provider is None or self.token_exp is None:
            return
        delay = refresh_delay(self.token_exp, time.time(), self._refresh_lead)
        loop = asyncio.get_running_loop()
        self._refresh_timer = loop.call_later(delay, lambda: self._spawn(self._refresh(ws)))

    async def _refresh(self, ws: ClientConnection) -> None:
        self._refresh_timer = None
        if self._ws is not ws or not self.connected:
            return
        try:
            token = await self._fresh_token()
        except ValueError as exc:
            log.warning("token refresh: %s", exc)
            self._event("refresh_failed", {"error": str(exc)})
            self._retry_refresh(ws)
            return
        if self._ws is not ws:
            return
        self._token = token
        with contextlib.suppress(ConnectionClosed):  # the reconnect gets a fresh token anyway
            await ws.send(_dumps({"op": "refresh", "token": token}), text=True)

    def _retry_refresh(self, ws: ClientConnection) -> None:
        """A refresh failed: try again halfway to exp (the gateway closes 4001 at exp at worst)."""
        if self.token_exp is None or self._token_provider is None:
            return
        left = self.token_exp - time.time()
        if left > 0.2:
            self._refresh_timer = asyncio.get_running_loop().call_later(
                left / 2.0, lambda: self._spawn(self._refresh(ws)))

    def _on_refreshed(self, frame: dict[str, Any]) -> None:
        exp = frame.get("exp")
        self.stats["refreshes"] += 1
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            self.token_exp = float(exp)
        elif self._token is not None:
            self.token_exp = token_exp(self._token)
        self._event("refreshed", {"exp": self.token_exp})
        ws = self._ws
        if ws is not None:
            self._schedule_refresh(ws)

    @staticmethod
    def _discard(ws: ClientConnection) -> None:
        transport = ws.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def _serve(
        self, ws: ClientConnection, url: str, hello: dict[str, Any], first: bool
    ) -> tuple[int | None, str]:
        """Run one connection until it closes; returns the close code and reason received."""
        loop = asyncio.get_running_loop()
        session, server, hb = hello.get("session"), hello.get("server"), _opt_int(hello.get("heartbeat_ms"))
        self.session = session if isinstance(session, str) else None
        self.server = server if isinstance(server, str) else None
        self.heartbeat_ms = hb
        self.url = url
        self._last_rx = loop.time()
        self._ws = ws
        self.connected = True
        if not first:
            self.stats["reconnects"] += 1
        unauthorized: GatewayError | None = None
        close_code: int | None = None  # received with the close, for what fails with the connection
        try:
            self._tracker.connection_made()  # one `subscribe` with every subject and its position
            await self._flush()
            if hb is not None and hb > 0:
                self._arm_watchdog(loop, ws, 2.0 * hb / 1000.0)
            self._schedule_refresh(ws)
            self._event(
                "connected",
                {"url": url, "session": self.session, "server": self.server, "reconnect": not first},
            )
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            while True:  # ends with ConnectionClosed
                raw = await ws.recv(decode=False)
                self._last_rx = loop.time()
                try:
                    frame = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("gateway %s sent a frame that is not JSON", url)
                    continue
                if not isinstance(frame, dict):
                    continue
                try:
                    err = self._dispatch(frame)
                except Exception:
                    log.exception("failed to handle frame %r", frame.get("op"))
                    continue
                if err is not None:
                    unauthorized = err
                await self._flush()  # e.g. the resubscription after a gap
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            code = close_code = rcvd.code if rcvd is not None else None
            reason = rcvd.reason if rcvd is not None else ""
            if code == CLOSE_TOKEN_EXPIRED:  # 1.1: not fatal; the next attempt gets a fresh token
                self.stats["expired"] += 1
                log.info("token expired on %s (close 4001): reconnecting with a fresh token", url)
                self._event("token_expired", {"url": url})
                return code, reason
            if code == CLOSE_POLICY or unauthorized is not None:
                error = unauthorized or GatewayError("unauthorized", reason or "closed 1008")
                raise _Fatal(error) from exc
            return code, reason
        finally:
            self.connected = False
            self._ws = None
            self._tracker.connection_lost()
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            if self._refresh_timer is not None:
                self._refresh_timer.cancel()
                self._refresh_timer = None
            self._discard(ws)
            self._fail_requests(ConnectionClosedError("connection lost", close_code=close_code))

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop, ws: ClientConnection, dead_after: float) -> None:
        period = max(dead_after / 8.0, 0.001)

        def check(due: float) -> None:
            now = loop.time()
            silent = now - self._last_rx
            # A check that runs late means this process stalled (a busy machine, a suspended app):
            # frames that arrived meanwhile are still unread, and timers run before the loop reads
            # sockets. Look again one period later, after they are read, before calling it dead.
            if silent <= dead_after or now - due > period:
                self._watchdog = loop.call_later(period, check, now + period)
                return
            self._watchdog = None
            log.warning("nothing from %s for %.3f s (2 x heartbeat): connection dead", self.url, silent)
            self._event("heartbeat_timeout", {"url": self.url, "silent_s": silent})
            self._discard(ws)  # recv() then raises ConnectionClosed and _run reconnects

        self._watchdog = loop.call_later(period, check, loop.time() + period)

    # ----------------------------------------------------------------- incoming frames

    def _dispatch(self, frame: dict[str, Any]) -> GatewayError | None:
        """Handle one frame; returns an `unauthorized` error (the close 1008 follows it)."""
        op = frame.get("op")
        if op == "ack":
            self._on_ack(frame)
        elif op == "error":
            return self._on_error(frame)
        elif op == "refreshed":
            self._on_refreshed(frame)
        elif op == "pong":
            ident = frame.get("id")
            ping = self._pings.pop(ident, None) if isinstance(ident, (str, int)) else None
            if ping is not None and not ping.done():
                ping.set_result(None)
        else:  # msg, subscribed, unsubscribed; `hb` and unknown ops give no event
            self._handle(self._tracker.receive(frame))
        return None

    def _handle(self, events: list[Any]) -> None:
        """Carry out the tracker's events: deliver, settle waiters, report."""
        for event in events:
            if isinstance(event, Delivered):
                sub = self._subs.get(event.message.subject)
                if sub is not None:
                    sub._deliver(event.message)
            elif isinstance(event, Subscribed):
                self._on_subscribed(event)
            elif isinstance(event, Gap):
                log.info("gap on %s: have %s, got seq %s prev %s; resubscribing",
                         event.subject, (event.epoch, event.seq), event.got_seq, event.got_prev)
                self._event("gap", {"subject": event.subject, "epoch": event.epoch, "seq": event.seq,
                                    "got_seq": event.got_seq, "got_prev": event.got_prev})
            elif isinstance(event, Refused):
                self._on_refused(event)
            elif isinstance(event, Unsubscribed):
                for fut in self._unsub_waiters.pop(event.subject, []):
                    if not fut.done():
                        fut.set_result(None)

    def _on_subscribed(self, event: Subscribed) -> None:
        subject = event.subject
        sub = self._subs.get(subject)
        if sub is not None:
            sub.epoch = event.epoch
            sub.seq = event.seq
            sub.recovered = event.recovered
        for fut in self._sub_waiters.pop(subject, []):
            if not fut.done():
                if sub is not None:
                    fut.set_result(sub)
                else:
                    fut.set_exception(ConnectionClosedError("unsubscribed meanwhile", subject=subject))

    def _on_refused(self, event: Refused) -> None:
        """A subscribe entry was refused, or the subscription ended (the tracker dropped it)."""
        subject = event.subject
        error = GatewayError.from_frame(event.frame)
        waiters = self._sub_waiters.pop(subject, [])
        worker = self._drop_subscription(subject, error)
        if worker is not None:
            self._tasks.add(worker)
            worker.add_done_callback(self._tasks.discard)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)
        if not waiters:
            log.warning("subscription to %s ended: %s", subject, error)
            self._event("subscription_lost",
                        {"subject": subject, "code": error.code, "message": error.message})

    def _on_ack(self, frame: dict[str, Any]) -> None:
        ident = frame.get("id")
        if not isinstance(ident, (str, int)):
            return
        fut = self._acks.pop(ident, None)
        if fut is None or fut.done():
            return
        epoch, seq, subject = frame.get("epoch"), _opt_int(frame.get("seq")), frame.get("subject")
        if not isinstance(epoch, str) or seq is None:
            fut.set_exception(GatewayError("bad_ack", f"malformed ack {frame!r}", id=ident))
            return
        fut.set_result(Ack(subject if isinstance(subject, str) else "", epoch, seq, ident))

    def _on_error(self, frame: dict[str, Any]) -> GatewayError | None:
        error = GatewayError.from_frame(frame)
        kind = error_kind(frame)
        if error.id is not None and kind in ("publish", "unknown"):
            pending = self._acks.pop(error.id, None)
            if pending is not None:
                if not pending.done():
                    pending.set_exception(error)
                return None
        events = self._tracker.receive(frame)  # a refused subscribe entry, or a subscription ended
        if events:
            self._handle(events)
            return None
        if kind == "publish":  # a fire-and-forget publish failed: subscriptions are not concerned
            log.warning("publish to %s failed: %s", error.subject, error)
            self._event("publish_failed", dict(frame))
            return None
        if kind == "refresh":
            log.warning("token refresh refused: %s", error)  # the session keeps its old token
            self._event("refresh_failed", {"error": str(error)})
            ws = self._ws
            if ws is not None:
                self._retry_refresh(ws)
            return None
        log.warning("gateway error: %s", error)
        self._event("error", dict(frame))
        if error.code == "unauthorized" and kind == "unknown" and self._token_provider is not None:
            return None  # 1.1 expiry (no `request`): close 4001 follows and we reconnect
        return error if error.code in _FATAL_ERRORS else None

    # ----------------------------------------------------------------- plumbing

    def _set_fatal(self, error: GatewayError) -> None:
        log.error("gateway client stopped: %s", error)
        self._fatal = error
        self.connected = False
        self._fail_requests(error)
        self._fail_subscribe_waiters(error)
        for subject in list(self._subs):
            worker = self._drop_subscription(subject, error)
            if worker is not None:
                self._tasks.add(worker)
                worker.add_done_callback(self._tasks.discard)
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
            self._first.exception()
        self._event("fatal", {"code": error.code, "message": error.message})

    def _fail_requests(self, error: GatewayError) -> None:
        acks, self._acks = self._acks, {}
        for ident, fut in acks.items():
            if not fut.done():
                fut.set_exception(
                    ConnectionClosedError(error.message, id=ident, close_code=error.close_code)
                    if isinstance(error, ConnectionClosedError)
                    else error
                )
        pings, self._pings = self._pings, {}
        for ping in pings.values():
            if not ping.done():
                ping.set_exception(error)
        unsubs, self._unsub_waiters = self._unsub_waiters, {}
        for unsub_futs in unsubs.values():  # the next connection does not resubscribe: done
            for f in unsub_futs:
                if not f.done():
                    f.set_result(None)

    def _fail_subscribe_waiters(self, error: GatewayError) -> None:
        waiters, self._sub_waiters = self._sub_waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(error)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, name: str, info: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(name, info)
        except Exception:
            log.exception("on_event(%r) failed", name)
