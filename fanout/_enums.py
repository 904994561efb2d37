"""The WebSocket layer's named states and close codes, shared by the compiled WSConn and its twin.

The compiled module keeps the same values as C enums in _ws.pxd (for the parser's C code); the
parity tests run one suite against both, so a value changed on one side only fails there.
"""
from __future__ import annotations

import enum

__all__ = ["CloseCode", "WSState"]


class WSState(enum.IntEnum):
    """Where a WSConn is (``WSConn.ws_state``)."""

    HTTP = 0  #: before ws_open(): input goes to http_received()
    OPEN = 1  #: frames are parsed
    DONE = 2  #: the peer's close came, a protocol error, or ws_stop_input(): input is ignored


class CloseCode(enum.IntEnum):
    """The close codes WSConn passes to ws_close() and ws_fail() (RFC 6455 7.4.1)."""

    PROTOCOL_ERROR = 1002   #: the peer broke RFC 6455 (ws_fail)
    NO_STATUS = 1005        #: the peer's close frame had no code (ws_close; never sent on the wire)
    INVALID_DATA = 1007     #: a close reason that is not UTF-8 (ws_fail)
    MESSAGE_TOO_BIG = 1009  #: a message over max_message, or in more than max_fragments frames (ws_fail)
