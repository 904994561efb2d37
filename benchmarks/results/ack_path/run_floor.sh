#!/bin/bash
# The C loop (c-send) over 19000 sockets, drains polling (WAIT=0) or sleeping (WAIT>0); perf stat on the sender.
set -u
WAIT=${1:-0}; TAG=${2:-floor$WAIT}; NS=${3:-19000}
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../../.." && pwd)
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
OUT=${ACK_PATH_OUT:-/tmp/ack_path}
O=$OUT/$TAG; mkdir -p $O
uptime > $O/uptime.txt
$PY $REPO/benchmarks/fanout_sockets.py --ns $NS --variants c-send --repeats ${REPEATS:-120} --no-plot \
    --drain-wait-ms $WAIT --round-sleep ${ROUND_SLEEP:-0} --out $O/fanout_sockets.json > $O/out.log 2>&1 &
FPID=$!
for i in $(seq 1 400); do grep -q "c-send round 2" $O/out.log 2>/dev/null && break; sleep 0.25; done
S=$(pgrep -f "fanout_sockets.py --role sender-raw" | head -1)
echo "sender $S fds $(ls /proc/$S/fd | wc -l)" > $O/info.txt
EV=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_writev,sched:sched_wakeup,irq:softirq_entry,ipi:ipi_send_cpu,ipi:ipi_send_cpumask,net:net_dev_xmit,tcp:tcp_probe
$PY $HERE/snap.py $O/s0.json $S
perf stat -p $S -e $EV -x, -o $O/perfstat.csv -- sleep ${STATSEC:-6}
$PY $HERE/snap.py $O/s1.json $S
perf record -g -p $S -o $O/perf.data -- sleep 4 > /dev/null 2>&1
wait $FPID
uptime >> $O/uptime.txt
