from libc.stdint cimport int64_t


cdef class Ring:
    # Entries live in parallel circular arrays: entry i (0 = oldest) is at
    # physical slot (_head + i) % _alloc. _alloc grows by doubling up to
    # _capacity, so a quiet subject with a large capacity costs little memory.
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _alloc
    cdef Py_ssize_t _head
    cdef Py_ssize_t _len
    cdef int64_t* _seq
    cdef int64_t* _prev
    cdef int64_t* _ts
    cdef list _frames          # the frame objects, same slots as the C arrays; None when free
    cdef Py_ssize_t _nbytes
    cdef int64_t _max_bytes
    cdef int64_t _last_seq     # newest seq ever appended; survives eviction

    cdef int _init(self, Py_ssize_t capacity, int64_t max_bytes) except -1
    # C-level entry points for Cython callers; the def methods wrap them.
    cdef int _append(self, int64_t seq, int64_t prev, int64_t ts, bytes frame) except -1
    cdef list _since(self, int64_t seq)
    cpdef object last(self)
    cdef inline Py_ssize_t _slot(self, Py_ssize_t i) noexcept nogil
    cdef void _evict_oldest(self)
    cdef int _grow(self) except -1
