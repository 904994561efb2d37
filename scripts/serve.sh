#!/usr/bin/env bash
# Install the gateway from this checkout into .venv (compiling the fanout extension) and run it with
# its demo page, http://127.0.0.1:8800/, and the demo's own feed of score updates (--demo), so the
# page moves by itself. Arguments go to `python -m gateway serve`, e.g. --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q .
# -P: do not put the current directory on sys.path, so the installed (compiled) package runs, not
# the source tree next to it.
exec .venv/bin/python -P -m gateway serve --demo "$@"
