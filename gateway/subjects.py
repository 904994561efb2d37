"""Subject grammar, authorization patterns, and the subject <-> Kafka (topic, key) mapping.

Sans-I/O: no asyncio, no Kafka client. See PROTOCOL.md "Subjects" and "Authorization".

    /matches/football/5  <->  topic "matches", key "football/5"
    /matches             <->  topic "matches", no key (partition 0)
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_SUBJECT_BYTES = 1024
MAX_SEGMENTS = 32

_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+\Z")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")


class SubjectError(ValueError):
    """The text is not a valid subject (code `invalid_subject`)."""


class PatternError(ValueError):
    """The text is not a valid subject pattern (a token carrying it is refused)."""


class Subject(NamedTuple):
    """A parsed, valid subject."""

    text: str
    topic: str
    key: str | None

    @property
    def key_bytes(self) -> bytes | None:
        return None if self.key is None else self.key.encode("ascii")


def is_topic_name(name: str) -> bool:
    return bool(_TOPIC.match(name)) and name not in (".", "..")


def parse_subject(text: object) -> Subject:
    """Validate `text` and split it into topic and key; raise SubjectError with a readable reason."""
    if not isinstance(text, str):
        raise SubjectError("subject must be a string")
    if not text.startswith("/"):
        raise SubjectError("subject must start with '/'")
    # surrogatepass: a lone surrogate (a str from JSON that escapes one) must be refused as a subject,
    # by the segment check below, not raise UnicodeEncodeError here
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_BYTES:
        raise SubjectError(f"subject is longer than {MAX_SUBJECT_BYTES} bytes")
    segments = text[1:].split("/")
    if len(segments) > MAX_SEGMENTS:
        raise SubjectError(f"subject has more than {MAX_SEGMENTS} segments")
    for seg in segments:
        if not seg:
            raise SubjectError("subject has an empty segment")
        if not _SEGMENT.match(seg):
            raise SubjectError(f"segment {seg!r} has characters outside [A-Za-z0-9._~-]")
    topic = segments[0]
    if not is_topic_name(topic):
        raise SubjectError(f"first segment {topic!r} is not a legal Kafka topic name")
    key = "/".join(segments[1:]) if len(segments) > 1 else None
    return Subject(text, topic, key)


def subject_for_record(topic: str, key: bytes | None) -> Subject | None:
    """The subject a Kafka record belongs to, or None when its key is not a valid subject tail."""
    if key is None:
        text = "/" + topic
    else:
        try:
            text = "/" + topic + "/" + key.decode("ascii")
        except UnicodeDecodeError:
            return None
    try:
        subject = parse_subject(text)
    except SubjectError:
        return None
    if subject.topic != topic:  # a key starting with '/' would shift segments
        return None
    return subject


class Pattern:
    """A subject pattern from a token: `*` matches one segment, a final `>` one or more trailing ones."""

    __slots__ = ("text", "_segments", "_tail")

    def __init__(self, text: object) -> None:
        if not isinstance(text, str) or not text.startswith("/"):
            raise PatternError(f"pattern {text!r} must be a string starting with '/'")
        segments = text[1:].split("/")
        tail = segments[-1] == ">"
        if tail:
            segments = segments[:-1]
        for seg in segments:
            if seg == ">":
                raise PatternError(f"pattern {text!r}: '>' is only allowed as the last segment")
            if seg != "*" and not _SEGMENT.match(seg):
                raise PatternError(f"pattern {text!r}: bad segment {seg!r}")
        if not segments and not tail:
            raise PatternError(f"pattern {text!r} is empty")
        self.text = text
        self._segments = tuple(segments)
        self._tail = tail

    def matches(self, subject: Subject) -> bool:
        parts = subject.text[1:].split("/")
        n = len(self._segments)
        if self._tail:
            if len(parts) <= n:
                return False
        elif len(parts) != n:
            return False
        for want, got in zip(self._segments, parts):  # noqa: SIM110 (per message: a loop beats all() over a generator)
            if want != "*" and want != got:
                return False
        return True

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"
