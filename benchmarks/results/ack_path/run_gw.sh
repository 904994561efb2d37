#!/bin/bash
# One standalone gateway on CPU 0, loadgen's C clients at N=19000, rate $1 msgs/s; perf stat + counters + perf record.
set -u
RATE=${1:-5}; TAG=${2:-gw}; DUR=${3:-30}
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../../.." && pwd)
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
OUT=${ACK_PATH_OUT:-/tmp/ack_path}
PORT=$((18900 + RANDOM % 90))
O=$OUT/$TAG; mkdir -p $O
uptime > $O/uptime.txt
(cd / && exec taskset -c 0 $PY -m gateway serve --port $PORT --log-level warning ${GW_ARGS:-} > $O/gateway.log 2>&1) &
GPID=$!
sleep 3
$PY benchmarks/load/loadgen.py --url ws://127.0.0.1:$PORT/ws --pid $GPID --connections 19000 --rate $RATE \
   --duration $DUR --out $O/load.json > $O/loadgen.log 2>&1 &
LPID=$!
# wait for the connections
for i in $(seq 1 120); do n=$(ls /proc/$GPID/fd | wc -l); [ $n -ge 19000 ] && break; sleep 1; done
echo "fds $n after $i s" > $O/info.txt
sleep 6   # settle 1 s + idle 2 s + publisher start
EV=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_writev,sched:sched_wakeup,irq:softirq_entry,ipi:ipi_send_cpu,ipi:ipi_send_cpumask,net:net_dev_xmit,tcp:tcp_probe
$PY $HERE/snap.py $O/s0.json $GPID
perf stat -p $GPID -e $EV -x, -o $O/perfstat.csv -- sleep 10
$PY $HERE/snap.py $O/s1.json $GPID
perf record -g -p $GPID -o $O/perf.data -- sleep 8 > /dev/null 2>&1
wait $LPID
kill $GPID; wait $GPID 2>/dev/null
uptime >> $O/uptime.txt
