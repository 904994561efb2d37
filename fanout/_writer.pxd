# The write pipeline: one encoded frame -> many sockets.
#
# Channel.publish() appends the *same* bytes object to the queue of every
# subscriber (Conn._queue: whole frames): no copy, no syscall, no
# Python-level call per subscriber. The first Conn that becomes dirty in an
# event-loop iteration schedules ONE loop.call_soon(Writer.flush); every
# later publish of that iteration only appends. flush() then writes each dirty
# conn's whole queue with sendmsg(2) over an iovec array (IOV_MAX entries per
# call, MSG_DONTWAIT | MSG_NOSIGNAL), so a conn owed N frames costs one
# syscall, not N; a conn owed one frame gets one send(2).
#
# Why the byte order on the wire can never break: we write to the fd
# ourselves only while the transport's own buffer is empty and the protocol is
# not paused. When the kernel takes part of the data (or nothing: EAGAIN), the
# unsent tail of the ONE frame being written (or the next whole frame) is
# handed to transport.write(), and every later whole frame stays in our queue.
# Conn() sets the transport's write limits to high=0/low=0 (high=1 for TLS,
# whose transports pause at size >= high), so that handover makes the
# transport call pause_writing() at once and resume_writing() only once its
# buffer is empty again; the gateway's protocol forwards both to the
# Conn, and resume schedules the next flush. Hence:
#   * the transport never holds more than the tail of one of our frames plus
#     what the gateway wrote there itself, and its buffer always ends on a
#     frame boundary: the gateway may transport.write() any complete frame
#     (a ping, or the close frame after an overflow) at any time;
#   * a stalled reader costs one Python-level transport.write() and then
#     nothing until it drains; flush never blocks and never retries EAGAIN.
# TLS transports (and any without a socket) have fd == -1: flush hands the
# whole queue to transport.write() as one joined bytes, once per iteration.
#
# Memory is bounded per conn: when our queue plus the transport's buffer
# exceeds max_pending, the conn "overflows": queue dropped at once, closed,
# removed from its channels and the writer, and on_overflow(conn) is called
# from loop.call_soon, never re-entrantly inside publish().
#
# Closing, and why flush needs no transport call per conn: flush writes to
# the fd only while the conn is open and not paused, and asks the transport
# nothing on that path (no is_closing(), no get_write_buffer_size()):
#   * "not paused" already means "the transport's buffer is empty": with
#     high=0/low=0 every transport pauses the protocol (synchronously, inside
#     write()) as soon as anything stays in its buffer, and resumes it only
#     once the buffer is empty; the protocol forwards both (above), and
#     _init() reads the size once for a transport that already buffers (its
#     pause came before the conn existed).
#   * The fd cannot have been closed (and so reused by another connection):
#     uvloop and asyncio close a connection's fd only in the transport's
#     _call_connection_lost callback, in a `finally` right after
#     protocol.connection_lost() returned or raised (uvloop
#     handles/basetransport.pyx, asyncio selector_events.py); close(), abort()
#     and fatal errors only schedule that callback, and the conn's reference to
#     the transport rules out the close on garbage collection. So the protocol's
#     connection_lost() must call conn.close() first, before anything that can
#     raise, which the gateway's does; a protocol that is itself a Conn subclass
#     inherits Conn.connection_lost (an override calls self.close() first).
#     Until then the fd is still this connection's, also after
#     transport.close(): frames queued before connection_lost still reach the
#     right client.
#   * So whoever writes a close frame into the transport closes the conn first
#     (as the gateway does), or queued frames could follow the close frame.
#
# Coalescing (optional, Writer.coalesce_window > 0): a flush that wrote to at
# least coalesce_min_conns conns sets a deadline coalesce_window after its end;
# the next flush scheduled before that deadline runs AT the deadline (call_at)
# instead of at the next loop iteration. Messages published in between pile up
# in the queues and leave with one sendmsg(2) per conn instead of one send(2)
# per message: fewer syscalls per delivery at high rates, at the price of up to
# one window of extra latency. Small fan-outs (under coalesce_min_conns) and
# quiet channels are never held: the deadline only follows a big flush. The
# order on the wire is unchanged (the same queues, written later). uvloop's
# timers have 1 ms resolution: call_at rounds the wait to whole milliseconds
# (under 0.5 ms it is the next iteration, as without coalescing).
# With coalesce_busy > 0 (the gateway's default, 0.85) a big flush holds the
# next one only while the loop's thread is busy. The writer measures, at the
# end of its flushes, the thread's CPU time (CLOCK_THREAD_CPUTIME_ID) against
# the wall time (CLOCK_MONOTONIC; the loop's time is cached per iteration)
# over periods of at least BUSY_PERIOD (0.5 s): busy_share. OPEN_AFTER (2)
# periods in a row at or over coalesce_busy start the holds: the loop is near
# the end of its CPU, and queues would build anyway (one period can be a
# burst: at 55 msgs/s to 5,000 conns, the loop at 72 % of a CPU on average,
# single periods opened the gate). Holding lowers the share it is measured by (fewer
# syscalls), so a held period cannot tell whether the load still needs the
# window. Two things end the holds:
#   * a held period whose share, scaled up by how many more frames per write
#     the window gathered (frames per write held / frames per write of the
#     last period without holds), is still under coalesce_busy: even if each
#     write saved had cost a whole held write, the load would be under the
#     threshold unheld (a busy spell has ended, or a burst opened the gate);
#   * a probe: after every PROBE_EVERY (6) held periods that do not end the
#     holds, one period runs without holds, and a probe under coalesce_busy
#     ends them (the estimate above is an upper bound: frames cost too).
# So at most 3.5 s of holds follow the end of a busy spell (one period when
# holding did not gather frames), and at the knee one period in seven runs
# unheld.
#
# Idle conns own no Python objects besides themselves: _queue is None until
# a frame is queued, the frame itself while it is the only one (written with
# one send(2)), a list only from the second frame on. The channels a conn is
# in (each with the conn's index in that channel's list, for O(1)
# swap-remove) are one (_ch, _chidx) pair held in fields while there are at
# most one; from two on, a tuple of the channels (_chans) and a C array of
# the indices in the same order (_chidxs). Three channels so cost 64 + 16
# bytes where a dict {Channel: index} cost about 280 (its table and an int
# object per index). Finding a channel in the tuple is a scan of pointers:
# a few ns per channel, and --max-subscriptions bounds the length.
#
# Queues and the cyclic GC: a queue's list (created by _enqueue at a conn's
# second pending frame) is untracked by the garbage collector, as CPython
# untracks tuples and dicts of atomic values itself: it holds only bytes, so it
# cannot be part of a cycle and the collector has nothing to find in it. Tracked,
# those lists (one per subscriber whenever two messages for it arrive between
# two flushes: coalescing, bursts, a loaded CPU) survive the young collections
# that their own allocation triggers, so every flush promoted thousands of them
# to the old generation, and CPython runs a full collection once the promoted
# objects exceed a quarter of the old generation: at 19,000 connections a walk
# of ~180,000 objects (~0.1 s) every few flushes, collecting nothing.

from posix.uio cimport iovec


cdef class Writer:
    cdef object _loop
    cdef object _flush_cb         # bound self.flush, made once: call_soon needs no new object
    cdef object _on_overflow      # the last bound method a Conn got as on_overflow (shared, see Conn._init)
    cdef list _conns              # live conns; each knows its index (_widx) for O(1) removal
    cdef list _dirty              # conns with data to write this iteration
    cdef bint _scheduled
    # Adaptive coalescing (see "Coalescing" above): off while coalesce_window == 0.
    cdef public double coalesce_window      # seconds to hold the next flush after a big one
    cdef public Py_ssize_t coalesce_min_conns  # a flush that wrote to this many conns is "big"
    cdef double _hold_until       # loop time before which a new flush waits (after a big flush)
    cdef public double coalesce_busy  # hold only while the loop thread's CPU share is >= this (0: always)
    cdef object _clock            # None: CLOCK_MONOTONIC (seconds); tests give a fake
    cdef object _cpu_clock        # None: CLOCK_THREAD_CPUTIME_ID (seconds); tests give a fake
    cdef double _busy_t0          # start of the current busy period (clock seconds)
    cdef double _busy_cpu0        # the thread's CPU time (cpu_clock seconds) at _busy_t0
    cdef readonly double busy_share  # the loop thread's CPU time / wall time over the last complete period
    cdef bint _busy               # holding: set by OPEN_AFTER busy periods, cleared as "Coalescing" says
    cdef bint _probing            # this period runs without holds, to measure the unheld share
    cdef int _held_periods        # periods held since the gate opened or since the last probe
    cdef int _busy_periods        # consecutive periods at >= coalesce_busy while not holding
    cdef unsigned long long _period_frames0  # frames_out at _busy_t0
    cdef unsigned long long _period_writes0  # syscalls at _busy_t0
    cdef double _unheld_per_write  # frames per write of the last period without holds (>= 1)
    cdef readonly unsigned long long probes  # probe periods run (busy_share measured without holds)
    cdef readonly unsigned long long held_flushes  # flushes scheduled for _hold_until, not call_soon
    cdef iovec* _iov
    cdef Py_ssize_t _iov_max
    cdef readonly unsigned long long frames_out
    cdef readonly unsigned long long bytes_out
    cdef readonly unsigned long long syscalls
    cdef readonly unsigned long long overflows
    cdef readonly unsigned long long write_errors
    # Input limits of WSConn (_ws.pxd), counted here: the Writer is fanout's one object per gateway.
    cdef public unsigned long long pongs_dropped
    cdef public unsigned long long fragment_limit_hits

    cdef int _mark_dirty(self, Conn conn) except -1
    cdef void _register(self, Conn conn)
    cdef void _unregister(self, Conn conn)
    cdef bint _gate_open(self) except -1


cdef class Conn:
    # (Ordered by size: no padding. 144 bytes + 16 of GC header: one 160-byte block.)
    cdef Writer _writer
    cdef object _transport
    cdef object _on_overflow
    cdef object _queue            # None | bytes (the only frame) | list (2+ frames, shared, oldest first)
    cdef Channel _ch              # the only channel while in <= 1, else None
    cdef tuple _chans             # the channels, only while in >= 2, else None
    cdef int* _chidxs             # this conn's index in each of _chans (same order), else NULL
    cdef public double last_send  # the last write of a data frame (not ping / pong / close)
    cdef public double last_recv
    cdef Py_ssize_t _max_pending
    cdef Py_ssize_t _qbytes
    # Last known transport buffer size. Re-read on pause and whenever the cap
    # looks crossed, so the hot path needs no Python call per frame.
    cdef Py_ssize_t _tbuf
    cdef int _fd
    cdef int _widx                # index in the writer's list (conns per process < 2**31)
    cdef int _chidx               # index in _ch's list
    cdef bint _paused
    cdef bint _dirty
    cdef bint _closed

    cdef int _init(self, Writer writer, transport, Py_ssize_t max_pending, on_overflow) except -1
    cdef int _enqueue(self, bytes frame) except -1
    cdef int _flush(self, double now) except -1
    cdef int _flush_joined(self, double now) except -1
    cdef int _flush_direct(self, double now) except -1
    cdef int _flush_one(self, double now) except -1
    cdef int _handover(self, bytes data) except -1
    cdef Py_ssize_t _transport_size(self)
    cdef int _overflow(self) except -1
    cdef void _drop(self)
    cdef int _write_failed(self) except -1
    cdef Py_ssize_t _find(self, Channel ch)
    cdef bint _member(self, Channel ch)
    cdef int _join(self, Channel ch, Py_ssize_t idx) except -1
    cdef Py_ssize_t _leave(self, Channel ch) except -2
    cdef Py_ssize_t _queued_frames(self)


cdef class Channel:
    cdef list _conns
    cdef void _remove_at(self, Py_ssize_t idx)
    cpdef int publish(self, bytes frame) except -1
