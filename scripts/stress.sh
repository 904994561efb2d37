#!/usr/bin/env bash
# Shake out races before they reach CI: run the README's test command (scripts/test.sh, both passes)
# several times in a row while a CPU burner keeps one core busy, and report each run.
#
#   scripts/stress.sh                 # 5 runs of the whole suite
#   RUNS=10 scripts/stress.sh tests/test_kafka_gateway.py -k outage    # chosen tests, 10 runs
#   BURNERS=2 scripts/stress.sh       # both cores busy (harsher than CI)
#
# Arguments go to pytest through scripts/test.sh. Exits non-zero if any run failed. The burners are
# plain busy loops at normal priority (no extra package needed), started and stopped by PID.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
burners=${BURNERS:-1}

pids=()
stop_burners() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
}
trap stop_burners EXIT
for _ in $(seq "$burners"); do
    python3 -c 'while True: pass' &
    pids+=($!)
done

results=()
failed=0
for i in $(seq "$runs"); do
    start=$(date +%s)
    log=$(mktemp --suffix=.log)
    scripts/test.sh "$@" >"$log" 2>&1
    rc=$?
    summary=$(sed -n '/== scripts\/test.sh: both passes ==/,$p' "$log" | tail -n +2 | sed 's/^ */  /')
    results+=("run $i/$runs: exit $rc in $(( $(date +%s) - start )) s"$'\n'"$summary")
    if [ "$rc" != 0 ]; then
        failed=$((failed + 1))
        echo "run $i failed; its log: $log" >&2
        grep -E '^(FAILED|ERROR) ' "$log" >&2
    else
        rm -f "$log"
    fi
    echo "${results[-1]}"
done
echo "== scripts/stress.sh: $((runs - failed)) of $runs runs passed with $burners core(s) kept busy =="
[ "$failed" = 0 ]
