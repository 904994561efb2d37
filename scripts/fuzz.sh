#!/usr/bin/env bash
# Run the atheris harnesses of tests/fuzz/ for longer than CI does: scripts/fuzz.sh [SECONDS] [HARNESS...]
#   scripts/fuzz.sh 600                 # each of fuzz_protocol, fuzz_http, fuzz_ws for 10 minutes
#   scripts/fuzz.sh 3600 fuzz_ws        # one harness for an hour
# Corpora grow in .fuzz/corpus/<harness>/ (kept between runs, seeded from the harness's own seeds
# the first time); findings go to .fuzz/artifacts/<harness>-crash-* and the script exits non-zero.
# Replay one finding: .venv/bin/python tests/fuzz/fuzz_ws.py .fuzz/artifacts/fuzz_ws-crash-...
# Without a harness list it ends with a 2000-attacker sample of tests/test_fuzz_e2e.py on a fresh seed
# (FUZZ_E2E_SEED / FUZZ_E2E_ATTACKERS to choose).
# Needs a venv at .venv with the package and the test extra: python3 -m venv .venv && .venv/bin/pip install ".[test]"
# (scripts/test.sh uses venvs of its own, outside the checkout).
# FUZZ_JOBS=N runs N libFuzzer jobs per harness in parallel (default 1; the machine's cores are shared).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
shift || true
harnesses=("$@")
if ((${#harnesses[@]} == 0)); then harnesses=(fuzz_protocol fuzz_http fuzz_ws); fi
jobs=${FUZZ_JOBS:-1}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -I -c 'import atheris, gateway, fanout' 2>/dev/null; then
    echo "scripts/fuzz.sh: no venv with the package and atheris; make one:" >&2
    echo "  python3 -m venv .venv && .venv/bin/pip install '.[test]'" >&2
    exit 2
fi

mkdir -p .fuzz/artifacts
status=0
for h in "${harnesses[@]}"; do
    mkdir -p ".fuzz/corpus/$h"
    extra=()
    if [ "$h" = fuzz_protocol ]; then extra+=(-dict=tests/fuzz/protocol.dict); fi
    if ((jobs > 1)); then extra+=(-jobs="$jobs" -workers="$jobs"); fi
    echo "== $h for ${seconds}s (corpus .fuzz/corpus/$h)"
    set +e
    .venv/bin/python "tests/fuzz/$h.py" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix=".fuzz/artifacts/$h-" "${extra[@]}" ".fuzz/corpus/$h"
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
        echo "== $h: finding (exit $rc), see .fuzz/artifacts/$h-*" >&2
        status=1
    fi
done
# then a larger sample of the end-to-end attack (tests/test_fuzz_e2e.py) with a fresh seed, when all ran
if (($# == 0)); then
    seed=${FUZZ_E2E_SEED:-$RANDOM$RANDOM}
    echo "== end-to-end sample: FUZZ_E2E_SEED=$seed FUZZ_E2E_ATTACKERS=${FUZZ_E2E_ATTACKERS:-2000}"
    if ! FUZZ_E2E_SEED=$seed FUZZ_E2E_ATTACKERS=${FUZZ_E2E_ATTACKERS:-2000} GATEWAY_TEST_INSTALLED=1 \
            .venv/bin/pytest -q tests/test_fuzz_e2e.py; then
        echo "== end-to-end sample failed; replay it with FUZZ_E2E_SEED=$seed" >&2
        status=1
    fi
fi
exit "$status"
