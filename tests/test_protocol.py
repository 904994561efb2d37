"""protocol.py: JSON in, requests and errors out; no event loop."""

from __future__ import annotations

import json

import orjson
import pytest

from gateway import protocol
from gateway.protocol import ProtocolError
from gateway.records import Record


def dec(obj):
    return protocol.decode(json.dumps(obj).encode())


def test_connect_and_unknown_fields():
    r = dec({"op": "connect", "token": "t", "client": "c", "future": 1})
    assert isinstance(r, protocol.Connect) and (r.token, r.client) == ("t", "c")


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"op": 1}', b"nul", b'{"op":"connect"'])
def test_bad_frames(raw):
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(raw)
    assert exc.value.code == "bad_request"


def test_unknown_op_echoes_id():
    with pytest.raises(ProtocolError) as exc:
        dec({"op": "nope", "id": 3})
    assert exc.value.code == "bad_request" and exc.value.id == 3
    assert orjson.loads(exc.value.payload())["id"] == 3


def test_subscribe_entries():
    r = dec({"op": "subscribe", "subjects": [{"subject": "/a/b"}, {"subject": "/a/c", "epoch": "e", "seq": 5},
                                              {"subject": "/a/d", "seq": True, "epoch": "e"}]})
    assert r.entries[0].position is None and r.entries[1].position == ("e", 5)
    assert isinstance(r.entries[2], ProtocolError) and r.entries[2].subject == "/a/d"


def test_publish_forms():
    r = dec({"op": "publish", "subject": "/a/b", "content": "héllo", "id": "x"})
    assert r.content == "héllo".encode() and r.has_id and r.id == "x"
    r = dec({"op": "publish", "subject": "/a/b", "content_b64": "AP8="})
    assert r.content == b"\x00\xff" and not r.has_id
    for bad_id in (True, None, [1], {"a": 1}):
        with pytest.raises(ProtocolError):
            dec({"op": "publish", "subject": "/a/b", "content": "x", "id": bad_id})


def test_msg_encoding():
    rec = Record("/a/b", b"1-0", "ep", 7, 6, 1700000000000)
    assert orjson.loads(protocol.msg(rec)) == {"op": "msg", "subject": "/a/b", "content": "1-0", "epoch": "ep",
                                               "seq": 7, "prev": 6, "ts": 1700000000000}
    rec = Record("/a/b", b"\xff", "ep", 1, None, 5)
    m = orjson.loads(protocol.msg(rec, snapshot=True))
    assert m["content_b64"] == "/w==" and "prev" not in m and m["snapshot"] is True


# ---- 1.1: the id rule, `request` on errors, refresh --------------------------------------------------

@pytest.mark.parametrize("raw_id", [
    b'"x"', b'""', b'"' + b"a" * 256 + b'"', b"0", b"-7", b"9007199254740992", b"-9007199254740992",
])
def test_ids_within_the_rule_are_kept_exactly(raw_id):
    r = protocol.decode(b'{"op":"publish","subject":"/a/b","content":"c","id":' + raw_id + b"}")
    assert orjson.dumps(r.id) == raw_id  # echoed unchanged
    assert orjson.loads(protocol.ack(r.id, "/a/b", "e", 1))["id"] == orjson.loads(raw_id)


_BAD_IDS = [
    b"1.5", b"3.0", b"1e3", b"true", b"false", b"null", b"{}", b"[1]",
    b"9007199254740993", b"-9007199254740993", b"18446744073709551616", b"1" + b"0" * 30,
    b'"' + b"a" * 257 + b'"', b'"' + "\u00e9".encode() * 129 + b'"',  # 258 bytes, 129 characters
]


# a ping's id is optional: null there is "no id" (the pong echoes null)
@pytest.mark.parametrize("op,raw_id", [("publish", i) for i in _BAD_IDS] +
                         [("ping", i) for i in _BAD_IDS if i != b"null"])
def test_ids_outside_the_rule_are_bad_request(raw_id, op):
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(b'{"op":"' + op.encode() + b'","subject":"/a/b","content":"c","id":' + raw_id + b"}")
    assert exc.value.code == "bad_request" and not exc.value.has_id
    frame = orjson.loads(exc.value.payload())
    assert "id" not in frame and frame["request"] == op


def test_numbers_too_large_to_parse_are_bad_request():
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(b'{"op":"publish","subject":"/a/b","content":"c","id":1' + b"0" * 400 + b"}")
    assert exc.value.code == "bad_request" and not exc.value.has_id


def test_decode_errors_name_the_request():
    for frame, request in [
        ({"op": "publish", "subject": 5, "content": "x", "id": 1}, "publish"),
        ({"op": "publish", "subject": "/a/b", "id": 1}, "publish"),
        ({"op": "subscribe", "subjects": "nope"}, "subscribe"),
        ({"op": "unsubscribe", "subjects": 3}, "unsubscribe"),
        ({"op": "connect", "token": 3}, "connect"),
        ({"op": "refresh", "token": 3}, "refresh"),
        ({"op": "ping", "id": 1.5}, "ping"),
    ]:
        with pytest.raises(ProtocolError) as exc:
            dec(frame)
        assert orjson.loads(exc.value.payload())["request"] == request, frame
    # errors judged per entry carry it too
    r = dec({"op": "subscribe", "subjects": [{"subject": "bad"}, {"subject": "/a", "seq": 1}]})
    assert [orjson.loads(e.payload())["request"] for e in r.entries] == ["subscribe", "subscribe"]
    r = dec({"op": "unsubscribe", "subjects": ["bad"]})
    assert orjson.loads(r.entries[0].payload())["request"] == "unsubscribe"
    # no op at all: no `request`; an unknown op is a request too, echoed as sent (1.1: present whenever
    # the error answers a request)
    for raw in (b"nul", b'{"op":1}'):
        with pytest.raises(ProtocolError) as exc:
            protocol.decode(raw)
        assert "request" not in orjson.loads(exc.value.payload())
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(b'{"op":"nope","id":3}')
    assert orjson.loads(exc.value.payload()) == {"op": "error", "code": "bad_request", "id": 3,
                                                  "request": "nope", "message": "unknown op 'nope'"}


def test_refresh_decodes_and_refreshed_encodes():
    r = dec({"op": "refresh", "token": "t"})
    assert isinstance(r, protocol.Refresh) and r.token == "t"
    assert dec({"op": "refresh"}).token is None
    assert orjson.loads(protocol.refreshed(1_800_000_000.0)) == {"op": "refreshed", "exp": 1_800_000_000}
    assert orjson.loads(protocol.refreshed(None)) == {"op": "refreshed"}
    # integral but beyond what a JSON number holds exactly (2^53): the float, never an encoding error
    for exp in (1e20, 2.0**64, 2.0**53 + 2):
        assert orjson.loads(protocol.refreshed(exp)) == {"op": "refreshed", "exp": exp}
    assert orjson.loads(protocol.refreshed(2.0**53)) == {"op": "refreshed", "exp": 2**53}
