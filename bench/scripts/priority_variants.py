"""Scheduler priorities for the stack's processes, for alone_abba.sh's `stack+VARIANT` segments.

    STACK_HOOK=".venv/bin/python bench/scripts/priority_variants.py" \
        flock /tmp/serving-heavy.lock bench/scripts/alone_abba.sh OUT "vllm stack stack+nice ..."

Variants (every THREAD: on Linux nice and policy are per thread, so setting only a process's main
thread, as flush_sweep.sh's `-nice` did, leaves its gRPC and event-loop threads at 0):
  idle     Ray's daemons (GCS, raylet, dashboard, agents, monitors), Serve's controller and proxy,
           the HAProxy manager and the `serving up` driver at SCHED_IDLE
  nice     every stack process but the vLLM engine core at nice 10
  idleall  every stack process but the vLLM engine core at SCHED_IDLE
"""

import os
import re
import sys

DAEMONS = re.compile(r"gcs_server|/raylet/raylet|dashboard\.py|ray::DashboardAgent|ray::RuntimeEnvAgent|log_monitor\.py|"
                     r"autoscaler/_private/monitor\.py|ray::ServeController|ray::ProxyActor|ray::HAProxyManager|bin/serving up")
STACK = re.compile(r"site-packages/ray|^ray::|haproxy|bin/serving up")


def main(variant: str) -> None:
    chosen = DAEMONS if variant == "idle" else STACK
    changed = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            comm = open(f"/proc/{pid}/comm").read()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if not chosen.search(args) or comm.startswith("VLLM::EngineCor"):
            continue
        for tid in map(int, tids):
            try:
                if variant == "nice":
                    os.setpriority(os.PRIO_PROCESS, tid, 10)
                else:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                changed += 1
            except OSError as error:
                print("failed", pid, tid, error)
        print(pid, args[:100])
    print("threads changed:", changed)


if __name__ == "__main__":
    main(sys.argv[1])
