"""atheris harness: the protocol decoder (gateway/protocol.py) and subjects/patterns (gateway/subjects.py).

Input: the bytes of one client text frame. Oracle: support.fuzz_targets.check_decode (a valid request
or ProtocolError with a code from the protocol's list, error frames that are valid JSON, ids echoed
unchanged); when the bytes are a subject-like string, check_subject (the grammar of PROTOCOL.md) and
check_pattern (the first line as a pattern, the rest as a subject).
"""

from __future__ import annotations

import base64
import json

import _harness  # noqa: F401  - instrumented imports first

from support.fuzz_targets import check_decode, check_pattern, check_subject


def test_one_input(data: bytes) -> None:
    check_decode(data)
    if data[:1] == b"/":
        text = data.decode("utf-8", "surrogatepass") if _utf8ish(data) else None
        if text is not None:
            pattern, _, subject = text.partition("\n")
            check_subject(pattern)
            if subject:
                check_pattern(pattern, subject)


def _utf8ish(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def seeds() -> list[bytes]:
    """The examples of PROTOCOL.md, and a few neighbours of each."""
    objs = [
        {"op": "connect", "token": "eyJhbGciOiJIUzI1NiJ9.e30.x", "client": "name/1.0"},
        {"op": "connect"},
        {"op": "subscribe", "subjects": [{"subject": "/matches/football/5"},
                                         {"subject": "/matches/football/6", "epoch": "e1", "seq": 42}]},
        {"op": "subscribe", "subjects": [{"subject": "/a", "epoch": "e", "seq": 0}, {"subject": "/a", "seq": 1}]},
        {"op": "unsubscribe", "subjects": ["/matches/football/5"]},
        {"op": "publish", "subject": "/matches/football/5", "content": "score_home", "id": "c-1"},
        {"op": "publish", "subject": "/t", "content_b64": base64.b64encode(b"\xff\x00").decode(),
         "id": 9007199254740992},
        {"op": "publish", "subject": "/t/k", "content": "x", "content_b64": "eA=="},
        {"op": "ping", "id": 1},
        {"op": "refresh", "token": "eyJ.x.y"},
        {"op": "hb"},
    ]
    out = [json.dumps(o).encode() for o in objs]
    out += [b'{"op":"publish","subject":"/a","content":"\\ud800"}', b'{"op":"ping","id":1e400}',
            b'{"op":"ping","id":18446744073709551617}', b'{"op":"ping","op":"publish"}', b"[" * 1100,
            b"/matches/*/>\n/matches/football/5", b"/a/>\n/a", b"/" + b"/".join([b"s"] * 33)]
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, seeds)
