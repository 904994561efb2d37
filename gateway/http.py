"""HTTP/1.1 on the gateway's port: the request head of a new connection (httptools/llhttp parses it),
the WebSocket upgrade checks and 101 answer (RFC 6455 4.2), and small plain responses.

Sans-I/O: bytes in (`Request.feed`), bytes out (`upgrade_response`, `response`). A plain request is
answered and the connection closed; there is no keep-alive (the routes are /healthz, /metrics and the
demo page, not an API). Pipelined requests behind the first are not parsed: the first is answered with
`Connection: close` and the connection closed, and the client retries the rest on a new connection
(RFC 9112 9.3.2 and 9.6).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from http import HTTPStatus

import httptools

#: the request head (request line and headers) may not be larger than this
MAX_HEAD_BYTES = 16 * 1024
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HttpError(Exception):
    """The request is answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    def response(self) -> bytes:
        return response(self.status, f"{self.message}\n".encode(), headers=self.headers)


class _Complete(Exception):
    """Raised from on_message_complete to stop httptools at the end of the first request."""


class Request:
    """One request head, fed in whatever pieces the client sends it."""

    __slots__ = ("_parser", "_size", "url", "headers", "method", "upgrade", "done", "rest", "version", "hosts")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._size = 0
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.method = b""
        self.version = ""  # "1.1", once done
        self.hosts = 0  # Host header lines (values are joined in `headers`)
        self.upgrade = False
        self.done = False
        #: bytes that followed the request head in the last piece (the first WebSocket frames)
        self.rest = b""

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"host":
            self.hosts += 1
        old = self.headers.get(name)
        self.headers[name] = value if old is None else old + b", " + value

    def on_message_complete(self) -> None:
        self.done = True
        if not self._parser.should_upgrade():
            # Stop here: httptools would go on parsing a pipelined next request into the same
            # callbacks (its URL appended to ours). An upgrade stops by itself (HttpParserUpgrade).
            raise _Complete

    def feed(self, data: bytes) -> bool:
        """True once the request is complete; raises HttpError for a bad or oversized one."""
        if self.done:
            return True
        # Parse no byte past the cap: the verdict then depends neither on how the client cut its bytes
        # nor on what follows a complete request, and a huge read is not parsed whole.
        piece = data[:MAX_HEAD_BYTES - self._size]
        self._size += len(piece)
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade = True
            self.done = True
            self.rest = data[int(exc.args[0]):]
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Complete):
                raise HttpError(400, f"bad request: {exc}") from None
        except httptools.HttpParserError as exc:
            raise HttpError(400, f"bad request: {exc}") from None
        if not self.done and self._size >= MAX_HEAD_BYTES:
            raise HttpError(431, "request head too large")
        if self.done:
            self.method = self._parser.get_method()
            self.version = self._parser.get_http_version()
            return True
        return False

    @property
    def path(self) -> bytes:
        url = self.url
        if url[:1] != b"/":  # absolute-form, http://host/path (RFC 9112 3.2.2: a server MUST accept it)
            scheme, sep, rest = url.partition(b"://")
            if sep and scheme.lower() in (b"http", b"https"):
                end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
                url = rest[end:] if rest[end:end + 1] == b"/" else b"/" + rest[end:]
        return url.split(b"?", 1)[0]

    def header(self, name: bytes) -> bytes:
        return self.headers.get(name, b"")


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def check_upgrade(req: Request) -> bytes:
    """The 101 answer to a valid WebSocket upgrade request; HttpError otherwise."""
    if not req.upgrade or b"websocket" not in _tokens(req.header(b"upgrade")):
        raise HttpError(426, "this is a WebSocket endpoint", (("Upgrade", "websocket"),))
    if req.method != b"GET":
        raise HttpError(400, "a WebSocket upgrade must be a GET")
    if req.version in ("0.9", "1.0") or req.hosts != 1:
        # RFC 6455 4.2.1: an HTTP/1.1 or higher GET with a Host; RFC 9112 3.2: one Host, else 400
        raise HttpError(400, "a WebSocket upgrade is an HTTP/1.1 request with one Host header")
    if req.header(b"transfer-encoding") or req.header(b"content-length").strip() not in (b"", b"0"):
        # llhttp stops at the end of an upgrade's head: a body would be read as the first frames, where a
        # proxy in front sees the request's body (RFC 6455 4.1: the handshake is a GET without one)
        raise HttpError(400, "a WebSocket upgrade has no body")
    if b"upgrade" not in _tokens(req.header(b"connection")):
        raise HttpError(400, "Connection header must contain 'upgrade'")
    if req.header(b"sec-websocket-version").strip() != b"13":
        raise HttpError(426, "unsupported WebSocket version", (("Sec-WebSocket-Version", "13"),))
    key = req.header(b"sec-websocket-key").strip()
    try:
        ok = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise HttpError(400, "missing or invalid Sec-WebSocket-Key")
    return upgrade_response(key)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def upgrade_response(key: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n")


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", *,
             headers: tuple[tuple[str, str], ...] = (), head_only: bool = False) -> bytes:
    """A complete response; the connection is closed after it."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Cache-Control: no-store",
             "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
