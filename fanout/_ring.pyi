from typing import Self

from typing_extensions import disjoint_base

__all__ = ["Ring"]

# cdef classes: one C layout each (PEP 800), constructed by __cinit__ (hence __new__, not __init__)
@disjoint_base
class Ring:
    """Circular window of (seq, prev, ts, frame) of one subject, oldest evicted first.

    ``since(seq)`` answers "every frame after seq" only when the window can prove that nothing after
    seq is missing; otherwise None, and the caller falls back to the engine or to a snapshot.
    """

    def __new__(cls, capacity: int, max_bytes: int = 2**62) -> Self:
        """``Ring(capacity, max_bytes=2**62)``: an empty window.

        Args:
            capacity: entries held at most (memory grows by doubling up to it).
            max_bytes: frame bytes held at most; the oldest go first, the newest entry always stays.
        Raises:
            ValueError: ``capacity`` < 1 or ``max_bytes`` < 0.
        """
    def append(self, seq: int, prev: int, ts: int, frame: bytes, entry_overhead: int = 0) -> int:
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
    def since(self, seq: int) -> list[bytes] | None:
        """The frames after ``seq``, oldest first.

        Args:
            seq: the last seq the caller has.
        Returns:
            The frames (empty when ``seq`` >= last_seq), or None when the window cannot prove that
            it holds every message after ``seq`` (evicted, or a gap).
        """
    def last(self) -> tuple[int, int, int, bytes] | None:
        """The newest entry as (seq, prev, ts, frame); None when empty."""
    def seq_at(self, i: int) -> int:
        """The seq of the i-th held entry, oldest first (for cursors over the window).

        Raises:
            IndexError: not 0 <= i < len(ring).
        """
    def trim(self, keep: int) -> None:
        """Evict the oldest entries until at most ``keep`` are held; ``last_seq`` is unchanged.

        Raises:
            ValueError: ``keep`` < 0.
        """
    def __len__(self) -> int:
        """Entries held."""
    @property
    def last_seq(self) -> int:
        """The newest seq appended (held or not); 0 before the first append."""
    @property
    def first_seq(self) -> int:
        """The oldest seq held; 0 when empty."""
    @property
    def nbytes(self) -> int:
        """Frame bytes held."""
    @property
    def capacity(self) -> int:
        """Entries held at most."""
    @property
    def max_bytes(self) -> int:
        """Frame bytes held at most (the newest entry is kept even when larger)."""
