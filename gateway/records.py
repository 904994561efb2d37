"""The one message type every layer shares: a sequenced record of one subject.

Engines make them, the hub fans them out, the sans-I/O protocol encodes them (`protocol.msg`). It lives
here, apart from `engines/`, so that `protocol.py` imports no engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Record:
    """One sequenced message of one subject."""

    subject: str
    content: bytes
    epoch: str
    seq: int          # >= 1, strictly increasing along the subject within the epoch
    prev: int | None  # seq of the previous message of the subject in this epoch, 0 for the first, None unknown
    ts: int           # ms since the Unix epoch
