#!/usr/bin/env bash
# Install everything the test suite needs (compiler and chromium if missing, a venv with the package
# built from this checkout and its test extras, which bring the Kafka-protocol test broker and
# Playwright) and run the suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k recovery
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
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# a regular (not editable) install: the tests import the installed package with its compiled .so
.venv/bin/python -m pip install -q ".[test]"
# pytest (not python -m pytest): the checkout must not shadow the installed package on sys.path
GATEWAY_TEST_INSTALLED=1 .venv/bin/pytest "$@"
# Then the whole suite again on fanout's pure-Python twins (fanout/_reference.py), the readable
# specification the compiled modules are held to: the gateway must behave the same on both.
FANOUT_NO_EXTENSIONS=1 GATEWAY_TEST_INSTALLED=1 exec .venv/bin/pytest "$@"
