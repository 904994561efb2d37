"""atheris harness: the WebSocket client-frame parser, fanout.WSConn.data_received, compiled
(fanout/_ws.pyx) and its twin (fanout/_reference.py) fed the same bytes in the same pieces.

Input: one byte (low 3 bits: the max_message limit, from MAX_MESSAGES; then 2 bits each for
MAX_FRAGMENTS and MAX_PONGS, used when ws_open takes them), one byte k (0..7 used), k
big-endian u16 cut positions, then the bytes of the connection after the upgrade. Oracle:
support.fuzz_targets.FrameParity.check: both implementations report the same messages and the same
close or failure code and write the same pongs; no message over the limit; nothing after a close.
"""

from __future__ import annotations

import _harness

from support import fanout_impls
from support.fuzz_targets import FrameParity
from support.ws import client_frame as frame

MAX_MESSAGES = (0, 1, 125, 126, 65535, 65536, 1 << 20, 64 << 20)
# 1.1 caps on frames per message and on pongs owed, when ws_open takes them (0: its default)
MAX_FRAGMENTS = (0, 1, 2, 3)
MAX_PONGS = (0, 1, 2, 3)

# the twin is instrumented by _harness (coverage feedback); the compiled one is compared with it
PARITY = FrameParity([fanout_impls.load("compiled"), fanout_impls.load("reference")])


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    cuts, wire = _harness.u16_cuts(data[2:], data[1] & 7)
    PARITY.check(_harness.cut(wire, cuts), MAX_MESSAGES[data[0] & 7],
                 max_fragments=MAX_FRAGMENTS[data[0] >> 3 & 3], max_pongs=MAX_PONGS[data[0] >> 5 & 3])


def seeds() -> list[bytes]:
    connect = frame(1, b'{"op":"connect","client":"fuzz/1"}')
    sub = frame(1, b'{"op":"subscribe","subjects":[{"subject":"/matches/football/5"}]}')
    walls = [
        connect + sub + frame(9, b"ping") + frame(10, b"") + frame(8, b"\x03\xe8bye"),
        frame(1, b'{"op":"pub', fin=False) + frame(9, b"") + frame(0, b'lish"}', fin=False) + frame(0, b"", fin=True),
        frame(2, bytes(range(256)) * 2) + frame(1, b"x" * 126) + frame(2, b"y" * 70000),
        frame(8, b""), frame(8, b"\x03"), frame(8, b"\x03\xe8\xff"), frame(1, b"unmasked", mask=False),
        frame(9, b"x" * 126), frame(0, b"no message to continue"), bytes([0xC1]) + frame(1, b"rsv")[1:],
    ]
    out = [bytes([6, 0]) + w for w in walls]
    out += [bytes([2, 3]) + _harness.encode_cuts([1, 2, 9]) + walls[0], bytes([1, 0]) + walls[2]]
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, seeds)
