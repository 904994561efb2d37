"""protocol.py: JSON in, requests and errors out; no event loop."""

from __future__ import annotations

import json

import orjson
import pytest

from gateway import protocol
from gateway.engines.base import Record
from gateway.protocol import ProtocolError


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
    rec = Record("/a/b", "1-0".encode(), "ep", 7, 6, 1700000000000)
    assert orjson.loads(protocol.msg(rec)) == {"op": "msg", "subject": "/a/b", "content": "1-0", "epoch": "ep",
                                               "seq": 7, "prev": 6, "ts": 1700000000000}
    rec = Record("/a/b", b"\xff", "ep", 1, None, 5)
    m = orjson.loads(protocol.msg(rec, snapshot=True))
    assert m["content_b64"] == "/w==" and "prev" not in m and m["snapshot"] is True
