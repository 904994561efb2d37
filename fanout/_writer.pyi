import asyncio
from collections.abc import Callable
from typing import Self

from typing_extensions import disjoint_base

__all__ = ["Writer", "Conn", "Channel"]

#: seconds over which the writer's busy share is measured (coalesce_busy, _writer.pxd "Coalescing")
BUSY_PERIOD: float
#: while holding, every PROBE_EVERY-th period is followed by one without holds that measures the share
PROBE_EVERY: int
#: consecutive periods at or over coalesce_busy (without holds) that start the holds
OPEN_AFTER: int

# cdef classes: one C layout each (PEP 800); Writer is constructed by __cinit__ (hence __new__)

@disjoint_base
class Writer:
    """Writes the queues of every Conn that became dirty in one loop iteration (the pipeline: _writer.pxd)."""

    #: seconds a flush waits after a flush that wrote to >= coalesce_min_conns conns (0 = off; _writer.pxd "Coalescing")
    coalesce_window: float
    #: conns a flush must write to before the next one is held for coalesce_window
    coalesce_min_conns: int
    #: hold only while the loop thread's CPU time is >= this share of the wall time (0 = after every big flush)
    coalesce_busy: float
    def __new__(
        cls,
        loop: asyncio.AbstractEventLoop,
        coalesce_window: float = 0.0,
        coalesce_min_conns: int = 1000,
        coalesce_busy: float = 0.0,
        clock: Callable[[], float] | None = None,
        cpu_clock: Callable[[], float] | None = None,
    ) -> Self:
        """``Writer(loop)``: a writer whose flushes run on ``loop`` (scheduled with call_soon, once per iteration).

        Args:
            loop: the event loop (time, call_soon, call_at).
            coalesce_window: after a flush that wrote to at least ``coalesce_min_conns`` conns, the next
                flush scheduled within this many seconds runs at that deadline (call_at), not at the
                next iteration; 0 turns it off.
            coalesce_min_conns: what makes a flush big enough to hold the next one.
            coalesce_busy: hold only while the loop's thread is busy: it starts holding once its CPU time
                took at least this share of OPEN_AFTER BUSY_PERIODs in a row, and stops when a held
                period's share, scaled by the frames per write the holds gathered, or a probe period without
                holds measures less (0: hold after every big flush; _writer.pxd "Coalescing").
            clock: seconds, monotonic (default CLOCK_MONOTONIC; tests fake it).
            cpu_clock: seconds of CPU time of the loop's thread (default CLOCK_THREAD_CPUTIME_ID; tests
                fake it).
        Raises:
            MemoryError: the iovec array could not be allocated.
        """
    def flush(self) -> None:
        """Write the queues of all dirty conns now (normally run by call_soon, or call_at when held).

        Never raises for one conn's write error: that conn is closed (its transport aborted) and the
        loop's exception handler is told about unexpected errors; the other conns are still written.
        """
    def idle(self, now: float, send_idle: float, recv_idle: float) -> tuple[list[Conn], list[Conn]]:
        """The registered conns that have been quiet, for the liveness sweep.

        Args:
            now: the loop's time().
            send_idle: seconds without output that make a conn quiet.
            recv_idle: seconds without input (``last_recv``) that make a conn unheard.
        Returns:
            (conns silent for >= send_idle, conns unheard for >= recv_idle).
        """
    def __len__(self) -> int:
        """Conns registered (open)."""
    @property
    def frames_out(self) -> int:
        """Frames written so far (to the fd or handed to a transport)."""
    @property
    def bytes_out(self) -> int:
        """Bytes written so far."""
    @property
    def syscalls(self) -> int:
        """send/sendmsg calls made so far."""
    @property
    def overflows(self) -> int:
        """Conns closed because their output went over max_pending."""
    @property
    def write_errors(self) -> int:
        """Conns closed because a write failed hard (EPIPE, ECONNRESET, ...)."""
    @property
    def held_flushes(self) -> int:
        """Flushes scheduled for a coalescing deadline (call_at) instead of the next iteration."""
    @property
    def busy_share(self) -> float:
        """The loop thread's CPU time over the wall time of the last complete busy period (measured at the end
        of flushes, only while coalesce_window and coalesce_busy are both > 0; 0.0 before that)."""
    @property
    def probes(self) -> int:
        """Periods run without holds while busy, to measure busy_share unhelped by the window."""
    #: pings not answered because the connection already owed max_pongs pongs (fanout.WSConn)
    pongs_dropped: int
    #: messages refused for spanning more than max_fragments frames (fanout.WSConn)
    fragment_limit_hits: int

@disjoint_base
class Conn:
    """One connection's outbound queue of whole frames, registered with a Writer while open.

    The protocol that owns the transport forwards pause_writing(), resume_writing() and (first
    thing) connection_lost() to it; fanout.WSConn and gateway's Session are such protocols.
    """

    #: the loop time of the last write of a data frame to this conn (control frames, i.e. pings,
    #: pongs and close, do not count: the heartbeats are due after heartbeat_ms without a message)
    last_send: float
    #: the loop time of the last bytes received (set by fanout.WSConn, or by the owner)
    last_recv: float
    def __init__(
        self,
        writer: Writer,
        transport: asyncio.Transport,
        max_pending: int,
        on_overflow: Callable[[Conn], object],
    ) -> None:
        """Register a new open conn with ``writer``; sets the transport's write buffer limits.

        Args:
            writer: the writer that flushes this conn.
            transport: the connection's transport; its socket is written directly when it has one
                (not TLS), else everything goes through transport.write().
            max_pending: bytes of queue plus transport buffer allowed; more overflows the conn.
            on_overflow: called with the conn (from call_soon, never inside send/publish) after an
                overflow closed it.
        Raises:
            ValueError: ``max_pending`` < 0.
            TypeError: ``writer`` is None or not a Writer, or ``max_pending`` is not an integer.
        """
    def send(self, frame: bytes) -> bool:
        """Queue one whole encoded frame (kept by reference, written at the next flush).

        Args:
            frame: a complete frame (fanout.encode_*); an empty one is accepted and ignored.
        Returns:
            True when queued; False when the conn is closed or this frame overflowed it (then it
            is closed and on_overflow follows).
        Raises:
            TypeError: ``frame`` is not bytes.
        """
    def pause_writing(self) -> None:
        """Forward from the protocol: the transport buffers, so stop writing to the fd."""
    def resume_writing(self) -> None:
        """Forward from the protocol: the transport drained; the queue is written at the next flush."""
    def close(self) -> None:
        """Drop the queue and leave every channel and the writer; idempotent.

        Writes nothing and leaves the transport open: the owner closes it (after any close frame).
        """
    def connection_lost(self, exc: Exception | None) -> None:
        """Forward from the protocol, FIRST thing: the transport closes the fd right after. Same as
        close(); an override in a subclass calls this (or close()) before anything else.

        Args:
            exc: the transport's reason (ignored).
        """
    @property
    def closed(self) -> bool:
        """True once closed (close(), connection_lost(), an overflow or a hard write error)."""
    @property
    def paused(self) -> bool:
        """True while the transport holds unwritten bytes (between pause_writing and resume_writing)."""
    @property
    def pending_bytes(self) -> int:
        """Bytes of our queue plus the transport's buffer."""
    @property
    def queued_bytes(self) -> int:
        """Bytes of our queue only (what an overflow releases)."""
    @property
    def max_pending(self) -> int:
        """The limit of pending_bytes."""
    @property
    def fd(self) -> int:
        """The fd written directly, or -1 when everything goes through the transport."""
    @property
    def transport(self) -> asyncio.Transport:
        """The transport given at registration."""
    @property
    def writer(self) -> Writer:
        """The writer the conn is registered with."""

@disjoint_base
class Channel:
    """The subscribers of one subject: publish() queues one frame on each of them."""

    def __init__(self) -> None:
        """``Channel()``: an empty channel."""
    def add(self, conn: Conn) -> bool:
        """Subscribe ``conn``.

        Returns:
            True when added; False when it is already here or closed.
        Raises:
            TypeError: ``conn`` is None or not a Conn.
        """
    def remove(self, conn: Conn) -> bool:
        """Unsubscribe ``conn`` (order of the others may change).

        Returns:
            True when removed; False when it was not here.
        Raises:
            TypeError: ``conn`` is None or not a Conn.
        """
    def publish(self, frame: bytes) -> int:
        """Queue ``frame`` (the same object) on every subscriber.

        Args:
            frame: a complete encoded frame.
        Returns:
            How many subscribers took it (a subscriber it overflows is closed and removed instead).
        Raises:
            TypeError: ``frame`` is None or not bytes.
        """
    def conns(self) -> list[Conn]:
        """The subscribers, as a new list."""
    def __len__(self) -> int:
        """Subscribers."""
    def __contains__(self, conn: object, /) -> bool:
        """True when ``conn`` is a subscribed Conn."""
