"""What every fuzz input must satisfy: one home for the oracles, shared by the hypothesis properties
(tests/test_fuzz_*.py) and the atheris harnesses (tests/fuzz/fuzz_*.py).

Each `check_*` function takes one input, runs it through the code under test and raises
AssertionError (with the input) when the result breaks the contract; any other exception escaping it
is a bug found as well. They return a short description of the outcome, for corpus statistics.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from typing import Any

import orjson

from gateway import http, protocol
from gateway.protocol import ProtocolError
from gateway.subjects import Pattern, PatternError, Subject, SubjectError, parse_subject, subject_for_record
from support.fake_transport import FakeTransport

# ---- protocol decoder (PROTOCOL.md "Session", "Subscribing", "Publishing", "Errors") ----------------

#: 1.1: an id is a string of at most 256 bytes or an integer within +-2^53
MAX_ID_BYTES = 256
MAX_ID_INT = 2 ** 53




def valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_ID_INT <= value <= MAX_ID_INT
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES
    return False


def _check_error(exc: ProtocolError, data: bytes | str) -> None:
    assert exc.code in protocol.ERROR_CODES, (exc.code, data)
    # 1.1: the op of the request it answers, whenever the frame had a string op (an unknown one echoed)
    if exc.request is not None and exc.request not in protocol.OPS:
        assert orjson.loads(data)["op"] == exc.request, (exc.request, data)
    assert isinstance(exc.message, str) and exc.message, data
    if exc.has_id:
        assert valid_id(exc.id), f"error echoes an id outside the 1.1 rule: {exc.id!r} for {data!r}"
    obj = orjson.loads(exc.payload())  # the error frame itself must be valid JSON
    assert obj["op"] == "error" and obj["code"] == exc.code, obj
    if exc.has_id:
        assert obj["id"] == exc.id and type(obj["id"]) is type(exc.id), (obj, exc.id)
    else:
        assert "id" not in obj, obj
    if exc.subject is not None:
        assert obj["subject"] == exc.subject, obj
    assert obj.get("request") == exc.request, obj


def _check_subject(subject: Subject, data: bytes | str) -> None:
    assert isinstance(subject, Subject), data
    assert grammar_accepts(subject.text), f"decoder accepted a subject the grammar refuses: {subject.text!r}"


def check_decode(data: bytes | str) -> str:
    """decode() returns a valid request or raises ProtocolError with a code from the protocol's list."""
    try:
        req = protocol.decode(data)
    except ProtocolError as exc:
        _check_error(exc, data)
        return f"error:{exc.code}"
    obj = orjson.loads(data)  # decode accepted it, so it is one JSON object with a string op
    assert isinstance(obj, dict) and isinstance(obj.get("op"), str), data
    if isinstance(req, protocol.Connect):
        assert obj["op"] == "connect"
        assert req.token is None or (isinstance(req.token, str) and req.token), req
        assert req.client is None or isinstance(req.client, str), req
    elif isinstance(req, protocol.Subscribe):
        assert obj["op"] == "subscribe" and isinstance(obj["subjects"], list)
        assert len(req.entries) == len(obj["subjects"]), "one answer per entry, in the order given"
        for entry, item in zip(req.entries, obj["subjects"]):
            if isinstance(entry, ProtocolError):
                _check_error(entry, data)
                assert not entry.has_id
                continue
            _check_subject(entry.subject, data)
            assert entry.subject.text == item["subject"]
            if entry.position is None:
                assert item.get("epoch") is None and item.get("seq") is None, item
            else:
                epoch, seq = entry.position
                assert epoch == item["epoch"] and isinstance(epoch, str)
                assert seq == item["seq"] and type(seq) is int and seq >= 0, item
    elif isinstance(req, protocol.Unsubscribe):
        assert obj["op"] == "unsubscribe" and isinstance(obj["subjects"], list)
        assert len(req.entries) == len(obj["subjects"])
        for entry, item in zip(req.entries, obj["subjects"]):
            if isinstance(entry, ProtocolError):
                _check_error(entry, data)
            else:
                _check_subject(entry, data)
                assert entry.text == item
    elif isinstance(req, protocol.Publish):
        assert obj["op"] == "publish"
        _check_subject(req.subject, data)
        assert req.subject.text == obj["subject"]
        text, b64 = obj.get("content"), obj.get("content_b64")
        assert (text is None) != (b64 is None), f"a publish needs exactly one content field: {data!r}"
        if text is not None:
            assert req.content == text.encode("utf-8")
        else:
            assert req.content == base64.b64decode(b64, validate=True)
        if req.has_id:
            assert valid_id(req.id) and req.id == obj["id"] and type(req.id) is type(obj["id"]), (req.id, data)
            ack = orjson.loads(protocol.ack(req.id, req.subject.text, "e", 1))
            assert ack["id"] == req.id and type(ack["id"]) is type(req.id), "the id comes back unchanged"
        else:
            assert "id" not in obj, data
    elif isinstance(req, protocol.Refresh):
        assert obj["op"] == "refresh"
        assert req.token is None or (isinstance(req.token, str) and req.token), req
    elif isinstance(req, protocol.Ping):
        assert obj["op"] == "ping"
        assert req.id is None or valid_id(req.id), (req.id, data)
        pong = orjson.loads(protocol.pong(req.id))
        assert pong == {"op": "pong", "id": req.id}
    else:
        raise AssertionError(f"decode returned {req!r}")
    return f"ok:{obj['op']}"


# ---- subjects and patterns (PROTOCOL.md "Subjects", "Authorization") ----------------------------------

_GRAMMAR_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_GRAMMAR_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def grammar_accepts(text: str) -> bool:
    """The subject grammar of PROTOCOL.md, written out again from the text (not from subjects.py)."""
    if not text.startswith("/"):
        return False
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate is no character of the grammar
        return False
    if size > 1024:
        return False
    segments = text[1:].split("/")
    if not 1 <= len(segments) <= 32:
        return False
    if not all(_GRAMMAR_SEGMENT.fullmatch(s) for s in segments):
        return False
    return bool(_GRAMMAR_TOPIC.fullmatch(segments[0])) and segments[0] not in (".", "..")


def check_subject(text: str) -> str:
    """parse_subject agrees with the grammar; a valid subject maps to Kafka and back unchanged."""
    want = grammar_accepts(text)
    try:
        subject = parse_subject(text)
    except SubjectError as exc:
        assert not want, f"parse_subject refused a subject the grammar accepts: {text!r} ({exc})"
        return "refused"
    assert want, f"parse_subject accepted a subject the grammar refuses: {text!r}"
    segments = text[1:].split("/")
    assert subject.text == text and subject.topic == segments[0]
    assert subject.key == ("/".join(segments[1:]) or None)
    assert subject_for_record(subject.topic, subject.key_bytes) == subject, "Kafka round trip"
    return "accepted"


def pattern_regex(pattern: str) -> re.Pattern[str] | None:
    """An independent reading of the pattern rules as a regex over the subject text; None if invalid:
    `*` is exactly one segment, a final `>` one or more trailing segments, `>` elsewhere is invalid."""
    if not pattern.startswith("/"):
        return None
    segments = pattern[1:].split("/")
    parts = []
    for i, seg in enumerate(segments):
        if seg == ">":
            if i != len(segments) - 1:
                return None
            parts.append(r"[^/]+(?:/[^/]+)*")
        elif seg == "*":
            parts.append(r"[^/]+")
        elif _GRAMMAR_SEGMENT.fullmatch(seg):
            parts.append(re.escape(seg))
        else:
            return None
    return re.compile("/" + "/".join(parts))


def check_pattern(pattern: str, subject_text: str) -> str:
    oracle = pattern_regex(pattern)
    try:
        pat = Pattern(pattern)
    except PatternError:
        assert oracle is None, f"Pattern refused a valid pattern: {pattern!r}"
        return "invalid pattern"
    assert oracle is not None, f"Pattern accepted an invalid pattern: {pattern!r}"
    try:
        subject = parse_subject(subject_text)
    except SubjectError:
        return "invalid subject"
    got = pat.matches(subject)
    assert got == bool(oracle.fullmatch(subject.text)), (pattern, subject.text, got)
    return "match" if got else "no match"


# ---- the HTTP request head (gateway/http.py) -----------------------------------------------------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _check_response(answer: bytes, status: int) -> None:
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, answer
    lines = head.split(b"\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ".encode()), lines[0]
    for line in lines[1:]:
        assert b":" in line and b"\r" not in line and b"\n" not in line, line  # no header injection
    length = [int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")]
    assert length == [len(body)], (length, len(body))


def feed_request(pieces: list[bytes]) -> tuple[str, Any]:
    """Feed the pieces until the head is complete: ("error", status) or ("done", (request, rest))."""
    req = http.Request()
    rest = b""
    try:
        for i, piece in enumerate(pieces):
            if req.feed(piece):
                # what the connection would read next: frames after an upgrade, nothing after a GET
                rest = req.rest + b"".join(pieces[i + 1:]) if req.upgrade else b""
                return "done", (req, rest)
    except http.HttpError as exc:
        assert exc.status in (400, 431), exc.status
        _check_response(exc.response(), exc.status)
        return "error", exc.status
    return "incomplete", None


def check_http(pieces: list[bytes]) -> str:
    """The head parser answers every input with a complete request, an HttpError (400/431) or a wait
    for more; the outcome does not depend on how the bytes were cut; upgrades are checked per RFC 6455."""
    data = b"".join(pieces)
    kind, value = feed_request(pieces)
    whole_kind, whole_value = feed_request([data])
    if kind != "done" or whole_kind != "done":
        # the size cap may trip on a different piece, but both must agree that the head is bad or not yet
        # complete: cutting the bytes differently must not turn a refused request into an accepted one
        assert {kind, whole_kind} <= {"error", "incomplete"} or kind == whole_kind, (kind, whole_kind, data)
        if kind == "error" and whole_kind == "error":
            assert value == whole_value, (value, whole_value, data)
        return f"{kind}:{value}" if kind == "error" else kind
    req, rest = value
    whole, whole_rest = whole_value
    assert (req.method, req.url, req.headers, req.upgrade) == (whole.method, whole.url, whole.headers,
                                                               whole.upgrade), data
    assert rest == whole_rest, data
    if req.url[:1] == b"/" or not re.match(rb"(?i)https?://", req.url):
        assert req.path == req.url.split(b"?", 1)[0]
    else:  # absolute-form: the path of the URL (RFC 9112 3.2.2)
        assert req.path == (b"/" + re.sub(rb"(?i)^https?://[^/?]*/?", b"", req.url)).split(b"?", 1)[0]
    try:
        answer = http.check_upgrade(req)
    except http.HttpError as exc:
        assert exc.status in (400, 426), exc.status
        _check_response(exc.response(), exc.status)
        return f"refused:{exc.status}"
    assert req.upgrade and req.method == b"GET"
    assert req.version not in ("0.9", "1.0") and req.hosts == 1
    # no body: its bytes would be taken for the first frames
    assert not req.header(b"transfer-encoding") and req.header(b"content-length").strip() in (b"", b"0")
    key = req.header(b"sec-websocket-key").strip()
    assert len(base64.b64decode(key, validate=True)) == 16
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    assert answer == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return "upgrade"


# ---- the WebSocket client-frame parser: compiled fanout._ws against its twin in fanout/_reference.py ---

class FrameParity:
    """One loop and one Writer per implementation, reused for every input (inputs are many)."""

    def __init__(self, impls: list[Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self.impls = []
        for impl in impls:
            self.impls.append((impl, impl.Writer(self.loop), self._recorder(impl)))
        #: whether ws_open takes the 1.1 caps on fragments and queued pongs (all implementations must agree)
        self.caps = {self._takes_caps(impl, writer, rec) for impl, writer, rec in self.impls} == {True}

    @staticmethod
    def _recorder(impl: Any) -> type:
        class Recorder(impl.WSConn):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                self.events: list[tuple[Any, ...]] = []

            def http_received(self, data: bytes) -> None:
                self.events.append(("http", bytes(data)))

            def ws_message(self, opcode: int, payload: bytes) -> None:
                self.events.append(("msg", opcode, bytes(payload)))

            def ws_close(self, code: int, reason: str) -> None:
                self.events.append(("close", code, reason))

            def ws_fail(self, code: int, reason: str) -> None:
                self.events.append(("fail", code))

        return Recorder

    @staticmethod
    def _takes_caps(impl: Any, writer: Any, recorder: type) -> bool:
        conn = recorder()
        try:
            conn.ws_open(writer, FakeTransport(), 1 << 30, 100, lambda c: None, max_fragments=2, max_pongs=1)
        except TypeError:
            return False
        impl.Conn.close(conn)
        return True

    def close(self) -> None:
        self.loop.close()

    def run(self, impl: Any, writer: Any, recorder: type, pieces: list[bytes], max_message: int,
            caps: dict[str, int] | None = None) -> tuple[list[tuple[Any, ...]], bytes, int]:
        conn = recorder()
        tr = FakeTransport()
        conn.ws_open(writer, tr, 1 << 30, max_message, lambda c: None, **(caps or {}))
        for piece in pieces:
            conn.data_received(piece)
        writer.flush()
        state = conn.ws_state
        impl.Conn.close(conn)  # unregisters it from the writer
        return conn.events, bytes(tr.out), state

    def check(self, pieces: list[bytes], max_message: int, max_fragments: int = 0, max_pongs: int = 0) -> str:
        """Both implementations see the same messages, the same close or failure code and write the same
        pongs; a message is never over max_message; after a close or failure nothing more is reported.
        max_fragments / max_pongs (0: the default) are passed when ws_open takes them."""
        caps = {}
        if self.caps:
            caps = {k: v for k, v in (("max_fragments", max_fragments), ("max_pongs", max_pongs)) if v}
        results = [self.run(impl, writer, rec, pieces, max_message, caps) for impl, writer, rec in self.impls]
        # let the writers' scheduled flushes run, so nothing piles up in the loop across inputs
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()
        first = results[0]
        for impl_result, (impl, _, _) in zip(results[1:], self.impls[1:]):
            assert impl_result == first, (f"{self.impls[0][0].name} and {impl.name} differ on "
                                          f"{pieces!r} (max_message={max_message}): {first} != {impl_result}")
        events, out, state = first
        for i, event in enumerate(events):
            if event[0] == "msg":
                assert event[1] in (1, 2) and len(event[2]) <= max_message, event[:2]
            else:
                assert event[0] in ("close", "fail"), event
                assert i == len(events) - 1, f"events after {event}: {events[i + 1:]}"
                assert state == 2
                if event[0] == "fail":
                    assert event[1] in (1002, 1007, 1009), event
        return events[-1][0] if events else "nothing"
