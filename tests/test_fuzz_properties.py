"""Property-based fuzzing of the sans-I/O parsers: the protocol decoder, subjects and patterns, the HTTP
request head and the WebSocket frame parser (compiled against its twin).

The oracles live in tests/support/fuzz_targets.py, shared with the coverage-guided atheris harnesses
(tests/fuzz/); here hypothesis drives them with structured inputs that random bytes rarely reach: any
JSON value, numbers beyond 64 bits, NaN and Infinity literals, duplicate keys, lone surrogates, deep
nesting, subjects at the length and segment limits.
"""

from __future__ import annotations

import base64
import json

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gateway import http, protocol
from gateway.protocol import ProtocolError
from gateway.records import Record
from gateway.subjects import Pattern, SubjectError, parse_subject, subject_for_record
from support import fanout_impls
from support.fuzz_targets import (
    FrameParity,
    check_decode,
    check_http,
    check_pattern,
    check_subject,
    grammar_accepts,
    pattern_regex,
    valid_id,
)
from support.ws import client_frame

# ---- strategies ------------------------------------------------------------------------------------------

SEG_CHARS = "abcXYZ019._~-"
segment = st.text(SEG_CHARS, min_size=1, max_size=12)
topic = st.text("abcXYZ019._-", min_size=1, max_size=12).filter(lambda t: t not in (".", ".."))
valid_subject = st.builds(lambda t, rest: "/" + "/".join([t, *rest]), topic, st.lists(segment, max_size=6))
# near misses: characters around the alphabet, empty segments, unicode, the pattern signs
odd_char = st.sampled_from(["/", "*", ">", " ", "\n", "\x00", "é", "\u0663", "💥", "%", "+", "?", "#", "\ud800"])
near_subject = st.one_of(
    valid_subject,
    st.text(st.one_of(st.sampled_from(SEG_CHARS), odd_char), max_size=40),
    st.builds(lambda s, i, c: s[:i] + c + s[i:], valid_subject, st.integers(0, 80), odd_char),
)

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([2 ** 53, 2 ** 53 + 1, -(2 ** 53), -(2 ** 53) - 1, 2 ** 63, 2 ** 64, 2 ** 64 + 1, -(2 ** 63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
)
strings = st.one_of(st.text(max_size=20), st.text(max_size=300), st.sampled_from(
    ["", "publish", "subscribe", "connect", "ping", "unsubscribe", "/a", "/a/b", "x" * 256, "é" * 129]))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(strings, inner, max_size=4)), max_leaves=20)

OPS = ["connect", "subscribe", "unsubscribe", "publish", "ping", "refresh", "Publish", "", "msg"]
FIELDS = ["op", "id", "subject", "subjects", "content", "content_b64", "token", "client", "epoch", "seq"]


def field_values(name: str) -> st.SearchStrategy:
    typical = {
        "op": st.sampled_from(OPS),
        "id": st.one_of(numbers, strings),
        "subject": near_subject,
        "subjects": st.lists(st.one_of(near_subject, st.fixed_dictionaries(
            {"subject": near_subject}, optional={"epoch": st.one_of(strings, numbers), "seq": numbers})), max_size=4),
        "content": st.text(max_size=50),
        "content_b64": st.one_of(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()), strings),
        "seq": numbers,
    }.get(name, strings)
    return st.one_of(typical, json_values)


# a request-shaped object: mostly the protocol's own fields with plausible or hostile values
request_objects = st.dictionaries(st.sampled_from(FIELDS), st.none(), min_size=1).flatmap(
    lambda d: st.fixed_dictionaries({k: field_values(k) for k in d}))


def dumps(value: object) -> str:
    """Standard JSON, except that Python writes NaN / Infinity literals (which JSON has not)."""
    return json.dumps(value, allow_nan=True)


# ---- protocol decoder --------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(json_values)
def test_decode_any_json_value(value):
    check_decode(dumps(value).encode("utf-8", "surrogatepass"))


@settings(max_examples=600, deadline=None)
@given(request_objects)
def test_decode_request_shaped_objects(obj):
    check_decode(dumps(obj).encode("utf-8", "surrogatepass"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_any_bytes(data):
    check_decode(data)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "nan", "inf"])
@pytest.mark.parametrize("where", ["id", "seq", "content"])
def test_non_finite_numbers_are_bad_requests(literal, where):
    entry = '{"subject":"/a","epoch":"e","seq":%s}' % literal if where == "seq" else '{"subject":"/a"}'
    raw = {
        "id": '{"op":"publish","subject":"/a","content":"x","id":%s}' % literal,
        "seq": '{"op":"subscribe","subjects":[%s]}' % entry,
        "content": '{"op":"publish","subject":"/a","content":%s}' % literal,
    }[where]
    with pytest.raises(ProtocolError) as info:
        protocol.decode(raw)
    assert info.value.code == protocol.BAD_REQUEST
    check_decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=300), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.none()))
@example(2 ** 53)
@example(2 ** 53 + 1)
@example(-(2 ** 53) - 1)
@example(2 ** 64 + 1)
@example(1.5)
@example("é" * 128)
@example("é" * 129)
def test_publish_id_follows_the_1_1_rule_and_comes_back_unchanged(id):
    """1.1: an id is a string of at most 256 bytes or an integer within +-2^53, echoed back unchanged;
    anything else is bad_request (a big integer must not come back as a float)."""
    raw = orjson.dumps({"op": "publish", "subject": "/a", "content": "x"})[:-1] + b',"id":' + \
        json.dumps(id).encode() + b"}"
    if id is None:
        with pytest.raises(ProtocolError) as info:  # "id": null is not an id either
            protocol.decode(raw)
        assert info.value.code == protocol.BAD_REQUEST
        return
    if valid_id(id):
        req = protocol.decode(raw)
        assert isinstance(req, protocol.Publish) and req.id == id and type(req.id) is type(id)
        echoed = orjson.loads(protocol.ack(req.id, "/a", "e", 1))["id"]
        assert echoed == id and type(echoed) is type(id)
    else:
        with pytest.raises(ProtocolError) as info:
            protocol.decode(raw)
        assert info.value.code == protocol.BAD_REQUEST and not info.value.has_id
    check_decode(raw)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(allow_nan=False),
                 st.text(max_size=300), st.booleans()))
def test_ping_and_unknown_op_ids_follow_the_same_rule(id):
    ping = b'{"op":"ping","id":' + json.dumps(id).encode() + b"}"
    if valid_id(id):
        assert orjson.loads(protocol.pong(protocol.decode(ping).id))["id"] == id
    else:
        with pytest.raises(ProtocolError):
            protocol.decode(ping)
    with pytest.raises(ProtocolError) as info:
        protocol.decode(b'{"op":"nope","id":' + json.dumps(id).encode() + b"}")
    assert info.value.code == protocol.BAD_REQUEST
    assert info.value.has_id == valid_id(id)  # echoed only when it is an id


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.sampled_from(OPS), field_values("subject"),
                                                              json_values)), min_size=1, max_size=8))
def test_duplicate_keys_last_one_wins(pairs):
    """An object with a repeated key means what it means with only the last occurrence (one reading, so
    no check can look at one value while the handler uses another)."""
    raw = "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in pairs) + "}"
    last = "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in dict(pairs).items()) + "}"
    outcome = _outcome(raw)
    try:
        orjson.loads(raw.encode("utf-8", "surrogatepass"))
    except orjson.JSONDecodeError:  # a bad value anywhere (a lone surrogate) spoils the whole frame
        assert outcome == ("error", protocol.BAD_REQUEST, None, None)
    else:
        assert outcome == _outcome(last)
    check_decode(raw.encode("utf-8", "surrogatepass"))


def _outcome(raw: str) -> object:
    try:
        req = protocol.decode(raw.encode("utf-8", "surrogatepass"))
    except ProtocolError as exc:
        return ("error", exc.code, exc.id if exc.has_id else None, exc.subject)
    return repr(req)


@example(text="", b64="")
@given(st.text(max_size=30), st.text(max_size=30))
def test_both_content_fields_is_a_bad_request(text, b64):
    raw = orjson.dumps({"op": "publish", "subject": "/a/b", "content": text, "content_b64": b64, "id": 7})
    with pytest.raises(ProtocolError) as info:
        protocol.decode(raw)
    assert (info.value.code, info.value.id, info.value.subject) == (protocol.BAD_REQUEST, 7, "/a/b")


@pytest.mark.parametrize("raw", [
    '{"op":"publish","subject":"/a","content":"\\ud800"}',          # lone high surrogate
    '{"op":"publish","subject":"/a","content":"\\udc00x"}',         # lone low surrogate
    '{"op":"publish","subject":"/a","content":"\\ud800\\ud800"}',   # two highs
    '{"op":"ping","id":"\\udfff"}',
    '{"op":"subscribe","subjects":[{"subject":"/a\\ud800"}]}',
    '{"op":"nope","id":"\\ud83d"}',
])
def test_lone_surrogates_are_bad_json(raw):
    """A lone surrogate escape names no character: the request is bad JSON (never a str that the
    error or ack encoder would then fail to write)."""
    with pytest.raises(ProtocolError) as info:
        protocol.decode(raw)
    assert info.value.code == protocol.BAD_REQUEST and not info.value.has_id
    check_decode(raw)
    check_decode(raw.encode().decode("unicode_escape").encode("utf-8", "surrogatepass"))  # raw surrogate bytes


def test_a_surrogate_pair_escape_is_one_character():
    req = protocol.decode('{"op":"publish","subject":"/a","content":"\\ud83d\\udca5"}')
    assert req.content == "💥".encode()


@pytest.mark.parametrize("depth", [10, 1023, 1024, 5000, 100_000])
@pytest.mark.parametrize("kind", ["list", "object"])
def test_deep_nesting_is_refused_or_decoded_without_crash(depth, kind):
    opener, closer = ("[", "]") if kind == "list" else ('{"a":', "}")
    nested = opener * depth + "1" + closer * depth
    raw = '{"op":"publish","subject":"/a","content":"x","extra":' + nested + "}"
    outcome = check_decode(raw)
    # the JSON depth limit: orjson refuses more than 1024 levels (the request object is one of them) as
    # bad JSON, without recursing further; a shallower unknown field is ignored (forward compatibility)
    assert outcome == ("ok:publish" if depth + 1 <= 1024 else "error:bad_request"), outcome


@given(st.text(max_size=200))
def test_text_content_round_trip(text):
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
    req = protocol.decode(orjson.dumps({"op": "publish", "subject": "/t/k", "content": text}))
    assert req.content == text.encode()
    assert protocol.content_fields(req.content) == {"content": text}
    out = orjson.loads(protocol.msg(Record("/t/k", req.content, "e", 3, 2, 99)))
    assert out["content"] == text and "content_b64" not in out


@given(st.binary(max_size=200))
def test_binary_content_round_trip(content):
    req = protocol.decode(orjson.dumps({"op": "publish", "subject": "/t",
                                        "content_b64": base64.b64encode(content).decode()}))
    assert req.content == content
    out = orjson.loads(protocol.msg(Record("/t", content, "e", 1, 0, 5), snapshot=True))
    back = out["content"].encode() if "content" in out else base64.b64decode(out["content_b64"], validate=True)
    assert back == content and out["snapshot"] is True
    assert ("content" in out) == _is_utf8(content)  # content whenever the bytes are valid UTF-8


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@given(st.text(max_size=20), st.integers(min_value=0, max_value=2 ** 63 - 2))
def test_recovery_position_round_trip(epoch, seq):
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in epoch))
    req = protocol.decode(orjson.dumps({"op": "subscribe", "subjects": [
        {"subject": "/a", "epoch": epoch, "seq": seq}, {"subject": "/a", "epoch": epoch, "seq": -1 - seq}]}))
    good, bad = req.entries
    assert good.position == (epoch, seq)
    assert isinstance(bad, ProtocolError) and bad.code == protocol.BAD_REQUEST and bad.subject == "/a"


# ---- subjects and patterns ------------------------------------------------------------------------------

@settings(max_examples=1000, deadline=None)
@given(near_subject)
@example("/" + "a" * 1023)
@example("/" + "a" * 1024)
@example("/" + "/".join(["a"] * 32))
@example("/" + "/".join(["a"] * 33))
@example("/" + "a" * 249)
@example("/" + "a" * 250)
@example("/" + "a" * 250 + "/b")
@example("/~a/b")
@example("/./b")
@example("/../b")
@example("/a/./..")
@example("/a\n")
@example("/é")
@example("/a/")
@example("//a")
@example("/")
def test_subjects_follow_the_grammar(text):
    check_subject(text)


@given(st.lists(segment, min_size=1, max_size=40), st.integers(0, 40))
def test_subject_segment_and_byte_limits(segments, pad):
    segments = ["t", "x" * (1 + pad * 25), *segments[2:]]
    text = "/" + "/".join(segments)
    assert check_subject(text) == ("accepted" if len(segments) <= 32 and len(text) <= 1024 else "refused")


@pytest.mark.parametrize("text", ["/\ud800", "/a/\udc00", "/a\ud83d/b"])
def test_lone_surrogate_subject_is_invalid_subject(text):
    """Found by fuzzing: parse_subject raised UnicodeEncodeError (not SubjectError) on a lone surrogate."""
    with pytest.raises(SubjectError):
        parse_subject(text)
    assert check_subject(text) == "refused"


@settings(max_examples=500, deadline=None)
@given(topic, st.one_of(st.none(), st.binary(max_size=40), st.text(SEG_CHARS + "/é ", max_size=40).map(str.encode)))
def test_any_kafka_key_maps_to_its_subject_or_is_skipped(topic_name, key):
    """A record of another producer: its key is a valid subject tail (the subject maps back to exactly
    this topic and key), or the record is skipped, never mapped to some other subject."""
    subject = subject_for_record(topic_name, key)
    if subject is None:
        text = "/" + topic_name + ("" if key is None else "/" + key.decode("utf-8", "replace"))
        assert key is not None and not (key.isascii() and grammar_accepts(text) and text.count("/") >= 2)
        return
    assert (subject.topic, subject.key_bytes) == (topic_name, key)
    assert grammar_accepts(subject.text) and parse_subject(subject.text) == subject


def test_grammar_oracle_itself():
    assert grammar_accepts("/a") and grammar_accepts("/a/~b/.c-d_e")
    assert not grammar_accepts("/~a") and not grammar_accepts("/a//b") and not grammar_accepts("a")


def pattern_for(subject: str, data: st.DataObject) -> str:
    """A pattern built to match `subject`: some segments become `*`, maybe a tail becomes `>`."""
    parts = subject[1:].split("/")
    out = [p if not data.draw(st.booleans()) else "*" for p in parts]
    if len(out) > 1 and data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(out) - 1))
        out = out[:cut] + [">"]
    return "/" + "/".join(out)


@settings(max_examples=400, deadline=None)
@given(valid_subject, st.data())
def test_patterns_built_from_a_subject_match_it(subject, data):
    pattern = pattern_for(subject, data)
    assert Pattern(pattern).matches(parse_subject(subject)), pattern
    assert check_pattern(pattern, subject) == "match"


pattern_texts = st.builds(lambda segs: "/" + "/".join(segs), st.lists(
    st.one_of(st.sampled_from(["*", ">", "a", "b", "ab", ""]), segment), min_size=1, max_size=5))


@settings(max_examples=1000, deadline=None)
@given(pattern_texts, st.lists(st.sampled_from(["a", "b", "ab", "c"]), min_size=1, max_size=6))
def test_pattern_semantics(pattern, segments):
    """`*` is exactly one segment, a final `>` one or more; checked against a regex reading of the rules."""
    check_pattern(pattern, "/" + "/".join(segments))


@pytest.mark.parametrize("pattern,subject,matches", [
    ("/a/>", "/a", False), ("/a/>", "/a/b", True), ("/a/>", "/a/b/c", True), ("/>", "/a", True),
    ("/*", "/a", True), ("/*", "/a/b", False), ("/a/*/c", "/a/b/c", True), ("/a/*/c", "/a/c", False),
    ("/*/>", "/a", False), ("/*/>", "/a/b", True),
])
def test_pattern_examples(pattern, subject, matches):
    assert Pattern(pattern).matches(parse_subject(subject)) is matches
    assert bool(pattern_regex(pattern).fullmatch(subject)) is matches


# ---- HTTP request head ---------------------------------------------------------------------------------

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def test_a_huge_read_is_parsed_only_up_to_the_head_cap():
    """Found while fuzzing: the head cap was checked after parsing the whole read, so one 1 MB read of
    headers was parsed (and kept) whole before the 431. Now no byte past the cap is parsed."""
    req = http.Request()
    head = b"GET /ws HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100_000))
    with pytest.raises(http.HttpError) as info:
        req.feed(head)
    assert info.value.status == 431
    assert len(req.headers) < http.MAX_HEAD_BYTES // len(b"X-1: v\r\n")


@pytest.mark.parametrize("size", [http.MAX_HEAD_BYTES - 1, http.MAX_HEAD_BYTES, http.MAX_HEAD_BYTES + 1])
@pytest.mark.parametrize("piece", [1, 1000, 1 << 20])
def test_the_head_cap_is_exact_however_the_head_is_cut(size, piece):
    start = b"GET /healthz HTTP/1.1\r\nX-Pad: "
    data = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(data) == size
    outcome = feed_pieces([data[i:i + piece] for i in range(0, len(data), piece)])
    assert outcome == ("done" if size <= http.MAX_HEAD_BYTES else 431)


@pytest.mark.parametrize("after", [b"GET /metrics HTTP/1.1\r\n\r\n", b"x" * (http.MAX_HEAD_BYTES + 1), b"\x81\x85abcd"])
def test_bytes_after_a_complete_request_do_not_change_its_answer(after):
    """Found by the HTTP fuzzer (split vs whole): a pipelined second request was parsed into the first
    one's URL (issue 10 item 5; fixed on the `limits` branch), and more than 16 KiB after a complete
    request turned it into a 431 (fixed here: no byte past the cap is parsed)."""
    first = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    assert feed_pieces([first + after]) == feed_pieces([first, after]) == "done"
    req = http.Request()
    assert req.feed(first + after) and req.path == b"/healthz" and req.method == b"GET"
    check_http([first + after])
    check_http([first, after])


def feed_pieces(pieces: list[bytes]) -> object:
    req = http.Request()
    try:
        for p in pieces:
            if req.feed(p):
                return "done"
    except http.HttpError as exc:
        return exc.status
    return "incomplete"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6), st.integers(0, len(UPGRADE)))
def test_http_heads_from_mutated_upgrades(noise, cuts, at):
    data = UPGRADE[:at] + noise + UPGRADE[at:]
    check_http(cut(data, cuts))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"GET ", b"/ws", b" HTTP/1.1\r\n", b"Host: a\r\n", b"Upgrade: websocket\r\n",
                                 b"Connection: Upgrade\r\n", b"Sec-WebSocket-Version: 13\r\n",
                                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"\r\n", b"\n", b"\x00",
                                 b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"abc",
                                 b"x" * 5000]), max_size=14),
       st.lists(st.integers(0, 20000), max_size=5))
def test_http_heads_from_header_soup(parts, cuts):
    data = b"".join(parts)
    check_http(cut(data, cuts))


# ---- WebSocket frames: compiled and twin on the same bytes ---------------------------------------------------

@pytest.fixture(scope="module")
def parity():
    p = FrameParity([fanout_impls.load(name) for name in ("compiled", "reference")])
    yield p
    p.close()


frames = st.tuples(
    st.integers(0, 15),            # opcode (unknown ones included)
    st.booleans(),                 # fin
    st.integers(0, 7),             # rsv bits
    st.booleans(),                 # masked
    st.binary(max_size=140),       # payload (over 125: control-frame limit)
)


def encode(op: int, fin: bool, rsv: int, masked: bool, payload: bytes) -> bytes:
    frame = client_frame(op, payload, mask=masked, fin=fin)
    return bytes([frame[0] | rsv << 4]) + frame[1:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 2000), max_size=6),
       st.sampled_from([0, 1, 10, 125, 126, 1 << 20]), st.binary(max_size=20), st.integers(0, 3), st.integers(0, 3))
def test_frame_parser_parity_on_hostile_frames(parity, frame_list, cuts, max_message, tail, max_fragments, max_pongs):
    data = b"".join(encode(*f) for f in frame_list) + tail
    parity.check(cut(data, cuts), max_message, max_fragments, max_pongs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_frame_parser_parity_on_random_bytes(parity, data, cuts):
    parity.check(cut(data, cuts), 1 << 20)


def test_close_frames_parity(parity):
    for code in (0, 999, 1000, 1004, 1005, 1006, 1015, 1016, 2999, 3000, 4999, 5000, 65535):
        for reason in (b"", b"ok", b"\xff", "é".encode()[:1]):
            payload = code.to_bytes(2, "big") + reason
            outcome = parity.check([client_frame(0x8, payload)], 100)
            assert outcome in ("close", "fail"), (code, reason)
