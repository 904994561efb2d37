"""Shared start-up of the atheris harnesses in this directory (tests/fuzz/README.md lists them).

A harness is a script: `python tests/fuzz/fuzz_ws.py [libFuzzer flags] [CORPUS_DIR ...]`. It imports
the code under test with atheris's bytecode instrumentation (coverage and comparison feedback for the
pure-Python code: gateway and fanout/_reference.py; the compiled fanout modules run uninstrumented),
writes its seed inputs into the first corpus directory when that directory is empty, and fuzzes.
Any exception escaping TestOneInput is a finding: libFuzzer prints it and writes the input to
`<artifact_prefix>crash-<sha1>`; re-run one input with `python tests/fuzz/fuzz_ws.py CRASH_FILE`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris

# tests/ on the path for support.fuzz_targets (the oracles shared with the hypothesis properties);
# gateway and fanout come from wherever Python finds them (the installed package in CI)
TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

with atheris.instrument_imports(include=["gateway", "fanout"]):
    import fanout._reference  # noqa: F401  - the twin: instrumented, it guides the frame fuzzer
    import gateway.http  # noqa: F401
    import gateway.protocol  # noqa: F401
    import gateway.subjects  # noqa: F401


def u16_cuts(data: bytes, count: int) -> tuple[list[int], bytes]:
    """`count` cut positions (2 bytes each, big-endian) from the start of data, and the rest."""
    cuts = [int.from_bytes(data[2 * i:2 * i + 2], "big") for i in range(count)]
    return cuts, data[2 * count:]


def encode_cuts(cuts: list[int]) -> bytes:
    return b"".join(c.to_bytes(2, "big") for c in cuts)


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def seed_corpus(argv: list[str], seeds: Iterable[bytes]) -> None:
    """Write the seeds into the first corpus directory given, if it is empty (libFuzzer adds to it)."""
    dirs = [a for a in argv[1:] if not a.startswith("-") and os.path.isdir(a)]
    if not dirs or any(os.scandir(dirs[0])):
        return
    for seed in seeds:
        Path(dirs[0], "seed-" + hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)


def main(test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    seed_corpus(sys.argv, seeds())
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
