#!/usr/bin/env bash
# The linters, all of them even when one fails (exit 1 then): ruff (config in pyproject.toml), mypy --strict
# (pyproject.toml: gateway/ and fanout's __init__, twins and .pyi stubs), stubtest (mypy's: the fanout .pyi
# stubs against the compiled modules), cython-lint (fanout/*.pyx, *.pxd).
# Usage: scripts/lint.sh [VENV]  (default .venv). The venv needs the `lint` extra and the package installed
# from a wheel or `pip install .` (stubtest imports the compiled modules; run from outside the checkout).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$(cd "${1:-.venv}" && pwd)
bin=$venv/bin
failed=()
run() {
    local name=$1; shift
    echo "-- $name"
    if ! "$@"; then failed+=("$name"); fi
}
run ruff "$bin/ruff" check --no-cache "$root"
run mypy "$bin/mypy" --no-incremental --cache-dir=/dev/null
# stubtest imports the modules: from a directory that is not the checkout (which has no compiled modules);
# it reads the .pyi stubs installed next to them, the same files as the checkout's (the wheel carries them)
run stubtest bash -c "cd / && '$bin/python' -m mypy.stubtest --mypy-config-file '$root/pyproject.toml' \
    fanout._frame fanout._ring fanout._writer fanout._ws fanout._msgs"
# cython-lint runs pycodestyle from PATH
run cython-lint env PATH="$bin:$PATH" "$bin/cython-lint" "$root"/fanout/*.pyx "$root"/fanout/*.pxd
if ((${#failed[@]})); then
    echo "scripts/lint.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "scripts/lint.sh: ruff, mypy, stubtest, cython-lint clean"
