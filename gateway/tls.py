"""wss:// and https://: TLS put on each accepted TCP connection by the gateway, not by create_server.

Why not `create_server(ssl=...)`: asyncio and uvloop then tell a connection's protocol about it only once
its TLS handshake is done, and never about one whose handshake fails. The connection limits
(gateway/limits.py) would not see such a connection at all, so clients that open TCP connections and
never finish a handshake would hold file descriptors outside --max-connections and
--max-connections-per-address. Accepted plain, a TLS connection is a Session from its accept on, counted
and timed like a plain one (the sweep's handshake timeout covers TLS handshake and HTTP request together).

Why not `loop.start_tls`: it is a coroutine, and uvloop reads the new socket before a task could run
it, so the ClientHello would reach the HTTP parser. The TLS layer is the loop's own SSLProtocol (the
class its create_server uses), put on the transport within connection_made, before anything is read.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session, SessionHost


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol the loop's create_server(ssl=...) would use: uvloop has its own."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # (not in its stubs)
    return sslproto.SSLProtocol


class _Handshaking(asyncio.Protocol):
    """The TLS layer's application protocol until the handshake is done; then it hands the TLS
    transport to the session and steps aside (transport.set_protocol), before any application data."""

    __slots__ = ("session", "done")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.done = True
        self.session.transport = transport  # type: ignore[assignment]
        transport.set_protocol(self.session)  # type: ignore[arg-type]  # an asyncio protocol by duck typing


def start(host: SessionHost, session: Session, context: ssl.SSLContext) -> None:
    """Begin the server side of a TLS handshake on the session's just accepted plain transport (call it
    from the session's connection_made). A failed handshake closes the connection and the session gets
    its connection_lost, as a plain connection would. No timeout of its own: the sweep closes a session
    still in its HTTP request (TLS handshake included) after --handshake-timeout-ms, counted as such."""
    raw = session.transport
    assert raw is not None
    waiter = host.loop.create_future()
    app = _Handshaking(session)
    layer = _ssl_protocol_class(host.loop)(host.loop, app, context, waiter, server_side=True)
    raw.set_protocol(layer)
    layer.connection_made(raw)
    waiter.add_done_callback(lambda ended: _handshake_ended(app, ended))


def _handshake_ended(app: _Handshaking, ended: asyncio.Future[Any]) -> None:
    exc = ended.exception()  # (retrieved either way: a failed handshake is no error of the gateway)
    if not app.done:
        # Failed, timed out, or closed by the gateway (the sweep, a stop) before it was done: the TLS
        # layer tells no application protocol of a connection lost in its handshake, so the session
        # hears of it here.
        app.session.connection_lost(exc)
