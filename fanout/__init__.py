"""fanout: the gateway's hot path (frame encoding, recovery ring, write pipeline).

Compiled Cython modules by default. ``FANOUT_NO_EXTENSIONS=1`` selects the
pure-Python twins in ``fanout._reference`` instead (for tests and debugging; a
failed compile fails the install, there is no silent fallback).
"""
import os as _os
from typing import TYPE_CHECKING

from ._enums import CloseCode, WSState

COMPILED: bool

# Type checkers always see the compiled API (its .pyi stubs); the twin matches it.
if TYPE_CHECKING or _os.environ.get("FANOUT_NO_EXTENSIONS") != "1":
    from ._frame import (
        OP_BINARY,
        OP_CLOSE,
        OP_CONT,
        OP_PING,
        OP_PONG,
        OP_TEXT,
        encode_close,
        encode_frame,
        encode_text,
    )
    from ._msgs import publish_run
    from ._ring import Ring
    from ._writer import Channel, Conn, Writer
    from ._ws import WSConn

    COMPILED = True
else:
    from ._reference import (
        OP_BINARY,
        OP_CLOSE,
        OP_CONT,
        OP_PING,
        OP_PONG,
        OP_TEXT,
        Channel,
        Conn,
        Ring,
        Writer,
        WSConn,
        encode_close,
        encode_frame,
        encode_text,
        publish_run,
    )

    COMPILED = False

__all__ = [
    "COMPILED",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Channel",
    "CloseCode",
    "Conn",
    "Ring",
    "WSConn",
    "WSState",
    "Writer",
    "encode_close",
    "encode_frame",
    "encode_text",
    "publish_run",
]
