"""One encoded frame -> many sockets; one write per socket per loop iteration.

The pipeline and the reasons the per-connection byte order holds are explained
once, in _writer.pxd.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.method cimport PyMethod_Check, PyMethod_GET_FUNCTION, PyMethod_GET_SELF
from cpython.number cimport PyNumber_Index
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, ENOBUFS, ENOMEM, errno
from libc.string cimport memmove, memset
from posix.stat cimport S_ISSOCK, fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID, clock_gettime, timespec
from posix.types cimport clockid_t
from posix.uio cimport iovec

cdef extern from *:
    """
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <limits.h>
    #include <errno.h>
    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0  /* macOS: SIGPIPE is ignored by CPython anyway */
    #endif
    #ifndef IOV_MAX
    #define IOV_MAX 1024
    #endif
    #define FANOUT_IOV_MAX (IOV_MAX < 1024 ? IOV_MAX : 1024)
    """
    struct msghdr:
        void* msg_name
        iovec* msg_iov
        size_t msg_iovlen
    ctypedef long ssize_t
    ssize_t sendmsg(int fd, const msghdr* msg, int flags) nogil
    ssize_t c_send "send"(int fd, const void* buf, size_t n, int flags) nogil
    const int EWOULDBLOCK
    const int MSG_NOSIGNAL
    const int MSG_DONTWAIT
    const int FANOUT_IOV_MAX

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)

__all__ = ["Writer", "Conn", "Channel"]

cdef double _BUSY_PERIOD = 0.5
#: seconds over which the writer's busy share is measured (coalesce_busy, _writer.pxd "Coalescing")
BUSY_PERIOD = _BUSY_PERIOD
cdef int _PROBE_EVERY = 6
#: while holding, every PROBE_EVERY-th period is followed by one without holds that measures the share
PROBE_EVERY = _PROBE_EVERY
cdef int _OPEN_AFTER = 2
#: consecutive periods at or over coalesce_busy (without holds) that start the holds
OPEN_AFTER = _OPEN_AFTER


cdef double _seconds(object fake, clockid_t clock_id) except? -1.0:
    """A clock in seconds: the test's fake if there is one, else clock_gettime(clock_id)."""
    cdef timespec ts
    if fake is not None:
        return fake()
    clock_gettime(clock_id, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Writer:
    """Writes the queues of every Conn that became dirty in one loop iteration (the pipeline: _writer.pxd).

    ``Writer(loop)``: a writer whose flushes run on ``loop`` (scheduled with call_soon, once per iteration).

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

    def __cinit__(self, loop, double coalesce_window=0.0, Py_ssize_t coalesce_min_conns=1000,
                  double coalesce_busy=0.0, clock=None, cpu_clock=None):
        self._loop = loop
        self.coalesce_window = coalesce_window
        self.coalesce_min_conns = coalesce_min_conns
        self.coalesce_busy = coalesce_busy
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._unheld_per_write = 1.0
        self._conns = []
        self._dirty = []
        self._iov_max = FANOUT_IOV_MAX
        self._iov = <iovec*>PyMem_Malloc(self._iov_max * sizeof(iovec))
        if self._iov == NULL:
            raise MemoryError()
        self._flush_cb = self.flush

    def __dealloc__(self):
        PyMem_Free(self._iov)

    cdef int _mark_dirty(self, Conn conn) except -1:
        conn._dirty = True
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            if self._hold_until > 0.0 and self._loop.time() < self._hold_until:
                # Right after a big flush: let the next messages join this one's write.
                self.held_flushes += 1
                self._loop.call_at(self._hold_until, self._flush_cb)
            else:
                self._loop.call_soon(self._flush_cb)
        return 0

    cdef void _register(self, Conn conn):
        conn._widx = PyList_GET_SIZE(self._conns)
        self._conns.append(conn)

    cdef void _unregister(self, Conn conn):
        cdef Py_ssize_t idx = conn._widx
        cdef Conn last
        if idx < 0:
            return
        conn._widx = -1
        last = self._conns.pop()
        if last is not conn:
            self._conns[idx] = last
            last._widx = idx

    def flush(self):
        """Write the queues of all dirty conns now (normally run by call_soon, or call_at when held).

        Never raises for one conn's write error: that conn is closed (its transport aborted) and the
        loop's exception handler is told about unexpected errors; the other conns are still written.
        """
        cdef list dirty = self._dirty
        cdef Conn conn
        cdef double now
        cdef Py_ssize_t touched = 0
        cdef bint timed = self.coalesce_window > 0.0 and self.coalesce_busy > 0.0
        self._scheduled = False
        if not dirty:
            return
        # Swap first: a conn made dirty again while we write lands in the next round.
        self._dirty = []
        now = self._loop.time()
        for conn in dirty:
            conn._dirty = False
            if conn._closed or conn._paused:
                continue
            touched += 1
            try:
                conn._flush(now)
            except Exception as exc:
                # Never let one broken conn stop the others' writes.
                conn._write_failed()
                self._loop.call_exception_handler({
                    "message": "fanout: unexpected error while writing",
                    "exception": exc,
                    "transport": conn._transport,
                })
        if timed and not self._gate_open():
            self._hold_until = 0.0  # not busy: each message may leave alone, a window adds only latency
        elif self.coalesce_window > 0.0 and touched >= self.coalesce_min_conns:
            # From the end of this flush: a big flush takes long, messages arrive during it.
            self._hold_until = self._loop.time() + self.coalesce_window
        else:
            self._hold_until = 0.0

    cdef bint _gate_open(self) except -1:
        """After a flush: close the busy period if it is complete; whether big flushes hold now."""
        cdef double t = _seconds(self._clock, CLOCK_MONOTONIC)
        cdef double cpu, elapsed, per_write
        if self._busy_t0 == 0.0:
            self._busy_t0 = t  # the first period starts with the first timed flush
            self._busy_cpu0 = _seconds(self._cpu_clock, CLOCK_THREAD_CPUTIME_ID)
            self._period_frames0 = self.frames_out
            self._period_writes0 = self.syscalls
            return False
        elapsed = t - self._busy_t0
        if elapsed < _BUSY_PERIOD:
            return self._busy and not self._probing
        cpu = _seconds(self._cpu_clock, CLOCK_THREAD_CPUTIME_ID)
        self.busy_share = (cpu - self._busy_cpu0) / elapsed
        per_write = (self.frames_out - self._period_frames0) / <double>max(1, self.syscalls - self._period_writes0)
        self._busy_t0 = t
        self._busy_cpu0 = cpu
        self._period_frames0 = self.frames_out
        self._period_writes0 = self.syscalls
        if not self._busy or self._probing:
            self._unheld_per_write = max(1.0, per_write)  # what the load gathers per write by itself
        if not self._busy:
            # One busy period can be a burst; OPEN_AFTER in a row are a load.
            self._busy_periods = self._busy_periods + 1 if self.busy_share >= self.coalesce_busy else 0
            if self._busy_periods >= _OPEN_AFTER:
                self._busy = True
                self._busy_periods = 0
                self._held_periods = 0
        elif self._probing:
            # A period without holds: what the load costs now, unhelped by the window.
            self._probing = False
            self._held_periods = 0
            if self.busy_share < self.coalesce_busy:
                self._busy = False
        elif self.busy_share * max(1.0, per_write) / self._unheld_per_write < self.coalesce_busy:
            # Even if every write the window saved had cost a whole held write, unheld the load would
            # be under the threshold: holding does not pay (e.g. a busy spell has ended).
            self._busy = False
        else:
            # Holding may be what keeps the share down: only a probe can tell.
            self._held_periods += 1
            if self._held_periods >= _PROBE_EVERY:
                self._probing = True
                self.probes += 1
        return self._busy and not self._probing

    def idle(self, double now, double send_idle, double recv_idle):
        """The registered conns that have been quiet, for the liveness sweep.

        Args:
            now: the loop's time().
            send_idle: seconds without output that make a conn quiet.
            recv_idle: seconds without input (``last_recv``) that make a conn unheard.
        Returns:
            (conns silent for >= send_idle, conns unheard for >= recv_idle).
        """
        cdef list quiet = []
        cdef list deaf = []
        cdef Conn conn
        for conn in self._conns:
            if now - conn.last_send >= send_idle:
                quiet.append(conn)
            if now - conn.last_recv >= recv_idle:
                deaf.append(conn)
        return quiet, deaf

    def __len__(self):
        """Conns registered (open)."""
        return PyList_GET_SIZE(self._conns)

    def __repr__(self):
        return (f"<Writer conns={len(self._conns)} frames_out={self.frames_out} "
                f"syscalls={self.syscalls} overflows={self.overflows}>")


cdef inline bint _soft_error(int err) noexcept nogil:
    """Errors after which the socket is still fine: the kernel had no room (or no buffer memory) now.
    The transport takes the frame and retries when the socket is writable."""
    return err == EAGAIN or err == EWOULDBLOCK or err == EINTR or err == ENOBUFS or err == ENOMEM


def _abort_transport(transport):
    try:
        transport.abort()
    except Exception:
        pass  # already closed


cdef inline bint _is_data(bytes frame) noexcept:
    """A data frame (text, binary, continuation), not a control frame (ping, pong, close): only data
    frames set last_send, which times the heartbeats (PROTOCOL.md: WebSocket pings do not count)."""
    return ((<const unsigned char*>PyBytes_AS_STRING(frame))[0] & 0x0F) < 8


cdef object _shared_callback(Writer writer, object cb):
    """``cb``, or an equal bound method an earlier Conn already holds.

    ``Conn(..., gw.on_overflow)`` makes a new bound method object per conn
    (64 bytes); equal ones (same function, same object) are interchangeable.
    """
    cdef object last = writer._on_overflow
    if not PyMethod_Check(cb):
        return cb
    if (last is not None and PyMethod_GET_FUNCTION(cb) == PyMethod_GET_FUNCTION(last)
            and PyMethod_GET_SELF(cb) == PyMethod_GET_SELF(last)):
        return last
    writer._on_overflow = cb
    return cb


cdef class Conn:
    """One connection's outbound queue of whole frames, registered with a Writer while open.

    The protocol that owns the transport forwards pause_writing(), resume_writing() and (first
    thing) connection_lost() to it; fanout.WSConn and gateway's Session are such protocols.
    """

    def __cinit__(self, *args, **kwargs):
        # _queue, _ch, _chans: None (nothing queued, in no channel)
        self._widx = -1
        self._chidx = -1
        self._fd = -1
        self._closed = True  # until __init__ has registered us

    def __dealloc__(self):
        PyMem_Free(self._chidxs)

    def __init__(self, Writer writer not None, transport, max_pending, on_overflow):
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
        self._init(writer, transport, PyNumber_Index(max_pending), on_overflow)

    cdef int _init(self, Writer writer, transport, Py_ssize_t max_pending, on_overflow) except -1:
        cdef double now
        cdef struct_stat st
        cdef int fd
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self._writer = writer
        self._transport = transport
        self._max_pending = max_pending
        self._on_overflow = _shared_callback(writer, on_overflow)
        now = writer._loop.time()
        self.last_send = now
        self.last_recv = now
        sock = transport.get_extra_info("socket")
        # asyncio's TLS transport still reports the raw socket; writing to it
        # would bypass the encryption.
        if (sock is not None and transport.get_extra_info("sslcontext") is None
                and transport.get_extra_info("ssl_object") is None):
            fd = sock.fileno()
            # uvloop's pipe transports also report a (pseudo) socket.
            if fd >= 0 and fstat(fd, &st) == 0 and S_ISSOCK(st.st_mode):
                self._fd = fd
        # Pause as soon as the transport buffers anything, resume once it is
        # empty. The TLS transports pause at size >= high (plain ones at > high):
        # high=0 would pause them while empty and never resume.
        transport.set_write_buffer_limits(high=0 if self._fd >= 0 else 1, low=0)
        # A transport that already buffers something has paused (or just now
        # pauses) the protocol before it could know this conn; a resume follows.
        self._tbuf = transport.get_write_buffer_size()
        self._paused = self._tbuf > 0
        self._closed = False
        writer._register(self)
        return 0

    cdef Py_ssize_t _transport_size(self):
        try:
            return self._transport.get_write_buffer_size()
        except Exception:
            return 0

    cdef int _enqueue(self, bytes frame) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
        if self._closed:
            return 0
        if n == 0:
            return 1
        q = self._queue
        if q is None:
            self._queue = frame
        elif PyList_CheckExact(q):
            (<list>q).append(frame)
        else:
            # Untracked by the cyclic GC: it only ever holds bytes, so it can be in no cycle. Tracked,
            # the lists of frames piling up between flushes (coalescing, bursts: one per subscriber)
            # outlive young collections, are promoted to the old generation by the thousand and soon
            # trigger full collections that walk every connection's objects (see "Queues and the
            # cyclic GC" in _writer.pxd).
            q = [q, frame]
            PyObject_GC_UnTrack(<PyObject*>q)
            self._queue = q
        self._qbytes += n
        if self._qbytes + self._tbuf > self._max_pending:
            self._tbuf = self._transport_size()
            if self._qbytes + self._tbuf > self._max_pending:
                self._overflow()
                return 0
        if not self._dirty and not self._paused:
            self._writer._mark_dirty(self)
        return 1

    cdef int _overflow(self) except -1:
        cdef Writer writer = self._writer
        self._drop()
        writer.overflows += 1
        writer._loop.call_soon(self._on_overflow, self)
        return 0

    cdef void _drop(self):
        cdef tuple chans = self._chans
        cdef int* idxs = self._chidxs
        cdef Channel ch = self._ch
        cdef Py_ssize_t i
        if self._closed:
            return
        self._closed = True
        # Not clear(): a flush further up the stack may still hold the old list.
        self._queue = None
        self._qbytes = 0
        self._ch = None
        self._chans = None
        self._chidxs = NULL
        if ch is not None:
            ch._remove_at(self._chidx)
        elif chans is not None:
            # (_remove_at moves another conn, never this one: our arrays stay as they were)
            for i in range(PyTuple_GET_SIZE(chans)):
                (<Channel><object>PyTuple_GET_ITEM(chans, i))._remove_at(idxs[i])
            PyMem_Free(idxs)
        self._chidx = -1
        self._writer._unregister(self)

    # Channel membership: one (_ch, _chidx) pair, or from two channels on the tuple _chans and the
    # array _chidxs (see the end of the header comment in _writer.pxd).

    cdef Py_ssize_t _find(self, Channel ch):
        """The position of ``ch`` in _chans, or -1."""
        cdef tuple chans = self._chans
        cdef Py_ssize_t i
        if chans is not None:
            for i in range(PyTuple_GET_SIZE(chans)):
                if PyTuple_GET_ITEM(chans, i) == <PyObject*>ch:
                    return i
        return -1

    cdef bint _member(self, Channel ch):
        return self._ch is ch or self._find(ch) >= 0

    cdef int _join(self, Channel ch, Py_ssize_t idx) except -1:
        """Enter ``ch`` (not a member yet) at index ``idx`` of its list."""
        cdef Py_ssize_t n
        cdef int* idxs
        cdef tuple chans
        if self._chans is None and self._ch is None:
            self._ch = ch
            self._chidx = <int>idx
            return 0
        if self._chans is None:  # the second channel: from the fields to the tuple and the array
            n = 1
            chans = (self._ch,)
            idxs = <int*>PyMem_Malloc(2 * sizeof(int))
            if idxs == NULL:
                raise MemoryError()
            idxs[0] = self._chidx
        else:
            n = PyTuple_GET_SIZE(self._chans)
            chans = self._chans
            idxs = <int*>PyMem_Realloc(self._chidxs, (n + 1) * sizeof(int))
            if idxs == NULL:
                raise MemoryError()
        idxs[n] = <int>idx
        self._chidxs = idxs
        self._chans = chans + (ch,)
        self._ch = None
        self._chidx = -1
        return 0

    cdef Py_ssize_t _leave(self, Channel ch) except -2:
        """Forget ``ch``; its index for this conn, or -1 when not a member."""
        cdef Py_ssize_t idx, i, n
        cdef tuple chans = self._chans
        cdef int* idxs = self._chidxs
        if self._ch is ch:
            idx = self._chidx
            self._ch = None
            self._chidx = -1
            return idx
        i = self._find(ch)
        if i < 0:
            return -1
        idx = idxs[i]
        n = PyTuple_GET_SIZE(chans) - 1
        if n == 1:  # back to one channel: the fields
            self._ch = <Channel><object>PyTuple_GET_ITEM(chans, 1 - i)
            self._chidx = idxs[1 - i]
            self._chans = None
            self._chidxs = NULL
            PyMem_Free(idxs)
            return idx
        memmove(&idxs[i], &idxs[i + 1], (n - i) * sizeof(int))
        self._chans = chans[:i] + chans[i + 1:]
        return idx

    cdef int _flush(self, double now) except -1:
        # Only for an open, unpaused conn, and without asking the transport
        # anything: "unpaused" means its buffer is empty, "open" that its fd is
        # still this connection's (see "Closing" in _writer.pxd).
        q = self._queue
        if q is None:
            return 0
        if self._fd < 0:
            return self._flush_joined(now)
        if PyList_CheckExact(q):
            return self._flush_direct(now)
        return self._flush_one(now)

    cdef int _flush_joined(self, double now) except -1:
        cdef object q = self._queue
        cdef Py_ssize_t n = PyList_GET_SIZE(q) if PyList_CheckExact(q) else 1
        cdef Writer w = self._writer
        cdef bytes data = b"".join(q) if PyList_CheckExact(q) else <bytes>q
        cdef Py_ssize_t k
        cdef bint has_data = False
        if PyList_CheckExact(q):
            for k in range(n):
                if _is_data(<bytes>PyList_GET_ITEM(q, k)):
                    has_data = True
                    break
        else:
            has_data = _is_data(data)
        self._queue = None
        self._qbytes = 0
        w.frames_out += n
        w.bytes_out += PyBytes_GET_SIZE(data)
        w.syscalls += 1
        if has_data:
            self.last_send = now
        self._handover(data)
        return 0

    cdef int _handover(self, bytes data) except -1:
        try:
            self._transport.write(data)
        except Exception:
            self._write_failed()
        return 0

    cdef int _write_failed(self) except -1:
        # A hard error (EPIPE, ECONNRESET, a transport that refuses data): nothing more can reach this
        # peer. Dropping the conn alone would leave the transport open and, out of the writer's list,
        # unseen by the liveness sweep: a connection nobody ever closes. So abort the transport too
        # (from call_soon, never inside a flush); connection_lost follows and the owner cleans up.
        cdef object transport = self._transport
        if self._closed:
            return 0
        self._writer.write_errors += 1
        self._drop()
        if transport is not None:
            self._writer._loop.call_soon(_abort_transport, transport)
        return 0

    cdef int _flush_direct(self, double now) except -1:
        cdef Writer w = self._writer
        cdef iovec* iov = w._iov
        cdef list q = self._queue
        cdef Py_ssize_t qlen = PyList_GET_SIZE(q)
        cdef Py_ssize_t head = 0
        cdef Py_ssize_t cnt, k, off, flen
        cdef ssize_t n, total, rem
        cdef PyObject* item
        cdef msghdr msg
        cdef int err
        cdef int eintr = 0
        cdef bint has_data
        cdef bytes frame, tail
        memset(&msg, 0, sizeof(msg))
        msg.msg_iov = iov
        while head < qlen:
            cnt = qlen - head
            if cnt > w._iov_max:
                cnt = w._iov_max
            total = 0
            has_data = False
            for k in range(cnt):
                # Borrowed: q keeps every frame alive for the duration of the call.
                item = PyList_GET_ITEM(q, head + k)
                iov[k].iov_base = PyBytes_AS_STRING(<object>item)
                iov[k].iov_len = <size_t>PyBytes_GET_SIZE(<object>item)
                total += <ssize_t>iov[k].iov_len
                if not has_data and _is_data(<bytes>item):
                    has_data = True
            msg.msg_iovlen = <size_t>cnt
            n = sendmsg(self._fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
            w.syscalls += 1
            if n < 0:
                err = errno
                if err == EINTR and eintr < 3:
                    eintr += 1
                    continue
                if not _soft_error(err):
                    # EPIPE, ECONNRESET...: nothing left worth queueing.
                    self._write_failed()
                    return 0
                off = 0
            else:
                if has_data:
                    self.last_send = now
                w.bytes_out += <unsigned long long>n
                self._qbytes -= n
                rem = n
                k = 0
                while k < cnt and rem >= <ssize_t>iov[k].iov_len:
                    rem -= <ssize_t>iov[k].iov_len
                    k += 1
                w.frames_out += <unsigned long long>k
                head += k
                if n == total:
                    continue
                off = rem
            # The kernel is full: the rest of the frame at `head` becomes the
            # transport's (it pauses us), all later frames stay with us.
            frame = <bytes><object>PyList_GET_ITEM(q, head)
            head += 1
            flen = PyBytes_GET_SIZE(frame)
            tail = frame if off == 0 else PyBytes_FromStringAndSize(PyBytes_AS_STRING(frame) + off, flen - off)
            self._qbytes -= flen - off
            w.frames_out += 1
            w.bytes_out += <unsigned long long>(flen - off)
            w.syscalls += 1
            if has_data:
                self.last_send = now
            self._handover(tail)
            if self._closed:
                return 0
            if self._paused or self._transport.get_write_buffer_size() > 0:
                break
            # The transport wrote it all at once: the socket has room again.
        if self._closed:
            return 0
        if head >= PyList_GET_SIZE(q):
            self._queue = None
        else:
            del q[:head]
        return 0

    cdef int _flush_one(self, double now) except -1:
        # The common case of a fan-out: one frame owed, one send(2), no list.
        cdef Writer w = self._writer
        cdef bytes frame = <bytes>self._queue
        cdef Py_ssize_t flen = PyBytes_GET_SIZE(frame)
        cdef ssize_t n
        cdef int err
        cdef int eintr = 0
        self._queue = None  # taken: a frame queued while we hand over goes behind it
        while True:
            n = c_send(self._fd, PyBytes_AS_STRING(frame), <size_t>flen, MSG_DONTWAIT | MSG_NOSIGNAL)
            w.syscalls += 1
            if n >= 0:
                break
            err = errno
            if err == EINTR and eintr < 3:
                eintr += 1
                continue
            if not _soft_error(err):
                self._write_failed()
                return 0
            n = 0
            break
        self._qbytes -= flen
        w.frames_out += 1
        if _is_data(frame):
            self.last_send = now
        if n == flen:
            w.bytes_out += <unsigned long long>n
            return 0
        # The kernel is full: the unsent rest becomes the transport's (it pauses us).
        w.bytes_out += <unsigned long long>flen
        w.syscalls += 1
        self._handover(frame if n == 0 else PyBytes_FromStringAndSize(PyBytes_AS_STRING(frame) + n, flen - n))
        return 0

    def send(self, bytes frame not None):
        """Queue one whole encoded frame (kept by reference, written at the next flush).

        Args:
            frame: a complete frame (fanout.encode_*); an empty one is accepted and ignored.
        Returns:
            True when queued; False when the conn is closed or this frame overflowed it (then it
            is closed and on_overflow follows).
        Raises:
            TypeError: ``frame`` is not bytes.
        """
        return self._enqueue(frame) == 1

    def pause_writing(self):
        """Forward from the protocol: the transport buffers, so stop writing to the fd."""
        self._paused = True
        self._tbuf = self._transport_size()

    def resume_writing(self):
        """Forward from the protocol: the transport drained; the queue is written at the next flush."""
        self._paused = False
        self._tbuf = 0
        if not self._closed and not self._dirty and self._queue is not None:
            self._writer._mark_dirty(self)

    def close(self):
        """Drop the queue and leave every channel and the writer; idempotent.

        Writes nothing and leaves the transport open: the owner closes it (after any close frame).
        """
        self._drop()

    def connection_lost(self, exc):
        """Forward from the protocol, FIRST thing: the transport closes the fd right after. Same as
        close(); an override in a subclass calls this (or close()) before anything else.

        Args:
            exc: the transport's reason (ignored).
        """
        self._drop()

    @property
    def closed(self):
        """True once closed (close(), connection_lost(), an overflow or a hard write error)."""
        return self._closed

    @property
    def paused(self):
        """True while the transport holds unwritten bytes (between pause_writing and resume_writing)."""
        return self._paused

    @property
    def pending_bytes(self):
        """Bytes of our queue plus the transport's buffer."""
        return self._qbytes + self._transport_size()

    @property
    def queued_bytes(self):
        """Bytes of our queue only (what an overflow releases)."""
        return self._qbytes

    @property
    def max_pending(self):
        """The limit of pending_bytes."""
        return self._max_pending

    @property
    def fd(self):
        """The fd written directly, or -1 when everything goes through the transport."""
        return self._fd

    @property
    def transport(self):
        """The transport given at registration."""
        return self._transport

    @property
    def writer(self):
        """The writer the conn is registered with."""
        return self._writer

    def __repr__(self):
        return (f"<Conn fd={self._fd} closed={self._closed} paused={self._paused} "
                f"queued={self._queued_frames()}/{self._qbytes}B>")

    cdef Py_ssize_t _queued_frames(self):
        if self._queue is None:
            return 0
        return PyList_GET_SIZE(self._queue) if PyList_CheckExact(self._queue) else 1


cdef class Channel:
    """The subscribers of one subject: publish() queues one frame on each of them.

    ``Channel()``: an empty channel.
    """

    def __cinit__(self):
        self._conns = []

    cdef void _remove_at(self, Py_ssize_t idx):
        cdef Conn last = self._conns.pop()
        cdef Py_ssize_t pos
        if idx < PyList_GET_SIZE(self._conns):
            self._conns[idx] = last
            if last._ch is self:
                last._chidx = <int>idx
            else:
                pos = last._find(self)
                if pos >= 0:  # always, while `last` is in our list (never a write outside its array)
                    last._chidxs[pos] = <int>idx

    def add(self, Conn conn not None):
        """Subscribe ``conn``.

        Returns:
            True when added; False when it is already here or closed.
        Raises:
            TypeError: ``conn`` is None or not a Conn.
        """
        if conn._closed or conn._member(self):
            return False
        conn._join(self, PyList_GET_SIZE(self._conns))
        self._conns.append(conn)
        return True

    def remove(self, Conn conn not None):
        """Unsubscribe ``conn`` (order of the others may change).

        Returns:
            True when removed; False when it was not here.
        Raises:
            TypeError: ``conn`` is None or not a Conn.
        """
        cdef Py_ssize_t idx = conn._leave(self)
        if idx < 0:
            return False
        self._remove_at(idx)
        return True

    cpdef int publish(self, bytes frame) except -1:
        """Queue ``frame`` (the same object) on every subscriber.

        Args:
            frame: a complete encoded frame.
        Returns:
            How many subscribers took it (a subscriber it overflows is closed and removed instead).
        Raises:
            TypeError: ``frame`` is None or not bytes.
        """
        cdef list conns = self._conns
        cdef Py_ssize_t i = 0
        cdef int count = 0
        cdef Conn conn
        if frame is None:
            raise TypeError("frame must be bytes, not None")
        while i < PyList_GET_SIZE(conns):
            conn = <Conn><object>PyList_GET_ITEM(conns, i)
            if conn._enqueue(frame):
                count += 1
            # An overflow swap-removes `conn`: slot i then holds a conn not yet served.
            if i < PyList_GET_SIZE(conns) and <PyObject*>conn == PyList_GET_ITEM(conns, i):
                i += 1
        return count

    def conns(self):
        """The subscribers, as a new list."""
        return list(self._conns)

    def __len__(self):
        """Subscribers."""
        return PyList_GET_SIZE(self._conns)

    def __contains__(self, conn):
        """True when ``conn`` is a subscribed Conn."""
        return isinstance(conn, Conn) and (<Conn>conn)._member(self)

    def __repr__(self):
        return f"<Channel conns={len(self._conns)}>"
