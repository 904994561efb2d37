"""Profile difference per kernel/user symbol, in us per send:
`python cmp.py GATEWAY_TAG GATEWAY_US_PER_SEND FLOOR_TAG FLOOR_US_PER_SEND` (us/send from analyze.py).

Each symbol's share of the cpu-clock samples of `perf record` (TAG/perf.data) times the us per send.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys


def symbols(tag: str, us_per_send: float) -> dict[str, float]:
    data = os.path.join(os.environ.get("ACK_PATH_OUT", "/tmp/ack_path"), tag, "perf.data")
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio", "-g", "none"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+\[(.)\]\s+(\S+)", line)
        if m:
            found[m.group(3)] = float(m.group(1)) / 100 * us_per_send
    return found


def main() -> None:
    a, b = symbols(sys.argv[1], float(sys.argv[2])), symbols(sys.argv[3], float(sys.argv[4]))
    rows = sorted(((a.get(k, 0.0) - b.get(k, 0.0), k) for k in set(a) | set(b)), reverse=True)
    print(f"{sys.argv[1]} - {sys.argv[3]}, us per send (share of cpu-clock samples x us/send)")
    for d, k in rows[:22] + [(0.0, "...")] + rows[-6:]:
        print(f"{d:+.3f}  {k}  ({a.get(k, 0.0):.3f} / {b.get(k, 0.0):.3f})" if k != "..." else "...")


if __name__ == "__main__":
    main()
