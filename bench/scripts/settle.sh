#!/usr/bin/env bash
# Wait (up to MAX seconds) until the CPU has been >= IDLE% idle over a 5 s
# window, so a measurement does not start while a replica is still loading
# (e.g. the stack's other models) or some other job is running.
#   bench/scripts/settle.sh [IDLE=80] [MAX=180]
IDLE=${1:-80}; MAX=${2:-180}
cpu() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat; }
end=$((SECONDS + MAX))
while (( SECONDS < end )); do
    read -r t0 i0 < <(cpu); sleep 5; read -r t1 i1 < <(cpu)
    idle=$(( 100 * (i1 - i0) / (t1 - t0 + 1) ))
    if (( idle >= IDLE )); then echo "settled: ${idle}% idle" >&2; exit 0; fi
    echo "waiting for the machine to settle: ${idle}% idle" >&2
done
echo "not settled after ${MAX}s; measuring anyway" >&2
