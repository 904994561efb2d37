#!/usr/bin/env bash
# Install everything the test suite needs (compiler and chromium if missing, a venv with the package
# built from this checkout and its test extras, which bring Tansu and Playwright; Apache Kafka's jars
# from Maven, which needs Java 17 and maven) and run the suite twice: on the compiled fanout extension, then on its pure-Python twins.
# Both passes always run; the script prints both summaries and exits non-zero if either failed.
# Extra arguments go to pytest, e.g. scripts/test.sh -k recovery
# Installing Debian packages needs root (CI and these machines run as root); as another user, install
# build-essential, python3-dev and chromium first and the script will not call apt-get.
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

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# a regular (not editable) install: the tests import the installed package with its compiled .so
.venv/bin/python -m pip install -q ".[test]"
# TypeScript's compiler (tsc) for the check of gateway/static/client.d.ts, inside the venv (not the repo)
[ -x .venv/typescript/node_modules/.bin/tsc ] ||
    npm install --silent --no-audit --no-fund --prefix .venv/typescript typescript@5 >/dev/null
# Apache Kafka's jars into ~/.cache/kafka-ws-gateway/kafka-<version>/ (Maven's ~/.m2 keeps them too):
# resolved here, once, so that neither pass spends its time on it
.venv/bin/python tests/support/kafka_cluster.py --resolve-only >/dev/null

# pytest (not python -m pytest): the checkout must not shadow the installed package on sys.path.
# Pass 2 runs the whole suite on fanout's pure-Python twins (fanout/_reference.py), the readable
# specification the compiled modules are held to: the gateway must behave the same on both.
# A failing first pass does not stop the second (set -e is off for them).
summaries=()
status=0
run_pass() {
    local name=$1; shift
    local log rc
    log=$(mktemp)
    set +e
    env "$@" GATEWAY_TEST_INSTALLED=1 .venv/bin/pytest "${PYTEST_ARGS[@]}" 2>&1 | tee "$log"
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
echo "== scripts/test.sh: both passes =="
for s in "${summaries[@]}"; do echo "  $s"; done
exit "$status"
