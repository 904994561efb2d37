import asyncio
from collections.abc import Callable

from typing_extensions import disjoint_base

from ._enums import CloseCode as CloseCode
from ._enums import WSState as WSState
from ._writer import Conn, Writer

__all__ = ["WSConn", "CloseCode", "WSState"]

@disjoint_base
class WSConn(Conn):
    """The server side of one WebSocket connection: an asyncio protocol whose client frames are
    parsed here and whose output is the Conn's queue (rules: _ws.pxd). Subclass it and implement
    the hooks: http_received() before ws_open(), then ws_message(), ws_close() and ws_fail().
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        """``WSConn()``: a connection in state WSState.HTTP; a subclass's __init__ takes what it wants."""
    def ws_open(
        self,
        writer: Writer,
        transport: asyncio.Transport,
        max_pending: int,
        max_message: int,
        on_overflow: Callable[[Conn], object],
        rest: bytes = ...,
        max_fragments: int = ...,
        max_pongs: int = ...,
    ) -> None:
        """The upgrade is done: register the output queue (as Conn() does), then parse ``rest``.

        Args:
            writer, transport, max_pending, on_overflow: as for Conn().
            max_message: largest message in bytes (a frame or reassembled message over it fails 1009).
            rest: bytes the client sent after its HTTP request, parsed as frames now.
            max_fragments: frames one message may span, 1..65535 (default 1024; more fails 1009).
            max_pongs: pongs owed at once, 1..65535 (default 16; pings beyond are not answered).
        Raises:
            ValueError: ``max_message`` < 0, ``max_pending`` < 0, or a cap outside 1..65535.
            RuntimeError: called twice.
        """
    def data_received(self, data: bytes) -> None:
        """Bytes from the transport: to http_received() before ws_open(), then parsed as frames
        (held unparsed while input is paused, ignored once the state is DONE)."""
    def eof_received(self) -> None:
        """The peer half-closed: returns None, so the transport closes and connection_lost follows."""
    def ws_stop_input(self) -> None:
        """Ignore all further input (we are closing): the state becomes WSState.DONE."""
    def ws_pause_input(self) -> None:
        """Stop reading and parsing after the current message; idempotent, a no-op unless OPEN.

        Bytes already read are held (not copied) until ws_resume_input() parses them in order.
        """
    def ws_resume_input(self) -> None:
        """Parse what was held, then read again (unless a hook paused again meanwhile); idempotent."""
    @property
    def ws_input_paused(self) -> bool:
        """True between ws_pause_input() and ws_resume_input()."""
    @property
    def ws_state(self) -> WSState:
        """HTTP before ws_open(), OPEN while frames are read, DONE once input is ignored."""
    @property
    def max_message(self) -> int:
        """The largest message accepted, in bytes (0 before ws_open())."""
    # hooks for the subclass
    def http_received(self, data: bytes) -> None:
        """Hook: bytes before ws_open() (the HTTP request). Raises NotImplementedError unless overridden."""
    def ws_message(self, opcode: int, payload: bytes) -> None:
        """Hook: one whole message.

        Args:
            opcode: OP_TEXT or OP_BINARY (text is not checked for UTF-8 here).
            payload: the unmasked, reassembled message.
        """
    def ws_close(self, code: int, reason: str) -> None:
        """Hook: the peer's close frame arrived; input is ignored from now on.

        Args:
            code: the peer's code, or CloseCode.NO_STATUS (1005) when its frame had none.
            reason: the peer's reason (valid UTF-8).
        """
    def ws_fail(self, code: int, reason: str) -> None:
        """Hook: the peer broke the protocol, called once; input is ignored from now on.

        Args:
            code: CloseCode.PROTOCOL_ERROR, INVALID_DATA or MESSAGE_TOO_BIG, to close with.
            reason: what was wrong, for the close frame.
        """
