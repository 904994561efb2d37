"""Subject grammar, Kafka mapping and patterns (sans-I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.subjects import Pattern, PatternError, SubjectError, parse_subject, subject_for_record

SEG = st.text(alphabet="abcXYZ019._~-", min_size=1, max_size=8)
TOPIC = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8).filter(lambda t: t not in (".", ".."))


@given(TOPIC, st.lists(SEG, max_size=10))
def test_subject_roundtrips_through_kafka_mapping(topic, tail):
    text = "/" + "/".join([topic, *tail])
    s = parse_subject(text)
    assert s.topic == topic
    assert s.key == ("/".join(tail) if tail else None)
    assert subject_for_record(topic, s.key_bytes) == s


@pytest.mark.parametrize("text", ["", "/", "a/b", "/a//b", "/a/", "/a b", "/é", "/../x", "/./x",
                                  "/ti~lde/x", "/" + "a" * 250, "/a" * 33, "/t/" + "x" * 1030, 5, None])
def test_invalid_subjects(text):
    with pytest.raises(SubjectError):
        parse_subject(text)


def test_limits_are_inclusive():
    parse_subject("/a" * 32)
    parse_subject("/t/" + "x" * (1024 - 3))
    parse_subject("/" + "t" * 249)


def test_bad_record_keys_are_skipped():
    assert subject_for_record("t", b"a//b") is None
    assert subject_for_record("t", b"/a") is None
    assert subject_for_record("t", b"\xff") is None
    assert subject_for_record("t", b"a b") is None
    assert subject_for_record("t", None).text == "/t"


@pytest.mark.parametrize("pattern,subject,expected", [
    ("/matches/>", "/matches/football/5", True),
    ("/matches/>", "/matches", False),
    ("/matches/*/5", "/matches/football/5", True),
    ("/matches/*/5", "/matches/football/6", False),
    ("/matches/*", "/matches/football/5", False),
    ("/matches/football/5", "/matches/football/5", True),
    ("/>", "/anything/at/all", True),
    ("/*", "/t", True),
    ("/*", "/t/x", False),
])
def test_patterns(pattern, subject, expected):
    assert Pattern(pattern).matches(parse_subject(subject)) is expected


@pytest.mark.parametrize("pattern", ["/a/>/b", ">", "/a/b c", "", "/", 3])
def test_invalid_patterns(pattern):
    with pytest.raises(PatternError):
        Pattern(pattern)
