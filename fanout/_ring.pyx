"""Per-subject window of recent frames, for recovery after a reconnect.

`since(seq)` answers "everything after seq" only when the window can prove
that nothing after seq is missing; otherwise None, and the caller falls back
to the engine or to a snapshot with recovered:false.
"""
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int64_t
from libc.string cimport memcpy

__all__ = ["Ring"]

cdef enum:
    # One entry at first: most subjects are quiet (a spray of distinct subjects writes each once), and
    # growth by doubling is amortised O(1).
    _FIRST_ALLOC = 1


cdef class Ring:
    """Circular window of (seq, prev, ts, frame) of one subject, oldest evicted first.

    ``since(seq)`` answers "every frame after seq" only when the window can prove that nothing after
    seq is missing; otherwise None, and the caller falls back to the engine or to a snapshot.

    ``Ring(capacity, max_bytes=2**62)``: an empty window.

    Args:
        capacity: entries held at most (memory grows by doubling up to it).
        max_bytes: frame bytes held at most; the oldest go first, the newest entry always stays.
    Raises:
        ValueError: ``capacity`` < 1 or ``max_bytes`` < 0.
    """

    def __cinit__(self, capacity, max_bytes=2 ** 62):
        self._init(PyNumber_Index(capacity), PyNumber_Index(max_bytes))

    cdef int _init(self, Py_ssize_t capacity, int64_t max_bytes) except -1:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._alloc = min(capacity, _FIRST_ALLOC)
        self._seq = <int64_t*>PyMem_Malloc(self._alloc * sizeof(int64_t))
        self._prev = <int64_t*>PyMem_Malloc(self._alloc * sizeof(int64_t))
        self._ts = <int64_t*>PyMem_Malloc(self._alloc * sizeof(int64_t))
        if self._seq == NULL or self._prev == NULL or self._ts == NULL:
            raise MemoryError()
        self._frames = [None] * self._alloc
        return 0

    def __dealloc__(self):
        PyMem_Free(self._seq)
        PyMem_Free(self._prev)
        PyMem_Free(self._ts)

    cdef inline Py_ssize_t _slot(self, Py_ssize_t i) noexcept nogil:
        i += self._head
        if i >= self._alloc:
            i -= self._alloc
        return i

    cdef void _evict_oldest(self):
        cdef Py_ssize_t h = self._head
        self._nbytes -= PyBytes_GET_SIZE(self._frames[h])
        # Drop the reference now: the frame's memory is the ring's whole cost.
        self._frames[h] = None
        self._head = h + 1 if h + 1 < self._alloc else 0
        self._len -= 1

    cdef int _grow(self) except -1:
        # Only called when full, so the entries are [_head, _alloc) + [0, _head).
        # All three new arrays are allocated before any old one is freed: a failed allocation leaves
        # the ring exactly as it was (no pointer to freed memory for __dealloc__ to free again).
        cdef Py_ssize_t new_alloc = min(self._capacity, self._alloc * 2)
        cdef Py_ssize_t tail = self._alloc - self._head
        cdef int64_t* old[3]
        cdef int64_t* fresh[3]
        cdef int k
        cdef list frames
        old[0] = self._seq
        old[1] = self._prev
        old[2] = self._ts
        for k in range(3):
            fresh[k] = <int64_t*>PyMem_Malloc(new_alloc * sizeof(int64_t))
        if fresh[0] == NULL or fresh[1] == NULL or fresh[2] == NULL:
            for k in range(3):
                PyMem_Free(fresh[k])
            raise MemoryError()
        try:
            frames = self._frames[self._head:] + self._frames[:self._head] + [None] * (new_alloc - self._alloc)
        except BaseException:
            for k in range(3):
                PyMem_Free(fresh[k])
            raise
        for k in range(3):
            memcpy(fresh[k], old[k] + self._head, tail * sizeof(int64_t))
            memcpy(fresh[k] + tail, old[k], self._head * sizeof(int64_t))
            PyMem_Free(old[k])
        self._seq = fresh[0]
        self._prev = fresh[1]
        self._ts = fresh[2]
        self._frames = frames
        self._head = 0
        self._alloc = new_alloc
        return 0

    def trim(self, Py_ssize_t keep):
        """Evict the oldest entries until at most ``keep`` are held; ``last_seq`` is unchanged.

        Raises:
            ValueError: ``keep`` < 0.
        """
        if keep < 0:
            raise ValueError("keep must be >= 0")
        while self._len > keep:
            self._evict_oldest()

    def append(self, seq, prev, ts, bytes frame not None, Py_ssize_t entry_overhead=0):
        """Add the subject's next message; evicts the oldest to stay within capacity and max_bytes.

        A known ``prev`` that is not the newest held seq is a gap: everything held before is dropped,
        so since() never replays across it.

        Args:
            seq: the message's seq, greater than every seq appended before.
            prev: its predecessor's seq: 0 for the first message, -1 when unknown.
            ts: its timestamp (ms since the Unix epoch).
            frame: its encoded frame, kept by reference.
            entry_overhead: bytes counted per held entry in the result (the hub's memory estimate).
        Returns:
            How much ``nbytes + len * entry_overhead`` changed, evictions included.
        Raises:
            ValueError: ``seq`` is not after ``last_seq``, or ``prev`` is not -1 and not in [0, seq).
        """
        cdef Py_ssize_t before = self._nbytes + self._len * entry_overhead
        self._append(PyNumber_Index(seq), PyNumber_Index(prev), PyNumber_Index(ts), frame)
        return self._nbytes + self._len * entry_overhead - before

    cdef int _append(self, int64_t seq, int64_t prev, int64_t ts, bytes frame) except -1:
        cdef Py_ssize_t s
        if seq <= self._last_seq:
            raise ValueError(f"seq {seq} is not after the last seq {self._last_seq}")
        if prev < -1 or prev >= seq:
            raise ValueError(f"prev {prev} must be -1 or in [0, seq)")
        if self._len and prev >= 0 and prev != self._last_seq:
            # A known predecessor that is not our newest entry means a gap (or a
            # rewrite): older entries can no longer be chained to this one, and
            # keeping them would let since() replay across the hole.
            while self._len:
                self._evict_oldest()
        if self._len == self._capacity:
            self._evict_oldest()
        elif self._len == self._alloc:
            self._grow()
        s = self._slot(self._len)
        self._seq[s] = seq
        self._prev[s] = prev
        self._ts[s] = ts
        self._frames[s] = frame
        self._len += 1
        self._nbytes += PyBytes_GET_SIZE(frame)
        self._last_seq = seq
        while self._len > 1 and self._nbytes > self._max_bytes:
            self._evict_oldest()
        return 0

    def since(self, seq):
        """The frames after ``seq``, oldest first.

        Args:
            seq: the last seq the caller has.
        Returns:
            The frames (empty when ``seq`` >= last_seq), or None when the window cannot prove that
            it holds every message after ``seq`` (evicted, or a gap).
        """
        return self._since(PyNumber_Index(seq))

    cdef list _since(self, int64_t seq):
        cdef Py_ssize_t lo, hi, mid, i, first
        cdef list out
        if seq >= self._last_seq:
            return []
        if self._len == 0:
            return None
        first = self._head
        if seq < self._seq[first] and not (self._prev[first] >= 0 and seq >= self._prev[first]):
            return None
        # Binary search over logical positions for the first entry with seq > `seq`.
        lo = 0
        hi = self._len
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._seq[self._slot(mid)] > seq:
                hi = mid
            else:
                lo = mid + 1
        out = []
        for i in range(lo, self._len):
            out.append(self._frames[self._slot(i)])
        return out

    cpdef object last(self):
        """The newest entry as (seq, prev, ts, frame); None when empty."""
        cdef Py_ssize_t s
        if self._len == 0:
            return None
        s = self._slot(self._len - 1)
        return (self._seq[s], self._prev[s], self._ts[s], self._frames[s])

    def seq_at(self, Py_ssize_t i):
        """The seq of the i-th held entry, oldest first (for cursors over the window).

        Raises:
            IndexError: not 0 <= i < len(ring).
        """
        if i < 0 or i >= self._len:
            raise IndexError("ring index out of range")
        return self._seq[self._slot(i)]

    def __len__(self):
        """Entries held."""
        return self._len

    @property
    def last_seq(self):
        """The newest seq appended (held or not); 0 before the first append."""
        return self._last_seq

    @property
    def first_seq(self):
        """The oldest seq held; 0 when empty."""
        return self._seq[self._head] if self._len else 0

    @property
    def nbytes(self):
        """Frame bytes held."""
        return self._nbytes

    @property
    def capacity(self):
        """Entries held at most."""
        return self._capacity

    @property
    def max_bytes(self):
        """Frame bytes held at most (the newest entry is kept even when larger)."""
        return self._max_bytes

    def __repr__(self):
        return (f"<Ring len={self._len} capacity={self._capacity} "
                f"first_seq={self.first_seq} last_seq={self._last_seq} nbytes={self._nbytes}>")
