#!/usr/bin/env bash
# Install everything the test suite needs (compiler if missing, a venv with the package built from
# this checkout and its test extras, which bring the Kafka-protocol test broker) and run the suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k recovery
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1 || ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    apt-get update -qq && apt-get install -y -qq build-essential python3-dev >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# a regular (not editable) install: the tests import the installed package with its compiled .so
.venv/bin/python -m pip install -q ".[test]"
# pytest (not python -m pytest): the checkout must not shadow the installed package on sys.path
GATEWAY_TEST_INSTALLED=1 exec .venv/bin/pytest "$@"
