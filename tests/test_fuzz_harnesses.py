"""The atheris harnesses of tests/fuzz/, each run for a bounded time (FUZZ_SECONDS, default 40) in a
subprocess, from its seed corpus. A finding fails the test with the harness's own report (the Python
traceback and the input). Marked `fuzz`: scripts/test.sh runs them in its first pass only (the
harnesses compare or exercise both fanout implementations themselves); scripts/fuzz.sh runs them longer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
SECONDS = int(os.environ.get("FUZZ_SECONDS", "40"))

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(SECONDS + 180)]


@pytest.mark.parametrize("harness", ["fuzz_protocol", "fuzz_http", "fuzz_ws"])
def test_harness_runs_clean(harness, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    args = [sys.executable, str(FUZZ_DIR / f"{harness}.py"), f"-max_total_time={SECONDS}", "-timeout=20",
            "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    if harness == "fuzz_protocol":
        args.append(f"-dict={FUZZ_DIR / 'protocol.dict'}")
    args.append(str(corpus))
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=SECONDS + 150,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, (
        f"{harness} found something ({crashes}), exit {proc.returncode}:\n{out[-6000:]}")
    # it really fuzzed: the seeds were loaded and inputs beyond them were run
    inited = re.search(r"INITED cov: \d+ ft: \d+ corp: (\d+)/", out)
    assert inited and int(inited.group(1)) >= 3, out[-3000:]
    runs = re.search(r"Done (\d+) runs", out)
    assert runs and int(runs.group(1)) > 1000, out[-3000:]
