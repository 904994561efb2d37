"""Protocol v1, sans-I/O: client JSON frames -> requests, server messages -> JSON bytes.

No asyncio here. `decode()` validates one text frame and returns a request object, or raises
ProtocolError carrying the error code (and the `id` / `subject` to echo, when known). The encoders
return the JSON payload (bytes); framing is fanout's job.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .records import Record
from .subjects import Subject, SubjectError, parse_subject

VERSION = 1

# error codes (PROTOCOL.md "Errors and close codes")
BAD_REQUEST = "bad_request"
NOT_CONNECTED = "not_connected"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
INVALID_SUBJECT = "invalid_subject"
UNKNOWN_TOPIC = "unknown_topic"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
LIMIT_EXCEEDED = "limit_exceeded"
UNAVAILABLE = "unavailable"
ERROR_CODES = (BAD_REQUEST, NOT_CONNECTED, UNAUTHORIZED, FORBIDDEN, INVALID_SUBJECT, UNKNOWN_TOPIC,
               TOO_LARGE, RATE_LIMITED, UNAVAILABLE, LIMIT_EXCEEDED)



class CloseCode(enum.IntEnum):
    """The close codes the gateway sends (PROTOCOL.md "Errors and close codes")."""

    NORMAL = 1000          #: normal close (also the answer to a close frame without a code)
    GOING_AWAY = 1001      #: gateway shutting down: clients reconnect elsewhere
    PROTOCOL_ERROR = 1002  #: WebSocket protocol violation
    INVALID_UTF8 = 1007    #: a text frame that is not valid UTF-8
    POLICY = 1008          #: policy: auth, not connected, no connect in time
    TOO_BIG = 1009         #: a frame larger than the limit
    INTERNAL = 1011        #: internal error; also a peer that answers no ping for 3 x heartbeat_ms
    SLOW_CONSUMER = 4000   #: its queue overflowed: it reconnects and recovers
    TOKEN_EXPIRED = 4001   #: 1.1: the session's token expired without a refresh

# 1.1: an `id` is a string of at most 256 bytes or an integer within +-2^53 (exact in every JSON
# parser, JavaScript's included); anything else is bad_request, never echoed altered.
MAX_ID_BYTES = 256
MAX_ID_INT = 2**53

Id = str | int
_NO_ID = object()


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow; becomes an `error` frame.

    `request` is the op of the client request it answers (1.1): decode() fills it in for errors it
    raises; the session passes it for the errors it makes itself."""

    def __init__(self, code: str, message: str, *, id: Any = _NO_ID, subject: str | None = None,
                 request: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.subject = subject
        self.request = request

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID

    def payload(self) -> bytes:
        return error(self.code, self.message, id=self.id, subject=self.subject, request=self.request)


@dataclass(slots=True)
class Connect:
    token: str | None
    client: str | None


@dataclass(slots=True)
class SubscribeEntry:
    subject: Subject
    position: tuple[str, int] | None


@dataclass(slots=True)
class Subscribe:
    entries: list[SubscribeEntry | ProtocolError]  # judged one by one, in the order given


@dataclass(slots=True)
class Unsubscribe:
    entries: list[Subject | ProtocolError]


@dataclass(slots=True)
class Publish:
    subject: Subject
    content: bytes
    id: Any  # _NO_ID when absent

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID


@dataclass(slots=True)
class Ping:
    id: Any


@dataclass(slots=True)
class Refresh:
    token: str | None


Request = Connect | Subscribe | Unsubscribe | Publish | Ping | Refresh

#: the ops a client may send (an error for an unknown op echoes that op as its `request`)
OPS = ("connect", "subscribe", "unsubscribe", "publish", "ping", "refresh")


def _is_id(value: Any) -> bool:
    """1.1's id rule. orjson gives a float for an integer beyond 64 bits, so those are refused too."""
    if isinstance(value, str):
        return len(value) <= MAX_ID_BYTES and len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES
    return type(value) is int and -MAX_ID_INT <= value <= MAX_ID_INT


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_json(data: bytes | str) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(BAD_REQUEST, f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "a frame must hold one JSON object")
    if not isinstance(obj.get("op"), str):
        raise ProtocolError(BAD_REQUEST, "missing string field 'op'")
    return obj


def decode(data: bytes | str) -> Request:
    """One client text frame -> request; raise ProtocolError (code bad_request, invalid_subject, ...),
    with `request` set to the op when the frame had a string `op` of a known request."""
    obj = parse_json(data)
    op = obj["op"]
    decoder = _DECODERS.get(op)
    if decoder is None:
        # 1.1: `request` is present whenever the error answers a request: an unknown op is echoed as
        # sent (it is the client's own string, at most --max-message-bytes, on its own connection)
        raise ProtocolError(BAD_REQUEST, f"unknown op {op[:64]!r}",
                            id=obj["id"] if _is_id(obj.get("id")) else _NO_ID, request=op)
    try:
        req = decoder(obj)
    except ProtocolError as exc:
        exc.request = op
        raise
    if isinstance(req, (Subscribe, Unsubscribe)):
        for entry in req.entries:
            if isinstance(entry, ProtocolError):
                entry.request = op
    return req


def _decode_connect(obj: dict[str, Any]) -> Connect:
    token, client = obj.get("token"), obj.get("client")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(BAD_REQUEST, "'token' must be a string")
    if client is not None and not isinstance(client, str):
        raise ProtocolError(BAD_REQUEST, "'client' must be a string")
    return Connect(token or None, client)


def _subject(value: Any, *, id: Any = _NO_ID) -> Subject:
    if not isinstance(value, str):
        raise ProtocolError(BAD_REQUEST, "'subject' must be a string", id=id)
    try:
        return parse_subject(value)
    except SubjectError as exc:
        raise ProtocolError(INVALID_SUBJECT, str(exc), id=id, subject=value) from None


def _decode_subscribe(obj: dict[str, Any]) -> Subscribe:
    items = obj.get("subjects")
    if not isinstance(items, list):
        raise ProtocolError(BAD_REQUEST, "'subjects' must be a list")
    entries: list[SubscribeEntry | ProtocolError] = []
    for item in items:
        try:
            entries.append(_subscribe_entry(item))
        except ProtocolError as exc:
            entries.append(exc)
    return Subscribe(entries)


def _subscribe_entry(item: Any) -> SubscribeEntry:
    if not isinstance(item, dict):
        raise ProtocolError(BAD_REQUEST, "each entry of 'subjects' must be an object with 'subject'")
    subject = _subject(item.get("subject"))
    epoch, seq = item.get("epoch"), item.get("seq")
    if epoch is None and seq is None:
        return SubscribeEntry(subject, None)
    if epoch is None or seq is None:
        raise ProtocolError(BAD_REQUEST, "'epoch' and 'seq' go together (a recovery position)",
                            subject=subject.text)
    if not isinstance(epoch, str) or not _is_int(seq) or seq < 0:
        raise ProtocolError(BAD_REQUEST, "'epoch' must be a string and 'seq' an integer >= 0",
                            subject=subject.text)
    return SubscribeEntry(subject, (epoch, seq))


def _decode_unsubscribe(obj: dict[str, Any]) -> Unsubscribe:
    items = obj.get("subjects")
    if not isinstance(items, list):
        raise ProtocolError(BAD_REQUEST, "'subjects' must be a list of subject strings")
    entries: list[Subject | ProtocolError] = []
    for item in items:
        try:
            entries.append(_subject(item))
        except ProtocolError as exc:
            entries.append(exc)
    return Unsubscribe(entries)


_ID_RULE = "'id' must be a string of at most 256 bytes or an integer within +-2^53"


def _decode_publish(obj: dict[str, Any]) -> Publish:
    id = obj.get("id", _NO_ID)
    if id is not _NO_ID and not _is_id(id):
        raise ProtocolError(BAD_REQUEST, _ID_RULE)
    subject = _subject(obj.get("subject"), id=id)
    text, b64 = obj.get("content"), obj.get("content_b64")
    if (text is None) == (b64 is None):
        raise ProtocolError(BAD_REQUEST, "a publish carries exactly one of 'content' and 'content_b64'",
                            id=id, subject=subject.text)
    if text is not None:
        if not isinstance(text, str):
            raise ProtocolError(BAD_REQUEST, "'content' must be a string", id=id, subject=subject.text)
        content = text.encode("utf-8", "surrogatepass")
    else:
        if not isinstance(b64, str):
            raise ProtocolError(BAD_REQUEST, "'content_b64' must be a string", id=id, subject=subject.text)
        try:
            content = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(BAD_REQUEST, "'content_b64' is not valid base64", id=id,
                                subject=subject.text) from None
    return Publish(subject, content, id)


def _decode_ping(obj: dict[str, Any]) -> Ping:
    id = obj.get("id")
    if id is not None and not _is_id(id):
        raise ProtocolError(BAD_REQUEST, _ID_RULE)
    return Ping(id)


def _decode_refresh(obj: dict[str, Any]) -> Refresh:
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(BAD_REQUEST, "'token' must be a string")
    return Refresh(token or None)


_DECODERS: dict[str, Callable[[dict[str, Any]], Request]] = {
    "connect": _decode_connect,
    "subscribe": _decode_subscribe,
    "unsubscribe": _decode_unsubscribe,
    "publish": _decode_publish,
    "ping": _decode_ping,
    "refresh": _decode_refresh,
}


# ---- server -> client ------------------------------------------------------------------------------

def _dumps(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def connected(session: str, server: str, heartbeat_ms: int) -> bytes:
    return _dumps({"op": "connected", "session": session, "server": server, "heartbeat_ms": heartbeat_ms,
                   "version": VERSION})


def subscribed(subject: str, epoch: str, seq: int, recovered: bool) -> bytes:
    return _dumps({"op": "subscribed", "subject": subject, "epoch": epoch, "seq": seq, "recovered": recovered})


def unsubscribed(subject: str) -> bytes:
    return _dumps({"op": "unsubscribed", "subject": subject})


def ack(id: Any, subject: str, epoch: str, seq: int) -> bytes:
    return _dumps({"op": "ack", "id": id, "subject": subject, "epoch": epoch, "seq": seq})


def pong(id: Any) -> bytes:
    return _dumps({"op": "pong", "id": id})


def refreshed(exp: float | None) -> bytes:
    """1.1: the answer to a valid `refresh`; `exp` is absent when auth is off (the token is ignored).
    An integral `exp` is written as an integer when a JSON number holds it exactly (within 2^53, as ids),
    else as the float: a token may carry any `exp`, and orjson refuses integers beyond 64 bits."""
    if exp is None:
        return b'{"op":"refreshed"}'
    exact = float(exp).is_integer() and abs(exp) <= MAX_ID_INT
    return _dumps({"op": "refreshed", "exp": int(exp) if exact else exp})


HEARTBEAT = b'{"op":"hb"}'


def error(code: str, message: str, *, id: Any = _NO_ID, subject: str | None = None,
          request: str | None = None) -> bytes:
    obj: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if id is not _NO_ID:
        obj["id"] = id
    if subject is not None:
        obj["subject"] = subject
    if request is not None:
        obj["request"] = request
    return _dumps(obj)


def content_fields(content: bytes) -> dict[str, str]:
    """`content` when the bytes are valid UTF-8, else `content_b64`."""
    try:
        return {"content": content.decode("utf-8")}
    except UnicodeDecodeError:
        return {"content_b64": base64.b64encode(content).decode("ascii")}


def msg_head(subject: str) -> bytes:
    """What every `msg` payload of `subject` starts with (fanout.publish_run adds the rest, as msg())."""
    return b'{"op":"msg","subject":' + orjson.dumps(subject) + b","


def content_member(content: bytes) -> bytes:
    """The `"content":...` (or `"content_b64":...`) member of a `msg` payload, as msg() writes it."""
    return orjson.dumps(content_fields(content))[1:-1]


def content_too_large(content: bytes, limit: int) -> bool:
    """Whether `content` as it travels in a `msg` (its content_member(): `content` JSON-escaped, or
    `content_b64`) is over `limit` (--max-message-bytes). Valid UTF-8 grows when escaped: a control
    character takes 6 bytes (\\u0001). The encode runs only when 6 x the bytes could exceed the limit."""
    n = len(content)
    if n > limit:
        return True
    return 6 * n + 16 > limit and len(content_member(content)) > limit


def msg(record: Record, *, snapshot: bool = False) -> bytes:
    """The `msg` payload of a record: encoded once per message, shared by every subscriber."""
    obj: dict[str, Any] = {"op": "msg", "subject": record.subject}
    obj.update(content_fields(record.content))
    obj["epoch"] = record.epoch
    obj["seq"] = record.seq
    if record.prev is not None:
        obj["prev"] = record.prev
    obj["ts"] = record.ts
    if snapshot:
        obj["snapshot"] = True
    return _dumps(obj)
